//! The router over HTTP, in process: the real axum application in front of
//! fake backends (or mock workers), driven as a client drives it.

mod admission;
mod bad_input;
mod e2e;
mod fields;
mod http;
mod models;
mod responses;
mod sse_props;
mod tenancy;

//! Everything HTTP: the axum application, its shared state, the handlers that
//! adapt each endpoint to the stages below, the API key extractor, the one
//! error-to-response mapping and the OpenAPI document. Nothing under this
//! folder decides how a request runs; `prepare`, `generate` and `respond` do.

pub mod app;
pub mod auth;
pub mod embeddings;
pub mod error;
pub mod generate;
pub mod meta;
pub mod openapi;
pub mod sse;
pub mod state;
pub mod threads;
pub mod tokenize;

//! OpenAI wire types: what clients send ([`request`]) and what they get back
//! ([`response`]). Field names and defaults follow OpenAI, then vLLM for extras.
//! [`openapi`] describes them for `GET /openapi.json`.

pub mod format;
pub mod openapi;
pub mod request;
pub mod response;

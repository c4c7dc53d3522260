//! The first stage: an OpenAI body becomes a checked request with its prompt
//! token ids. No HTTP here: failures are [`validate::ValidationError`]s.

pub mod embeddings;
pub mod error;
pub mod not_honoured;
pub mod request;
pub mod responses;
pub mod scoring;
pub mod tokenize;
pub mod validate;

//! OpenAI wire types: what clients send ([`request`]) and what they get back
//! ([`response`]). Field names and defaults follow OpenAI, then vLLM for extras.

pub mod format;
pub mod request;
pub mod response;

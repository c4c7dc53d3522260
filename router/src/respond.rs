//! The last stage: the workers' token stream becomes text deltas (incremental
//! detokenization, stop strings, tool calls) and then OpenAI response bodies
//! and stream chunks.

pub mod embeddings;
pub mod format;
pub mod response;
pub mod responses;
pub mod scoring;
pub mod stream;
pub mod tool_calls;

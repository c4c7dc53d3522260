//! What a prompt becomes before any process runs it, shared by the router, the workers and the
//! engine. Pure functions: no I/O, no async runtime, no telemetry, so the engine links none.
//!
//! # Layout
//!
//! - [`chat_template`]: a model's chat template rendered as Hugging Face renders it (the router
//!   from the model card, the engine's offline batch from the model).
//! - [`encode`]: text -> token ids as the Hugging Face tokenizer gives them, on a fast path for
//!   byte-level BPE vocabularies; [`decode`] the way back.
//! - [`block_hash`]: the salted, chained hash of full KV blocks that names cached prefixes on the
//!   workers and in the router's index.
//! - [`detokenize`]: generated ids to text as they arrive, and stop strings found in it.
//! - [`bad_words`]: vLLM's `bad_words` as the token sequences the samplers forbid.
//! - [`beam`]: vLLM's beam search as a state machine the router and the offline library drive.

pub mod bad_words;
pub mod beam;
pub mod block_hash;
mod byte_level;
pub mod chat_template;
pub mod decode;
pub mod detokenize;
pub mod encode;

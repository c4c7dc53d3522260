//! The serving engine shared by prefill and decode workers.
//!
//! # Layout
//!
//! - [`model`]: GGUF and Hugging Face (safetensors) loading (read with candle), and the Llama forward
//!   pass on its own AVX2 quantized kernels; the same forward on candle tensors for CUDA GPUs
//!   ([`model::DeviceLlama`], which mirrors the KV cache in device memory). Weights are read-only;
//!   KV and positions come in through [`ForwardBatch`] and [`KvStorage`].
//! - [`tokenizer`]: a Hugging Face tokenizer built from GGUF metadata.
//! - [`kv`]: paged KV storage, addressed by block id, and hand-offs landing in it.
//! - [`forward`]: what one forward step computes.
//! - `sampler`, `scheduler::block_manager` (ref counts, prefix cache, [`KvEvent`]s),
//!   `scheduler`, `engine`: the serving loop.
//! - [`offline`]: offline batch inference ([`offline::Llm`], vLLM's `LLM.generate` / `LLM.chat`).

pub mod comm;
pub mod engine;
mod error;
pub mod forward;
pub mod kv;
pub mod model;
pub mod offline;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod tokenizer;

pub use engine::{Engine, EngineConfig, EngineHandle, EngineStats};
pub use forward::{Forward, ForwardBatch, ForwardError, Logits, RankKv, SeqChunk};
pub use kv::cache::{KvArena, KvCacheShape, KvStorage};
pub use kv::landing::{KvLanding, LandingReporter};
pub use request::{
    EngineError, EngineEvent, EngineRequest, FailureKind, FinishReason, KvReservation, KvSource, RequestError, MAX_N,
};
pub use sampler::{SamplingParams, TokenLogprobs, MAX_TOP_LOGPROBS};
pub use scheduler::block_manager::{BlockHash, KvEvent};

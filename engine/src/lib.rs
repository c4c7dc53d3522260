//! The serving engine shared by prefill and decode workers.
//!
//! # Layout
//!
//! In the order a request meets them:
//!
//! - [`tokenizer`]: prompt text to token ids and back, a Hugging Face tokenizer built from GGUF
//!   metadata.
//! - [`request`]: what a caller submits ([`EngineRequest`], its prompt's [`KvSource`]) and hears
//!   back ([`EngineEvent`]), and the errors that refuse or fail it.
//! - [`engine`]: [`Engine::start`], the [`EngineHandle`] callers hold, and the step thread that
//!   drives everything below, one step at a time.
//! - [`scheduler`]: queues, admission, preemption and each step's plan; its `block_manager` keeps
//!   the blocks' ref counts and the prefix cache, and reports [`KvEvent`]s.
//! - [`kv`]: paged KV storage, addressed by block id, and hand-offs landing in it layer by layer.
//! - [`forward`]: what one step computes ([`ForwardBatch`]) and the trait of the models that run it
//!   ([`Forward`]; [`forward::RankModel`] for one tensor-parallel rank's shard).
//! - [`model`]: GGUF and Hugging Face (safetensors) loading (read with candle), and the Llama forward
//!   pass on its own AVX2 quantized kernels; the same forward on candle tensors for CUDA GPUs
//!   ([`model::DeviceLlama`], which mirrors the KV cache in device memory); tensor-parallel sharding
//!   ([`model::TensorParallel`]). Weights are read-only; KV and positions come in through
//!   [`ForwardBatch`] and [`KvStorage`].
//! - [`comm`]: the collectives between tensor-parallel ranks (CPU threads; NCCL with `cuda`). How a
//!   step or a collective fails ([`ForwardError`], [`comm::CommError`]) is in `error`, a leaf both
//!   share.
//! - [`sampler`]: one row of logits to one token, per the request's [`SamplingParams`].
//! - [`offline`]: offline batch inference ([`offline::Llm`], vLLM's `LLM.generate` / `LLM.chat`), an
//!   in-process caller of all the above.

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
pub use forward::{DraftFill, Forward, ForwardBatch, ForwardError, Hidden, Logits, RankKv, SeqChunk};
pub use kv::cache::{KvArena, KvCacheShape, KvStorage};
pub use kv::landing::{KvLanding, LandingReporter};
pub use request::{
    l2_normalize, EngineError, EngineEvent, EngineRequest, FailureKind, FinishReason, KvReservation, KvSource, Pooling,
    RequestError, MAX_N,
};
pub use sampler::{SamplingParams, TokenLogprobs, MAX_TOP_LOGPROBS};
pub use scheduler::block_manager::{BlockHash, KvEvent};
pub use scheduler::{NgramLookup, SpeculationStats, SpeculativeConfig, SpeculativeConfigError, SpeculativeMethod};

//! What both worker binaries share.
//!
//! # Layout
//!
//! - [`args`]: the engine flags (`--model`, `--num-kv-blocks`, ...).
//! - [`load`]: model + engine start-up, and the model card it publishes.
//! - [`memory`]: the machine's and the process's memory, for fractional KV budgets.
//! - [`service`]: the `Worker` gRPC service (model card, stats, KV event stream).
//! - [`kv_events`]: the engine's KV events as a snapshot-then-deltas stream for routers.
//! - [`blocks`]: the engine's KV cache as a kv-transfer block source.
//! - [`convert`]: wire types to engine types, with the checks a worker owes its callers.
//! - [`structured`]: structured outputs compiled against the model's vocabulary.
//! - [`mock`]: `--mock`, services that answer without a model, for benchmarks only.

pub mod args;
pub mod blocks;
pub mod convert;
pub mod discovery;
pub mod kv_events;
pub mod lifecycle;
pub mod load;
pub mod memory;
pub mod mock;
pub mod service;
pub mod structured;

pub use args::EngineArgs;
pub use kv_events::{KvEventConfig, KvEventPublisher, KvEventSource, KvEventStream};
pub use load::{load_card, load_engine, LoadedEngine};
pub use service::WorkerService;

//! What every process of the cluster shares.
//!
//! # Layout
//!
//! - [`block_hash`]: the salted chained KV block hash the engine and router share.
//! - [`chat_template`]: chat templates rendered as Hugging Face renders them.
//! - [`cli`]: flag parsing with one-line errors.
//! - [`telemetry`]: tracing set-up for the binaries.
//! - [`shutdown`]: the signal every process stops on.
//! - `discovery` (feature `discovery`): worker registration and watches over etcd.

pub mod block_hash;
pub mod chat_template;
pub mod cli;
#[cfg(feature = "discovery")]
pub mod discovery;
pub mod shutdown;
pub mod telemetry;

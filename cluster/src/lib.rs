//! What every process of the cluster shares.
//!
//! # Layout
//!
//! - [`block_hash`]: the salted chained KV block hash the engine and router share.
//! - [`cli`]: flag parsing with one-line errors.
//! - [`telemetry`]: tracing set-up for the binaries.
//! - [`shutdown`]: the signal every process stops on.

pub mod block_hash;
pub mod cli;
pub mod shutdown;
pub mod telemetry;

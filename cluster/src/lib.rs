//! What every process of the cluster shares.
//!
//! # Layout
//!
//! - [`cli`]: flag parsing with one-line errors.
//! - [`telemetry`]: tracing set-up for the binaries.
//! - [`shutdown`]: the signal every process stops on.
//! - `discovery` (feature `discovery`): worker registration and watches over etcd.

pub mod cli;
#[cfg(feature = "discovery")]
pub mod discovery;
pub mod shutdown;
pub mod telemetry;

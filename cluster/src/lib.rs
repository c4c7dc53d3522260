//! What every process of the cluster shares.
//!
//! # Layout
//!
//! - [`telemetry`]: tracing set-up for the binaries.
//! - [`shutdown`]: the signal every process stops on.

pub mod shutdown;
pub mod telemetry;

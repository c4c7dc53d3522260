//! What every process of the cluster shares.
//!
//! # Layout
//!
//! - [`cli`]: flag parsing with one-line errors.
//! - [`telemetry`]: tracing set-up for the binaries.
//! - [`shutdown`]: the signal every process stops on.

pub mod cli;
pub mod shutdown;
pub mod telemetry;

//! The KV hand-off between prefill and decode workers.
//!
//! # Layout
//!
//! - [`params`]: vLLM's `kv_transfer_params`, typed, with their JSON form.
//! - [`layout`]: the shape of a KV block; both sides must agree exactly.
//! - [`connector`]: the prefill side: pins a finished prompt's blocks under a
//!   timeout and serves them to the decode worker that pulls them.
//! - [`client`]: the decode side: pulls pinned blocks, then releases them.
//! - [`frame`]: length-prefixed protobuf frames over TCP.

pub mod client;
pub mod connector;
pub mod frame;
pub mod layout;
pub mod params;

pub use client::pull_blocks;
pub use connector::{BlockSource, KvConnector, PinStats};
pub use layout::{KvDtype, KvLayout, LayoutMismatch};
pub use params::{KvTransferParams, RemotePrefill};

/// Why a hand-off failed.
#[derive(Debug, thiserror::Error)]
pub enum KvTransferError {
    #[error("kv-transfer peer {addr}: {source}")]
    Io { addr: String, source: std::io::Error },
    #[error("kv-transfer peer {addr} refused the pull: {message}")]
    Refused { addr: String, message: String },
    #[error("kv-transfer protocol error with {addr}: {message}")]
    Protocol { addr: String, message: String },
    #[error("kv-transfer peer {addr} did not answer within {secs} s")]
    Timeout { addr: String, secs: u64 },
}

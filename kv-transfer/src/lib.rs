//! The KV hand-off between prefill and decode workers.
//!
//! # Layout
//!
//! - [`params`]: vLLM's `kv_transfer_params`, typed, with their JSON form:
//!   the only thing about a hand-off that travels through the router.
//! - [`layout`]: the shape of a rank's KV blocks, the paged layout of its
//!   memory, and which heads a rank pulls from which rank across TP sizes.
//! - [`memory`]: a rank's KV memory as the server reads it, and the order
//!   of a payload.
//! - [`connector`]: the prefill side: pins a finished prompt's blocks under a
//!   lease and serves them, over TCP with gathered writes straight from the
//!   block memory, or through [`shm`] to a same-host puller.
//! - [`client`]: the decode side: pulls a rank's heads, then releases.
//! - [`checksum`]: the per-transfer xxh3 that catches a corrupted block.
//! - [`frame`]: length-prefixed protobuf control frames.

pub mod checksum;
pub mod client;
pub mod connector;
pub mod frame;
pub mod layout;
pub mod memory;
pub mod params;
pub mod shm;

pub use client::{KvPuller, PullCounts, Pulled, PullerConfig, TransportPolicy};
pub use connector::{BlockSource, ConnectorConfig, KvConnector, KvConnectors, PinStats};
pub use layout::{pull_plan, DraftKv, KvDtype, KvLayout, LayoutMismatch, PullPiece};
pub use memory::{KvMemory, PullTarget};
pub use params::{KvTransferParams, RemotePrefill};
pub use proto::kv::Transport;

/// Why a hand-off failed.
#[derive(Debug, thiserror::Error)]
pub enum KvTransferError {
    #[error("kv-transfer peer {addr}: {source}")]
    Io { addr: String, source: std::io::Error },
    #[error("kv-transfer peer {addr} refused: {message}")]
    Refused { addr: String, message: String },
    #[error("kv-transfer protocol error with {addr}: {message}")]
    Protocol { addr: String, message: String },
    #[error("kv-transfer peer {addr} did not answer within {secs} s")]
    Timeout { addr: String, secs: f64 },
    #[error("kv-transfer from {addr}: checksum {got:#018x} does not match the sender's {expected:#018x}; the blocks were not used")]
    Checksum { addr: String, expected: u64, got: u64 },
    #[error("kv-transfer target: {0}")]
    Target(String),
}

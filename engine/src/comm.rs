//! Collectives for tensor parallelism: one model run across `world_size` ranks.
//!
//! [`Communicator`] is what the sharded model needs from its peers: an
//! all-reduce sum after each row-parallel projection, an all-gather, and a
//! broadcast of rank 0's step plan. [`cpu::CpuGroup`] runs the ranks as
//! threads of one process exchanging through shared buffers, so every test
//! runs without a GPU; `nccl::NcclGroup` is the backend over GPUs, behind
//! the `cuda` feature. Nothing here knows a model: the sharded models are in
//! [`crate::model`] ([`crate::model::TensorParallel`]).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod nccl;

pub use crate::error::CommError;

use std::time::Duration;

use candle_core::Tensor;

use crate::error::ForwardError;

/// The collectives of one rank of a tensor-parallel group. Every rank must
/// call the same collectives in the same order with matching sizes.
pub trait Communicator: Send + Sync {
    /// This rank, in `0..world_size`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world_size(&self) -> usize;
    /// Replaces `data` on every rank with the elementwise sum of every
    /// rank's `data` (all the same length).
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError>;
    /// [`Communicator::all_reduce_sum`] of an f32 tensor on any device; the
    /// sum comes back as a new tensor there. By default it is staged through
    /// host memory ([`all_reduce_through_host`]); a backend whose buffers
    /// live on the GPU reduces there instead.
    fn all_reduce_sum_tensor(&self, y: &Tensor) -> Result<Tensor, ForwardError> {
        all_reduce_through_host(self, y)
    }
    /// Writes every rank's `local` (all the same length) into `out`, in rank
    /// order; `out` is `world_size × local.len()` long.
    fn all_gather(&self, local: &[f32], out: &mut [f32]) -> Result<(), CommError>;
    /// Replaces `data` on every rank with rank `root`'s.
    fn broadcast(&self, data: &mut Vec<u8>, root: usize) -> Result<(), CommError>;
    /// Breaks the group because this rank cannot go on: every waiting and
    /// later collective of every rank fails with [`CommError::Broken`].
    fn abort(&self, reason: &str);
}

/// An all-reduce of `y` (f32) through host memory, where
/// [`Communicator::all_reduce_sum`] takes its buffer.
pub fn all_reduce_through_host<C: Communicator + ?Sized>(comm: &C, y: &Tensor) -> Result<Tensor, ForwardError> {
    let mut host = y.flatten_all()?.to_vec1::<f32>()?;
    comm.all_reduce_sum(&mut host)?;
    Ok(Tensor::from_vec(host, y.shape(), y.device())?)
}

/// How long a rank waits for its peers at a collective before the group is
/// declared broken. A step's slowest rank is a few ms behind the others; a
/// minute means a rank is stuck for good.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

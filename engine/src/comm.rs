//! Tensor parallelism: one model run across `world_size` ranks.
//!
//! [`Communicator`] is what the sharded model needs from its peers: an
//! all-reduce sum after each row-parallel projection, an all-gather, and a
//! broadcast of rank 0's step plan. [`cpu::CpuGroup`] runs the ranks as
//! threads of one process exchanging through shared buffers, so every test
//! runs without a GPU; `nccl::NcclGroup` is the backend over GPUs, behind
//! the `cuda` feature.
//! [`TensorParallel`] is a model sharded over CPU ranks that the engine
//! steps like any other.

pub mod cpu;
mod model;
#[cfg(feature = "cuda")]
pub mod nccl;

pub use model::TensorParallel;

use std::sync::Arc;
use std::time::Duration;

use candle_core::Tensor;

use crate::forward::{Forward, ForwardBatch, ForwardError, Logits};
use crate::kv::cache::{KvCacheShape, KvStorage};
use crate::model::{ComputeDevice, DeviceLlama, Llama, ModelError, WeightDtype};

/// The model a worker steps for `--device` and `--tensor-parallel-size`:
/// `model` itself (the engine's kernels on the CPU), [`DeviceLlama`] on one
/// GPU, or a [`TensorParallel`] of either over `tp_size` ranks. Matrices on a
/// device are in `dtype`. `model` is dropped once copied, so the caller
/// holds one copy of the weights only while it is built.
pub fn place(
    model: Arc<Llama>,
    device: ComputeDevice,
    tp_size: usize,
    dtype: WeightDtype,
) -> Result<Arc<dyn Forward>, ModelError> {
    Ok(match device {
        ComputeDevice::Cpu if tp_size > 1 => Arc::new(TensorParallel::new(&model, tp_size)?),
        ComputeDevice::Cpu => model,
        device if tp_size > 1 => Arc::new(TensorParallel::on_devices(&model, device, tp_size, dtype)?),
        device => Arc::new(DeviceLlama::on(&model, device, dtype)?),
    })
}

/// Why a collective did not complete. Any of them takes the whole group
/// down: a tensor-parallel step cannot finish without every rank.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    /// A rank left the group (it panicked, or its worker is shutting down).
    #[error("tensor-parallel group broken: {0}")]
    Broken(String),
    /// A peer did not reach the collective in time.
    #[error("tensor-parallel rank {rank} waited {secs} s for its peers; the group is broken")]
    Timeout { rank: usize, secs: f64 },
    /// The ranks disagree on a collective's size.
    #[error("rank {rank} passed {got} values to a collective of {expected}")]
    SizeMismatch { rank: usize, expected: usize, got: usize },
}

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

/// One rank's shard of a model, as [`TensorParallel`] steps it: the
/// engine's kernels ([`crate::model::Llama::shard`]) or candle tensors on a
/// device ([`crate::model::DeviceLlama`]).
pub trait RankModel: Send + Sync + 'static {
    /// Rejects a batch this rank could not run; every rank would refuse it
    /// the same way, so rank 0 checks before any rank starts.
    fn check(&self, batch: &ForwardBatch, kv: &KvStorage) -> Result<(), ForwardError>;
    /// One step on this rank's KV cache, all-reducing its partial sums
    /// through `comm`; every rank returns the same logits.
    fn forward_rank(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvStorage,
        comm: &dyn Communicator,
    ) -> Result<Logits, ForwardError>;
    /// A follower's share of a step: [`RankModel::forward_rank`] without the
    /// LM head, since only rank 0's logits are sampled.
    fn follow_rank(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvStorage,
        comm: &dyn Communicator,
    ) -> Result<(), ForwardError>;
    /// The KV cache shape of this rank: its share of the KV heads.
    fn kv_shape(&self, block_size: usize, num_blocks: usize) -> KvCacheShape;
    /// Size of a logits row.
    fn vocab_size(&self) -> usize;
}

/// How long a rank waits for its peers at a collective before the group is
/// declared broken. A step's slowest rank is a few ms behind the others; a
/// minute means a rank is stuck for good.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

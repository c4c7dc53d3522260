//! Tensor parallelism: [`TensorParallel`] is a Llama sharded over ranks (CPU threads, or one GPU
//! each), stepped by the engine like any model; [`place`] picks the model a worker steps.
//!
//! Rank 0 is the engine's step thread: it owns the scheduler, so it alone
//! decides what a step computes. Each other rank is a thread that only
//! executes: it waits for a step's plan (the batch and its own KV cache),
//! runs its shard through the same collectives as rank 0, and reports back.
//!
//! ```text
//! step thread (rank 0)          rank r > 0
//!   check the batch
//!   send (batch, kv[r]) ──────► lock kv[r], follow_rank ─┐
//!   lock kv[0], forward_rank ◄── all-reduces ───────────►│
//!   wait for every rank ◄────── done ◄───────────────────┘
//! ```
//!
//! A rank that fails, panics or is gone breaks the group: its peers' next
//! collective fails at once (see [`crate::comm::cpu`]), this step and every later
//! one return [`ForwardError::Comm`], and the engine fails for good.

use crate::comm::cpu::CpuGroup;
use crate::comm::{CommError, Communicator, DEFAULT_TIMEOUT};
use crate::forward::{Forward, ForwardBatch, ForwardError, Logits, RankKv, RankModel};
use crate::kv::cache::{KvCacheShape, KvStorage};
use crate::model::{ComputeDevice, DeviceLlama, Llama, ModelError, WeightDtype};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

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

/// A [`Llama`] run across `world_size` ranks (Megatron sharding, see
/// [`Llama::shard`]), each with its own KV cache of its KV heads: CPU ranks
/// on the engine's kernels, or one GPU per rank.
pub struct TensorParallel {
    leader: Box<dyn RankModel>,
    comm: Box<dyn Communicator>,
    followers: Vec<Follower>,
}

/// One rank: its shard and its end of the group.
pub type Rank = (Box<dyn RankModel>, Box<dyn Communicator>);

/// Rank 0's end of another rank's thread.
struct Follower {
    rank: usize,
    orders: mpsc::Sender<Order>,
    /// Only the step thread receives; the lock makes the model `Sync`.
    done: Mutex<mpsc::Receiver<Result<(), ForwardError>>>,
    thread: Option<JoinHandle<()>>,
}

enum Order {
    Step {
        batch: Arc<ForwardBatch>,
        kv: RankKv,
    },
    /// End the thread as a crash would: the group breaks.
    Leave,
}

impl TensorParallel {
    /// Shards `model` over `world_size` ranks and starts ranks `1..`.
    pub fn new(model: &Llama, world_size: usize) -> Result<Self, ModelError> {
        Self::with_timeout(model, world_size, DEFAULT_TIMEOUT)
    }

    /// Like [`TensorParallel::new`], with how long a rank waits for its
    /// peers at a collective before the group counts as broken.
    pub fn with_timeout(model: &Llama, world_size: usize, timeout: Duration) -> Result<Self, ModelError> {
        let comms = CpuGroup::ranks_with_timeout(world_size, timeout);
        let ranks = (0..world_size).zip(comms).map(|(rank, comm)| -> Result<Rank, ModelError> {
            Ok((Box::new(model.shard(rank, world_size)?), Box::new(comm)))
        });
        Self::from_ranks(ranks.collect::<Result<_, _>>()?)
    }

    /// Shards `model` over `world_size` ranks on candle devices, matrices in
    /// `dtype`: on GPUs `0..world_size` over NCCL for [`ComputeDevice::Cuda`]
    /// (the `cuda` feature), or on the CPU device over CPU ranks (what the
    /// tests run without a GPU).
    pub fn on_devices(
        model: &Llama,
        device: ComputeDevice,
        world_size: usize,
        dtype: WeightDtype,
    ) -> Result<Self, ModelError> {
        let comms: Vec<Box<dyn Communicator>> = match device {
            ComputeDevice::Cpu => {
                CpuGroup::ranks(world_size).into_iter().map(|c| Box::new(c) as Box<dyn Communicator>).collect()
            }
            ComputeDevice::Cuda(first) if first != 0 => {
                return Err(ModelError::TensorParallel(format!(
                    "{world_size} ranks run on GPUs 0..{world_size}; use --device cuda, not {device}"
                )))
            }
            ComputeDevice::Cuda(_) => gpu_comms(world_size)?,
        };
        let ranks = comms.into_iter().zip(device.ranks(world_size)).enumerate().map(
            |(rank, (comm, on))| -> Result<Rank, ModelError> {
                Ok((Box::new(DeviceLlama::on(&model.shard(rank, world_size)?, on, dtype)?), comm))
            },
        );
        Self::from_ranks(ranks.collect::<Result<_, _>>()?)
    }

    /// Rank 0 steps on the caller's thread; ranks `1..` start on their own.
    ///
    /// # Panics
    /// If `ranks` is empty.
    pub fn from_ranks(ranks: Vec<Rank>) -> Result<Self, ModelError> {
        let mut ranks = ranks.into_iter();
        let (leader, comm) = ranks.next().expect("at least one rank");
        let followers = ranks.enumerate().map(|(i, (shard, comm))| Follower::start(i + 1, shard, comm));
        Ok(Self { leader, comm, followers: followers.collect::<Result<_, _>>()? })
    }

    /// The KV cache shape of each rank: its share of the KV heads.
    pub fn kv_shape(&self, block_size: usize, num_blocks: usize) -> KvCacheShape {
        self.leader.kv_shape(block_size, num_blocks)
    }

    /// Ends rank `rank`'s thread as a crash would, for fault tests: the
    /// group breaks and the next step fails.
    ///
    /// # Panics
    /// If `rank` is 0 (the caller's own) or not a rank of the group.
    pub fn kill_rank(&self, rank: usize) {
        assert!(rank > 0 && rank <= self.followers.len(), "rank {rank} is not a follower rank");
        let _ = self.followers[rank - 1].orders.send(Order::Leave);
    }

    fn broken(rank: usize) -> ForwardError {
        ForwardError::Comm(CommError::Broken(format!("rank {rank} is gone")))
    }
}

impl Follower {
    fn start(rank: usize, shard: Box<dyn RankModel>, comm: Box<dyn Communicator>) -> Result<Self, ModelError> {
        let (orders, inbox) = mpsc::channel();
        let (report, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("tp-rank-{rank}"))
            .spawn(move || follow(shard, comm, inbox, report))
            .map_err(|e| ModelError::TensorParallel(format!("cannot start rank {rank}: {e}")))?;
        Ok(Self { rank, orders, done: Mutex::new(done), thread: Some(thread) })
    }
}

/// A follower rank's loop: execute each step it is sent, until told to
/// leave or rank 0 is gone. Dropping `comm` on the way out breaks the group.
fn follow(
    shard: Box<dyn RankModel>,
    comm: Box<dyn Communicator>,
    inbox: mpsc::Receiver<Order>,
    report: mpsc::Sender<Result<(), ForwardError>>,
) {
    while let Ok(Order::Step { batch, kv }) = inbox.recv() {
        let step = catch_unwind(AssertUnwindSafe(|| {
            let mut kv = kv.write().unwrap_or_else(PoisonError::into_inner);
            shard.follow_rank(&batch, &mut kv, comm.as_ref())
        }));
        let result = step.unwrap_or_else(|_| Err(ForwardError::Comm(CommError::Broken("panicked".into()))));
        let failed = result.is_err();
        if failed {
            // Rank 0 checked the batch, so a failure here is mid-step, with
            // the peers possibly inside a collective: release them now.
            comm.abort("its step failed");
        }
        if report.send(result).is_err() || failed {
            return;
        }
    }
}

impl Forward for TensorParallel {
    /// A tensor-parallel model needs every rank's cache: see
    /// [`Forward::forward_ranks`].
    fn forward(&self, _batch: &ForwardBatch, _kv: &mut KvStorage) -> Result<Logits, ForwardError> {
        Err(ForwardError::InvalidBatch(format!(
            "a model on {} tensor-parallel ranks steps with one KV cache per rank",
            self.tp_size()
        )))
    }

    fn vocab_size(&self) -> usize {
        self.leader.vocab_size()
    }

    fn waits_for_layers(&self) -> bool {
        // Every rank waits for a landing hand-off's layer before its cache.
        true
    }

    fn tp_size(&self) -> usize {
        self.followers.len() + 1
    }

    fn forward_ranks(&self, batch: &ForwardBatch, kv: &[RankKv]) -> Result<Logits, ForwardError> {
        if kv.len() != self.tp_size() {
            return Err(ForwardError::InvalidBatch(format!("{} KV caches for {} ranks", kv.len(), self.tp_size())));
        }
        let mut leader_kv = kv[0].write().unwrap_or_else(PoisonError::into_inner);
        // Every rank would refuse a bad batch the same way; refusing it here,
        // before anyone starts, keeps the group whole.
        self.leader.check(batch, &leader_kv)?;
        let shared = Arc::new(batch.clone());
        let mut sent = 0;
        for (follower, kv) in self.followers.iter().zip(&kv[1..]) {
            if follower.orders.send(Order::Step { batch: shared.clone(), kv: kv.clone() }).is_err() {
                self.comm.abort(&format!("rank {} is gone", follower.rank));
                break;
            }
            sent += 1;
        }
        let leader =
            catch_unwind(AssertUnwindSafe(|| self.leader.forward_rank(batch, &mut leader_kv, self.comm.as_ref())));
        let leader = leader.unwrap_or_else(|_| Err(ForwardError::Comm(CommError::Broken("rank 0 panicked".into()))));
        if let Err(e) = &leader {
            self.comm.abort(&e.to_string());
        }
        // Hear from every rank that got the step, failed or not: none may
        // still touch its cache once the step returns. Rank 0's own error
        // says most; a follower's failure broke the group either way.
        let mut result = leader;
        for follower in &self.followers[..sent] {
            let done = follower.done.lock().unwrap_or_else(PoisonError::into_inner).recv();
            match done.unwrap_or_else(|_| Err(Self::broken(follower.rank))) {
                Err(e) if result.is_ok() => {
                    let reason = format!("rank {}: {e}", follower.rank);
                    result = Err(ForwardError::Comm(CommError::Broken(reason)));
                }
                _ => {}
            }
        }
        match self.followers.get(sent) {
            Some(gone) => Err(Self::broken(gone.rank)),
            None => result,
        }
    }
}

impl Drop for TensorParallel {
    fn drop(&mut self) {
        for follower in &mut self.followers {
            let _ = follower.orders.send(Order::Leave);
            if let Some(thread) = follower.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// NCCL communicators over GPUs `0..world_size`.
#[cfg(feature = "cuda")]
fn gpu_comms(world_size: usize) -> Result<Vec<Box<dyn Communicator>>, ModelError> {
    let comms =
        crate::comm::nccl::NcclGroup::ranks(world_size).map_err(|e| ModelError::TensorParallel(e.to_string()))?;
    Ok(comms.into_iter().map(|c| Box::new(c) as Box<dyn Communicator>).collect())
}

/// Without the `cuda` feature there are no GPUs to run ranks on.
#[cfg(not(feature = "cuda"))]
fn gpu_comms(_world_size: usize) -> Result<Vec<Box<dyn Communicator>>, ModelError> {
    Err(crate::model::no_cuda(ComputeDevice::Cuda(0)))
}

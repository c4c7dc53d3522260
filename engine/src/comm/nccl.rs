//! NCCL ranks (the `cuda` feature): one GPU per rank, the ranks threads of
//! one worker process as with [`super::cpu::CpuGroup`], communicating
//! through NCCL over NVLink or PCIe.
//!
//! A model on the GPUs ([`crate::model::DeviceLlama`]) all-reduces its
//! tensors where they are ([`Communicator::all_reduce_sum_tensor`]); the
//! host-buffer collectives (the step plan's broadcast, the CPU kernels'
//! shards) are staged through the rank's GPU: copy in, NCCL on the rank's
//! stream, copy out. NCCL runs on a stream of its own: it waits for
//! candle's stream before it reads a tensor, and cudarc's event tracking
//! makes candle wait for the sum before it reads it.
//!
//! A rank waits for its NCCL kernel by polling an event rather than blocking
//! in the driver, which is what keeps a broken group from hanging: NCCL
//! itself waits forever for a peer that never arrives. While it polls,
//! a rank sees the group broken by another (its thread died, or
//! [`Communicator::abort`]) or its own timeout, aborts its communicator
//! (`ncclCommAbort`, which ends its kernels) and fails.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use candle_core::{CudaStorage, CustomOp1, Layout, Shape, Tensor};
use cudarc::driver::{CudaContext, CudaStream, DriverError};
use cudarc::nccl::{Comm, ReduceOp};

use super::{all_reduce_through_host, CommError, Communicator, DEFAULT_TIMEOUT};
use crate::forward::ForwardError;

/// Creates the ranks of one group over this machine's GPUs.
pub struct NcclGroup;

impl NcclGroup {
    /// `world_size` communicators over GPUs `0..world_size`, rank `i` on GPU
    /// `i` at index `i`, each to be moved to its own thread.
    pub fn ranks(world_size: usize) -> Result<Vec<NcclComm>, CommError> {
        Self::ranks_with_timeout(world_size, DEFAULT_TIMEOUT)
    }

    /// Like [`NcclGroup::ranks`], with the time a rank waits for its peers.
    pub fn ranks_with_timeout(world_size: usize, timeout: Duration) -> Result<Vec<NcclComm>, CommError> {
        if world_size == 0 {
            return Err(CommError::Broken("a group needs at least one rank".into()));
        }
        let streams = (0..world_size)
            .map(|ordinal| CudaContext::new(ordinal)?.new_stream())
            .collect::<Result<Vec<Arc<CudaStream>>, DriverError>>()
            .map_err(|e| CommError::Broken(format!("CUDA device for a rank: {e:?}")))?;
        let comms = Comm::from_devices(streams).map_err(|e| CommError::Broken(format!("ncclCommInitAll: {e:?}")))?;
        let shared = Arc::new(Shared { broken: Mutex::new(None), timeout });
        Ok(comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| NcclComm {
                rank,
                world_size,
                comm: Mutex::new(Some(RankComm(comm))),
                shared: shared.clone(),
            })
            .collect())
    }
}

/// One rank's end of an [`NcclGroup`].
pub struct NcclComm {
    rank: usize,
    world_size: usize,
    /// `None` once aborted.
    comm: Mutex<Option<RankComm>>,
    shared: Arc<Shared>,
}

/// An NCCL communicator that may move between threads.
struct RankComm(Comm);

// SAFETY: NCCL allows a communicator to be used from any thread as long as
// calls on it do not overlap; it is only reached through `NcclComm::comm`'s
// mutex, so they never do.
unsafe impl Send for RankComm {}

struct Shared {
    /// Why the group broke, once it has.
    broken: Mutex<Option<String>>,
    timeout: Duration,
}

impl Shared {
    fn broken(&self) -> Option<String> {
        self.broken.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn break_with(&self, why: String) {
        self.broken.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(why);
    }
}

fn driver(e: DriverError) -> CommError {
    CommError::Broken(format!("CUDA: {e:?}"))
}

fn nccl(e: cudarc::nccl::result::NcclError) -> CommError {
    CommError::Broken(format!("NCCL: {e:?}"))
}

impl NcclComm {
    /// Runs one collective: `enqueue` puts its copies and NCCL call on the
    /// rank's stream; then waits for them without blocking in the driver.
    fn collective<T>(
        &self,
        enqueue: impl FnOnce(&Comm, &Arc<CudaStream>) -> Result<T, CommError>,
    ) -> Result<T, CommError> {
        let mut guard = self.comm.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(why) = self.shared.broken() {
            guard.take();
            return Err(CommError::Broken(why));
        }
        let Some(RankComm(comm)) = guard.as_ref() else {
            return Err(CommError::Broken("this rank's communicator was aborted".into()));
        };
        let stream = comm.stream();
        let staged = enqueue(comm, &stream);
        let done = staged.and_then(|t| Ok((t, stream.record_event(None).map_err(driver)?)));
        let (out, done) = match done {
            Ok(both) => both,
            Err(e) => return Err(self.fail(&mut guard, e)),
        };
        let deadline = Instant::now() + self.shared.timeout;
        let mut spins = 0u32;
        while !done.is_complete() {
            if let Some(why) = self.shared.broken() {
                return Err(self.fail(&mut guard, CommError::Broken(why)));
            }
            if Instant::now() > deadline {
                let timeout = CommError::Timeout { rank: self.rank, secs: self.shared.timeout.as_secs_f64() };
                return Err(self.fail(&mut guard, timeout));
            }
            // A step's collectives take microseconds: spin briefly, then sleep.
            spins += 1;
            if spins < 1_000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        Ok(out)
    }

    /// Breaks the group with `error` and aborts this rank's communicator.
    fn fail(&self, guard: &mut MutexGuard<'_, Option<RankComm>>, error: CommError) -> CommError {
        self.shared.break_with(error.to_string());
        // Dropping a cudarc `Comm` is `ncclCommAbort`: its kernels end.
        guard.take();
        error
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // A rank whose thread ended or panicked: the others must not wait for it.
        self.shared.break_with(format!("rank {} left the group", self.rank));
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError> {
        if data.is_empty() {
            return Ok(());
        }
        let device = self.collective(|comm, stream| {
            let mut device = stream.clone_htod(data).map_err(driver)?;
            comm.all_reduce_in_place(&mut device, &ReduceOp::Sum).map_err(nccl)?;
            Ok(device)
        })?;
        let stream = device.stream().clone();
        stream.memcpy_dtoh(&device, data).map_err(driver)?;
        stream.synchronize().map_err(driver)
    }

    fn all_reduce_sum_tensor(&self, y: &Tensor) -> Result<Tensor, ForwardError> {
        if !y.device().is_cuda() {
            return all_reduce_through_host(self, y);
        }
        let op = DeviceAllReduce { comm: self, failed: Mutex::new(None) };
        let sum = y.contiguous()?.apply_op1_no_bwd(&op);
        // A broken group is a CommError for the engine, not a tensor error.
        match (sum, op.failed.into_inner().unwrap_or_else(PoisonError::into_inner)) {
            (Ok(sum), _) => Ok(sum),
            (Err(_), Some(comm)) => Err(comm.into()),
            (Err(e), None) => Err(e.into()),
        }
    }

    fn all_gather(&self, local: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        if out.len() != local.len() * self.world_size {
            return Err(CommError::SizeMismatch {
                rank: self.rank,
                expected: local.len() * self.world_size,
                got: out.len(),
            });
        }
        if local.is_empty() {
            return Ok(());
        }
        let gathered = self.collective(|comm, stream| {
            let send = stream.clone_htod(local).map_err(driver)?;
            let mut gathered = stream.alloc_zeros::<f32>(out.len()).map_err(driver)?;
            comm.all_gather(&send, &mut gathered).map_err(nccl)?;
            Ok(gathered)
        })?;
        let stream = gathered.stream().clone();
        stream.memcpy_dtoh(&gathered, out).map_err(driver)?;
        stream.synchronize().map_err(driver)
    }

    fn broadcast(&self, data: &mut Vec<u8>, root: usize) -> Result<(), CommError> {
        // Only the root knows the length: send it first.
        let mut len = [data.len() as u64];
        let device = self.collective(|comm, stream| {
            let mut device = stream.clone_htod(&len[..]).map_err(driver)?;
            comm.broadcast_in_place(&mut device, root as i32).map_err(nccl)?;
            Ok(device)
        })?;
        let stream = device.stream().clone();
        stream.memcpy_dtoh(&device, &mut len[..]).map_err(driver)?;
        stream.synchronize().map_err(driver)?;
        data.resize(len[0] as usize, 0);
        if data.is_empty() {
            return Ok(());
        }
        let device = self.collective(|comm, stream| {
            let mut device = stream.clone_htod(data.as_slice()).map_err(driver)?;
            comm.broadcast_in_place(&mut device, root as i32).map_err(nccl)?;
            Ok(device)
        })?;
        stream.memcpy_dtoh(&device, data.as_mut_slice()).map_err(driver)?;
        stream.synchronize().map_err(driver)
    }

    fn abort(&self, reason: &str) {
        self.shared.break_with(format!("rank {} aborted: {reason}", self.rank));
    }
}

/// An all-reduce of a tensor in GPU memory, as a candle op: its output is a
/// new buffer holding the sum.
struct DeviceAllReduce<'a> {
    comm: &'a NcclComm,
    /// Why the collective failed, to hand back as a [`CommError`].
    failed: Mutex<Option<CommError>>,
}

impl CustomOp1 for DeviceAllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce takes GPU tensors")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce takes a contiguous tensor")
        };
        let src = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let summed = self.comm.collective(|comm, stream| {
            // candle hands its kernels' outputs to them as shared references,
            // so cudarc records no write event on `src` to order NCCL after
            // them: wait for everything queued on candle's stream instead.
            stream.join(&storage.device.cuda_stream()).map_err(driver)?;
            let mut sum = stream.alloc_zeros::<f32>(end - start).map_err(driver)?;
            comm.all_reduce(&src, &mut sum, &ReduceOp::Sum).map_err(nccl)?;
            Ok(sum)
        });
        match summed {
            Ok(sum) => Ok((CudaStorage::wrap_cuda_slice(sum, storage.device.clone()), layout.shape().clone())),
            Err(e) => {
                let msg = e.to_string();
                *self.failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
                Err(candle_core::Error::Msg(msg))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! These need CUDA GPUs: run them on a GPU machine with
    //! `cargo test -p engine --features cuda -- --ignored nccl`.
    use super::*;

    fn gpus() -> usize {
        CudaContext::device_count().map_or(0, |n| n as usize)
    }

    fn on_every_rank<T: Send>(ranks: Vec<NcclComm>, f: impl Fn(&NcclComm) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let handles: Vec<_> = ranks.iter().map(|rank| s.spawn(|| f(rank))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    #[ignore = "needs CUDA GPUs"]
    fn nccl_collectives_match_their_definitions() {
        let n = gpus();
        assert!(n > 0, "no CUDA device");
        let results = on_every_rank(NcclGroup::ranks(n).unwrap(), |comm| {
            let r = comm.rank() as f32;
            let mut sum = vec![r + 1.0; 1 << 12];
            comm.all_reduce_sum(&mut sum).unwrap();
            let mut gathered = vec![0.0; 3 * n];
            comm.all_gather(&[r, r, r], &mut gathered).unwrap();
            let mut plan = if comm.rank() == 0 { b"step plan".to_vec() } else { Vec::new() };
            comm.broadcast(&mut plan, 0).unwrap();
            (sum, gathered, plan)
        });
        let total = (n * (n + 1) / 2) as f32;
        for (sum, gathered, plan) in results {
            assert!(sum.iter().all(|&v| v == total));
            let want: Vec<f32> = (0..n).flat_map(|r| [r as f32; 3]).collect();
            assert_eq!(gathered, want);
            assert_eq!(plan, b"step plan");
        }
    }

    #[test]
    #[ignore = "needs CUDA GPUs"]
    fn nccl_all_reduces_tensors_in_gpu_memory() {
        let n = gpus();
        assert!(n > 0, "no CUDA device");
        let sums = on_every_rank(NcclGroup::ranks(n).unwrap(), |comm| {
            let device = crate::model::ComputeDevice::Cuda(comm.rank()).candle().unwrap();
            let r = comm.rank() as f32;
            let y = Tensor::arange(0f32, 6.0, &device).unwrap().reshape((2, 3)).unwrap();
            // A strided view: the op makes it contiguous first.
            let y = (y + f64::from(r)).unwrap().t().unwrap();
            let sum = comm.all_reduce_sum_tensor(&y).unwrap();
            assert!(sum.device().is_cuda());
            sum.to_vec2::<f32>().unwrap()
        });
        let shift = (n * (n - 1) / 2) as f32;
        let want: Vec<Vec<f32>> =
            (0..3).map(|c| (0..2).map(|r| n as f32 * (r * 3 + c) as f32 + shift).collect()).collect();
        for sum in sums {
            assert_eq!(sum, want);
        }
    }

    #[test]
    #[ignore = "needs CUDA GPUs"]
    fn a_rank_that_leaves_breaks_the_group_without_a_hang() {
        let n = gpus();
        assert!(n > 0, "no CUDA device");
        // An aborted group fails every rank's next collective.
        let ranks = NcclGroup::ranks_with_timeout(n, Duration::from_secs(5)).unwrap();
        ranks[0].abort("test");
        let results = on_every_rank(ranks, |comm| comm.all_reduce_sum(&mut [1.0; 16]));
        assert!(
            results.iter().all(|r| matches!(r, Err(CommError::Broken(why)) if why.contains("test"))),
            "{results:?}"
        );
        if n == 1 {
            return;
        }
        // A rank that is gone: the others fail instead of waiting for it.
        let mut ranks = NcclGroup::ranks_with_timeout(n, Duration::from_secs(5)).unwrap();
        drop(ranks.pop());
        let started = Instant::now();
        let results = on_every_rank(ranks, |comm| comm.all_reduce_sum(&mut [1.0; 16]));
        assert!(results.iter().all(Result::is_err), "{results:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    }
}

//! CPU ranks: threads of one process that exchange through each other's
//! buffers. Each collective publishes the address of the caller's buffer,
//! meets the others at a barrier, and then reads (and, for the all-reduce,
//! writes) only the parts of the peers' buffers no other rank touches in
//! that phase, so no data is copied through an intermediate buffer.
//!
//! All-reduce is a reduce-scatter then an all-gather, in place:
//!
//! ```text
//! barrier ─► rank r sums chunk r of every buffer into chunk r of its own
//!   ─► barrier ─► rank r copies chunk j of buffer j into its own, j ≠ r
//!   ─► barrier (nobody returns, and reuses its buffer, while read)
//! ```
//!
//! A rank whose [`CpuComm`] is dropped (its thread ended or panicked)
//! breaks the group: every waiting and later collective fails at once, so a
//! dead rank never hangs the others.

use super::{CommError, Communicator, DEFAULT_TIMEOUT};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Creates the ranks of one group.
pub struct CpuGroup;

impl CpuGroup {
    /// `world_size` communicators, rank `i` at index `i`, each to be moved
    /// to its own thread.
    ///
    /// # Panics
    /// If `world_size` is 0.
    pub fn ranks(world_size: usize) -> Vec<CpuComm> {
        Self::ranks_with_timeout(world_size, DEFAULT_TIMEOUT)
    }

    /// Like [`CpuGroup::ranks`], with the time a rank waits for its peers.
    pub fn ranks_with_timeout(world_size: usize, timeout: Duration) -> Vec<CpuComm> {
        assert!(world_size > 0, "a group needs at least one rank");
        let shared = Arc::new(Shared {
            world_size,
            timeout,
            slots: (0..world_size).map(|_| Slot::default()).collect(),
            barrier: Mutex::new(BarrierState::default()),
            arrived: Condvar::new(),
        });
        (0..world_size).map(|rank| CpuComm { rank, shared: shared.clone() }).collect()
    }
}

/// One rank's end of a [`CpuGroup`].
pub struct CpuComm {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    world_size: usize,
    timeout: Duration,
    /// Each rank's published buffer for the collective under way.
    slots: Vec<Slot>,
    barrier: Mutex<BarrierState>,
    arrived: Condvar,
}

/// A buffer's address and length in elements, published before a barrier
/// and read after it (the barrier's lock orders the two).
#[derive(Default)]
struct Slot {
    addr: AtomicUsize,
    len: AtomicUsize,
}

#[derive(Default)]
struct BarrierState {
    arrived: usize,
    generation: u64,
    broken: Option<String>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, BarrierState> {
        // Every critical section leaves the state consistent.
        self.barrier.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until every rank has arrived, the group breaks, or the timeout.
    fn wait(&self, rank: usize) -> Result<(), CommError> {
        let mut state = self.state();
        if let Some(reason) = &state.broken {
            return Err(CommError::Broken(reason.clone()));
        }
        let generation = state.generation;
        state.arrived += 1;
        if state.arrived == self.world_size {
            state.arrived = 0;
            state.generation += 1;
            self.arrived.notify_all();
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (next, _) = self.arrived.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner);
            state = next;
            if state.generation != generation {
                return Ok(());
            }
            if let Some(reason) = &state.broken {
                return Err(CommError::Broken(reason.clone()));
            }
            if Instant::now() >= deadline {
                let secs = self.timeout.as_secs_f64();
                state.broken = Some(format!("rank {rank} waited {secs} s for its peers"));
                self.arrived.notify_all();
                return Err(CommError::Timeout { rank, secs });
            }
        }
    }

    fn break_group(&self, reason: String) {
        let mut state = self.state();
        if state.broken.is_none() {
            state.broken = Some(reason);
        }
        self.arrived.notify_all();
    }

    fn publish<T>(&self, rank: usize, data: *const T, len: usize) {
        self.slots[rank].addr.store(data as usize, Ordering::Relaxed);
        self.slots[rank].len.store(len, Ordering::Relaxed);
    }

    /// Rank `peer`'s published buffer.
    fn peer<T>(&self, peer: usize) -> (*mut T, usize) {
        let slot = &self.slots[peer];
        (slot.addr.load(Ordering::Relaxed) as *mut T, slot.len.load(Ordering::Relaxed))
    }

    /// Checks that every rank published `len` elements.
    fn check_lengths(&self, len: usize) -> Result<(), CommError> {
        for peer in 0..self.world_size {
            let (_, got) = self.peer::<u8>(peer);
            if got != len {
                let error = CommError::SizeMismatch { rank: peer, expected: len, got };
                self.break_group(error.to_string());
                return Err(error);
            }
        }
        Ok(())
    }
}

/// Rank `r`'s chunk of `len` elements split over `world` ranks.
fn chunk(len: usize, world: usize, r: usize) -> Range<usize> {
    let (base, extra) = (len / world, len % world);
    let start = r * base + r.min(extra);
    start..start + base + usize::from(r < extra)
}

impl Communicator for CpuComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError> {
        let (s, rank, world) = (&*self.shared, self.rank, self.shared.world_size);
        if world == 1 {
            return Ok(());
        }
        s.publish(rank, data.as_mut_ptr(), data.len());
        s.wait(rank)?;
        s.check_lengths(data.len())?;
        let mine = chunk(data.len(), world, rank);
        // Reduce-scatter: chunk `rank` of every buffer is read by this rank
        // alone, and written (in this rank's buffer) by it alone. Every value
        // is summed in rank order, whichever rank owns its chunk: the chunks
        // move with the step's size, and a sum whose order moved with them
        // would make a token's result depend on the other rows of its step.
        let own: Vec<f32> = data[mine.clone()].to_vec();
        for peer in 0..world {
            let theirs = if peer == rank {
                own.as_slice()
            } else {
                let (addr, _) = s.peer::<f32>(peer);
                // SAFETY: the peer's buffer is `data.len()` long (checked) and
                // alive until the last barrier; nobody writes its chunk `rank`.
                unsafe { std::slice::from_raw_parts(addr.add(mine.start), mine.len()) }
            };
            if peer == 0 {
                data[mine.clone()].copy_from_slice(theirs);
            } else {
                data[mine.clone()].iter_mut().zip(theirs).for_each(|(x, y)| *x += y);
            }
        }
        s.wait(rank)?;
        // All-gather: chunk `peer` of the peer's buffer is final and only read.
        for peer in (0..world).filter(|&p| p != rank) {
            let (addr, _) = s.peer::<f32>(peer);
            let theirs = chunk(data.len(), world, peer);
            // SAFETY: as above; the peer wrote this chunk before the barrier.
            let src = unsafe { std::slice::from_raw_parts(addr.add(theirs.start), theirs.len()) };
            data[theirs].copy_from_slice(src);
        }
        s.wait(rank)
    }

    fn all_gather(&self, local: &[f32], out: &mut [f32]) -> Result<(), CommError> {
        let (s, rank, world) = (&*self.shared, self.rank, self.shared.world_size);
        if out.len() != world * local.len() {
            return Err(CommError::SizeMismatch { rank, expected: world * local.len(), got: out.len() });
        }
        s.publish(rank, local.as_ptr(), local.len());
        s.wait(rank)?;
        s.check_lengths(local.len())?;
        for (peer, dst) in out.chunks_exact_mut(local.len().max(1)).enumerate().take(world) {
            let (addr, len) = s.peer::<f32>(peer);
            // SAFETY: each rank's `local` is only read, alive until the barrier.
            dst.copy_from_slice(unsafe { std::slice::from_raw_parts(addr, len) });
        }
        s.wait(rank)
    }

    fn broadcast(&self, data: &mut Vec<u8>, root: usize) -> Result<(), CommError> {
        let (s, rank, world) = (&*self.shared, self.rank, self.shared.world_size);
        if world == 1 {
            return Ok(());
        }
        if rank == root {
            s.publish(rank, data.as_ptr(), data.len());
        }
        s.wait(rank)?;
        if rank != root {
            let (addr, len) = s.peer::<u8>(root);
            data.clear();
            // SAFETY: the root's buffer is only read, alive until the barrier.
            data.extend_from_slice(unsafe { std::slice::from_raw_parts(addr, len) });
        }
        s.wait(rank)
    }

    fn abort(&self, reason: &str) {
        self.shared.break_group(format!("rank {}: {reason}", self.rank));
    }
}

impl Drop for CpuComm {
    fn drop(&mut self) {
        let why = if std::thread::panicking() { "panicked" } else { "left" };
        self.shared.break_group(format!("rank {} {why}", self.rank));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on every rank of a group of `world`, each on its own thread.
    fn on_ranks<T: Send + 'static>(world: usize, f: impl Fn(CpuComm) -> T + Send + Sync + Clone + 'static) -> Vec<T> {
        let handles: Vec<_> = CpuGroup::ranks(world)
            .into_iter()
            .map(|comm| {
                let f = f.clone();
                std::thread::spawn(move || f(comm))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sums_every_rank_including_uneven_chunks() {
        for world in [1, 2, 3, 4] {
            for len in [0, 1, 5, 1000] {
                let results = on_ranks(world, move |comm| {
                    let r = comm.rank() as f32;
                    let mut data: Vec<f32> = (0..len).map(|i| i as f32 * (r + 1.0)).collect();
                    for _ in 0..3 {
                        comm.all_reduce_sum(&mut data).unwrap();
                    }
                    data
                });
                // Round one sums (r + 1) over ranks; then every rank holds the
                // same values, so each further round multiplies by `world`.
                let factor = ((1..=world).sum::<usize>() * world * world) as f32;
                let want: Vec<f32> = (0..len).map(|i| i as f32 * factor).collect();
                assert!(results.iter().all(|d| *d == want), "world {world}, len {len}");
            }
        }
    }

    #[test]
    fn all_gather_and_broadcast_deliver_every_rank_the_same() {
        let results = on_ranks(3, |comm| {
            let local = vec![comm.rank() as f32; 2];
            let mut out = vec![0.0; 6];
            comm.all_gather(&local, &mut out).unwrap();
            let mut plan = if comm.rank() == 0 { b"step 7".to_vec() } else { b"stale".to_vec() };
            comm.broadcast(&mut plan, 0).unwrap();
            (out, plan)
        });
        for (out, plan) in results {
            assert_eq!(out, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
            assert_eq!(plan, b"step 7");
        }
    }

    #[test]
    fn a_rank_that_dies_breaks_the_group_instead_of_hanging_it() {
        let mut comms = CpuGroup::ranks(3);
        let dead = comms.pop().unwrap();
        let waiting: Vec<_> =
            comms.into_iter().map(|comm| std::thread::spawn(move || comm.all_reduce_sum(&mut [1.0; 4]))).collect();
        std::thread::sleep(Duration::from_millis(20));
        // The third rank's thread ends (or panics) without joining in.
        std::thread::spawn(move || {
            let _comm = dead;
            panic!("rank 2 fails");
        })
        .join()
        .unwrap_err();
        for w in waiting {
            assert_eq!(w.join().unwrap(), Err(CommError::Broken("rank 2 panicked".into())));
        }
    }

    #[test]
    fn a_silent_rank_times_out_and_mismatched_sizes_are_refused() {
        let mut comms = CpuGroup::ranks_with_timeout(2, Duration::from_millis(50));
        let silent = comms.pop().unwrap();
        let err = comms[0].all_reduce_sum(&mut [1.0]).unwrap_err();
        assert!(matches!(err, CommError::Timeout { rank: 0, .. }), "{err}");
        drop(silent);

        let results = on_ranks(2, |comm| {
            let mut data = vec![1.0; 3 + comm.rank()];
            comm.all_reduce_sum(&mut data)
        });
        assert!(results.iter().all(|r| matches!(r, Err(CommError::SizeMismatch { .. }))), "{results:?}");
    }
}

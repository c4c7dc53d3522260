//! Which worker of a pool serves a request. Only round-robin for now; the
//! cache-aware policy of ARCHITECTURE.md will be another implementation of
//! [`Placement`].

use std::sync::atomic::{AtomicUsize, Ordering};

/// The leg of a request a worker is picked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// The prefill pool.
    Prefill,
    /// The decode pool.
    Decode,
}

/// Picks a worker index in `0..num_workers` (callers pass `num_workers > 0`).
pub trait Placement: Send + Sync + 'static {
    /// The index of the worker that serves this leg.
    fn pick(&self, leg: Leg, num_workers: usize) -> usize;
}

/// Cycles through each pool independently. Lock-free: one atomic per pool.
#[derive(Debug, Default)]
pub struct RoundRobin {
    prefill: AtomicUsize,
    decode: AtomicUsize,
}

impl Placement for RoundRobin {
    fn pick(&self, leg: Leg, num_workers: usize) -> usize {
        let counter = match leg {
            Leg::Prefill => &self.prefill,
            Leg::Decode => &self.decode,
        };
        counter.fetch_add(1, Ordering::Relaxed) % num_workers.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_cycles_each_pool_on_its_own() {
        let rr = RoundRobin::default();
        let prefill: Vec<_> = (0..4).map(|_| rr.pick(Leg::Prefill, 3)).collect();
        assert_eq!(prefill, [0, 1, 2, 0]);
        assert_eq!(rr.pick(Leg::Decode, 2), 0);
        assert_eq!(rr.pick(Leg::Decode, 2), 1);
    }
}

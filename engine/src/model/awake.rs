//! Keeps the thread pool's workers awake for the length of a forward step.
//!
//! A step forks the pool for each of its products (five a layer) and runs short serial parts
//! between them (norms, RoPE, the activation) on one thread. rayon lets a worker that finds
//! nothing to do fall asleep within microseconds, and on a VM waking it again costs about as
//! long: measured in the pool on a 2-core VM, products of SmolLM2's shapes with a 10-30 µs
//! serial gap before each took 10-20 µs longer apiece, and in the engine the down projection of
//! a six-row step took 1.7 ms over 30 layers against 1.05 ms with the workers kept awake.
//! Here every other worker runs a job that polls the pool for work until the step ends, as
//! llama.cpp's threads poll between the operations of a graph.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a waiting worker polls without finding work before it leaves the rest of the step
/// to rayon's own sleeping: a step that waits on something else (a hand-off's KV landing)
/// does not keep a core spinning.
const MAX_IDLE: Duration = Duration::from_micros(500);

/// Idle polls between two reads of the clock.
const POLLS_PER_CLOCK_READ: u32 = 16;

/// Runs `step` on a worker of the current rayon pool while the pool's other workers poll it
/// for work, and returns its result.
pub(crate) fn with_workers_awake<R: Send>(step: impl FnOnce() -> R + Send) -> R {
    let done = &AtomicBool::new(false);
    rayon::scope(|s| {
        let owner = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            s.spawn(move |_| poll_until(done, owner));
        }
        let _done = SetOnDrop(done);
        step()
    })
}

/// Sets its flag when dropped, so the pollers stop even if the step unwinds.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Executes the pool's pending jobs until `done`, or until none came for [`MAX_IDLE`].
fn poll_until(done: &AtomicBool, owner: Option<usize>) {
    // The step's own thread may pick this job up while it waits on a product: it must not
    // spin there, waiting for itself.
    if rayon::current_thread_index() == owner {
        return;
    }
    let (mut idle_since, mut polls) = (None::<Instant>, 0u32);
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_since = None;
            continue;
        }
        // As rayon's own idle rounds: other threads of the process (the server's I/O) get the
        // core at once if they need it, and the worker stays off the futex.
        std::thread::yield_now();
        polls += 1;
        if polls.is_multiple_of(POLLS_PER_CLOCK_READ) {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() > MAX_IDLE {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::*;

    #[test]
    fn returns_the_steps_result_with_its_products_done() {
        let sums = with_workers_awake(|| {
            (0..64).map(|i| (0..1000u64).into_par_iter().map(|x| x * i).sum::<u64>()).sum::<u64>()
        });
        assert_eq!(sums, (0..64).map(|i| 499_500 * i).sum::<u64>());
    }

    #[test]
    fn concurrent_steps_from_outside_the_pool_all_finish() {
        // Each step's pollers may run on the thread of another step, or be picked up by their
        // own step's thread while it waits on a product.
        let results: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4u64)
                .map(|t| {
                    s.spawn(move || {
                        (0..50u64)
                            .map(|r| {
                                with_workers_awake(|| (0..2000u64).into_par_iter().map(|x| x ^ (t + r)).sum::<u64>())
                            })
                            .sum()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (t, got) in results.into_iter().enumerate() {
            let want: u64 = (0..50u64).map(|r| (0..2000u64).map(|x| x ^ (t as u64 + r)).sum::<u64>()).sum();
            assert_eq!(got, want, "thread {t}");
        }
    }

    #[test]
    fn a_panicking_step_stops_its_pollers_and_unwinds() {
        let caught = std::panic::catch_unwind(|| {
            with_workers_awake(|| {
                let _: u64 = (0..1000u64).into_par_iter().sum();
                panic!("step failed");
            })
        });
        assert!(caught.is_err());
        // The pool is free again: a later step runs.
        assert_eq!(with_workers_awake(|| (0..10u64).into_par_iter().sum::<u64>()), 45);
    }
}

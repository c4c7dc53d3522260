//! The admission queue: at most `max_inflight_per_worker` requests run on
//! each worker of a request's first leg (the prefill pool, or the decode pool
//! when serving colocated); the others wait, best `priority` (lowest) first,
//! then in arrival order, and past `max_queued` waiters a request is refused.
//!
//! A request holds a [`Permit`] for its worker while its token stream lives;
//! dropping the permit (stream over, client gone, error) frees the slot and
//! hands it to the best waiter at once. A waiter whose request was dropped
//! while queued is skipped when its turn comes, so it never takes a slot.
//!
//! Workers come and go ([`Admission::set_active`]): only workers in the pool
//! get slots. With none in it a request is refused at once, and the waiters
//! are refused when the last one leaves, so nothing waits for a pool that
//! may never come back.
//!
//! Each served model has its own [`Admission`] (`crate::fleet::served`): one
//! model's backlog never holds up another's requests.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::oneshot;

/// Default of `--max-inflight-per-worker`.
pub const DEFAULT_MAX_INFLIGHT_PER_WORKER: usize = 64;
/// Default of `--max-queued-requests`.
pub const DEFAULT_MAX_QUEUED_REQUESTS: usize = 1024;
/// What a refused client is told to wait before retrying (`Retry-After`).
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The admission limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Requests running at once on one worker of the first leg (at least 1).
    pub max_inflight_per_worker: usize,
    /// Requests waiting for a slot; one more is refused.
    pub max_queued: usize,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self { max_inflight_per_worker: DEFAULT_MAX_INFLIGHT_PER_WORKER, max_queued: DEFAULT_MAX_QUEUED_REQUESTS }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    /// The first leg's pool has no worker (503).
    #[error("no worker is available in the pool that serves this request")]
    NoWorker,
    /// The queue is full (429 with `Retry-After`).
    #[error("the server is overloaded: {queued} requests are already waiting; retry after {}s", retry_after.as_secs())]
    QueueFull {
        /// Waiters at the time of refusal.
        queued: usize,
        /// How long the client should wait.
        retry_after: Duration,
    },
}

/// A snapshot of the queue, for metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Requests waiting (not counting ones whose client left).
    pub queued: usize,
    /// Running requests per worker slot of the first leg.
    pub in_flight: Vec<usize>,
    /// Whether each slot holds a worker now.
    pub active: Vec<bool>,
}

/// The queue of one model over the workers of its first leg. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Admission {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: AdmissionConfig,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    in_flight: Vec<usize>,
    /// Whether each worker is in the pool: only those get slots.
    active: Vec<bool>,
    waiters: BinaryHeap<Waiter>,
    /// Arrival counter: equal priorities are served in this order.
    next_seq: u64,
}

/// Picks the worker of a waiter whose turn came, from each worker's in-flight
/// count and the cap: called once, under the queue's lock, while at least one
/// worker is below the cap. A full worker returned is replaced by the least
/// busy free one.
pub type Chooser = Box<dyn FnOnce(&[usize], usize) -> usize + Send>;

/// A queued request. The heap is a max-heap, so the key is reversed: the
/// lowest (priority, arrival) is on top.
struct Waiter {
    key: Reverse<(i32, u64)>,
    tx: oneshot::Sender<Result<Permit, AdmissionError>>,
    /// `None`: the least busy worker.
    choose: Option<Chooser>,
}

impl std::fmt::Debug for Waiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiter").field("key", &self.key).finish_non_exhaustive()
    }
}

impl PartialEq for Waiter {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for Waiter {}

impl PartialOrd for Waiter {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Waiter {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}

impl Admission {
    /// A queue over `num_workers` workers, all in the pool (at least 1 is
    /// assumed).
    pub fn new(config: AdmissionConfig, num_workers: usize) -> Self {
        Self::with_slots(config, num_workers.max(1), true)
    }

    /// A queue over `slots` worker slots, empty until [`Admission::set_active`]
    /// fills them.
    pub fn empty(config: AdmissionConfig, slots: usize) -> Self {
        Self::with_slots(config, slots, false)
    }

    fn with_slots(config: AdmissionConfig, slots: usize, active: bool) -> Self {
        let config = AdmissionConfig { max_inflight_per_worker: config.max_inflight_per_worker.max(1), ..config };
        let state =
            State { in_flight: vec![0; slots], active: vec![active; slots], waiters: BinaryHeap::new(), next_seq: 0 };
        Self { shared: Arc::new(Shared { config, state: Mutex::new(state) }) }
    }

    /// Puts `worker` in the pool or takes it out. A worker that joins takes
    /// waiters at once; when the last one leaves, every waiter is refused
    /// with [`AdmissionError::NoWorker`]. Requests running on a worker that
    /// left keep their permits until they end.
    pub fn set_active(&self, worker: usize, active: bool) {
        let mut state = self.shared.lock();
        let Some(slot) = state.active.get_mut(worker) else {
            return;
        };
        *slot = active;
        if state.active.iter().any(|&a| a) {
            state.dispatch(&self.shared);
        } else {
            for waiter in std::mem::take(&mut state.waiters).into_vec() {
                let _ = waiter.tx.send(Err(AdmissionError::NoWorker));
            }
        }
    }

    /// The limits in force.
    pub fn config(&self) -> AdmissionConfig {
        self.shared.config
    }

    /// Waits for a slot, best priority first; refuses at once when the queue
    /// is full. Dropping the future leaves the queue without taking a slot.
    pub async fn admit(&self, priority: i32) -> Result<Permit, AdmissionError> {
        self.admit_with(priority, None).await
    }

    /// [`Admission::admit`], with `choose` picking the worker when the turn
    /// comes (placement runs then, on the load of that moment).
    pub async fn admit_with(&self, priority: i32, choose: Option<Chooser>) -> Result<Permit, AdmissionError> {
        let ticket = self.enqueue(priority, choose)?;
        // The sender lives in the heap until granted, refused or skipped, and
        // a skip only happens once this receiver is gone, so this cannot fail.
        ticket.await.expect("admission waiter dropped without an answer")
    }

    /// Queues a waiter and grants whatever slots are free.
    fn enqueue(
        &self,
        priority: i32,
        choose: Option<Chooser>,
    ) -> Result<oneshot::Receiver<Result<Permit, AdmissionError>>, AdmissionError> {
        let mut state = self.shared.lock();
        if !state.active.iter().any(|&a| a) {
            return Err(AdmissionError::NoWorker);
        }
        if state.free_worker(&self.shared.config).is_none() && state.waiters.len() >= self.shared.config.max_queued {
            // Waiters whose client left still sit in the heap: don't count them.
            state.waiters.retain(|w| !w.tx.is_closed());
            let queued = state.waiters.len();
            if queued >= self.shared.config.max_queued {
                return Err(AdmissionError::QueueFull { queued, retry_after: RETRY_AFTER });
            }
        }
        let (tx, rx) = oneshot::channel();
        let seq = state.next_seq;
        state.next_seq += 1;
        state.waiters.push(Waiter { key: Reverse((priority, seq)), tx, choose });
        state.dispatch(&self.shared);
        Ok(rx)
    }

    /// Queue depth and in-flight counts now.
    pub fn stats(&self) -> AdmissionStats {
        let state = self.shared.lock();
        AdmissionStats {
            queued: state.waiters.iter().filter(|w| !w.tx.is_closed()).count(),
            in_flight: state.in_flight.clone(),
            active: state.active.clone(),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (counters change under the lock only).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// The least busy worker in the pool with a free slot.
    fn free_worker(&self, config: &AdmissionConfig) -> Option<usize> {
        (0..self.in_flight.len())
            .filter(|&w| self.active[w] && self.in_flight[w] < config.max_inflight_per_worker)
            .min_by_key(|&w| self.in_flight[w])
    }

    /// Hands free slots to the best live waiters. Called with the lock held.
    fn dispatch(&mut self, shared: &Arc<Shared>) {
        while let Some(least_busy) = self.free_worker(&shared.config) {
            let Some(waiter) = self.waiters.pop() else {
                return;
            };
            if waiter.tx.is_closed() {
                continue; // The client left while queued: don't run placement for it.
            }
            let cap = shared.config.max_inflight_per_worker;
            let worker = match waiter.choose {
                Some(choose) => Some(choose(&self.in_flight, cap))
                    .filter(|&w| self.active.get(w) == Some(&true) && self.in_flight[w] < cap),
                None => None,
            }
            .unwrap_or(least_busy);
            self.in_flight[worker] += 1;
            let permit = Permit { shared: Some(shared.clone()), worker };
            if let Err(Ok(mut permit)) = waiter.tx.send(Ok(permit)) {
                // The client left while queued: take the slot back here, as
                // the permit's drop would lock the mutex we hold.
                permit.shared = None;
                self.in_flight[worker] -= 1;
            }
        }
    }
}

/// A slot on one worker, held while the request runs; dropping it frees the
/// slot for the next waiter.
#[derive(Debug)]
pub struct Permit {
    /// `None` once the slot was taken back by [`State::dispatch`].
    shared: Option<Arc<Shared>>,
    worker: usize,
}

impl Permit {
    /// The worker this slot is on (an index into the first leg's pool).
    pub fn worker(&self) -> usize {
        self.worker
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        let mut state = shared.lock();
        state.in_flight[self.worker] -= 1;
        state.dispatch(&shared);
    }
}

/// `items`, holding `guard` (a [`Permit`], or any slot freed on drop) until
/// the stream ends or is dropped.
pub fn hold<T: Send + 'static, G: Send + 'static>(items: BoxStream<'static, T>, guard: G) -> BoxStream<'static, T> {
    stream::unfold(Some((items, guard)), |held| async move {
        let (mut items, guard) = held?;
        // At the end the guard drops here, before the stream itself is dropped.
        let item = items.next().await?;
        Some((item, Some((items, guard))))
    })
    .boxed()
}

#[cfg(test)]
mod tests;

//! The router's exact view of each worker's prefix cache, rebuilt from the
//! workers' KV event streams (`Worker.SubscribeKvEvents`).
//!
//! Per worker it keeps the block hashes cached there (one `u64` per block,
//! nothing else), the stream's position (epoch, seq) and the load the last
//! batch carried. A snapshot replaces a worker's set; a delta must carry the
//! next seq of the same epoch, else the follower resubscribes for a fresh
//! snapshot. A worker whose stream is down counts as down: placement avoids
//! it, and the follower's retries are the probe that brings it back.
//!
//! Nothing is stored anywhere else, so a restarted router, or a second
//! replica, converges to the same view from the same streams.

use std::collections::HashSet;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use futures::StreamExt;
use prompt::block_hash::BlockHash;
use proto::worker::kv_event::Event;
use proto::worker::worker_client::WorkerClient;
use proto::worker::{KvEventBatch, SubscribeKvEventsRequest, WorkerLoad};
use tonic::transport::Channel;

/// Most hashes kept for one worker whatever it claims: bounds memory against
/// a worker that reports nonsense (no real worker has 16M blocks).
const MAX_BLOCKS_PER_WORKER: usize = 1 << 24;
/// How long the first batch of a subscription may take.
const FIRST_BATCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Heartbeats a stream may miss before it counts as dead.
const MISSED_HEARTBEATS: u32 = 4;
/// Retry delays of a follower whose worker is unreachable.
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Why a batch was not applied; the follower then resubscribes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// A delta arrived for a worker with no snapshot (first batch, or after
    /// the worker was marked down).
    #[error("delta before any snapshot")]
    NoSnapshot,
    /// The worker restarted: its new epoch needs a snapshot.
    #[error("epoch changed from {had} to {got} without a snapshot")]
    EpochChanged { had: u64, got: u64 },
    /// Events were lost between two batches.
    #[error("sequence gap: expected {expected}, got {got}")]
    Gap { expected: u64, got: u64 },
    /// The worker claims more cached blocks than it can hold.
    #[error("{blocks} cached blocks is more than the worker can hold ({limit})")]
    TooManyBlocks { blocks: usize, limit: usize },
}

/// What the index knows of one worker, for metrics, tests and debugging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSummary {
    /// A snapshot was applied and the stream has not failed since.
    pub up: bool,
    /// The worker process's epoch, 0 before the first snapshot.
    pub epoch: u64,
    /// The last applied batch.
    pub seq: u64,
    /// Block hashes cached there.
    pub cached_blocks: usize,
    /// KV blocks the worker holds for hand-offs, as it last reported.
    pub pinned_blocks: u32,
}

/// The prefix caches of one pool's workers, indexed by worker.
#[derive(Debug)]
pub struct PrefixIndex {
    workers: Vec<RwLock<View>>,
}

#[derive(Debug, Default)]
struct View {
    /// `(epoch, seq)` of the last applied batch; `None` while down.
    position: Option<(u64, u64)>,
    hashes: HashSet<u64>,
    load: WorkerLoad,
    block_size: u32,
}

impl PrefixIndex {
    /// An index of `num_workers` workers, all down until their first snapshot.
    pub fn new(num_workers: usize) -> Self {
        Self { workers: (0..num_workers).map(|_| RwLock::default()).collect() }
    }

    /// Workers in the pool.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    /// Whether the pool has no worker.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    fn read(&self, worker: usize) -> RwLockReadGuard<'_, View> {
        // A view is replaced or edited under the write lock only; a panic
        // mid-edit leaves at worst a stale set, which the next snapshot fixes.
        self.workers[worker].read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, worker: usize) -> RwLockWriteGuard<'_, View> {
        self.workers[worker].write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies one batch of `worker`'s stream. On error the view is left as
    /// it was and the caller must resubscribe.
    pub fn apply(&self, worker: usize, batch: &KvEventBatch) -> Result<(), ApplyError> {
        let mut view = self.write(worker);
        if batch.snapshot {
            let mut hashes = HashSet::with_capacity(batch.events.len());
            apply_events(&mut hashes, batch)?;
            check_size(hashes.len(), batch.load.as_ref())?;
            *view = View {
                position: Some((batch.epoch, batch.seq)),
                hashes,
                load: batch.load.unwrap_or_default(),
                block_size: batch.block_size,
            };
            return Ok(());
        }
        let Some((epoch, seq)) = view.position else {
            return Err(ApplyError::NoSnapshot);
        };
        if batch.epoch != epoch {
            return Err(ApplyError::EpochChanged { had: epoch, got: batch.epoch });
        }
        if batch.seq != seq + 1 {
            return Err(ApplyError::Gap { expected: seq + 1, got: batch.seq });
        }
        apply_events(&mut view.hashes, batch)?;
        if let Err(e) = check_size(view.hashes.len(), batch.load.as_ref()) {
            // The set is unreliable now: drop it until a snapshot.
            *view = View::default();
            return Err(e);
        }
        view.position = Some((epoch, batch.seq));
        if let Some(load) = batch.load {
            view.load = load;
        }
        if batch.block_size != 0 {
            view.block_size = batch.block_size;
        }
        Ok(())
    }

    /// Forgets `worker` until its next snapshot: its stream failed or a call
    /// to it found it unreachable.
    pub fn mark_down(&self, worker: usize) {
        if worker < self.workers.len() {
            *self.write(worker) = View::default();
        }
    }

    /// Whether `worker` has a live, snapshotted stream.
    pub fn is_up(&self, worker: usize) -> bool {
        self.read(worker).position.is_some()
    }

    /// How many leading blocks of a prompt (`hashes`, in order) `worker` has
    /// cached. Chained hashes name whole prefixes, so the count stops at the
    /// first block it lacks.
    pub fn cached_blocks(&self, worker: usize, hashes: &[BlockHash]) -> usize {
        let view = self.read(worker);
        hashes.iter().take_while(|h| view.hashes.contains(&h.0)).count()
    }

    /// The load `worker` reported last (zeros while down).
    pub fn load(&self, worker: usize) -> WorkerLoad {
        self.read(worker).load
    }

    /// The KV block size the pool's workers hash with, once any is up.
    pub fn block_size(&self) -> Option<u32> {
        (0..self.workers.len()).map(|w| self.read(w).block_size).find(|&b| b > 0)
    }

    /// What the index knows of each worker.
    pub fn summary(&self) -> Vec<WorkerSummary> {
        (0..self.workers.len())
            .map(|w| {
                let view = self.read(w);
                let (epoch, seq) = view.position.unwrap_or_default();
                WorkerSummary {
                    up: view.position.is_some(),
                    epoch,
                    seq,
                    cached_blocks: view.hashes.len(),
                    pinned_blocks: view.load.pinned_blocks,
                }
            })
            .collect()
    }
}

fn apply_events(hashes: &mut HashSet<u64>, batch: &KvEventBatch) -> Result<(), ApplyError> {
    for event in &batch.events {
        match &event.event {
            Some(Event::Stored(stored)) => {
                hashes.insert(stored.block_hash);
            }
            Some(Event::Removed(removed)) => {
                for hash in &removed.block_hashes {
                    hashes.remove(hash);
                }
            }
            Some(Event::Cleared(_)) => hashes.clear(),
            // A kind of event this router does not know: ignoring it can
            // only cost affinity, never correctness.
            None => {}
        }
        if hashes.len() > MAX_BLOCKS_PER_WORKER {
            return Err(ApplyError::TooManyBlocks { blocks: hashes.len(), limit: MAX_BLOCKS_PER_WORKER });
        }
    }
    Ok(())
}

fn check_size(blocks: usize, load: Option<&WorkerLoad>) -> Result<(), ApplyError> {
    let limit = match load.map(|l| l.total_blocks as usize) {
        Some(total) if total > 0 => total.min(MAX_BLOCKS_PER_WORKER),
        _ => MAX_BLOCKS_PER_WORKER,
    };
    if blocks > limit {
        return Err(ApplyError::TooManyBlocks { blocks, limit });
    }
    Ok(())
}

/// How one subscription ended.
#[derive(Debug)]
enum Ended {
    /// The batch could not be applied: resubscribe at once.
    Resync(ApplyError),
    /// The worker is unreachable, refused, or went silent.
    Down(String),
}

/// Keeps `index`'s view of `worker` in step with its KV event stream for as
/// long as the task runs: subscribes, applies batches, resubscribes after a
/// gap, and retries with backoff while the worker is unreachable.
pub async fn follow(index: Arc<PrefixIndex>, worker: usize, client: WorkerClient<Channel>) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let mut synced = false;
        match subscribe(&index, worker, client.clone(), &mut synced).await {
            Ended::Resync(e) => {
                tracing::debug!(worker, error = %e, "KV event stream out of step; resubscribing");
                // Short, so a worker that keeps sending bad batches cannot spin us.
                tokio::time::sleep(MIN_BACKOFF).await;
                continue;
            }
            Ended::Down(reason) => {
                if index.is_up(worker) {
                    tracing::warn!(worker, %reason, "worker's KV event stream lost; marking it down");
                }
                index.mark_down(worker);
            }
        }
        if synced {
            backoff = MIN_BACKOFF;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One subscription, until it ends. Sets `synced` once a snapshot applied.
async fn subscribe(index: &PrefixIndex, worker: usize, mut client: WorkerClient<Channel>, synced: &mut bool) -> Ended {
    let mut batches = match tokio::time::timeout(
        FIRST_BATCH_TIMEOUT,
        client.subscribe_kv_events(SubscribeKvEventsRequest {}),
    )
    .await
    {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => return Ended::Down(format!("subscribe: {}", status.message())),
        Err(_) => return Ended::Down("subscribe timed out".into()),
    };
    let mut silence = FIRST_BATCH_TIMEOUT;
    loop {
        let batch = match tokio::time::timeout(silence, batches.next()).await {
            Ok(Some(Ok(batch))) => batch,
            Ok(Some(Err(status))) => return Ended::Down(status.message().to_owned()),
            Ok(None) => return Ended::Down("the stream ended".into()),
            Err(_) => return Ended::Down(format!("no batch for {silence:?}")),
        };
        if batch.heartbeat_ms > 0 {
            silence = Duration::from_millis(batch.heartbeat_ms.into()) * MISSED_HEARTBEATS;
        }
        if let Err(e) = index.apply(worker, &batch) {
            return Ended::Resync(e);
        }
        if batch.snapshot && !*synced {
            *synced = true;
            tracing::debug!(worker, epoch = batch.epoch, blocks = batch.events.len(), "KV index snapshot applied");
        }
    }
}

#[cfg(test)]
mod tests;

//! The worker side of the KV event stream (`Worker.SubscribeKvEvents`).
//!
//! One [`KvEventPublisher`] per worker process drains the engine's KV events
//! on a short period, keeps a mirror of the block hashes cached now, and
//! broadcasts each cut as a numbered delta batch. A subscriber first gets a
//! snapshot of the mirror (taken under the lock the deltas are cut under, so
//! nothing is missed or sent twice), then the deltas after it; one that falls
//! behind the broadcast buffer gets a fresh snapshot instead of an error, so a
//! router's index heals itself without a reconnect.
//!
//! The engine is the only consumer of its own event queue: that is why a
//! single task drains it for every subscriber, instead of each stream taking
//! events (which would split them between streams).

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use engine::EngineHandle;
use futures::Stream;
use prost::Message;
use proto::worker as pb;
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tonic::Status;

/// What the publisher reads from: the engine, or a fake in tests.
pub trait KvEventSource: Send + Sync + 'static {
    /// KV events since the last call, oldest first (see
    /// [`EngineHandle::take_kv_events`]); the publisher is the only caller.
    fn take_events(&self) -> Vec<engine::KvEvent>;
    /// The load every batch carries, read when the batch is cut.
    fn load(&self) -> pb::WorkerLoad;
    /// Tokens per KV block, for the router to hash prompts alike.
    fn block_size(&self) -> u32;
}

/// Counts past `u32::MAX` are saturated rather than wrapped: a wrapped count
/// would make a loaded worker look idle.
fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl KvEventSource for EngineHandle {
    fn take_events(&self) -> Vec<engine::KvEvent> {
        self.take_kv_events()
    }

    fn load(&self) -> pb::WorkerLoad {
        let s = self.stats();
        pb::WorkerLoad {
            num_sequences: saturate(s.num_sequences),
            num_running: saturate(s.num_running),
            free_blocks: saturate(s.free_blocks),
            total_blocks: saturate(s.total_blocks),
            pinned_blocks: saturate(s.held_blocks),
        }
    }

    fn block_size(&self) -> u32 {
        saturate(self.shape().block_size)
    }
}

/// Timing and buffering of a [`KvEventPublisher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvEventConfig {
    /// How often the engine's events are drained. Short, so routers see new
    /// prefixes quickly; the engine's queue caps at 65,536 events, far more
    /// than one period produces.
    pub poll_interval: Duration,
    /// Longest gap between two batches: an empty batch (with the load) is cut
    /// when nothing else was, so a router can tell a quiet worker from a dead
    /// stream. Sent to subscribers as `heartbeat_ms`.
    pub heartbeat: Duration,
    /// Batches buffered per subscriber before it counts as lagging and is
    /// re-sent a snapshot.
    pub channel_capacity: usize,
}

impl Default for KvEventConfig {
    fn default() -> Self {
        Self { poll_interval: Duration::from_millis(10), heartbeat: Duration::from_millis(500), channel_capacity: 1024 }
    }
}

/// A subscriber's batches: a snapshot, then deltas in `seq` order (with a
/// fresh snapshot after a lag). Ends when the publisher shuts down.
pub type KvEventStream = Pin<Box<dyn Stream<Item = Result<pb::KvEventBatch, Status>> + Send + 'static>>;

/// Drains the engine's KV events and serves them to any number of
/// subscribers. Cheap to clone; the background task stops when the last
/// clone is dropped or on [`KvEventPublisher::shutdown`].
#[derive(Clone)]
pub struct KvEventPublisher {
    handle: Arc<Handle>,
}

/// Owned by the publisher clones only (not by the task or the streams), so
/// that dropping the last clone stops the task.
struct Handle {
    core: Arc<Core>,
    /// Dropped with the last clone: the task sees the channel close and stops.
    stop: watch::Sender<bool>,
}

/// What the task and the streams share.
struct Core {
    source: Arc<dyn KvEventSource>,
    epoch: u64,
    block_size: u32,
    heartbeat_ms: u32,
    state: Mutex<State>,
}

/// Everything a cut changes, under one lock: a subscriber snapshots the
/// mirror and subscribes to the broadcast atomically with respect to cuts.
struct State {
    /// Hashes cached now, as far as the events tell.
    mirror: HashSet<u64>,
    /// The last cut batch's seq; 0 before the first (a snapshot then carries 0
    /// and the first delta is 1).
    seq: u64,
    /// `None` once shut down: receivers see the channel close and streams end.
    sender: Option<broadcast::Sender<pb::KvEventBatch>>,
}

impl Core {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (each field is updated
        // whole), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `events` to the mirror and, when there are any or `heartbeat`
    /// is due, broadcasts them as the next batch. Returns whether it cut one.
    fn cut(&self, events: Vec<engine::KvEvent>, heartbeat: bool) -> bool {
        if events.is_empty() && !heartbeat {
            return false;
        }
        // Read outside the lock: the engine's counters are atomics, but a
        // fake may be slower, and the load need not be exact to the event.
        let load = self.source.load();
        let mut state = self.lock();
        let mut wire = Vec::with_capacity(events.len());
        for event in events {
            wire.push(apply(&mut state.mirror, event));
        }
        state.seq += 1;
        let batch = pb::KvEventBatch {
            epoch: self.epoch,
            seq: state.seq,
            snapshot: false,
            events: wire,
            load: Some(load),
            block_size: self.block_size,
            heartbeat_ms: self.heartbeat_ms,
        };
        // Sent under the lock so that a snapshot taken under it sees either
        // the mirror before this batch and receives it, or the mirror after it
        // and does not. No receivers is not an error: nobody subscribed yet.
        if let Some(sender) = &state.sender {
            let _ = sender.send(batch);
        }
        true
    }

    /// A snapshot of the mirror and a receiver of every batch cut after it;
    /// `None` once shut down.
    fn snapshot(&self) -> Option<(pb::KvEventBatch, broadcast::Receiver<pb::KvEventBatch>)> {
        let load = self.source.load();
        let (hashes, seq, receiver) = {
            let state = self.lock();
            let receiver = state.sender.as_ref()?.subscribe();
            // Only the hashes are copied under the lock; the messages are
            // built after it, so a big cache does not hold up the next cut.
            (state.mirror.iter().copied().collect::<Vec<_>>(), state.seq, receiver)
        };
        let events = hashes
            .into_iter()
            .map(|block_hash| pb::KvEvent {
                event: Some(pb::kv_event::Event::Stored(pb::BlockStored { block_hash, parent_hash: None })),
            })
            .collect();
        let batch = pb::KvEventBatch {
            epoch: self.epoch,
            seq,
            snapshot: true,
            events,
            load: Some(load),
            block_size: self.block_size,
            heartbeat_ms: self.heartbeat_ms,
        };
        // One message, because a snapshot replaces everything the subscriber
        // knew: a split one would need its own framing. Each hash costs at
        // most 15 bytes on the wire (10-byte varint + 3 tags + 2 lengths), so
        // tonic's default 4 MiB decode limit holds ~280k cached blocks, more
        // than the mirror holds for any KV budget we run (it is bounded by
        // the engine's block count). Warn rather than fail past it: the
        // router can raise its limit.
        let size = batch.encoded_len();
        if size > SNAPSHOT_WARN_BYTES {
            tracing::warn!(size, blocks = batch.events.len(), "KV snapshot exceeds tonic's default 4 MiB decode limit");
        }
        Some((batch, receiver))
    }

    /// Ends every stream (after the batches already buffered) and refuses new
    /// subscribers. Idempotent.
    fn close(&self) {
        self.lock().sender = None;
    }
}

/// tonic's default `max_decoding_message_size`.
const SNAPSHOT_WARN_BYTES: usize = 4 * 1024 * 1024;

/// Applies one engine event to the mirror and converts it to the wire.
fn apply(mirror: &mut HashSet<u64>, event: engine::KvEvent) -> pb::KvEvent {
    use pb::kv_event::Event;
    let event = match event {
        engine::KvEvent::BlockStored { block_hash, parent_hash, .. } => {
            mirror.insert(block_hash.0);
            Event::Stored(pb::BlockStored { block_hash: block_hash.0, parent_hash: parent_hash.map(|h| h.0) })
        }
        engine::KvEvent::BlockRemoved { block_hashes } => {
            let block_hashes: Vec<u64> = block_hashes.into_iter().map(|h| h.0).collect();
            for hash in &block_hashes {
                mirror.remove(hash);
            }
            Event::Removed(pb::BlockRemoved { block_hashes })
        }
        engine::KvEvent::AllCleared => {
            mirror.clear();
            Event::Cleared(pb::AllCleared {})
        }
    };
    pb::KvEvent { event: Some(event) }
}

impl KvEventPublisher {
    /// Starts the draining task on the current tokio runtime (panics outside
    /// one, like `tokio::spawn`). Start one per engine: a second would split
    /// the engine's events with the first.
    pub fn start(source: impl KvEventSource, config: KvEventConfig) -> Self {
        let block_size = source.block_size();
        let (sender, _) = broadcast::channel(config.channel_capacity.max(1));
        let core = Arc::new(Core {
            source: Arc::new(source),
            // Random per process so a router tells a restarted worker (whose
            // seq starts over) from a stream that lost batches. Never 0, which
            // on the wire is indistinguishable from unset.
            epoch: uuid::Uuid::new_v4().as_u64_pair().0.max(1),
            block_size,
            heartbeat_ms: u32::try_from(config.heartbeat.as_millis()).unwrap_or(u32::MAX),
            state: Mutex::new(State { mirror: HashSet::new(), seq: 0, sender: Some(sender) }),
        });
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(run(Arc::clone(&core), config, stopped));
        Self { handle: Arc::new(Handle { core, stop }) }
    }

    /// This process's epoch, as every batch carries it.
    pub fn epoch(&self) -> u64 {
        self.handle.core.epoch
    }

    /// A snapshot of the blocks cached now, then every delta after it. After
    /// [`shutdown`](Self::shutdown) the stream yields one `UNAVAILABLE` error.
    pub fn subscribe(&self) -> KvEventStream {
        let core = Arc::clone(&self.handle.core);
        let Some((snapshot, receiver)) = core.snapshot() else {
            return Box::pin(futures::stream::once(async { Err(Status::unavailable("worker is shutting down")) }));
        };
        let subscription = Subscription { core, receiver, last_seq: snapshot.seq, pending: Some(snapshot) };
        Box::pin(futures::stream::unfold(subscription, Subscription::next))
    }

    /// Stops the task and ends every stream once it has sent what it buffered.
    /// Call it before a graceful server shutdown: the server waits for open
    /// streams, and these never end on their own.
    pub fn shutdown(&self) {
        self.handle.stop.send_replace(true);
        self.handle.core.close();
    }
}

/// One subscriber's position in the stream.
struct Subscription {
    core: Arc<Core>,
    receiver: broadcast::Receiver<pb::KvEventBatch>,
    /// The last seq yielded: deltas at or below it are already covered.
    last_seq: u64,
    /// A snapshot to yield before anything received.
    pending: Option<pb::KvEventBatch>,
}

impl Subscription {
    async fn next(mut self) -> Option<(Result<pb::KvEventBatch, Status>, Self)> {
        if let Some(snapshot) = self.pending.take() {
            return Some((Ok(snapshot), self));
        }
        loop {
            match self.receiver.recv().await {
                // Cannot happen with the receiver subscribed under the cut
                // lock; kept so a gap in reasoning never duplicates a delta.
                Ok(batch) if batch.seq <= self.last_seq => continue,
                Ok(batch) => {
                    self.last_seq = batch.seq;
                    return Some((Ok(batch), self));
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    // The missed deltas are gone; a snapshot replaces them. A
                    // new receiver (subscribed with it) starts right after it,
                    // skipping the stale ones still buffered in the old one.
                    tracing::debug!(missed, "KV event subscriber lagged; re-sending a snapshot");
                    let (snapshot, receiver) = self.core.snapshot()?;
                    self.receiver = receiver;
                    self.last_seq = snapshot.seq;
                    return Some((Ok(snapshot), self));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// The draining loop: every `poll_interval`, take the engine's events and cut
/// a batch when there were any or the heartbeat is due.
async fn run(core: Arc<Core>, config: KvEventConfig, mut stopped: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(config.poll_interval.max(Duration::from_millis(1)));
    // A late tick (busy runtime) is not caught up in a burst: one drain takes
    // everything queued anyway.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_cut = Instant::now();
    loop {
        tokio::select! {
            // Err: every publisher clone is gone.
            changed = stopped.changed() => {
                if changed.is_err() || *stopped.borrow() {
                    break;
                }
            }
            _ = ticks.tick() => {
                let now = Instant::now();
                let events = core.source.take_events();
                if core.cut(events, now.duration_since(last_cut) >= config.heartbeat) {
                    last_cut = now;
                }
            }
        }
    }
    // Streams hold the core; without this they would wait forever on a
    // sender nobody sends on.
    core.close();
}

#[cfg(test)]
#[path = "kv_events_tests.rs"]
mod tests;

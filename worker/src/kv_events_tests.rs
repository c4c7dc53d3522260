//! The KV event stream against a fake engine, on paused time: the publisher
//! polls every 10 ms and heartbeats every 500 ms of virtual time, so each test
//! runs in milliseconds and in the same order every time.

use super::*;
use engine::BlockHash;
use futures::StreamExt;
use pb::kv_event::Event;
use std::sync::atomic::{AtomicUsize, Ordering};

/// An engine whose events and load the test sets.
#[derive(Clone, Default)]
struct Fake(Arc<FakeInner>);

#[derive(Default)]
struct FakeInner {
    events: Mutex<Vec<engine::KvEvent>>,
    load: Mutex<pb::WorkerLoad>,
    /// `take_events` calls, to see the task run (and stop).
    takes: AtomicUsize,
}

impl Fake {
    fn push(&self, events: impl IntoIterator<Item = engine::KvEvent>) {
        self.0.events.lock().unwrap_or_else(PoisonError::into_inner).extend(events);
    }

    fn set_load(&self, load: pb::WorkerLoad) {
        *self.0.load.lock().unwrap_or_else(PoisonError::into_inner) = load;
    }

    fn takes(&self) -> usize {
        self.0.takes.load(Ordering::SeqCst)
    }
}

impl KvEventSource for Fake {
    fn take_events(&self) -> Vec<engine::KvEvent> {
        self.0.takes.fetch_add(1, Ordering::SeqCst);
        std::mem::take(&mut *self.0.events.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn load(&self) -> pb::WorkerLoad {
        *self.0.load.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn block_size(&self) -> u32 {
        16
    }
}

const POLL: Duration = Duration::from_millis(10);
const HEARTBEAT: Duration = Duration::from_millis(500);

fn config(channel_capacity: usize) -> KvEventConfig {
    KvEventConfig { poll_interval: POLL, heartbeat: HEARTBEAT, channel_capacity }
}

fn stored(hash: u64, parent: Option<u64>) -> engine::KvEvent {
    engine::KvEvent::BlockStored {
        block_hash: BlockHash(hash),
        parent_hash: parent.map(BlockHash),
        token_ids: vec![0; 16],
        block_id: hash as u32,
    }
}

fn removed(hashes: &[u64]) -> engine::KvEvent {
    engine::KvEvent::BlockRemoved { block_hashes: hashes.iter().copied().map(BlockHash).collect() }
}

fn wire_stored(hash: u64, parent: Option<u64>) -> pb::KvEvent {
    pb::KvEvent { event: Some(Event::Stored(pb::BlockStored { block_hash: hash, parent_hash: parent })) }
}

fn wire_removed(hashes: &[u64]) -> pb::KvEvent {
    pb::KvEvent { event: Some(Event::Removed(pb::BlockRemoved { block_hashes: hashes.to_vec() })) }
}

fn wire_cleared() -> pb::KvEvent {
    pb::KvEvent { event: Some(Event::Cleared(pb::AllCleared {})) }
}

/// The next batch, which must come (the heartbeat guarantees one).
async fn next(stream: &mut KvEventStream) -> pb::KvEventBatch {
    match stream.next().await {
        Some(Ok(batch)) => batch,
        other => panic!("expected a batch, got {other:?}"),
    }
}

/// A snapshot's hashes, sorted (the mirror is a set: no order to keep).
fn snapshot_hashes(batch: &pb::KvEventBatch) -> Vec<u64> {
    assert!(batch.snapshot, "not a snapshot: {batch:?}");
    let mut hashes: Vec<u64> = batch
        .events
        .iter()
        .map(|e| match &e.event {
            Some(Event::Stored(pb::BlockStored { block_hash, parent_hash: None })) => *block_hash,
            other => panic!("a snapshot holds parentless stores only, got {other:?}"),
        })
        .collect();
    hashes.sort_unstable();
    hashes
}

/// Lets the task drain (and cut) what was pushed before. The runtime has one
/// thread, so the first `take_events` after a push sees it.
async fn drain(fake: &Fake) {
    let takes = fake.takes();
    while fake.takes() == takes {
        tokio::time::sleep(POLL / 2).await;
    }
}

#[tokio::test(start_paused = true)]
async fn snapshot_then_deltas_with_contiguous_seqs() {
    let fake = Fake::default();
    let publisher = KvEventPublisher::start(fake.clone(), config(1024));
    let mut stream = publisher.subscribe();

    let snapshot = next(&mut stream).await;
    assert!(snapshot.snapshot);
    assert_eq!(snapshot.seq, 0);
    assert!(snapshot.events.is_empty());
    assert_eq!(snapshot.epoch, publisher.epoch());
    assert_ne!(snapshot.epoch, 0);
    assert_eq!(snapshot.block_size, 16);
    assert_eq!(snapshot.heartbeat_ms, 500);

    fake.push([stored(1, None), stored(2, Some(1))]);
    let first = next(&mut stream).await;
    assert!(!first.snapshot);
    assert_eq!(first.seq, 1);
    assert_eq!(first.epoch, publisher.epoch());
    assert_eq!(first.events, vec![wire_stored(1, None), wire_stored(2, Some(1))]);

    fake.push([removed(&[1]), stored(3, Some(2))]);
    let second = next(&mut stream).await;
    assert_eq!(second.seq, 2);
    assert_eq!(second.events, vec![wire_removed(&[1]), wire_stored(3, Some(2))]);

    // Nothing happens: the heartbeat still takes the next seq.
    let third = next(&mut stream).await;
    assert_eq!(third.seq, 3);
    assert!(third.events.is_empty());
}

#[tokio::test(start_paused = true)]
async fn late_subscriber_gets_the_current_set_and_no_duplicates() {
    let fake = Fake::default();
    let publisher = KvEventPublisher::start(fake.clone(), config(1024));
    let mut early = publisher.subscribe();
    assert_eq!(next(&mut early).await.seq, 0);

    fake.push([stored(1, None), stored(2, Some(1)), stored(3, Some(2))]);
    assert_eq!(next(&mut early).await.seq, 1);
    fake.push([removed(&[2])]);
    assert_eq!(next(&mut early).await.seq, 2);

    let mut late = publisher.subscribe();
    let snapshot = next(&mut late).await;
    assert_eq!(snapshot.seq, 2);
    assert_eq!(snapshot_hashes(&snapshot), vec![1, 3]);

    fake.push([stored(4, Some(3))]);
    let (a, b) = (next(&mut early).await, next(&mut late).await);
    assert_eq!(a, b, "both subscribers see the same delta");
    assert_eq!(b.seq, 3);
    assert_eq!(b.events, vec![wire_stored(4, Some(3))]);
}

#[tokio::test(start_paused = true)]
async fn subscriber_between_engine_and_cut_gets_pending_events_once() {
    // Events the engine queued but the task has not drained yet are not in
    // the mirror: the snapshot leaves them out, the next delta brings them.
    let fake = Fake::default();
    let publisher = KvEventPublisher::start(fake.clone(), config(1024));
    tokio::time::sleep(POLL / 2).await;
    fake.push([stored(7, None)]);
    let mut stream = publisher.subscribe();
    let snapshot = next(&mut stream).await;
    assert_eq!(snapshot_hashes(&snapshot), Vec::<u64>::new());
    let delta = next(&mut stream).await;
    assert_eq!(delta.seq, snapshot.seq + 1);
    assert_eq!(delta.events, vec![wire_stored(7, None)]);
}

#[tokio::test(start_paused = true)]
async fn removed_and_cleared_apply_to_the_mirror() {
    let fake = Fake::default();
    let publisher = KvEventPublisher::start(fake.clone(), config(1024));

    fake.push([stored(1, None), stored(2, Some(1)), stored(3, Some(2)), removed(&[2, 99])]);
    drain(&fake).await;
    assert_eq!(snapshot_hashes(&next(&mut publisher.subscribe()).await), vec![1, 3]);

    // Cleared, then a store in the same drain: order matters.
    fake.push([engine::KvEvent::AllCleared, stored(5, None)]);
    let mut stream = publisher.subscribe();
    next(&mut stream).await;
    let delta = next(&mut stream).await;
    assert_eq!(delta.events, vec![wire_cleared(), wire_stored(5, None)]);
    assert_eq!(snapshot_hashes(&next(&mut publisher.subscribe()).await), vec![5]);

    fake.push([removed(&[5])]);
    drain(&fake).await;
    assert_eq!(snapshot_hashes(&next(&mut publisher.subscribe()).await), Vec::<u64>::new());
}

#[tokio::test(start_paused = true)]
async fn heartbeats_carry_the_load() {
    let fake = Fake::default();
    let load =
        pb::WorkerLoad { num_sequences: 3, num_running: 2, free_blocks: 90, total_blocks: 128, pinned_blocks: 0 };
    fake.set_load(load);
    let publisher = KvEventPublisher::start(fake.clone(), config(1024));
    let mut stream = publisher.subscribe();
    assert_eq!(next(&mut stream).await.load, Some(load));

    let start = Instant::now();
    let beat = next(&mut stream).await;
    assert_eq!(start.elapsed(), HEARTBEAT, "first heartbeat one period after start");
    assert!(!beat.snapshot);
    assert_eq!(beat.seq, 1);
    assert!(beat.events.is_empty());
    assert_eq!(beat.load, Some(load));

    let busier =
        pb::WorkerLoad { num_sequences: 5, num_running: 4, free_blocks: 10, total_blocks: 128, pinned_blocks: 0 };
    fake.set_load(busier);
    let beat = next(&mut stream).await;
    assert_eq!(start.elapsed(), 2 * HEARTBEAT);
    assert_eq!(beat.seq, 2);
    assert_eq!(beat.load, Some(busier));

    // An event batch resets the heartbeat clock.
    tokio::time::sleep(POLL * 5 + POLL / 2).await;
    fake.push([stored(1, None)]);
    let delta = next(&mut stream).await;
    assert_eq!(delta.seq, 3);
    let cut = Instant::now();
    let beat = next(&mut stream).await;
    assert_eq!(beat.seq, 4);
    assert_eq!(cut.elapsed(), HEARTBEAT);
}

#[tokio::test(start_paused = true)]
async fn lagging_subscriber_gets_a_fresh_snapshot() {
    let fake = Fake::default();
    let publisher = KvEventPublisher::start(fake.clone(), config(2));
    let mut stream = publisher.subscribe();
    assert_eq!(next(&mut stream).await.seq, 0);

    // Four batches into a buffer of two, without reading.
    for event in [stored(1, None), stored(2, Some(1)), stored(3, Some(2)), removed(&[1])] {
        fake.push([event]);
        drain(&fake).await;
    }
    let snapshot = next(&mut stream).await;
    assert!(snapshot.snapshot, "a lag is answered with a snapshot, got {snapshot:?}");
    assert_eq!(snapshot.seq, 4);
    assert_eq!(snapshot_hashes(&snapshot), vec![2, 3]);

    // Deltas resume right after it, none of the stale buffered ones first.
    fake.push([stored(9, None)]);
    let delta = next(&mut stream).await;
    assert_eq!(delta.seq, 5);
    assert_eq!(delta.events, vec![wire_stored(9, None)]);
}

#[tokio::test(start_paused = true)]
async fn task_stops_when_the_publisher_is_dropped() {
    let fake = Fake::default();
    let publisher = KvEventPublisher::start(fake.clone(), config(1024));
    let mut stream = publisher.subscribe();
    tokio::time::sleep(POLL * 5).await;
    assert!(fake.takes() > 0, "the task drains");

    drop(publisher);
    // The snapshot was taken already; then the stream ends instead of waiting.
    assert!(next(&mut stream).await.snapshot);
    assert!(stream.next().await.is_none());
    drop(stream);

    let takes = fake.takes();
    tokio::time::sleep(HEARTBEAT * 4).await;
    assert_eq!(fake.takes(), takes, "no drains after the publisher is gone");
    assert_eq!(Arc::strong_count(&fake.0), 1, "the task released the source");
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_streams_and_refuses_new_ones() {
    let fake = Fake::default();
    let publisher = KvEventPublisher::start(fake.clone(), config(1024));
    let mut stream = publisher.subscribe();
    fake.push([stored(1, None)]);
    drain(&fake).await;

    publisher.shutdown();
    // What was cut before the shutdown still arrives.
    assert!(next(&mut stream).await.snapshot);
    assert_eq!(next(&mut stream).await.events, vec![wire_stored(1, None)]);
    assert!(stream.next().await.is_none());

    let mut refused = publisher.subscribe();
    match refused.next().await {
        Some(Err(status)) => assert_eq!(status.code(), tonic::Code::Unavailable),
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    assert!(refused.next().await.is_none());

    let takes = fake.takes();
    tokio::time::sleep(HEARTBEAT * 4).await;
    assert_eq!(fake.takes(), takes, "the task stopped");
}

/// A model that always predicts token 1 and writes nothing to the cache: the
/// engine's block bookkeeping (and so its KV events) is all that matters here.
struct OneToken;

const VOCAB: usize = 8;

impl engine::Forward for OneToken {
    fn forward(
        &self,
        batch: &engine::ForwardBatch,
        _: &mut engine::KvStorage,
    ) -> Result<engine::Logits, engine::ForwardError> {
        let mut data = Vec::new();
        for _ in batch.seqs.iter().filter(|s| s.need_logits) {
            let mut row = vec![0.0; VOCAB];
            row[1] = 1.0;
            data.extend(row);
        }
        Ok(engine::Logits::new(VOCAB, data))
    }

    fn vocab_size(&self) -> usize {
        VOCAB
    }
}

/// `fut`'s output, or a panic naming `what` after 5 s of real time.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// The whole path on real time and a real socket: an engine's cached blocks
/// reach a gRPC subscriber with their chained hashes and the engine's load,
/// and ending the publisher lets the server's graceful shutdown finish (it
/// waits for open streams, which would otherwise never end).
#[tokio::test]
async fn engine_events_reach_a_grpc_subscriber_and_shutdown_ends_the_stream() {
    use pb::worker_client::WorkerClient;
    use pb::worker_server::WorkerServer;
    use prompt::block_hash::{chained_block_hash, first_block_hash};

    let shape = engine::KvCacheShape { num_layers: 1, num_kv_heads: 1, head_dim: 2, block_size: 4, num_blocks: 16 };
    let config = engine::EngineConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 64,
        max_model_len: 64,
        eos_token_ids: Vec::new(),
        default_seed: 0,
        enable_prefix_caching: true,
        speculative: None,
    };
    let engine = engine::Engine::start(Arc::new(OneToken), shape, config);
    let worker = crate::WorkerService::new(pb::ModelCard::default(), engine.clone(), None);
    let kv_events = worker.kv_events().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder().add_service(WorkerServer::new(worker)).serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            async move {
                let _ = stopped.await;
                kv_events.shutdown();
            },
        ),
    );

    let mut client = WorkerClient::connect(format!("http://{addr}")).await.expect("connect");
    let mut stream = client.subscribe_kv_events(pb::SubscribeKvEventsRequest {}).await.expect("subscribe").into_inner();
    let snapshot = stream.message().await.expect("snapshot").expect("a first batch");
    assert!(snapshot.snapshot);
    assert!(snapshot.events.is_empty());
    assert_eq!(snapshot.block_size, 4);
    assert_eq!(snapshot.load.map(|l| l.total_blocks), Some(16));

    // Two full blocks and a partial one: two stores.
    let prompt = [1, 2, 3, 4, 5, 6, 7, 3, 2];
    let request = engine::EngineRequest {
        pooling: None,
        request_id: "r".into(),
        prompt_token_ids: prompt.to_vec(),
        sampling: engine::SamplingParams::greedy(1),
        kv: engine::KvSource::Compute,
        pin_on_finish: false,
        cache_salt: None,
        priority: 0,
        n: 1,
        grammar: None,
    };
    let mut events = engine.submit(request).expect("submit");
    while events.recv().await.is_some() {}

    let mut stored = Vec::new();
    let mut last_seq = snapshot.seq;
    while stored.len() < 2 {
        let batch = within("the stored blocks", stream.message()).await.expect("a batch").expect("the stream is open");
        assert_eq!((batch.seq, batch.snapshot), (last_seq + 1, false));
        last_seq = batch.seq;
        stored.extend(batch.events.into_iter().filter_map(|e| match e.event {
            Some(Event::Stored(s)) => Some(s),
            _ => None,
        }));
    }
    let first = first_block_hash(b"", &prompt[..4]);
    let second = chained_block_hash(first, &prompt[4..8]);
    assert_eq!(
        stored,
        vec![
            pb::BlockStored { block_hash: first.0, parent_hash: None },
            pb::BlockStored { block_hash: second.0, parent_hash: Some(first.0) },
        ]
    );

    let _ = stop.send(());
    within("the server to stop", server).await.expect("server task").expect("server");
    // Ended, cleanly or by the closed connection: either way not hanging.
    let end = within("the end", stream.message()).await;
    assert!(!matches!(end, Ok(Some(_))), "no batch after shutdown, got {end:?}");
}

//! The index on its own (batches in, prefix counts out), and the follower
//! against a scripted in-process worker.

use std::sync::Mutex;

use prompt::block_hash::block_hashes;
use proto::worker::worker_server::{Worker, WorkerServer};
use proto::worker::{
    AllCleared, BlockRemoved, BlockStored, GetModelCardRequest, GetStatsRequest, KvEvent, ModelCard, WorkerStats,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

use super::*;

fn stored(hash: BlockHash) -> KvEvent {
    KvEvent { event: Some(Event::Stored(BlockStored { block_hash: hash.0, parent_hash: None })) }
}

fn removed(hashes: &[BlockHash]) -> KvEvent {
    KvEvent { event: Some(Event::Removed(BlockRemoved { block_hashes: hashes.iter().map(|h| h.0).collect() })) }
}

fn cleared() -> KvEvent {
    KvEvent { event: Some(Event::Cleared(AllCleared {})) }
}

fn batch(epoch: u64, seq: u64, snapshot: bool, events: Vec<KvEvent>) -> KvEventBatch {
    KvEventBatch {
        epoch,
        seq,
        snapshot,
        events,
        load: Some(WorkerLoad {
            num_sequences: 1,
            num_running: 1,
            free_blocks: 90,
            total_blocks: 100,
            pinned_blocks: 0,
        }),
        block_size: 4,
        heartbeat_ms: 100,
    }
}

const TOKENS: [u32; 14] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14];

#[test]
fn a_snapshot_then_deltas_give_the_cached_prefix_length() {
    let index = PrefixIndex::new(2);
    let h = block_hashes(b"", &TOKENS, 4);
    assert_eq!(h.len(), 3);
    assert!(!index.is_up(0));
    assert_eq!(index.block_size(), None);

    index.apply(0, &batch(7, 10, true, vec![stored(h[0])])).unwrap();
    assert!(index.is_up(0));
    assert_eq!(index.block_size(), Some(4));
    assert_eq!(index.cached_blocks(0, &h), 1);
    assert_eq!(index.cached_blocks(1, &h), 0, "worker 1 has nothing");

    index.apply(0, &batch(7, 11, false, vec![stored(h[1]), stored(h[2])])).unwrap();
    assert_eq!(index.cached_blocks(0, &h), 3);
    // Leading blocks only: without block 1, block 2 is no credit.
    index.apply(0, &batch(7, 12, false, vec![removed(&[h[1]])])).unwrap();
    assert_eq!(index.cached_blocks(0, &h), 1);
    index.apply(0, &batch(7, 13, false, vec![cleared(), stored(h[0])])).unwrap();
    assert_eq!(index.summary()[0], WorkerSummary { up: true, epoch: 7, seq: 13, cached_blocks: 1, pinned_blocks: 0 });
    assert_eq!(index.load(0).free_blocks, 90);
}

#[test]
fn another_salt_gets_no_credit() {
    let index = PrefixIndex::new(1);
    let tenant_a = block_hashes(b"tenant-a", &TOKENS, 4);
    let tenant_b = block_hashes(b"tenant-b", &TOKENS, 4);
    let unsalted = block_hashes(b"", &TOKENS, 4);
    index.apply(0, &batch(1, 1, true, tenant_a.iter().copied().map(stored).collect())).unwrap();
    assert_eq!(index.cached_blocks(0, &tenant_a), 3);
    assert_eq!(index.cached_blocks(0, &tenant_b), 0);
    assert_eq!(index.cached_blocks(0, &unsalted), 0);
}

#[test]
fn out_of_step_batches_are_refused_and_leave_the_view_alone() {
    let index = PrefixIndex::new(1);
    let h = block_hashes(b"", &TOKENS, 4);
    assert_eq!(index.apply(0, &batch(1, 1, false, vec![])), Err(ApplyError::NoSnapshot));
    index.apply(0, &batch(1, 5, true, vec![stored(h[0])])).unwrap();
    assert_eq!(index.apply(0, &batch(1, 7, false, vec![stored(h[1])])), Err(ApplyError::Gap { expected: 6, got: 7 }));
    assert_eq!(index.apply(0, &batch(2, 6, false, vec![])), Err(ApplyError::EpochChanged { had: 1, got: 2 }));
    assert_eq!(index.cached_blocks(0, &h), 1);
    // A restarted worker's snapshot replaces the old epoch's set.
    index.apply(0, &batch(2, 1, true, vec![])).unwrap();
    assert_eq!(index.cached_blocks(0, &h), 0);
    assert_eq!(index.summary()[0].epoch, 2);
}

#[test]
fn memory_is_bounded_by_the_workers_block_count() {
    let index = PrefixIndex::new(1);
    let mut too_many = batch(1, 1, true, (0..101).map(|i| stored(BlockHash(i))).collect());
    assert_eq!(index.apply(0, &too_many), Err(ApplyError::TooManyBlocks { blocks: 101, limit: 100 }));
    too_many.events.truncate(100);
    index.apply(0, &too_many).unwrap();
    let err = index.apply(0, &batch(1, 2, false, vec![stored(BlockHash(1000))])).unwrap_err();
    assert_eq!(err, ApplyError::TooManyBlocks { blocks: 101, limit: 100 });
    assert!(!index.is_up(0), "an overflowing view is dropped until the next snapshot");
}

#[test]
fn marking_down_forgets_the_worker() {
    let index = PrefixIndex::new(1);
    let h = block_hashes(b"", &TOKENS, 4);
    index.apply(0, &batch(1, 1, true, vec![stored(h[0])])).unwrap();
    index.mark_down(0);
    assert!(!index.is_up(0));
    assert_eq!(index.cached_blocks(0, &h), 0);
    assert_eq!(index.apply(0, &batch(1, 2, false, vec![])), Err(ApplyError::NoSnapshot));
}

/// A worker whose every `SubscribeKvEvents` call gets the next scripted stream.
#[derive(Default)]
struct ScriptedWorker {
    streams: Mutex<Vec<mpsc::Receiver<Result<KvEventBatch, Status>>>>,
    subscriptions: Mutex<usize>,
}

#[tonic::async_trait]
impl Worker for ScriptedWorker {
    async fn get_model_card(&self, _: Request<GetModelCardRequest>) -> Result<Response<ModelCard>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    async fn get_stats(&self, _: Request<GetStatsRequest>) -> Result<Response<WorkerStats>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
    type SubscribeKvEventsStream = ReceiverStream<Result<KvEventBatch, Status>>;
    async fn subscribe_kv_events(
        &self,
        _: Request<SubscribeKvEventsRequest>,
    ) -> Result<Response<Self::SubscribeKvEventsStream>, Status> {
        *self.subscriptions.lock().unwrap() += 1;
        let mut streams = self.streams.lock().unwrap();
        if streams.is_empty() {
            return Err(Status::unavailable("no more scripted streams"));
        }
        Ok(Response::new(ReceiverStream::new(streams.remove(0))))
    }
    async fn embed(
        &self,
        _: Request<proto::worker::EmbedRequest>,
    ) -> Result<Response<proto::worker::EmbedResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }
}

async fn serve(worker: Arc<ScriptedWorker>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(WorkerServer::from_arc(worker))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    (url, server)
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn the_follower_resubscribes_after_a_gap_and_marks_a_dead_worker_down() {
    let h = block_hashes(b"", &TOKENS, 4);
    let (first_tx, first_rx) = mpsc::channel(8);
    let (second_tx, second_rx) = mpsc::channel(8);
    let worker = Arc::new(ScriptedWorker { streams: Mutex::new(vec![first_rx, second_rx]), ..Default::default() });
    let (url, server) = serve(worker.clone()).await;
    let index = Arc::new(PrefixIndex::new(1));
    let client = WorkerClient::new(Channel::from_shared(url).unwrap().connect_lazy());
    let follower = tokio::spawn(follow(index.clone(), 0, client));

    first_tx.send(Ok(batch(3, 1, true, vec![stored(h[0])]))).await.unwrap();
    first_tx.send(Ok(batch(3, 2, false, vec![stored(h[1])]))).await.unwrap();
    eventually("the deltas to apply", || index.cached_blocks(0, &h) == 2).await;

    // Batch 3 is lost: the follower must drop this stream and take a snapshot.
    first_tx.send(Ok(batch(3, 4, false, vec![stored(h[2])]))).await.unwrap();
    eventually("a second subscription", || *worker.subscriptions.lock().unwrap() == 2).await;
    assert_eq!(index.cached_blocks(0, &h), 2, "the gapped batch was not applied");
    second_tx.send(Ok(batch(3, 4, true, h.iter().copied().map(stored).collect()))).await.unwrap();
    eventually("the re-snapshot", || index.cached_blocks(0, &h) == 3).await;

    // The stream dies and no new one is offered: the worker is down.
    drop(second_tx);
    eventually("the worker to be marked down", || !index.is_up(0)).await;
    assert_eq!(index.cached_blocks(0, &h), 0);
    eventually("the follower to probe again", || *worker.subscriptions.lock().unwrap() >= 4).await;
    follower.abort();
    server.abort();
}

#[tokio::test]
async fn a_silent_stream_counts_as_dead() {
    let (tx, rx) = mpsc::channel(8);
    let worker = Arc::new(ScriptedWorker { streams: Mutex::new(vec![rx]), ..Default::default() });
    let (url, server) = serve(worker).await;
    let index = Arc::new(PrefixIndex::new(1));
    let client = WorkerClient::new(Channel::from_shared(url).unwrap().connect_lazy());
    let follower = tokio::spawn(follow(index.clone(), 0, client));
    tx.send(Ok(batch(1, 1, true, vec![]))).await.unwrap();
    eventually("the snapshot", || index.is_up(0)).await;
    // Heartbeat 100 ms: four missed ones and the worker is down, though the
    // connection (the sender) is still open.
    eventually("the silent worker to be marked down", || !index.is_up(0)).await;
    drop(tx);
    follower.abort();
    server.abort();
}

//! The hand-off over real loopback sockets with fake engines whose KV memory
//! holds a known pattern: pull + release, leases, abort, dying peers, layout
//! refusal, head slicing across TP sizes, checksums, and transport choice.

use kv_transfer::{
    BlockSource, ConnectorConfig, DraftKv, KvConnector, KvDtype, KvLayout, KvMemory, KvPuller, KvTransferError,
    PinStats, PullTarget, PullerConfig, RemotePrefill, Transport, TransportPolicy,
};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BLOCKS: usize = 12;

/// A small model: 2 layers, `heads` KV heads of 4 f32, blocks of 2 slots.
fn model(heads: u32) -> KvLayout {
    KvLayout {
        num_layers: 2,
        num_kv_heads: heads,
        head_dim: 4,
        dtype: KvDtype::F32,
        block_size: 2,
        tp_size: 1,
        tp_rank: 0,
        total_kv_heads: heads,
        draft: None,
    }
}

/// The byte every rank holds at (layer, kv, block, slot, global head, byte):
/// a mix that differs for every coordinate that matters.
fn pattern(layer: usize, kv: usize, block: usize, slot: usize, head: usize, byte: usize) -> u8 {
    (layer * 131 + kv * 71 + block * 29 + slot * 17 + head * 7 + byte * 3) as u8
}

/// A fake engine rank: memory filled with the pattern, releases recorded.
struct FakeRank {
    layout: KvLayout,
    memory: KvMemory,
    released: Mutex<BTreeSet<u32>>,
}

impl FakeRank {
    fn new(layout: KvLayout) -> Arc<Self> {
        let file = tempfile::tempfile_in("/dev/shm").or_else(|_| tempfile::tempfile()).unwrap();
        let memory = KvMemory::shared(&layout, BLOCKS, file).unwrap();
        let hb = layout.head_bytes();
        for layer in 0..2 {
            for kv in 0..2 {
                for block in 0..BLOCKS {
                    let at = layout.segment_offset(BLOCKS, layer, kv, block);
                    let seg: Vec<u8> = (0..layout.segment_bytes())
                        .map(|i| {
                            let slot = i / (layout.num_kv_heads as usize * hb);
                            let head = layout.head_range().start as usize + (i / hb) % layout.num_kv_heads as usize;
                            pattern(layer, kv, block, slot, head, i % hb)
                        })
                        .collect();
                    // SAFETY: nothing is pulling yet.
                    unsafe { memory.fill(at, &seg) };
                }
            }
        }
        Arc::new(Self { layout, memory, released: Mutex::new(BTreeSet::new()) })
    }
}

impl BlockSource for FakeRank {
    fn layout(&self) -> KvLayout {
        self.layout
    }
    fn memory(&self) -> KvMemory {
        self.memory.clone()
    }
    fn release_blocks(&self, ids: &[u32]) {
        let mut released = self.released.lock().unwrap();
        for id in ids {
            assert!(released.insert(*id), "block {id} released twice");
        }
    }
}

/// What a puller of `layout` must hold after pulling `blocks`, in the hand-off format.
fn expected(layout: &KvLayout, blocks: &[u32]) -> Vec<u8> {
    let hb = layout.head_bytes();
    let mut out = Vec::new();
    for layer in 0..2 {
        for kv in 0..2 {
            for &block in blocks {
                for slot in 0..layout.block_size as usize {
                    for head in layout.head_range() {
                        out.extend((0..hb).map(|b| pattern(layer, kv, block as usize, slot, head as usize, b)));
                    }
                }
            }
        }
    }
    out
}

async fn serve(rank: Arc<FakeRank>, lease: Duration) -> KvConnector {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = ConnectorConfig {
        engine_id: "prefill-a".into(),
        advertise_host: "127.0.0.1".into(),
        lease,
        shared_memory: true,
    };
    KvConnector::start(listener, config, rank as Arc<dyn BlockSource>).unwrap()
}

fn puller(layout: KvLayout, transport: TransportPolicy) -> KvPuller {
    KvPuller::new(PullerConfig { layout, transport, checksum: true, idle_timeout: Duration::from_secs(2) })
}

/// Pulls and releases into a fresh hand-off buffer: the bytes and how they came.
async fn pull_and_release(puller: &KvPuller, layout: &KvLayout, remote: &RemotePrefill) -> (Vec<u8>, Transport) {
    let mut data = vec![0; puller.buffer_len(remote)];
    let transport = puller.pull_and_release(remote, &mut PullTarget::buffer(&mut data, layout)).await.unwrap();
    (data, transport)
}

/// Pulls three blocks into blocks 6, 1 and 4 of an 8-block region of
/// `layout` (as into a decode engine's cache), then reads those back in the
/// hand-off format.
async fn pull_into_region(puller: &KvPuller, layout: &KvLayout, remote: &RemotePrefill) -> Vec<u8> {
    const REGION: usize = 8;
    let ids = vec![6, 1, 4];
    let mut region = vec![0u8; REGION * layout.block_bytes()];
    // SAFETY: `region` outlives the target and nothing else touches it.
    let mut target = unsafe { PullTarget::blocks(region.as_mut_ptr(), region.len(), layout, ids.clone()) }.unwrap();
    puller.pull_into(remote, &mut target).await.unwrap();
    drop(target);
    let seg = layout.segment_bytes();
    let mut out = Vec::new();
    for layer in 0..2 {
        for kv in 0..2 {
            for &id in &ids {
                let at = layout.segment_offset(REGION, layer, kv, id as usize);
                out.extend_from_slice(&region[at..at + seg]);
            }
        }
    }
    out
}

#[tokio::test]
async fn layers_are_reported_as_they_land_on_both_transports_and_across_ranks() {
    for policy in [TransportPolicy::Tcp, TransportPolicy::Auto] {
        // One server rank, then three whose pieces each bring one head.
        for from in [1, 3] {
            let mut connectors = Vec::new();
            for r in 0..from {
                connectors.push(serve(FakeRank::new(model(3).for_rank(from, r)), Duration::from_secs(30)).await);
            }
            let mut remote = connectors[0].pin("req-1", vec![7, 1], 4);
            for c in &connectors[1..] {
                c.pin("req-1", vec![7, 1], 4);
            }
            remote.remote_ports = connectors.iter().map(KvConnector::port).collect();
            let reported = Mutex::new(Vec::new());
            let mut data = vec![0; 2 * model(3).block_bytes()];
            let mut target =
                PullTarget::buffer(&mut data, &model(3)).with_progress(|n| reported.lock().unwrap().push(n));
            puller(model(3), policy).pull_and_release(&remote, &mut target).await.unwrap();
            drop(target);
            assert!(data == expected(&model(3), &[7, 1]), "{policy:?} from TP {from}");
            assert_eq!(
                *reported.lock().unwrap(),
                [1, 2],
                "{policy:?} from TP {from}: layer by layer, the last once checked"
            );
        }
    }
}

/// Polls until `f` holds, for at most `secs`.
async fn eventually(secs: f64, f: impl Fn() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

#[tokio::test]
async fn pull_then_release_over_tcp_and_shared_memory() {
    for (policy, transport) in [(TransportPolicy::Tcp, Transport::Tcp), (TransportPolicy::Auto, Transport::Shm)] {
        let rank = FakeRank::new(model(3));
        let connector = serve(rank.clone(), Duration::from_secs(30)).await;
        let remote = connector.pin("req-1", vec![5, 2, 9], 5);
        assert_eq!(connector.stats(), PinStats { requests: 1, blocks: 3 });
        let puller = puller(model(3), policy);
        let (data, got) = pull_and_release(&puller, &model(3), &remote).await;
        assert_eq!(got, transport);
        assert!(data == expected(&model(3), &[5, 2, 9]), "{transport:?} payload differs");
        assert_eq!(connector.stats(), PinStats::default());
        assert_eq!(*rank.released.lock().unwrap(), BTreeSet::from([2, 5, 9]));
        // A second pull of the same hand-off is refused: the blocks are gone.
        let err = puller.pull(&remote).await.unwrap_err();
        assert!(matches!(err, KvTransferError::Refused { .. }), "{err}");
    }
}

#[tokio::test]
async fn the_same_connection_serves_many_pulls() {
    let rank = FakeRank::new(model(3));
    let connector = serve(rank.clone(), Duration::from_secs(30)).await;
    let puller = puller(model(3), TransportPolicy::Tcp);
    for i in 0..BLOCKS as u32 {
        let remote = connector.pin(&format!("req-{i}"), vec![i], 2);
        let (data, _) = pull_and_release(&puller, &model(3), &remote).await;
        assert!(data == expected(&model(3), &[i]));
    }
    assert_eq!(connector.stats(), PinStats::default());
}

#[tokio::test]
async fn unpulled_pins_expire_after_their_lease() {
    let rank = FakeRank::new(model(3));
    let connector = serve(rank.clone(), Duration::from_millis(300)).await;
    let remote = connector.pin("req-1", vec![1, 3, 4], 5);
    assert_eq!(remote.lease_ms, 300);
    assert!(eventually(2.0, || connector.stats() == PinStats::default()).await);
    assert_eq!(*rank.released.lock().unwrap(), BTreeSet::from([1, 3, 4]));
}

#[tokio::test]
async fn an_abort_frees_at_once_and_only_once() {
    let rank = FakeRank::new(model(3));
    let connector = serve(rank.clone(), Duration::from_secs(30)).await;
    connector.pin("req-1", vec![7], 1);
    assert!(connector.release("req-1"));
    assert!(!connector.release("req-1"));
    assert_eq!(*rank.released.lock().unwrap(), BTreeSet::from([7]));
}

/// Sends the first frames of a pull by hand, as a decode worker that then dies would.
async fn start_pull_and_die(remote: &RemotePrefill, layout: KvLayout) {
    use kv_transfer::frame::{read_frame, write_frame};
    use proto::kv::{frame::Kind, Frame, Hello, PullRequest};
    let mut s = TcpStream::connect(remote.addr()).await.unwrap();
    let hello = Hello { layout: Some(layout.into()), engine_id: remote.remote_engine_id.clone() };
    write_frame(&mut s, &Frame { kind: Some(Kind::Hello(hello)) }).await.unwrap();
    read_frame(&mut s).await.unwrap().unwrap();
    let pull = PullRequest {
        request_id: remote.remote_request_id.clone(),
        block_ids: remote.remote_block_ids.clone(),
        head_start: 0,
        head_end: layout.total_kv_heads,
        transport: Transport::Tcp as i32,
        checksum: false,
        release: false,
        traceparent: None,
    };
    write_frame(&mut s, &Frame { kind: Some(Kind::Pull(pull)) }).await.unwrap();
    let mut some = [0u8; 64];
    s.read_exact(&mut some).await.unwrap();
    // Dropped here: the connection resets mid-payload.
}

#[tokio::test]
async fn a_puller_that_dies_mid_pull_costs_the_blocks_one_lease() {
    let rank = FakeRank::new(model(3));
    let connector = serve(rank.clone(), Duration::from_millis(500)).await;
    let remote = connector.pin("req-1", (0..12).collect(), 24);
    start_pull_and_die(&remote, model(3)).await;
    assert_eq!(connector.stats().blocks, 12, "the pin outlives the dead puller until its lease ends");
    assert!(eventually(2.0, || connector.stats() == PinStats::default()).await);
    assert_eq!(rank.released.lock().unwrap().len(), 12);
}

/// A hand-driven KV server's side of a connection up to the payload: accept
/// the hello with the 3-head model's layout, read one pull, announce one
/// block's bytes. The caller writes (or withholds) them.
async fn accept_one_block_pull(s: &mut TcpStream) {
    use kv_transfer::frame::{read_frame, write_frame};
    use proto::kv::{frame::Kind, hello_ack, pull_response, Accepted, Frame, HelloAck, PullResponse};
    read_frame(s).await.unwrap();
    let accepted = Accepted { layout: Some(model(3).into()), num_blocks: BLOCKS as u32, shared_memory: None };
    let ack = HelloAck { result: Some(hello_ack::Result::Accepted(accepted)) };
    write_frame(s, &Frame { kind: Some(Kind::HelloAck(ack)) }).await.unwrap();
    read_frame(s).await.unwrap();
    let bytes = model(3).block_bytes() as u64;
    let header = PullResponse { result: Some(pull_response::Result::NumBytes(bytes)) };
    write_frame(s, &Frame { kind: Some(Kind::PullResponse(header)) }).await.unwrap();
}

/// A KV server that answers the hello and the pull header, sends 100 bytes,
/// then closes (`close`) or stalls: a prefill worker dying or stalling mid-pull.
async fn broken_server(close: bool) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        accept_one_block_pull(&mut s).await;
        s.write_all(&[1; 100]).await.unwrap();
        if close {
            return;
        }
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    (addr, task)
}

fn remote_at(addr: &str, blocks: Vec<u32>) -> RemotePrefill {
    let (host, port) = addr.rsplit_once(':').unwrap();
    RemotePrefill {
        remote_engine_id: "prefill-a".into(),
        remote_block_ids: blocks,
        remote_host: host.into(),
        remote_port: port.parse().unwrap(),
        tp_size: 1,
        remote_request_id: "req-1".into(),
        num_tokens: 2,
        lease_ms: 1000,
        remote_ports: vec![],
    }
}

#[tokio::test]
async fn a_prefill_that_dies_mid_pull_fails_it_fast() {
    let (addr, _task) = broken_server(true).await;
    let start = Instant::now();
    let err = puller(model(3), TransportPolicy::Tcp).pull(&remote_at(&addr, vec![0])).await.unwrap_err();
    assert!(matches!(err, KvTransferError::Io { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(1), "took {:?}", start.elapsed());
}

#[tokio::test]
async fn a_prefill_that_stalls_mid_pull_times_out() {
    let (addr, task) = broken_server(false).await;
    let start = Instant::now();
    let err = puller(model(3), TransportPolicy::Tcp).pull(&remote_at(&addr, vec![0])).await.unwrap_err();
    assert!(matches!(err, KvTransferError::Timeout { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(4), "took {:?}", start.elapsed());
    task.abort();
}

#[tokio::test]
async fn a_stalled_prefill_costs_one_idle_timeout_not_two() {
    // Releasing the pin after the stalled pull would wait out the idle
    // timeout again on the silent peer (its listener still completes the
    // connection); the lease frees the pin instead.
    let (addr, task) = broken_server(false).await;
    let puller = puller(model(3), TransportPolicy::Tcp);
    let mut data = vec![0; model(3).block_bytes()];
    let start = Instant::now();
    let remote = remote_at(&addr, vec![0]);
    let err = puller.pull_and_release(&remote, &mut PullTarget::buffer(&mut data, &model(3))).await.unwrap_err();
    assert!(matches!(err, KvTransferError::Timeout { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_millis(3500), "took {:?} for a 2 s idle timeout", start.elapsed());
    task.abort();
}

#[tokio::test]
async fn incompatible_layouts_are_refused_by_name() {
    let rank = FakeRank::new(model(3));
    let connector = serve(rank.clone(), Duration::from_secs(30)).await;
    let remote = connector.pin("req-1", vec![1], 2);
    let theirs = KvLayout { head_dim: 8, block_size: 4, ..model(3) };
    let err = puller(theirs, TransportPolicy::Tcp).pull(&remote).await.unwrap_err();
    let KvTransferError::Refused { message, .. } = err else { panic!("{err}") };
    assert_eq!(
        message,
        "incompatible KV layout: head_dim 4 vs 8, block_size 2 vs 4 \
         (this prefill worker's first, the decode worker's second)"
    );
    let err = puller(model(3).for_rank(2, 0), TransportPolicy::Tcp).pull(&remote).await.unwrap_err();
    assert!(err.to_string().contains("3 KV heads do not divide by tp_size 2"), "{err}");
    // Nothing was pulled: the pin is still there for a compatible puller.
    assert_eq!(connector.stats().blocks, 1);
}

#[tokio::test]
async fn speculative_configs_whose_blocks_differ_refuse_each_other_naming_both() {
    // The decode worker's blocks carry a draft model's KV after the target's: from a prefill
    // worker without that draft, or with another, its draft would read KV that is not its own.
    let rank = FakeRank::new(model(3));
    let connector = serve(rank.clone(), Duration::from_secs(30)).await;
    let remote = connector.pin("req-1", vec![1], 2);
    let drafting = |id| KvLayout { num_layers: 4, draft: Some(DraftKv { layers: 2, id }), ..model(3) };
    let err = puller(drafting(7), TransportPolicy::Tcp).pull(&remote).await.unwrap_err();
    let KvTransferError::Refused { message, .. } = err else { panic!("{err}") };
    assert_eq!(
        message,
        "incompatible KV layout: num_layers 2 vs 4, \
         speculative decoding no draft model vs draft model 0000000000000007 of 2 layers \
         (this prefill worker's first, the decode worker's second)"
    );
    // Both with drafts, of the same shape but different files: refused too.
    let mismatch = drafting(7).check_compatible(&drafting(8)).unwrap_err().to_string();
    assert!(
        mismatch.contains("draft model 0000000000000007 of 2 layers vs draft model 0000000000000008"),
        "{mismatch}"
    );
    assert_eq!(drafting(7).check_compatible(&drafting(7)), Ok(()));
    // A draft that leaves the target no layers is no layout at all.
    let whole = KvLayout { draft: Some(DraftKv { layers: 4, id: 7 }), ..drafting(7) };
    assert!(whole.check_valid().is_err());
    assert_eq!(connector.stats().blocks, 1, "nothing was pulled");
}

/// Pulls `blocks` from prefill TP `from` into every rank of decode TP `to`,
/// over `policy`, and checks each rank got exactly its heads.
async fn pull_across(heads: u32, from: u32, to: u32, policy: TransportPolicy) {
    let mut connectors = Vec::new();
    let mut ranks = Vec::new();
    for r in 0..from {
        let rank = FakeRank::new(model(heads).for_rank(from, r));
        connectors.push(serve(rank.clone(), Duration::from_secs(30)).await);
        ranks.push(rank);
    }
    let blocks = vec![3, 11, 0];
    let mut remote = connectors[0].pin("req-1", blocks.clone(), 6);
    for c in &connectors[1..] {
        c.pin("req-1", blocks.clone(), 6);
    }
    remote.remote_ports = connectors.iter().map(KvConnector::port).collect();
    for d in 0..to {
        let layout = model(heads).for_rank(to, d);
        let pulled = pull_into_region(&puller(layout, policy), &layout, &remote).await;
        assert!(pulled == expected(&layout, &blocks), "TP {from} -> {to}, decode rank {d}: wrong heads");
    }
    assert!(puller(model(heads).for_rank(to, 0), policy).release(&remote).await.unwrap());
    for (c, rank) in connectors.iter().zip(&ranks) {
        assert_eq!(c.stats(), PinStats::default());
        assert_eq!(*rank.released.lock().unwrap(), BTreeSet::from([0, 3, 11]));
    }
}

#[tokio::test]
async fn heads_are_sliced_across_tp_sizes() {
    for policy in [TransportPolicy::Tcp, TransportPolicy::Auto] {
        pull_across(3, 1, 3, policy).await;
        pull_across(3, 3, 1, policy).await;
        pull_across(3, 3, 3, policy).await;
        pull_across(8, 2, 4, policy).await;
        pull_across(8, 4, 2, policy).await;
    }
}

/// A TCP proxy that flips one bit of the byte at `offset` of what the
/// server sends.
async fn flipping_proxy(upstream: String, offset: usize) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(&upstream).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
            tokio::spawn(async move {
                let (mut seen, mut buf) = (0usize, vec![0u8; 4096]);
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if (seen..seen + n).contains(&offset) {
                        buf[offset - seen] ^= 0x10;
                    }
                    seen += n;
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn the_checksum_catches_a_flipped_byte() {
    let rank = FakeRank::new(model(3));
    let connector = serve(rank.clone(), Duration::from_secs(30)).await;
    // Past the hello answer and the pull header: inside the payload.
    let port = flipping_proxy(format!("127.0.0.1:{}", connector.port()), 300).await;
    let mut remote = connector.pin("req-1", vec![4, 5], 4);
    remote.remote_port = port;
    // Streaming: the layer before the corruption is reported, the last never.
    let reported = Mutex::new(Vec::new());
    let mut data = vec![0; 2 * model(3).block_bytes()];
    let mut target = PullTarget::buffer(&mut data, &model(3)).with_progress(|n| reported.lock().unwrap().push(n));
    let err = puller(model(3), TransportPolicy::Tcp).pull_into(&remote, &mut target).await.unwrap_err();
    assert!(matches!(err, KvTransferError::Checksum { .. }), "{err}");
    drop(target);
    assert_eq!(*reported.lock().unwrap(), [1], "the last layer is reported only after the checksum matched");
    // Without the checksum the same corruption goes through unnoticed, which is why it is on by default.
    let unchecked = KvPuller::new(PullerConfig {
        layout: model(3),
        transport: TransportPolicy::Tcp,
        checksum: false,
        idle_timeout: Duration::from_secs(2),
    });
    let pulled = unchecked.pull(&remote).await.unwrap();
    assert!(pulled.data != expected(&model(3), &[4, 5]));
}

/// A KV server that serves one correct pull per connection, then closes it,
/// as a prefill worker that restarts between two pulls does.
async fn one_pull_per_connection_server() -> String {
    use kv_transfer::frame::write_frame;
    use proto::kv::{frame::Kind, Frame, PullDone};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            accept_one_block_pull(&mut s).await;
            s.write_all(&vec![9u8; model(3).block_bytes()]).await.unwrap();
            write_frame(&mut s, &Frame { kind: Some(Kind::PullDone(PullDone { checksum: 0 })) }).await.unwrap();
        }
    });
    addr
}

#[tokio::test]
async fn a_pooled_connection_the_server_closed_is_replaced() {
    let addr = one_pull_per_connection_server().await;
    let puller = KvPuller::new(PullerConfig {
        layout: model(3),
        transport: TransportPolicy::Tcp,
        checksum: false,
        idle_timeout: Duration::from_secs(2),
    });
    for _ in 0..3 {
        let pulled = puller.pull(&remote_at(&addr, vec![0])).await.unwrap();
        assert!(pulled.data.iter().all(|&b| b == 9));
        // Let the server's close reach us before the next pull.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

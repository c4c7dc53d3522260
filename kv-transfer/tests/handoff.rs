//! Pull, release, expiry and refusal over real loopback TCP with a fake engine.

use kv_transfer::connector::ConnectorConfig;
use kv_transfer::{pull_blocks, BlockSource, KvConnector, KvDtype, KvLayout, KvTransferError, PinStats};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

fn layout() -> KvLayout {
    KvLayout { num_layers: 2, num_kv_heads: 1, head_dim: 4, dtype: KvDtype::F32, block_size: 2, tp_size: 1, tp_rank: 0 }
}

/// A fake engine whose block `i` is filled with the byte `i`, and which records releases.
#[derive(Default)]
struct FakeEngine {
    released: Mutex<BTreeSet<u32>>,
}

impl BlockSource for FakeEngine {
    fn layout(&self) -> KvLayout {
        layout()
    }
    fn read_blocks(&self, ids: &[u32], out: &mut Vec<u8>) -> Result<(), String> {
        for &id in ids {
            out.extend(std::iter::repeat_n(id as u8, layout().block_bytes()));
        }
        Ok(())
    }
    fn release_blocks(&self, ids: &[u32]) {
        let mut released = self.released.lock().unwrap();
        for id in ids {
            assert!(released.insert(*id), "block {id} released twice");
        }
    }
}

async fn start(pin_timeout: Duration) -> (KvConnector, Arc<FakeEngine>) {
    let engine = Arc::new(FakeEngine::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = ConnectorConfig { engine_id: "prefill-a".into(), advertise_host: "127.0.0.1".into(), pin_timeout };
    let connector = KvConnector::start(listener, config, engine.clone() as Arc<dyn BlockSource>).unwrap();
    (connector, engine)
}

#[tokio::test]
async fn pull_returns_the_blocks_and_releases_them() {
    let (connector, engine) = start(Duration::from_secs(30)).await;
    let remote = connector.pin("req-1", vec![5, 2], 3);
    assert_eq!(connector.stats(), PinStats { requests: 1, blocks: 2 });
    let data = pull_blocks(&remote, &layout(), Duration::from_secs(5)).await.unwrap();
    let n = layout().block_bytes();
    assert_eq!(data.len(), 2 * n);
    assert!(data[..n].iter().all(|&b| b == 5) && data[n..].iter().all(|&b| b == 2));
    assert_eq!(connector.stats(), PinStats::default());
    assert_eq!(*engine.released.lock().unwrap(), BTreeSet::from([2, 5]));
    // A second pull of the same hand-off is refused: the blocks are gone.
    let err = pull_blocks(&remote, &layout(), Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(err, KvTransferError::Refused { .. }), "{err}");
}

#[tokio::test]
async fn unpulled_pins_expire() {
    let (connector, engine) = start(Duration::from_millis(300)).await;
    connector.pin("req-1", vec![1, 3, 4], 5);
    assert_eq!(connector.stats().blocks, 3);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(connector.stats(), PinStats::default());
    assert_eq!(*engine.released.lock().unwrap(), BTreeSet::from([1, 3, 4]));
}

#[tokio::test]
async fn release_frees_at_once_and_only_once() {
    let (connector, engine) = start(Duration::from_secs(30)).await;
    connector.pin("req-1", vec![7], 1);
    assert!(connector.release("req-1"));
    assert!(!connector.release("req-1"));
    assert_eq!(*engine.released.lock().unwrap(), BTreeSet::from([7]));
}

#[tokio::test]
async fn mismatched_layout_is_refused_with_the_difference() {
    let (connector, engine) = start(Duration::from_secs(30)).await;
    let remote = connector.pin("req-1", vec![0], 1);
    let theirs = KvLayout { num_kv_heads: 2, dtype: KvDtype::Bf16, ..layout() };
    let err = pull_blocks(&remote, &theirs, Duration::from_secs(5)).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("num_kv_heads 1 vs 2") && msg.contains("dtype f32 vs bf16"), "{msg}");
    // Refusal leaves the pin in place for a compatible puller.
    assert_eq!(connector.stats().blocks, 1);
    assert!(engine.released.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_dead_peer_fails_fast() {
    let (connector, _engine) = start(Duration::from_secs(30)).await;
    let mut remote = connector.pin("req-1", vec![0], 1);
    // Nothing listens on the port of a listener we drop.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    remote.remote_port = dead.local_addr().unwrap().port();
    drop(dead);
    let err = pull_blocks(&remote, &layout(), Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(err, KvTransferError::Io { .. }), "{err}");
}

//! Faults under load on the real model: a prefill worker, a decode worker
//! and a router replica killed with SIGKILL mid-flight, and a prefill worker
//! that stalls (frozen with SIGSTOP: its gRPC and kv-transfer sockets stay
//! open and answer nothing). For each, every request ends within 10 s of
//! the fault with a complete answer or a clean error, the survivors keep
//! serving, and no sequence runs and no KV block stays pinned afterwards.

// Each test holds its turn (a std mutex) while its processes run, awaits included.
#![allow(clippy::await_holding_lock)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tests::process::Process;
use tests::{start_decode, start_prefill_with, start_router, take_turn, worker_stats};
use tokio::task::JoinHandle;

/// How long after a fault every request must have ended.
const ENDS_WITHIN: Duration = Duration::from_secs(10);
const MAX_TOKENS: u64 = 16;
/// Pins of hand-offs no decode worker will pull free after this.
const KV_LEASE_MS: &str = "3000";

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    /// Every token, `finish_reason: "length"`.
    Complete,
    /// An OpenAI-shaped error, a `finish_reason: "error"`, or the connection
    /// closed by a router that died: the client knows it failed.
    CleanError(String),
    /// Anything else: a truncated stream that claims success, garbage.
    Broken(String),
}

/// One streamed completion; `started` is told when its first chunk arrives.
async fn streamed(router: String, i: usize, started: tokio::sync::mpsc::UnboundedSender<()>) -> Ending {
    let body = json!({"prompt": format!("Request {i}: tell me about the number {i}."), "max_tokens": MAX_TOKENS,
                      "ignore_eos": true, "stream": true});
    let response = match reqwest::Client::new().post(format!("{router}/v1/completions")).json(&body).send().await {
        Ok(response) => response,
        Err(e) => return Ending::CleanError(format!("connect: {e}")),
    };
    if response.status() != 200 {
        let error: Value = response.json().await.unwrap_or_default();
        return match error["error"]["message"].as_str() {
            Some(message) => Ending::CleanError(message.to_owned()),
            None => Ending::Broken(format!("an error without an OpenAI body: {error}")),
        };
    }
    let mut bytes = response.bytes_stream();
    let mut body = String::new();
    let mut told = false;
    while let Some(chunk) = bytes.next().await {
        match chunk {
            Ok(chunk) => body.push_str(&String::from_utf8_lossy(&chunk)),
            Err(e) => return Ending::CleanError(format!("connection closed mid-stream: {e}")),
        }
        if !told && body.contains("\"text\"") {
            told = true;
            let _ = started.send(());
        }
    }
    let events: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    if events.last() != Some(&"[DONE]") {
        return Ending::Broken(format!("no [DONE]: {body}"));
    }
    let chunks: Vec<Value> = events.iter().filter_map(|e| serde_json::from_str(e).ok()).collect();
    if let Some(error) = chunks.iter().find_map(|c| c["error"]["message"].as_str()) {
        return Ending::CleanError(error.to_owned());
    }
    let finish: Vec<&str> = chunks.iter().filter_map(|c| c["choices"][0]["finish_reason"].as_str()).collect();
    match finish.as_slice() {
        ["length"] => Ending::Complete,
        ["error"] => Ending::CleanError("finish_reason error".into()),
        other => Ending::Broken(format!("finish reasons {other:?}")),
    }
}

/// `count` streams against `router`, and a receiver told of each first chunk.
fn launch(
    router: &Process,
    first: usize,
    count: usize,
) -> (Vec<JoinHandle<Ending>>, tokio::sync::mpsc::UnboundedReceiver<()>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let handles =
        (first..first + count).map(|i| tokio::spawn(streamed(router.url().to_owned(), i, tx.clone()))).collect();
    (handles, rx)
}

/// Waits for `n` first chunks: the load is in flight.
async fn in_flight(started: &mut tokio::sync::mpsc::UnboundedReceiver<()>, n: usize) {
    for _ in 0..n {
        tokio::time::timeout(Duration::from_secs(120), started.recv()).await.expect("requests never started");
    }
}

/// Every request's ending, failing any that runs past `deadline`.
async fn endings(handles: Vec<JoinHandle<Ending>>, deadline: Instant) -> Vec<Ending> {
    let mut endings = Vec::new();
    for handle in handles {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, handle).await {
            Ok(ending) => endings.push(ending.expect("request task")),
            Err(_) => panic!("a request was still running {ENDS_WITHIN:?} after the fault; so far {endings:?}"),
        }
    }
    let broken: Vec<&Ending> = endings.iter().filter(|e| matches!(e, Ending::Broken(_))).collect();
    assert!(broken.is_empty(), "{broken:?}");
    endings
}

/// The survivors serve `count` fresh requests completely.
async fn survivors_serve(router: &Process, count: usize) {
    let (handles, _started) = launch(router, 1000, count);
    let endings = endings(handles, Instant::now() + Duration::from_secs(120)).await;
    assert!(endings.iter().all(|e| *e == Ending::Complete), "after the fault: {endings:?}");
}

/// No sequence runs and no block stays pinned on these workers, soon.
async fn nothing_held(workers: &[&Process]) {
    let deadline = Instant::now() + ENDS_WITHIN;
    for worker in workers {
        loop {
            let stats = worker_stats(worker.url()).await;
            if (stats.num_sequences, stats.pinned_blocks, stats.pinned_requests) == (0, 0, 0) {
                break;
            }
            assert!(Instant::now() < deadline, "{} still holds work: {stats:?}", worker.url());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Twelve streams through `router`, `fault` once two are under way; then
/// every stream's end within [`ENDS_WITHIN`], fresh requests served whole,
/// and nothing `held` on the surviving workers.
async fn under_load(router: &Process, fault_name: &str, fault: impl FnOnce(), held: &[&Process]) {
    let (handles, mut started) = launch(router, 0, 12);
    in_flight(&mut started, 2).await;
    fault();
    let endings = endings(handles, Instant::now() + ENDS_WITHIN).await;
    println!("{fault_name}: {endings:?}");
    survivors_serve(router, 4).await;
    nothing_held(held).await;
}

fn prefill() -> Process {
    start_prefill_with("127.0.0.1:0", &["--kv-lease-ms", KV_LEASE_MS])
}

/// Every prompt handed off, so every request crosses both pools.
const HAND_OFF: [&str; 2] = ["--local-prefill-max-tokens", "0"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefill_worker_killed_mid_flight() {
    let _turn = take_turn();
    let (mut doomed, survivor, decode) = (prefill(), prefill(), start_decode());
    let router = start_router(&[&doomed, &survivor], &[&decode], &HAND_OFF);
    under_load(&router, "prefill killed", || doomed.kill(), &[&survivor, &decode]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_decode_worker_killed_mid_flight() {
    let _turn = take_turn();
    let (prefill, mut doomed, survivor) = (prefill(), start_decode(), start_decode());
    let router = start_router(&[&prefill], &[&doomed, &survivor], &HAND_OFF);
    under_load(&router, "decode killed", || doomed.kill(), &[&prefill, &survivor]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_router_replica_killed_mid_flight() {
    let _turn = take_turn();
    let (prefill, decode) = (prefill(), start_decode());
    let mut doomed = start_router(&[&prefill], &[&decode], &HAND_OFF);
    let survivor = start_router(&[&prefill], &[&decode], &HAND_OFF);
    let (cut, mut started) = launch(&doomed, 0, 8);
    let (kept, _) = launch(&survivor, 100, 4);
    in_flight(&mut started, 2).await;
    doomed.kill();
    let deadline = Instant::now() + ENDS_WITHIN;
    let cut = endings(cut, deadline).await;
    let kept = endings(kept, deadline).await;
    println!("router killed: {cut:?}; the other replica: {kept:?}");
    assert!(kept.iter().all(|e| *e == Ending::Complete), "the other replica's requests: {kept:?}");
    survivors_serve(&survivor, 4).await;
    // The dead router's streams were cancelled with its connections: the
    // workers stop their sequences and free their pins.
    nothing_held(&[&prefill, &decode]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_prefill_worker_mid_flight() {
    let _turn = take_turn();
    let (stalled, survivor, decode) = (prefill(), prefill(), start_decode());
    let router = start_router(&[&stalled, &survivor], &[&decode], &HAND_OFF);
    under_load(&router, "prefill stalled", || stalled.freeze(), &[&survivor, &decode]).await;
    // Thawed, it frees what it held for hand-offs nobody will pull.
    stalled.thaw();
    nothing_held(&[&stalled]).await;
}

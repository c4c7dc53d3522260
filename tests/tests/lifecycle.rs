//! How processes live and stop: `/health`, `/ready`, `/metrics` on every
//! worker (valid for `promtool check metrics`), and the drain on SIGTERM.

// Each test holds its turn (a std mutex) while its processes run, awaits included.
#![allow(clippy::await_holding_lock)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tests::metrics::{sample, scrape};
use tests::{start_decode_with, start_prefill_with, start_router};

async fn status(url: &str) -> u16 {
    reqwest::get(url).await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// `promtool check metrics` on `text`: its complaints, empty when valid.
fn promtool(text: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus; scripts/setup.sh installs it)");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write metrics");
    let out = child.wait_with_output().expect("promtool ran");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        String::new()
    } else {
        said
    }
}

/// A stream that runs for a while: `max_tokens` tokens, eos ignored.
async fn long_stream(router: &str, max_tokens: usize) -> reqwest::Response {
    let body = json!({"messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": max_tokens,
                      "ignore_eos": true, "stream": true});
    let response =
        reqwest::Client::new().post(format!("{router}/v1/chat/completions")).json(&body).send().await.expect("POST");
    assert_eq!(response.status(), 200);
    response
}

/// Waits off the runtime for `process` to exit within `limit`; the process
/// is killed on drop if it still runs.
async fn exit_within(mut process: tests::process::Process, limit: Duration) -> Option<std::process::ExitStatus> {
    tokio::task::spawn_blocking(move || process.wait_exit(limit)).await.expect("waiter")
}

/// Content chunks seen before a test signals a worker: the first comes from
/// the prefill worker, the later ones show the decode worker is generating.
const CHUNKS_BEFORE_SIGNAL: usize = 3;

/// Reads SSE events until the stream ends; counts content chunks, keeps the
/// finish reason. Tells `started` after [`CHUNKS_BEFORE_SIGNAL`] chunks.
async fn drain(response: reqwest::Response, started: tokio::sync::oneshot::Sender<()>) -> (usize, Option<String>) {
    let mut started = Some(started);
    let (mut chunks, mut finish, mut buffer) = (0, None, String::new());
    let mut body = response.bytes_stream();
    while let Some(piece) = body.next().await {
        let Ok(piece) = piece else { break };
        buffer.push_str(&String::from_utf8_lossy(&piece));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data:")).map(str::trim) else { continue };
            let Ok(chunk) = serde_json::from_str::<Value>(data) else { continue };
            let choice = &chunk["choices"][0];
            if choice["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
                chunks += 1;
                if chunks >= CHUNKS_BEFORE_SIGNAL {
                    if let Some(tx) = started.take() {
                        let _ = tx.send(());
                    }
                }
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = Some(reason.to_owned());
            }
        }
    }
    (chunks, finish)
}

#[tokio::test]
async fn every_worker_serves_health_readiness_and_metrics_that_promtool_accepts() {
    let _turn = tests::take_turn();
    let prefill = start_prefill_with("127.0.0.1:0", &[]);
    let decode = start_decode_with(&[]);
    let router = start_router(&[&prefill], &[&decode], &["--local-prefill-max-tokens", "0"]);
    let body = json!({"prompt": "The capital of France is", "max_tokens": 8});
    let answer = reqwest::Client::new().post(format!("{}/v1/completions", router.url())).json(&body).send().await;
    assert_eq!(answer.expect("POST").status(), 200);

    for (worker, role) in [(&prefill, "prefill"), (&decode, "decode")] {
        let face = worker.health_url();
        assert_eq!(status(&format!("{face}/health")).await, 200, "{role} /health");
        assert_eq!(status(&format!("{face}/ready")).await, 200, "{role} /ready");
        let text = scrape(&face).await;
        assert_eq!(promtool(&text), "", "{role} /metrics:\n{text}");
        let labels = [("role", role)];
        assert!(sample(&text, "pdserve_worker_kv_blocks", &labels) > 0.0, "{text}");
        for demand in ["queued_prefill_tokens", "running_sequences", "waiting_sequences", "kv_usage_ratio"] {
            assert!(text.contains(&format!("pdserve_worker_{demand}{{role=\"{role}\"}}")), "{demand}:\n{text}");
        }
    }
    let text = scrape(router.url()).await;
    assert_eq!(promtool(&text), "", "router /metrics:\n{text}");
}

#[tokio::test]
async fn a_decode_worker_finishes_its_streams_after_sigterm_then_exits() {
    let _turn = tests::take_turn();
    let prefill = start_prefill_with("127.0.0.1:0", &[]);
    let decode = start_decode_with(&["--shutdown-grace-secs", "60"]);
    let router = start_router(&[&prefill], &[&decode], &["--local-prefill-max-tokens", "0"]);
    let face = decode.health_url();

    // Long enough that the drain outlasts the polling of `/ready` below.
    const TOKENS: usize = 400;
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let stream = tokio::spawn(drain(long_stream(router.url(), TOKENS).await, first_tx));
    first_rx.await.expect("the decode worker generating");
    decode.send_sigterm();
    // Draining: not ready, still finishing what it runs.
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(&format!("{face}/ready")).await != 503 {
        assert!(Instant::now() < deadline, "/ready did not turn 503 after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (chunks, finish) = stream.await.expect("stream task");
    assert_eq!(finish.as_deref(), Some("length"), "the stream was cut after {chunks} chunks");
    // Chunks carry at least a token each; the prefill's first token is one of them.
    assert!(chunks >= TOKENS / 2, "{chunks} content chunks for {TOKENS} tokens");
    let exit = exit_within(decode, Duration::from_secs(20)).await.expect("the drained worker exits");
    assert!(exit.success(), "{exit}");
}

#[tokio::test]
async fn a_stream_longer_than_the_grace_period_does_not_keep_the_worker_alive() {
    let _turn = tests::take_turn();
    let prefill = start_prefill_with("127.0.0.1:0", &[]);
    let decode = start_decode_with(&["--shutdown-grace-secs", "1"]);
    let router = start_router(&[&prefill], &[&decode], &["--local-prefill-max-tokens", "0"]);

    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    // Thousands of tokens: minutes of decoding on this engine in a test build.
    let stream = tokio::spawn(drain(long_stream(router.url(), 6000).await, first_tx));
    first_rx.await.expect("the decode worker generating");
    let signalled = Instant::now();
    decode.send_sigterm();
    let exit = exit_within(decode, Duration::from_secs(15)).await;
    assert!(exit.is_some(), "still running 15 s after SIGTERM with a 1 s grace period");
    let took = signalled.elapsed();
    assert!(took >= Duration::from_millis(900), "exited after {took:?}, before its grace period");
    // The client sees the end of its stream: an error, never a hang.
    let (chunks, finish) = tokio::time::timeout(Duration::from_secs(10), stream)
        .await
        .expect("the client's stream ends once the worker is gone")
        .expect("stream task");
    assert_ne!(finish.as_deref(), Some("length"), "6000 tokens in {chunks} chunks cannot have finished");
}

#[tokio::test]
async fn the_router_finishes_its_streams_after_sigterm_and_refuses_new_requests() {
    let _turn = tests::take_turn();
    let prefill = start_prefill_with("127.0.0.1:0", &[]);
    let decode = start_decode_with(&[]);
    let router = start_router(&[&prefill], &[&decode], &["--local-prefill-max-tokens", "0"]);
    let url = router.url().to_owned();

    const TOKENS: usize = 400;
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let stream = tokio::spawn(drain(long_stream(&url, TOKENS).await, started_tx));
    started.await.expect("the decode worker generating");
    router.send_sigterm();
    // Draining: not ready, new connections refused or answered 503, the running stream goes on.
    let deadline = Instant::now() + Duration::from_secs(5);
    while status(&format!("{url}/ready")).await == 200 {
        assert!(Instant::now() < deadline, "/ready still 200 after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (chunks, finish) = stream.await.expect("stream task");
    assert_eq!(finish.as_deref(), Some("length"), "the stream was cut after {chunks} chunks");
    let exit = exit_within(router, Duration::from_secs(20)).await.expect("the drained router exits");
    assert!(exit.success(), "{exit}");
}

/// With the only decode worker of a static list killed, `/ready` turns 503 without any request
/// having to fail first: its KV event stream, which cache-aware placement follows, ends.
#[tokio::test]
async fn ready_turns_503_when_the_only_decode_worker_dies() {
    let _turn = tests::take_turn();
    let mut decode = start_decode_with(&[]);
    let router = start_router(&[], &[&decode], &[]);
    let url = router.url().to_owned();
    assert_eq!(status(&format!("{url}/ready")).await, 200);
    decode.kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&format!("{url}/ready")).await == 200 {
        assert!(Instant::now() < deadline, "/ready still 200 with no decode worker alive");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, body) = {
        let response = reqwest::get(format!("{url}/ready")).await.unwrap();
        (response.status().as_u16(), response.json::<Value>().await.unwrap())
    };
    assert_eq!((code, body["error"]["code"].as_str()), (503, Some("no_worker")), "{body}");
}

//! Placement over real processes: prefix affinity from the workers' KV
//! event streams, cache-salt isolation, router replicas that agree, a
//! restarted router that rebuilds its index, retries around a dead prefill
//! worker, and a decode worker that dies mid-stream.

// Each test holds the cluster turn (a std mutex) for its whole run: tests
// run on their own runtimes and no task awaits the lock, so it cannot deadlock.
#![allow(clippy::await_holding_lock)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use tests::metrics::{scrape, value};
use tests::{start_decode, start_prefill, start_router, take_turn};

const HIT_BLOCKS: &str = "pdserve_router_prefix_hit_blocks_total";
const CACHED_TOKENS: &str = "pdserve_router_prefix_cached_tokens_total";
const PLACEMENTS: &str = "pdserve_router_placements_total";
const WORKER_UP: &str = "pdserve_router_worker_up";
const WORKER_BLOCKS: &str = "pdserve_router_worker_cached_blocks";

/// A prompt of a few hundred tokens whose first block is `topic`'s own.
fn prompt(topic: &str, turns: usize) -> String {
    let mut text = format!("{topic}. A long conversation follows about {topic}, kept for the record.\n");
    for turn in 0..turns {
        text.push_str(&format!(
            "Turn {turn}: the user asks about {topic} again, and the assistant answers with care, \
             listing facts, caveats and sources in order, so the text keeps growing.\n"
        ));
    }
    text
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_up(router: &str, pool: &str, workers: usize) {
    for w in 0..workers {
        let worker = w.to_string();
        wait_until(&format!("{pool} worker {w} up in {router}"), Duration::from_secs(20), || {
            let worker = worker.clone();
            async move { value(router, WORKER_UP, &[("pool", pool), ("worker", &worker)]).await == 1.0 }
        })
        .await;
    }
}

/// One prefill-only completion (the first token finishes it); returns the
/// prefill worker placement chose.
async fn place(router: &str, text: &str, salt: Option<&str>, workers: usize) -> usize {
    let before = placements(router, workers).await;
    let mut body = json!({"prompt": text, "max_tokens": 1, "temperature": 0});
    if let Some(salt) = salt {
        body["cache_salt"] = json!(salt);
    }
    let response = reqwest::Client::new()
        .post(format!("{router}/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("POST /v1/completions");
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap_or_default());
    let after = placements(router, workers).await;
    let moved: Vec<usize> = (0..workers).filter(|&w| after[w] != before[w]).collect();
    assert_eq!(moved.len(), 1, "one prefill placement per request: {before:?} -> {after:?}");
    moved[0]
}

async fn placements(router: &str, workers: usize) -> Vec<f64> {
    let text = scrape(router).await;
    (0..workers)
        .map(|w| tests::metrics::sample(&text, PLACEMENTS, &[("pool", "prefill"), ("worker", &w.to_string())]))
        .collect()
}

async fn cached_blocks(router: &str, workers: usize) -> Vec<f64> {
    let text = scrape(router).await;
    (0..workers)
        .map(|w| tests::metrics::sample(&text, WORKER_BLOCKS, &[("pool", "prefill"), ("worker", &w.to_string())]))
        .collect()
}

/// Waits until `router`'s index of the prefill pool holds exactly `want`.
async fn wait_same_index(router: &str, want: &[f64]) {
    let want = want.to_vec();
    wait_until(&format!("{router}'s index to hold {want:?}"), Duration::from_secs(20), || {
        let want = want.clone();
        async move { cached_blocks(router, want.len()).await == want }
    })
    .await;
}

#[tokio::test]
async fn affinity_follows_the_cached_prefix_and_never_crosses_salts() {
    let _turn = take_turn();
    let prefill = [start_prefill("127.0.0.1:0"), start_prefill("127.0.0.1:0")];
    let decode = start_decode();
    let router = start_router(&[&prefill[0], &prefill[1]], &[&decode], &["--local-prefill-max-tokens", "0"]);
    let url = router.url();
    wait_up(url, "prefill", 2).await;

    let text = prompt("tidal energy", 6);
    let home = place(url, &text, Some("tenant-a"), 2).await;
    wait_until("the index to see the prompt's blocks", Duration::from_secs(10), || async {
        cached_blocks(url, 2).await[home] >= 10.0
    })
    .await;
    for _ in 0..3 {
        let hits = value(url, HIT_BLOCKS, &[]).await;
        let cached = value(url, CACHED_TOKENS, &[]).await;
        assert_eq!(place(url, &text, Some("tenant-a"), 2).await, home, "the same tenant's prompt goes home");
        assert!(value(url, HIT_BLOCKS, &[]).await - hits >= 10.0, "placement credited the cached blocks");
        assert!(value(url, CACHED_TOKENS, &[]).await - cached >= 160.0, "and the worker did serve them cached");
    }

    // The same text under another salt: no credit, and no cached tokens served.
    let hits = value(url, HIT_BLOCKS, &[]).await;
    let cached = value(url, CACHED_TOKENS, &[]).await;
    place(url, &text, Some("tenant-b"), 2).await;
    assert_eq!(value(url, HIT_BLOCKS, &[]).await, hits, "no affinity credit for another tenant's blocks");
    assert_eq!(value(url, CACHED_TOKENS, &[]).await, cached, "and no prefix shared across salts");
}

#[tokio::test]
async fn replicas_agree_and_a_restarted_router_rebuilds_its_index_from_the_workers() {
    let _turn = take_turn();
    let prefill = [start_prefill("127.0.0.1:0"), start_prefill("127.0.0.1:0")];
    let decode = start_decode();
    let workers = [&prefill[0], &prefill[1]];
    let flags = ["--local-prefill-max-tokens", "0"];
    let mut a = start_router(&workers, &[&decode], &flags);
    let b = start_router(&workers, &[&decode], &flags);
    for router in [a.url(), b.url()] {
        wait_up(router, "prefill", 2).await;
    }

    let topics = ["volcanoes", "medieval trade", "compilers", "coral reefs", "jazz harmony", "orbital mechanics"];
    let mut homes = Vec::new();
    for topic in topics {
        homes.push(place(a.url(), &prompt(topic, 4), None, 2).await);
    }
    assert!(homes.contains(&0) && homes.contains(&1), "new conversations spread: {homes:?}");
    // Both replicas follow the same streams: once A's index settles, B's matches.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let view = cached_blocks(a.url(), 2).await;
    wait_same_index(b.url(), &view).await;

    for (topic, home) in topics.iter().zip(&homes) {
        let next_turn = prompt(topic, 5);
        let on_a = place(a.url(), &next_turn, None, 2).await;
        let on_b = place(b.url(), &next_turn, None, 2).await;
        assert_eq!((on_a, on_b), (*home, *home), "{topic}: both replicas send the next turn home");
    }

    // A router that restarts has nothing but the workers to rebuild from.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let view = cached_blocks(b.url(), 2).await;
    a.kill();
    let a = start_router(&workers, &[&decode], &flags);
    wait_same_index(a.url(), &view).await;
    for (topic, home) in topics.iter().zip(&homes) {
        assert_eq!(place(a.url(), &prompt(topic, 6), None, 2).await, *home, "{topic} after the restart");
    }
}

#[tokio::test]
async fn a_dead_prefill_worker_is_retried_around_then_probed_back() {
    let _turn = take_turn();
    let mut prefill = [start_prefill("127.0.0.1:0"), start_prefill("127.0.0.1:0")];
    let decode = start_decode();
    // Round-robin keeps sending every other request to the dead worker, so
    // each of those must be saved by the retry.
    let round_robin = start_router(
        &[&prefill[0], &prefill[1]],
        &[&decode],
        &["--policy", "round-robin", "--local-prefill-max-tokens", "0"],
    );
    let cache_aware = start_router(&[&prefill[0], &prefill[1]], &[&decode], &["--local-prefill-max-tokens", "0"]);
    wait_up(cache_aware.url(), "prefill", 2).await;
    let dead_addr = prefill[0].url().trim_start_matches("http://").to_string();
    prefill[0].kill();

    let client = reqwest::Client::new();
    for i in 0..6 {
        let body = json!({"prompt": format!("Request {i}: say something."), "max_tokens": 3, "temperature": 0});
        let response = client.post(format!("{}/v1/completions", round_robin.url())).json(&body).send().await.unwrap();
        let status = response.status();
        let answer: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "request {i} must be retried on the live worker: {answer}");
        assert_eq!(answer["usage"]["completion_tokens"], 3);
    }

    let down = [("pool", "prefill"), ("worker", "0")];
    wait_until("the dead worker to be marked down", Duration::from_secs(10), || async {
        value(cache_aware.url(), WORKER_UP, &down).await == 0.0
    })
    .await;
    // The follower keeps probing: a worker back on the same address is used again.
    let _back = start_prefill(&dead_addr);
    wait_until("the restarted worker to be probed back", Duration::from_secs(20), || async {
        value(cache_aware.url(), WORKER_UP, &down).await == 1.0
    })
    .await;
}

#[tokio::test]
async fn a_decode_worker_dying_mid_stream_ends_the_stream_with_an_error() {
    let _turn = take_turn();
    let prefill = start_prefill("127.0.0.1:0");
    let mut decode = start_decode();
    let router = start_router(&[&prefill], &[&decode], &["--local-prefill-max-tokens", "0"]);
    let body = json!({
        "messages": [{"role": "user", "content": "Count from one to a thousand."}],
        "max_tokens": 3000, "ignore_eos": true, "temperature": 0, "stream": true,
    });
    let response =
        reqwest::Client::new().post(format!("{}/v1/chat/completions", router.url())).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    let mut text = String::new();
    let mut killed_at = None;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(chunk) = bytes.next().await {
            text.push_str(std::str::from_utf8(&chunk.expect("the stream ends cleanly, not with a reset")).unwrap());
            if killed_at.is_none() && text.matches("\"content\"").count() > 10 {
                decode.kill();
                killed_at = Some(Instant::now());
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream must end, not hang");
    let killed_at = killed_at.expect("the stream produced tokens before the kill");
    assert!(killed_at.elapsed() < Duration::from_secs(10), "ended {:?} after the kill", killed_at.elapsed());
    let events: Vec<&str> = text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect();
    let (done, rest) = events.split_last().unwrap();
    assert_eq!(*done, "[DONE]");
    let (error, rest) = rest.split_last().unwrap();
    let error: Value = serde_json::from_str(error).unwrap();
    assert!(error["error"]["message"].is_string(), "an OpenAI error event: {error}");
    let last: Value = serde_json::from_str(rest.last().unwrap()).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "error", "{last}");

    // The next request gets a clean error at once, not a hang.
    let body = json!({"prompt": "Hello", "max_tokens": 4});
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        reqwest::Client::new().post(format!("{}/v1/completions", router.url())).json(&body).send(),
    )
    .await
    .expect("no hang")
    .unwrap();
    assert!(response.status().is_server_error(), "{}", response.status());
    drop(prefill);
}

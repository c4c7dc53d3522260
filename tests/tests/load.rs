//! Load through a whole disaggregated cluster of mock workers (the instant
//! mock engine: the router, gRPC and the workers' plumbing are what is
//! measured): 5,000 requests at concurrency 128 with none lost, no 5xx, and
//! the router's memory flat afterwards. Then a smaller run on the real model,
//! after which no sequence runs and no KV block stays pinned. Prints its
//! figures.

// The test holds its turn (a std mutex) while its processes run, awaits included.
#![allow(clippy::await_holding_lock)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use tests::process::Process;
use tests::{model_path, sse, start_decode, start_prefill, start_router, take_turn, worker_stats};

const REQUESTS: usize = 5_000;
const CONCURRENCY: usize = 128;
const MAX_TOKENS: u64 = 8;

/// What one request ended as.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Ending {
    Complete,
    Status(u16),
    Broken(String),
}

/// Request `i`: chat or completion, streamed or not, one or two choices.
async fn one(client: &reqwest::Client, router: &str, i: usize, max_tokens: u64) -> (Ending, Duration) {
    let started = Instant::now();
    let n = 1 + (i % 2) as u64;
    let stream = i.is_multiple_of(3);
    let (path, mut body) = if i % 4 < 2 {
        ("chat/completions", json!({"messages": [{"role": "user", "content": format!("Question {i}?")}]}))
    } else {
        ("completions", json!({"prompt": format!("Prompt number {i} says")}))
    };
    body["max_tokens"] = json!(max_tokens);
    // The real model may stop early; the mock always runs to max_tokens.
    body["ignore_eos"] = json!(true);
    body["n"] = json!(n);
    body["stream"] = json!(stream);
    let response = match client.post(format!("{router}/v1/{path}")).json(&body).send().await {
        Ok(response) => response,
        Err(e) => return (Ending::Broken(e.to_string()), started.elapsed()),
    };
    if response.status() != 200 {
        return (Ending::Status(response.status().as_u16()), started.elapsed());
    }
    let complete = if stream {
        let chunks = sse::chunks(response).await;
        let finished = chunks.iter().filter(|c| c["choices"][0]["finish_reason"] == "length").count();
        finished as u64 == n
    } else {
        let answer: Value = response.json().await.unwrap_or_default();
        answer["usage"]["completion_tokens"] == json!(n * max_tokens)
            && answer["choices"].as_array().is_some_and(|c| c.len() as u64 == n)
    };
    let ending = if complete { Ending::Complete } else { Ending::Broken("incomplete answer".into()) };
    (ending, started.elapsed())
}

/// Runs `count` requests, `concurrency` at a time; returns how they ended and their latencies.
async fn run(
    router: &str,
    first: usize,
    count: usize,
    concurrency: usize,
    max_tokens: u64,
) -> (BTreeMap<Ending, usize>, Vec<Duration>, Duration) {
    let client = Arc::new(reqwest::Client::builder().pool_max_idle_per_host(concurrency).build().unwrap());
    let started = Instant::now();
    let results: Vec<(Ending, Duration)> = stream::iter(first..first + count)
        .map(|i| {
            let client = client.clone();
            let router = router.to_owned();
            async move { one(&client, &router, i, max_tokens).await }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let wall = started.elapsed();
    let mut endings = BTreeMap::new();
    let mut latencies = Vec::with_capacity(results.len());
    for (ending, latency) in results {
        *endings.entry(ending).or_default() += 1;
        latencies.push(latency);
    }
    latencies.sort();
    (endings, latencies, wall)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_thousand_requests_at_concurrency_128_lose_nothing() {
    let _turn = take_turn();
    let model = model_path();
    let model = model.to_str().unwrap();
    let prefill = Process::start("prefill-worker", &["--mock", "--listen", "127.0.0.1:0", "--model", model]);
    let decode = Process::start("decode-worker", &["--mock", "--listen", "127.0.0.1:0", "--model", model]);
    // Hand every prompt off: both legs carry the load.
    let router = start_router(&[&prefill], &[&decode], &["--local-prefill-max-tokens", "0"]);

    // Warm-up: connection pools, allocator arenas, the tokenizer's caches.
    let (warm, _, _) = run(router.url(), 0, 1_000, CONCURRENCY, MAX_TOKENS).await;
    assert_eq!(warm.keys().collect::<Vec<_>>(), [&Ending::Complete], "warm-up: {warm:?}");
    let rss_before = router.rss_bytes();

    let (endings, latencies, wall) = run(router.url(), 1_000, REQUESTS, CONCURRENCY, MAX_TOKENS).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = router.rss_bytes();
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "load: {REQUESTS} requests at concurrency {CONCURRENCY} in {:.1} s ({:.0} req/s); latency p50 {:?} p99 {:?} max {:?}; \
         router RSS {:.1} MiB -> {:.1} MiB",
        wall.as_secs_f64(),
        REQUESTS as f64 / wall.as_secs_f64(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap(),
        mib(rss_before),
        mib(rss_after),
    );
    assert_eq!(endings.get(&Ending::Complete), Some(&REQUESTS), "every request complete: {endings:?}");
    // Memory flat: a leak of even 2 KiB per request would show as 10 MiB.
    assert!(
        rss_after < rss_before + (8 << 20),
        "router RSS grew from {:.1} MiB to {:.1} MiB over {REQUESTS} requests",
        mib(rss_before),
        mib(rss_after)
    );
    // The router still answers, and counted no server error.
    let metrics = reqwest::get(format!("{}/metrics", router.url())).await.unwrap().text().await.unwrap();
    let server_errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("pdserve_router_requests_total") && l.contains("status=\"5"))
        .collect();
    assert!(server_errors.is_empty(), "{server_errors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_real_model_serves_a_smaller_load_and_frees_every_block() {
    const COUNT: usize = 96;
    const AT_ONCE: usize = 16;
    let _turn = take_turn();
    let prefill = start_prefill("127.0.0.1:0");
    let decode = start_decode();
    let router = start_router(&[&prefill], &[&decode], &["--local-prefill-max-tokens", "0"]);
    let (endings, latencies, wall) = run(router.url(), 0, COUNT, AT_ONCE, 4).await;
    println!(
        "load (real model): {COUNT} requests at concurrency {AT_ONCE} in {:.1} s ({:.1} req/s); latency p50 {:?} p99 {:?}",
        wall.as_secs_f64(),
        COUNT as f64 / wall.as_secs_f64(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
    );
    assert_eq!(endings.get(&Ending::Complete), Some(&COUNT), "every request complete: {endings:?}");
    // Released pins travel back asynchronously: give them a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (p, d) = (worker_stats(prefill.url()).await, worker_stats(decode.url()).await);
        let busy = (p.num_sequences, p.pinned_blocks, p.pinned_requests, d.num_sequences);
        if busy == (0, 0, 0, 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "(prefill sequences, pinned blocks, pinned requests, decode sequences) = {busy:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

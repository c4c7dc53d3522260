//! Tenant isolation on the real model: the same prompt under two tenants
//! gets no prefix-cache reuse and no affinity credit, and its time to first
//! token is a cold request's, so a client cannot time its way to another
//! tenant's prompt. A same-tenant repeat, measured the same way, is several
//! times faster: the measurement would see a leak.

// The test holds its turn (a std mutex) while its processes run, awaits included.
#![allow(clippy::await_holding_lock)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};
use tests::metrics::value;
use tests::{start_decode, start_prefill, start_router, take_turn};

const ROUNDS: usize = 3;

/// A prompt of about 300 tokens, different for each `seed`.
fn prompt(seed: &str) -> String {
    (0..24).map(|i| format!("{seed} fact {i} is about {}.", i * 7 + seed.len())).collect::<Vec<_>>().join(" ")
}

/// Time to the first streamed token of `prompt` sent with `key`.
async fn ttft(router: &str, key: &str, prompt: &str) -> Duration {
    let body = json!({"prompt": prompt, "max_tokens": 1, "stream": true});
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{router}/v1/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    let mut seen = String::new();
    while let Some(chunk) = bytes.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("stream")));
        if seen.contains("\"text\"") {
            return started.elapsed();
        }
    }
    panic!("no token in {seen}");
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Prefix-cached tokens and affinity credit the router has counted so far.
async fn reuse(router: &str) -> (f64, f64) {
    (
        value(router, "pdserve_router_prefix_cached_tokens_total", &[]).await,
        value(router, "pdserve_router_prefix_hit_blocks_total", &[]).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_tenants_prompt_is_neither_reused_nor_timeable() {
    let _turn = take_turn();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.toml");
    let tenants = ["owner", "probe0", "probe1", "probe2", "cold"];
    let mut file = String::new();
    for t in tenants {
        let digest = hex::encode(Sha256::digest(format!("sk-{t}").as_bytes()));
        file.push_str(&format!("[tenants.{t}]\n[[keys]]\nid = \"{t}\"\ntenant = \"{t}\"\nsha256 = \"{digest}\"\n"));
    }
    std::fs::write(&keys, file).unwrap();
    let (prefill, decode) = (start_prefill("127.0.0.1:0"), start_decode());
    let router = start_router(
        &[&prefill],
        &[&decode],
        &["--local-prefill-max-tokens", "0", "--api-keys", keys.to_str().unwrap()],
    );
    let url = router.url();

    // Warm-up: the first request of a process pays for its allocations.
    ttft(url, "sk-cold", &prompt("warm-up")).await;

    let (mut cold, mut cross, mut same) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let secret = prompt(&format!("secret-{round}"));
        ttft(url, "sk-owner", &secret).await;
        let before = reuse(url).await;
        // Another tenant sends the owner's prompt: a fresh tenant each round,
        // so its own first request is what is measured.
        cross.push(ttft(url, &format!("sk-probe{round}"), &secret).await);
        let after = reuse(url).await;
        assert_eq!(after, before, "round {round}: cached tokens and hit blocks moved for another tenant");
        cold.push(ttft(url, "sk-cold", &prompt(&format!("fresh-{round}"))).await);
        same.push(ttft(url, "sk-owner", &secret).await);
    }
    let (cold, cross, same) = (median(cold), median(cross), median(same));
    println!("isolation: TTFT median cold {cold:?}, another tenant's prompt {cross:?}, the owner's repeat {same:?}");
    assert!(same * 2 < cold, "the measurement cannot see a cache hit: repeat {same:?} vs cold {cold:?}");
    assert!(cross * 2 > cold, "another tenant's prompt came back fast: {cross:?} vs cold {cold:?}");
}

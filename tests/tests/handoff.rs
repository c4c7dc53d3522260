//! The KV hand-off leaks nothing: pulled blocks are released at once, and an
//! unpulled hand-off is released after its timeout.

use proto::worker::{prefill_client::PrefillClient, KvTransferParams, PrefillRequest, SamplingParams};
use serde_json::json;
use std::time::{Duration, Instant};
use tests::metrics::value;
use tests::{Cluster, ClusterOptions};

#[tokio::test]
async fn pins_are_released_after_use_and_after_timeout() {
    let cluster = Cluster::start(ClusterOptions { kv_lease_ms: 2_000, ..Default::default() });
    let model = cluster.model_name().await;

    // Requests through the router: every hand-off is pulled and released.
    let url = format!("{}/v1/chat/completions", cluster.router.url());
    for q in ["Tell me a joke.", "What is Rust?"] {
        let body =
            json!({"model": model, "messages": [{"role": "user", "content": q}], "max_tokens": 8, "temperature": 0});
        let r = reqwest::Client::new().post(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let stats = cluster.prefill_stats().await;
    assert_eq!((stats.pinned_blocks, stats.pinned_requests), (0, 0), "pins left after finished requests");

    // A hand-off nobody pulls: pinned now, released when its 2 s lease ends.
    let mut prefill = PrefillClient::connect(cluster.prefill.url().to_string()).await.unwrap();
    let prompt: Vec<u32> = (100..140).collect();
    let answer = prefill
        .prefill(PrefillRequest {
            request_id: "unpulled-1".into(),
            prompt_token_ids: prompt,
            sampling: Some(SamplingParams {
                temperature: 0.0,
                top_p: 1.0,
                top_k: 0,
                seed: None,
                max_tokens: 16,
                stop_token_ids: vec![],
                ..Default::default()
            }),
            kv_transfer_params: Some(KvTransferParams { json: json!({"do_remote_decode": true}).to_string() }),
            cache_salt: None,
            priority: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(answer.kv_transfer_params.is_some(), "a remote-decode prefill pins its KV");
    let stats = cluster.prefill_stats().await;
    assert_eq!(stats.pinned_blocks, 3, "40 tokens in 16-token blocks");
    assert_eq!(stats.pinned_requests, 1);
    // The router exports the pinned count each worker reports with its KV events.
    let pinned = || value(cluster.router.url(), PINNED, &[("pool", "prefill"), ("worker", "0")]);
    assert!(eventually(pinned, 3.0).await, "the router never saw the 3 pinned blocks");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = cluster.prefill_stats().await;
        if stats.pinned_blocks == 0 && stats.pinned_requests == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the unpulled hand-off was not released: {stats:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(cluster.prefill_stats().await.free_blocks, cluster.prefill_stats().await.total_blocks);
    assert!(eventually(pinned, 0.0).await, "the router still shows pinned blocks");
}

const PINNED: &str = "pdserve_router_worker_pinned_blocks";

/// Polls the gauge `read` until it equals `want`, for at most 5 s.
async fn eventually<F: std::future::Future<Output = f64>>(read: impl Fn() -> F, want: f64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if read().await == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

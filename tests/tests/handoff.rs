//! The KV hand-off leaks nothing: pulled blocks are released at once, and an
//! unpulled hand-off is released after its timeout.

use proto::worker::{
    decode_client::DecodeClient, prefill_client::PrefillClient, DecodeRequest, KvTransferParams, PrefillRequest,
    PrefillResponse, SamplingParams,
};
use serde_json::json;
use std::time::{Duration, Instant};
use tests::metrics::value;
use tests::{worker_stats, Cluster, ClusterOptions};

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
    let answer = prefill_for_remote_decode(&cluster, "unpulled-1", (100..140).collect()).await;
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

#[tokio::test]
async fn a_failed_pull_frees_the_blocks_reserved_for_it_on_the_decode_worker() {
    let cluster = Cluster::start(ClusterOptions::default());
    let prompt: Vec<u32> = (200..300).collect();
    let answer = prefill_for_remote_decode(&cluster, "handoff-1", prompt.clone()).await;
    let params = answer.kv_transfer_params.clone().expect("pinned").json;
    let mut decode = DecodeClient::connect(cluster.decode.url().to_string()).await.unwrap();
    let request = |id: &str, params: String| DecodeRequest {
        request_id: id.into(),
        prompt_token_ids: prompt.clone(),
        sampling: Some(greedy(4)),
        kv_transfer_params: Some(KvTransferParams { json: params }),
        first_token_id: Some(answer.first_token_id),
        ..Default::default()
    };

    // A hand-off the prefill worker does not know: the pull fails after the
    // decode worker reserved blocks for it.
    let unknown = params.replace("\"handoff-1\"", "\"nobody\"");
    assert_ne!(unknown, params);
    let status = decode.decode(request("d-1", unknown)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    assert!(decode_idle(&cluster).await, "the reserved blocks were not freed");

    // The real one lands in the decode worker's cache and decodes from there.
    let mut stream = decode.decode(request("d-2", params)).await.unwrap().into_inner();
    let mut tokens = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        tokens.extend(chunk.token_ids);
    }
    assert_eq!(tokens.len(), 3, "the first of 4 tokens came from the prefill worker");
    assert!(decode_idle(&cluster).await, "blocks left held after the request");
    let stats = cluster.prefill_stats().await;
    assert_eq!((stats.pinned_blocks, stats.pinned_requests), (0, 0));
}

/// Whether the decode worker's every block is free again within 5 s.
async fn decode_idle(cluster: &Cluster) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let stats = worker_stats(cluster.decode.url()).await;
        if stats.free_blocks == stats.total_blocks {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, seed: None, max_tokens, ..Default::default() }
}

/// Prefills `prompt` on the prefill worker directly, pinning its KV for a decode worker.
async fn prefill_for_remote_decode(cluster: &Cluster, id: &str, prompt: Vec<u32>) -> PrefillResponse {
    let mut prefill = PrefillClient::connect(cluster.prefill.url().to_string()).await.unwrap();
    let request = PrefillRequest {
        request_id: id.into(),
        prompt_token_ids: prompt,
        sampling: Some(greedy(16)),
        kv_transfer_params: Some(KvTransferParams { json: json!({"do_remote_decode": true}).to_string() }),
        cache_salt: None,
        priority: 0,
    };
    prefill.prefill(request).await.unwrap().into_inner()
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

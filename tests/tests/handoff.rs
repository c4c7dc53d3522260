//! The KV hand-off leaks nothing: pulled blocks are released at once, an
//! unpulled hand-off after its lease, the blocks a decode worker reserved for
//! a failed pull at once, and the pin of a decode worker killed mid-pull
//! within the lease.

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
    failed_pull_frees_reserved_blocks(vec![]).await;
}

/// Streaming in, the request is already admitted when the pull fails: it
/// still ends as a failed pull (`DATA_LOSS`, for the router's policy) and
/// frees its blocks.
#[tokio::test]
async fn a_failed_pull_streaming_in_fails_as_a_pull_and_frees_its_blocks() {
    failed_pull_frees_reserved_blocks(vec!["--kv-layer-streaming".into()]).await;
}

async fn failed_pull_frees_reserved_blocks(decode_args: Vec<String>) {
    let cluster = Cluster::start(ClusterOptions { decode_args, ..Default::default() });
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

#[tokio::test]
async fn a_decode_worker_killed_mid_pull_leaves_no_pin_behind() {
    let decode_args = vec!["--kv-transport".into(), "tcp".into()];
    let mut cluster = Cluster::start(ClusterOptions { kv_lease_ms: 2_000, decode_args, ..Default::default() });
    let prompt: Vec<u32> = (300..400).collect();
    let answer = prefill_for_remote_decode(&cluster, "handoff-killed", prompt.clone()).await;
    assert_eq!(cluster.prefill_stats().await.pinned_blocks, 7);
    // The pull goes through a proxy that passes 1 MiB of the ~5 MB answer, then stalls.
    let mut params: serde_json::Value = serde_json::from_str(&answer.kv_transfer_params.unwrap().json).unwrap();
    let kv_port = params["remote_port"].as_u64().unwrap() as u16;
    let (proxy_port, stalled) = stalling_proxy(kv_port, 1 << 20).await;
    params["remote_port"] = json!(proxy_port);
    params["remote_ports"] = json!([proxy_port]);
    let mut decode = DecodeClient::connect(cluster.decode.url().to_string()).await.unwrap();
    let call = tokio::spawn(async move {
        let request = DecodeRequest {
            request_id: "d-killed".into(),
            prompt_token_ids: prompt,
            sampling: Some(greedy(4)),
            kv_transfer_params: Some(KvTransferParams { json: params.to_string() }),
            first_token_id: Some(answer.first_token_id),
            ..Default::default()
        };
        decode.decode(request).await.map(|_| ())
    });
    tokio::time::timeout(Duration::from_secs(10), stalled.notified()).await.expect("the pull never got going");
    cluster.decode.kill();
    let status =
        tokio::time::timeout(Duration::from_secs(10), call).await.expect("the call hung").unwrap().unwrap_err();
    assert!(matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown), "{status:?}");
    // The prefill worker gets its blocks back within the lease.
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let stats = cluster.prefill_stats().await;
        if (stats.pinned_blocks, stats.pinned_requests) == (0, 0) && stats.free_blocks == stats.total_blocks {
            break;
        }
        assert!(Instant::now() < deadline, "the killed pull's pin stayed: {stats:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A TCP proxy to `127.0.0.1:port` that passes every byte to the server but
/// only `limit` bytes back, then holds both connections open without
/// forwarding: a pull stuck mid-payload. The notify fires at the stall.
async fn stalling_proxy(port: u16, limit: usize) -> (u16, std::sync::Arc<tokio::sync::Notify>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    let stalled = std::sync::Arc::new(tokio::sync::Notify::new());
    let notify = stalled.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut server_write).await });
            let notify = notify.clone();
            tokio::spawn(async move {
                let mut passed = 0;
                let mut buf = vec![0u8; 64 << 10];
                while passed < limit {
                    let n = match server_read.read(&mut buf[..(limit - passed).min(64 << 10)]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    passed += n;
                }
                notify.notify_one();
                // Hold both halves open, forwarding nothing more.
                let _open = (server_read, client_write);
                std::future::pending::<()>().await
            });
        }
    });
    (proxy_port, stalled)
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

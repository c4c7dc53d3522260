//! [`router::run`] against fake gRPC workers on real ports: model-card
//! loading, the gRPC edge, prefill -> decode hand-off and `ReleaseKv`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use proto::worker::decode_server::{Decode, DecodeServer};
use proto::worker::prefill_server::{Prefill, PrefillServer};
use proto::worker::worker_server::{Worker, WorkerServer};
use proto::worker::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use router::testutil::{card, ids, EOS};

/// Prefill samples "H"; decode continues with "ello" and eos.
#[derive(Clone, Default)]
struct FakeWorker {
    decoded: Arc<Mutex<Vec<DecodeRequest>>>,
    prefilled: Arc<Mutex<Vec<PrefillRequest>>>,
    released: Arc<Mutex<Vec<String>>>,
    embedded: Arc<Mutex<Vec<EmbedRequest>>>,
    /// When set, the decode stream sends its first chunk and then waits for ever; the flag is
    /// raised when the router drops that stream.
    hang: Option<Arc<AtomicBool>>,
}

/// Raises its flag when dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tonic::async_trait]
impl Worker for FakeWorker {
    async fn get_model_card(&self, _: Request<GetModelCardRequest>) -> Result<Response<ModelCard>, Status> {
        Ok(Response::new(card()))
    }
    async fn get_stats(&self, _: Request<GetStatsRequest>) -> Result<Response<WorkerStats>, Status> {
        Ok(Response::new(WorkerStats::default()))
    }
    type SubscribeKvEventsStream = futures::stream::Empty<Result<proto::worker::KvEventBatch, Status>>;
    async fn subscribe_kv_events(
        &self,
        _: Request<proto::worker::SubscribeKvEventsRequest>,
    ) -> Result<Response<Self::SubscribeKvEventsStream>, Status> {
        // No prefix cache here: placement sees every worker down and falls back to rendezvous.
        Err(Status::unimplemented("this fake has no prefix cache"))
    }
    async fn embed(
        &self,
        request: Request<proto::worker::EmbedRequest>,
    ) -> Result<Response<proto::worker::EmbedResponse>, Status> {
        // A vector that tells prompts apart: their length and first token (mod 10), then the
        // request's flags.
        let r = request.into_inner();
        self.embedded.lock().unwrap().push(r.clone());
        let first = (r.prompt_token_ids.first().copied().unwrap_or(0) % 10) as f32;
        let embedding =
            vec![r.prompt_token_ids.len() as f32, first, r.pooling as f32, f32::from(u8::from(r.normalize))];
        Ok(Response::new(proto::worker::EmbedResponse { embedding, num_cached_tokens: 0 }))
    }
}

/// The prefill worker's `kv_transfer_params`, with a field the router has
/// never heard of: it must reach the decode worker byte for byte.
fn handoff_json(request_id: &str) -> String {
    format!(
        r#"{{"do_remote_prefill": true, "remote_request_id": "{request_id}", "remote_block_ids": [4, 2], "x": {{}}}}"#
    )
}

#[tonic::async_trait]
impl Prefill for FakeWorker {
    async fn prefill(&self, request: Request<PrefillRequest>) -> Result<Response<PrefillResponse>, Status> {
        let request = request.into_inner();
        self.prefilled.lock().unwrap().push(request.clone());
        // As a real prefill worker: pinned under the request id it was sent.
        let json = handoff_json(&request.request_id);
        Ok(Response::new(PrefillResponse {
            request_id: request.request_id,
            first_token_id: u32::from(b'H'),
            finish_reason: FinishReason::Unspecified.into(),
            kv_transfer_params: Some(KvTransferParams { json }),
            num_cached_tokens: 2,
            first_token_logprobs: None,
            choices: vec![],
            prompt_logprobs: vec![],
        }))
    }
    async fn release_kv(&self, request: Request<ReleaseKvRequest>) -> Result<Response<ReleaseKvResponse>, Status> {
        self.released.lock().unwrap().push(request.into_inner().remote_request_id);
        Ok(Response::new(ReleaseKvResponse { released: true }))
    }
}

#[tonic::async_trait]
impl Decode for FakeWorker {
    type DecodeStream = BoxStream<'static, Result<DecodeChunk, Status>>;
    async fn decode(&self, request: Request<DecodeRequest>) -> Result<Response<Self::DecodeStream>, Status> {
        let request = request.into_inner();
        let mut first = if request.kv_transfer_params.is_some() { vec![] } else { ids("H") };
        first.extend(ids("ello"));
        self.decoded.lock().unwrap().push(request);
        let chunks = vec![
            Ok(DecodeChunk { token_ids: first, num_cached_tokens: 3, ..DecodeChunk::default() }),
            Ok(DecodeChunk {
                token_ids: vec![EOS],
                finish_reason: FinishReason::Stop.into(),
                logprobs: vec![],
                index: 0,
                num_cached_tokens: 3,
                prompt_logprobs: vec![],
            }),
        ];
        if let Some(dropped) = &self.hang {
            let flag = DropFlag(dropped.clone());
            let first = stream::iter(chunks.into_iter().take(1)).chain(stream::pending());
            return Ok(Response::new(first.map(move |chunk| (&flag, chunk).1).boxed()));
        }
        Ok(Response::new(stream::iter(chunks).boxed()))
    }
}

async fn serve_worker(worker: FakeWorker) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tonic::transport::Server::builder()
        .add_service(WorkerServer::new(worker.clone()))
        .add_service(PrefillServer::new(worker.clone()))
        .add_service(DecodeServer::new(worker))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);
    url
}

async fn start_router(prefill: Vec<String>, decode: Vec<String>) -> String {
    // Hand off even the tiny prompts here: these tests are about the hand-off.
    let policy = router::Policy::CacheAware(router::placement::CacheAwareConfig {
        local_prefill_max_tokens: 0,
        ..Default::default()
    });
    start_router_with(prefill, decode, policy).await
}

async fn start_router_with(prefill: Vec<String>, decode: Vec<String>, policy: router::Policy) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(router::run(listener, config(prefill, decode, policy), std::future::pending()));
    addr
}

fn config(prefill: Vec<String>, decode: Vec<String>, policy: router::Policy) -> router::Config {
    router::Config {
        prefill: prefill.into_iter().map(router::WorkerUrl::unnamed).collect(),
        decode: decode.into_iter().map(router::WorkerUrl::unnamed).collect(),
        discovery: None,
        shutdown_grace: Duration::from_secs(1),
        served_model_name: Some("served".into()),
        model_card_timeout: Duration::from_secs(10),
        chat_template: None,
        admission: Default::default(),
        policy,
        on_kv_failure: Default::default(),
        tenancy: Default::default(),
        http_threads: None,
    }
}

/// One HTTP/1.1 exchange; returns status line and body (raw for SSE).
async fn http(addr: &str, path: &str, body: Value) -> (String, String) {
    let body = body.to_string();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-request-id: r1\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(body.as_bytes()).await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disaggregated_request_goes_prefill_then_decode() {
    let prefill = FakeWorker::default();
    let decode = FakeWorker::default();
    let router =
        start_router(vec![serve_worker(prefill.clone()).await], vec![serve_worker(decode.clone()).await]).await;
    let chat = json!({"model": "served", "messages": [{"role": "user", "content": "Hi"}],
                      "priority": -7, "cache_salt": "salt"});
    let (status, body) = http(&router, "/v1/chat/completions", chat).await;
    assert!(status.contains("200"), "{status} {body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Hello");
    assert_eq!(body["usage"]["completion_tokens"], 6);
    // The prefill worker computed the prompt: its count of cached tokens is the one reported.
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 2, "{body}");
    let decoded = decode.decoded.lock().unwrap().remove(0);
    assert_eq!(decoded.first_token_id, Some(u32::from(b'H')));
    assert_eq!(decoded.request_id, "r1");
    // vLLM's extras travel on both legs.
    assert_eq!((decoded.priority, decoded.cache_salt.as_deref()), (-7, Some("salt")));
    let prefilled = prefill.prefilled.lock().unwrap().remove(0);
    assert_eq!((prefilled.priority, prefilled.cache_salt.as_deref()), (-7, Some("salt")));
    // The router asks for a remote decode and forwards the answer verbatim.
    assert_eq!(prefilled.kv_transfer_params.unwrap().json, r#"{"do_remote_decode":true}"#);
    assert_eq!(decoded.kv_transfer_params.unwrap().json, handoff_json("r1"));

    // A stop string on the first token ends the request before decode.
    let stopped = json!({"prompt": "Hi", "stop": ["H"], "stream": true});
    let (_, body) = http(&router, "/v1/completions", stopped).await;
    assert!(body.contains("\"finish_reason\":\"stop\"") && body.contains("[DONE]"), "{body}");
    for _ in 0..100 {
        if !prefill.released.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*prefill.released.lock().unwrap(), ["r1"]);
    assert!(decode.decoded.lock().unwrap().is_empty());
}

/// The names of this process's threads.
fn thread_names() -> Vec<String> {
    let tasks = std::fs::read_dir("/proc/self/task").unwrap();
    tasks.map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap().trim().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_threads_of_its_own_serve_every_connection_and_stop_at_the_shutdown() {
    let prefill = FakeWorker::default();
    let decode = FakeWorker::default();
    let policy = router::Policy::CacheAware(router::placement::CacheAwareConfig {
        local_prefill_max_tokens: 0,
        ..Default::default()
    });
    let mut config =
        config(vec![serve_worker(prefill.clone()).await], vec![serve_worker(decode.clone()).await], policy);
    config.http_threads = Some(std::num::NonZeroUsize::new(3).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(router::run(listener, config, async move {
        let _ = stopped.await;
    }));

    // Concurrent connections, each a disaggregated request, streamed or not.
    let requests = (0..12).map(|i| {
        let chat = json!({"model": "served", "messages": [{"role": "user", "content": "Hi"}], "stream": i % 2 == 0});
        http(&addr, "/v1/chat/completions", chat)
    });
    for (status, body) in futures::future::join_all(requests).await {
        assert!(status.contains("200"), "{status} {body}");
        assert!(body.contains("\"content\":\"Hello\"") || body.contains("[DONE]"), "{body}");
    }
    assert_eq!((prefill.prefilled.lock().unwrap().len(), decode.decoded.lock().unwrap().len()), (12, 12));
    let serving = ["http-0", "http-1", "http-2"];
    let names = thread_names();
    for name in serving {
        assert!(names.iter().any(|n| n == name), "no thread {name} among {names:?}");
    }

    // The shutdown ends every thread, and `run` with them.
    stop.send(()).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), running).await.expect("the router stops");
    ended.unwrap().unwrap();
    let names = thread_names();
    assert!(!names.iter().any(|n| serving.contains(&n.as_str())), "threads left: {names:?}");
    assert!(TcpStream::connect(&addr).await.is_err(), "the listener is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colocated_request_goes_to_decode_only() {
    let decode = FakeWorker::default();
    let router = start_router(vec![], vec![serve_worker(decode.clone()).await]).await;
    let (status, body) = http(&router, "/v1/completions", json!({"prompt": "Hi", "max_tokens": 3})).await;
    assert!(status.contains("200"), "{status} {body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["choices"][0]["text"], "Hel");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    // Read from the first chunk, although the answer stopped short of the stream's end.
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 3, "{body}");
    let decoded = decode.decoded.lock().unwrap().remove(0);
    assert!(decoded.kv_transfer_params.is_none() && decoded.first_token_id.is_none());
}

/// A client that leaves mid-stream cancels the worker's generation: the router's event stream
/// is polled by the connection itself, so the connection's end drops it, and with it the
/// gRPC stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_cancels_the_generation() {
    let dropped = Arc::new(AtomicBool::new(false));
    let decode = FakeWorker { hang: Some(dropped.clone()), ..FakeWorker::default() };
    let router = start_router(vec![], vec![serve_worker(decode).await]).await;
    let body = json!({"prompt": "Hi", "max_tokens": 50, "stream": true}).to_string();
    let mut tcp = TcpStream::connect(&router).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(format!("{head}{body}").as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    // The first chunk's last token, one delta per token.
    while !String::from_utf8_lossy(&seen).contains(r#""text":"o""#) {
        let mut buf = [0; 4096];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "the stream ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(!dropped.load(Ordering::SeqCst), "cancelled while the client was still there");
    drop(tcp);
    // Generous for a loaded machine; it takes milliseconds.
    for _ in 0..500 {
        if dropped.load(Ordering::SeqCst) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the worker's stream outlived the client by 10 s");
}

/// A URL nothing listens on: connections are refused at once.
async fn dead_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

async fn get(addr: &str, path: &str) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_trips_its_breaker_and_no_request_is_lost() {
    let live = FakeWorker::default();
    let dead = dead_url().await;
    // In turn, so the first request is placed on the dead worker for sure.
    let decode = vec![dead, serve_worker(live.clone()).await];
    let router = start_router_with(vec![], decode, router::Policy::RoundRobin).await;
    for _ in 0..6 {
        let (status, body) = http(&router, "/v1/completions", json!({"prompt": "Hi", "max_tokens": 3})).await;
        assert!(status.contains("200"), "a dead worker is retried on the live one: {status} {body}");
    }
    assert_eq!(live.decoded.lock().unwrap().len(), 6);
    let metrics = get(&router, "/metrics").await;
    assert!(
        metrics.contains(r#"pdserve_router_worker_circuit_state{model="served",pool="decode",worker="0"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"pdserve_router_worker_circuit_state{model="served",pool="decode",worker="1"} 0"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_run_on_the_prefill_pool_one_call_per_input() {
    let prefill = FakeWorker::default();
    let decode = FakeWorker::default();
    let router =
        start_router(vec![serve_worker(prefill.clone()).await], vec![serve_worker(decode.clone()).await]).await;
    let body = json!({"model": "served", "input": ["ab", "xyz"], "priority": 3, "cache_salt": "s", "pooling": "mean"});
    let (status, body) = http(&router, "/v1/embeddings", body).await;
    assert!(status.contains("200"), "{status} {body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((body["object"].as_str(), body["model"].as_str()), (Some("list"), Some("served")), "{body}");
    assert_eq!(body["id"], "embd-r1");
    // The fake's vector is [prompt length, first token mod 10, pooling, normalize], in input order.
    let (ab, xyz) = (ids("ab"), ids("xyz"));
    let pooling_mean = Pooling::Mean as i32 as f64;
    assert_eq!(
        body["data"][0],
        json!({"object": "embedding", "index": 0,
        "embedding": [ab.len() as f64, (ab[0] % 10) as f64, pooling_mean, 1.0]})
    );
    assert_eq!(body["data"][1]["embedding"], json!([xyz.len() as f64, (xyz[0] % 10) as f64, pooling_mean, 1.0]));
    let tokens = ab.len() + xyz.len();
    assert_eq!(body["usage"], json!({"prompt_tokens": tokens, "total_tokens": tokens}));
    // Prefill-only work: the prefill worker computes it, the decode worker never hears of it.
    let mut calls = prefill.embedded.lock().unwrap().clone();
    assert!(decode.embedded.lock().unwrap().is_empty());
    calls.sort_by(|a, b| a.request_id.cmp(&b.request_id));
    let seen: Vec<(&str, i32, Option<&str>)> =
        calls.iter().map(|c| (c.request_id.as_str(), c.priority, c.cache_salt.as_deref())).collect();
    assert_eq!(seen, [("r1-0", 3, Some("s")), ("r1-1", 3, Some("s"))]);
    assert_eq!(calls[0].prompt_token_ids, ab);

    // base64: the little-endian f32 bytes; token-id input; no normalization asked; no pooling
    // named, so the worker applies the model's own.
    let body = json!({"input": [5, 6, 7], "encoding_format": "base64", "normalize": false});
    let (status, body) = http(&router, "/v1/embeddings", body).await;
    assert!(status.contains("200"), "{status} {body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let encoded = body["data"][0]["embedding"].as_str().expect("a base64 string");
    let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, encoded).unwrap();
    let values: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(values, [3.0, 5.0, Pooling::Unspecified as i32 as f32, 0.0]);

    // `dimensions` other than the model's own is refused, naming it; the model's own is fine.
    let (status, body) = http(&router, "/v1/embeddings", json!({"input": "ab", "dimensions": 2})).await;
    assert!(status.contains("400") && body.contains("\"param\":\"dimensions\""), "{status} {body}");
    let (status, body) = http(&router, "/v1/embeddings", json!({"input": "ab", "dimensions": 4})).await;
    assert!(status.contains("200"), "{status} {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_bad_input_is_a_400_naming_the_field_and_reaches_no_worker() {
    let decode = FakeWorker::default();
    let router = start_router(vec![], vec![serve_worker(decode.clone()).await]).await;
    let cases = [
        (json!({}), "input"),
        (json!({"input": ""}), "input"),
        (json!({"input": []}), "input"),
        (json!({"input": [[]]}), "input"),
        (json!({"input": [1_000_000]}), "input"),
        (json!({"input": "ab", "encoding_format": "hex"}), ""),
        (json!({"input": "ab", "dimensions": 0}), "dimensions"),
        (json!({"input": "ab", "truncate_prompt_tokens": 0}), "truncate_prompt_tokens"),
        (json!({"input": "ab", "pooling": "max"}), ""),
        (json!({"input": "ab", "cache_salt": ""}), "cache_salt"),
        (json!({"input": "ab", "priority": 1_i64 << 40}), "priority"),
        (json!({"messages": []}), "messages"),
        (json!({"input": "ab", "messages": [{"role": "user", "content": "hi"}]}), "messages"),
        (json!({"input": "ab", "add_generation_prompt": true}), "add_generation_prompt"),
        (json!({"messages": [{"role": "user", "content": "hi"}], "chat_template": "{% for"}), "chat_template"),
    ];
    // /pooling takes the same body, so it refuses the same way.
    for path in ["/v1/embeddings", "/pooling"] {
        for (body, param) in &cases {
            let (status, answer) = http(&router, path, body.clone()).await;
            assert!(status.contains("400"), "{path} {body}: {status} {answer}");
            let answer: Value = serde_json::from_str(&answer).unwrap();
            if !param.is_empty() {
                assert_eq!(answer["error"]["param"], *param, "{path} {body}: {answer}");
            }
        }
    }
    assert!(decode.embedded.lock().unwrap().is_empty(), "a refused request reached a worker");
    // Colocated, a good one runs on the decode worker.
    let (status, body) = http(&router, "/v1/embeddings", json!({"input": "ab"})).await;
    assert!(status.contains("200"), "{status} {body}");
    assert_eq!(decode.embedded.lock().unwrap().len(), 1);
    // vLLM's /pooling: the same vectors as `pooling` objects; a conversation is one input.
    let body = json!({"messages": [{"role": "user", "content": "hi"}], "pooling": "cls"});
    let (status, body) = http(&router, "/pooling", body).await;
    assert!(status.contains("200"), "{status} {body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((body["object"].as_str(), body["data"].as_array().map(Vec::len)), (Some("list"), Some(1)), "{body}");
    assert_eq!(body["data"][0]["object"], "pooling");
    assert_eq!(body["data"][0]["data"][2], json!(Pooling::Cls as i32 as f64), "{body}");
    assert!(body["id"].as_str().is_some_and(|id| id.starts_with("pool-")), "{body}");
}

/// The fake's vectors are `[prompt length, first token mod 10, pooling, normalize]`: a text scores 1
/// against itself and less against a text of another length or first token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_and_rerank_compare_the_texts_embeddings() {
    let prefill = FakeWorker::default();
    let decode = FakeWorker::default();
    let router =
        start_router(vec![serve_worker(prefill.clone()).await], vec![serve_worker(decode.clone()).await]).await;
    let score = |a: &Value| a.as_f64().unwrap();

    let (status, body) = http(&router, "/score", json!({"text_1": "ab", "text_2": ["ab", "xyz", "b"]})).await;
    assert!(status.contains("200"), "{status} {body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((body["object"].as_str(), body["id"].as_str()), (Some("list"), Some("score-r1")));
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.iter().map(|d| d["index"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2]);
    assert!((score(&data[0]["score"]) - 1.0).abs() < 1e-6, "{body}");
    assert!(score(&data[1]["score"]) < 1.0 - 1e-4 && score(&data[2]["score"]) < 1.0 - 1e-4, "{body}");
    // Pair by pair: each text against itself.
    let (status, body) = http(&router, "/v1/score", json!({"text_1": ["ab", "xyz"], "text_2": ["ab", "xyz"]})).await;
    assert!(status.contains("200"), "{status} {body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(body["data"].as_array().unwrap().iter().all(|d| (score(&d["score"]) - 1.0).abs() < 1e-6), "{body}");

    let rerank = json!({"query": "ab", "documents": ["xyz", "b", "ab"], "top_n": 2});
    for path in ["/rerank", "/v1/rerank", "/v2/rerank"] {
        let (status, body) = http(&router, path, rerank.clone()).await;
        assert!(status.contains("200"), "{path}: {status} {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        let results = body["results"].as_array().unwrap();
        assert_eq!(results.len(), 2, "{body}");
        assert_eq!((results[0]["index"].as_u64(), results[0]["document"]["text"].as_str()), (Some(2), Some("ab")));
        assert!((score(&results[0]["relevance_score"]) - 1.0).abs() < 1e-6, "{body}");
        assert!(score(&results[1]["relevance_score"]) <= score(&results[0]["relevance_score"]), "{body}");
        assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0, "{body}");
    }
    let (_, body) =
        http(&router, "/rerank", json!({"query": "ab", "documents": ["ab"], "return_documents": false})).await;
    let body: Value = serde_json::from_str(&body).unwrap();
    assert!(body["results"][0].get("document").is_none(), "{body}");

    let refused = [
        ("/score", json!({"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}), "text_1"),
        ("/score", json!({"text_2": ["a"]}), "text_1"),
        ("/score", json!({"text_1": "a", "text_2": []}), "text_2"),
        ("/score", json!({"text_1": "", "text_2": "a"}), "text_1"),
        ("/rerank", json!({"documents": ["a"]}), "query"),
        ("/rerank", json!({"query": "a", "documents": []}), "documents"),
        ("/rerank", json!({"query": "a", "documents": ["a"], "top_n": -1}), "top_n"),
        ("/rerank", json!({"query": "a", "documents": vec!["a"; 64]}), "documents"),
    ];
    let before = prefill.embedded.lock().unwrap().len();
    for (path, body, param) in refused {
        let (status, answer) = http(&router, path, body.clone()).await;
        assert!(status.contains("400"), "{path} {body}: {status} {answer}");
        let answer: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(answer["error"]["param"], param, "{path} {body}: {answer}");
    }
    assert_eq!(prefill.embedded.lock().unwrap().len(), before, "a refused request reached a worker");
}

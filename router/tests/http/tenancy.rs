//! API keys, tenants, limits and usage through the HTTP surface.

use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::{to_bytes, Body};
use axum::http::{header, Request, StatusCode};
use axum::response::Response;
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tower::ServiceExt;

use router::backend::{Backend, Finish, GenerateRequest, TokenChunk, TokenStream};
use router::fleet::model::Model;
use router::http::app::app;
use router::http::state::AppState;
use router::tenancy::keys::{digest_hex, KeyRing};
use router::tenancy::usage::UsageLog;
use router::tenancy::Keys;
use router::testutil::{card, EOS};

/// Answers `a`, `b`, `c` then EOS; a request with id `slow` waits for
/// `release` before its first token, and `hang` stops after `c` without
/// ever ending.
#[derive(Default)]
struct Backend3 {
    started: Mutex<Vec<GenerateRequest>>,
    release: Arc<Notify>,
}

impl Backend for Backend3 {
    fn generate(&self, request: GenerateRequest) -> TokenStream {
        let id = request.request_id.clone();
        let hang = id == "hang";
        self.started.lock().unwrap().push(request);
        let release = self.release.clone();
        let chunk = |t: u32, finish| Ok(TokenChunk { token_ids: vec![t], finish, ..TokenChunk::default() });
        let mut tokens = vec![chunk(97, None), chunk(98, None), chunk(99, None)];
        if !hang {
            tokens.push(chunk(EOS, Some(Finish::Stop)));
        }
        let gate = stream::once(async move {
            if id == "slow" {
                release.notified().await;
            }
        })
        .filter_map(|()| async { None });
        let tail = if hang { stream::pending().boxed() } else { stream::empty().boxed() };
        gate.chain(stream::iter(tokens)).chain(tail).boxed()
    }
}

const KEYS: &str = r#"
[tenants.acme]
requests_per_minute = 100

[tenants.globex]
cache_salt = "globex-salt"

[tenants.initech]
models = ["some-other-model"]

[[keys]]
id = "acme-1"
tenant = "acme"
sha256 = "ACME"

[[keys]]
id = "acme-2"
tenant = "acme"
sha256 = "ACME2"
requests_per_minute = 2
tokens_per_minute = 40
max_prompt_tokens = 20
max_concurrent_requests = 1

[[keys]]
id = "globex-1"
tenant = "globex"
sha256 = "GLOBEX"

[[keys]]
id = "initech-1"
tenant = "initech"
sha256 = "INITECH"
"#;

struct Setup {
    app: axum::Router,
    backend: Arc<Backend3>,
}

fn setup(keys: Option<&str>, usage_log: Option<&Path>) -> Setup {
    let backend = Arc::new(Backend3::default());
    let model = Model::from_card(&card(), None).unwrap();
    let ring = match keys {
        Some(text) => {
            let text = text
                .replace("\"ACME\"", &format!("\"{}\"", digest_hex("sk-acme")))
                .replace("\"ACME2\"", &format!("\"{}\"", digest_hex("sk-acme-2")))
                .replace("\"GLOBEX\"", &format!("\"{}\"", digest_hex("sk-globex")))
                .replace("\"INITECH\"", &format!("\"{}\"", digest_hex("sk-initech")));
            KeyRing::parse(&text).unwrap()
        }
        None => KeyRing::open(),
    };
    let log = usage_log.map(|p| Arc::new(UsageLog::open(p).unwrap()));
    let state =
        AppState::ready(model, backend.clone()).with_tenancy(Arc::new(Keys::new(ring)), log).with_max_body_bytes(4096);
    Setup { app: app(state), backend }
}

fn post(path: &str, key: Option<&str>, id: &str, body: Value) -> Request<Body> {
    let mut request = Request::post(path).header("content-type", "application/json").header("x-request-id", id);
    if let Some(key) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    request.body(Body::from(body.to_string())).unwrap()
}

fn completion(key: Option<&str>, id: &str, extra: Value) -> Request<Body> {
    let mut body = json!({"prompt": "Hi", "max_tokens": 4});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    post("/v1/completions", key, id, body)
}

fn get(path: &str, key: Option<&str>) -> Request<Body> {
    let mut request = Request::get(path);
    if let Some(key) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    request.body(Body::empty()).unwrap()
}

async fn json_of(response: Response) -> Value {
    serde_json::from_slice(&to_bytes(response.into_body(), usize::MAX).await.unwrap()).unwrap()
}

/// Asserts an OpenAI-shaped error of `status` and `code`; returns its body.
async fn expect_error(response: Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status);
    let body = json_of(response).await;
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    body
}

#[tokio::test]
async fn without_keys_the_api_is_open() {
    let s = setup(None, None);
    let ok = s.app.clone().oneshot(completion(None, "a", json!({}))).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    // Any key is ignored, as vLLM without --api-key ignores it.
    let ok = s.app.clone().oneshot(completion(Some("whatever"), "b", json!({"cache_salt": "s"}))).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(s.backend.started.lock().unwrap()[1].cache_salt.as_deref(), Some("s"), "the client's salt as sent");
}

#[tokio::test]
async fn a_missing_or_wrong_key_is_refused_with_401() {
    let s = setup(Some(KEYS), None);
    for (key, path) in [(None, "/v1/completions"), (Some("sk-wrong"), "/v1/completions"), (None, "/tokenize")] {
        let response = s.app.clone().oneshot(post(path, key, "x", json!({"prompt": "Hi"}))).await.unwrap();
        assert_eq!(response.headers().get(header::WWW_AUTHENTICATE).unwrap(), "Bearer");
        let body = expect_error(response, StatusCode::UNAUTHORIZED, "invalid_api_key").await;
        assert_eq!(body["error"]["type"], "AuthenticationError");
    }
    let models = s.app.clone().oneshot(get("/v1/models", None)).await.unwrap();
    assert_eq!(models.status(), StatusCode::UNAUTHORIZED);
    assert!(s.backend.started.lock().unwrap().is_empty(), "nothing ran");
    // Probes and scrapes need no key.
    for path in ["/health", "/ready", "/metrics", "/version", "/openapi.json"] {
        assert_eq!(s.app.clone().oneshot(get(path, None)).await.unwrap().status(), StatusCode::OK, "{path}");
    }
    let ok = s.app.clone().oneshot(completion(Some("sk-acme"), "a", json!({}))).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_key_sees_and_uses_only_its_tenants_models() {
    let s = setup(Some(KEYS), None);
    let listed = json_of(s.app.clone().oneshot(get("/v1/models", Some("sk-acme"))).await.unwrap()).await;
    assert_eq!(listed["data"][0]["id"], "tiny");
    let listed = json_of(s.app.clone().oneshot(get("/v1/models", Some("sk-initech"))).await.unwrap()).await;
    assert_eq!(listed["data"], json!([]), "initech may not use `tiny`");
    let refused = s.app.clone().oneshot(completion(Some("sk-initech"), "i", json!({}))).await.unwrap();
    let body = expect_error(refused, StatusCode::FORBIDDEN, "model_not_allowed").await;
    assert_eq!(body["error"]["type"], "PermissionDeniedError");
    let refused = s.app.clone().oneshot(post("/tokenize", Some("sk-initech"), "t", json!({"prompt": "Hi"}))).await;
    expect_error(refused.unwrap(), StatusCode::FORBIDDEN, "model_not_allowed").await;
    assert!(s.backend.started.lock().unwrap().is_empty());
}

#[tokio::test]
async fn tenants_run_under_their_own_cache_salt_whatever_the_client_sends() {
    let s = setup(Some(KEYS), None);
    let requests = [
        ("sk-acme", json!({})),
        ("sk-globex", json!({})),
        // globex's salt is forced: the client's own is ignored.
        ("sk-globex", json!({"cache_salt": "mine"})),
        // acme tries to reach globex's cache.
        ("sk-acme", json!({"cache_salt": "globex-salt"})),
        ("sk-acme", json!({"cache_salt": "salt:globex-salt"})),
    ];
    for (i, (key, extra)) in requests.into_iter().enumerate() {
        let response = s.app.clone().oneshot(completion(Some(key), &i.to_string(), extra)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    let salts: Vec<String> =
        s.backend.started.lock().unwrap().iter().map(|r| r.cache_salt.clone().unwrap_or_default()).collect();
    assert_eq!(salts[0], "tenant:acme");
    assert_eq!(salts[1], "salt:globex-salt");
    assert_eq!(salts[2], salts[1]);
    for forged in &salts[3..] {
        assert!(forged.starts_with("tenant:acme/"), "{forged}");
        assert_ne!(forged, &salts[1]);
    }
}

#[tokio::test]
async fn requests_per_minute_answer_429_with_retry_after() {
    let s = setup(Some(KEYS), None);
    for id in ["1", "2"] {
        let ok = s.app.clone().oneshot(completion(Some("sk-acme-2"), id, json!({}))).await.unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
    }
    let refused = s.app.clone().oneshot(completion(Some("sk-acme-2"), "3", json!({}))).await.unwrap();
    let retry: u64 = refused.headers()[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "one request back every 30 s: {retry}");
    let body = expect_error(refused, StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded").await;
    assert_eq!(body["error"]["type"], "RateLimitError");
    // Another key of the same tenant has its own budget.
    let ok = s.app.clone().oneshot(completion(Some("sk-acme"), "4", json!({}))).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let text = to_bytes(s.app.clone().oneshot(get("/metrics", None)).await.unwrap().into_body(), usize::MAX).await;
    let text = String::from_utf8(text.unwrap().to_vec()).unwrap();
    assert!(
        text.contains(
            r#"pdserve_router_key_limited_requests_total{key="acme-2",limit="requests_per_minute",tenant="acme"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn tokens_prompt_length_and_concurrency_are_limited_per_key() {
    let s = setup(Some(KEYS), None);
    // "Hi" is 2 tokens; 2 + 30 of the 40 tokens a minute.
    let ok = s.app.clone().oneshot(completion(Some("sk-acme-2"), "1", json!({"max_tokens": 30}))).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let refused = s.app.clone().oneshot(completion(Some("sk-acme-2"), "2", json!({"max_tokens": 10}))).await.unwrap();
    assert!(refused.headers().contains_key(header::RETRY_AFTER));
    expect_error(refused, StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded").await;

    let s = setup(Some(KEYS), None);
    let never = s.app.clone().oneshot(completion(Some("sk-acme-2"), "1", json!({"max_tokens": 50}))).await.unwrap();
    let body = expect_error(never, StatusCode::BAD_REQUEST, "request_too_large").await;
    assert_eq!(body["error"]["param"], "max_tokens");
    let long = "x".repeat(21);
    let long = s.app.clone().oneshot(completion(Some("sk-acme-2"), "2", json!({"prompt": long}))).await.unwrap();
    expect_error(long, StatusCode::BAD_REQUEST, "prompt_too_long").await;

    // One request at a time for acme-2: a second one while `slow` runs is refused.
    let s = setup(Some(KEYS), None);
    let slow = tokio::spawn(s.app.clone().oneshot(completion(Some("sk-acme-2"), "slow", json!({}))));
    while s.backend.started.lock().unwrap().is_empty() {
        tokio::task::yield_now().await;
    }
    let busy = s.app.clone().oneshot(completion(Some("sk-acme-2"), "2", json!({}))).await.unwrap();
    assert_eq!(busy.headers()[header::RETRY_AFTER], "1");
    expect_error(busy, StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded").await;
    s.backend.release.notify_one();
    assert_eq!(slow.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(s.backend.started.lock().unwrap().len(), 1, "the refused request never ran");
}

#[tokio::test]
async fn usage_is_logged_per_request_from_what_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("usage.jsonl");
    let s = setup(Some(KEYS), Some(&path));
    let whole = s.app.clone().oneshot(completion(Some("sk-acme"), "whole", json!({}))).await.unwrap();
    // a, b, c and the EOS, as the usage says.
    assert_eq!(json_of(whole).await["usage"]["completion_tokens"], 4);

    // A stream the client leaves after its first token.
    let streamed = s.app.clone().oneshot(completion(Some("sk-globex"), "hang", json!({"stream": true}))).await.unwrap();
    let mut body = streamed.into_body().into_data_stream();
    let mut seen = String::new();
    while !seen.contains("\"c\"") {
        seen.push_str(&String::from_utf8_lossy(&body.next().await.unwrap().unwrap()));
    }
    drop(body);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    let logged = loop {
        let text = std::fs::read_to_string(&path).unwrap();
        if text.lines().count() == 2 || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    let lines: Vec<Value> = logged.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "{logged}");
    let line = |id: &str| lines.iter().find(|l| l["request_id"] == id).unwrap().clone();
    let whole = line("whole");
    assert_eq!((&whole["tenant"], &whole["key"], &whole["model"]), (&json!("acme"), &json!("acme-1"), &json!("tiny")));
    assert_eq!((&whole["prompt_tokens"], &whole["completion_tokens"]), (&json!(2), &json!(4)));
    assert_eq!(whole["outcome"], "completed");
    let cut = line("hang");
    assert_eq!(
        (&cut["tenant"], &cut["completion_tokens"], &cut["outcome"]),
        (&json!("globex"), &json!(3), &json!("cancelled"))
    );
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413() {
    let s = setup(None, None);
    let huge = "x".repeat(10_000);
    let response = s.app.clone().oneshot(completion(None, "big", json!({"prompt": huge}))).await.unwrap();
    let body = expect_error(response, StatusCode::PAYLOAD_TOO_LARGE, "request_too_large").await;
    assert_eq!(body["error"]["type"], "BadRequestError");
}

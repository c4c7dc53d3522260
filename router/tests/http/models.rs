//! Several models at once through the HTTP surface: `model` picks the pools,
//! `/v1/models` lists what the key may use, each model is ready and counted
//! on its own.

use std::sync::{Arc, Mutex};

use axum::body::{to_bytes, Body};
use axum::http::{header, Request, StatusCode};
use axum::response::Response;
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use tower::ServiceExt;

use router::backend::{Backend, Finish, GenerateRequest, TokenChunk, TokenStream};
use router::fleet::model::{Model, ModelName};
use router::fleet::roster::{Member, Roster};
use router::fleet::served::{ServedModel, ServedModels};
use router::http::app::app;
use router::http::state::AppState;
use router::metrics::ScrapedPool;
use router::tenancy::keys::{digest_hex, KeyRing};
use router::tenancy::Keys;
use router::testutil::{card, EOS};

/// Answers `byte` then EOS, recording each request's id.
struct OneToken {
    byte: u32,
    seen: Mutex<Vec<String>>,
}

impl OneToken {
    fn new(byte: u8) -> Arc<Self> {
        Arc::new(Self { byte: byte.into(), seen: Mutex::new(Vec::new()) })
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Backend for OneToken {
    fn generate(&self, request: GenerateRequest) -> TokenStream {
        self.seen.lock().unwrap().push(request.request_id);
        let chunk = |t: u32, finish| Ok(TokenChunk { token_ids: vec![t], finish, ..TokenChunk::default() });
        stream::iter([chunk(self.byte, None), chunk(EOS, Some(Finish::Stop))]).boxed()
    }
}

/// The test card's model served as `name`.
fn model_named(name: &str) -> Model {
    Model::from_card(&card(), Some(name.to_owned())).unwrap()
}

fn completion(model: Option<&str>, id: &str, key: Option<&str>) -> Request<Body> {
    let mut body = json!({"prompt": "Hi", "max_tokens": 4});
    if let Some(model) = model {
        body["model"] = json!(model);
    }
    let mut request =
        Request::post("/v1/completions").header("content-type", "application/json").header("x-request-id", id);
    if let Some(key) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    request.body(Body::from(body.to_string())).unwrap()
}

fn get(path: &str, key: Option<&str>) -> Request<Body> {
    let mut request = Request::get(path);
    if let Some(key) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    request.body(Body::empty()).unwrap()
}

async fn body_of(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn call(app: &axum::Router, request: Request<Body>) -> (StatusCode, Value) {
    body_of(app.clone().oneshot(request).await.unwrap()).await
}

fn listed(models: &Value) -> Vec<String> {
    models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect()
}

/// Two versions of one model, each on its own backend.
fn two_versions() -> (Arc<ServedModels>, Arc<OneToken>, Arc<OneToken>) {
    let (v1, v2) = (OneToken::new(b'1'), OneToken::new(b'2'));
    let models = ServedModels::new(vec![
        ServedModel::ready(model_named("llama/v1"), v1.clone()),
        ServedModel::ready(model_named("llama/v2"), v2.clone()),
    ]);
    (Arc::new(models), v1, v2)
}

#[tokio::test]
async fn model_picks_the_pools_by_its_full_name() {
    let (models, v1, v2) = two_versions();
    let app = app(AppState::new(models));

    let (status, body) = call(&app, completion(Some("llama/v2"), "to-v2", None)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["model"].as_str(), body["choices"][0]["text"].as_str()), (Some("llama/v2"), Some("2")));
    let (status, body) = call(&app, completion(Some("llama/v1"), "to-v1", None)).await;
    assert_eq!((status, body["choices"][0]["text"].as_str()), (StatusCode::OK, Some("1")));
    assert_eq!((v1.seen(), v2.seen()), (vec!["to-v1".to_owned()], vec!["to-v2".to_owned()]));

    // A bare model name or an unknown version names no served model.
    for name in ["llama", "llama/v3"] {
        let (status, body) = call(&app, completion(Some(name), "x", None)).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::NOT_FOUND, Some("model_not_found")),
            "{name}"
        );
    }
    // With several models, `model` is required.
    let (status, body) = call(&app, completion(None, "x", None)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["param"], "model", "{body}");
    assert_eq!((v1.seen().len(), v2.seen().len()), (1, 1), "no refused request reached a worker");

    let (status, body) = call(&app, get("/v1/models", None)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed(&body), ["llama/v1", "llama/v2"]);
}

#[tokio::test]
async fn a_key_sees_and_uses_only_its_models() {
    let keys = format!(
        r#"
        [tenants.acme]
        models = ["llama/v1"]
        [[keys]]
        id = "acme-1"
        tenant = "acme"
        sha256 = "{}"
        "#,
        digest_hex("sk-acme")
    );
    let (models, v1, v2) = two_versions();
    let keys = Arc::new(Keys::new(KeyRing::parse(&keys).unwrap()));
    let app = app(AppState::new(models).with_tenancy(keys, None));

    let (_, body) = call(&app, get("/v1/models", Some("sk-acme"))).await;
    assert_eq!(listed(&body), ["llama/v1"]);
    let (status, _) = call(&app, completion(Some("llama/v1"), "ok", Some("sk-acme"))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = call(&app, completion(Some("llama/v2"), "no", Some("sk-acme"))).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("model_not_allowed")));
    assert_eq!((v1.seen().len(), v2.seen().len()), (1, 0));
}

#[tokio::test]
async fn tokenize_uses_the_named_models_card() {
    let (models, _, _) = two_versions();
    let app = app(AppState::new(models));
    let tokenize = |model: &str| {
        Request::post("/tokenize")
            .header("content-type", "application/json")
            .body(Body::from(json!({"model": model, "prompt": "Hi"}).to_string()))
            .unwrap()
    };
    let (status, body) = call(&app, tokenize("llama/v2")).await;
    assert_eq!((status, body["count"].as_u64()), (StatusCode::OK, Some(2)));
    let (status, _) = call(&app, tokenize("llama/v3")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_unnamed_model_is_waited_for_before_a_name_is_refused() {
    let (named, unnamed) = (OneToken::new(b'n'), OneToken::new(b'u'));
    let (loading, tx) = ServedModel::loading(ModelName::unknown(), unnamed.clone());
    let models = ServedModels::new(vec![loading, ServedModel::ready(model_named("named"), named.clone())]);
    let app = app(AppState::new(Arc::new(models)));

    // Its name is the card's, known only once the card arrives.
    let pending = tokio::spawn({
        let app = app.clone();
        async move { call(&app, completion(Some("tiny"), "early", None)).await }
    });
    let unknown = tokio::spawn({
        let app = app.clone();
        async move { call(&app, completion(Some("nope"), "lost", None)).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert!(!pending.is_finished() && !unknown.is_finished(), "both wait for the unnamed model's card");
    // The named model serves meanwhile.
    let (status, _) = call(&app, completion(Some("named"), "n", None)).await;
    assert_eq!(status, StatusCode::OK);

    tx.send(Some(Arc::new(Model::from_card(&card(), None).unwrap()))).unwrap();
    let (status, body) = pending.await.unwrap();
    assert_eq!((status, body["choices"][0]["text"].as_str()), (StatusCode::OK, Some("u")));
    let (status, body) = unknown.await.unwrap();
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("model_not_found")));
    assert_eq!(unnamed.seen(), ["early"]);
}

#[tokio::test]
async fn ready_while_any_model_can_serve_and_each_counted_under_its_name() {
    let pool = |roster: &Arc<Roster>| vec![ScrapedPool { pool: "decode", roster: roster.clone(), index: None }];
    let (a_workers, b_workers) = (Arc::new(Roster::with_capacity(1)), Arc::new(Roster::with_capacity(1)));
    let (a, b) = (OneToken::new(b'a'), OneToken::new(b'b'));
    let models = ServedModels::new(vec![
        ServedModel::ready(model_named("a"), a).with_pools(pool(&a_workers)),
        ServedModel::ready(model_named("b/1"), b).with_pools(pool(&b_workers)),
    ]);
    let app = app(AppState::new(Arc::new(models)));

    let (status, body) = call(&app, get("/ready", None)).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("no_worker")));
    b_workers.join(Member::new("http://127.0.0.1:1", "b0"));
    let (status, _) = call(&app, get("/ready", None)).await;
    assert_eq!(status, StatusCode::OK, "one model can serve");

    for (model, id) in [("b/1", "1"), ("b/1", "2"), ("a", "3")] {
        assert_eq!(call(&app, completion(Some(model), id, None)).await.0, StatusCode::OK);
    }
    let response = app.clone().oneshot(get("/metrics", None)).await.unwrap();
    let text = String::from_utf8(to_bytes(response.into_body(), usize::MAX).await.unwrap().to_vec()).unwrap();
    // "Hi" is two prompt tokens; each request generates one token and EOS.
    for line in [
        r#"pdserve_router_prompt_tokens_total{model="a"} 2"#,
        r#"pdserve_router_prompt_tokens_total{model="b/1"} 4"#,
        r#"pdserve_router_generation_tokens_total{model="b/1"} 4"#,
        r#"pdserve_router_time_to_first_token_seconds_count{model="b/1"} 2"#,
        r#"pdserve_router_admission_queue_depth{model="a"} 0"#,
        r#"pdserve_router_inflight_requests{model="b/1",worker="0"} 0"#,
        r#"pdserve_router_worker_circuit_state{model="b/1",pool="decode",worker="0"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
    }
    assert!(!text.contains(r#"worker_circuit_state{model="a""#), "a has no worker");
}

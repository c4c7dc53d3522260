//! Admission through the HTTP surface: priority order under saturation, the
//! 429 of a full queue, and the `priority` / `cache_salt` fields.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{to_bytes, Body};
use axum::http::{header, Request, StatusCode};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tower::ServiceExt;

use router::admission::{Admission, AdmissionConfig};
use router::backend::{Backend, Finish, GenerateRequest, TokenChunk, TokenStream};
use router::fleet::model::Model;
use router::fleet::served::ServedModel;
use router::http::app::app;
use router::http::state::AppState;
use router::testutil::{card, EOS};

/// Records each request as it starts; the request with id `slow` holds its
/// stream open until `release` is notified.
#[derive(Default)]
struct GatedBackend {
    started: Mutex<Vec<GenerateRequest>>,
    release: Arc<Notify>,
}

impl Backend for GatedBackend {
    fn generate(&self, request: GenerateRequest) -> TokenStream {
        let slow = request.request_id == "slow";
        self.started.lock().unwrap().push(request);
        let release = self.release.clone();
        let done = TokenChunk { token_ids: vec![EOS], finish: Some(Finish::Stop), ..TokenChunk::default() };
        stream::once(async move {
            if slow {
                release.notified().await;
            }
            Ok(done)
        })
        .boxed()
    }
}

fn setup(max_inflight_per_worker: usize, max_queued: usize) -> (axum::Router, Arc<GatedBackend>, Admission) {
    let backend = Arc::new(GatedBackend::default());
    let admission = Admission::new(AdmissionConfig { max_inflight_per_worker, max_queued }, 1);
    let model = Model::from_card(&card(), None).unwrap();
    let state = AppState::serving(ServedModel::ready(model, backend.clone()).with_admission(admission.clone()));
    (app(state), backend, admission)
}

fn completion(id: &str, extra: Value) -> Request<Body> {
    let mut body = json!({"prompt": "Hi", "max_tokens": 4});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    Request::post("/v1/completions")
        .header("content-type", "application/json")
        .header("x-request-id", id)
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// Waits until `check` holds, polling.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..500 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_better_priority_request_is_admitted_before_earlier_waiters() {
    let (app, backend, admission) = setup(1, 100);
    let started_ids = || backend.started.lock().unwrap().iter().map(|r| r.request_id.clone()).collect::<Vec<_>>();
    let mut tasks = vec![tokio::spawn(app.clone().oneshot(completion("slow", json!({}))))];
    eventually("the slow request to start", || started_ids().len() == 1).await;
    // Queue the twenty one by one so their arrival order is known.
    for i in 0..20 {
        tasks.push(tokio::spawn(app.clone().oneshot(completion(&format!("low-{i}"), json!({"priority": 10})))));
        eventually("the request to queue", || admission.stats().queued == i + 1).await;
    }
    tasks.push(tokio::spawn(app.clone().oneshot(completion("urgent", json!({"priority": -10})))));
    eventually("the urgent request to queue", || admission.stats().queued == 21).await;
    assert_eq!(admission.stats().in_flight, [1]);

    backend.release.notify_one();
    for task in tasks {
        let response = task.await.unwrap().unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
    let mut want = vec!["slow".to_owned(), "urgent".to_owned()];
    want.extend((0..20).map(|i| format!("low-{i}")));
    assert_eq!(started_ids(), want);
    let priorities: Vec<i32> = backend.started.lock().unwrap().iter().map(|r| r.priority).collect();
    assert_eq!(priorities[..3], [0, -10, 10]);
    assert_eq!(admission.stats().queued, 0);
    assert_eq!(admission.stats().in_flight, [0]);
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let (app, backend, admission) = setup(1, 1);
    let slow = tokio::spawn(app.clone().oneshot(completion("slow", json!({"stream": true}))));
    eventually("the slow request to start", || backend.started.lock().unwrap().len() == 1).await;
    let queued = tokio::spawn(app.clone().oneshot(completion("queued", json!({}))));
    eventually("the request to queue", || admission.stats().queued == 1).await;

    let refused = app.clone().oneshot(completion("refused", json!({"priority": -100}))).await.unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
    let body: Value = serde_json::from_slice(&to_bytes(refused.into_body(), usize::MAX).await.unwrap()).unwrap();
    assert_eq!(body["error"]["type"], "RateLimitError");
    assert_eq!(body["error"]["code"], "queue_full");

    backend.release.notify_one();
    // The streamed answer holds its slot until its body is read to the end.
    let slow = slow.await.unwrap().unwrap();
    to_bytes(slow.into_body(), usize::MAX).await.unwrap();
    assert_eq!(queued.await.unwrap().unwrap().status(), StatusCode::OK);
    eventually("every slot to be free", || admission.stats().in_flight == [0]).await;
}

#[tokio::test]
async fn priority_and_cache_salt_reach_the_backend_and_are_checked() {
    let (app, backend, _) = setup(4, 4);
    let ok = app.clone().oneshot(completion("a", json!({"priority": -3, "cache_salt": "tenant-1"}))).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    let ok = app.clone().oneshot(completion("b", json!({}))).await.unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    {
        let started = backend.started.lock().unwrap();
        assert_eq!((started[0].priority, started[0].cache_salt.as_deref()), (-3, Some("tenant-1")));
        assert_eq!((started[1].priority, started[1].cache_salt.as_deref()), (0, None));
    }
    for (bad, param) in [
        (json!({"priority": 2_147_483_648_i64}), "priority"),
        (json!({"priority": -2_147_483_649_i64}), "priority"),
        (json!({"cache_salt": ""}), "cache_salt"),
    ] {
        let response = app.clone().oneshot(completion("bad", bad.clone())).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
        let body: Value = serde_json::from_slice(&to_bytes(response.into_body(), usize::MAX).await.unwrap()).unwrap();
        assert_eq!(body["error"]["param"], param, "{bad}");
    }
}

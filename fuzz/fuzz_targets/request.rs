//! Any bytes as the body of any of the router's POST routes: parsing,
//! validation, tokenization and the error mapping must answer every one with
//! a 2xx or a 4xx carrying an OpenAI-shaped error, never a panic or a 5xx.
//! The first byte picks the route; the rest is the body.

#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::{to_bytes, Body};
use axum::http::Request;
use futures::stream::{self, StreamExt};
use libfuzzer_sys::fuzz_target;
use router::fleet::model::Model;
use router::backend::{Backend, Finish, GenerateRequest, TokenChunk, TokenStream};
use router::{app, AppState};
use router::testutil::{card, EOS};
use tower::ServiceExt;

/// Answers "ok" then EOS to whatever passes validation.
struct Instant;

impl Backend for Instant {
    fn generate(&self, _: GenerateRequest) -> TokenStream {
        let text = TokenChunk { token_ids: vec![111, 107], ..TokenChunk::default() };
        let end = TokenChunk { token_ids: vec![EOS], finish: Some(Finish::Stop), ..TokenChunk::default() };
        stream::iter([Ok(text), Ok(end)]).boxed()
    }
}

const ROUTES: [&str; 4] = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"];

fn harness() -> &'static (tokio::runtime::Runtime, axum::Router) {
    static HARNESS: OnceLock<(tokio::runtime::Runtime, axum::Router)> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let model = Model::from_card(&card(), None).unwrap();
        (runtime, app(AppState::ready(model, Arc::new(Instant))))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&route, body)) = data.split_first() else { return };
    let path = ROUTES[usize::from(route) % ROUTES.len()];
    let (runtime, app) = harness();
    runtime.block_on(async {
        let request =
            Request::post(path).header("content-type", "application/json").body(Body::from(body.to_vec())).unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
        assert!(!status.is_server_error(), "{path}: {status} for {:?}", String::from_utf8_lossy(body));
        if status.is_client_error() {
            let error: serde_json::Value = serde_json::from_slice(&bytes).expect("a JSON error body");
            assert!(error["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{error}");
            assert!(error["error"]["code"].is_string(), "{error}");
        }
    });
});

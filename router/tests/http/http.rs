//! The HTTP surface over a fake backend: body and chunk shapes, errors.

use std::sync::{Arc, Mutex};

use axum::body::{to_bytes, Body};
use axum::http::{Request, StatusCode};
use futures::stream::{self, StreamExt};
use proto::worker::ModelCard;
use serde_json::{json, Value};
use tower::ServiceExt;

use router::backend::{Backend, BackendError, Finish, GenerateRequest, TokenChunk, TokenLogprobs, TokenStream};
use router::fleet::breaker::Failure;
use router::fleet::model::Model;
use router::http::app::app;
use router::http::state::AppState;
use router::testutil::{card, ids, EOS};

/// Answers every request with `chunks`, recording what it was asked.
pub(crate) struct FakeBackend {
    chunks: Vec<Result<TokenChunk, BackendError>>,
    pub(crate) seen: Mutex<Vec<GenerateRequest>>,
}

impl Backend for FakeBackend {
    fn generate(&self, request: GenerateRequest) -> TokenStream {
        self.seen.lock().unwrap().push(request);
        stream::iter(self.chunks.clone()).boxed()
    }
}

pub(crate) fn hello_chunks() -> Vec<Result<TokenChunk, BackendError>> {
    // "Hé" with the é split over two tokens, then " you" and eos.
    vec![
        Ok(TokenChunk { token_ids: ids("H"), ..TokenChunk::default() }),
        Ok(TokenChunk { token_ids: ids("é you"), ..TokenChunk::default() }),
        Ok(TokenChunk { token_ids: vec![EOS], finish: Some(Finish::Stop), ..TokenChunk::default() }),
    ]
}

fn setup(chunks: Vec<Result<TokenChunk, BackendError>>) -> (axum::Router, Arc<FakeBackend>) {
    setup_card(&card(), chunks)
}

pub(crate) fn setup_card(
    card: &ModelCard,
    chunks: Vec<Result<TokenChunk, BackendError>>,
) -> (axum::Router, Arc<FakeBackend>) {
    let backend = Arc::new(FakeBackend { chunks, seen: Mutex::new(Vec::new()) });
    let model = Model::from_card(card, None).unwrap();
    (app(AppState::ready(model, backend.clone())), backend)
}

pub(crate) async fn post(app: axum::Router, path: &str, body: &str) -> (StatusCode, String) {
    let request = Request::post(path)
        .header("content-type", "application/json")
        .header("x-request-id", "req-42")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

pub(crate) async fn post_json(app: axum::Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, text) = post(app, path, &body.to_string()).await;
    (status, serde_json::from_str(&text).unwrap())
}

/// The `data:` payloads of an SSE body.
fn events(body: &str) -> Vec<String> {
    body.lines().filter_map(|line| line.strip_prefix("data: ")).map(str::to_owned).collect()
}

fn chat_body(extra: Value) -> Value {
    let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

#[tokio::test]
async fn chat_completion_body() {
    let (app, backend) = setup(hello_chunks());
    let (status, body) = post_json(app, "/v1/chat/completions", chat_body(json!({}))).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "tiny");
    assert_eq!(
        body["choices"],
        json!([{"index": 0, "message": {"role": "assistant", "content": "Hé you"},
                "logprobs": null, "finish_reason": "stop", "stop_reason": null}])
    );
    let prompt_tokens = backend.seen.lock().unwrap()[0].prompt_token_ids.len();
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": 8,
                                     "total_tokens": prompt_tokens + 8})
    );
    assert_eq!(backend.seen.lock().unwrap()[0].request_id, "req-42");
}

/// "Hi" then eos, each with logprobs that name the token (logprob -id).
fn chunks_with_logprobs() -> Vec<Result<TokenChunk, BackendError>> {
    let lp = |id: u32| TokenLogprobs {
        logprob: -(id as f32),
        top: vec![(id, -(id as f32)), (b'z'.into(), -200.0)],
        rank: 1,
    };
    vec![
        Ok(TokenChunk {
            token_ids: ids("Hi"),
            logprobs: ids("Hi").into_iter().map(lp).collect(),
            ..TokenChunk::default()
        }),
        Ok(TokenChunk {
            token_ids: vec![EOS],
            logprobs: vec![lp(EOS)],
            finish: Some(Finish::Stop),
            ..TokenChunk::default()
        }),
    ]
}

#[tokio::test]
async fn chat_logprobs_body_and_stream() {
    let (app, backend) = setup(chunks_with_logprobs());
    let body = chat_body(json!({"logprobs": true, "top_logprobs": 2}));
    let (status, whole) = post_json(app.clone(), "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    assert_eq!(backend.seen.lock().unwrap()[0].sampling.logprobs, Some(2));
    let entry = |token: &str, logprob: f64| {
        json!({"token": token, "logprob": logprob, "bytes": token.as_bytes(),
               "top_logprobs": [{"token": token, "logprob": logprob, "bytes": token.as_bytes()},
                                {"token": "z", "logprob": -200.0, "bytes": [122]}]})
    };
    let want = json!({"content": [entry("H", -72.0), entry("i", -105.0), entry("<eos>", -256.0)]});
    assert_eq!(whole["choices"][0]["logprobs"], want);

    let mut stream_body = body;
    stream_body["stream"] = json!(true);
    let (_, text) = post(app, "/v1/chat/completions", &stream_body.to_string()).await;
    let events = events(&text);
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    // Each content chunk carries its own token's logprobs; eos rides with the finish.
    let streamed: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .flat_map(|content| content.iter().cloned())
        .collect();
    assert_eq!(Value::Array(streamed), want["content"]);
    for c in &chunks[1..] {
        let content = c["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        let tokens: String = c["choices"][0]["logprobs"]["content"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["token"].as_str().unwrap())
            .collect();
        if !content.is_empty() {
            assert_eq!(tokens, content);
        }
    }
}

#[tokio::test]
async fn n_choices_each_with_index_finish_and_stop_strings() {
    // Choice 0 says "ab!" then eos; choice 1 says "xy" and hits max_tokens; interleaved.
    let chunk = |index, text: &str, finish| {
        Ok(TokenChunk {
            index,
            token_ids: ids(text),
            logprobs: vec![],
            finish,
            cached_tokens: None,
            prompt_logprobs: vec![],
        })
    };
    let chunks = vec![
        chunk(1, "x", None),
        chunk(0, "a", None),
        chunk(0, "b!", None),
        chunk(1, "y", Some(Finish::Length)),
        Ok(TokenChunk { token_ids: vec![EOS], finish: Some(Finish::Stop), ..TokenChunk::default() }),
    ];
    let (app, backend) = setup(chunks);
    let body = chat_body(json!({"n": 2, "stop": "!"}));
    let (status, whole) = post_json(app.clone(), "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    assert_eq!(backend.seen.lock().unwrap()[0].sampling.n, 2);
    assert_eq!(
        whole["choices"],
        json!([{"index": 0, "message": {"role": "assistant", "content": "ab"}, "logprobs": null, "finish_reason": "stop",
                "stop_reason": "!"},
               {"index": 1, "message": {"role": "assistant", "content": "xy"}, "logprobs": null, "finish_reason": "length",
                "stop_reason": null}])
    );
    // Completion tokens of both choices: "ab!" (the stop token counts) and "xy".
    assert_eq!(whole["usage"]["completion_tokens"], 5);

    let mut stream_body = body;
    stream_body["stream"] = json!(true);
    let (_, text) = post(app, "/v1/chat/completions", &stream_body.to_string()).await;
    let events = events(&text);
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let mut texts = [String::new(), String::new()];
    let mut finishes = [None, None];
    let mut roles = 0;
    for c in &chunks {
        let choice = &c["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        roles += usize::from(choice["delta"]["role"] == "assistant");
        texts[i].push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        if let Some(reason) = choice["finish_reason"].as_str() {
            assert!(finishes[i].replace(reason.to_string()).is_none(), "choice {i} finished twice");
        }
    }
    assert_eq!(roles, 2, "a role chunk per choice");
    assert_eq!(texts, ["ab", "xy"]);
    assert_eq!(finishes, [Some("stop".to_string()), Some("length".to_string())]);
}

#[tokio::test]
async fn chat_stream_chunks() {
    let (app, _) = setup(hello_chunks());
    let body = chat_body(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let (status, text) = post(app, "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    let events = events(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let content: String = chunks[1..].iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, "Hé you");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 8);
}

#[tokio::test]
async fn completion_body_with_token_ids_and_stop() {
    let (app, _) = setup(hello_chunks());
    let body = json!({"prompt": [1, 2], "stop": [" y"], "return_token_ids": true});
    let (status, body) = post_json(app, "/v1/completions", body).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    let choice = &body["choices"][0];
    assert_eq!(choice["text"], "Hé");
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(choice["token_ids"], json!(ids("Hé y")));
    assert_eq!(body["prompt_token_ids"], json!([1, 2]));
    assert_eq!(body["usage"], json!({"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}));
}

#[tokio::test]
async fn completion_stream_chunks() {
    let (app, _) = setup(hello_chunks());
    let body = json!({"prompt": "ab", "stream": true, "max_tokens": 3, "return_token_ids": true});
    let (_, text) = post(app, "/v1/completions", &body.to_string()).await;
    let events = events(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let texts: Vec<&str> = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["H", "é"]);
    assert_eq!(chunks[0]["object"], "text_completion");
    assert_eq!(chunks[0]["choices"][0]["finish_reason"], Value::Null);
    assert_eq!(chunks[0]["prompt_token_ids"], json!(ids("ab")));
    assert_eq!(chunks[1]["choices"][0]["token_ids"], json!(ids("é")));
    assert_eq!(chunks[1]["choices"][0]["finish_reason"], "length");
}

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, kind: &str, param: Value) {
    assert_eq!(status, want, "{body}");
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(error["type"], kind);
    assert_eq!(error["param"], param);
    assert!(error.get("code").is_some());
}

#[tokio::test]
async fn error_shapes() {
    let (app, _) = setup(hello_chunks());
    let (status, text) = post(app.clone(), "/v1/chat/completions", "{not json").await;
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequestError", Value::Null);

    let (status, body) = post_json(app.clone(), "/v1/chat/completions", chat_body(json!({"model": "gpt-9"}))).await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "NotFoundError", json!("model"));
    assert_eq!(body["error"]["code"], "model_not_found");

    let (status, body) = post_json(app.clone(), "/v1/chat/completions", chat_body(json!({"temperature": 3}))).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequestError", json!("temperature"));

    let (status, body) = post_json(app.clone(), "/v1/chat/completions", json!({"model": "tiny"})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequestError", json!("messages"));

    let (status, body) = post_json(app, "/v1/completions", json!({"prompt": "a".repeat(64)})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequestError", json!("prompt"));
}

#[tokio::test]
async fn worker_failures_are_5xx_or_stream_errors() {
    let failing = vec![Err(BackendError::Unavailable("down".into()))];
    let (app, _) = setup(failing.clone());
    let (status, body) = post_json(app, "/v1/completions", json!({"prompt": "a"})).await;
    assert_error(status, &body, StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailableError", Value::Null);

    let (app, _) = setup(vec![Err(BackendError::Worker("boom".into()))]);
    let (status, _) = post_json(app.clone(), "/v1/completions", json!({"prompt": "a"})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let (_, text) = post(app, "/v1/completions", &json!({"prompt": "a", "stream": true}).to_string()).await;
    let events = events(&text);
    assert_eq!(events.len(), 3, "{events:?}");
    let end: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(end["choices"][0]["finish_reason"], "error");
    let error: Value = serde_json::from_str(&events[1]).unwrap();
    assert_eq!(error["error"]["code"], "worker_error");
    assert_eq!(events[2], "[DONE]");
}

#[tokio::test]
async fn a_worker_dying_mid_stream_ends_each_open_choice_with_an_error() {
    let chunks = vec![
        Ok(TokenChunk { token_ids: ids("H"), ..TokenChunk::default() }),
        Ok(TokenChunk { index: 1, token_ids: vec![EOS], finish: Some(Finish::Stop), ..TokenChunk::default() }),
        Err(BackendError::Unavailable("decode worker gone".into())),
    ];
    let (app, _) = setup(chunks);
    let body = chat_body(json!({"stream": true, "n": 2, "max_tokens": 5}));
    let (status, text) = post(app, "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    let events = events(&text);
    let (last, chunks) = events.split_last().unwrap();
    assert_eq!(last, "[DONE]");
    let chunks: Vec<Value> = chunks.iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let finishes: Vec<(u64, &str)> = chunks
        .iter()
        .filter_map(|c| {
            let choice = c["choices"].get(0)?;
            Some((choice["index"].as_u64()?, choice["finish_reason"].as_str()?))
        })
        .collect();
    assert_eq!(finishes, [(1, "stop"), (0, "error")], "only the open choice ends in error");
    assert_eq!(chunks.last().unwrap()["error"]["code"], "worker_unavailable");
}

#[tokio::test]
async fn models_and_health() {
    let (app, _) = setup(vec![]);
    let request = Request::get("/v1/models").body(Body::empty()).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["object"], "list");
    let model = &body["data"][0];
    assert_eq!((model["id"].clone(), model["object"].clone()), (json!("tiny"), json!("model")));
    assert_eq!((model["owned_by"].clone(), model["max_model_len"].clone()), (json!("pdserve"), json!(64)));
    assert!(model["created"].is_u64());
    let request = Request::get("/health").body(Body::empty()).unwrap();
    assert_eq!(app.oneshot(request).await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn ready_waits_for_the_model_and_a_worker_in_every_pool_and_health_only_for_the_process() {
    use router::fleet::model::ModelName;
    use router::fleet::roster::{Member, Roster};
    use router::fleet::served::ServedModel;
    use router::http::state::Readiness;
    use router::metrics::ScrapedPool;
    let backend = Arc::new(FakeBackend { chunks: vec![], seen: Mutex::new(Vec::new()) });
    let (model, tx) = ServedModel::loading(ModelName::unknown(), backend);
    let decode = Arc::new(Roster::with_capacity(1));
    let model = model.with_pools(vec![ScrapedPool { pool: "decode", roster: decode.clone(), index: None }]);
    let readiness = Arc::new(Readiness::default());
    let app = app(AppState::serving(model).with_readiness(readiness.clone()));
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    let status = |path: &'static str| {
        let app = app.clone();
        async move { app.oneshot(get(path)).await.unwrap().status() }
    };
    assert_eq!(status("/health").await, StatusCode::OK);
    assert_eq!(status("/ready").await, StatusCode::SERVICE_UNAVAILABLE);
    tx.send(Some(Arc::new(Model::from_card(&card(), None).unwrap()))).unwrap();
    let (code, body) = get_json(app.clone(), "/ready").await;
    assert_eq!((code, body["error"]["code"].clone()), (StatusCode::SERVICE_UNAVAILABLE, json!("no_worker")));
    decode.join(Member::new("http://127.0.0.1:1", "d"));
    assert_eq!(status("/ready").await, StatusCode::OK);
    // Its only worker found unreachable: the pool has no worker to send a request to.
    decode.breaker(0).failed(Failure::Unreachable);
    let (code, body) = get_json(app.clone(), "/ready").await;
    assert_eq!((code, body["error"]["code"].clone()), (StatusCode::SERVICE_UNAVAILABLE, json!("no_worker")));
    decode.breaker(0).succeeded();
    assert_eq!(status("/ready").await, StatusCode::OK);
    readiness.start_draining();
    let (code, body) = get_json(app.clone(), "/ready").await;
    assert_eq!((code, body["error"]["code"].clone()), (StatusCode::SERVICE_UNAVAILABLE, json!("shutting_down")));
    assert_eq!(status("/health").await, StatusCode::OK);
}

async fn get_json(app: axum::Router, path: &str) -> (StatusCode, Value) {
    let response = app.oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

/// The prompt ids the backend was last asked to generate from.
fn last_prompt(backend: &FakeBackend) -> Value {
    json!(*backend.seen.lock().unwrap().last().unwrap().prompt_token_ids)
}

#[tokio::test]
async fn tokenize_prompt_matches_completions() {
    let mut bos_card = card();
    bos_card.add_bos_token = true;
    let (app, backend) = setup_card(&bos_card, hello_chunks());
    post_json(app.clone(), "/v1/completions", json!({"prompt": "Hé you"})).await;
    let (status, body) = post_json(app.clone(), "/tokenize", json!({"model": "tiny", "prompt": "Hé you"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tokens"], last_prompt(&backend));
    assert_eq!(body["tokens"][0], 256, "BOS, as the card asks");
    assert_eq!(body["count"], 8);
    assert_eq!(body["max_model_len"], 64);
    assert_eq!(body["token_strs"], Value::Null);

    let request = json!({"prompt": "Hé", "add_special_tokens": false, "return_token_strs": true});
    let (_, body) = post_json(app, "/tokenize", request).await;
    assert_eq!(body["tokens"], json!(ids("Hé")));
    // Byte-level vocabulary strings: é is the bytes C3 A9, spelled Ã ©.
    assert_eq!(body["token_strs"], json!(["H", "Ã", "©"]));
}

#[tokio::test]
async fn tokenize_chat_matches_chat_completions() {
    let (app, backend) = setup(hello_chunks());
    post_json(app.clone(), "/v1/chat/completions", chat_body(json!({}))).await;
    let (status, body) = post_json(app.clone(), "/tokenize", chat_body(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tokens"], last_prompt(&backend));
    let model = Model::from_card(&card(), None).unwrap();
    let request = serde_json::from_value(chat_body(json!({}))).unwrap();
    let valid = router::prepare::validate::validate_chat(&model, request).unwrap();
    assert_eq!(body["tokens"], json!(valid.prompt_token_ids));
    assert_eq!(body["count"], valid.prompt_token_ids.len());

    // The defaults, spelled out, change nothing; add_special_tokens adds BOS.
    let defaults = json!({"add_generation_prompt": true, "continue_final_message": false,
                          "add_special_tokens": false, "chat_template_kwargs": {}});
    let (_, same) = post_json(app.clone(), "/tokenize", chat_body(defaults)).await;
    assert_eq!(same["tokens"], body["tokens"]);
    let mut bos_card = card();
    bos_card.add_bos_token = true;
    let (bos_app, _) = setup_card(&bos_card, vec![]);
    let (_, with_bos) = post_json(bos_app, "/tokenize", chat_body(json!({"add_special_tokens": true}))).await;
    assert_eq!(with_bos["tokens"][0], 256);
    assert_eq!(with_bos["tokens"].as_array().unwrap()[1..], body["tokens"].as_array().unwrap()[..]);
}

/// A ChatML-like card whose template shows every rendering option it sees.
fn options_card() -> ModelCard {
    let template = "{% if tools %}[{% for t in tools %}{{ t.function.name }}{% endfor %}]{% endif %}\
        {% for m in messages %}{{ m.role }}:{{ m.content }}|{% endfor %}\
        {% if enable_thinking is defined %}think={{ enable_thinking }}|{% endif %}\
        {% if add_generation_prompt %}assistant:{% endif %}";
    ModelCard { chat_template: template.into(), ..roomy_card() }
}

#[tokio::test]
async fn tokenize_renders_with_chats_options() {
    let (app, backend) = setup_card(&options_card(), hello_chunks());
    let tokens = |app: axum::Router, extra: Value| async move {
        let (status, body) = post_json(app, "/tokenize", chat_body(extra)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["tokens"].clone()
    };
    assert_eq!(tokens(app.clone(), json!({})).await, json!(ids("user:Hi|assistant:")));
    assert_eq!(tokens(app.clone(), json!({"add_generation_prompt": false})).await, json!(ids("user:Hi|")));
    let kwargs = json!({"chat_template_kwargs": {"enable_thinking": false}});
    assert_eq!(tokens(app.clone(), kwargs).await, json!(ids("user:Hi|think=False|assistant:")));
    let own = json!({"chat_template": "{% for m in messages %}<{{ m.content }}>{% endfor %}"});
    assert_eq!(tokens(app.clone(), own).await, json!(ids("<Hi>")));
    // Tools are rendered as chat renders them, and the ids are the chat's.
    let with_tools = json!({"tools": [weather_tool()]});
    let tokenized = tokens(app.clone(), with_tools.clone()).await;
    assert_eq!(tokenized, json!(ids("[weather]user:Hi|assistant:")));
    post_json(app.clone(), "/v1/chat/completions", chat_body(with_tools)).await;
    assert_eq!(last_prompt(&backend), tokenized);
    let messages = json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]);
    let body = json!({"messages": messages, "continue_final_message": true, "add_generation_prompt": false});
    let (_, continued) = post_json(app.clone(), "/tokenize", body).await;
    assert_eq!(continued["tokens"], json!(ids("user:Hi|assistant:Hel")));

    for (extra, param) in [
        (json!({"continue_final_message": true, "add_generation_prompt": true}), "continue_final_message"),
        (json!({"continue_final_message": true}), "continue_final_message"),
        (json!({"chat_template": "{% if %}"}), "chat_template"),
        (json!({"chat_template_kwargs": [1]}), "chat_template_kwargs"),
        (json!({"tools": {"type": "function"}}), "tools"),
        (json!({"prompt": "Hi"}), "messages"),
    ] {
        let (status, body) = post_json(app.clone(), "/tokenize", chat_body(extra)).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequestError", json!(param));
    }
    let (status, body) = post_json(app, "/tokenize", json!({"model": "tiny"})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequestError", json!("prompt"));
}

#[tokio::test]
async fn chat_rendering_options_reach_the_template() {
    let (app, backend) = setup_card(&options_card(), hello_chunks());
    let chat = |extra: Value| {
        let app = app.clone();
        async move {
            let (status, body) = post_json(app, "/v1/chat/completions", chat_body(extra)).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    };
    chat(json!({"chat_template_kwargs": {"enable_thinking": true}})).await;
    assert_eq!(last_prompt(&backend), json!(ids("user:Hi|think=True|assistant:")));
    chat(json!({"chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"})).await;
    // The model's BOS text parses back into its special token.
    assert_eq!(last_prompt(&backend), json!([256, 72, 105]));
    chat(json!({"add_generation_prompt": false})).await;
    assert_eq!(last_prompt(&backend), json!(ids("user:Hi|")));
    let messages = json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]);
    let body = json!({"messages": messages, "continue_final_message": true});
    let (status, _) = post_json(app.clone(), "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(last_prompt(&backend), json!(ids("user:Hi|assistant:Hel")));
    let body = json!({"messages": messages, "continue_final_message": true, "add_generation_prompt": true});
    let (status, body) = post_json(app, "/v1/chat/completions", body).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequestError", json!("continue_final_message"));
}

#[tokio::test]
async fn tool_call_arguments_reach_the_template_as_a_mapping() {
    let template = "{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}\
        {% if c.function.arguments is mapping %}{% for k, v in c.function.arguments.items() %}{{ k }}={{ v }};{% endfor %}\
        {% else %}raw:{{ c.function.arguments }};{% endif %}{% endfor %}{% endif %}{% endfor %}";
    let card = ModelCard { chat_template: template.into(), ..roomy_card() };
    let (app, _) = setup_card(&card, vec![]);
    let call = |arguments: &str| json!({"id": "c", "type": "function", "function": {"name": "weather", "arguments": arguments}});
    let messages = json!([{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": null,
                           "tool_calls": [call("{\"city\": \"Paris\"}"), call("not json"), call("[1]")]}]);
    let (status, body) = post_json(app, "/tokenize", json!({"messages": messages})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tokens"], json!(ids("city=Paris;raw:not json;raw:[1];")));
}

#[tokio::test]
async fn detokenize_round_trips_and_checks_the_vocabulary() {
    let (app, _) = setup(vec![]);
    let (_, tokenized) = post_json(app.clone(), "/tokenize", json!({"prompt": "Hé you"})).await;
    let (status, body) = post_json(app.clone(), "/detokenize", json!({"tokens": tokenized["tokens"]})).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"prompt": "Hé you"})));
    // Special tokens are kept, as vLLM decodes them.
    let (_, body) = post_json(app.clone(), "/detokenize", json!({"model": "tiny", "tokens": [257, 72]})).await;
    assert_eq!(body, json!({"prompt": "<|im_start|>H"}));

    for tokens in [json!([72, 259]), json!([-1])] {
        let (status, body) = post_json(app.clone(), "/detokenize", json!({"tokens": tokens})).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequestError", json!("tokens"));
    }
    let (status, body) = post_json(app, "/detokenize", json!({})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequestError", json!("tokens"));
}

#[tokio::test]
async fn tokenize_and_detokenize_error_shapes() {
    let (app, _) = setup(vec![]);
    for (path, body) in [
        ("/tokenize", json!({"model": "gpt-9", "prompt": "Hi"})),
        ("/detokenize", json!({"model": "gpt-9", "tokens": [72]})),
    ] {
        let (status, body) = post_json(app.clone(), path, body).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "NotFoundError", json!("model"));
        assert_eq!(body["error"]["code"], "model_not_found");
    }
    for (path, body) in [
        ("/tokenize", "{not json".to_owned()),
        ("/tokenize", json!({"prompt": 5}).to_string()),
        ("/tokenize", json!({"prompt": "Hi", "return_token_strs": "yes"}).to_string()),
        ("/detokenize", json!({"tokens": "72"}).to_string()),
    ] {
        let (status, text) = post(app.clone(), path, &body).await;
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequestError", Value::Null);
        assert_eq!(body["error"]["code"], "invalid_json");
    }
    // Found by schemathesis: tools (here with an invalid type) beside a plain prompt were ignored.
    let tools = json!([{"type": "x", "function": {"name": "f"}}]);
    let (status, body) = post_json(app.clone(), "/tokenize", json!({"prompt": "Hi", "tools": tools})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequestError", json!("tools"));
}

#[tokio::test]
async fn tokenize_is_503_when_the_model_never_loads() {
    let backend = Arc::new(FakeBackend { chunks: vec![], seen: Mutex::new(Vec::new()) });
    let (state, tx) = AppState::loading(backend);
    drop(tx);
    let (status, body) = post_json(app(state), "/tokenize", json!({"prompt": "Hi"})).await;
    assert_error(status, &body, StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailableError", Value::Null);
}

#[tokio::test]
async fn version_is_the_crate_version() {
    let backend = Arc::new(FakeBackend { chunks: vec![], seen: Mutex::new(Vec::new()) });
    // No model needed: it answers while the card is still loading.
    let (state, _tx) = AppState::loading(backend);
    let (status, body) = get_json(app(state), "/version").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"version": env!("CARGO_PKG_VERSION")})));
}

/// A card with room for longer scripted outputs.
fn roomy_card() -> ModelCard {
    ModelCard { context_length: 512, ..card() }
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "weather", "description": "Weather now",
                                            "parameters": {"type": "object"}}})
}

/// A think block, a line of text and a Hermes tool call, split mid-tag.
fn tool_call_chunks() -> Vec<Result<TokenChunk, BackendError>> {
    let chunk = |text: &str| Ok(TokenChunk { token_ids: ids(text), ..TokenChunk::default() });
    vec![
        chunk("<thi"),
        chunk("nk>need weather</th"),
        chunk("ink>\n\nChecking.<tool"),
        chunk("_call>\n{\"name\": \"weather\", "),
        chunk("\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"),
        Ok(TokenChunk { token_ids: vec![EOS], finish: Some(Finish::Stop), ..TokenChunk::default() }),
    ]
}

#[tokio::test]
async fn chat_tool_calls_and_reasoning_whole() {
    let (app, _) = setup_card(&roomy_card(), tool_call_chunks());
    let (status, body) =
        post_json(app.clone(), "/v1/chat/completions", chat_body(json!({"tools": [weather_tool()]}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let message = &choice["message"];
    assert_eq!(message["reasoning_content"], "need weather");
    assert_eq!(message["content"], "Checking.");
    let id = message["tool_calls"][0]["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("call_"), "{id}");
    assert_eq!(
        message["tool_calls"],
        json!([{"id": id, "type": "function",
                "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}])
    );

    // tool_choice "none": the think block is still split off, the call is text.
    let body = chat_body(json!({"tools": [weather_tool()], "tool_choice": "none"}));
    let (_, body) = post_json(app, "/v1/chat/completions", body).await;
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    assert!(choice["message"].get("tool_calls").is_none());
    assert_eq!(choice["message"]["reasoning_content"], "need weather");
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(content.starts_with("Checking.<tool_call>\n{\"name\""), "{content}");
}

#[tokio::test]
async fn chat_tool_calls_and_reasoning_streamed() {
    let (app, _) = setup_card(&roomy_card(), tool_call_chunks());
    let body = chat_body(json!({"tools": [weather_tool()], "stream": true}));
    let (status, text) = post(app, "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    let events = events(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    let joined = |field: &str| deltas.iter().filter_map(|d| d[field].as_str()).collect::<String>();
    assert_eq!(joined("reasoning_content"), "need weather");
    // Tags are held back, never sent as content, not even in part.
    assert_eq!(joined("content"), "Checking.");
    let calls: Vec<&Value> = deltas.iter().filter_map(|d| d.get("tool_calls")).collect();
    assert_eq!(calls.len(), 1);
    let call = &calls[0][0];
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(
        call,
        &json!({"index": 0, "id": call["id"], "type": "function",
                "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}})
    );
    let finish = chunks.last().unwrap();
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn tools_and_tool_messages_reach_the_template() {
    let template = "{% if tools %}{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% endif %}\
        {% for m in messages %}{{ m.role }}:{% if m.tool_calls %}{{ m.tool_calls[0].function.name }}{% endif %}\
        {% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %}{{ m.content }};{% endfor %}";
    let card = ModelCard { chat_template: template.into(), ..roomy_card() };
    let (app, backend) = setup_card(&card, hello_chunks());
    let call = json!({"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}});
    let messages = json!([
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]);
    let body = json!({"messages": messages, "tools": [weather_tool()]});
    let (status, _) = post_json(app.clone(), "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(last_prompt(&backend), json!(ids("[weather]user:Hi;assistant:weather;tool:(call_1)sunny;")));
    // tool_choice "none" renders without the tools.
    let body = json!({"messages": messages, "tools": [weather_tool()], "tool_choice": "none"});
    post_json(app, "/v1/chat/completions", body).await;
    assert_eq!(last_prompt(&backend), json!(ids("user:Hi;assistant:weather;tool:(call_1)sunny;")));
}

#[tokio::test]
async fn bad_tool_choice_is_a_400_naming_it() {
    let (app, _) = setup(hello_chunks());
    let body =
        chat_body(json!({"tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "x"}}}));
    let (status, body) = post_json(app, "/v1/chat/completions", body).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequestError", json!("tool_choice"));
}

/// The `/metrics` text, checked to parse as the Prometheus text format:
/// `# HELP` / `# TYPE` comments and `name{label="value",...} value` samples.
async fn scrape(app: axum::Router) -> String {
    let response = app.oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = String::from_utf8(to_bytes(response.into_body(), usize::MAX).await.unwrap().to_vec()).unwrap();
    let is_name = |name: &str| {
        !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut words = comment.splitn(3, ' ');
            let (kind, name) = (words.next().unwrap(), words.next().unwrap_or(""));
            assert!(matches!(kind, "HELP" | "TYPE") && is_name(name), "bad comment: {line}");
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        assert!(value.parse::<f64>().is_ok(), "bad value: {line}");
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.strip_suffix('}').unwrap_or_else(|| panic!("bad labels: {line}"))),
            None => (series, ""),
        };
        assert!(is_name(name) && name.starts_with("pdserve_router_"), "bad name: {line}");
        for label in labels.split(',').filter(|l| !l.is_empty()) {
            let (key, quoted) = label.split_once('=').unwrap_or_else(|| panic!("bad label: {line}"));
            assert!(is_name(key) && quoted.len() >= 2 && quoted.starts_with('"') && quoted.ends_with('"'), "{line}");
        }
    }
    text
}

/// The value of the sample `series` (name and labels as printed).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{text}"))
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_latencies() {
    let (app, _) = setup(hello_chunks());
    let (status, whole) = post_json(app.clone(), "/v1/chat/completions", chat_body(json!({}))).await;
    assert_eq!(status, StatusCode::OK);
    let body = chat_body(json!({"stream": true, "stream_options": {"include_usage": true}}));
    let (status, text) = post(app.clone(), "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    let events = events(&text);
    let streamed: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    let usages = [&whole["usage"], &streamed["usage"]];
    let total = |field: &str| usages.iter().map(|u| u[field].as_f64().unwrap()).sum::<f64>();

    let metrics = scrape(app.clone()).await;
    let chat = |status: &str| {
        format!("pdserve_router_requests_total{{endpoint=\"/v1/chat/completions\",status=\"{status}\"}}")
    };
    assert_eq!(sample(&metrics, &chat("200")), 2.0);
    assert_eq!(sample(&metrics, "pdserve_router_prompt_tokens_total{model=\"tiny\"}"), total("prompt_tokens"));
    assert_eq!(sample(&metrics, "pdserve_router_generation_tokens_total{model=\"tiny\"}"), total("completion_tokens"));
    assert!(!metrics.contains("pdserve_router_prefix_cached_tokens_total{"), "the fake backend reports none");
    for histogram in ["time_to_first_token", "queue_time"] {
        let series = format!("pdserve_router_{histogram}_seconds_count{{model=\"tiny\"}}");
        assert_eq!(sample(&metrics, &series), 2.0, "{histogram}");
    }
    assert_eq!(sample(&metrics, "pdserve_router_e2e_request_latency_seconds_count"), 2.0);
    // Three chunks with tokens per request: two gaps each.
    assert_eq!(sample(&metrics, "pdserve_router_inter_token_latency_seconds_count{model=\"tiny\"}"), 4.0);
    assert_eq!(sample(&metrics, "pdserve_router_admission_queue_depth{model=\"tiny\"}"), 0.0);
    assert_eq!(sample(&metrics, "pdserve_router_inflight_requests{model=\"tiny\",worker=\"0\"}"), 0.0);

    // A refused request is counted under its status, and not timed.
    let (status, _) = post_json(app.clone(), "/v1/chat/completions", chat_body(json!({"temperature": 5}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = post(app.clone(), "/v1/completions", "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let metrics = scrape(app).await;
    assert_eq!(sample(&metrics, &chat("400")), 1.0);
    assert_eq!(sample(&metrics, &chat("200")), 2.0);
    assert_eq!(sample(&metrics, "pdserve_router_requests_total{endpoint=\"/v1/completions\",status=\"400\"}"), 1.0);
    assert_eq!(sample(&metrics, "pdserve_router_e2e_request_latency_seconds_count"), 2.0);
}

/// Sends its first chunk, then never ends.
struct HangingBackend;

impl Backend for HangingBackend {
    fn generate(&self, _: GenerateRequest) -> TokenStream {
        let first = TokenChunk { token_ids: ids("Hi"), ..TokenChunk::default() };
        stream::iter([Ok(first)]).chain(stream::pending()).boxed()
    }
}

#[tokio::test]
async fn a_dropped_stream_is_counted_once_and_timed() {
    let model = Model::from_card(&card(), None).unwrap();
    let state = AppState::ready(model, Arc::new(HangingBackend));
    let app = app(state);
    let body = chat_body(json!({"stream": true}));
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let mut frames = response.into_body().into_data_stream();
    // Read until both tokens' text went out (one delta each).
    let mut seen = String::new();
    while !seen.contains("\"content\":\"i\"") {
        seen.push_str(std::str::from_utf8(&frames.next().await.unwrap().unwrap()).unwrap());
    }
    let metrics = scrape(app.clone()).await;
    assert!(!metrics.contains("status=\"200\""), "counted before the stream ended:\n{metrics}");
    assert_eq!(sample(&metrics, "pdserve_router_inflight_requests{model=\"tiny\",worker=\"0\"}"), 1.0);
    drop(frames); // The client goes away.

    let metrics = scrape(app.clone()).await;
    let chat = "pdserve_router_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}";
    assert_eq!(sample(&metrics, chat), 1.0);
    assert_eq!(sample(&metrics, "pdserve_router_e2e_request_latency_seconds_count"), 1.0);
    assert_eq!(sample(&metrics, "pdserve_router_time_to_first_token_seconds_count{model=\"tiny\"}"), 1.0);
    assert_eq!(sample(&metrics, "pdserve_router_generation_tokens_total{model=\"tiny\"}"), 2.0);
    // The generation task notices the client left and frees the slot.
    for _ in 0..100 {
        if sample(&scrape(app.clone()).await, "pdserve_router_inflight_requests{model=\"tiny\",worker=\"0\"}") == 0.0 {
            let metrics = scrape(app).await;
            assert_eq!(sample(&metrics, chat), 1.0, "counted exactly once");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("the slot was never freed");
}

/// An idle stream sends a comment every 15 s, so that proxies keep it open; the tokens that come
/// later still go out.
#[tokio::test(start_paused = true)]
async fn an_idle_stream_sends_keep_alive_comments() {
    let model = Model::from_card(&card(), None).unwrap();
    let app = app(AppState::ready(model, Arc::new(HangingBackend)));
    let body = chat_body(json!({"stream": true}));
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    let mut frames = response.into_body().into_data_stream();
    let mut seen = String::new();
    while !seen.contains("\"content\":\"i\"") {
        seen.push_str(std::str::from_utf8(&frames.next().await.unwrap().unwrap()).unwrap());
    }
    let start = tokio::time::Instant::now();
    for _ in 0..2 {
        // Time stands still until every task waits, then jumps to the next timer.
        let frame = frames.next().await.unwrap().unwrap();
        assert_eq!(frame, ":\n\n");
    }
    assert_eq!(start.elapsed(), std::time::Duration::from_secs(30));
}

#[tokio::test]
async fn completion_echo_whole_and_streamed() {
    let (app, _) = setup(hello_chunks());
    let (status, body) = post_json(app.clone(), "/v1/completions", json!({"prompt": "ab", "echo": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], "abHé you");
    // Token-id prompts echo their decoded text.
    let (_, body) = post_json(app.clone(), "/v1/completions", json!({"prompt": ids("xy"), "echo": true})).await;
    assert_eq!(body["choices"][0]["text"], "xyHé you");
    let (_, body) = post_json(app.clone(), "/v1/completions", json!({"prompt": "ab"})).await;
    assert_eq!(body["choices"][0]["text"], "Hé you");

    let request = json!({"prompt": "ab", "echo": true, "stream": true, "n": 2});
    let (_, text) = post(app.clone(), "/v1/completions", &request.to_string()).await;
    let events = events(&text);
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let mut texts = [String::new(), String::new()];
    let mut firsts = [None, None];
    for c in &chunks {
        let choice = &c["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        let piece = choice["text"].as_str().unwrap();
        firsts[i].get_or_insert_with(|| piece.to_owned());
        texts[i].push_str(piece);
    }
    // The fake backend sends choice 0's tokens only; choice 1 ends empty.
    // Each starts with the prompt, once.
    assert_eq!(texts, ["abHé you", "ab"]);
    assert!(firsts.iter().all(|f| f.as_deref().unwrap().starts_with("ab")));

    // Echo with logprobs scores the prompt, which a stream cannot carry.
    let body = json!({"prompt": "ab", "echo": true, "logprobs": 1, "stream": true});
    let (status, body) = post_json(app, "/v1/completions", body).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequestError", json!("echo"));
}

#[tokio::test]
async fn chat_echo_prepends_the_final_assistant_message() {
    let (app, _) = setup(hello_chunks());
    let messages = json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well, "}]);
    let body = json!({"messages": messages, "echo": true, "continue_final_message": true});
    let (status, whole) = post_json(app.clone(), "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    assert_eq!(whole["choices"][0]["message"]["content"], "Well, Hé you");

    let mut stream_body = body;
    stream_body["stream"] = json!(true);
    let (_, text) = post(app.clone(), "/v1/chat/completions", &stream_body.to_string()).await;
    let events = events(&text);
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[1]["choices"][0]["delta"], json!({"content": "Well, "}));
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, "Well, Hé you");

    // The last message is the user's: nothing to echo.
    let (_, whole) = post_json(app, "/v1/chat/completions", chat_body(json!({"echo": true}))).await;
    assert_eq!(whole["choices"][0]["message"]["content"], "Hé you");
}

#[tokio::test]
async fn include_stop_str_in_output_keeps_the_stop_string() {
    let (app, _) = setup(hello_chunks());
    let body = json!({"prompt": "ab", "stop": [" y"], "include_stop_str_in_output": true});
    let (_, whole) = post_json(app.clone(), "/v1/completions", body.clone()).await;
    assert_eq!(whole["choices"][0]["text"], "Hé y");
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    let mut stream_body = body;
    stream_body["stream"] = json!(true);
    let (_, text) = post(app.clone(), "/v1/completions", &stream_body.to_string()).await;
    let events = events(&text);
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(streamed, "Hé y");
    let (_, whole) = post_json(app, "/v1/chat/completions", chat_body(json!({"stop": " y"}))).await;
    assert_eq!(whole["choices"][0]["message"]["content"], "Hé");
}

#[tokio::test]
async fn skip_special_tokens_false_keeps_them_in_the_text() {
    let chunks = vec![
        Ok(TokenChunk { token_ids: vec![b'a'.into(), 257, b'b'.into()], ..TokenChunk::default() }),
        Ok(TokenChunk { token_ids: vec![EOS], finish: Some(Finish::Stop), ..TokenChunk::default() }),
    ];
    let (app, _) = setup(chunks);
    let text_of = |extra: Value| {
        let app = app.clone();
        async move {
            let mut body = json!({"prompt": "x"});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            let (status, body) = post_json(app, "/v1/completions", body).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["choices"][0]["text"].as_str().unwrap().to_owned()
        }
    };
    assert_eq!(text_of(json!({})).await, "ab");
    // The eos that stopped the generation stays out, as in vLLM...
    assert_eq!(text_of(json!({"skip_special_tokens": false})).await, "a<|im_start|>b");
    // ...unless stop strings are kept.
    let both = json!({"skip_special_tokens": false, "include_stop_str_in_output": true});
    assert_eq!(text_of(both).await, "a<|im_start|>b<eos>");
}

#[tokio::test]
async fn request_id_header_wins_over_the_body() {
    let (app, backend) = setup(hello_chunks());
    let send = |header: Option<&'static str>, body: Value| {
        let app = app.clone();
        async move {
            let mut request = Request::post("/v1/completions").header("content-type", "application/json");
            if let Some(id) = header {
                request = request.header("x-request-id", id);
            }
            let response = app.oneshot(request.body(Body::from(body.to_string())).unwrap()).await.unwrap();
            let id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
            let status = response.status();
            let body: Value =
                serde_json::from_slice(&to_bytes(response.into_body(), usize::MAX).await.unwrap()).unwrap();
            (status, id, body)
        }
    };
    let (_, id, body) = send(None, json!({"prompt": "a", "request_id": "body-id"})).await;
    assert_eq!(id, "body-id");
    // As vLLM: the response id is built from the request id.
    assert_eq!(body["id"], "cmpl-body-id", "{body}");
    assert_eq!(backend.seen.lock().unwrap().last().unwrap().request_id, "body-id");
    let (_, id, _) = send(Some("header-id"), json!({"prompt": "a", "request_id": "body-id"})).await;
    assert_eq!(id, "header-id");
    assert_eq!(backend.seen.lock().unwrap().last().unwrap().request_id, "header-id");
    let (_, id, _) = send(None, json!({"prompt": "a"})).await;
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    let (status, id, body) = send(None, json!({"prompt": "a", "request_id": "bad\nid"})).await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequestError", json!("request_id"));
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "an invalid body id is not echoed: {id}");
}

#[tokio::test]
async fn user_is_accepted_and_client_kv_transfer_params_refused() {
    let (app, _) = setup(hello_chunks());
    let body = chat_body(json!({"user": "alice", "kv_transfer_params": {}, "return_token_ids": true}));
    let (status, whole) = post_json(app.clone(), "/v1/chat/completions", body).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    assert_eq!(whole["choices"][0]["token_ids"], json!([72, 195, 169, 32, 121, 111, 117, 256]));
    assert!(whole["prompt_token_ids"].is_array());
    // The router runs the hand-off itself; a client's transfer parameters would be ignored.
    for params in [json!("x"), json!({"do_remote_prefill": true})] {
        let body = chat_body(json!({"kv_transfer_params": params}));
        let (status, body) = post_json(app.clone(), "/v1/chat/completions", body).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, "BadRequestError", json!("kv_transfer_params"));
    }
}

/// Paths and methods the router does not serve get OpenAI-shaped errors (SDKs then raise a
/// `NotFoundError` that says what happened), and a 405 still names the allowed methods.
#[tokio::test]
async fn unknown_routes_and_methods_get_openai_shaped_errors() {
    let (app, _) = setup(hello_chunks());
    for path in ["/v1/moderations", "/v1/images/generations", "/v1/audio/speech", "/v1/audio/transcriptions", "/nope"] {
        let (status, body) = post_json(app.clone(), path, json!({"model": "tiny", "input": "x"})).await;
        assert_error(status, &body, StatusCode::NOT_FOUND, "NotFoundError", Value::Null);
        assert_eq!(body["error"]["code"], "not_found", "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(path), "{body}");
    }
    let response = app.clone().oneshot(Request::get("/v1/completions").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()["allow"], "POST");
    let body: Value = serde_json::from_slice(&to_bytes(response.into_body(), usize::MAX).await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
}

/// A batch of prompts runs one request per prompt (`<id>-<i>` on the workers, as vLLM's), and
/// the answer's choices come prompt-major, each with its prompt's echo and ids; usage adds up.
#[tokio::test]
async fn a_batch_of_prompts_answers_prompt_major() {
    let (app, backend) = setup(hello_chunks());
    let body = json!({"prompt": ["ab", "cd"], "echo": true, "return_token_ids": true});
    let (status, whole) = post_json(app.clone(), "/v1/completions", body.clone()).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let choices = whole["choices"].as_array().unwrap();
    let texts: Vec<&str> = choices.iter().map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["abHé you", "cdHé you"]);
    assert_eq!(choices.iter().map(|c| c["index"].clone()).collect::<Vec<_>>(), [json!(0), json!(1)]);
    assert_eq!(choices[1]["prompt_token_ids"], json!(ids("cd")));
    assert_eq!(whole["usage"]["prompt_tokens"], 4);
    assert_eq!(whole["usage"]["completion_tokens"], 16);
    let seen: Vec<String> = backend.seen.lock().unwrap().iter().map(|r| r.request_id.clone()).collect();
    assert_eq!(seen, ["req-42-0", "req-42-1"]);

    // Streamed, each choice's first chunk carries its echo and its prompt's ids.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let (_, text) = post(app, "/v1/completions", &streamed.to_string()).await;
    let chunks: Vec<Value> =
        events(&text).iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect();
    let mut by_choice = [String::new(), String::new()];
    for chunk in &chunks {
        let choice = &chunk["choices"][0];
        let index = choice["index"].as_u64().unwrap() as usize;
        if by_choice[index].is_empty() {
            assert_eq!(choice["prompt_token_ids"], json!(ids(["ab", "cd"][index])), "{chunk}");
        }
        by_choice[index].push_str(choice["text"].as_str().unwrap());
    }
    assert_eq!(by_choice, ["abHé you", "cdHé you"]);
}

/// vLLM's structural tag, in each place a request may put it, reaches the workers as one grammar
/// that holds the structure after its trigger.
#[tokio::test]
async fn a_structural_tag_reaches_the_workers_as_a_grammar() {
    let (app, backend) = setup(hello_chunks());
    let tag = json!({"structures": [{"begin": "<call=f>", "schema": {"type": "object"}, "end": "</call>"}],
                     "triggers": ["<call="]});
    let mut response_format = tag.clone();
    response_format["type"] = json!("structural_tag");
    for extra in [
        json!({"structured_outputs": {"structural_tag": tag}}),
        json!({"structured_outputs": {"structural_tag": tag.to_string()}}),
        json!({"response_format": response_format}),
    ] {
        let (status, body) = post_json(app.clone(), "/v1/chat/completions", chat_body(extra.clone())).await;
        assert_eq!(status, StatusCode::OK, "{extra}: {body}");
        let seen = backend.seen.lock().unwrap().pop().unwrap();
        let Some(constraint::Constraint::Lark(grammar)) = seen.sampling.constraint.as_deref() else {
            panic!("{extra}: {:?}", seen.sampling.constraint)
        };
        assert!(grammar.contains(r#""<call=""#) && grammar.contains("%json") && grammar.contains(r#""</call>""#));
    }
}

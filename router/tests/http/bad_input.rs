//! Hostile and broken request bodies: each gets the right 4xx with an
//! OpenAI-shaped error, and none reaches a worker or panics.

use std::sync::{Arc, Mutex};

use axum::body::{to_bytes, Body};
use axum::http::{header, Request, StatusCode};
use futures::stream::{self, StreamExt};
use serde_json::Value;
use tower::ServiceExt;

use router::backend::{Backend, Finish, GenerateRequest, TokenChunk, TokenStream};
use router::fleet::model::Model;
use router::http::app::app;
use router::http::state::{AppState, DEFAULT_MAX_BODY_BYTES};
use router::testutil::{card, EOS};

#[derive(Default)]
struct Recording {
    started: Mutex<usize>,
}

impl Backend for Recording {
    fn generate(&self, _: GenerateRequest) -> TokenStream {
        *self.started.lock().unwrap() += 1;
        let done = TokenChunk { token_ids: vec![EOS], finish: Some(Finish::Stop), ..TokenChunk::default() };
        stream::iter([Ok(done)]).boxed()
    }
}

fn setup() -> (axum::Router, Arc<Recording>) {
    let backend = Arc::new(Recording::default());
    let model = Model::from_card(&card(), None).unwrap();
    (app(AppState::ready(model, backend.clone())), backend)
}

/// Sends `body` as-is; returns the status and the parsed error body.
async fn send(app: &axum::Router, path: &str, content_type: Option<&str>, body: Vec<u8>) -> (StatusCode, Value) {
    let mut request = Request::post(path);
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    let response = app.clone().oneshot(request.body(Body::from(body)).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{status}: a JSON error body, got {:?}: {e}", String::from_utf8_lossy(&bytes)));
    (status, body)
}

const JSON: Option<&str> = Some("application/json");

/// What is sent, where, as which content type, and the status and `code`
/// it must get (`""`: any code, as long as the error is shaped).
type Case = (&'static str, &'static str, Option<&'static str>, Vec<u8>, StatusCode, &'static str);

fn chat(extra: &str) -> Vec<u8> {
    format!(r#"{{"messages": [{{"role": "user", "content": "Hi"}}]{extra}}}"#).into_bytes()
}

fn completion(extra: &str) -> Vec<u8> {
    format!(r#"{{"prompt": "Hi"{extra}}}"#).into_bytes()
}

#[tokio::test]
async fn every_bad_body_gets_its_4xx_and_reaches_no_worker() {
    let (app, backend) = setup();
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes();
    let mut invalid_utf8 = br#"{"prompt": "caf"#.to_vec();
    invalid_utf8.extend([0xC3, 0x28, 0xFF]);
    invalid_utf8.extend(br#""}"#);
    let huge = {
        let mut body = br#"{"prompt": ""#.to_vec();
        body.extend(std::iter::repeat_n(b'a', 10 << 20));
        body.extend(br#""}"#);
        body
    };
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            "/v1/chat/completions",
            JSON,
            b"{not json".to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "truncated JSON",
            "/v1/completions",
            JSON,
            br#"{"prompt": "Hi""#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        ("empty body", "/v1/completions", JSON, Vec::new(), StatusCode::BAD_REQUEST, "invalid_json"),
        ("a JSON array", "/v1/completions", JSON, b"[1, 2]".to_vec(), StatusCode::BAD_REQUEST, "invalid_json"),
        // serde reads a struct from an array by position; schemathesis found this one.
        (
            "stream_options as an array",
            "/v1/completions",
            JSON,
            completion(r#", "stream_options": [null]"#),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "a content part as an array",
            "/v1/chat/completions",
            JSON,
            br#"{"messages": [{"role": "user", "content": [["text", "Hi"]]}]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            "a message as an array",
            "/v1/chat/completions",
            JSON,
            br#"{"messages": [["user", "Hi"]]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        ("no content type", "/v1/completions", None, completion(""), StatusCode::BAD_REQUEST, "invalid_json"),
        ("text/plain", "/v1/completions", Some("text/plain"), completion(""), StatusCode::BAD_REQUEST, "invalid_json"),
        ("nesting 100,000 deep", "/v1/completions", JSON, deep, StatusCode::BAD_REQUEST, "invalid_json"),
        ("invalid UTF-8", "/v1/completions", JSON, invalid_utf8, StatusCode::BAD_REQUEST, "invalid_json"),
        ("a 10 MB body", "/v1/completions", JSON, huge, StatusCode::PAYLOAD_TOO_LARGE, "request_too_large"),
        (
            "NaN",
            "/v1/completions",
            JSON,
            completion(r#", "temperature": NaN"#),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "Infinity",
            "/v1/completions",
            JSON,
            completion(r#", "top_p": Infinity"#),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "1e400",
            "/v1/completions",
            JSON,
            completion(r#", "temperature": 1e400"#),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "max_tokens past u64",
            "/v1/completions",
            JSON,
            completion(r#", "max_tokens": 99999999999999999999999"#),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "max_tokens past the context",
            "/v1/completions",
            JSON,
            completion(r#", "max_tokens": 9007199254740991"#),
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
        ),
        ("negative n", "/v1/completions", JSON, completion(r#", "n": -1"#), StatusCode::BAD_REQUEST, "invalid_value"),
        ("huge n", "/v1/completions", JSON, completion(r#", "n": 4294967297"#), StatusCode::BAD_REQUEST, ""),
        (
            "temperature 1e308",
            "/v1/completions",
            JSON,
            completion(r#", "temperature": 1e308"#),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            "a string max_tokens",
            "/v1/completions",
            JSON,
            completion(r#", "max_tokens": "ten""#),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        (
            "a bool temperature",
            "/v1/completions",
            JSON,
            completion(r#", "temperature": true"#),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        ("a number prompt", "/v1/completions", JSON, br#"{"prompt": 5}"#.to_vec(), StatusCode::BAD_REQUEST, ""),
        ("a null prompt", "/v1/completions", JSON, br#"{"prompt": null}"#.to_vec(), StatusCode::BAD_REQUEST, ""),
        ("an empty prompt list", "/v1/completions", JSON, br#"{"prompt": []}"#.to_vec(), StatusCode::BAD_REQUEST, ""),
        (
            "a token past the vocabulary",
            "/v1/completions",
            JSON,
            br#"{"prompt": [1, 4000000000]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "",
        ),
        ("a number stop", "/v1/completions", JSON, completion(r#", "stop": 7"#), StatusCode::BAD_REQUEST, ""),
        (
            "messages as a string",
            "/v1/chat/completions",
            JSON,
            br#"{"messages": "Hi"}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "",
        ),
        ("empty messages", "/v1/chat/completions", JSON, br#"{"messages": []}"#.to_vec(), StatusCode::BAD_REQUEST, ""),
        (
            "a message without a role",
            "/v1/chat/completions",
            JSON,
            br#"{"messages": [{"content": "Hi"}]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            "an unknown role",
            "/v1/chat/completions",
            JSON,
            br#"{"messages": [{"role": "wizard", "content": "Hi"}]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            "a user message without content",
            "/v1/chat/completions",
            JSON,
            br#"{"messages": [{"role": "user"}]}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "missing_required_parameter",
        ),
        (
            "logit_bias keys not ids",
            "/v1/chat/completions",
            JSON,
            chat(r#", "logit_bias": {"x": 1}"#),
            StatusCode::BAD_REQUEST,
            "",
        ),
        (
            "an unknown model",
            "/v1/chat/completions",
            JSON,
            chat(r#", "model": "gpt-9""#),
            StatusCode::NOT_FOUND,
            "model_not_found",
        ),
        (
            "a model of the wrong type",
            "/v1/chat/completions",
            JSON,
            chat(r#", "model": 9"#),
            StatusCode::BAD_REQUEST,
            "invalid_json",
        ),
        ("tokenize nothing", "/tokenize", JSON, b"{}".to_vec(), StatusCode::BAD_REQUEST, ""),
        ("detokenize strings", "/detokenize", JSON, br#"{"tokens": ["a"]}"#.to_vec(), StatusCode::BAD_REQUEST, ""),
    ];
    let mut wrong = Vec::new();
    for (what, path, content_type, body, status, code) in cases {
        let (got, error) = send(&app, path, content_type, body).await;
        let shaped = ["message", "type", "code"].iter().all(|k| error["error"].get(*k).is_some_and(|v| !v.is_null()))
            && error["error"]["message"].as_str().is_some_and(|m| !m.is_empty());
        if got != status || !shaped || (!code.is_empty() && error["error"]["code"] != code) {
            wrong.push(format!("{what}: want {status} {code:?}, got {got} {error}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(*backend.started.lock().unwrap(), 0, "no bad request reached a worker");
}

#[tokio::test]
async fn a_message_without_content_is_named_by_its_index() {
    let (app, backend) = setup();
    let body = br#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}"#.to_vec();
    let (status, error) = send(&app, "/v1/chat/completions", JSON, body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error["error"]["param"], "messages[1].content", "{error}");
    assert_eq!(error["error"]["type"], "BadRequestError", "{error}");
    assert_eq!(*backend.started.lock().unwrap(), 0);
}

#[tokio::test]
async fn a_body_just_under_the_limit_is_read() {
    let (app, _) = setup();
    // Within the limit the body is parsed and judged on its merits (here: too long a prompt).
    let prompt = "a".repeat(DEFAULT_MAX_BODY_BYTES - 64);
    let (status, error) =
        send(&app, "/v1/completions", JSON, format!(r#"{{"prompt": "{prompt}"}}"#).into_bytes()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error["error"]["param"], "prompt");
}

/// Each structured output that cannot be enforced is refused before any worker runs, with a 400
/// whose `param` names the field that asked for it.
#[tokio::test]
async fn every_bad_structured_output_is_a_400_naming_its_field() {
    let (app, backend) = setup();
    let cases: &[(&str, &str)] = &[
        (
            r#""response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {}}}}"#,
            "response_format.json_schema.schema",
        ),
        (
            r#""response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "color"}}}"#,
            "response_format.json_schema.schema",
        ),
        (
            r#""response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}"#,
            "response_format.json_schema.schema",
        ),
        (r#""structured_outputs": {"regex": "(unclosed"}"#, "structured_outputs.regex"),
        (r#""structured_outputs": {"grammar": "start: undefined_rule"}"#, "structured_outputs.grammar"),
        (r#""structured_outputs": {"grammar": "root ::= \"a\""}"#, "structured_outputs.grammar"),
        (r#""structured_outputs": {"choice": []}"#, "structured_outputs.choice"),
        (r#""structured_outputs": {"json": "{not json"}"#, "structured_outputs.json"),
        (r#""structured_outputs": {"structural_tag": {}}"#, "structured_outputs.structural_tag"),
        (
            r#""structured_outputs": {"structural_tag": {"structures": [{"begin": "<g>", "schema": {}, "end": ""}], "triggers": ["<f"]}}"#,
            "structured_outputs.structural_tag",
        ),
        (
            r#""structured_outputs": {"structural_tag": {"structures": [{"begin": "<f>", "schema": {"type": "object", "if": {}}, "end": ""}], "triggers": ["<f"]}}"#,
            "structured_outputs.structural_tag",
        ),
        (r#""response_format": {"type": "structural_tag", "format": {"type": "triggered_tags"}}"#, "response_format"),
        (r#""structured_outputs": {}"#, "structured_outputs"),
        (r#""structured_outputs": {"regex": "a", "choice": ["a"]}"#, "structured_outputs.choice"),
        (r#""response_format": {"type": "json_object"}, "guided_regex": "a""#, "guided_regex"),
        (r#""guided_json": {"type": "integer", "minimum": 3, "maximum": 1}"#, "guided_json"),
        (r#""guided_choice": ["a"], "guided_decoding_backend": "xgrammar""#, "guided_decoding_backend"),
    ];
    for (extra, field) in cases {
        for (path, body) in [
            ("/v1/chat/completions", chat(&format!(", {extra}"))),
            ("/v1/completions", completion(&format!(", {extra}"))),
        ] {
            let (status, body) = send(&app, path, JSON, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{extra} on {path}: {body}");
            assert_eq!(body["error"]["param"], *field, "{extra} on {path}: {body}");
            assert_eq!(body["error"]["type"], "BadRequestError", "{body}");
        }
    }
    // Fields of the wrong shape are refused as JSON errors.
    for extra in [
        r#""response_format": {"type": "yaml"}"#,
        r#""response_format": [1]"#,
        r#""structured_outputs": ["a"]"#,
        r#""structured_outputs": {"jsn": {}}"#,
    ] {
        let (status, body) = send(&app, "/v1/completions", JSON, completion(&format!(", {extra}"))).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("invalid_json")),
            "{extra}: {body}"
        );
    }
    assert_eq!(*backend.started.lock().unwrap(), 0, "no bad structured output reached a worker");
}

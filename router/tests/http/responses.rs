//! `/v1/responses` over a fake backend: the request translated onto chat (what the worker is
//! asked), the `response` object and its typed event stream, and the refusals.

use axum::http::StatusCode;
use serde_json::{json, Value};

use router::backend::{BackendError, Finish, TokenChunk};
use router::testutil::{card, ids, EOS};

use crate::http::{hello_chunks, post, post_json, setup_card, FakeBackend};

/// A tiny ChatML model with room for a few turns.
fn setup(chunks: Vec<Result<TokenChunk, BackendError>>) -> (axum::Router, std::sync::Arc<FakeBackend>) {
    setup_card(&proto::worker::ModelCard { context_length: 512, ..card() }, chunks)
}

/// `text` then eos.
fn answer(text: &str) -> Vec<Result<TokenChunk, BackendError>> {
    vec![
        Ok(TokenChunk { token_ids: ids(text), ..TokenChunk::default() }),
        Ok(TokenChunk { token_ids: vec![EOS], finish: Some(Finish::Stop), ..TokenChunk::default() }),
    ]
}

const CALL: &str = r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>"#;

fn weather_tool() -> Value {
    json!([{"type": "function", "name": "get_weather", "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}])
}

fn request(extra: Value) -> Value {
    let mut request = json!({"model": "tiny", "input": "Hi"});
    request.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    request
}

/// The text of the prompt the worker was asked to continue (special tokens left out).
fn prompt_seen(backend: &FakeBackend) -> String {
    let ids = backend.seen.lock().unwrap()[0].prompt_token_ids.clone();
    String::from_utf8(ids.iter().copied().filter(|&id| id < 256).map(|id| id as u8).collect()).unwrap()
}

/// The events of a typed SSE body: each `event:` name with its parsed `data:`.
fn typed_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| {
            let mut lines = event.lines();
            let name = lines.next().and_then(|l| l.strip_prefix("event: ")).expect("an event: line").to_owned();
            let data = lines.next().and_then(|l| l.strip_prefix("data: ")).expect("a data: line");
            (name, serde_json::from_str(data).unwrap())
        })
        .collect()
}

/// Streams `body` and checks what every typed stream must be: each event named by its `type`,
/// `sequence_number`s 0, 1, 2, ..., no `[DONE]`. Returns the events.
async fn stream(app: axum::Router, mut body: Value) -> Vec<(String, Value)> {
    body["stream"] = json!(true);
    let (status, text) = post(app, "/v1/responses", &body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    let events = typed_events(&text);
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], json!(name), "{data}");
        assert_eq!(data["sequence_number"], json!(i), "{data}");
    }
    events
}

fn kinds(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(name, _)| name.as_str()).collect()
}

#[tokio::test]
async fn plain_text_response_echoes_the_request() {
    let (app, backend) = setup(hello_chunks());
    let extra = json!({"instructions": "Be brief.", "metadata": {"k": "v"}, "temperature": 0.5, "store": false,
                       "truncation": "disabled", "text": {"format": {"type": "text"}}});
    let (status, body) = post_json(app, "/v1/responses", request(extra)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id"], "resp_req-42");
    assert_eq!((body["object"].as_str(), body["status"].as_str()), (Some("response"), Some("completed")));
    assert_eq!(body["model"], "tiny");
    assert_eq!(body["incomplete_details"], Value::Null);
    let output = body["output"].as_array().unwrap();
    assert_eq!(output.len(), 1, "{body}");
    assert_eq!(output[0]["type"], "message");
    assert_eq!((output[0]["role"].as_str(), output[0]["status"].as_str()), (Some("assistant"), Some("completed")));
    assert!(output[0]["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(output[0]["content"], json!([{"type": "output_text", "text": "Hé you", "annotations": []}]));
    let prompt_tokens = backend.seen.lock().unwrap()[0].prompt_token_ids.len();
    assert_eq!(
        body["usage"],
        json!({"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 8,
               "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt_tokens + 8})
    );
    for (field, value) in [
        ("instructions", json!("Be brief.")),
        ("metadata", json!({"k": "v"})),
        ("temperature", json!(0.5)),
        ("top_p", json!(1.0)),
        ("store", json!(false)),
        ("tool_choice", json!("auto")),
        ("tools", json!([])),
        ("parallel_tool_calls", json!(true)),
        ("text", json!({"format": {"type": "text"}})),
    ] {
        assert_eq!(body[field], value, "{field}");
    }
    // The instructions are a system message before the input, as chat renders them.
    assert_eq!(prompt_seen(&backend), "system\nBe brief.\nuser\nHi\nassistant\n");
    assert_eq!(backend.seen.lock().unwrap()[0].sampling.temperature, 0.5);
}

#[tokio::test]
async fn a_function_call_is_an_output_item() {
    let (app, _) = setup(answer(CALL));
    let (status, body) = post_json(app, "/v1/responses", request(json!({"tools": weather_tool()}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let output = body["output"].as_array().unwrap();
    assert_eq!(output.len(), 1, "no blank message beside the call: {body}");
    let call = &output[0];
    assert_eq!((call["type"].as_str(), call["name"].as_str()), (Some("function_call"), Some("get_weather")));
    assert_eq!(serde_json::from_str::<Value>(call["arguments"].as_str().unwrap()).unwrap(), json!({"city": "Paris"}));
    assert!(call["id"].as_str().unwrap().starts_with("fc_"), "{call}");
    assert!(call["call_id"].as_str().unwrap().starts_with("call_"), "{call}");
    assert_eq!(call["status"], "completed");
    assert_eq!(body["tools"], weather_tool());
}

#[tokio::test]
async fn a_function_call_output_reaches_the_prompt() {
    let (app, backend) = setup(answer("Sunny."));
    let input = json!([
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"},
    ]);
    let (status, body) =
        post_json(app, "/v1/responses", request(json!({"input": input, "tools": weather_tool()}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["output"][0]["content"][0]["text"], "Sunny.");
    // The tiny card's template renders each message's role and content: the call is an
    // assistant turn (without content), its output a tool turn.
    assert_eq!(prompt_seen(&backend), "user\nWeather?\nassistant\n\ntool\nSunny, 21 C\nassistant\n");
}

#[tokio::test]
async fn message_items_take_text_parts_and_every_role() {
    let (app, backend) = setup(answer("ok"));
    let input = json!([
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Dev."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "A"}, {"type": "input_text", "text": "B"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "C", "annotations": []}]},
        {"role": "user", "content": "D"},
    ]);
    let (status, body) = post_json(app, "/v1/responses", request(json!({"input": input}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(prompt_seen(&backend), "system\nDev.\nuser\nAB\nassistant\nC\nuser\nD\nassistant\n");
}

#[tokio::test]
async fn text_format_is_enforced_as_a_structured_output() {
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
    let formats = [
        (json!({"type": "json_schema", "name": "city", "schema": schema, "strict": true}), true),
        (json!({"type": "json_object"}), true),
        (json!({"type": "text"}), false),
    ];
    for (format, constrained) in formats {
        let (app, backend) = setup(answer("{\"city\": \"Paris\"}"));
        let (status, body) = post_json(app, "/v1/responses", request(json!({"text": {"format": format}}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["text"]["format"], format);
        assert_eq!(backend.seen.lock().unwrap()[0].sampling.constraint.is_some(), constrained, "{format}");
    }
    // A schema that cannot be enforced is refused by the structured-output path, named in the
    // Responses API's terms.
    let (app, _) = setup(answer("x"));
    let bad = json!({"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}});
    let (status, body) = post_json(app, "/v1/responses", request(json!({"text": bad}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "text.format", "{body}");
}

#[tokio::test]
async fn a_required_tool_choice_is_enforced() {
    let (app, backend) = setup(answer(CALL));
    let extra = json!({"tools": weather_tool(), "tool_choice": {"type": "function", "name": "get_weather"}});
    let (status, body) = post_json(app, "/v1/responses", request(extra)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(backend.seen.lock().unwrap()[0].sampling.constraint.is_some());
    assert_eq!(body["tool_choice"], json!({"type": "function", "name": "get_weather"}));
}

#[tokio::test]
async fn max_output_tokens_cuts_the_response_incomplete() {
    let (app, backend) = setup(hello_chunks());
    let (status, body) = post_json(app.clone(), "/v1/responses", request(json!({"max_output_tokens": 3}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(backend.seen.lock().unwrap()[0].sampling.max_tokens, 3);
    assert_eq!(body["status"], "incomplete");
    assert_eq!(body["incomplete_details"], json!({"reason": "max_output_tokens"}));
    assert_eq!(body["max_output_tokens"], 3);
    assert_eq!(body["output"][0]["status"], "incomplete");
    assert_eq!(body["output"][0]["content"][0]["text"], "Hé");
    assert_eq!(body["usage"]["output_tokens"], 3);

    let events = stream(app, request(json!({"max_output_tokens": 3}))).await;
    let (last, response) = events.last().unwrap();
    assert_eq!(last, "response.incomplete");
    assert_eq!(response["response"]["incomplete_details"], json!({"reason": "max_output_tokens"}));
    assert_eq!(response["response"]["output"][0]["status"], "incomplete");
}

#[tokio::test]
async fn streamed_text_comes_as_typed_events_in_order() {
    let (app, _) = setup(hello_chunks());
    let events = stream(app, request(json!({}))).await;
    let kinds = kinds(&events);
    let deltas = kinds.iter().filter(|k| **k == "response.output_text.delta").count();
    assert!(deltas >= 2, "{kinds:?}");
    let mut want =
        vec!["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"];
    want.extend(std::iter::repeat_n("response.output_text.delta", deltas));
    want.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(kinds, want);
    let text: String = events
        .iter()
        .filter(|(k, _)| k == "response.output_text.delta")
        .map(|(_, e)| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, "Hé you");
    let item_id = events[2].1["item"]["id"].as_str().unwrap();
    for (_, event) in &events[2..events.len() - 1] {
        assert_eq!(event["output_index"], 0, "{event}");
        if let Some(id) = event.get("item_id") {
            assert_eq!(id, item_id, "{event}");
        }
    }
    let done = &events[events.len() - 4].1;
    assert_eq!(done["text"], "Hé you");
    let created = &events[0].1["response"];
    assert_eq!(
        (created["status"].as_str(), created["output"].as_array().map(Vec::len)),
        (Some("in_progress"), Some(0))
    );
    let completed = &events.last().unwrap().1["response"];
    assert_eq!(completed["status"], "completed");
    assert_eq!(completed["id"], "resp_req-42");
    assert_eq!(completed["output"][0]["content"][0]["text"], "Hé you");
    assert_eq!(completed["output"][0]["id"], item_id);
    assert_eq!(completed["usage"]["output_tokens"], 8);
}

#[tokio::test]
async fn a_streamed_function_call_comes_whole() {
    let (app, _) = setup(answer(CALL));
    let events = stream(app, request(json!({"tools": weather_tool()}))).await;
    assert_eq!(
        kinds(&events),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let done = &events[4].1;
    assert_eq!(done["name"], "get_weather");
    assert_eq!(serde_json::from_str::<Value>(done["arguments"].as_str().unwrap()).unwrap(), json!({"city": "Paris"}));
    assert_eq!(events[2].1["item"]["status"], "in_progress");
    let item = &events[5].1["item"];
    assert_eq!((item["type"].as_str(), item["status"].as_str()), (Some("function_call"), Some("completed")));
    assert_eq!(events.last().unwrap().1["response"]["output"], json!([item]));
}

#[tokio::test]
async fn reasoning_is_an_item_of_its_own_whole_and_streamed() {
    let (app, _) = setup(answer("<think>Hmm.</think>Hi"));
    let (status, body) = post_json(app.clone(), "/v1/responses", request(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let output = body["output"].as_array().unwrap();
    assert_eq!(output.len(), 2, "{body}");
    assert_eq!(output[0]["type"], "reasoning");
    assert!(output[0]["id"].as_str().unwrap().starts_with("rs_"));
    assert_eq!(output[0]["summary"], json!([]));
    assert_eq!(output[0]["content"], json!([{"type": "reasoning_text", "text": "Hmm."}]));
    assert_eq!(output[1]["content"][0]["text"], "Hi");
    // One token per byte here: the think block's 19 of the 22 generated (with eos).
    let think = "<think>Hmm.</think>".len();
    assert_eq!(body["usage"]["output_tokens"], json!(think + 3), "{body}");
    assert_eq!(body["usage"]["output_tokens_details"], json!({"reasoning_tokens": think}), "{body}");

    let events = stream(app, request(json!({}))).await;
    let reasoning: String = events
        .iter()
        .filter(|(k, _)| k == "response.reasoning_text.delta")
        .map(|(_, e)| e["delta"].as_str().unwrap())
        .collect();
    assert_eq!(reasoning, "Hmm.");
    let kinds = kinds(&events);
    let at = |kind: &str| kinds.iter().position(|k| *k == kind).unwrap_or_else(|| panic!("no {kind}: {kinds:?}"));
    assert!(at("response.reasoning_text.done") < at("response.output_text.delta"), "{kinds:?}");
    let completed = &events.last().unwrap().1["response"]["output"];
    assert_eq!(completed[0]["content"], output[0]["content"]);
    assert_eq!(completed[1]["content"], output[1]["content"]);
    assert_eq!(events.last().unwrap().1["response"]["usage"], body["usage"]);
}

/// An answer cut short inside its think block: every output token is reasoning.
#[tokio::test]
async fn an_unclosed_think_block_is_all_reasoning() {
    let chunks = vec![
        Ok(TokenChunk { token_ids: ids("<think>Hmm, let me"), ..TokenChunk::default() }),
        Ok(TokenChunk { token_ids: ids(" see"), finish: Some(Finish::Length), ..TokenChunk::default() }),
    ];
    let (app, _) = setup(chunks);
    let (status, body) = post_json(app, "/v1/responses", request(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let generated = "<think>Hmm, let me see".len();
    assert_eq!(body["usage"]["output_tokens_details"], json!({"reasoning_tokens": generated}), "{body}");
}

#[tokio::test]
async fn a_worker_failure_mid_stream_ends_with_an_error_event() {
    let chunks = vec![
        Ok(TokenChunk { token_ids: ids("Hi"), ..TokenChunk::default() }),
        Err(BackendError::Worker("boom".into())),
    ];
    let (app, _) = setup(chunks);
    let events = stream(app, request(json!({}))).await;
    let kinds = kinds(&events);
    assert_eq!(kinds[kinds.len() - 2..], ["error", "response.failed"], "{kinds:?}");
    let error = &events[events.len() - 2].1;
    assert!(error["message"].as_str().unwrap().contains("boom"), "{error}");
    let failed = &events.last().unwrap().1["response"];
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["output"][0]["content"][0]["text"], "Hi");
}

#[tokio::test]
async fn what_is_not_honoured_is_refused_by_name() {
    let cases = [
        (json!({"store": true}), "store"),
        (json!({"previous_response_id": "resp_1"}), "previous_response_id"),
        (json!({"background": true}), "background"),
        (json!({"conversation": "conv_1"}), "conversation"),
        (json!({"prompt": {"id": "pmpt_1"}}), "prompt"),
        (json!({"include": ["reasoning.encrypted_content"]}), "include"),
        (json!({"top_logprobs": 2}), "top_logprobs"),
        (json!({"truncation": "auto"}), "truncation"),
        (json!({"parallel_tool_calls": false}), "parallel_tool_calls"),
        (json!({"tools": [{"type": "web_search"}]}), "tools"),
        (json!({"tools": [{"type": "function"}]}), "tools.name"),
        (json!({"tools": weather_tool(), "tool_choice": {"type": "function", "name": "other"}}), "tool_choice"),
        (json!({"tool_choice": {"type": "file_search"}}), "tool_choice"),
        (json!({"text": {"format": {"type": "grammar"}}}), "text.format"),
        (json!({"text": {"format": {"type": "json_schema", "name": "x"}}}), "text.format.schema"),
        (json!({"text": {"verbosity": "low"}}), "text.verbosity"),
        (json!({"reasoning": {"summary": "auto"}}), "reasoning.summary"),
        (json!({"reasoning": {"effort": "extreme"}}), "reasoning.effort"),
        (json!({"metadata": {"k": 1}}), "metadata"),
        (json!({"max_output_tokens": 0}), "max_output_tokens"),
        (json!({"max_output_tokens": 100000}), "max_output_tokens"),
        (json!({"temperature": 3}), "temperature"),
        (json!({"input": null}), "input"),
        (json!({"input": []}), "input"),
        (json!({"input": 5}), "input"),
        (json!({"input": [{"type": "item_reference", "id": "msg_1"}]}), "input[0]"),
        (json!({"input": ["Hi"]}), "input[0]"),
        (json!({"input": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}), "input[1]"),
        (json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}), "input[0]"),
        (json!({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}), "input[0]"),
    ];
    for (extra, param) in cases {
        let (app, backend) = setup(answer("x"));
        let (status, body) = post_json(app, "/v1/responses", request(extra.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {body}");
        assert_eq!(body["error"]["param"], param, "{extra}: {body}");
        assert!(backend.seen.lock().unwrap().is_empty(), "{extra} reached a worker");
    }
    // The stateful fields say why.
    let (app, _) = setup(answer("x"));
    let (_, body) = post_json(app, "/v1/responses", request(json!({"previous_response_id": "resp_1"}))).await;
    assert!(body["error"]["message"].as_str().unwrap().contains("stateless"), "{body}");
    assert_eq!(body["error"]["code"], "unsupported_parameter");
}

/// vLLM's extras reach the worker as chat's do: the priority and cache salt on the request, the
/// body's request id when no `X-Request-Id` header gives one.
#[tokio::test]
async fn vllm_extras_priority_salt_and_request_id_are_honoured() {
    use tower::ServiceExt;
    let (app, backend) = setup(answer("Hello"));
    let body = request(json!({"priority": -3, "cache_salt": "tenant-a", "request_id": "abc"}));
    let without_header = axum::http::Request::post("/v1/responses")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    let response = app.clone().oneshot(without_header).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["id"], "resp_abc");
    let seen = backend.seen.lock().unwrap()[0].clone();
    assert_eq!((seen.priority, seen.cache_salt.as_deref(), seen.request_id.as_str()), (-3, Some("tenant-a"), "abc"));
    for (extra, param) in [
        (json!({"priority": 1_i64 << 40}), "priority"),
        (json!({"cache_salt": ""}), "cache_salt"),
        (json!({"request_id": ""}), "request_id"),
    ] {
        let (status, body) = post_json(app.clone(), "/v1/responses", request(extra.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {body}");
        assert_eq!(body["error"]["param"], param, "{extra}: {body}");
    }
}

//! The clients the platform's users already use work unchanged.

// The tool tests hold the cluster turn (a std mutex) for their whole run:
// tests run on their own runtimes and no task awaits the lock.
#![allow(clippy::await_holding_lock)]

use futures::StreamExt;
use serde_json::json;
use tests::process::Process;
use tests::python::run_client;
use tests::{model_path, start_router, take_turn, Cluster, ClusterOptions};
use vllm_client::{StreamEvent, VllmClient};

const PARIS: &str = "What is the capital of France? Answer in one word.";

/// What the mock decode worker answers in the tool tests: one Hermes call.
const TOOL_CALL: &str = r#"<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>"#;

/// A router over a mock decode worker that answers every request with
/// [`TOOL_CALL`]; returns both and the model name.
async fn tool_calling_router() -> (Process, Process, String) {
    let model = model_path();
    let decode = Process::start(
        "decode-worker",
        &["--listen", "127.0.0.1:0", "--model", model.to_str().unwrap(), "--mock", "--mock-reply", TOOL_CALL],
    );
    let router = start_router(&[], &[&decode], &[]);
    let models: serde_json::Value =
        reqwest::get(format!("{}/v1/models", router.url())).await.unwrap().json().await.unwrap();
    let name = models["data"][0]["id"].as_str().unwrap().to_owned();
    (decode, router, name)
}

fn weather_tool() -> serde_json::Value {
    json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }])
}

#[tokio::test]
async fn openai_python_sdk_chats() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    run_client("openai_chat.py", cluster.router.url(), &model, &[], "openai client ok").await;
}

/// Embeddings as the OpenAI SDK asks for them (base64 by default, and float) from a disaggregated
/// cluster, computed by its prefill worker: they equal llama.cpp's last-token embeddings of the
/// default model (`tests/data/golden/smollm2-embeddings.json`).
#[tokio::test]
async fn openai_python_sdk_embeds_as_llama_cpp_does() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    let reference = tests::workspace_root().join("tests/data/golden/smollm2-embeddings.json");
    let reference = reference.to_str().unwrap();
    run_client("openai_embeddings.py", cluster.router.url(), &model, &[reference], "openai embeddings ok").await;
}

/// A BERT encoder (all-MiniLM-L6-v2's Sentence-Transformers folder) served by a disaggregated
/// cluster: the OpenAI SDK's embeddings equal Sentence-Transformers' own (its mean pooling, by
/// default), `/pooling` and `/v1/rerank` agree, and generation is refused with a 400.
#[tokio::test]
async fn openai_python_sdk_embeds_with_a_bert_encoder_as_sentence_transformers_does() {
    let cluster = Cluster::start(ClusterOptions { model: Some(tests::encoder_path()), ..ClusterOptions::default() });
    let model = cluster.model_name().await;
    assert_eq!(model, "all-MiniLM-L6-v2");
    let reference = tests::workspace_root().join("tests/data/golden/minilm-embeddings.json");
    let reference = reference.to_str().unwrap();
    let done = "openai encoder embeddings ok";
    run_client("openai_embeddings_encoder.py", cluster.router.url(), &model, &[reference], done).await;
    // Colocated (the decode worker embeds) gives the same.
    run_client("openai_embeddings_encoder.py", cluster.colocated_router.url(), &model, &[reference], done).await;
}

/// The OpenAI Agents SDK (`openai-agents`, on its Responses model) runs a turn against a
/// disaggregated cluster: its own `/v1/responses` requests and parsing, unchanged.
#[tokio::test]
async fn openai_agents_sdk_runs_a_turn() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    run_client("openai_agents_turn.py", cluster.router.url(), &model, &[], "openai agents ok").await;
}

/// Completions logprobs, `stop_reason`, cached tokens, `system_fingerprint`, ids from the request
/// id and continuous usage, as the OpenAI SDK reads them, from a disaggregated cluster.
#[tokio::test]
async fn openai_python_sdk_reads_the_api_fields_beyond_the_basics() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    run_client("openai_api_fields.py", cluster.router.url(), &model, &[], "openai api fields ok").await;
}

/// lm-evaluation-harness's `local-completions` model scores a multiple-choice task made in the
/// test (loglikelihoods from `echo` with `logprobs`, through the router's remote tokenizer), and
/// every number equals the one computed from the model's logits token by token.
#[tokio::test]
async fn lm_evaluation_harness_scores_a_multiple_choice_task() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    run_client("lm_eval_loglikelihood.py", cluster.router.url(), &model, &[], "lm-eval loglikelihood ok").await;
}

#[tokio::test]
async fn vllm_client_crate_chats() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    let client = VllmClient::new(format!("{}/v1", cluster.router.url()));
    let messages = json!([{"role": "user", "content": PARIS}]);

    let response = client
        .chat
        .completions()
        .create()
        .model(model.clone())
        .messages(messages.clone())
        .temperature(0.0)
        .max_tokens(32)
        .send()
        .await
        .expect("vllm-client send");
    let text = response.content.clone().expect("content");
    assert!(text.contains("Paris"), "{text}");
    assert_eq!(response.finish_reason.as_deref(), Some("stop"));

    let mut stream = client
        .chat
        .completions()
        .create()
        .model(model)
        .messages(messages)
        .temperature(0.0)
        .max_tokens(32)
        .stream(true)
        .extra(json!({"stream_options": {"include_usage": true}}))
        .send_stream()
        .await
        .expect("vllm-client send_stream")
        .into_stream();
    let mut streamed = String::new();
    let mut done = false;
    let mut usage = None;
    while let Some(event) = stream.next().await {
        match event {
            StreamEvent::Content(delta) => streamed.push_str(&delta),
            StreamEvent::Usage(u) => usage = Some(u),
            StreamEvent::Done => done = true,
            StreamEvent::Error(e) => panic!("stream error: {e}"),
            _ => {}
        }
    }
    assert!(done, "the stream ended without [DONE]");
    assert_eq!(streamed, text);
    let usage = usage.expect("include_usage asked for a usage event");
    let whole = response.usage.expect("usage on the whole answer");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (whole.prompt_tokens, whole.completion_tokens));
}

#[tokio::test]
async fn openai_python_sdk_reads_tool_calls() {
    let _turn = take_turn();
    let (_decode, router, model) = tool_calling_router().await;
    run_client("openai_tools.py", router.url(), &model, &[], "openai tools ok").await;
}

/// The Responses API as the OpenAI SDK calls it: plain, with a function tool and its output sent
/// back, with a JSON schema text format, refused stateful fields, and streamed.
#[tokio::test]
async fn openai_python_sdk_reads_responses() {
    let _turn = take_turn();
    let (_decode, router, model) = tool_calling_router().await;
    run_client("openai_responses.py", router.url(), &model, &[], "openai responses ok").await;
}

#[tokio::test]
async fn vllm_client_crate_reads_tool_calls() {
    let _turn = take_turn();
    let (_decode, router, model) = tool_calling_router().await;
    let client = VllmClient::new(format!("{}/v1", router.url()));
    let messages = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    let request =
        || client.chat.completions().create().model(model.clone()).messages(messages.clone()).tools(weather_tool());

    let response = request().max_tokens(64).send().await.expect("vllm-client send");
    assert_eq!(response.finish_reason.as_deref(), Some("tool_calls"));
    let calls = response.tool_calls.clone();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].name, "get_weather");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&calls[0].arguments).unwrap(), json!({"city": "Paris"}));

    let mut stream = request()
        .max_tokens(64)
        .stream(true)
        .extra(json!({"stream_options": {"include_usage": true}}))
        .send_stream()
        .await
        .expect("vllm-client send_stream")
        .into_stream();
    let (mut completed, mut usage) = (Vec::new(), None);
    while let Some(event) = stream.next().await {
        match event {
            StreamEvent::ToolCallComplete(call) => completed.push(call),
            StreamEvent::Usage(u) => usage = Some(u),
            StreamEvent::Error(e) => panic!("stream error: {e}"),
            _ => {}
        }
    }
    assert_eq!(completed.len(), 1, "{completed:?}");
    assert_eq!(completed[0].name, "get_weather");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&completed[0].arguments).unwrap(), json!({"city": "Paris"}));
    assert_eq!(usage.expect("usage event").completion_tokens, response.usage.expect("usage").completion_tokens);
}

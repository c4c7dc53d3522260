//! The disaggregated chat path end to end: answers, stream shapes, batching, errors.

use serde_json::{json, Value};
use tests::{sse, Cluster, ClusterOptions};

const PARIS: &str = "What is the capital of France? Answer in one word.";

async fn post(url: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new().post(url).json(&body).send().await.expect("POST")
}

/// Concatenated content deltas of a chat stream, checking OpenAI's chunk shapes on the way.
fn stream_text(chunks: &[Value]) -> (String, String) {
    assert!(chunks.len() >= 3, "a role chunk, content and a finish chunk: {chunks:?}");
    let first = &chunks[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert!(first["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(first["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let id = first["id"].clone();
    let mut text = String::new();
    let mut finish = None;
    for chunk in chunks {
        assert_eq!(chunk["id"], id, "one id for the whole stream");
        assert_eq!(chunk["object"], "chat.completion.chunk");
        let Some(choice) = chunk["choices"].get(0) else { continue };
        if let Some(content) = choice["delta"]["content"].as_str() {
            assert!(finish.is_none(), "content after the finish chunk");
            text.push_str(content);
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    (text, finish.expect("a chunk with finish_reason"))
}

#[tokio::test]
async fn capital_of_france_streamed_equals_non_streamed() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    let url = format!("{}/v1/chat/completions", cluster.router.url());
    let body =
        json!({"model": model, "messages": [{"role": "user", "content": PARIS}], "temperature": 0, "max_tokens": 32});

    let response = post(&url, body.clone()).await;
    assert_eq!(response.status(), 200);
    let full: Value = response.json().await.unwrap();
    assert_eq!(full["object"], "chat.completion");
    assert!(full["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(full["model"], model);
    assert!(full["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &full["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["logprobs"], Value::Null);
    assert_eq!(choice["finish_reason"], "stop");
    let text = choice["message"]["content"].as_str().unwrap().to_string();
    assert!(text.contains("Paris"), "answer: {text:?}");
    let usage = &full["usage"];
    assert_eq!(usage["prompt_tokens"], 42, "the reference tokenizes this chat to 42 tokens");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    let mut stream_body = body;
    stream_body["stream"] = json!(true);
    let chunks = sse::chunks(post(&url, stream_body).await).await;
    let (streamed, finish) = stream_text(&chunks);
    assert_eq!(streamed, text, "streamed and non-streamed answers differ");
    assert_eq!(finish, "stop");
    drop(cluster);
}

#[tokio::test]
async fn four_concurrent_streams_all_complete() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    let url = format!("{}/v1/chat/completions", cluster.router.url());
    let prompts = ["Write a haiku about the sea.", "List three fruits.", PARIS, "What is 12 plus 30?"];
    // Each alone first: the reference for what the batched run must reproduce.
    let mut alone = Vec::new();
    for p in prompts {
        let body =
            json!({"model": model, "messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 24});
        let v: Value = post(&url, body).await.json().await.unwrap();
        alone.push(v["choices"][0]["message"]["content"].as_str().unwrap().to_string());
    }
    let runs = prompts.iter().map(|p| {
        let body = json!({"model": model, "messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 24, "stream": true});
        let url = url.clone();
        async move { stream_text(&sse::chunks(post(&url, body).await).await) }
    });
    let together = futures::future::join_all(runs).await;
    for ((text, finish), expected) in together.iter().zip(&alone) {
        assert!(finish == "stop" || finish == "length");
        assert_eq!(text, expected, "a concurrent stream differs from the same request alone");
    }
    assert!(together[2].0.contains("Paris"));
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    let chat = format!("{}/v1/chat/completions", cluster.router.url());
    let completions = format!("{}/v1/completions", cluster.router.url());
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        (&chat, json!({"model": model, "messages": msgs, "temperature": 3}), 400, "temperature"),
        (&chat, json!({"model": model}), 400, "messages"),
        (&chat, json!({"model": model, "messages": msgs, "top_p": 0}), 400, "top_p"),
        (&chat, json!({"model": "no-such-model", "messages": msgs}), 404, "model"),
        (&completions, json!({"model": model, "prompt": "word ".repeat(9000)}), 400, "prompt"),
    ];
    for (url, body, status, field) in cases {
        let response = post(url, body.clone()).await;
        assert_eq!(response.status().as_u16(), status, "{body}");
        let err: Value = response.json().await.unwrap();
        let message = err["error"]["message"].as_str().unwrap_or_else(|| panic!("OpenAI error shape: {err}"));
        assert!(err["error"]["type"].is_string(), "{err}");
        assert!(message.contains(field) || err["error"]["param"] == field, "error should name {field}: {err}");
    }
    let response = reqwest::Client::new()
        .post(&chat)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let err: Value = response.json().await.unwrap();
    assert!(err["error"]["message"].is_string(), "{err}");
    // The cluster still serves after all that.
    let ok = post(&chat, json!({"model": model, "messages": msgs, "max_tokens": 2})).await;
    assert_eq!(ok.status(), 200);
}

/// vLLM's `bad_words` and `allowed_token_ids` hold on the real model, the same whether the prefill
/// worker samples the first token (disaggregated) or the decode worker does (colocated).
#[tokio::test]
async fn bad_words_and_allowed_token_ids_hold_on_both_paths() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    let complete = |extra: Value| {
        let model = model.clone();
        let urls = [cluster.router.url().to_owned(), cluster.colocated_router.url().to_owned()];
        async move {
            let mut answers = Vec::new();
            for url in urls {
                let mut body = json!({"model": model, "prompt": "The capital of France is", "temperature": 0,
                                      "max_tokens": 6, "return_token_ids": true});
                body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
                let answer: Value = post(&format!("{url}/v1/completions"), body).await.json().await.unwrap();
                answers.push(answer["choices"][0].clone());
            }
            assert_eq!(answers[0]["token_ids"], answers[1]["token_ids"], "disaggregated vs colocated");
            answers.remove(0)
        }
    };
    let free = complete(json!({})).await;
    let text = free["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "{free}");
    let banned = complete(json!({"bad_words": ["Paris"]})).await;
    assert!(!banned["text"].as_str().unwrap().contains("Paris"), "{banned}");
    assert_ne!(banned["token_ids"], free["token_ids"]);

    let url = format!("{}/tokenize", cluster.router.url());
    let body = json!({"prompt": " London Rome Berlin and.", "add_special_tokens": false});
    let ids: Value = post(&url, body).await.json().await.unwrap();
    let allowed: Vec<u64> = ids["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    let restricted = complete(json!({"allowed_token_ids": allowed})).await;
    let ids: Vec<u64> = restricted["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    assert!(!ids.is_empty() && ids.iter().all(|id| allowed.contains(id)), "{restricted} vs {allowed:?}");
}

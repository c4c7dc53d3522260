//! The workers' `--mock` mode (for benchmarks): the router serves through mock
//! workers exactly as through real ones, with exactly `max_tokens` tokens per
//! choice, and the decode mock's OpenAI HTTP face answers OpenAI-shaped.

use serde_json::{json, Value};
use tests::process::Process;
use tests::{sse, start_router};

const MAX_TOKENS: usize = 5;

async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new().post(url).json(body).send().await.expect("POST")
}

/// Each choice's token ids of a non-streamed answer, checking indexes and finish reasons.
fn choice_ids(answer: &Value) -> Vec<Vec<u64>> {
    let choices = answer["choices"].as_array().unwrap_or_else(|| panic!("choices in {answer}"));
    choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i, "{answer}");
            assert_eq!(c["finish_reason"], "length", "{answer}");
            c["token_ids"].as_array().expect("token_ids").iter().map(|x| x.as_u64().unwrap()).collect()
        })
        .collect()
}

/// A free loopback address, for the HTTP face (whose address the harness does not read back).
fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").to_string()
}

#[tokio::test]
async fn mock_workers_serve_max_tokens_through_the_router_and_over_http() {
    let model = tests::model_path();
    let model = model.to_str().expect("utf-8 model path");
    let prefill = Process::start("prefill-worker", &["--mock", "--listen", "127.0.0.1:0", "--model", model]);
    let http = free_addr();
    let decode = Process::start(
        "decode-worker",
        &["--mock", "--listen", "127.0.0.1:0", "--mock-http-listen", &http, "--model", model],
    );
    let disaggregated = start_router(&[&prefill], &[&decode], &["--local-prefill-max-tokens", "0"]);
    let colocated = start_router(&[], &[&decode], &[]);

    let body = json!({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": MAX_TOKENS,
                      "n": 2, "return_token_ids": true});
    for router in [&disaggregated, &colocated] {
        let url = format!("{}/v1/chat/completions", router.url());
        let response = post(&url, &body).await;
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.expect("JSON");
        let ids = choice_ids(&answer);
        assert_eq!(ids.len(), 2, "{answer}");
        for choice in &ids {
            // Prefill's first token plus decode's rest (or all of them from decode): one token, repeated.
            assert_eq!(choice.len(), MAX_TOKENS, "{answer}");
            assert!(choice.iter().all(|&id| id == choice[0]), "{answer}");
        }
        assert_eq!(answer["usage"]["completion_tokens"], 2 * MAX_TOKENS, "{answer}");

        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let chunks = sse::chunks(post(&url, &streamed).await).await;
        let mut counts = [0; 2];
        let mut finished = [false; 2];
        for chunk in &chunks {
            let Some(choice) = chunk["choices"].get(0) else { continue };
            let i = choice["index"].as_u64().unwrap() as usize;
            counts[i] += choice.get("token_ids").and_then(Value::as_array).map_or(0, Vec::len);
            finished[i] |= choice["finish_reason"] == "length";
        }
        assert_eq!(counts, [MAX_TOKENS; 2], "{chunks:?}");
        assert_eq!(finished, [true; 2], "{chunks:?}");
    }

    // The HTTP face: OpenAI-shaped, `max_tokens` of the same text, usage.
    let face = format!("http://{http}");
    let models: Value = reqwest::get(format!("{face}/v1/models")).await.unwrap().json().await.unwrap();
    assert_eq!(models["object"], "list");
    let name = models["data"][0]["id"].as_str().expect("a model id").to_string();
    assert_eq!(reqwest::get(format!("{face}/health")).await.unwrap().status(), 200);
    let body = json!({"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS});
    let answer: Value = post(&format!("{face}/v1/chat/completions"), &body).await.json().await.unwrap();
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["model"], name.as_str());
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    assert_eq!(answer["choices"][0]["finish_reason"], "length");
    let content = answer["choices"][0]["message"]["content"].as_str().expect("content").to_string();
    assert!(!content.is_empty());
    assert_eq!(answer["usage"]["completion_tokens"], MAX_TOKENS);

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = sse::chunks(post(&format!("{face}/v1/chat/completions"), &streamed).await).await;
    let deltas: Vec<&str> =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).filter(|d| !d.is_empty()).collect();
    assert_eq!(deltas.len(), MAX_TOKENS, "{chunks:?}");
    assert_eq!(deltas.concat(), content);
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"), "{chunks:?}");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], MAX_TOKENS);

    let text: Value =
        post(&format!("{face}/v1/completions"), &json!({"prompt": "hi", "max_tokens": 2})).await.json().await.unwrap();
    assert_eq!(text["object"], "text_completion");
    assert_eq!(text["usage"]["completion_tokens"], 2);
    assert!(text["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()), "{text}");
}

//! Chat `logprobs` / `top_logprobs` end to end: the OpenAI shape, and the same
//! values whether the prompt ran on the prefill worker (whose first token's
//! logprobs travel in the prefill answer) or on the decode worker (colocated).

use serde_json::{json, Value};
use tests::{sse, Cluster, ClusterOptions};

const QUESTION: &str = "Name three colors.";
const TOP: usize = 5;

async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new().post(url).json(body).send().await.expect("POST")
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("a number: {v}"))
}

/// Checks one `logprobs.content` entry's shape and internal consistency.
fn check_entry(entry: &Value) {
    let token = entry["token"].as_str().expect("token text");
    let bytes: Vec<u8> = entry["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
    assert_eq!(bytes, token.as_bytes(), "{entry}");
    let logprob = f(&entry["logprob"]);
    assert!(logprob <= 0.0, "{entry}");
    let top = entry["top_logprobs"].as_array().expect("top_logprobs");
    assert_eq!(top.len(), TOP, "{entry}");
    let values: Vec<f64> = top.iter().map(|t| f(&t["logprob"])).collect();
    assert!(values.windows(2).all(|w| w[0] >= w[1]), "sorted most likely first: {values:?}");
    let mass: f64 = values.iter().map(|v| v.exp()).sum();
    assert!(mass <= 1.0 + 1e-4, "{mass}");
    // Greedy: the chosen token is the most likely one.
    assert_eq!(top[0]["token"], entry["token"], "{entry}");
    assert!((f(&top[0]["logprob"]) - logprob).abs() < 1e-6, "{entry}");
    for t in top {
        let text = t["token"].as_str().unwrap();
        let bytes: Vec<u8> = t["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
        assert_eq!(bytes, text.as_bytes());
    }
}

fn assert_close(a: &[Value], b: &[Value]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x["token"], y["token"]);
        assert!((f(&x["logprob"]) - f(&y["logprob"])).abs() < 1e-4, "{x} vs {y}");
        let (tx, ty) = (x["top_logprobs"].as_array().unwrap(), y["top_logprobs"].as_array().unwrap());
        for (p, q) in tx.iter().zip(ty) {
            assert_eq!(p["token"], q["token"], "{x} vs {y}");
            assert!((f(&p["logprob"]) - f(&q["logprob"])).abs() < 1e-4, "{p} vs {q}");
        }
    }
}

#[tokio::test]
async fn logprobs_agree_between_disaggregated_and_colocated() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    let body = json!({"model": model, "messages": [{"role": "user", "content": QUESTION}],
                      "temperature": 0, "max_tokens": 12, "logprobs": true, "top_logprobs": TOP});
    let mut answers = Vec::new();
    for router in [&cluster.router, &cluster.colocated_router] {
        let response = post(&format!("{}/v1/chat/completions", router.url()), &body).await;
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        let content = answer["choices"][0]["logprobs"]["content"].as_array().expect("logprobs.content").clone();
        // No stop string: one entry per completion token.
        assert_eq!(content.len() as u64, answer["usage"]["completion_tokens"].as_u64().unwrap(), "{answer}");
        content.iter().for_each(check_entry);
        let joined: String = content.iter().map(|e| e["token"].as_str().unwrap()).collect();
        let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(joined.starts_with(text), "{joined:?} vs {text:?}");
        answers.push(content);
    }
    assert_close(&answers[0], &answers[1]);

    // Streamed: the chunks' logprobs add up to the same list.
    let mut streamed_body = body.clone();
    streamed_body["stream"] = json!(true);
    let chunks =
        sse::chunks(post(&format!("{}/v1/chat/completions", cluster.router.url()), &streamed_body).await).await;
    let streamed: Vec<Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array())
        .flat_map(|content| content.iter().cloned())
        .collect();
    assert_close(&streamed, &answers[0]);

    // Not asked: null.
    let plain = json!({"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2});
    let answer: Value =
        post(&format!("{}/v1/chat/completions", cluster.router.url()), &plain).await.json().await.unwrap();
    assert_eq!(answer["choices"][0]["logprobs"], Value::Null);
    let bad = json!({"model": model, "messages": [{"role": "user", "content": QUESTION}], "top_logprobs": 2});
    let response = post(&format!("{}/v1/chat/completions", cluster.router.url()), &bad).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["param"], "top_logprobs");
    let stats = cluster.prefill_stats().await;
    assert_eq!(stats.pinned_blocks, 0, "every hand-off was released");
}

/// Prompt logprobs end to end, as loglikelihood scoring reads them: `echo` with `logprobs` gives
/// every prompt token (the first with null) then the generated ones, and vLLM's
/// `prompt_logprobs` the same values keyed by token id, equal whether the prefill worker or the
/// decode worker (colocated) computed the prompt, and never from a warm prefix cache.
#[tokio::test]
async fn prompt_logprobs_agree_between_disaggregated_and_colocated() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    let prompt = "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is";
    let body = json!({"model": model, "prompt": prompt, "temperature": 0, "max_tokens": 1,
                      "logprobs": 2, "echo": true, "prompt_logprobs": 2});
    let mut answers = Vec::new();
    for router in [&cluster.router, &cluster.colocated_router, &cluster.router] {
        let response = post(&format!("{}/v1/completions", router.url()), &body).await;
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        let choice = &answer["choices"][0];
        let lp = &choice["logprobs"];
        let prompt_tokens = answer["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
        let tokens = lp["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), prompt_tokens + 1, "{answer}");
        assert!(choice["text"].as_str().unwrap().starts_with(prompt), "{answer}");
        let scored = lp["token_logprobs"].as_array().unwrap();
        assert!(scored[0].is_null() && lp["top_logprobs"][0].is_null(), "{lp}");
        assert!(scored[1..].iter().all(|l| f(l) <= 0.0), "{lp}");
        // " Madrid" is the likely next word: the prompt's last tokens are no surprise either.
        let field = choice["prompt_logprobs"].as_array().expect("prompt_logprobs");
        assert_eq!(field.len(), prompt_tokens, "{answer}");
        for (position, entry) in field.iter().enumerate().skip(1) {
            let entries = entry.as_object().expect("an object per scored token");
            let own: Vec<&Value> = entries.values().filter(|e| e["decoded_token"] == tokens[position]).collect();
            assert!(!own.is_empty() && own.iter().any(|e| (f(&e["logprob"]) - f(&scored[position])).abs() < 1e-6));
            assert!(entries.values().all(|e| e["rank"].as_u64().unwrap() >= 1));
        }
        answers.push(scored.clone());
    }
    for other in &answers[1..] {
        for (a, b) in answers[0].iter().zip(other).skip(1) {
            assert!((f(a) - f(b)).abs() < 1e-4, "{a} vs {b}");
        }
    }
}

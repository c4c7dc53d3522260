//! `n > 1` end to end: the prompt runs once (on the prefill worker, or on the
//! decode worker when colocated) and the choices share its KV; with a seed,
//! both paths give the same choices.

use serde_json::{json, Value};
use tests::{ids, sse, Cluster, ClusterOptions};

const QUESTION: &str = "Write one short sentence about the sea.";

async fn post(url: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new().post(url).json(body).send().await.expect("POST")
}

/// Each choice's generated ids, checking indexes, finish reasons and usage.
fn choices(answer: &Value, n: usize) -> Vec<Vec<u64>> {
    let choices = answer["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), n, "{answer}");
    let mut total = 0;
    let out: Vec<Vec<u64>> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| {
            assert_eq!(c["index"], i, "{answer}");
            assert!(matches!(c["finish_reason"].as_str(), Some("stop" | "length")), "{c}");
            let token_ids = ids(&c["token_ids"]);
            assert!(!token_ids.is_empty());
            total += token_ids.len();
            token_ids
        })
        .collect();
    assert_eq!(answer["usage"]["completion_tokens"].as_u64().unwrap() as usize, total, "usage counts every choice");
    out
}

#[tokio::test]
async fn seeded_choices_agree_between_disaggregated_and_colocated() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    let body = json!({"model": model, "messages": [{"role": "user", "content": QUESTION}], "n": 3,
                      "temperature": 1.0, "seed": 1234, "max_tokens": 16, "return_token_ids": true});
    let mut answers = Vec::new();
    for router in [&cluster.router, &cluster.colocated_router] {
        let response = post(&format!("{}/v1/chat/completions", router.url()), &body).await;
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        answers.push(choices(&answer, 3));
    }
    assert_eq!(answers[0], answers[1], "same seed, same choices on both paths");
    let distinct: std::collections::HashSet<&Vec<u64>> = answers[0].iter().collect();
    assert!(distinct.len() > 1, "at temperature 1 the choices differ: {:?}", answers[0]);

    // Choice 0 is what the same request with n = 1 gives.
    let mut single = body.clone();
    single["n"] = json!(1);
    let answer: Value =
        post(&format!("{}/v1/chat/completions", cluster.router.url()), &single).await.json().await.unwrap();
    assert_eq!(choices(&answer, 1)[0], answers[0][0]);

    // Streamed, the choices come back the same, each chunk naming its choice.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let chunks = sse::chunks(post(&format!("{}/v1/chat/completions", cluster.router.url()), &streamed).await).await;
    let mut streamed_ids: Vec<Vec<u64>> = vec![Vec::new(); 3];
    let mut finished = [false; 3];
    for chunk in &chunks {
        let Some(choice) = chunk["choices"].get(0) else { continue };
        let i = choice["index"].as_u64().unwrap() as usize;
        if let Some(token_ids) = choice.get("token_ids") {
            streamed_ids[i].extend(ids(token_ids));
        }
        finished[i] |= choice["finish_reason"].is_string();
    }
    assert_eq!(finished, [true; 3]);
    assert_eq!(streamed_ids, answers[0]);

    // Greedy choices are all the same.
    let mut greedy = body.clone();
    greedy["temperature"] = json!(0);
    let answer: Value =
        post(&format!("{}/v1/chat/completions", cluster.router.url()), &greedy).await.json().await.unwrap();
    let greedy = choices(&answer, 3);
    assert!(greedy.iter().all(|c| c == &greedy[0]), "{greedy:?}");

    let bad = json!({"model": model, "messages": [{"role": "user", "content": QUESTION}], "n": 17});
    let response = post(&format!("{}/v1/chat/completions", cluster.router.url()), &bad).await;
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["param"], "n");

    let stats = cluster.prefill_stats().await;
    assert_eq!(stats.pinned_blocks, 0, "every hand-off was released once");
}

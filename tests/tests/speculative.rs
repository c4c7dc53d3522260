//! Speculative decoding on the decode worker (`--speculative-config`, prompt lookup) end to end:
//! the same answers as a cluster without it, disaggregated and colocated, streamed or not, with
//! logprobs, `n` > 1 and a seed, a stop string and `max_tokens`; and its Prometheus counters
//! show drafts verified and accepted.

use serde_json::{json, Value};
use tests::{ids, sse, Cluster, ClusterOptions};

const SPECULATIVE: &str = r#"{"method": "ngram", "num_speculative_tokens": 4}"#;

/// A request whose answer copies from its prompt, and a few that vary the API's features.
fn bodies(model: &str) -> Vec<Value> {
    let copy = "Repeat the following sentence three times, one per line: \
                The quick brown fox jumps over the lazy dog near the river bank.";
    let chat = |content: &str| json!([{"role": "user", "content": content}]);
    vec![
        json!({"model": model, "messages": chat(copy), "max_tokens": 64, "temperature": 0, "return_token_ids": true}),
        json!({"model": model, "messages": chat(copy), "max_tokens": 48, "temperature": 0, "logprobs": true,
               "top_logprobs": 2, "stop": ["jumps over"], "return_token_ids": true}),
        json!({"model": model, "messages": chat(copy), "max_tokens": 40, "temperature": 0.9, "seed": 11, "n": 2,
               "return_token_ids": true}),
        json!({"model": model, "messages": chat("What is the capital of France?"), "max_tokens": 24,
               "temperature": 0, "return_token_ids": true}),
    ]
}

/// What an answer says: per choice its token ids, text, finish reason and logprobs.
fn gist(answer: &Value) -> Vec<(Vec<u64>, String, String, Value)> {
    answer["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| {
            let text = c["message"]["content"].as_str().unwrap_or_default().to_owned();
            let finish = c["finish_reason"].as_str().unwrap_or_default().to_owned();
            (ids(&c["token_ids"]), text, finish, c["logprobs"].clone())
        })
        .collect()
}

/// Every body's answer from both routers, and the streamed text of the first.
async fn answers(cluster: &Cluster, bodies: &[Value]) -> Vec<Vec<(Vec<u64>, String, String, Value)>> {
    let client = reqwest::Client::new();
    let mut all = Vec::new();
    for router in [&cluster.router, &cluster.colocated_router] {
        let url = format!("{}/v1/chat/completions", router.url());
        for body in bodies {
            let response = client.post(&url).json(body).send().await.expect("POST");
            assert_eq!(response.status(), 200);
            all.push(gist(&response.json().await.expect("JSON")));
        }
        let mut streamed = bodies[0].clone();
        streamed["stream"] = json!(true);
        let chunks = sse::chunks(client.post(&url).json(&streamed).send().await.expect("POST")).await;
        let text: String =
            chunks.iter().filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str()).collect::<String>();
        all.push(vec![(Vec::new(), text, String::new(), Value::Null)]);
    }
    all
}

#[tokio::test]
async fn answers_are_the_same_with_and_without_speculation_on_both_paths() {
    let plain = {
        let cluster = Cluster::start(ClusterOptions::default());
        let model = cluster.model_name().await;
        answers(&cluster, &bodies(&model)).await
    };
    let options = ClusterOptions {
        decode_args: vec!["--speculative-config".into(), SPECULATIVE.into()],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(options);
    let model = cluster.model_name().await;
    let speculated = answers(&cluster, &bodies(&model)).await;
    assert_eq!(plain.len(), speculated.len());
    for (i, (a, b)) in plain.iter().zip(&speculated).enumerate() {
        assert_eq!(a, b, "answer {i} changed with speculation");
    }
    // Disaggregated = colocated (answers 0..5 came from one router, 5..10 from the other).
    assert_eq!(speculated[..5], speculated[5..]);
    let copied = &speculated[0][0];
    assert!(copied.1.contains("fox jumps over the lazy dog"), "the model copies: {:?}", copied.1);
    let stopped = &speculated[1][0];
    assert_eq!((stopped.1.as_str(), stopped.2.as_str()), ("The quick brown fox ", "stop"), "the stop string ends it");
    assert_eq!(speculated[4][0].1, copied.1, "streamed as answered");

    let metrics = tests::metrics::scrape(&cluster.decode.health_url()).await;
    let counter = |name: &str| tests::metrics::sample(&metrics, name, &[("role", "decode")]);
    let (drafts, proposed, accepted) = (
        counter("pdserve_worker_spec_decode_num_drafts_total"),
        counter("pdserve_worker_spec_decode_num_draft_tokens_total"),
        counter("pdserve_worker_spec_decode_num_accepted_tokens_total"),
    );
    assert!(drafts > 0.0 && accepted > 0.0 && accepted <= proposed, "{drafts} {proposed} {accepted}\n{metrics}");
}

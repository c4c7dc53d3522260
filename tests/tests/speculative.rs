//! Speculative decoding on the decode worker (`--speculative-config`: prompt lookup, and a draft
//! model) end to end: the same answers as a cluster without it, disaggregated and colocated,
//! streamed or not, with logprobs, `n` > 1 and a seed, a stop string and `max_tokens`; its
//! Prometheus counters show drafts verified and accepted; and a prefill worker whose blocks lack
//! the decode worker's draft KV is refused at the kv-transfer handshake.

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

/// The answers of a cluster without speculation (see [`answers`]).
async fn plain_answers() -> Vec<Vec<(Vec<u64>, String, String, Value)>> {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    answers(&cluster, &bodies(&model)).await
}

/// The default model drafting for itself: every greedy draft is right when its KV is.
fn self_drafting() -> String {
    json!({"method": "draft_model", "model": tests::model_path(), "num_speculative_tokens": 3}).to_string()
}

/// The decode worker's speculative decoding counters: drafts, draft tokens, accepted tokens and
/// decode steps.
async fn counters(cluster: &Cluster) -> (f64, f64, f64, f64) {
    let metrics = tests::metrics::scrape(&cluster.decode.health_url()).await;
    let counter = |name: &str| tests::metrics::sample(&metrics, name, &[("role", "decode")]);
    (
        counter("pdserve_worker_spec_decode_num_drafts_total"),
        counter("pdserve_worker_spec_decode_num_draft_tokens_total"),
        counter("pdserve_worker_spec_decode_num_accepted_tokens_total"),
        counter("pdserve_worker_decode_steps_total"),
    )
}

#[tokio::test]
async fn a_draft_model_on_both_workers_gives_the_same_answers_and_a_mismatch_is_refused() {
    let plain = plain_answers().await;
    let speculative = vec!["--speculative-config".to_string(), self_drafting()];
    let options = ClusterOptions {
        decode_args: speculative.clone(),
        prefill_args: speculative.clone(),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(options);
    let model = cluster.model_name().await;
    assert_eq!(plain, answers(&cluster, &bodies(&model)).await, "a draft model changed an answer");
    // A greedy answer over a handed-off prompt: every draft is right only if the prefill worker's
    // blocks brought the draft's KV along with the target's.
    let before = counters(&cluster).await;
    let url = format!("{}/v1/chat/completions", cluster.router.url());
    let response = reqwest::Client::new().post(&url).json(&bodies(&model)[0]).send().await.expect("POST");
    assert_eq!(gist(&response.json().await.expect("JSON")), plain[0]);
    let after = counters(&cluster).await;
    let (proposed, accepted) = (after.1 - before.1, after.2 - before.2);
    assert!(proposed > 0.0 && accepted == proposed, "{proposed} drafted, {accepted} accepted");
    drop(cluster);

    // The prefill worker has no draft model: its blocks lack the draft's KV.
    let options = ClusterOptions {
        decode_args: speculative,
        router_args: vec!["--kv-transfer-failure".into(), "fail".into()],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(options);
    let body = &bodies(&cluster.model_name().await)[0];
    let url = format!("{}/v1/chat/completions", cluster.router.url());
    let response = reqwest::Client::new().post(&url).json(body).send().await.expect("POST");
    let text = response.text().await.expect("body");
    assert!(
        text.contains("speculative decoding no draft model vs draft model")
            && text.contains("this prefill worker's first, the decode worker's second"),
        "{text}"
    );
}

#[tokio::test]
async fn answers_are_the_same_with_and_without_speculation_on_both_paths() {
    let plain = plain_answers().await;
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

    let (drafts, proposed, accepted, steps) = counters(&cluster).await;
    assert!(drafts > 0.0 && accepted > 0.0 && accepted <= proposed, "{drafts} {proposed} {accepted}");
    assert!(steps > drafts, "{steps} decode steps, {drafts} of them verifying");
    // By position: every verifying step has a first draft, a draft at position i + 1 only
    // after one at i, and one is accepted only after those before it were.
    let metrics = tests::metrics::scrape(&cluster.decode.health_url()).await;
    let by_position = |name: &str| -> Vec<f64> {
        (0..8)
            .map(|i| {
                let position = i.to_string();
                let labels = [("role", "decode"), ("position", position.as_str())];
                tests::metrics::sample(&metrics, &format!("pdserve_worker_spec_decode_num_{name}_per_pos"), &labels)
            })
            .collect()
    };
    let (proposed_at, accepted_at) = (by_position("draft_tokens"), by_position("accepted_tokens"));
    assert_eq!((proposed_at.iter().sum::<f64>(), accepted_at.iter().sum::<f64>()), (proposed, accepted));
    assert_eq!(proposed_at[0], drafts);
    for i in 1..proposed_at.len() {
        assert!(
            proposed_at[i] <= proposed_at[i - 1] && accepted_at[i] <= accepted_at[i - 1],
            "{proposed_at:?} {accepted_at:?}"
        );
    }
    assert!(accepted_at.iter().zip(&proposed_at).all(|(a, p)| a <= p), "{proposed_at:?} {accepted_at:?}");
}

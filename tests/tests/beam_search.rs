//! vLLM's beam search end to end on the real model: the router's beams equal those of a beam
//! search written here over the model's own next-token logprobs (asked one token at a time), are
//! the same run after run, and the same disaggregated or colocated.

use serde_json::{json, Value};
use tests::{Cluster, ClusterOptions};

const PROMPT: &str = "The best thing about living by the sea is";
const WIDTH: usize = 3;
const MAX_TOKENS: usize = 5;

async fn post(url: &str, body: Value) -> Value {
    let response = reqwest::Client::new().post(url).json(&body).send().await.expect("POST");
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The model's `2 × WIDTH` most likely next tokens after `ids`, with their raw logprobs.
async fn next_tokens(url: &str, model: &str, ids: &[u64]) -> Vec<(u64, f64)> {
    let body = json!({"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0,
                      "logprobs": 2 * WIDTH, "return_tokens_as_token_ids": true});
    let answer = post(&format!("{url}/v1/completions"), body).await;
    let top = answer["choices"][0]["logprobs"]["top_logprobs"][0].as_object().unwrap().clone();
    // The chosen token leads the object; the rest are the most likely, most likely first.
    let mut alternatives: Vec<(u64, f64)> = top
        .iter()
        .map(|(token, logprob)| (token.strip_prefix("token_id:").unwrap().parse().unwrap(), logprob.as_f64().unwrap()))
        .collect();
    alternatives.sort_by(|a, b| b.1.total_cmp(&a.1));
    alternatives.truncate(2 * WIDTH);
    alternatives
}

/// Beam search as vLLM defines it, over `next_tokens`: the `WIDTH` best beams by cumulative
/// logprob over length (prompt included, a final eos left out).
async fn reference(url: &str, model: &str, prompt: &[u64], eos: &[u64]) -> Vec<Vec<u64>> {
    let score = |tokens: &[u64], logprob: f64| {
        let mut len = prompt.len() + tokens.len();
        if tokens.last().is_some_and(|t| eos.contains(t)) {
            len -= 1;
        }
        logprob / len as f64
    };
    let mut live: Vec<(Vec<u64>, f64)> = vec![(Vec::new(), 0.0)];
    let mut ended = Vec::new();
    for _ in 0..MAX_TOKENS {
        let mut candidates = Vec::new();
        for (tokens, logprob) in &live {
            let ids: Vec<u64> = prompt.iter().chain(tokens).copied().collect();
            for (token, lp) in next_tokens(url, model, &ids).await {
                let next = (tokens.iter().copied().chain([token]).collect::<Vec<_>>(), logprob + lp);
                if eos.contains(&token) {
                    ended.push(next)
                } else {
                    candidates.push(next)
                }
            }
        }
        candidates.sort_by(|a, b| score(&b.0, b.1).total_cmp(&score(&a.0, a.1)));
        candidates.truncate(WIDTH);
        live = candidates;
    }
    ended.extend(live);
    ended.sort_by(|a, b| score(&b.0, b.1).total_cmp(&score(&a.0, a.1)));
    ended.into_iter().take(WIDTH).map(|(tokens, _)| tokens).collect()
}

fn beams(answer: &Value) -> Vec<Vec<u64>> {
    let choices = answer["choices"].as_array().unwrap();
    choices.iter().map(|c| c["token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()).collect()
}

#[tokio::test]
async fn beams_equal_a_reference_beam_search_over_the_models_logprobs() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    let body = json!({"model": model, "prompt": PROMPT, "n": WIDTH, "max_tokens": MAX_TOKENS,
                      "use_beam_search": true, "temperature": 0, "return_token_ids": true});
    let url = cluster.router.url().to_owned();
    let answer = post(&format!("{url}/v1/completions"), body.clone()).await;
    let found = beams(&answer);
    assert_eq!(found.len(), WIDTH, "{answer}");
    assert!(found.windows(2).all(|w| w[0] != w[1]), "distinct beams: {found:?}");
    // Run after run, and colocated, the same beams.
    assert_eq!(beams(&post(&format!("{url}/v1/completions"), body.clone()).await), found);
    let colocated = cluster.colocated_router.url();
    assert_eq!(beams(&post(&format!("{colocated}/v1/completions"), body).await), found);

    let prompt: Vec<u64> =
        answer["choices"][0]["prompt_token_ids"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    let info: Value = reqwest::get(format!("{url}/tokenizer_info")).await.unwrap().json().await.unwrap();
    let eos_text = info["eos_token"].as_str().unwrap();
    let eos: Value = post(&format!("{url}/tokenize"), json!({"prompt": eos_text, "add_special_tokens": false})).await;
    let eos: Vec<u64> = eos["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    assert_eq!(found, reference(&url, &model, &prompt, &eos).await);
}

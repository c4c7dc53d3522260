//! Tensor-parallel workers in a disaggregated cluster: a prefill worker on
//! one rank handing off to a decode worker on three (each decode rank pulls
//! its own KV head), and the reverse (the decode worker pulls every head from
//! the three prefill ranks), answer what a colocated single-rank worker does.
//!
//! Quantized kernels round a row-parallel partial sum differently from the
//! whole product (see `engine/tests/tensor_parallel.rs`), so a near-tie may
//! go the other way and a free-running answer part ways after it. So the
//! check is teacher-forced: after every prefix of the single-rank answer,
//! the next two tokens (the first from the prefill worker, the second from
//! the decode worker over the handed-off KV) must be the single-rank ones
//! wherever that choice was clear (the golden README's threshold).

use serde_json::{json, Value};
use tests::{golden, start_decode_with, start_prefill_with, start_router, worker_stats};

/// Top-2 logprob gap below which the greedy choice is a near-tie.
const NEAR_TIE: f64 = 0.5;
/// Teacher-forced prefixes tried per conversation.
const PREFIXES: usize = 6;

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().expect("ids").iter().map(|t| t.as_u64().expect("an id")).collect()
}

async fn post(url: String, body: Value) -> Value {
    let response = reqwest::Client::new().post(url).json(&body).send().await.expect("POST");
    assert_eq!(response.status(), 200, "{body}");
    response.json().await.expect("JSON")
}

/// A single-rank answer: the prompt's ids, the greedy ids, and each
/// position's top-2 logprob gap.
struct Reference {
    prompt: Vec<u64>,
    tokens: Vec<u64>,
    gaps: Vec<f64>,
}

async fn reference(router: &str, messages: &Value) -> Reference {
    let body = json!({"model": "m", "messages": messages, "max_tokens": 24, "temperature": 0,
                      "logprobs": true, "top_logprobs": 2, "return_token_ids": true});
    let answer = post(format!("{router}/v1/chat/completions"), body).await;
    let choice = &answer["choices"][0];
    let gaps = choice["logprobs"]["content"]
        .as_array()
        .expect("logprobs")
        .iter()
        .map(|e| {
            let top = e["top_logprobs"].as_array().unwrap();
            top[0]["logprob"].as_f64().unwrap() - top[1]["logprob"].as_f64().unwrap()
        })
        .collect();
    Reference { prompt: ids(&answer["prompt_token_ids"]), tokens: ids(&choice["token_ids"]), gaps }
}

#[tokio::test]
async fn disaggregated_across_tensor_parallel_sizes_answers_like_one_rank() {
    let golden = golden();
    let chats: Vec<&Value> = golden["records"].as_array().unwrap().iter().filter_map(|r| r.get("messages")).collect();
    assert!(chats.len() >= 8);

    let references = {
        let decode = start_decode_with(&[]);
        let router = start_router(&[], &[&decode], &["--served-model-name", "m"]);
        let mut references = Vec::new();
        for messages in &chats {
            references.push(reference(router.url(), messages).await);
        }
        references
    };

    for (prefill_tp, decode_tp) in [("1", "3"), ("3", "1")] {
        let prefill = start_prefill_with("127.0.0.1:0", &["--tensor-parallel-size", prefill_tp]);
        let decode = start_decode_with(&["--tensor-parallel-size", decode_tp]);
        let flags = ["--served-model-name", "m", "--local-prefill-max-tokens", "0"];
        let router = start_router(&[&prefill], &[&decode], &flags);
        let url = format!("{}/v1/completions", router.url());
        let (mut prefilled, mut decoded) = (0, 0);
        for r in &references {
            let clear = |k: usize| r.gaps.get(k).is_some_and(|&g| g >= NEAR_TIE);
            for k in (0..r.tokens.len()).filter(|&k| clear(k)).take(PREFIXES) {
                let prompt: Vec<u64> = r.prompt.iter().chain(&r.tokens[..k]).copied().collect();
                let body = json!({"model": "m", "prompt": prompt, "max_tokens": 2, "temperature": 0,
                                  "ignore_eos": true, "return_token_ids": true});
                let got = ids(&post(url.clone(), body).await["choices"][0]["token_ids"]);
                let label = format!("prefill TP={prefill_tp}, decode TP={decode_tp}, prefix {k}");
                assert_eq!(got[0], r.tokens[k], "{label}: the prefill worker's token");
                prefilled += 1;
                if clear(k + 1) {
                    assert_eq!(got[1], r.tokens[k + 1], "{label}: the decode worker's token");
                    decoded += 1;
                }
            }
        }
        println!(
            "prefill TP={prefill_tp} → decode TP={decode_tp}: {prefilled} prefill and {decoded} decode tokens equal to TP=1"
        );
        assert!(prefilled >= 4 * chats.len() && decoded >= 3 * chats.len(), "{prefilled} / {decoded} compared");
        let pins = worker_stats(prefill.url()).await;
        assert_eq!(pins.pinned_blocks, 0, "every rank's pin was released: {pins:?}");
        let pulls = worker_stats(decode.url()).await;
        assert!(pulls.kv_pulls_shm + pulls.kv_pulls_tcp >= prefilled as u64, "{pulls:?}");
    }
}

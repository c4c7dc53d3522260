//! The second real model, served by the whole cluster: Gemma 3 270M in
//! Q4_K_M (a SentencePiece vocabulary of 262k pieces, sliding-window
//! layers, K-quant weights) against llama.cpp's greedy outputs
//! (`tests/data/golden/gemma3-greedy.json`), over `/v1/completions` and
//! `/v1/chat/completions`, disaggregated and colocated.
//!
//! Needs the model: `scripts/fetch-model.sh gemma3`, or `PDSERVE_GEMMA3`.

use serde_json::json;
use tests::{gemma3_path, golden_file, ids, post_ok, teacher_forced_agreement, Cluster, ClusterOptions};

fn cluster() -> Cluster {
    Cluster::start(ClusterOptions { model: Some(gemma3_path()), ..Default::default() })
}

/// Teacher-forced through the disaggregated router: at every clear
/// decision (margin >= 0.5), the greedy next token after the reference's
/// own prefix is the reference's, at >= 95% of positions; then every
/// record's greedy text is the same colocated; and chats render and
/// tokenize exactly as the reference did.
#[tokio::test]
async fn gemma3_matches_llama_cpp_disaggregated_and_colocated() {
    let cluster = cluster();
    let model = cluster.model_name().await;
    let golden = golden_file("gemma3-greedy.json");
    let records = golden["records"].as_array().unwrap();

    let url = format!("{}/v1/completions", cluster.router.url());
    let (agreed, checked) = teacher_forced_agreement(&url, &model, &golden).await;
    let rate = agreed as f64 / checked as f64;
    eprintln!("Gemma 3 teacher-forced agreement over HTTP: {agreed}/{checked} = {:.1}%", rate * 100.0);
    assert!(checked > 150, "the golden file has over 150 clear positions in its first 16, checked {checked}");
    assert!(rate >= 0.95, "agreement {:.1}% is below 95%", rate * 100.0);

    for record in records {
        let body = json!({"model": model, "prompt": record["prompt_token_ids"], "max_tokens": 32, "temperature": 0, "return_token_ids": true});
        let pd = post_ok(&url, body.clone()).await;
        let colocated = post_ok(&format!("{}/v1/completions", cluster.colocated_router.url()), body).await;
        assert!(!ids(&pd["choices"][0]["token_ids"]).is_empty());
        assert_eq!(pd["choices"][0]["token_ids"], colocated["choices"][0]["token_ids"], "record {}", record["id"]);
        assert_eq!(pd["choices"][0]["text"], colocated["choices"][0]["text"], "record {}", record["id"]);
    }

    let chat = format!("{}/v1/chat/completions", cluster.router.url());
    let mut chats = 0;
    for record in records.iter().filter(|r| r.get("messages").is_some()) {
        let body = json!({"model": model, "messages": record["messages"], "max_tokens": 8, "temperature": 0, "return_token_ids": true});
        let response = post_ok(&chat, body).await;
        assert_eq!(ids(&response["prompt_token_ids"]), ids(&record["prompt_token_ids"]), "record {}", record["id"]);
        let want = ids(&record["completion_token_ids"]);
        let got = ids(&response["choices"][0]["token_ids"]);
        let clear = record["top2_margins"].as_array().unwrap().iter().take(8).all(|m| m.as_f64().unwrap() >= 0.5);
        if clear {
            assert_eq!(got[..], want[..got.len()], "record {}: a clear greedy start", record["id"]);
        }
        chats += 1;
    }
    assert!(chats >= 8);

    // Structured outputs over a SentencePiece vocabulary (`▁` spaces, `<0xNN>` bytes): a schema and
    // a choice hold, the same disaggregated and colocated.
    let schema = json!({"type": "object", "additionalProperties": false, "required": ["city", "population"],
                        "properties": {"city": {"type": "string", "maxLength": 20},
                                       "population": {"type": "integer", "minimum": 0, "maximum": 100000000}}});
    let question = json!([{"role": "user", "content": "The capital of France and its population, as JSON."}]);
    let asks = [
        json!({"response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}}),
        json!({"structured_outputs": {"choice": ["Paris", "Lyon", "Marseille"]}}),
    ];
    for ask in asks {
        let mut body = json!({"model": model, "messages": question, "max_tokens": 64, "temperature": 0});
        body.as_object_mut().unwrap().extend(ask.as_object().unwrap().clone());
        let pd = post_ok(&chat, body.clone()).await;
        let colocated = post_ok(&format!("{}/v1/chat/completions", cluster.colocated_router.url()), body).await;
        let choice = &pd["choices"][0];
        assert_eq!(choice["message"], colocated["choices"][0]["message"], "{ask}");
        assert_eq!(choice["finish_reason"], "stop", "{pd}");
        let content = choice["message"]["content"].as_str().unwrap();
        if ask.get("structured_outputs").is_some() {
            assert!(["Paris", "Lyon", "Marseille"].contains(&content), "{content:?}");
        } else {
            let answer: serde_json::Value =
                serde_json::from_str(content).unwrap_or_else(|e| panic!("{content:?}: {e}"));
            assert!(answer["city"].as_str().is_some_and(|c| c.chars().count() <= 20), "{answer}");
            assert!(answer["population"].as_u64().is_some_and(|p| p <= 100_000_000), "{answer}");
            assert_eq!(answer.as_object().unwrap().len(), 2, "{answer}");
        }
        eprintln!("Gemma 3 constrained: {content}");
    }
}

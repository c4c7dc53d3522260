//! Fidelity against llama.cpp's greedy outputs, and disaggregated == colocated.

use serde_json::json;
use tests::{golden, ids, post_ok, teacher_forced_agreement, worker_stats, Cluster, ClusterOptions};

/// Teacher-forced: at every clear decision (margin >= 0.5) among the first 16
/// positions, the greedy next token after the reference's own prefix must be
/// the reference's token, at >= 95% of positions.
#[tokio::test]
async fn greedy_tokens_match_llama_cpp_where_it_was_sure() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    let url = format!("{}/v1/completions", cluster.router.url());
    let (agreed, checked) = teacher_forced_agreement(&url, &model, &golden()).await;
    let rate = agreed as f64 / checked as f64;
    eprintln!("teacher-forced agreement: {agreed}/{checked} = {:.1}%", rate * 100.0);
    assert!(checked > 100, "the golden file has over 100 clear positions, checked {checked}");
    assert!(rate >= 0.95, "agreement {:.1}% is below 95%", rate * 100.0);
}

/// The chat path renders the template and tokenizes exactly as the reference did.
#[tokio::test]
async fn chat_prompts_tokenize_exactly_like_the_reference() {
    let cluster = Cluster::start(ClusterOptions::default());
    let model = cluster.model_name().await;
    let url = format!("{}/v1/chat/completions", cluster.router.url());
    let golden = golden();
    let mut seen = 0;
    for record in golden["records"].as_array().unwrap().iter().filter(|r| r.get("messages").is_some()) {
        let body = json!({"model": model, "messages": record["messages"], "max_tokens": 1, "temperature": 0, "return_token_ids": true});
        let response = post_ok(&url, body).await;
        assert_eq!(ids(&response["prompt_token_ids"]), ids(&record["prompt_token_ids"]), "record {}", record["id"]);
        assert_eq!(
            response["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
            ids(&record["prompt_token_ids"]).len()
        );
        seen += 1;
    }
    assert!(seen >= 8);
}

/// Disaggregated (prefill -> KV hand-off -> decode) and colocated serving are
/// the same computation: identical greedy tokens on every golden prompt,
/// whichever transport carried the KV. `decode_args` pick the transport;
/// the decode worker's pull counts show which one it used.
async fn disaggregated_equals_colocated_over(decode_args: &[&str], shared_memory: bool) {
    let decode_args = decode_args.iter().map(|a| a.to_string()).collect();
    let cluster = Cluster::start(ClusterOptions { decode_args, ..Default::default() });
    let model = cluster.model_name().await;
    let golden = golden();
    let records = golden["records"].as_array().unwrap();
    for record in records {
        let body = json!({"model": model, "prompt": record["prompt_token_ids"], "max_tokens": 32, "temperature": 0, "return_token_ids": true});
        let pd = post_ok(&format!("{}/v1/completions", cluster.router.url()), body.clone()).await;
        let colocated = post_ok(&format!("{}/v1/completions", cluster.colocated_router.url()), body).await;
        let pd_ids = ids(&pd["choices"][0]["token_ids"]);
        assert!(!pd_ids.is_empty());
        assert_eq!(pd_ids, ids(&colocated["choices"][0]["token_ids"]), "record {}", record["id"]);
        assert_eq!(pd["choices"][0]["text"], colocated["choices"][0]["text"]);
    }
    let stats = cluster.prefill_stats().await;
    assert_eq!(stats.pinned_blocks, 0, "every hand-off was pulled and released");
    let pulls = worker_stats(cluster.decode.url()).await;
    let (used, unused) =
        if shared_memory { (pulls.kv_pulls_shm, pulls.kv_pulls_tcp) } else { (pulls.kv_pulls_tcp, pulls.kv_pulls_shm) };
    assert_eq!((used, unused), (records.len() as u64, 0), "pulls by transport: {pulls:?}");
}

/// One host: the decode worker maps the prefill worker's KV cache by itself.
#[tokio::test]
async fn disaggregated_equals_colocated_over_shared_memory() {
    disaggregated_equals_colocated_over(&[], true).await;
}

/// `--kv-transport tcp` forces TCP on the same host, with the same tokens.
#[tokio::test]
async fn disaggregated_equals_colocated_over_tcp() {
    disaggregated_equals_colocated_over(&["--kv-transport", "tcp"], false).await;
}

/// `--kv-layer-streaming`: the first step starts while the KV is still
/// arriving (over TCP, the slower path), each layer waiting for its own KV;
/// the tokens are the same.
#[tokio::test]
async fn disaggregated_equals_colocated_with_layer_streaming() {
    disaggregated_equals_colocated_over(&["--kv-transport", "tcp", "--kv-layer-streaming"], false).await;
}

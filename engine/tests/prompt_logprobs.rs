//! vLLM's prompt logprobs on the real model: each prompt token's logprob given the tokens before
//! it equals the logprob the ordinary sampling path reports for that token, sampled (forced by
//! logit bias, which logprobs do not see) after the same prefix. Also when the prompt is prefilled
//! in chunks, and when its blocks are in the prefix cache (which a scored prompt must not use).
//!
//! Needs the model: `scripts/fetch-model.sh`, or `PDSERVE_MODEL=<gguf>`.

mod common;

use std::sync::Arc;

use engine::model::load_gguf;
use engine::{Engine, EngineConfig, EngineEvent, EngineHandle, SamplingParams, TokenLogprobs};

const TOP: u32 = 3;

fn engine(max_num_batched_tokens: usize) -> EngineHandle {
    let loaded = load_gguf(&common::model_path()).expect("loading the model");
    let shape = loaded.model.kv_shape(16, 64);
    let config = EngineConfig {
        max_num_seqs: 4,
        max_num_batched_tokens,
        max_model_len: 512,
        eos_token_ids: loaded.info.eos_token_ids.clone(),
        default_seed: 0,
        enable_prefix_caching: true,
        speculative: None,
    };
    Engine::start(Arc::new(loaded.model), shape, config)
}

/// The prompt logprobs of `prompt` (positions 1..) and the request's cached-token count.
fn scored(engine: &EngineHandle, id: &str, prompt: &[u32]) -> (Vec<TokenLogprobs>, usize) {
    let mut request = common::greedy_request(id, prompt, 1);
    request.sampling.prompt_logprobs = Some(TOP);
    let mut events = engine.submit(request).unwrap();
    let mut logprobs = Vec::new();
    loop {
        match events.blocking_recv().expect("a final event") {
            EngineEvent::PromptLogprobs { start, logprobs: more } => {
                assert_eq!(start, logprobs.len() + 1, "prompt logprobs out of order");
                logprobs.extend(more);
            }
            EngineEvent::Token { .. } => {}
            EngineEvent::Finished { num_cached_tokens, .. } => return (logprobs, num_cached_tokens),
            EngineEvent::Error(e) => panic!("{id}: {e}"),
            EngineEvent::Embedding(_) => panic!("{id}: no embedding was asked for"),
        }
    }
}

/// What the sampling path reports for `token` generated right after `prefix`.
fn sampled_after(engine: &EngineHandle, prefix: &[u32], token: u32) -> TokenLogprobs {
    let mut request = common::greedy_request("reference", prefix, 1);
    request.sampling = SamplingParams { logit_bias: vec![(token, 100.0)], logprobs: Some(TOP), ..request.sampling };
    let mut events = engine.submit(request).unwrap();
    match events.blocking_recv().expect("a token") {
        EngineEvent::Token { id, logprobs, .. } => {
            assert_eq!(id, token, "the bias forces the token");
            logprobs.expect("logprobs were asked for")
        }
        other => panic!("unexpected {other:?}"),
    }
}

fn assert_close(got: &[TokenLogprobs], want: &[TokenLogprobs], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (p, (g, w)) in got.iter().zip(want).enumerate() {
        let position = p + 1;
        assert!((g.logprob - w.logprob).abs() < 1e-3, "{what}: position {position}: {} vs {}", g.logprob, w.logprob);
        assert_eq!(g.rank, w.rank, "{what}: position {position}");
        let ids = |l: &TokenLogprobs| l.top.iter().map(|&(id, _)| id).collect::<Vec<_>>();
        assert_eq!(ids(g), ids(w), "{what}: position {position}");
        assert!(g.rank >= 1 && (g.rank > TOP || g.top[g.rank as usize - 1].1 == g.logprob), "{what}: {g:?}");
    }
}

#[test]
fn prompt_logprobs_equal_the_sampling_paths_whole_chunked_and_past_the_prefix_cache() {
    let prompt = common::golden().into_iter().next().expect("a golden record").prompt;
    let whole = engine(2048);
    let reference: Vec<TokenLogprobs> =
        (1..prompt.len()).map(|p| sampled_after(&whole, &prompt[..p], prompt[p])).collect();

    let (logprobs, cached) = scored(&whole, "whole", &prompt);
    assert_close(&logprobs, &reference, "one prefill");
    // The same prompt again: its full blocks are cached now, but scoring needs every row.
    let (logprobs, cached_again) = scored(&whole, "again", &prompt);
    assert_eq!((cached, cached_again), (0, 0), "a scored prompt is computed whole");
    assert_close(&logprobs, &reference, "after a cache fill");

    // Prefilled 16 tokens a step: rows span chunks, the last row of each predicts the next's first.
    let chunked = engine(16);
    let (logprobs, _) = scored(&chunked, "chunked", &prompt);
    assert_close(&logprobs, &reference, "chunked prefill");
}

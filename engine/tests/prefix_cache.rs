//! Prefix caching on the real model: a repeated golden prompt reuses its
//! cached blocks and still gives llama.cpp's greedy tokens.
//!
//! Needs the model: `scripts/fetch-model.sh`, or `PDSERVE_MODEL=<gguf>`.

mod common;

use std::sync::Arc;

use engine::model::load_gguf;
use engine::{Engine, EngineConfig, EngineEvent, EngineHandle, KvEvent};

const BLOCK_SIZE: usize = 16;

/// The prompt and llama.cpp's greedy completion of one golden record.
fn golden(id: &str) -> (Vec<u32>, Vec<u32>) {
    let record = common::golden().into_iter().find(|r| r.id == id).expect("record");
    (record.prompt, record.completion)
}

/// Greedy tokens and `num_cached_tokens` of one request.
fn generate(engine: &EngineHandle, id: &str, prompt: &[u32], max_tokens: u32) -> (Vec<u32>, usize) {
    let mut events = engine.submit(common::greedy_request(id, prompt, max_tokens)).unwrap();
    let mut tokens = Vec::new();
    loop {
        match events.blocking_recv().expect("a final event") {
            EngineEvent::Token { id: t, .. } => tokens.push(t),
            EngineEvent::Finished { num_cached_tokens, .. } => return (tokens, num_cached_tokens),
            EngineEvent::Error(e) => panic!("{id}: {e}"),
            EngineEvent::PromptLogprobs { .. } => panic!("{id}: prompt logprobs were not asked for"),
            EngineEvent::Embedding(_) => panic!("{id}: no embedding was asked for"),
        }
    }
}

#[test]
fn a_repeated_prompt_hits_the_cache_and_gives_the_same_greedy_tokens() {
    let loaded = load_gguf(&common::model_path()).expect("loading the model");
    let shape = loaded.model.kv_shape(BLOCK_SIZE, 64);
    let config = EngineConfig {
        max_num_seqs: 4,
        max_num_batched_tokens: 2048,
        max_model_len: 512,
        eos_token_ids: loaded.info.eos_token_ids.clone(),
        default_seed: 0,
        enable_prefix_caching: true,
        speculative: None,
    };
    let engine = Engine::start(Arc::new(loaded.model), shape, config);
    let (prompt, completion) = golden("capital-france-one-word");
    let max_tokens = completion.len() as u32;

    let (first, cached) = generate(&engine, "first", &prompt, max_tokens);
    assert_eq!((first.as_slice(), cached), (completion.as_slice(), 0));
    let stored = engine.take_kv_events().iter().filter(|e| matches!(e, KvEvent::BlockStored { .. })).count();
    assert!(stored >= prompt.len() / BLOCK_SIZE, "{stored} blocks stored");

    // 42 prompt tokens: its 2 full blocks come from the cache.
    let (second, cached) = generate(&engine, "second", &prompt, max_tokens);
    assert_eq!(cached, prompt.len() / BLOCK_SIZE * BLOCK_SIZE);
    assert!(cached > 0);
    assert_eq!(second, first, "a cache hit changed the greedy tokens");
    engine.sync();
    let stats = engine.stats();
    assert_eq!(stats.free_blocks, stats.total_blocks, "{stats:?}");
    assert!(stats.cached_blocks > 0, "{stats:?}");
}

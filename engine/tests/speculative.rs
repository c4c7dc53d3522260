//! Speculative decoding on the real model, by prompt lookup and with a draft model: the same
//! tokens as without it, greedy and seeded, batched, and when sequences are preempted and
//! recomputed mid-speculation; and the drafts are really verified (some accepted, some not).
//!
//! Needs the model: `scripts/fetch-model.sh`, or `PDSERVE_MODEL=<gguf>`.

mod common;

use engine::model::{ComputeDevice, LoadOptions, WeightDtype};
use engine::{
    Engine, EngineConfig, EngineEvent, EngineHandle, EngineRequest, NgramLookup, SamplingParams, SpeculativeConfig,
    SpeculativeMethod,
};

/// Every step speculates, however many sequences it runs.
const DRAFTS: SpeculativeConfig = SpeculativeConfig {
    method: SpeculativeMethod::Ngram(NgramLookup { prompt_lookup_max: 3, prompt_lookup_min: 1 }),
    num_speculative_tokens: 4,
    disable_by_batch_size: usize::MAX,
};

/// The model drafting for itself: the same weights and kernels, whose rows give the same bits
/// alone or batched, so a greedy draft is always the target's own token. Any draft KV out of
/// place (a position, a layer, a step that forgot it) shows as a rejected greedy draft.
fn self_drafting() -> SpeculativeConfig {
    SpeculativeConfig {
        method: SpeculativeMethod::DraftModel { model: common::model_path() },
        num_speculative_tokens: 3,
        disable_by_batch_size: usize::MAX,
    }
}

fn engine(speculative: Option<SpeculativeConfig>, num_blocks: usize) -> EngineHandle {
    engine_on_ranks(speculative, num_blocks, 1)
}

/// [`engine`] with the model split over `tp_size` CPU ranks, paired with `speculative`'s draft
/// model if it names one.
fn engine_on_ranks(speculative: Option<SpeculativeConfig>, num_blocks: usize, tp_size: usize) -> EngineHandle {
    let loaded = engine::model::load(&common::model_path(), &LoadOptions::default())
        .and_then(|l| l.with_draft_of(speculative.as_ref(), &LoadOptions::default()))
        .expect("loading the model (and its draft)");
    let whole = loaded.model.kv_shape(16, num_blocks);
    let shape = engine::KvCacheShape { num_kv_heads: whole.num_kv_heads / tp_size, ..whole };
    let config = EngineConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 512,
        max_model_len: 1024,
        eos_token_ids: loaded.info.eos_token_ids.clone(),
        default_seed: 0,
        enable_prefix_caching: true,
        speculative,
    };
    let model = loaded.model.place(ComputeDevice::Cpu, tp_size, WeightDtype::Auto).expect("placing the model");
    Engine::start(model, shape, config)
}

/// Every request's tokens, the requests submitted together (so they share steps).
fn generate(engine: &EngineHandle, requests: Vec<EngineRequest>) -> Vec<Vec<u32>> {
    let mut streams: Vec<_> = requests.into_iter().map(|r| engine.submit(r).unwrap()).collect();
    streams
        .iter_mut()
        .map(|events| {
            let mut tokens = Vec::new();
            loop {
                match events.blocking_recv().expect("a final event") {
                    EngineEvent::Token { id, .. } => tokens.push(id),
                    EngineEvent::Finished { .. } => return tokens,
                    EngineEvent::Error(e) => panic!("{e}"),
                    other => panic!("unexpected {other:?}"),
                }
            }
        })
        .collect()
}

/// The golden prompts, and each one twice in a row (which the model goes on repeating: a
/// workload that copies from its prompt), `max_tokens` each.
fn requests(max_tokens: u32, sampling: impl Fn(u32) -> SamplingParams) -> Vec<EngineRequest> {
    let golden = common::golden();
    let prompts = golden.iter().take(3).flat_map(|r| [r.prompt.clone(), [r.prompt.clone(), r.prompt.clone()].concat()]);
    prompts
        .enumerate()
        .map(|(i, prompt)| EngineRequest {
            sampling: sampling(max_tokens),
            ..common::greedy_request(&format!("r{i}"), &prompt, max_tokens)
        })
        .collect()
}

#[test]
fn greedy_output_is_the_same_token_for_token_and_drafts_are_verified() {
    let requests = || requests(48, SamplingParams::greedy);
    let plain_engine = engine(None, 512);
    let plain = generate(&plain_engine, requests());
    let speculating = engine(Some(DRAFTS), 512);
    let speculated = generate(&speculating, requests());
    for (i, (a, b)) in plain.iter().zip(&speculated).enumerate() {
        assert_eq!(a, b, "request {i}: speculation changed the greedy output");
    }
    let stats = speculating.stats().speculation;
    assert!(stats.num_accepted_tokens > 0, "no draft was accepted: {stats:?}");
    assert!(stats.num_accepted_tokens < stats.num_draft_tokens, "every draft was accepted: {stats:?}");
    // Each answer's first token comes with its prompt; every later one from a decode step, or
    // as a draft that step accepted. Only an answer's last step may count more: the drafts
    // accepted after a token that ended it, and the token it then did not give after them.
    let decoded = speculated.iter().map(|tokens| tokens.len() as u64 - 1).sum::<u64>();
    assert_eq!(plain_engine.stats().speculation.num_decode_steps, decoded);
    let counted = stats.num_decode_steps + stats.num_accepted_tokens;
    let most = decoded + (speculated.len() * DRAFTS.num_speculative_tokens) as u64;
    assert!((decoded..=most).contains(&counted), "{decoded} decoded: {stats:?}");
    assert!(stats.num_drafts < stats.num_decode_steps, "{stats:?}");
    // Every verifying step has a first draft; the counts by position add up to the totals.
    assert_eq!(stats.num_draft_tokens_per_pos.first(), Some(&stats.num_drafts), "{stats:?}");
    assert!(stats.num_draft_tokens_per_pos.len() <= DRAFTS.num_speculative_tokens, "{stats:?}");
    assert_eq!(stats.num_draft_tokens_per_pos.iter().sum::<u64>(), stats.num_draft_tokens);
    assert_eq!(stats.num_accepted_tokens_per_pos.iter().sum::<u64>(), stats.num_accepted_tokens);
}

#[test]
fn a_seed_gives_the_same_tokens_with_and_without_speculation() {
    let sampled = |max_tokens| SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: Some(7),
        ..SamplingParams::greedy(max_tokens)
    };
    let requests = || requests(40, sampled);
    let plain = generate(&engine(None, 512), requests());
    let speculating = engine(Some(DRAFTS), 512);
    assert_eq!(plain, generate(&speculating, requests()), "speculation changed a seeded sample");
    assert!(speculating.stats().speculation.num_accepted_tokens > 0);
    // And it is reproducible on its own.
    assert_eq!(plain, generate(&speculating, requests()));
}

#[test]
fn preempted_sequences_roll_back_and_recompute_to_the_same_tokens() {
    // Every one runs to `max_tokens`, so the cache must take them all.
    let requests =
        || requests(64, |max_tokens| SamplingParams { ignore_eos: true, ..SamplingParams::greedy(max_tokens) });
    let plain = generate(&engine(None, 512), requests());
    // Too few blocks for all of them at once: some are preempted while they speculate.
    let crowded = engine(Some(DRAFTS), 28);
    let speculated = generate(&crowded, requests());
    assert!(crowded.stats().num_preemptions > 0, "no preemption: the test proves nothing");
    assert!(crowded.stats().speculation.num_accepted_tokens > 0);
    assert_eq!(plain, speculated);
}

#[test]
fn tensor_parallel_ranks_verify_drafts_to_the_same_tokens() {
    // SmolLM2's 3 KV heads split over 3 ranks; compared with the same ranks without speculation.
    let requests = || requests(32, SamplingParams::greedy);
    let plain = generate(&engine_on_ranks(None, 512, 3), requests());
    let speculating = engine_on_ranks(Some(DRAFTS), 512, 3);
    assert_eq!(plain, generate(&speculating, requests()));
    assert!(speculating.stats().speculation.num_accepted_tokens > 0);
}

#[test]
fn a_draft_model_proposes_and_greedy_output_is_the_same() {
    let requests = || requests(40, SamplingParams::greedy);
    let plain = generate(&engine(None, 512), requests());
    let drafting = engine(Some(self_drafting()), 512);
    assert_eq!(plain, generate(&drafting, requests()), "a draft model changed the greedy output");
    let stats = drafting.stats().speculation;
    assert!(stats.num_draft_tokens > 0, "nothing was drafted: {stats:?}");
    // The draft is the target itself: every greedy draft is right, if its KV is.
    assert_eq!(stats.num_accepted_tokens, stats.num_draft_tokens, "{stats:?}");
    // A second round hits the prefix cache: the cached blocks' draft layers are valid too.
    assert_eq!(plain, generate(&drafting, requests()));
    let again = drafting.stats().speculation;
    assert_eq!(again.num_accepted_tokens, again.num_draft_tokens, "after prefix-cache hits: {again:?}");
}

#[test]
fn a_draft_model_keeps_seeded_samples_and_recomputes_after_preemption() {
    let sampled = |max_tokens| SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        seed: Some(7),
        ignore_eos: true,
        ..SamplingParams::greedy(max_tokens)
    };
    let requests = || requests(48, sampled);
    let plain = generate(&engine(None, 512), requests());
    let crowded = engine(Some(self_drafting()), 28);
    assert_eq!(plain, generate(&crowded, requests()), "a draft model changed a seeded sample");
    assert!(crowded.stats().num_preemptions > 0, "no preemption: the test proves nothing");
    let stats = crowded.stats().speculation;
    // Sampled tokens differ from the greedy drafts now and then.
    assert!(0 < stats.num_accepted_tokens && stats.num_accepted_tokens < stats.num_draft_tokens, "{stats:?}");
}

#[test]
fn a_draft_model_that_cannot_serve_is_refused() {
    // Paired, but asked to run on a GPU: the draft's passes are the CPU kernels'.
    let loaded = engine::model::load(&common::model_path(), &LoadOptions::default())
        .and_then(|l| l.with_draft_of(Some(&self_drafting()), &LoadOptions::default()))
        .unwrap();
    let error = loaded.model.place(ComputeDevice::Cuda(0), 1, WeightDtype::Auto).err().expect("refused").to_string();
    assert!(error.contains("CPU kernels"), "{error}");
    // Another vocabulary.
    let gemma = common::gemma_path();
    let speculative = SpeculativeConfig {
        method: SpeculativeMethod::DraftModel { model: gemma },
        num_speculative_tokens: 3,
        disable_by_batch_size: 4,
    };
    let loaded = engine::model::load(&common::model_path(), &LoadOptions::default()).unwrap();
    let error = loaded.with_draft_of(Some(&speculative), &LoadOptions::default()).err().expect("refused").to_string();
    assert!(error.starts_with("draft model:") && error.contains("vocabulary"), "{error}");
}

#[test]
fn a_draft_left_behind_while_the_batch_is_large_catches_up() {
    // Drafting only alone: while the others run, the long request's prompt and decodes leave the
    // draft behind (its share of those steps saved); alone, with more tokens left to generate
    // than the draft lags, its first draft pass catches up, and every greedy draft is still right.
    let config = SpeculativeConfig { disable_by_batch_size: 1, ..self_drafting() };
    let requests = || {
        let mut all =
            requests(12, |max_tokens| SamplingParams { ignore_eos: true, ..SamplingParams::greedy(max_tokens) });
        all[0].sampling.max_tokens = 128;
        // Ends while the draft still lags: its answer's blocks are cached without draft KV.
        all[1].sampling.max_tokens = 40;
        all
    };
    let plain_engine = engine(None, 512);
    let plain = generate(&plain_engine, requests());
    let drafting = engine(Some(config), 512);
    assert_eq!(plain, generate(&drafting, requests()), "a lagging draft changed the greedy output");
    let stats = drafting.stats().speculation;
    assert!(stats.num_draft_tokens > 0, "the last request never drafted: {stats:?}");
    assert_eq!(stats.num_accepted_tokens, stats.num_draft_tokens, "{stats:?}");

    // The second answer's blocks were cached while the draft lagged: a follow-up prompt that
    // reuses them catches the draft up from the first such block.
    let second = &requests()[1];
    let follow_up = [second.prompt_token_ids.clone(), plain[1].clone()].concat();
    let request = || vec![common::greedy_request("follow-up", &follow_up, 2 * follow_up.len() as u32)];
    assert_eq!(generate(&plain_engine, request()), generate(&drafting, request()));
    let after = drafting.stats().speculation;
    assert!(after.num_draft_tokens > stats.num_draft_tokens, "{after:?}");
    assert_eq!(after.num_accepted_tokens, after.num_draft_tokens, "after a hit on lagging blocks: {after:?}");
}

#[test]
fn a_draft_model_over_tensor_parallel_ranks_gives_the_same_tokens() {
    // Both models split over 3 CPU ranks (SmolLM2's 3 KV heads), each rank's blocks holding its
    // heads of both; compared with the same ranks without speculation.
    let requests = || requests(32, SamplingParams::greedy);
    let plain = generate(&engine_on_ranks(None, 512, 3), requests());
    let drafting = engine_on_ranks(Some(self_drafting()), 512, 3);
    assert_eq!(plain, generate(&drafting, requests()));
    let stats = drafting.stats().speculation;
    assert!(stats.num_draft_tokens > 0, "{stats:?}");
    assert_eq!(stats.num_accepted_tokens, stats.num_draft_tokens, "{stats:?}");
}

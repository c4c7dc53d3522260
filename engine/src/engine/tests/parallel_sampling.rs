//! `n > 1`: one prefill, forked choices sharing the prompt's KV blocks.

use super::*;

/// Every choice's tokens and final event, by index.
fn collect_choices(mut rx: UnboundedReceiver<EngineEvent>, n: usize) -> Vec<(Vec<u32>, EngineEvent)> {
    let mut out: Vec<(Vec<u32>, Option<EngineEvent>)> = (0..n).map(|_| (Vec::new(), None)).collect();
    while let Some(event) = rx.blocking_recv() {
        match event {
            EngineEvent::Token { index, id, .. } => {
                let choice = &mut out[index as usize];
                assert!(choice.1.is_none(), "a token after choice {index} finished");
                choice.0.push(id);
            }
            EngineEvent::Finished { index, .. } => {
                let choice = &mut out[index as usize];
                assert!(choice.1.replace(event).is_none(), "choice {index} finished twice");
            }
            EngineEvent::Error(e) => panic!("{e}"),
            EngineEvent::PromptLogprobs { .. } => panic!("prompt logprobs were not asked for"),
            EngineEvent::Embedding(_) => panic!("no embedding was asked for"),
        }
    }
    out.into_iter().map(|(tokens, last)| (tokens, last.expect("every choice finishes"))).collect()
}

fn parallel(id: &str, prompt: &[u32], n: u32, sampling: SamplingParams) -> EngineRequest {
    EngineRequest { n, ..request(id, prompt, sampling) }
}

#[test]
fn the_prompt_is_computed_once_and_each_choice_sees_its_own_kv() {
    let model = FakeModel::new(32, true);
    let engine = Engine::start(model.clone(), kv_shape(4, 32), config());
    let prompt = [3, 1, 4, 1, 5, 9];
    let sampling = SamplingParams { temperature: 1.0, seed: Some(7), max_tokens: 5, ..SamplingParams::default() };
    let choices = collect_choices(engine.submit(parallel("p", &prompt, 4, sampling)).unwrap(), 4);
    for (tokens, last) in &choices {
        assert_eq!(tokens.len(), 5);
        assert!(matches!(last, EngineEvent::Finished { reason: FinishReason::Length, num_prompt_tokens: 6, .. }));
    }
    let steps = model.steps();
    let fed: usize = steps.iter().flatten().map(|s| s.tokens.len()).sum();
    assert_eq!(fed, prompt.len() + 4 * 4, "prompt once, then one token per choice per step: {steps:?}");
    assert_eq!(steps[0], vec![SeenSeq { tokens: prompt.to_vec(), context_start: 0, cached: vec![] }]);
    // Every later step found the prompt and the choice's own tokens in its
    // block table: the shared full block, and its own copy of the partial one.
    for seen in steps.iter().skip(1).flatten() {
        let generated = seen.context_start - 6;
        assert_eq!(seen.cached[..6], prompt);
        let owner = choices
            .iter()
            .any(|(tokens, _)| tokens[..generated] == seen.cached[6..] && seen.tokens == [tokens[generated]]);
        assert!(owner, "no choice has {seen:?}");
    }
    // Distinct choices were really fed (not one choice four times).
    let last_fed: std::collections::HashSet<Vec<u32>> =
        steps.last().unwrap().iter().map(|s| [s.cached.clone(), s.tokens.clone()].concat()).collect();
    let distinct: std::collections::HashSet<&Vec<u32>> = choices.iter().map(|(t, _)| t).collect();
    assert_eq!(last_fed.len(), distinct.len());
    engine.sync();
    assert_idle(&engine);
}

#[test]
fn seeded_choices_are_reproducible_distinct_and_choice_0_is_the_single_answer() {
    let engine = Engine::start(FakeModel::new(32, true), kv_shape(4, 64), config());
    let sampling = SamplingParams { temperature: 1.0, seed: Some(42), max_tokens: 12, ..SamplingParams::default() };
    let run = |id: &str, n| {
        let choices = collect_choices(engine.submit(parallel(id, &[2, 7], n, sampling.clone())).unwrap(), n as usize);
        choices.into_iter().map(|(tokens, _)| tokens).collect::<Vec<_>>()
    };
    let first = run("a", 4);
    assert_eq!(run("b", 4), first, "the same seed gives the same choices");
    for i in 0..4 {
        for j in i + 1..4 {
            assert_ne!(first[i], first[j], "choices {i} and {j} drew the same tokens");
        }
    }
    assert_eq!(run("single", 1)[0], first[0]);
    // Greedy: n identical choices.
    let greedy = collect_choices(engine.submit(parallel("g", &[2, 7], 3, SamplingParams::greedy(4))).unwrap(), 3);
    assert!(greedy.iter().all(|(tokens, _)| tokens == &[8, 9, 10, 11]), "{greedy:?}");
    engine.sync();
    assert_idle(&engine);
}

#[test]
fn abort_ends_every_choice_and_frees_everything() {
    let model = FakeModel::new(32, false);
    let engine = Engine::start(model.clone(), kv_shape(4, 16), config());
    let rx = engine.submit(parallel("p", &[1, 2, 3, 4, 5], 3, SamplingParams::greedy(20))).unwrap();
    model.gate.add(2);
    // Wait until the fork ran (the second step's three decodes).
    while model.steps().len() < 2 {
        std::thread::yield_now();
    }
    engine.abort("p");
    model.gate.open();
    let choices = collect_choices(rx, 3);
    assert!(choices.iter().all(|(_, last)| matches!(last, EngineEvent::Finished { reason: FinishReason::Abort, .. })));
    engine.sync();
    assert_idle(&engine);
}

#[test]
fn provided_kv_starts_every_choice_from_its_own_first_token() {
    let prompt = [3, 1, 4, 1, 5, 9];
    let (data, _) = prefill_remotely(&prompt, 4);
    let model = FakeModel::new(32, true);
    let engine = Engine::start(model.clone(), kv_shape(4, 16), config());
    let req = EngineRequest {
        kv: KvSource::Provided { data, first_tokens: vec![10, 20, 30] },
        ..parallel("d", &prompt, 3, SamplingParams::greedy(3))
    };
    let choices = collect_choices(engine.submit(req).unwrap(), 3);
    let tokens: Vec<Vec<u32>> = choices.iter().map(|(t, _)| t.clone()).collect();
    // The provided tokens are not emitted again; each choice continues from its own.
    assert_eq!(tokens, [vec![11, 12], vec![21, 22], vec![31, 0]]);
    let steps = model.steps();
    assert!(steps.iter().flatten().all(|s| s.context_start >= 6), "no prefill ran: {steps:?}");
    for seen in steps.iter().flatten() {
        assert_eq!(seen.cached[..6], prompt, "every choice reads the provided prompt KV");
    }
    // A wrong number of first tokens is refused.
    let bad = EngineRequest {
        kv: KvSource::Provided { data: vec![], first_tokens: vec![10] },
        ..parallel("bad", &prompt, 2, SamplingParams::greedy(3))
    };
    assert!(matches!(engine.submit(bad), Err(EngineError::InvalidSampling { field: "first_tokens", .. })));
    engine.sync();
    assert_idle(&engine);
}

#[test]
fn n_is_validated() {
    let engine = Engine::start(FakeModel::new(16, false), kv_shape(4, 8), config());
    for n in [0, MAX_N + 1] {
        let err = engine.submit(parallel("x", &[1], n, SamplingParams::greedy(1))).unwrap_err();
        assert!(matches!(err, EngineError::InvalidSampling { field: "n", .. }), "{err:?}");
    }
}

#[test]
fn forked_choices_keep_prefix_caching_and_kv_events_right() {
    let engine = Engine::start(FakeModel::new(32, true), kv_shape(4, 32), config());
    let prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5];
    let choices = collect_choices(engine.submit(parallel("p", &prompt, 3, SamplingParams::greedy(2))).unwrap(), 3);
    assert!(choices.iter().all(|(tokens, _)| tokens == &[6, 7]), "{choices:?}");
    // The two full prompt blocks are stored once, not once per choice.
    let hashes = prompt::block_hash::block_hashes(b"", &prompt, 4);
    let stored: Vec<crate::BlockHash> = engine
        .take_kv_events()
        .into_iter()
        .filter_map(|e| match e {
            KvEvent::BlockStored { block_hash, .. } => Some(block_hash),
            _ => None,
        })
        .collect();
    assert_eq!(stored, hashes[..2]);
    // A later request reuses them.
    let (_, last) = collect(engine.submit(request("again", &prompt, SamplingParams::greedy(1))).unwrap());
    assert_eq!(cached_tokens(&last), 8);
    engine.sync();
    assert_idle(&engine);
}

//! Scheduler unit tests: plans and accounting with literal expectations.

use super::*;

fn config(num_blocks: usize, max_num_seqs: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_num_seqs,
        max_num_batched_tokens: 1024,
        max_model_len: 64,
        block_size: 4,
        num_blocks,
        block_bytes: 8,
        eos_token_ids: vec![99],
        enable_prefix_caching: true,
        speculative: None,
        whole_prompts: false,
    }
}

fn seq(id: &str, prompt: &[u32], max_tokens: usize) -> NewSequence {
    NewSequence {
        pooling: None,
        request_id: id.into(),
        prompt: prompt.to_vec(),
        max_tokens,
        stop_token_ids: vec![],
        ignore_eos: false,
        min_tokens: 0,
        pin_on_finish: false,
        cache_salt: vec![],
        provided: None,
        priority: 0,
        n: 1,
        prompt_logprobs: None,
    }
}

fn shape(plan: &StepPlan) -> Vec<(&str, usize, usize)> {
    plan.seqs.iter().map(|s| (s.request_id.as_str(), s.context_start, s.tokens.len())).collect()
}

#[test]
fn admits_fcfs_up_to_max_num_seqs_and_batches_decodes_with_a_prefill() {
    let mut s = Scheduler::new(config(16, 2));
    s.add(seq("a", &[1, 2, 3], 8));
    s.add(seq("b", &[1, 2, 3, 4, 5], 8));
    s.add(seq("c", &[7], 8));
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("a", 0, 3), ("b", 0, 5)]);
    assert_eq!(plan.seqs[1].block_table, vec![1, 2]);
    assert_eq!((s.num_running(), s.num_waiting(), s.num_free_blocks()), (2, 1, 13));

    s.finish_step(&plan, &[10, 20]);
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("a", 3, 1), ("b", 5, 1)]);
    assert_eq!(plan.seqs[0].tokens, vec![10]);
    let batch = plan.to_batch();
    assert_eq!(batch.tokens, vec![10, 20]);
    assert_eq!(batch.num_logits(), 2);

    // `a` stops on EOS; `c` joins the next step next to `b`'s decode.
    s.finish_step(&plan, &[99, 21]);
    let events = s.take_events();
    assert_eq!(events[0], ("a".into(), EngineEvent::Token { index: 0, id: 10, logprobs: None, num_cached_tokens: 0 }));
    assert_eq!(events.len(), 5);
    assert_eq!(events[2], ("a".into(), EngineEvent::Token { index: 0, id: 99, logprobs: None, num_cached_tokens: 0 }));
    assert_eq!(
        events[3],
        (
            "a".into(),
            EngineEvent::Finished {
                index: 0,
                reason: FinishReason::Stop,
                pinned_blocks: None,
                num_prompt_tokens: 3,
                num_cached_tokens: 0
            }
        )
    );
    assert_eq!(s.num_free_blocks(), 14);
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("b", 6, 1), ("c", 0, 1)]);
}

#[test]
fn max_tokens_and_max_model_len_finish_with_length() {
    let mut s = Scheduler::new(SchedulerConfig { max_model_len: 5, ..config(16, 4) });
    s.add(seq("short", &[1], 2));
    s.add(seq("long", &[1, 2, 3], 100));
    let plan = s.schedule();
    s.finish_step(&plan, &[5, 5]);
    let plan = s.schedule();
    s.finish_step(&plan, &[6, 6]);
    let finished: Vec<_> = s
        .take_events()
        .into_iter()
        .filter_map(|(id, e)| match e {
            EngineEvent::Finished { reason, .. } => Some((id, reason)),
            _ => None,
        })
        .collect();
    // `short` generated its 2 tokens; `long` reached 5 tokens in all.
    assert_eq!(finished, vec![("short".into(), FinishReason::Length), ("long".into(), FinishReason::Length)]);
    assert_eq!(s.num_free_blocks(), 16);
}

#[test]
fn preempts_the_newest_and_recomputes_it_with_its_tokens() {
    // 3 blocks of 4 tokens; two sequences of 4 tokens fill two blocks and
    // both need a second block for their 5th token.
    let mut s = Scheduler::new(config(3, 4));
    s.add(seq("old", &[1, 2, 3, 4], 8));
    s.add(seq("new", &[5, 6, 7, 8], 8));
    let plan = s.schedule();
    assert_eq!(s.num_free_blocks(), 1);
    s.finish_step(&plan, &[10, 20]);

    let plan = s.schedule();
    // `old` takes the last block; `new` cannot grow and goes back waiting.
    assert_eq!(shape(&plan), vec![("old", 4, 1)]);
    assert_eq!(plan.seqs[0].block_table, vec![0, 2]);
    assert_eq!((s.num_running(), s.num_waiting(), s.num_preemptions()), (1, 1, 1));
    assert_eq!(s.num_free_blocks(), 1);

    // `old` finishes; `new` is recomputed from prompt + its token 20, but
    // its full first block stayed cached when it was preempted.
    s.finish_step(&plan, &[99]);
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("new", 4, 1)]);
    assert_eq!((plan.seqs[0].tokens.as_slice(), plan.seqs[0].block_table.as_slice()), (&[20][..], &[1, 2][..]));
    let tokens: Vec<_> = s.take_events().into_iter().filter(|(id, _)| id == "new").map(|(_, e)| e).collect();
    assert_eq!(
        tokens,
        vec![EngineEvent::Token { index: 0, id: 20, logprobs: None, num_cached_tokens: 0 }],
        "the token is not emitted twice"
    );
}

#[test]
fn a_sequence_that_cannot_fit_alone_gets_an_error() {
    // 2 blocks of 4 tokens hold 8 tokens: the 9th cannot exist.
    let mut s = Scheduler::new(SchedulerConfig { max_model_len: 100, ..config(2, 4) });
    s.add(seq("big", &[1, 2, 3, 4, 5, 6, 7], 50));
    let plan = s.schedule();
    s.finish_step(&plan, &[8]);
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("big", 7, 1)]);
    s.finish_step(&plan, &[9]);
    // Its 9th token needs a third block: preempted alone, then rejected.
    let plan = s.schedule();
    assert!(plan.is_empty());
    let last = s.take_events().pop().unwrap();
    assert!(
        matches!(&last.1, EngineEvent::Error(e) if e.kind == FailureKind::Refused && e.message.contains("needs 3 KV blocks")),
        "{last:?}"
    );
    assert_eq!((s.num_running(), s.num_waiting(), s.num_free_blocks()), (0, 0, 2));
}

#[test]
fn pinned_blocks_are_held_until_released() {
    let mut s = Scheduler::new(config(8, 4));
    s.add(NewSequence { pin_on_finish: true, ..seq("p", &[1, 2, 3, 4, 5, 6, 7, 8], 1) });
    let plan = s.schedule();
    s.finish_step(&plan, &[9]);
    let events = s.take_events();
    assert_eq!(
        events[1].1,
        EngineEvent::Finished {
            index: 0,
            reason: FinishReason::Length,
            pinned_blocks: Some(vec![0, 1]),
            num_prompt_tokens: 8,
            num_cached_tokens: 0
        }
    );
    assert_eq!((s.num_held_blocks(), s.num_free_blocks()), (2, 6));
    // Only a whole pinned list releases anything.
    s.release(&[1, 5]);
    s.release(&[0]);
    assert_eq!((s.num_held_blocks(), s.num_free_blocks()), (2, 6));
    s.release(&[0, 1]);
    assert_eq!((s.num_held_blocks(), s.num_free_blocks()), (0, 8));
    s.release(&[0, 1]);
    assert_eq!((s.num_held_blocks(), s.num_free_blocks()), (0, 8));
}

#[test]
fn provided_kv_is_written_and_the_first_token_is_fed() {
    let mut s = Scheduler::new(config(8, 4));
    let provided = ProvidedKv { kv: ProvidedData::Bytes(vec![0; 16]), first_tokens: vec![42] };
    s.add(NewSequence { provided: Some(provided), ..seq("d", &[1, 2, 3, 4, 5], 3) });
    let plan = s.schedule();
    assert_eq!(plan.kv_writes.len(), 1);
    assert_eq!(plan.kv_writes[0].block_ids, vec![0, 1]);
    assert_eq!(shape(&plan), vec![("d", 5, 1)]);
    assert_eq!(plan.seqs[0].tokens, vec![42]);
    s.finish_step(&plan, &[43]);
    let plan = s.schedule();
    s.finish_step(&plan, &[44]);
    let events: Vec<_> = s.take_events().into_iter().map(|(_, e)| e).collect();
    // 42 counted as token 1 of 3 and not emitted.
    assert_eq!(
        events[..2],
        [
            EngineEvent::Token { index: 0, id: 43, logprobs: None, num_cached_tokens: 0 },
            EngineEvent::Token { index: 0, id: 44, logprobs: None, num_cached_tokens: 0 }
        ]
    );
    assert!(matches!(events[2], EngineEvent::Finished { reason: FinishReason::Length, .. }));
}

#[test]
fn provided_kv_in_reserved_blocks_is_not_copied_and_gets_a_block_for_its_first_token() {
    let mut s = Scheduler::new(config(8, 4));
    s.add(seq("busy", &[9], 8));
    s.schedule();
    // The prompt fills its blocks exactly: the first token needs a third.
    let reserved = s.reserve(2).unwrap();
    assert_eq!(reserved, vec![1, 2]);
    assert_eq!(s.num_free_blocks(), 5);
    let provided = ProvidedKv { kv: ProvidedData::InBlocks(reserved), first_tokens: vec![42] };
    s.add(NewSequence { provided: Some(provided), ..seq("d", &[1, 2, 3, 4, 5, 6, 7, 8], 3) });
    let plan = s.schedule();
    assert!(plan.kv_writes.is_empty());
    let d = plan.seqs.iter().find(|q| q.request_id == "d").unwrap();
    assert_eq!((d.context_start, d.tokens.clone(), d.block_table.clone()), (8, vec![42], vec![1, 2, 3]));
    assert_eq!(s.num_free_blocks(), 4);
}

#[test]
fn a_reservation_takes_all_or_nothing_and_unreserve_frees_it() {
    let mut s = Scheduler::new(config(4, 4));
    assert_eq!(s.reserve(5), None);
    assert_eq!(s.num_free_blocks(), 4);
    let ids = s.reserve(3).unwrap();
    assert_eq!(s.reserve(2), None);
    s.unreserve(&ids);
    assert_eq!(s.num_free_blocks(), 4);
}

#[test]
fn aborting_a_waiting_sequence_frees_its_reserved_blocks() {
    let mut s = Scheduler::new(config(4, 1));
    s.add(seq("busy", &[9], 8));
    let plan = s.schedule();
    s.finish_step(&plan, &[10]);
    let provided = ProvidedKv { kv: ProvidedData::InBlocks(s.reserve(2).unwrap()), first_tokens: vec![42] };
    s.add(NewSequence { provided: Some(provided), ..seq("d", &[1, 2, 3, 4, 5], 3) });
    // max_num_seqs 1: it waits, holding its blocks.
    assert_eq!(shape(&s.schedule()), vec![("busy", 1, 1)]);
    assert_eq!(s.num_free_blocks(), 1);
    assert!(s.abort("d"));
    assert_eq!(s.num_free_blocks(), 3);
}

#[test]
fn provided_kv_of_the_wrong_size_is_an_error_and_frees_nothing_twice() {
    let mut s = Scheduler::new(config(8, 4));
    let provided = ProvidedKv { kv: ProvidedData::Bytes(vec![0; 15]), first_tokens: vec![42] };
    s.add(NewSequence { provided: Some(provided), ..seq("d", &[1, 2, 3, 4, 5], 3) });
    s.add(seq("ok", &[1], 3));
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("ok", 0, 1)]);
    let (id, event) = s.take_events().remove(0);
    assert_eq!(id, "d");
    assert!(
        matches!(&event, EngineEvent::Error(e) if e.kind == FailureKind::Refused && e.message.contains("15 bytes") && e.message.contains("expected 16")),
        "{event:?}"
    );
    assert_eq!(s.num_free_blocks(), 7);
}

#[test]
fn a_provided_first_token_can_be_the_last() {
    let mut s = Scheduler::new(config(8, 4));
    let provided = ProvidedKv { kv: ProvidedData::Bytes(vec![0; 8]), first_tokens: vec![42] };
    s.add(NewSequence { provided: Some(provided), ..seq("d", &[1, 2], 1) });
    let plan = s.schedule();
    assert!(plan.seqs.is_empty());
    assert_eq!(plan.kv_writes.len(), 1);
    let events = s.take_events();
    assert_eq!(
        events,
        vec![(
            "d".into(),
            EngineEvent::Finished {
                index: 0,
                reason: FinishReason::Length,
                pinned_blocks: None,
                num_prompt_tokens: 2,
                num_cached_tokens: 0
            }
        )]
    );
    assert_eq!(s.num_free_blocks(), 8);
}

#[test]
fn abort_and_remove_free_waiting_and_running_sequences() {
    let mut s = Scheduler::new(config(4, 1));
    s.add(seq("run", &[1, 2, 3, 4, 5], 8));
    s.add(seq("wait", &[1], 8));
    let plan = s.schedule();
    assert_eq!(s.num_free_blocks(), 2);
    assert!(s.abort("run"));
    assert!(!s.abort("run"));
    assert!(s.remove("wait"));
    assert_eq!((s.num_running(), s.num_waiting(), s.num_free_blocks()), (0, 0, 4));
    // The aborted sequence's sampled token is ignored.
    s.finish_step(&plan, &[7]);
    let events = s.take_events();
    assert_eq!(
        events,
        vec![(
            "run".into(),
            EngineEvent::Finished {
                index: 0,
                reason: FinishReason::Abort,
                pinned_blocks: None,
                num_prompt_tokens: 5,
                num_cached_tokens: 0
            }
        )]
    );
}

#[test]
fn a_failed_step_errors_its_sequences() {
    let mut s = Scheduler::new(config(4, 4));
    s.add(seq("a", &[1], 8));
    let plan = s.schedule();
    let ids: Vec<&str> = plan.seqs.iter().map(|s| s.request_id.as_str()).collect();
    let boom = RequestError::new(FailureKind::Forward, "boom");
    s.fail(&ids, &boom);
    assert_eq!(s.take_events(), vec![("a".into(), EngineEvent::Error(boom))]);
    assert_eq!(s.num_free_blocks(), 4);
}
/// `num_cached_tokens` of a request's `Finished` event among `events`.
fn cached_tokens(events: &[(String, EngineEvent)], id: &str) -> Option<usize> {
    events.iter().find_map(|(i, e)| match e {
        EngineEvent::Finished { num_cached_tokens, .. } if i == id => Some(*num_cached_tokens),
        _ => None,
    })
}

/// Runs one request alone to its end.
fn run_alone(s: &mut Scheduler, new: NewSequence) -> Vec<(String, EngineEvent)> {
    s.add(new);
    while s.num_waiting() + s.num_running() > 0 {
        let plan = s.schedule();
        let sampled: Vec<u32> = plan.seqs.iter().map(|q| q.tokens.last().unwrap() + 1).collect();
        s.finish_step(&plan, &sampled);
    }
    s.take_events()
}

#[test]
fn a_shared_prefix_is_reused_and_only_the_suffix_is_computed() {
    let mut s = Scheduler::new(config(8, 4));
    let events = run_alone(&mut s, seq("a", &[1, 2, 3, 4, 5, 6, 7, 8, 9], 1));
    assert_eq!(cached_tokens(&events, "a"), Some(0));
    let h = prompt::block_hash::block_hashes(b"", &[1, 2, 3, 4, 5, 6, 7, 8], 4);
    assert_eq!(
        s.take_kv_events(),
        vec![
            KvEvent::BlockStored { block_hash: h[0], parent_hash: None, token_ids: vec![1, 2, 3, 4], block_id: 0 },
            KvEvent::BlockStored {
                block_hash: h[1],
                parent_hash: Some(h[0]),
                token_ids: vec![5, 6, 7, 8],
                block_id: 1
            },
        ]
    );
    assert_eq!((s.num_free_blocks(), s.num_cached_blocks()), (8, 2));

    s.add(seq("b", &[1, 2, 3, 4, 5, 6, 7, 8, 50, 51], 3));
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("b", 8, 2)]);
    assert_eq!(plan.seqs[0].tokens, vec![50, 51]);
    assert_eq!(plan.seqs[0].block_table[..2], [0, 1]);
    assert_eq!(s.num_cached_blocks(), 0);
    s.finish_step(&plan, &[52]);
    let plan = s.schedule();
    s.finish_step(&plan, &[53]);
    // 53 is sampled but has no KV yet: block 2 is not full of computed tokens.
    assert!(s.take_kv_events().is_empty());
    let plan = s.schedule();
    s.finish_step(&plan, &[54]);
    assert_eq!(cached_tokens(&s.take_events(), "b"), Some(8));
    // b's third block (50 51 52 53) filled up at its last step.
    let events = s.take_kv_events();
    assert!(
        matches!(&events[..], [KvEvent::BlockStored { parent_hash: Some(p), token_ids, .. }]
        if *p == h[1] && token_ids == &[50, 51, 52, 53]),
        "{events:?}"
    );
}

#[test]
fn a_prompt_of_cached_full_blocks_recomputes_its_last_block() {
    let mut s = Scheduler::new(config(8, 4));
    run_alone(&mut s, seq("a", &[1, 2, 3, 4, 5, 6, 7, 8], 1));
    s.add(seq("b", &[1, 2, 3, 4, 5, 6, 7, 8], 1));
    let plan = s.schedule();
    // The last token must be computed for logits: block 2 of 2 is redone.
    assert_eq!(shape(&plan), vec![("b", 4, 4)]);
    assert_eq!(plan.seqs[0].block_table[0], 0);
    assert_ne!(plan.seqs[0].block_table[1], 1, "the cached copy stays cached");
    s.finish_step(&plan, &[9]);
    assert_eq!(cached_tokens(&s.take_events(), "b"), Some(4));
    assert!(
        s.take_kv_events()
            .iter()
            .all(|e| !matches!(e, KvEvent::BlockStored { block_id, .. } if *block_id != 0 && *block_id != 1)),
        "the recomputed duplicate is not stored twice"
    );
}

#[test]
fn only_requests_with_the_same_salt_share_blocks() {
    let mut s = Scheduler::new(config(16, 4));
    let salted = |id: &str, salt: &[u8]| NewSequence { cache_salt: salt.to_vec(), ..seq(id, &[1, 2, 3, 4, 5], 1) };
    run_alone(&mut s, salted("x1", b"x"));
    assert_eq!(cached_tokens(&run_alone(&mut s, salted("y", b"y")), "y"), Some(0));
    assert_eq!(cached_tokens(&run_alone(&mut s, salted("none", b"")), "none"), Some(0));
    assert_eq!(cached_tokens(&run_alone(&mut s, salted("x2", b"x")), "x2"), Some(4));
    assert_eq!(cached_tokens(&run_alone(&mut s, salted("y2", b"y")), "y2"), Some(4));
}

#[test]
fn with_prefix_caching_off_nothing_is_reused_or_reported() {
    let mut s = Scheduler::new(SchedulerConfig { enable_prefix_caching: false, ..config(8, 4) });
    run_alone(&mut s, seq("a", &[1, 2, 3, 4, 5], 1));
    s.add(seq("b", &[1, 2, 3, 4, 5], 1));
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("b", 0, 5)]);
    assert!(s.take_kv_events().is_empty());
    assert_eq!(s.num_cached_blocks(), 0);
}

#[test]
fn cached_blocks_are_evicted_least_recently_used_first() {
    // 3 blocks: each request needs 2 (one full, one partial).
    let mut s = Scheduler::new(config(3, 4));
    run_alone(&mut s, seq("a", &[1, 1, 1, 1, 1], 1));
    run_alone(&mut s, seq("b", &[2, 2, 2, 2, 2], 1));
    let ha = prompt::block_hash::block_hashes(b"", &[1, 1, 1, 1], 4)[0];
    let hb = prompt::block_hash::block_hashes(b"", &[2, 2, 2, 2], 4)[0];
    s.take_kv_events();
    assert_eq!(s.num_cached_blocks(), 2);
    // c needs 2 fresh blocks: the one plain free block, then a's (older).
    run_alone(&mut s, seq("c", &[3, 3, 3, 3, 3], 1));
    let removed: Vec<_> =
        s.take_kv_events().into_iter().filter(|e| matches!(e, KvEvent::BlockRemoved { .. })).collect();
    assert_eq!(removed, vec![KvEvent::BlockRemoved { block_hashes: vec![ha] }]);
    assert_eq!(cached_tokens(&run_alone(&mut s, seq("b2", &[2, 2, 2, 2, 9], 1)), "b2"), Some(4));
    assert_eq!(cached_tokens(&run_alone(&mut s, seq("a2", &[1, 1, 1, 1, 9], 1)), "a2"), Some(0));
    assert!(!s.take_kv_events().contains(&KvEvent::BlockRemoved { block_hashes: vec![hb] }));
}

#[test]
fn two_pins_share_prefix_blocks_and_each_release_drops_only_its_own() {
    let mut s = Scheduler::new(config(8, 4));
    let pinned = |id: &str, prompt: &[u32]| NewSequence { pin_on_finish: true, ..seq(id, prompt, 1) };
    s.add(pinned("p1", &[1, 2, 3, 4, 5, 6, 7, 8, 9]));
    s.add(pinned("p2", &[1, 2, 3, 4, 5, 6, 7, 8, 60]));
    // Both are admitted in one step: p2 cannot reuse what p1 has not computed yet.
    let plan = s.schedule();
    s.finish_step(&plan, &[0, 0]);
    s.take_events();
    s.add(pinned("p3", &[1, 2, 3, 4, 5, 6, 7, 8, 70]));
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("p3", 8, 1)]);
    s.finish_step(&plan, &[0]);
    let events = s.take_events();
    let Some(EngineEvent::Finished { pinned_blocks: Some(p3), num_cached_tokens: 8, .. }) = events.last().map(|e| &e.1)
    else {
        panic!("{events:?}")
    };
    assert_eq!(p3, &vec![0, 1, 6]);
    // p1 holds 0 1 2, p2 3 4 5, p3 shares 0 1 with p1 and adds 6.
    assert_eq!((s.num_held_blocks(), s.num_free_blocks()), (7, 1));
    s.release(&[0, 1, 2]);
    assert_eq!((s.num_held_blocks(), s.num_free_blocks()), (6, 2));
    // A double release of p1 must not take p3's references on 0 and 1.
    s.release(&[0, 1, 2]);
    assert_eq!((s.num_held_blocks(), s.num_free_blocks()), (6, 2));
    s.release(&[3, 4, 5]);
    s.release(p3);
    assert_eq!((s.num_held_blocks(), s.num_free_blocks()), (0, 8));
    assert!((0..8).all(|id| s.blocks.ref_count(id) == 0));
}

#[test]
fn preemption_reuses_the_cached_prefix_and_caching_off_recomputes_it_all() {
    for caching in [true, false] {
        let mut s = Scheduler::new(SchedulerConfig { enable_prefix_caching: caching, ..config(3, 4) });
        s.add(seq("old", &[1, 2, 3, 4], 8));
        s.add(seq("new", &[5, 6, 7, 8], 8));
        let plan = s.schedule();
        s.finish_step(&plan, &[10, 20]);
        let plan = s.schedule();
        s.finish_step(&plan, &[99]);
        let plan = s.schedule();
        let expected = if caching { ("new", 4, 1) } else { ("new", 0, 5) };
        assert_eq!(shape(&plan), vec![expected]);
    }
}

fn logits_flags(plan: &StepPlan) -> Vec<bool> {
    plan.seqs.iter().map(|s| s.need_logits).collect()
}

/// Samples `last + 1` for every sequence with logits.
fn next_tokens(plan: &StepPlan) -> Vec<u32> {
    plan.seqs.iter().filter(|q| q.need_logits).map(|q| q.tokens.last().unwrap() + 1).collect()
}

#[test]
fn a_long_prompt_is_chunked_to_the_budget_while_another_keeps_decoding() {
    let mut s = Scheduler::new(SchedulerConfig { max_num_batched_tokens: 4, ..config(16, 4) });
    s.add(seq("d", &[1, 2], 10));
    let plan = s.schedule();
    s.finish_step(&plan, &[3]);
    s.add(seq("long", &[10, 11, 12, 13, 14, 15, 16, 17, 18], 2));

    // Each step: d's decode first, then 3 prompt tokens of `long`.
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("d", 2, 1), ("long", 0, 3)]);
    assert_eq!((logits_flags(&plan), plan.seqs[1].block_table.len()), (vec![true, false], 1));
    assert_eq!(plan.to_batch().num_logits(), 1);
    s.finish_step(&plan, &[4]);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 0), "a partly prefilled sequence is running");

    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("d", 3, 1), ("long", 3, 3)]);
    assert_eq!(plan.seqs[1].tokens, vec![13, 14, 15]);
    assert_eq!((logits_flags(&plan), plan.seqs[1].block_table.len()), (vec![true, false], 2));
    s.finish_step(&plan, &[5]);

    // The last chunk has logits and samples long's first token.
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("d", 4, 1), ("long", 6, 3)]);
    assert_eq!((logits_flags(&plan), plan.seqs[1].block_table.len()), (vec![true, true], 3));
    s.finish_step(&plan, &[6, 19]);

    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("d", 5, 1), ("long", 9, 1)]);
    s.finish_step(&plan, &[7, 20]);
    let long: Vec<_> = s.take_events().into_iter().filter(|(id, _)| id == "long").map(|(_, e)| e).collect();
    assert_eq!(
        long[..2],
        [
            EngineEvent::Token { index: 0, id: 19, logprobs: None, num_cached_tokens: 0 },
            EngineEvent::Token { index: 0, id: 20, logprobs: None, num_cached_tokens: 0 }
        ]
    );
    assert!(matches!(long[2], EngineEvent::Finished { reason: FinishReason::Length, num_prompt_tokens: 9, .. }));
}

#[test]
fn whole_prompts_wait_for_a_step_with_room_instead_of_being_chunked() {
    let config = SchedulerConfig { max_num_batched_tokens: 8, whole_prompts: true, ..config(16, 4) };
    let mut s = Scheduler::new(config);
    let embed = |id: &str, prompt: &[u32]| NewSequence { pooling: Some(Pooling::Mean), ..seq(id, prompt, 1) };
    s.add(embed("a", &[1, 2, 3, 4, 5]));
    s.add(embed("b", &[6, 7, 8, 9, 10]));
    s.add(embed("c", &[11, 12, 13]));
    // `b` would fit only in part: it waits, and `c` waits behind it (strict order).
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("a", 0, 5)]);
    s.report_hidden(&plan.seqs[0], &vec![vec![1.0]; 5]);
    s.finish_step(&plan, &[]);
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("b", 0, 5), ("c", 0, 3)]);
}

#[test]
fn decodes_come_first_even_when_they_leave_no_room_for_prefill() {
    let mut s = Scheduler::new(SchedulerConfig { max_num_batched_tokens: 2, ..config(16, 4) });
    s.add(seq("a", &[1], 10));
    s.add(seq("b", &[2], 10));
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("a", 0, 1), ("b", 0, 1)]);
    s.finish_step(&plan, &[3, 4]);
    s.add(seq("c", &[5, 6, 7], 10));
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("a", 1, 1), ("b", 1, 1)]);
    assert_eq!(s.num_waiting(), 1);
}

#[test]
fn the_budget_is_never_exceeded_and_chunking_changes_no_token() {
    let prompts: [&[u32]; 4] = [&[1, 2, 3, 4, 5, 6, 7], &[20], &[30, 31, 32, 33, 34], &[40, 41]];
    let run = |budget: usize| {
        let mut s = Scheduler::new(SchedulerConfig { max_num_batched_tokens: budget, ..config(32, 3) });
        for (i, p) in prompts.iter().enumerate() {
            s.add(seq(&format!("r{i}"), p, 4));
        }
        let mut steps = 0;
        while s.num_waiting() + s.num_running() > 0 {
            let plan = s.schedule();
            assert!(plan.num_tokens() <= budget, "{budget}: {plan:?}");
            s.finish_step(&plan, &next_tokens(&plan));
            steps += 1;
        }
        let mut tokens: Vec<(String, u32)> = s
            .take_events()
            .into_iter()
            .filter_map(|(id, e)| match e {
                EngineEvent::Token { id: t, .. } => Some((id, t)),
                _ => None,
            })
            .collect();
        tokens.sort();
        (tokens, steps)
    };
    let (whole, whole_steps) = run(1024);
    assert_eq!(whole_steps, 8);
    assert_eq!(whole.iter().filter(|(id, _)| id == "r0").map(|&(_, t)| t).collect::<Vec<_>>(), [8, 9, 10, 11]);
    for budget in [1, 2, 3, 5] {
        let (chunked, steps) = run(budget);
        assert_eq!(chunked, whole, "budget {budget}");
        assert!(steps > whole_steps, "budget {budget}: {steps} steps");
    }
}

#[test]
fn waiting_sequences_are_admitted_by_priority_then_arrival() {
    let mut s = Scheduler::new(config(16, 1));
    s.add(NewSequence { priority: 10, ..seq("first", &[1], 2) });
    let plan = s.schedule();
    s.finish_step(&plan, &next_tokens(&plan));
    for (id, priority) in [("b", 10), ("c", 10), ("urgent", -10), ("d", 0)] {
        s.add(NewSequence { priority, ..seq(id, &[1], 2) });
    }
    let mut admitted = vec!["first".to_string()];
    while s.num_waiting() + s.num_running() > 0 {
        let plan = s.schedule();
        admitted.extend(plan.seqs.iter().filter(|q| q.context_start == 0).map(|q| q.request_id.clone()));
        s.finish_step(&plan, &next_tokens(&plan));
    }
    // The running sequence is not preempted for a better one.
    assert_eq!(admitted, ["first", "urgent", "d", "b", "c"]);
}

#[test]
fn preemption_picks_the_worst_priority_not_the_newest() {
    // 3 blocks of 4 tokens.
    let mut s = Scheduler::new(config(3, 4));
    s.add(NewSequence { priority: 5, ..seq("low", &[1, 2, 3, 4], 8) });
    let plan = s.schedule();
    s.finish_step(&plan, &[5]);
    s.add(seq("high", &[5, 6, 7, 8], 8));
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("low", 4, 1), ("high", 0, 4)]);
    assert_eq!(s.num_free_blocks(), 0);
    s.finish_step(&plan, &[6, 9]);

    // `low` fits its decode, but `high` needs a block: `low` goes, and
    // its planned decode with it.
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("high", 4, 1)]);
    assert_eq!((s.num_running(), s.num_waiting(), s.num_preemptions()), (1, 1, 1));
    s.finish_step(&plan, &[10]);
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("high", 5, 1)]);
}

#[test]
fn a_sequence_preempts_itself_rather_than_a_better_one() {
    let mut s = Scheduler::new(config(3, 4));
    s.add(seq("high", &[1, 2, 3, 4], 8));
    let plan = s.schedule();
    s.finish_step(&plan, &[5]);
    s.add(NewSequence { priority: 5, ..seq("low", &[5, 6, 7, 8], 8) });
    let plan = s.schedule();
    s.finish_step(&plan, &[6, 9]);
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("high", 5, 1)]);
    assert_eq!((s.num_running(), s.num_waiting(), s.num_preemptions()), (1, 1, 1));
}

#[test]
fn n_choices_share_the_prompts_full_blocks_and_copy_the_partial_one() {
    let mut s = Scheduler::new(config(16, 8));
    // 6 tokens: one full block of 4, one partial block of 2.
    s.add(NewSequence { n: 4, ..seq("p", &[1, 2, 3, 4, 5, 6], 3) });
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("p", 0, 6)]);
    assert_eq!(plan.seqs[0].choices, 0..4);
    let table = plan.seqs[0].block_table.clone();
    s.finish_step(&plan, &[10, 11, 12, 13]);
    let tokens: Vec<(u32, u32)> = s
        .take_events()
        .into_iter()
        .map(|(_, e)| match e {
            EngineEvent::Token { index, id, .. } => (index, id),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(tokens, [(1, 11), (2, 12), (3, 13), (0, 10)]);
    // Prompt blocks + one partial per extra choice, not 4x the prompt.
    assert_eq!(s.blocks.ref_count(table[0]), 4);
    assert_eq!(s.blocks.num_used(), 2 + 3);
    assert_eq!(s.num_free_blocks(), 16 - 5);
    let copies = s.take_block_copies();
    assert_eq!(copies.len(), 3);
    assert!(copies.iter().all(|c| c.src == table[1] && !table.contains(&c.dst)));
    // Each choice decodes its own token on the shared block and its own partial one.
    let plan = s.schedule();
    let mut decodes: Vec<(u32, Vec<u32>, Vec<u32>)> =
        plan.seqs.iter().map(|c| (c.choices.start, c.tokens.clone(), c.block_table.clone())).collect();
    decodes.sort();
    assert_eq!(decodes[0], (0, vec![10], table.clone()));
    for (i, (choice, tokens, blocks)) in decodes.iter().enumerate().skip(1) {
        assert_eq!((*choice, tokens.clone()), (i as u32, vec![10 + i as u32]));
        assert_eq!(blocks[0], table[0]);
        assert_eq!(blocks[1], copies.iter().find(|c| c.dst == blocks[1]).unwrap().dst);
    }
    assert!(s.abort("p"));
    let aborted: Vec<u32> = s
        .take_events()
        .into_iter()
        .map(|(_, e)| match e {
            EngineEvent::Finished { index, reason: FinishReason::Abort, .. } => index,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(aborted.len(), 4);
    assert_eq!(s.blocks.num_used(), 0);
}

#[test]
fn a_fork_without_a_free_block_recomputes_alone() {
    // 3 blocks: the prompt takes 2, one choice can copy the partial block, the other cannot.
    let mut s = Scheduler::new(config(3, 8));
    s.add(NewSequence { n: 3, ..seq("p", &[1, 2, 3, 4, 5, 6], 2) });
    let plan = s.schedule();
    s.finish_step(&plan, &[10, 11, 12]);
    assert_eq!(s.num_running(), 2);
    assert_eq!(s.num_waiting(), 1);
    assert_eq!(s.num_preemptions(), 1);
    assert_eq!(s.take_block_copies().len(), 1);
}

#[test]
fn a_request_reserves_max_num_seqs_for_all_its_choices() {
    let mut s = Scheduler::new(config(16, 4));
    s.add(seq("a", &[1], 4));
    s.add(NewSequence { n: 4, ..seq("p", &[1, 2], 4) });
    assert_eq!(shape(&s.schedule()), vec![("a", 0, 1)]);
    let mut s = Scheduler::new(config(16, 4));
    s.add(NewSequence { n: 5, ..seq("p", &[1, 2], 4) });
    assert!(s.schedule().is_empty());
    assert!(
        matches!(&s.take_events()[0].1, EngineEvent::Error(e) if e.kind == FailureKind::Refused && e.message.contains("max_num_seqs"))
    );
}

#[test]
fn pending_prefill_tokens_count_waiting_prompts_and_unfinished_chunks() {
    let mut s = Scheduler::new(SchedulerConfig { max_num_batched_tokens: 4, ..config(16, 1) });
    s.add(seq("a", &[1, 2, 3, 4, 5, 6], 8));
    s.add(seq("b", &[7, 8, 9], 8));
    assert_eq!(s.num_pending_prefill_tokens(), 9);
    // `a` gets a 4-token chunk; `b` waits for the one slot.
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("a", 0, 4)]);
    s.finish_step(&plan, &[]);
    assert_eq!(s.num_pending_prefill_tokens(), 2 + 3);
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("a", 4, 2)]);
    s.finish_step(&plan, &[10]);
    // Decoding: only `b`'s prompt is left to prefill.
    assert_eq!(s.num_pending_prefill_tokens(), 3);
}

fn speculating(k: usize) -> SchedulerConfig {
    let speculative = SpeculativeConfig {
        method: SpeculativeMethod::Ngram(NgramLookup { prompt_lookup_max: 2, prompt_lookup_min: 1 }),
        num_speculative_tokens: k,
        disable_by_batch_size: usize::MAX,
    };
    SchedulerConfig { speculative: Some(speculative), ..config(16, 4) }
}

fn tokens(ids: &[u32]) -> Vec<SampledToken> {
    ids.iter().map(|&id| SampledToken { id, logprobs: None }).collect()
}

fn token_events(s: &mut Scheduler) -> Vec<u32> {
    s.take_events()
        .into_iter()
        .filter_map(|(_, e)| match e {
            EngineEvent::Token { id, .. } => Some(id),
            _ => None,
        })
        .collect()
}

#[test]
fn a_decode_feeds_its_drafts_and_keeps_the_kv_of_those_accepted() {
    let mut s = Scheduler::new(speculating(3));
    s.add(seq("a", &[1, 2, 3, 1, 2], 10));
    let plan = s.schedule();
    assert!(plan.seqs[0].drafts.is_empty(), "a prefill has no drafts");
    s.finish_step(&plan, &[3]);
    assert_eq!(token_events(&mut s), [3]);

    // "2 3" occurred before, followed by "1 2 3": the decode feeds 3, then those drafts.
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("a", 5, 4)]);
    assert_eq!((plan.seqs[0].tokens.as_slice(), plan.seqs[0].drafts.as_slice()), (&[3, 1, 2, 3][..], &[1, 2, 3][..]));
    assert_eq!(plan.seqs[0].block_table.len(), 3, "blocks for every draft's KV");
    let batch = plan.to_batch();
    assert_eq!(batch.num_logits(), 4, "a row per token");
    assert_eq!(plan.num_samples(), 4);

    // Drafts 1 and 2 accepted, 3 rejected for 7: the KV of positions 5..8 counts, 8's does not.
    s.finish_step_with(&plan, vec![tokens(&[1, 2, 7])]);
    assert_eq!(token_events(&mut s), [1, 2, 7]);
    let plan = s.schedule();
    assert_eq!(plan.seqs[0].context_start, 8, "the rejected draft's position is written again");
    assert_eq!(plan.seqs[0].tokens[0], 7);
    assert_eq!(plan.seqs[0].block_table.len(), 3);

    // Nothing accepted: one token, as without drafts.
    let drafted = plan.seqs[0].drafts.len();
    s.finish_step_with(&plan, vec![tokens(&[5])]);
    assert_eq!(token_events(&mut s), [5]);
    let plan = s.schedule();
    assert_eq!(plan.seqs[0].context_start, 9, "{drafted} drafts rejected");
}

#[test]
fn drafts_never_pass_max_tokens_and_a_stop_among_them_ends_the_sequence() {
    let mut s = Scheduler::new(speculating(4));
    // 3 tokens at most: after the first, room for one draft and the token after it.
    s.add(seq("a", &[1, 2, 1, 2], 3));
    let plan = s.schedule();
    s.finish_step(&plan, &[1]);
    let plan = s.schedule();
    assert_eq!(plan.seqs[0].drafts, [2]);
    s.finish_step_with(&plan, vec![tokens(&[2, 1])]);
    let events = s.take_events();
    assert!(
        matches!(events.last(), Some((_, EngineEvent::Finished { reason: FinishReason::Length, .. }))),
        "{events:?}"
    );
    assert_eq!(s.num_running(), 0);

    // An accepted draft that is eos ends the sequence there; what followed it is dropped.
    s.add(seq("b", &[7, 1, 2, 99, 7, 1], 10));
    let plan = s.schedule();
    s.finish_step(&plan, &[2]);
    let plan = s.schedule();
    assert_eq!(plan.seqs[0].drafts, [99, 7, 1, 2]);
    s.finish_step_with(&plan, vec![tokens(&[99, 7, 3])]);
    assert_eq!(token_events(&mut s), [2, 99]);
    assert_eq!(s.num_running(), 0);
    assert_eq!(s.num_free_blocks(), 16, "every block back");

    // The accepted drafts' full block went into the prefix cache before the sequence ended.
    s.add(seq("c", &[7, 1, 2, 99, 7, 1, 2, 99, 5], 10));
    let plan = s.schedule();
    assert_eq!(plan.seqs[0].context_start, 8, "both blocks of b's tokens are cached");
}

#[test]
fn a_sequence_with_several_choices_left_to_fork_or_without_spare_blocks_gets_no_drafts() {
    // Two choices: the shared sequence forks at its first token, then each choice speculates.
    let mut s = Scheduler::new(speculating(2));
    s.add(NewSequence { n: 2, ..seq("a", &[4, 5, 4, 5], 8) });
    let plan = s.schedule();
    s.finish_step_with(&plan, vec![tokens(&[4, 6])]);
    let plan = s.schedule();
    let drafts: Vec<usize> = plan.seqs.iter().map(|c| c.drafts.len()).collect();
    assert_eq!(drafts, [2, 0], "choice 0 ends in \"5 4\", seen before; choice 1 in \"5 6\", not");

    // Two blocks in all: the prompt holds one, the drafts would need a third.
    let mut s = Scheduler::new(SchedulerConfig { num_blocks: 2, ..speculating(4) });
    s.add(seq("b", &[1, 2, 1], 8));
    let plan = s.schedule();
    s.finish_step(&plan, &[2]);
    let plan = s.schedule();
    assert_eq!(plan.seqs[0].drafts.len(), 4, "the drafts fit in the second block");
    s.finish_step_with(&plan, vec![tokens(&[1, 2, 1, 2])]);
    let plan = s.schedule();
    assert!(plan.seqs[0].drafts.is_empty(), "no block is free for drafts: {:?}", plan.seqs[0]);
    assert_eq!(s.num_preemptions(), 0);
}

#[test]
fn a_step_with_more_decodes_than_disable_by_batch_size_has_no_drafts() {
    let mut config = speculating(2);
    config.speculative.as_mut().unwrap().disable_by_batch_size = 2;
    let mut s = Scheduler::new(config);
    for id in ["a", "b", "c"] {
        s.add(seq(id, &[4, 5, 4, 5], 8));
    }
    let plan = s.schedule();
    s.finish_step(&plan, &[4, 4, 4]);
    let plan = s.schedule();
    assert!(plan.seqs.iter().all(|c| c.drafts.is_empty()), "three decodes, at most two speculate");
    // One finishes: two decodes left, and they speculate.
    s.finish_step(&plan, &[99, 5, 5]);
    let plan = s.schedule();
    assert_eq!(plan.seqs.iter().map(|c| c.drafts.len()).collect::<Vec<_>>(), [2, 2]);
}

#[test]
fn a_lone_decode_verifies_one_draft_from_its_last_token_when_no_longer_suffix_matches_or_it_is_paused() {
    let mut config = speculating(3);
    config.speculative.as_mut().unwrap().method =
        SpeculativeMethod::Ngram(NgramLookup { prompt_lookup_max: 3, prompt_lookup_min: 2 });
    let mut s = Scheduler::new(config.clone());
    // "5 8 2 4 5 6 1 7 | 5": no earlier "7 5", but "5" was followed by 6 last.
    s.add(seq("a", &[5, 8, 2, 4, 5, 6, 1, 7], 20));
    let plan = s.schedule();
    s.finish_step(&plan, &[5]);
    let plan = s.schedule();
    assert_eq!(plan.seqs[0].drafts, [6], "one draft from the 1-token suffix");
    // Rejected: a draft of the config's own lookup would pause drafting, this one does not.
    s.finish_step_with(&plan, vec![tokens(&[8])]);
    let plan = s.schedule();
    assert_eq!(plan.seqs[0].drafts, [2, 4, 5], "\"5 8\" occurred before: all three, the length untouched");
    // All three rejected: the lookup's drafts pause, and the second row goes on alone.
    s.finish_step_with(&plan, vec![tokens(&[1])]);
    let plan = s.schedule();
    assert_eq!(plan.seqs[0].drafts, [7], "paused, \"1\" was followed by 7");
    // A token never seen before: nothing to draft.
    s.finish_step_with(&plan, vec![tokens(&[9])]);
    let plan = s.schedule();
    assert!(plan.seqs[0].drafts.is_empty());

    // Two decoding sequences: the second row is no longer free, neither drafts.
    let mut s = Scheduler::new(config);
    s.add(seq("a", &[5, 8, 2, 4, 5, 6, 1, 7], 20));
    s.add(seq("b", &[5, 8, 2, 4, 5, 6, 1, 7], 20));
    let plan = s.schedule();
    s.finish_step(&plan, &[5, 5]);
    let plan = s.schedule();
    assert!(plan.seqs.iter().all(|c| c.drafts.is_empty()), "{plan:?}");
}

#[test]
fn a_draft_model_is_left_behind_by_decodes_that_do_not_draft_and_catches_up_when_they_do() {
    let draft = SpeculativeConfig {
        method: SpeculativeMethod::DraftModel { model: "draft.gguf".into() },
        num_speculative_tokens: 2,
        disable_by_batch_size: 1,
    };
    let mut s = Scheduler::new(SchedulerConfig { speculative: Some(draft), ..config(32, 4) });
    // To be handed off, a prompt's chunks write the draft's KV, however crowded the step.
    s.add(NewSequence { pin_on_finish: true, ..seq("a", &[1, 2, 3, 4, 5], 20) });
    s.add(NewSequence { pin_on_finish: true, ..seq("b", &[6, 7, 8], 2) });
    let plan = s.schedule();
    assert!(plan.seqs.iter().all(|c| c.draft_kv), "prefill chunks of pinned prompts write the draft's KV");
    s.finish_step(&plan, &[10, 20]);
    // Two decoding, above the threshold of one: nobody drafts, and the draft is left behind.
    let plan = s.schedule();
    assert!(plan.seqs.iter().all(|c| c.drafts.is_empty() && !c.draft_kv), "{plan:?}");
    assert!(plan.to_batch().seqs.iter().all(|c| c.draft_kv == crate::DraftFill::Skip));
    s.finish_step(&plan, &[11, 21]);
    // `b` is done: `a` alone drafts two slots, the draft first fed the token it missed.
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("a", 6, 3)]);
    let a = &plan.seqs[0];
    assert_eq!((a.drafts.len(), a.draft_kv), (2, true));
    assert_eq!(a.draft_catch_up, vec![10], "position 5");
    // The verifying pass writes the last draft's draft KV only: the proposing passes fed the rest.
    let batch = plan.to_batch();
    assert_eq!(batch.seqs[0].draft_kv, crate::DraftFill::Last);
    let fill = batch.draft_chunks();
    assert_eq!((fill.tokens.len(), fill.seqs[0].context_start), (1, 8));
    s.finish_step_with(&plan, vec![tokens(&[0, 0, 12])]);
    // Both drafts accepted (they were the zeros the engine would have overwritten): caught up.
    let plan = s.schedule();
    assert_eq!(shape(&plan)[0].1, 9);
    assert!(plan.seqs[0].draft_catch_up.is_empty(), "{plan:?}");

    // A pinned prompt's last token fed alone (chunked prefill) beside decodes, without drafting,
    // still writes the draft's KV: on a prefill worker it is handed off.
    let draft = s.config.speculative.clone();
    let mut s = Scheduler::new(SchedulerConfig { speculative: draft, max_num_batched_tokens: 5, ..config(32, 4) });
    s.add(seq("b", &[6, 7], 20));
    s.add(seq("c", &[8, 9], 20));
    let plan = s.schedule();
    assert!(plan.seqs.iter().all(|c| !c.draft_kv), "crowded: prompts left to catch up, {plan:?}");
    s.finish_step(&plan, &[20, 30]);
    s.add(NewSequence { pin_on_finish: true, ..seq("a", &[1, 2, 3, 4], 20) });
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("b", 2, 1), ("c", 2, 1), ("a", 0, 3)]);
    s.finish_step(&plan, &[21, 31]);
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("b", 3, 1), ("c", 3, 1), ("a", 3, 1)]);
    assert!(plan.seqs.iter().all(|c| c.drafts.is_empty()));
    assert!(!plan.seqs[0].draft_kv && !plan.seqs[1].draft_kv, "{plan:?}");
    assert!(plan.seqs[2].draft_kv, "{plan:?}");
    s.finish_step(&plan, &[22, 32, 40]);
    s.abort("a");
    s.abort("c");
    s.take_events();
    // `b` alone drafts: the draft first catches up on its whole prompt and what it decoded.
    let plan = s.schedule();
    assert_eq!(shape(&plan), vec![("b", 4, 3)]);
    assert_eq!(plan.seqs[0].draft_catch_up, [6, 7, 20, 21], "{plan:?}");

    // Blocks cached while their draft KV was deferred: an unpinned prompt reuses them (and catches
    // up when it drafts), a pinned one computes them again, as it hands its blocks off.
    let draft = s.config.speculative.clone();
    let mut s = Scheduler::new(SchedulerConfig { speculative: draft.clone(), ..config(32, 4) });
    let prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9];
    s.add(seq("x", &prompt, 20));
    s.add(seq("y", &[7, 7], 20));
    let plan = s.schedule();
    assert!(plan.seqs.iter().all(|c| !c.draft_kv));
    s.finish_step(&plan, &[10, 11]);
    s.add(seq("unpinned", &prompt, 20));
    s.add(NewSequence { pin_on_finish: true, ..seq("pinned", &prompt, 20) });
    let plan = s.schedule();
    let starts: Vec<(&str, usize)> = plan.seqs[2..].iter().map(|c| (c.request_id.as_str(), c.context_start)).collect();
    assert_eq!(starts, [("unpinned", 8), ("pinned", 0)], "{plan:?}");
    assert!(plan.seqs[3].draft_kv, "a pinned prompt writes the draft's KV in a crowd too");

    // A draft behind by more tokens than are left to generate does not catch up: no drafts.
    let mut s = Scheduler::new(SchedulerConfig { speculative: draft.clone(), ..config(32, 4) });
    s.add(seq("short", &[1, 2, 3, 4, 5, 6], 4));
    s.add(seq("other", &[7, 7], 20));
    let plan = s.schedule();
    s.finish_step(&plan, &[10, 11]);
    s.abort("other");
    let plan = s.schedule();
    assert!(plan.seqs[0].drafts.is_empty(), "7 tokens to catch up, 3 left: {plan:?}");
    s.finish_step(&plan, &[12]);
    let plan = s.schedule();
    assert!(plan.seqs[0].drafts.is_empty(), "8 behind, 2 left");

    // One sequence, not crowded: its prompt writes the draft's KV at once, for its first draft.
    let mut s = Scheduler::new(SchedulerConfig { speculative: draft, ..config(32, 4) });
    s.add(seq("a", &[1, 2, 3], 20));
    let plan = s.schedule();
    assert!(plan.seqs[0].draft_kv);
    s.finish_step(&plan, &[4]);
    let plan = s.schedule();
    assert_eq!((plan.seqs[0].drafts.len(), plan.seqs[0].draft_catch_up.len()), (2, 0));
}

#[test]
fn speculation_counts_by_position_add_up_and_subtract_across_lengths() {
    let mut before = SpeculationStats::default();
    before.verified(2, 1);
    let mut now = before.clone();
    now.verified(4, 3);
    now.verified(1, 0);
    assert_eq!((now.num_drafts, now.num_draft_tokens, now.num_accepted_tokens), (3, 7, 4));
    assert_eq!(now.num_draft_tokens_per_pos, [3, 2, 1, 1]);
    assert_eq!(now.num_accepted_tokens_per_pos, [2, 1, 1]);
    let grown = now.since(&before);
    assert_eq!((grown.num_drafts, grown.num_draft_tokens_per_pos.as_slice()), (2, [2, 1, 1, 1].as_slice()));
    assert_eq!(grown.num_accepted_tokens_per_pos, [1, 1, 1]);
    assert_eq!(grown.plus(&before), now);
}

//! Engine tests against a fake model.
//!
//! The fake's greedy next token is `(last + 1) % vocab`, with the other logits
//! spread out enough that temperature sampling really draws. It writes each
//! token's id into its K slot and its position into its V slot, records what
//! each step looked like (including the token ids it found in the cache), and
//! waits on a gate so tests can hold a step while they queue more work.

use super::*;
use crate::forward::{ForwardBatch, ForwardError, Logits};
use crate::kv::landing::KvLanding;
use crate::request::{
    EngineError, EngineEvent, EngineRequest, FailureKind, FinishReason, KvReservation, KvSource, MAX_N,
};
use crate::sampler::{SamplingParams, TokenLogprobs};
use crate::scheduler::block_manager::KvEvent;
use std::sync::Condvar;
use tokio::sync::mpsc::UnboundedReceiver;

/// Permits for forward passes: a step waits until one is available.
struct Gate {
    permits: Mutex<usize>,
    opened: Condvar,
}

impl Gate {
    fn new(permits: usize) -> Self {
        Self { permits: Mutex::new(permits), opened: Condvar::new() }
    }

    fn open(&self) {
        *self.permits.lock().unwrap() = usize::MAX;
        self.opened.notify_all();
    }

    fn add(&self, n: usize) {
        let mut p = self.permits.lock().unwrap();
        *p = p.saturating_add(n);
        self.opened.notify_all();
    }

    fn pass(&self) {
        let mut p = self.opened.wait_while(self.permits.lock().unwrap(), |p| *p == 0).unwrap();
        if *p != usize::MAX {
            *p -= 1;
        }
    }
}

/// One sequence of one step, as the fake model saw it.
#[derive(Debug, Clone, PartialEq)]
struct SeenSeq {
    tokens: Vec<u32>,
    context_start: usize,
    /// Token ids found in the K cache at positions `0..context_start`.
    cached: Vec<u32>,
}

struct FakeModel {
    vocab: usize,
    gate: Gate,
    steps: Mutex<Vec<Vec<SeenSeq>>>,
}

/// A token that makes the fake fail its forward pass, and one that makes it panic.
const FAIL_TOKEN: u32 = 998;
const PANIC_TOKEN: u32 = 999;

impl FakeModel {
    fn new(vocab: usize, open: bool) -> Arc<Self> {
        let gate = Gate::new(if open { usize::MAX } else { 0 });
        Arc::new(Self { vocab, gate, steps: Mutex::new(Vec::new()) })
    }

    fn steps(&self) -> Vec<Vec<SeenSeq>> {
        self.steps.lock().unwrap().clone()
    }

    fn logits_after(&self, last: u32, row: &mut [f32]) {
        let v = self.vocab;
        for (j, x) in row.iter_mut().enumerate() {
            *x = ((j * 7 + last as usize * 13) % v) as f32 / v as f32;
        }
        row[(last as usize + 1) % v] = 3.0;
    }
}

/// Offset of a token's slot in one layer's K or V buffer, and its length.
fn slot(shape: &KvCacheShape, block_table: &[u32], pos: usize) -> (usize, usize) {
    let width = shape.num_kv_heads * shape.head_dim;
    let block = block_table[pos / shape.block_size] as usize;
    ((block * shape.block_size + pos % shape.block_size) * width, width)
}

impl Forward for FakeModel {
    fn forward(&self, batch: &ForwardBatch, kv: &mut KvStorage) -> Result<Logits, ForwardError> {
        self.gate.pass();
        if batch.tokens.contains(&FAIL_TOKEN) {
            return Err(ForwardError::InvalidBatch("the fake refuses token 998".into()));
        }
        assert!(!batch.tokens.contains(&PANIC_TOKEN), "the fake panics on token 999");
        let shape = *kv.shape();
        let mut seen = Vec::new();
        let mut data = Vec::new();
        for s in &batch.seqs {
            let end = s.context_start + s.num_tokens;
            if s.block_table.len() * shape.block_size < end {
                return Err(ForwardError::InvalidBatch(format!("block table {:?} too short for {end}", s.block_table)));
            }
            let cached = (0..s.context_start)
                .map(|p| {
                    let (at, _) = slot(&shape, &s.block_table, p);
                    kv.layer(0).0[at] as u32
                })
                .collect();
            let tokens = batch.tokens[s.token_start..s.token_start + s.num_tokens].to_vec();
            for (j, &t) in tokens.iter().enumerate() {
                let pos = s.context_start + j;
                let (at, width) = slot(&shape, &s.block_table, pos);
                for layer in 0..shape.num_layers {
                    let (k, v) = kv.layer_mut(layer);
                    k[at..at + width].fill(t as f32);
                    v[at..at + width].fill(pos as f32);
                }
            }
            if s.need_logits {
                let mut row = vec![0.0; self.vocab];
                self.logits_after(*tokens.last().unwrap(), &mut row);
                data.extend(row);
            }
            seen.push(SeenSeq { tokens, context_start: s.context_start, cached });
        }
        self.steps.lock().unwrap().push(seen);
        Ok(Logits::new(self.vocab, data))
    }

    fn vocab_size(&self) -> usize {
        self.vocab
    }
}

fn kv_shape(block_size: usize, num_blocks: usize) -> KvCacheShape {
    KvCacheShape { num_layers: 2, num_kv_heads: 1, head_dim: 2, block_size, num_blocks }
}

fn config() -> EngineConfig {
    EngineConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 2048,
        max_model_len: 64,
        eos_token_ids: vec![],
        default_seed: 0,
        enable_prefix_caching: true,
        speculative: None,
    }
}

fn request(id: &str, prompt: &[u32], sampling: SamplingParams) -> EngineRequest {
    EngineRequest::generate(id, prompt.to_vec(), sampling)
}

/// Every token a request heard, and its last event.
fn collect(mut rx: UnboundedReceiver<EngineEvent>) -> (Vec<u32>, EngineEvent) {
    let mut tokens = Vec::new();
    loop {
        match rx.blocking_recv().expect("the engine ended a request without a final event") {
            EngineEvent::Token { id: t, .. } => tokens.push(t),
            last => {
                assert_eq!(rx.blocking_recv(), None, "nothing follows the final event");
                return (tokens, last);
            }
        }
    }
}

fn finished(reason: FinishReason, num_prompt_tokens: usize) -> EngineEvent {
    EngineEvent::Finished { index: 0, reason, pinned_blocks: None, num_prompt_tokens, num_cached_tokens: 0 }
}

fn assert_idle(engine: &EngineHandle) {
    let s = engine.stats();
    assert_eq!((s.num_sequences, s.num_running, s.held_blocks), (0, 0, 0), "{s:?}");
    assert_eq!(s.free_blocks, s.total_blocks, "{s:?}");
}

#[test]
fn the_handle_is_send_and_sync() {
    fn check<T: Send + Sync + Clone>() {}
    check::<EngineHandle>();
}

#[test]
fn four_concurrent_requests_share_forward_passes() {
    let model = FakeModel::new(32, false);
    let engine = Engine::start(model.clone(), kv_shape(4, 64), config());
    let prompts: [&[u32]; 4] = [&[1, 2, 3], &[10], &[20, 21], &[5, 6, 7, 8, 9]];
    let rxs: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| engine.submit(request(&format!("r{i}"), p, SamplingParams::greedy(5))).unwrap())
        .collect();
    assert_eq!(engine.stats().num_sequences, 4);
    model.gate.open();
    for (rx, prompt) in rxs.into_iter().zip(prompts) {
        let last = *prompt.last().unwrap();
        let expected: Vec<u32> = (1..=5).map(|i| (last + i) % 32).collect();
        assert_eq!(collect(rx), (expected, finished(FinishReason::Length, prompt.len())));
    }
    let steps = model.steps();
    let widest = steps.iter().map(Vec::len).max().unwrap();
    assert_eq!(widest, 4, "steps: {steps:?}");
    assert!(
        steps.iter().any(|s| s.len() == 4 && s.iter().all(|q| q.tokens.len() == 1)),
        "four decodes never shared a step: {steps:?}"
    );
    // Each step is one forward pass: far fewer than 4 requests x 5 tokens.
    assert!(steps.len() <= 7, "{} steps", steps.len());
    engine.sync();
    assert_idle(&engine);
}

#[test]
fn max_tokens_stop_tokens_eos_and_max_model_len_end_generation() {
    let model = FakeModel::new(16, true);
    let engine =
        Engine::start(model, kv_shape(4, 32), EngineConfig { max_model_len: 12, eos_token_ids: vec![11], ..config() });
    let run = |id: &str, prompt: &[u32], sampling| collect(engine.submit(request(id, prompt, sampling)).unwrap());

    assert_eq!(
        run("max", &[1, 2, 3], SamplingParams::greedy(4)),
        (vec![4, 5, 6, 7], finished(FinishReason::Length, 3))
    );
    let stop = SamplingParams { stop_token_ids: vec![6], ..SamplingParams::greedy(10) };
    assert_eq!(run("stop", &[1, 2, 3], stop), (vec![4, 5, 6], finished(FinishReason::Stop, 3)));
    assert_eq!(run("eos", &[8], SamplingParams::greedy(10)), (vec![9, 10, 11], finished(FinishReason::Stop, 1)));
    // 3 prompt tokens + 9 generated reach max_model_len 12.
    let (tokens, last) = run("len", &[12, 13, 14], SamplingParams::greedy(100));
    assert_eq!(tokens, vec![15, 0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(last, finished(FinishReason::Length, 3));
    // The prompt may be one token short of max_model_len.
    let prompt: Vec<u32> = (0..11).collect();
    assert_eq!(run("edge", &prompt, SamplingParams::greedy(5)), (vec![11], finished(FinishReason::Stop, 11)));
    engine.sync();
    assert_idle(&engine);
}

#[test]
fn submit_rejects_bad_requests() {
    let model = FakeModel::new(16, false);
    let engine = Engine::start(model.clone(), kv_shape(4, 8), EngineConfig { max_model_len: 32, ..config() });
    let submit = |prompt: &[u32], sampling| engine.submit(request("x", prompt, sampling)).err();
    let greedy = SamplingParams::greedy(4);

    assert_eq!(submit(&[], greedy.clone()), Some(EngineError::EmptyPrompt { request_id: "x".into() }));
    assert_eq!(
        submit(&[1; 32], greedy.clone()),
        Some(EngineError::PromptTooLong { prompt_len: 32, max_model_len: 32 })
    );
    let small = Engine::start(FakeModel::new(16, true), kv_shape(4, 2), config());
    assert_eq!(
        small.submit(request("x", &[1; 9], greedy.clone())).err(),
        Some(EngineError::PromptExceedsCache { prompt_len: 9, blocks_needed: 3, block_size: 4, num_blocks: 2 })
    );
    assert_eq!(submit(&[1], SamplingParams::greedy(0)), Some(EngineError::ZeroMaxTokens));
    let hot = SamplingParams { temperature: -1.0, ..greedy.clone() };
    assert_eq!(submit(&[1], hot), Some(EngineError::InvalidTemperature(-1.0)));
    let nucleus = SamplingParams { top_p: 0.0, ..greedy.clone() };
    assert_eq!(submit(&[1], nucleus), Some(EngineError::InvalidTopP(0.0)));
    assert_eq!(submit(&[1, 16], greedy.clone()), Some(EngineError::TokenOutOfVocab { token: 16, vocab_size: 16 }));
    let msg = EngineError::PromptExceedsCache { prompt_len: 17, blocks_needed: 5, block_size: 4, num_blocks: 4 };
    assert_eq!(msg.to_string(), "prompt of 17 tokens needs 5 KV blocks of 4 tokens, the whole cache has 4");

    // A prompt plus max_tokens past max_model_len is fine; a live id twice is not.
    let rx = engine.submit(request("x", &[1; 31], SamplingParams::greedy(100))).unwrap();
    assert_eq!(submit(&[1], greedy.clone()), Some(EngineError::DuplicateRequestId("x".into())));
    model.gate.open();
    let (tokens, last) = collect(rx);
    assert_eq!((tokens, last), (vec![2], finished(FinishReason::Length, 31)));
    // Once finished, the id is free again.
    assert!(engine.submit(request("x", &[1], greedy)).is_ok());
}

#[test]
fn abort_frees_a_running_request_at_once() {
    let model = FakeModel::new(32, false);
    let engine = Engine::start(model.clone(), kv_shape(4, 16), config());
    let rx = engine.submit(request("a", &[1, 2, 3, 4, 5], SamplingParams::greedy(50))).unwrap();
    let waiting = engine.submit(request("b", &[9], SamplingParams::greedy(50))).unwrap();
    model.gate.add(1);
    let mut rx = rx;
    assert_eq!(rx.blocking_recv(), Some(EngineEvent::Token { index: 0, id: 6, logprobs: None, num_cached_tokens: 0 }));
    engine.abort("a");
    engine.abort("b");
    engine.abort("unknown");
    model.gate.open();
    let (_, last) = collect(rx);
    assert_eq!(last, finished(FinishReason::Abort, 5));
    let (_, last) = collect(waiting);
    assert_eq!(last, finished(FinishReason::Abort, 1));
    assert_idle(&engine);
}

#[test]
fn pinned_prompt_blocks_are_held_until_released() {
    let model = FakeModel::new(32, true);
    let engine = Engine::start(model, kv_shape(4, 16), config());
    let req = EngineRequest { pin_on_finish: true, ..request("p", &[1, 2, 3, 4, 5, 6], SamplingParams::greedy(1)) };
    let (tokens, last) = collect(engine.submit(req).unwrap());
    assert_eq!(tokens, vec![7]);
    let EngineEvent::Finished { reason, pinned_blocks: Some(pinned), num_prompt_tokens, .. } = last else {
        panic!("expected pinned blocks, got {last:?}");
    };
    assert_eq!((reason, pinned.as_slice(), num_prompt_tokens), (FinishReason::Length, &[0u32, 1][..], 6));
    let s = engine.stats();
    assert_eq!((s.num_sequences, s.held_blocks, s.free_blocks), (0, 2, 14));

    // The held blocks still hold the prompt: token ids in K, positions in V.
    let mut bytes = Vec::new();
    engine.read_blocks(&pinned, &mut bytes).unwrap();
    assert_eq!(bytes.len(), 2 * engine.shape().block_bytes());
    let floats: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    // Layer-major: layer 0's K of blocks 0 and 1 (tokens 1..=6, 2 values
    // each), then its V of both blocks (positions 0..6).
    let n = engine.shape().block_elems();
    assert_eq!(&floats[..8], &[1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0]);
    assert_eq!(&floats[n..n + 4], &[5.0, 5.0, 6.0, 6.0]);
    assert_eq!(&floats[2 * n..2 * n + 8], &[0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);

    engine.release_blocks(&pinned);
    engine.release_blocks(&pinned); // a retried release is harmless
    engine.sync();
    assert_idle(&engine);

    // An aborted pinned request pins nothing.
    let model = FakeModel::new(32, false);
    let engine = Engine::start(model.clone(), kv_shape(4, 16), config());
    // max_tokens 5: the abort lands after at most one step, before the request ends.
    let req =
        EngineRequest { pooling: None, pin_on_finish: true, ..request("q", &[1, 2, 3], SamplingParams::greedy(5)) };
    let rx = engine.submit(req).unwrap();
    engine.abort("q");
    model.gate.open();
    assert_eq!(collect(rx).1, finished(FinishReason::Abort, 3));
    assert_idle(&engine);
}

/// Prefills `prompt` on a fresh engine with `pin_on_finish`, returning the KV
/// payload and the first token, as a prefill worker would hand them off.
fn prefill_remotely(prompt: &[u32], block_size: usize) -> (Vec<u8>, u32) {
    let engine = Engine::start(FakeModel::new(32, true), kv_shape(block_size, 16), config());
    let req = EngineRequest { pooling: None, pin_on_finish: true, ..request("pre", prompt, SamplingParams::greedy(1)) };
    let (tokens, last) = collect(engine.submit(req).unwrap());
    let EngineEvent::Finished { pinned_blocks: Some(pinned), .. } = last else { panic!("{last:?}") };
    let mut data = Vec::new();
    engine.read_blocks(&pinned, &mut data).unwrap();
    engine.release_blocks(&pinned);
    (data, tokens[0])
}

#[test]
fn provided_kv_is_written_and_decode_continues_from_the_first_token() {
    let prompt = [3, 1, 4, 1, 5, 9];
    let (data, first_token) = prefill_remotely(&prompt, 4);
    assert_eq!(first_token, 10);

    let model = FakeModel::new(32, true);
    let engine = Engine::start(model.clone(), kv_shape(4, 16), config());
    // Occupy block 0 so the provided KV lands in other blocks than on the prefill side.
    let hold = EngineRequest { pooling: None, pin_on_finish: true, ..request("hold", &[7], SamplingParams::greedy(1)) };
    let (_, hold_last) = collect(engine.submit(hold).unwrap());
    let req = EngineRequest {
        kv: KvSource::Provided { data: data.clone(), first_tokens: vec![first_token] },
        ..request("d", &prompt, SamplingParams::greedy(4))
    };
    // The first token counts toward max_tokens and is not emitted again.
    assert_eq!(collect(engine.submit(req).unwrap()), (vec![11, 12, 13], finished(FinishReason::Length, 6)));

    let steps = model.steps();
    // Step 0 was "hold"; step 1 fed only the first token, on top of the provided prompt KV.
    assert_eq!(steps[1], vec![SeenSeq { tokens: vec![10], context_start: 6, cached: prompt.to_vec() }]);
    assert_eq!(steps.len(), 4, "no prefill ran for the provided prompt: {steps:?}");

    // A first token that is already the last one allowed: no forward pass at all.
    let req = EngineRequest {
        kv: KvSource::Provided { data: data.clone(), first_tokens: vec![first_token] },
        ..request("one", &prompt, SamplingParams::greedy(1))
    };
    assert_eq!(collect(engine.submit(req).unwrap()), (vec![], finished(FinishReason::Length, 6)));
    assert_eq!(model.steps().len(), 4);

    // A payload of the wrong size is an error, and nothing leaks.
    let req = EngineRequest {
        kv: KvSource::Provided { data: data[..data.len() - 4].to_vec(), first_tokens: vec![first_token] },
        ..request("bad", &prompt, SamplingParams::greedy(4))
    };
    let (tokens, last) = collect(engine.submit(req).unwrap());
    assert!(tokens.is_empty());
    assert!(
        matches!(&last, EngineEvent::Error(e) if e.kind == FailureKind::Refused && e.message.contains("provided KV of")),
        "{last:?}"
    );
    let EngineEvent::Finished { pinned_blocks: Some(held), .. } = hold_last else { panic!() };
    engine.release_blocks(&held);
    engine.sync();
    assert_idle(&engine);
}

/// Writes a hand-off payload (layer, K/V, block) into reserved blocks, as a puller would.
fn land(blocks: &KvReservation, data: &[u8], shape: KvCacheShape) {
    let seg = shape.segment_bytes();
    let mut segments = data.chunks_exact(seg);
    for lkv in 0..shape.num_layers * 2 {
        for &id in blocks.block_ids() {
            let at = shape.segment_offset(lkv / 2, lkv % 2, id as usize);
            let src = segments.next().unwrap();
            // SAFETY: a reserved block's segment, inside the arena.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), blocks.as_mut_ptr(0).add(at), seg) };
        }
    }
}

/// Streams a hand-off into `blocks` on another thread after `delay`, through
/// a share of them, then lands every layer or fails.
fn stream_in(blocks: &KvReservation, data: Vec<u8>, shape: KvCacheShape, fail: bool) -> Arc<KvLanding> {
    let landing = KvLanding::new(shape.num_layers);
    let (reporter, held) = (landing.reporter(), blocks.share());
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(30));
        if !fail {
            land(&held, &data, shape);
            reporter.landing().landed(shape.num_layers as u32);
        }
        // Dropping the reporter of an unfinished landing fails it.
    });
    landing
}

#[test]
fn kv_streaming_in_is_waited_for_and_a_failed_one_fails_only_its_request() {
    let prompt = [3, 1, 4, 1, 5, 9];
    let (data, first_token) = prefill_remotely(&prompt, 4);
    let model = FakeModel::new(32, true);
    let shape = kv_shape(4, 16);
    let engine = Engine::start(model.clone(), shape, config());
    let streamed = |id: &str, max_tokens, fail| {
        let blocks = reserve(&engine, prompt.len()).unwrap();
        let landing = Some(stream_in(&blocks, data.clone(), shape, fail));
        let req = EngineRequest {
            kv: KvSource::Reserved { blocks, first_tokens: vec![first_token], landing },
            ..request(id, &prompt, SamplingParams::greedy(max_tokens))
        };
        engine.submit(req).unwrap()
    };
    // Idle: admitted at once, the step waits for the KV.
    assert_eq!(collect(streamed("idle", 4, false)), (vec![11, 12, 13], finished(FinishReason::Length, 6)));
    // Busy with another request: held back until landed, then the same.
    let busy = engine.submit(request("busy", &[2, 7], SamplingParams::greedy(40))).unwrap();
    assert_eq!(collect(streamed("held", 4, false)), (vec![11, 12, 13], finished(FinishReason::Length, 6)));
    // A failed pull fails its request alone; its blocks come back once the pull lets go.
    let (tokens, last) = collect(streamed("failed", 4, true));
    assert!(tokens.is_empty());
    assert!(
        matches!(&last, EngineEvent::Error(e) if e.kind == FailureKind::Handoff && e.message.starts_with("the KV hand-off failed")),
        "{last:?}"
    );
    assert_eq!(collect(busy).0.len(), 40);
    std::thread::sleep(std::time::Duration::from_millis(50));
    engine.sync();
    assert_idle(&engine);
}

fn reserve(engine: &EngineHandle, num_tokens: usize) -> Option<KvReservation> {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    runtime.block_on(engine.reserve_kv(num_tokens)).unwrap()
}

#[test]
fn kv_pulled_into_reserved_blocks_is_decoded_from_without_a_copy() {
    let prompt = [3, 1, 4, 1, 5, 9];
    let (data, first_token) = prefill_remotely(&prompt, 4);
    let model = FakeModel::new(32, true);
    let shape = kv_shape(4, 16);
    let engine = Engine::start(model.clone(), shape, config());
    // Occupy block 0 so the reserved blocks are others than on the prefill side.
    let hold = EngineRequest { pooling: None, pin_on_finish: true, ..request("hold", &[7], SamplingParams::greedy(1)) };
    let (_, hold_last) = collect(engine.submit(hold).unwrap());
    let blocks = reserve(&engine, prompt.len()).unwrap();
    assert_eq!(blocks.block_ids(), [1, 2]);
    // Stats are published after the step thread's commands, not with the reply.
    engine.sync();
    assert_eq!(engine.stats().free_blocks, 13);
    land(&blocks, &data, shape);
    let req = EngineRequest {
        kv: KvSource::Reserved { blocks, first_tokens: vec![first_token], landing: None },
        ..request("d", &prompt, SamplingParams::greedy(4))
    };
    assert_eq!(collect(engine.submit(req).unwrap()), (vec![11, 12, 13], finished(FinishReason::Length, 6)));
    let steps = model.steps();
    assert_eq!(steps[1], vec![SeenSeq { tokens: vec![10], context_start: 6, cached: prompt.to_vec() }]);
    assert_eq!(steps.len(), 4, "no prefill ran for the handed-off prompt: {steps:?}");

    // A reservation of the wrong size is refused at submit; dropping it frees its blocks.
    let one = reserve(&engine, 4).unwrap();
    let req = EngineRequest {
        kv: KvSource::Reserved { blocks: one, first_tokens: vec![first_token], landing: None },
        ..request("bad", &prompt, SamplingParams::greedy(4))
    };
    let error = engine.submit(req).unwrap_err();
    assert_eq!(error.to_string(), "1 reserved KV blocks for a prompt of 6 tokens, which needs 2");
    // More than is free: nothing taken.
    assert!(reserve(&engine, 16 * 4).is_none());
    drop(reserve(&engine, 8).unwrap());
    let EngineEvent::Finished { pinned_blocks: Some(held), .. } = hold_last else { panic!() };
    engine.release_blocks(&held);
    engine.sync();
    assert_idle(&engine);
}

/// Runs `n` seeded temperature-sampled requests (and one greedy) at once and
/// returns their tokens and the engine's preemption count.
fn run_concurrently(num_blocks: usize) -> (Vec<Vec<u32>>, u64) {
    run_concurrently_with(num_blocks, true)
}

/// [`run_concurrently`] with prefix caching on or off.
fn run_concurrently_with(num_blocks: usize, caching: bool) -> (Vec<Vec<u32>>, u64) {
    let config = EngineConfig { enable_prefix_caching: caching, ..config() };
    run_concurrently_in(num_blocks, config, [0; 4])
}

/// [`run_concurrently`] under `config`, with a priority per request.
fn run_concurrently_in(num_blocks: usize, config: EngineConfig, priorities: [i32; 4]) -> (Vec<Vec<u32>>, u64) {
    let model = FakeModel::new(32, false);
    let budget = config.max_num_batched_tokens;
    let engine = Engine::start(model.clone(), kv_shape(2, num_blocks), config);
    let rxs: Vec<_> = (0..4u32)
        .map(|i| {
            let sampling = if i == 0 {
                SamplingParams::greedy(8)
            } else {
                SamplingParams { seed: Some(100 + u64::from(i)), max_tokens: 8, ..SamplingParams::default() }
            };
            let req = request(&format!("r{i}"), &[i, i + 1, i + 2], sampling);
            engine.submit(EngineRequest { pooling: None, priority: priorities[i as usize], ..req }).unwrap()
        })
        .collect();
    model.gate.open();
    let outputs = rxs
        .into_iter()
        .map(|rx| {
            let (tokens, last) = collect(rx);
            assert_eq!(last, finished(FinishReason::Length, 3));
            tokens
        })
        .collect();
    engine.sync();
    assert_idle(&engine);
    for step in model.steps() {
        assert!(step.iter().map(|s| s.tokens.len()).sum::<usize>() <= budget, "{step:?}");
    }
    (outputs, engine.stats().num_preemptions)
}

#[test]
fn preemption_under_a_tiny_cache_gives_the_same_tokens() {
    let (roomy, roomy_preemptions) = run_concurrently(64);
    assert_eq!(roomy_preemptions, 0);
    assert_eq!(roomy[0], vec![3, 4, 5, 6, 7, 8, 9, 10]);
    // 8 blocks of 2 tokens: 4 prompts of 3 tokens fill the cache at once.
    let (tiny, tiny_preemptions) = run_concurrently(8);
    assert!(tiny_preemptions > 0);
    assert_eq!(tiny, roomy);
}

#[test]
fn the_same_seed_gives_the_same_tokens_in_any_batch() {
    let model = FakeModel::new(32, true);
    let engine = Engine::start(model.clone(), kv_shape(4, 64), config());
    let seeded =
        |id: &str| request(id, &[1, 2], SamplingParams { seed: Some(7), max_tokens: 12, ..Default::default() });
    let alone = collect(engine.submit(seeded("alone")).unwrap());

    let model = FakeModel::new(32, false);
    let engine = Engine::start(model.clone(), kv_shape(4, 64), config());
    let crowd: Vec<_> =
        (0..3).map(|i| engine.submit(request(&format!("c{i}"), &[i, 5], SamplingParams::default())).unwrap()).collect();
    let rx = engine.submit(seeded("crowded")).unwrap();
    model.gate.open();
    assert_eq!(collect(rx), alone);
    for rx in crowd {
        collect(rx);
    }
    assert!(model.steps().iter().any(|s| s.len() == 4));
}

#[test]
fn a_sequence_too_long_for_the_whole_cache_gets_an_error() {
    let engine = Engine::start(FakeModel::new(32, true), kv_shape(2, 2), config());
    let (tokens, last) = collect(engine.submit(request("big", &[1, 2, 3], SamplingParams::greedy(10))).unwrap());
    assert_eq!(tokens, vec![4, 5]);
    assert!(
        matches!(&last, EngineEvent::Error(e) if e.kind == FailureKind::Refused && e.message.contains("needs 3 KV blocks")),
        "{last:?}"
    );
    engine.sync();
    assert_idle(&engine);
}

#[test]
fn dropping_the_receiver_frees_the_request() {
    let model = FakeModel::new(32, false);
    let engine = Engine::start(model.clone(), kv_shape(4, 16), EngineConfig { max_num_seqs: 1, ..config() });
    let mut running = engine.submit(request("run", &[1, 2, 3], SamplingParams::greedy(50))).unwrap();
    let waiting = engine.submit(request("wait", &[20, 21], SamplingParams::greedy(50))).unwrap();
    let after = engine.submit(request("after", &[9], SamplingParams::greedy(2))).unwrap();
    model.gate.add(1);
    assert_eq!(
        running.blocking_recv(),
        Some(EngineEvent::Token { index: 0, id: 4, logprobs: None, num_cached_tokens: 0 })
    );
    drop(running);
    drop(waiting);
    model.gate.open();
    assert_eq!(collect(after), (vec![10, 11], finished(FinishReason::Length, 1)));
    engine.sync();
    assert_idle(&engine);
    // The waiting request never reached the model.
    assert!(model.steps().iter().flatten().all(|s| s.tokens != [20, 21]));
}

#[test]
fn a_failing_or_panicking_model_fails_its_batch_and_the_engine_goes_on() {
    let engine = Engine::start(FakeModel::new(1000, true), kv_shape(4, 16), config());
    let (_, last) = collect(engine.submit(request("f", &[FAIL_TOKEN], SamplingParams::greedy(3))).unwrap());
    assert!(
        matches!(&last, EngineEvent::Error(e) if e.kind == FailureKind::Forward && e.message.contains("refuses token 998")),
        "{last:?}"
    );
    let (_, last) = collect(engine.submit(request("p", &[PANIC_TOKEN], SamplingParams::greedy(3))).unwrap());
    assert!(
        matches!(&last, EngineEvent::Error(e) if e.kind == FailureKind::Forward && e.message.contains("panicked")),
        "{last:?}"
    );
    let ok = collect(engine.submit(request("ok", &[1], SamplingParams::greedy(2))).unwrap());
    assert_eq!(ok, (vec![2, 3], finished(FinishReason::Length, 1)));
    engine.sync();
    assert_idle(&engine);
}

#[test]
fn pins_nobody_hears_about_are_released() {
    let model = FakeModel::new(32, false);
    let engine = Engine::start(model.clone(), kv_shape(4, 16), config());
    let req = EngineRequest { pin_on_finish: true, ..request("gone", &[1, 2, 3, 4, 5], SamplingParams::greedy(1)) };
    let rx = engine.submit(req).unwrap();
    // The caller goes away before the prefill finishes: its pins must not outlive it.
    drop(rx);
    model.gate.open();
    engine.sync();
    assert_idle(&engine);
}

#[test]
fn min_tokens_and_ignore_eos_move_where_generation_stops() {
    let model = FakeModel::new(16, true);
    let engine = Engine::start(model, kv_shape(4, 32), EngineConfig { eos_token_ids: vec![11], ..config() });
    let run = |id: &str, prompt: &[u32], sampling| collect(engine.submit(request(id, prompt, sampling)).unwrap());
    let greedy = |max_tokens, min_tokens, ignore_eos, stop_token_ids| SamplingParams {
        min_tokens,
        ignore_eos,
        stop_token_ids,
        ..SamplingParams::greedy(max_tokens)
    };

    // Eos 11 is generated #3: min_tokens 2 lets it stop, min_tokens 3 masks it
    // (the fake's runner-up after 10 is 4, whose successors follow).
    assert_eq!(run("min2", &[8], greedy(10, 2, false, vec![])), (vec![9, 10, 11], finished(FinishReason::Stop, 1)));
    assert_eq!(
        run("min3", &[8], greedy(5, 3, false, vec![])),
        (vec![9, 10, 4, 5, 6], finished(FinishReason::Length, 1))
    );
    // Stop tokens are masked the same way: 10 cannot be generated #2.
    let (tokens, last) = run("stop", &[8], greedy(4, 2, false, vec![10]));
    assert!(tokens[1] != 10 && tokens.len() == 4, "{tokens:?}");
    assert_eq!(last, finished(FinishReason::Length, 1));
    // ignore_eos runs through eos to max_tokens; stop tokens still stop.
    assert_eq!(
        run("ignore", &[8], greedy(6, 0, true, vec![])),
        (vec![9, 10, 11, 12, 13, 14], finished(FinishReason::Length, 1))
    );
    assert_eq!(
        run("ignore_stop", &[8], greedy(10, 0, true, vec![13])),
        (vec![9, 10, 11, 12, 13], finished(FinishReason::Stop, 1))
    );
    // A prefill worker's request (max_tokens 1, the client's min_tokens): its
    // one token is not eos.
    let (tokens, last) = run("prefill", &[10], greedy(1, 5, false, vec![]));
    assert!(tokens.len() == 1 && tokens[0] != 11, "{tokens:?}");
    assert_eq!(last, finished(FinishReason::Length, 1));
    engine.sync();
    assert_idle(&engine);
}

#[test]
fn penalties_and_min_tokens_count_a_provided_first_token_as_output() {
    let prompt = [3, 1, 4, 1, 5, 9];
    let (data, first_token) = prefill_remotely(&prompt, 4);
    assert_eq!(first_token, 10);
    let engine =
        Engine::start(FakeModel::new(32, true), kv_shape(4, 16), EngineConfig { eos_token_ids: vec![11], ..config() });
    let decode = |id: &str, sampling| {
        let req = EngineRequest {
            kv: KvSource::Provided { data: data.clone(), first_tokens: vec![first_token] },
            ..request(id, &prompt, sampling)
        };
        collect(engine.submit(req).unwrap())
    };
    // The bias makes 10 beat the fake's favourite (4.25 against 3); a presence
    // penalty of 2 on the provided 10 undoes that.
    let biased = SamplingParams { logit_bias: vec![(10, 4.0)], ignore_eos: true, ..SamplingParams::greedy(4) };
    assert_eq!(decode("plain", biased.clone()), (vec![10, 10, 10], finished(FinishReason::Length, 6)));
    let penalised = SamplingParams { presence_penalty: 2.0, ..biased };
    assert_eq!(decode("presence", penalised), (vec![11, 12, 13], finished(FinishReason::Length, 6)));
    // The provided token is generated #1: min_tokens 1 is met and eos 11
    // stops at #2, min_tokens 2 masks it.
    let min = |n| SamplingParams { min_tokens: n, ..SamplingParams::greedy(4) };
    assert_eq!(decode("min1", min(1)), (vec![11], finished(FinishReason::Stop, 6)));
    let (tokens, _) = decode("min2", min(2));
    assert_ne!(tokens[0], 11, "{tokens:?}");
    engine.sync();
    assert_idle(&engine);
}

#[test]
fn repetition_penalty_reads_the_prompt_and_logit_bias_applies_to_greedy() {
    let engine = Engine::start(FakeModel::new(16, true), kv_shape(4, 16), config());
    let run = |id: &str, sampling| collect(engine.submit(request(id, &[2, 1], sampling)).unwrap()).0;
    // After 1 the fake favours 2 (3.0); the bias lifts 5 to 2.0.
    let biased = SamplingParams { logit_bias: vec![(5, 2.0)], ..SamplingParams::greedy(1) };
    assert_eq!(run("bias", biased.clone()), [2]);
    // 2 is in the prompt: 3.0 / 2 = 1.5 loses to 5.
    assert_eq!(run("repetition", SamplingParams { repetition_penalty: 2.0, ..biased }), [5]);
    let forced = SamplingParams { logit_bias: vec![(7, 100.0)], ..SamplingParams::greedy(3) };
    assert_eq!(run("forced", forced), [7, 7, 7]);
    engine.sync();
    assert_idle(&engine);
}

#[test]
fn submit_rejects_sampling_params_out_of_range() {
    let engine = Engine::start(FakeModel::new(16, false), kv_shape(4, 8), config());
    let field_of = |sampling: SamplingParams| match engine.submit(request("x", &[1], sampling)).err() {
        Some(EngineError::InvalidSampling { field, .. }) => Some(field),
        other => panic!("{other:?}"),
    };
    let g = SamplingParams::greedy(4);
    assert_eq!(field_of(SamplingParams { min_p: 1.5, ..g.clone() }), Some("min_p"));
    assert_eq!(field_of(SamplingParams { presence_penalty: f32::NAN, ..g.clone() }), Some("presence_penalty"));
    assert_eq!(field_of(SamplingParams { frequency_penalty: 3.0, ..g.clone() }), Some("frequency_penalty"));
    assert_eq!(field_of(SamplingParams { repetition_penalty: 0.0, ..g.clone() }), Some("repetition_penalty"));
    assert_eq!(field_of(SamplingParams { logit_bias: vec![(1, 200.0)], ..g.clone() }), Some("logit_bias"));
    assert_eq!(field_of(SamplingParams { logprobs: Some(21), ..g.clone() }), Some("logprobs"));
    assert_eq!(
        engine.submit(request("x", &[1], SamplingParams { logit_bias: vec![(16, 1.0)], ..g })).err(),
        Some(EngineError::TokenOutOfVocab { token: 16, vocab_size: 16 })
    );
}

/// `num_cached_tokens` of a final event.
fn cached_tokens(last: &EngineEvent) -> usize {
    match last {
        EngineEvent::Finished { num_cached_tokens, .. } => *num_cached_tokens,
        other => panic!("expected Finished, got {other:?}"),
    }
}

fn salted(id: &str, prompt: &[u32], salt: Option<&str>) -> EngineRequest {
    EngineRequest { cache_salt: salt.map(str::to_string), ..request(id, prompt, SamplingParams::greedy(3)) }
}

#[test]
fn a_shared_prefix_is_computed_once_and_gives_the_same_tokens() {
    let prompt_a: Vec<u32> = (1..=9).collect();
    let prompt_b = [1, 2, 3, 4, 5, 6, 7, 8, 20, 21];
    let run = |caching: bool| {
        let model = FakeModel::new(32, true);
        let engine =
            Engine::start(model.clone(), kv_shape(4, 32), EngineConfig { enable_prefix_caching: caching, ..config() });
        let a = collect(engine.submit(salted("a", &prompt_a, None)).unwrap());
        let b = collect(engine.submit(salted("b", &prompt_b, None)).unwrap());
        engine.sync();
        assert_idle(&engine);
        (a, b, model.steps(), engine)
    };
    let (a, b, steps, engine) = run(true);
    assert_eq!((cached_tokens(&a.1), cached_tokens(&b.1)), (0, 8));
    // b's prefill fed only its two new tokens, on top of a's cached KV.
    let b_prefill = &steps[3][0];
    assert_eq!(b_prefill, &SeenSeq { tokens: vec![20, 21], context_start: 8, cached: vec![1, 2, 3, 4, 5, 6, 7, 8] });
    let (a_off, b_off, steps_off, _) = run(false);
    assert_eq!((a.0, b.0), (a_off.0, b_off.0), "the same tokens with and without caching");
    assert_eq!((cached_tokens(&b_off.1), steps_off[3][0].tokens.len()), (0, 10));

    // a stored blocks 0 and 1 (chained) and, with its generated tokens, block 2.
    let h = prompt::block_hash::block_hashes(b"", &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 4);
    let events = engine.take_kv_events();
    assert_eq!(
        events[..2],
        [
            KvEvent::BlockStored { block_hash: h[0], parent_hash: None, token_ids: vec![1, 2, 3, 4], block_id: 0 },
            KvEvent::BlockStored {
                block_hash: h[1],
                parent_hash: Some(h[0]),
                token_ids: vec![5, 6, 7, 8],
                block_id: 1
            },
        ]
    );
    assert!(events.iter().all(|e| matches!(e, KvEvent::BlockStored { .. })), "{events:?}");
    assert!(engine.take_kv_events().is_empty(), "events are taken once");
    assert!(engine.stats().cached_blocks >= 3, "{:?}", engine.stats());
}

#[test]
fn requests_with_different_salts_never_share_blocks() {
    let engine = Engine::start(FakeModel::new(32, true), kv_shape(4, 32), config());
    let prompt = [1, 2, 3, 4, 5, 6];
    let run = |id, salt| cached_tokens(&collect(engine.submit(salted(id, &prompt, salt)).unwrap()).1);
    assert_eq!(run("a1", Some("tenant-a")), 0);
    assert_eq!(run("b1", Some("tenant-b")), 0);
    assert_eq!(run("none1", None), 0);
    assert_eq!(run("a2", Some("tenant-a")), 4);
    assert_eq!(run("b2", Some("tenant-b")), 4);
    assert_eq!(run("none2", None), 4);
}

#[test]
fn a_tiny_cache_evicts_the_least_recently_used_blocks_and_reports_them() {
    // 4 blocks of 2 tokens; each request fills 3 (prompt 4 + 1 generated).
    let engine = Engine::start(FakeModel::new(32, true), kv_shape(2, 4), config());
    let run = |id: &str, prompt: &[u32]| {
        let req = request(id, prompt, SamplingParams::greedy(2));
        cached_tokens(&collect(engine.submit(req).unwrap()).1)
    };
    assert_eq!(run("a", &[1, 2, 3, 4]), 0);
    let ha = prompt::block_hash::block_hashes(b"", &[1, 2, 3, 4], 2);
    engine.take_kv_events();
    assert_eq!(run("b", &[7, 8, 9, 10]), 0);
    let removed: Vec<_> =
        engine.take_kv_events().into_iter().filter(|e| matches!(e, KvEvent::BlockRemoved { .. })).collect();
    // b took the never-used block and a's uncached partial one, then for its
    // generated token evicted a's least recently freed block: its tail (3 4).
    assert_eq!(removed, vec![KvEvent::BlockRemoved { block_hashes: vec![ha[1]] }]);
    // a's first block survived: a repeat reuses it.
    assert_eq!(run("a2", &[1, 2, 3, 4]), 2);
}

#[test]
fn pinned_requests_sharing_a_prefix_hold_it_until_both_release() {
    let engine = Engine::start(FakeModel::new(32, true), kv_shape(4, 16), config());
    let pin = |id: &str, prompt: &[u32]| {
        let req =
            EngineRequest { pooling: None, pin_on_finish: true, ..request(id, prompt, SamplingParams::greedy(1)) };
        match collect(engine.submit(req).unwrap()).1 {
            EngineEvent::Finished { pinned_blocks: Some(p), num_cached_tokens, .. } => (p, num_cached_tokens),
            other => panic!("{other:?}"),
        }
    };
    let (p1, c1) = pin("p1", &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
    let (p2, c2) = pin("p2", &[1, 2, 3, 4, 5, 6, 7, 8, 30]);
    assert_eq!((p1.as_slice(), c1, c2), (&[0, 1, 2][..], 0, 8));
    assert_eq!(p2[..2], [0, 1]);
    assert_eq!(engine.stats().held_blocks, 4);

    engine.release_blocks(&p1);
    engine.release_blocks(&p1); // a retried release must not take p2's pins
    engine.sync();
    assert_eq!(engine.stats().held_blocks, 3);
    // p2's blocks still hold its prompt: token ids in K (layer 0's K of
    // each block comes first in the layer-major payload).
    let mut bytes = Vec::new();
    engine.read_blocks(&p2, &mut bytes).unwrap();
    let k0 =
        |block: usize| f32::from_le_bytes(bytes[block * engine.shape().segment_bytes()..][..4].try_into().unwrap());
    assert_eq!((k0(0), k0(1), k0(2)), (1.0, 5.0, 30.0));
    engine.release_blocks(&p2);
    engine.sync();
    assert_idle(&engine);
}

#[test]
fn with_prefix_caching_off_nothing_is_reused_or_reported() {
    let model = FakeModel::new(32, true);
    let engine =
        Engine::start(model.clone(), kv_shape(4, 16), EngineConfig { enable_prefix_caching: false, ..config() });
    for id in ["a", "b"] {
        assert_eq!(cached_tokens(&collect(engine.submit(salted(id, &[1, 2, 3, 4, 5, 6], None)).unwrap()).1), 0);
    }
    assert!(model.steps().iter().flatten().filter(|s| s.tokens.len() == 6).count() == 2);
    engine.sync();
    assert!(engine.take_kv_events().is_empty());
    assert_eq!(engine.stats().cached_blocks, 0);
}

#[test]
fn preemption_with_prefix_caching_gives_the_tokens_of_a_run_without() {
    let (cached, preemptions) = run_concurrently_with(8, true);
    assert!(preemptions > 0);
    let (uncached, _) = run_concurrently_with(8, false);
    assert_eq!(cached, uncached);
}

#[test]
fn provided_kv_is_cached_for_later_prompts_with_the_same_prefix() {
    let prompt = [3, 1, 4, 1, 5, 9];
    let (data, first_token) = prefill_remotely(&prompt, 4);
    let model = FakeModel::new(32, true);
    let engine = Engine::start(model.clone(), kv_shape(4, 16), config());
    let req = EngineRequest {
        kv: KvSource::Provided { data, first_tokens: vec![first_token] },
        ..request("d", &prompt, SamplingParams::greedy(2))
    };
    let (_, last) = collect(engine.submit(req).unwrap());
    assert_eq!(cached_tokens(&last), 0);
    let h = prompt::block_hash::block_hashes(b"", &prompt, 4);
    assert!(engine.take_kv_events().contains(&KvEvent::BlockStored {
        block_hash: h[0],
        parent_hash: None,
        token_ids: vec![3, 1, 4, 1],
        block_id: 0
    }));
    let (_, last) = collect(engine.submit(request("c", &[3, 1, 4, 1, 7], SamplingParams::greedy(1))).unwrap());
    assert_eq!(cached_tokens(&last), 4);
    let steps = model.steps();
    // The pulled KV (written by the remote prefill) serves the local prompt.
    assert_eq!(steps.last().unwrap()[0], SeenSeq { tokens: vec![7], context_start: 4, cached: vec![3, 1, 4, 1] });
    engine.sync();
    assert_idle(&engine);
}

/// The steps (after the first) in which the fake saw a token of `range`.
fn steps_with(model: &FakeModel, range: std::ops::RangeInclusive<u32>) -> Vec<Vec<SeenSeq>> {
    model.steps().into_iter().filter(|s| s.iter().any(|q| range.contains(&q.tokens[0]))).collect()
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_while_another_request_decodes() {
    let model = FakeModel::new(32, false);
    let engine = Engine::start(model.clone(), kv_shape(4, 32), EngineConfig { max_num_batched_tokens: 4, ..config() });
    let mut decoding = engine.submit(request("d", &[1], SamplingParams::greedy(10))).unwrap();
    model.gate.add(1);
    assert_eq!(
        decoding.blocking_recv(),
        Some(EngineEvent::Token { index: 0, id: 2, logprobs: None, num_cached_tokens: 0 })
    );
    let prompt: Vec<u32> = (20..30).collect();
    let long = engine.submit(request("long", &prompt, SamplingParams::greedy(2))).unwrap();
    model.gate.open();
    let (d_tokens, _) = collect(decoding);
    assert_eq!(d_tokens, (3..12).collect::<Vec<_>>());
    assert_eq!(collect(long), (vec![30, 31], finished(FinishReason::Length, 10)));

    // Each step of `long`: d's decode, then what is left of the budget of 4.
    let steps = steps_with(&model, 20..=31);
    let long_chunks: Vec<(usize, Vec<u32>, Vec<u32>)> = steps
        .iter()
        .map(|s| {
            assert_eq!(s.len(), 2, "{s:?}");
            assert_eq!(s[0].tokens.len(), 1, "d decodes first in every step: {s:?}");
            (s[1].context_start, s[1].tokens.clone(), s[1].cached.clone())
        })
        .collect();
    assert_eq!(
        long_chunks,
        vec![
            (0, vec![20, 21, 22], vec![]),
            (3, vec![23, 24, 25], vec![20, 21, 22]),
            (6, vec![26, 27, 28], vec![20, 21, 22, 23, 24, 25]),
            (9, vec![29], (20..29).collect()),
            (10, vec![30], (20..30).collect()),
        ]
    );
    engine.sync();
    assert_idle(&engine);
}

#[test]
fn chunked_prefill_gives_the_same_tokens_within_the_budget() {
    let (whole, _) = run_concurrently(64);
    for budget in [1, 3, 5] {
        let config = EngineConfig { max_num_batched_tokens: budget, ..config() };
        let (chunked, preemptions) = run_concurrently_in(64, config, [0; 4]);
        assert_eq!((chunked, preemptions), (whole.clone(), 0), "budget {budget}");
    }
}

#[test]
fn a_better_priority_request_is_admitted_before_earlier_worse_ones() {
    let model = FakeModel::new(32, false);
    let engine = Engine::start(model.clone(), kv_shape(4, 16), EngineConfig { max_num_seqs: 1, ..config() });
    let prioritized = |id: &str, token: u32, priority: i32| EngineRequest {
        priority,
        ..request(id, &[token], SamplingParams::greedy(2))
    };
    let mut first = engine.submit(prioritized("first", 1, 10)).unwrap();
    model.gate.add(1);
    assert_eq!(
        first.blocking_recv(),
        Some(EngineEvent::Token { index: 0, id: 2, logprobs: None, num_cached_tokens: 0 })
    );
    let rxs: Vec<_> = [("b", 5, 10), ("c", 9, 10), ("urgent", 13, -10), ("d", 17, 0)]
        .into_iter()
        .map(|(id, token, priority)| engine.submit(prioritized(id, token, priority)).unwrap())
        .collect();
    model.gate.open();
    for rx in rxs {
        collect(rx);
    }
    collect(first);
    let prefills: Vec<u32> =
        model.steps().iter().flatten().filter(|q| q.context_start == 0).map(|q| q.tokens[0]).collect();
    assert_eq!(prefills, vec![1, 13, 17, 5, 9]);
    engine.sync();
    assert_idle(&engine);
}

#[test]
fn preemption_with_priorities_and_chunks_under_a_tiny_cache_gives_the_same_tokens() {
    let (roomy, _) = run_concurrently(64);
    for budget in [2, 2048] {
        let config = EngineConfig { max_num_batched_tokens: budget, ..config() };
        let (tiny, preemptions) = run_concurrently_in(8, config, [3, -1, 0, 3]);
        assert!(preemptions > 0, "budget {budget}");
        assert_eq!(tiny, roomy, "budget {budget}");
    }
}

#[test]
fn token_events_carry_logprobs_only_when_asked() {
    let model = FakeModel::new(16, true);
    let engine = Engine::start(model.clone(), kv_shape(4, 16), config());
    let mut with = engine
        .submit(request("with", &[3, 4], SamplingParams { logprobs: Some(2), ..SamplingParams::greedy(3) }))
        .unwrap();
    let mut row = vec![0.0; 16];
    let mut last = 4;
    for _ in 0..3 {
        let Some(EngineEvent::Token { index: 0, id, logprobs: Some(logprobs), num_cached_tokens: 0 }) =
            with.blocking_recv()
        else {
            panic!("a token with logprobs");
        };
        // The fake's row after `last`, as the model returned it.
        model.logits_after(last, &mut row);
        assert_eq!(logprobs, TokenLogprobs::from_logits(&row, id, 2));
        assert_eq!(logprobs.top.len(), 2);
        assert_eq!(logprobs.top[0].0, id, "greedy takes the most likely");
        last = id;
    }
    let (tokens, _) = collect(engine.submit(request("without", &[3, 4], SamplingParams::greedy(3))).unwrap());
    assert_eq!(tokens, [5, 6, 7]);
    let mut without = engine.submit(request("again", &[3, 4], SamplingParams::greedy(1))).unwrap();
    assert_eq!(
        without.blocking_recv(),
        Some(EngineEvent::Token { index: 0, id: 5, logprobs: None, num_cached_tokens: 0 })
    );
}

mod parallel_sampling;

//! Queues, admission and preemption: a state machine with no threads, no model
//! and no channels. The engine thread drives it: [`Scheduler::schedule`] gives a
//! [`StepPlan`], the model runs it, [`Scheduler::finish_step`] takes the sampled
//! tokens, and [`Scheduler::take_events`] says what each request must hear.
//!
//! # Token accounting
//!
//! As in vLLM there is no prefill or decode phase. A sequence knows all its
//! tokens (prompt, then generated) and how many of them have KV in the cache:
//!
//! ```text
//! tokens:  | p0 p1 p2 p3 p4 | g0 g1 | g2 |
//!          |<-- computed (KV cached) ->|<- new: fed to the next step
//! ```
//!
//! Each step feeds every scheduled sequence its new tokens and samples one
//! token from the logits of the last. A fresh prompt has all tokens new (a
//! prefill), a running sequence has one (a decode), a preempted sequence has
//! all of prompt + generated again (recompute), and a sequence whose prompt KV
//! came from a prefill worker starts with only the first token new.

use crate::batch::ForwardBatch;
use crate::block_manager::{blocks_for, BlockManager};
use crate::engine::{EngineEvent, FinishReason};
use std::collections::{HashSet, VecDeque};

/// Limits the scheduler works within.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running at once (in one batch).
    pub max_num_seqs: usize,
    /// Longest a sequence (prompt + generated) may grow.
    pub max_model_len: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Blocks in the cache.
    pub num_blocks: usize,
    /// Bytes of one block in the hand-off format, to check provided KV.
    pub block_bytes: usize,
    /// Tokens that end every request (besides its own stop tokens).
    pub eos_token_ids: Vec<u32>,
}

/// A request as the scheduler sees it, already validated by the engine.
#[derive(Debug, Clone)]
pub struct NewSequence {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub pin_on_finish: bool,
    /// KV of the prompt computed elsewhere, plus the token sampled there.
    pub provided: Option<ProvidedKv>,
}

/// The prompt's KV in the hand-off format and the first generated token.
#[derive(Clone)]
pub struct ProvidedKv {
    pub data: Vec<u8>,
    pub first_token: u32,
}

impl std::fmt::Debug for ProvidedKv {
    // The payload can be megabytes: show its size, not its bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvidedKv")
            .field("data_len", &self.data.len())
            .field("first_token", &self.first_token)
            .finish()
    }
}

/// Everything one step does, in order: write provided KV, then run one
/// forward pass over `seqs` (each needs logits, so row `i` belongs to `seqs[i]`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StepPlan {
    pub kv_writes: Vec<KvWrite>,
    pub seqs: Vec<ScheduledSeq>,
}

/// Provided KV to copy into freshly allocated blocks before the forward pass.
#[derive(Clone, PartialEq, Eq)]
pub struct KvWrite {
    pub request_id: String,
    pub block_ids: Vec<u32>,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for KvWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvWrite")
            .field("request_id", &self.request_id)
            .field("block_ids", &self.block_ids)
            .field("data_len", &self.data.len())
            .finish()
    }
}

/// One sequence's share of the forward pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    pub request_id: String,
    /// The new tokens, at positions `context_start..`.
    pub tokens: Vec<u32>,
    pub context_start: usize,
    /// The sequence's prompt length (see [`crate::SeqChunk::prompt_len`]).
    pub prompt_len: usize,
    pub block_table: Vec<u32>,
}

impl StepPlan {
    /// Whether the step has nothing to do.
    pub fn is_empty(&self) -> bool {
        self.kv_writes.is_empty() && self.seqs.is_empty()
    }

    /// The forward batch of the step: every sequence needs logits.
    pub fn to_batch(&self) -> ForwardBatch {
        let mut batch = ForwardBatch::default();
        for s in &self.seqs {
            batch.push(&s.tokens, s.context_start, s.prompt_len, s.block_table.clone(), true);
        }
        batch
    }
}

#[derive(Debug)]
struct Sequence {
    id: String,
    /// Prompt, then every generated token (the last one not yet fed).
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Leading tokens of `tokens` whose KV is in `blocks`.
    num_computed: usize,
    /// Generated tokens, counting a provided first token.
    num_generated: usize,
    max_tokens: usize,
    stop_token_ids: Vec<u32>,
    pin_on_finish: bool,
    blocks: Vec<u32>,
    /// Taken at admission; a preempted sequence recomputes instead.
    provided_kv: Option<Vec<u8>>,
}

impl Sequence {
    fn chunk(&self) -> ScheduledSeq {
        ScheduledSeq {
            request_id: self.id.clone(),
            tokens: self.tokens[self.num_computed..].to_vec(),
            context_start: self.num_computed,
            prompt_len: self.prompt_len,
            block_table: self.blocks.clone(),
        }
    }

    /// `Length` if the sequence may not generate another token.
    fn length_limit(&self, max_model_len: usize) -> Option<FinishReason> {
        let done = self.num_generated >= self.max_tokens || self.tokens.len() >= max_model_len;
        done.then_some(FinishReason::Length)
    }
}

/// Waiting and running sequences, the blocks they own, and the blocks held
/// for remote decode.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    /// FCFS; preempted sequences go back to the front.
    waiting: VecDeque<Sequence>,
    /// In admission order: the last is the newest, the first to preempt.
    running: Vec<Sequence>,
    /// Blocks of finished `pin_on_finish` requests, until released.
    held: HashSet<u32>,
    events: Vec<(String, EngineEvent)>,
    num_preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        let blocks = BlockManager::new(config.num_blocks);
        Self {
            config,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            held: HashSet::new(),
            events: Vec::new(),
            num_preemptions: 0,
        }
    }

    /// Queues a request behind those already waiting.
    pub fn add(&mut self, new: NewSequence) {
        let prompt_len = new.prompt.len();
        let mut seq = Sequence {
            id: new.request_id,
            tokens: new.prompt,
            prompt_len,
            num_computed: 0,
            num_generated: 0,
            max_tokens: new.max_tokens,
            stop_token_ids: new.stop_token_ids,
            pin_on_finish: new.pin_on_finish,
            blocks: Vec::new(),
            provided_kv: None,
        };
        if let Some(p) = new.provided {
            // The first token counts as generated but is fed by the first step.
            seq.tokens.push(p.first_token);
            seq.num_generated = 1;
            seq.provided_kv = Some(p.data);
        }
        self.waiting.push_back(seq);
    }

    /// Plans the next step: makes room for every running sequence's next
    /// token (preempting the newest when blocks run out), then admits waiting
    /// sequences in order while blocks and `max_num_seqs` allow.
    ///
    /// No sequence is admitted in a step that preempted one while others keep
    /// running: the blocks just freed are what the running ones need next.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let preempted = self.reserve_running_blocks();
        plan.seqs.extend(self.running.iter().map(Sequence::chunk));
        if !preempted || self.running.is_empty() {
            self.admit(&mut plan);
        }
        plan
    }

    /// Records the tokens sampled for `plan` (`sampled[i]` for `plan.seqs[i]`)
    /// and finishes the sequences that stop.
    pub fn finish_step(&mut self, plan: &StepPlan, sampled: &[u32]) {
        debug_assert_eq!(plan.seqs.len(), sampled.len());
        for (chunk, &token) in plan.seqs.iter().zip(sampled) {
            // A sequence dropped since `schedule` no longer wants its token.
            let Some(pos) = self.running.iter().position(|s| s.id == chunk.request_id) else {
                continue;
            };
            let seq = &mut self.running[pos];
            seq.num_computed = seq.tokens.len();
            seq.tokens.push(token);
            seq.num_generated += 1;
            self.events.push((seq.id.clone(), EngineEvent::Token(token)));
            let stop = seq.stop_token_ids.contains(&token) || self.config.eos_token_ids.contains(&token);
            let reason = if stop { Some(FinishReason::Stop) } else { seq.length_limit(self.config.max_model_len) };
            if let Some(reason) = reason {
                let seq = self.running.remove(pos);
                self.finish(seq, reason);
            }
        }
    }

    /// Ends a request at the client's wish: everything it owns is freed and it
    /// hears `Finished { Abort }`. False if the request is not here.
    pub fn abort(&mut self, request_id: &str) -> bool {
        let Some(seq) = self.take(request_id) else {
            return false;
        };
        tracing::debug!(request_id, "aborted");
        self.blocks.free(&seq.blocks);
        let event = EngineEvent::Finished {
            reason: FinishReason::Abort,
            pinned_blocks: None,
            num_prompt_tokens: seq.prompt_len,
        };
        self.events.push((seq.id, event));
        true
    }

    /// Drops a request silently (nobody is listening any more).
    pub fn remove(&mut self, request_id: &str) -> bool {
        let Some(seq) = self.take(request_id) else {
            return false;
        };
        tracing::debug!(request_id, "dropped: its receiver is gone");
        self.blocks.free(&seq.blocks);
        true
    }

    /// Ends requests with an error (a failed forward pass): each hears
    /// `Error(message)` and its blocks are freed.
    pub fn fail(&mut self, request_ids: &[&str], message: &str) {
        for &id in request_ids {
            if let Some(seq) = self.take(id) {
                self.blocks.free(&seq.blocks);
                self.events.push((seq.id, EngineEvent::Error(message.to_string())));
            }
        }
    }

    /// Frees held blocks. Ids not held (already released, never pinned) are
    /// ignored with a warning: freeing them could free a running sequence's block.
    pub fn release(&mut self, block_ids: &[u32]) {
        for &id in block_ids {
            if self.held.remove(&id) {
                self.blocks.free(&[id]);
            } else {
                tracing::warn!(block = id, "release of a block that is not held");
            }
        }
    }

    /// What requests must hear since the last call, in order. `Finished` and
    /// `Error` are each request's last event.
    pub fn take_events(&mut self) -> Vec<(String, EngineEvent)> {
        std::mem::take(&mut self.events)
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.blocks.num_free()
    }

    pub fn num_held_blocks(&self) -> usize {
        self.held.len()
    }

    pub fn num_total_blocks(&self) -> usize {
        self.blocks.num_total()
    }

    /// Preemptions so far.
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// Gives each running sequence, oldest first, the blocks its next token
    /// needs, preempting from the newest end when none are free. True if
    /// anything was preempted.
    fn reserve_running_blocks(&mut self) -> bool {
        let bs = self.config.block_size;
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() {
            let seq = &self.running[i];
            let need = blocks_for(seq.tokens.len(), bs).saturating_sub(seq.blocks.len());
            if need == 0 {
                i += 1;
                continue;
            }
            match self.blocks.allocate(need) {
                Some(ids) => {
                    self.running[i].blocks.extend(ids);
                    i += 1;
                }
                None => {
                    // The newest goes, possibly sequence `i` itself, which
                    // ends the loop since `i == running.len()` then.
                    let victim = self.running.pop().expect("sequence i is running");
                    self.preempt(victim);
                    preempted = true;
                }
            }
        }
        preempted
    }

    /// Frees a sequence's blocks and queues it first for recompute. Its
    /// generated tokens stay in `tokens`, so recompute feeds them as prompt
    /// and nothing is emitted twice.
    fn preempt(&mut self, mut seq: Sequence) {
        tracing::debug!(request_id = %seq.id, num_tokens = seq.tokens.len(), "preempted for recompute");
        self.blocks.free(&seq.blocks);
        seq.blocks.clear();
        seq.num_computed = 0;
        seq.provided_kv = None;
        self.num_preemptions += 1;
        self.waiting.push_front(seq);
    }

    /// Moves waiting sequences to running, in order, while they fit.
    fn admit(&mut self, plan: &mut StepPlan) {
        let bs = self.config.block_size;
        while self.running.len() < self.config.max_num_seqs {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            let needed = blocks_for(seq.tokens.len(), bs);
            if let Some(error) = self.never_admissible(seq, needed) {
                let seq = self.waiting.pop_front().expect("front exists");
                tracing::debug!(request_id = %seq.id, %error, "rejected at admission");
                self.events.push((seq.id, EngineEvent::Error(error)));
                continue;
            }
            // Strict FCFS: a large request at the front waits for room rather
            // than being overtaken forever by small ones.
            let Some(ids) = self.blocks.allocate(needed) else {
                break;
            };
            let mut seq = self.waiting.pop_front().expect("front exists");
            seq.blocks = ids;
            tracing::debug!(request_id = %seq.id, num_tokens = seq.tokens.len(), num_blocks = needed, "admitted");
            if let Some(data) = seq.provided_kv.take() {
                let block_ids = seq.blocks[..blocks_for(seq.prompt_len, bs)].to_vec();
                plan.kv_writes.push(KvWrite { request_id: seq.id.clone(), block_ids, data });
                seq.num_computed = seq.prompt_len;
                // The provided first token may already be the last one allowed.
                if let Some(reason) = seq.length_limit(self.config.max_model_len) {
                    self.finish(seq, reason);
                    continue;
                }
            }
            plan.seqs.push(seq.chunk());
            self.running.push(seq);
        }
    }

    /// Why a waiting sequence can never run, if so.
    fn never_admissible(&self, seq: &Sequence, needed: usize) -> Option<String> {
        if needed > self.config.num_blocks {
            return Some(format!(
                "sequence of {} tokens needs {needed} KV blocks of {} tokens, the whole cache has {}",
                seq.tokens.len(),
                self.config.block_size,
                self.config.num_blocks
            ));
        }
        if let Some(data) = &seq.provided_kv {
            let blocks = blocks_for(seq.prompt_len, self.config.block_size);
            let expected = blocks * self.config.block_bytes;
            if data.len() != expected {
                return Some(format!(
                    "provided KV of {} bytes for a prompt of {} tokens, expected {expected} ({blocks} blocks of {} bytes)",
                    data.len(),
                    seq.prompt_len,
                    self.config.block_bytes
                ));
            }
        }
        None
    }

    /// Ends a sequence normally: with `pin_on_finish` the blocks covering the
    /// prompt become held (and are reported), the rest are freed.
    fn finish(&mut self, seq: Sequence, reason: FinishReason) {
        let pinned_blocks = if seq.pin_on_finish {
            let n = blocks_for(seq.prompt_len, self.config.block_size);
            let (pinned, rest) = seq.blocks.split_at(n);
            self.blocks.free(rest);
            self.held.extend(pinned.iter().copied());
            Some(pinned.to_vec())
        } else {
            self.blocks.free(&seq.blocks);
            None
        };
        tracing::debug!(request_id = %seq.id, ?reason, num_generated = seq.num_generated, ?pinned_blocks, "finished");
        let event = EngineEvent::Finished { reason, pinned_blocks, num_prompt_tokens: seq.prompt_len };
        self.events.push((seq.id, event));
    }

    /// Removes a sequence from whichever queue holds it.
    fn take(&mut self, request_id: &str) -> Option<Sequence> {
        if let Some(pos) = self.running.iter().position(|s| s.id == request_id) {
            return Some(self.running.remove(pos));
        }
        let pos = self.waiting.iter().position(|s| s.id == request_id)?;
        self.waiting.remove(pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(num_blocks: usize, max_num_seqs: usize) -> SchedulerConfig {
        SchedulerConfig {
            max_num_seqs,
            max_model_len: 64,
            block_size: 4,
            num_blocks,
            block_bytes: 8,
            eos_token_ids: vec![99],
        }
    }

    fn seq(id: &str, prompt: &[u32], max_tokens: usize) -> NewSequence {
        NewSequence {
            request_id: id.into(),
            prompt: prompt.to_vec(),
            max_tokens,
            stop_token_ids: vec![],
            pin_on_finish: false,
            provided: None,
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
        assert_eq!(events[0], ("a".into(), EngineEvent::Token(10)));
        assert_eq!(events.len(), 5);
        assert_eq!(events[2], ("a".into(), EngineEvent::Token(99)));
        assert_eq!(
            events[3],
            (
                "a".into(),
                EngineEvent::Finished { reason: FinishReason::Stop, pinned_blocks: None, num_prompt_tokens: 3 }
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

        // `old` finishes; `new` is recomputed from prompt + its token 20.
        s.finish_step(&plan, &[99]);
        let plan = s.schedule();
        assert_eq!(shape(&plan), vec![("new", 0, 5)]);
        assert_eq!(plan.seqs[0].tokens, vec![5, 6, 7, 8, 20]);
        let tokens: Vec<_> = s.take_events().into_iter().filter(|(id, _)| id == "new").map(|(_, e)| e).collect();
        assert_eq!(tokens, vec![EngineEvent::Token(20)], "the token is not emitted twice");
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
        assert!(matches!(&last.1, EngineEvent::Error(m) if m.contains("needs 3 KV blocks")), "{last:?}");
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
                reason: FinishReason::Length,
                pinned_blocks: Some(vec![0, 1]),
                num_prompt_tokens: 8
            }
        );
        assert_eq!((s.num_held_blocks(), s.num_free_blocks()), (2, 6));
        s.release(&[1, 5]);
        assert_eq!((s.num_held_blocks(), s.num_free_blocks()), (1, 7));
        s.release(&[0, 0]);
        assert_eq!((s.num_held_blocks(), s.num_free_blocks()), (0, 8));
    }

    #[test]
    fn provided_kv_is_written_and_the_first_token_is_fed() {
        let mut s = Scheduler::new(config(8, 4));
        let provided = ProvidedKv { data: vec![0; 16], first_token: 42 };
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
        assert_eq!(events[..2], [EngineEvent::Token(43), EngineEvent::Token(44)]);
        assert!(matches!(events[2], EngineEvent::Finished { reason: FinishReason::Length, .. }));
    }

    #[test]
    fn provided_kv_of_the_wrong_size_is_an_error_and_frees_nothing_twice() {
        let mut s = Scheduler::new(config(8, 4));
        let provided = ProvidedKv { data: vec![0; 15], first_token: 42 };
        s.add(NewSequence { provided: Some(provided), ..seq("d", &[1, 2, 3, 4, 5], 3) });
        s.add(seq("ok", &[1], 3));
        let plan = s.schedule();
        assert_eq!(shape(&plan), vec![("ok", 0, 1)]);
        let (id, event) = s.take_events().remove(0);
        assert_eq!(id, "d");
        assert!(
            matches!(&event, EngineEvent::Error(m) if m.contains("15 bytes") && m.contains("expected 16")),
            "{event:?}"
        );
        assert_eq!(s.num_free_blocks(), 7);
    }

    #[test]
    fn a_provided_first_token_can_be_the_last() {
        let mut s = Scheduler::new(config(8, 4));
        let provided = ProvidedKv { data: vec![0; 8], first_token: 42 };
        s.add(NewSequence { provided: Some(provided), ..seq("d", &[1, 2], 1) });
        let plan = s.schedule();
        assert!(plan.seqs.is_empty());
        assert_eq!(plan.kv_writes.len(), 1);
        let events = s.take_events();
        assert_eq!(
            events,
            vec![(
                "d".into(),
                EngineEvent::Finished { reason: FinishReason::Length, pinned_blocks: None, num_prompt_tokens: 2 }
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
                EngineEvent::Finished { reason: FinishReason::Abort, pinned_blocks: None, num_prompt_tokens: 5 }
            )]
        );
    }

    #[test]
    fn a_failed_step_errors_its_sequences() {
        let mut s = Scheduler::new(config(4, 4));
        s.add(seq("a", &[1], 8));
        let plan = s.schedule();
        let ids: Vec<&str> = plan.seqs.iter().map(|s| s.request_id.as_str()).collect();
        s.fail(&ids, "boom");
        assert_eq!(s.take_events(), vec![("a".into(), EngineEvent::Error("boom".into()))]);
        assert_eq!(s.num_free_blocks(), 4);
    }
}

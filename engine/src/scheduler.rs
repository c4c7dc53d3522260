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
//! Each step feeds every scheduled sequence some of its new tokens, and
//! samples one token from the logits of the last one only when the chunk
//! reaches the end of `tokens`. A fresh prompt has all tokens new (a
//! prefill), a running sequence has one (a decode), a preempted sequence has
//! all of prompt + generated again (recompute), and a sequence whose prompt KV
//! came from a prefill worker starts with only the first token new.
//!
//! # Token budget and chunked prefill
//!
//! A step feeds at most `max_num_batched_tokens` tokens in all. Decodes are
//! served first, so a long prompt never stalls running sequences; prefills
//! (partly prefilled running sequences, then admitted waiting ones) share
//! what is left, each cut to the remaining budget:
//!
//! ```text
//! budget 8:   | d d d | p p p p p |
//!               ^ one token per decode
//!                       ^ prefill chunk, cut at the budget
//!
//! long prompt:  | chunk 1 (step 1) | chunk 2 (step 2) | last (step 3) |
//!                  no logits          no logits          logits: sample
//! ```
//!
//! A partly prefilled sequence is running (it owns the blocks of its
//! computed tokens) and gets blocks chunk by chunk. Only its last chunk has
//! logits and samples the first generated token.
//!
//! # Priority
//!
//! Waiting sequences are ordered by `(priority, arrival)`: lower priority
//! values first, ties first come first served. When blocks run out for a
//! running sequence, the running sequence with the worst `(priority,
//! arrival)` (highest value, then latest arrival) is preempted, possibly the
//! one asking; so a sequence is never preempted for a worse one. Admission
//! never preempts.
//!
//! # Prefix caching
//!
//! At admission a computed sequence looks up the chained, salted hashes of
//! its full blocks (`prompt::block_hash`) and reuses the longest cached run
//! of them (one more reference each): those tokens start computed. At least
//! the last token is always fed, so a prompt made only of cached full blocks
//! recomputes its last block. After each step, every block whose tokens all
//! have KV (prompt or generated) is registered under its hash; provided KV is
//! registered the same way once its first step ran. Finishing, aborting and
//! preempting drop references; unowned cached blocks stay reusable until
//! evicted (see [`block_manager`]).
//!
//! # Parallel sampling (`n > 1`)
//!
//! A request with `n` choices is one sequence until its prompt is computed,
//! so the prompt is prefilled once. The step that computes the prompt's last
//! token samples `n` tokens from that one logits row, and the sequence forks:
//! choice 0 keeps the blocks, every other choice shares the prompt's full
//! blocks (one more reference each) and gets a copy of the last, partial
//! block, which it will write its own tokens into ([`Scheduler::take_block_copies`]
//! for the engine to apply before the next forward pass). From there each
//! choice is a sequence of its own: it stops, is preempted and recomputed
//! (prompt + its own tokens) alone. With provided KV the fork happens at
//! admission, from the `n` first tokens the prefill worker sampled. A choice
//! that cannot get its partial block at the fork is queued for recompute.
//! A request admitted with `n` choices reserves `n` of `max_num_seqs`.
//!
//! The step plan's types are in `plan`, one sequence's state in `sequence`, and block ref counts
//! and the prefix cache in [`block_manager`].

pub mod block_manager;
mod plan;
mod sequence;
mod speculate;

pub use plan::{BlockCopy, KvWrite, SampledToken, ScheduledSeq, StepPlan};
pub use speculate::{NgramLookup, SpeculativeConfig, SpeculativeConfigError, SpeculativeMethod};

use crate::request::{EngineEvent, FailureKind, FinishReason, Pooling, RequestError};
use crate::sampler::TokenLogprobs;
use block_manager::{blocks_for, BlockManager, KvEvent};
use prompt::block_hash::extend_block_hashes;
use sequence::{Pooled, Sequence};
use std::collections::{HashMap, VecDeque};

/// Limits the scheduler works within.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Most sequences running at once (in one batch).
    pub max_num_seqs: usize,
    /// Most tokens fed to one forward pass, decodes and prefill chunks
    /// together (at least 1).
    pub max_num_batched_tokens: usize,
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
    /// Reuse cached full blocks of earlier sequences with the same salted
    /// prefix (see [`Scheduler::schedule`]); off: every prompt is computed.
    pub enable_prefix_caching: bool,
    /// Admit a prompt only when all of it fits in the step (an encoder's, whose tokens attend
    /// to the ones after them); off: prompts are prefilled in chunks.
    pub whole_prompts: bool,
    /// Feed each decode its draft tokens too, for the step to verify (see
    /// [`ScheduledSeq::drafts`]); `None`: one token per decode.
    pub speculative: Option<SpeculativeConfig>,
}

/// A request as the scheduler sees it, already validated by the engine.
#[derive(Debug, Clone)]
pub struct NewSequence {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    /// Do not stop at `SchedulerConfig::eos_token_ids`.
    pub ignore_eos: bool,
    /// Stop and eos tokens do not stop the first `min_tokens` generated
    /// tokens (the sampler masks them too).
    pub min_tokens: usize,
    pub pin_on_finish: bool,
    /// Salts the block hashes: only sequences with the same salt share
    /// cached blocks (the request's `cache_salt` bytes, empty if none).
    pub cache_salt: Vec<u8>,
    /// KV of the prompt computed elsewhere, plus the tokens sampled there.
    pub provided: Option<ProvidedKv>,
    /// Lower values are served first; ties by arrival.
    pub priority: i32,
    /// Choices (at least 1) that share the prompt (see the module docs).
    pub n: usize,
    /// Report the prompt's logprobs (with this many top tokens): the prompt is computed whole,
    /// with a logits row per token.
    pub prompt_logprobs: Option<u32>,
    /// Embed instead of generating (see [`crate::EngineRequest::pooling`]): the sequence ends,
    /// with an `Embedding` event, once its prompt is computed.
    pub pooling: Option<Pooling>,
}

/// The prompt's KV computed elsewhere and the first generated token of each
/// choice (`n` of them, choice order).
#[derive(Debug, Clone)]
pub struct ProvidedKv {
    pub kv: ProvidedData,
    pub first_tokens: Vec<u32>,
}

/// Where provided KV is.
#[derive(Clone)]
pub enum ProvidedData {
    /// In the hand-off format, to copy into blocks allocated at admission.
    Bytes(Vec<u8>),
    /// Already in these blocks (from [`Scheduler::reserve`]), one per
    /// `block_size` prompt tokens: the sequence owns them from
    /// [`Scheduler::add`] on.
    InBlocks(Vec<u32>),
}

impl std::fmt::Debug for ProvidedData {
    // The payload can be megabytes: show its size, not its bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProvidedData::Bytes(data) => f.debug_struct("Bytes").field("len", &data.len()).finish(),
            ProvidedData::InBlocks(ids) => f.debug_tuple("InBlocks").field(ids).finish(),
        }
    }
}

/// Waiting and running sequences, the blocks they own, and the blocks held
/// for remote decode.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    /// Ordered by `Sequence::rank`; preempted sequences keep their rank.
    waiting: VecDeque<Sequence>,
    /// In admission order, partly prefilled ones included.
    running: Vec<Sequence>,
    /// Pins of finished `pin_on_finish` requests, until released: each
    /// reported block list, with how many outstanding pins reported exactly
    /// that list. A pin owns one reference on each of its blocks.
    pins: HashMap<Vec<u32>, u32>,
    /// How many outstanding pins hold each block. With prefix caching two
    /// requests may pin the same (shared prefix) block.
    held: HashMap<u32, u32>,
    events: Vec<(String, EngineEvent)>,
    /// Copies of forks made in `finish_step`, for the engine to apply at once.
    block_copies: Vec<BlockCopy>,
    num_preemptions: u64,
    num_arrivals: u64,
    speculation: SpeculationStats,
}

/// What speculative decoding did since start (vLLM's `spec_decode` counters): acceptance is
/// `num_accepted_tokens / num_draft_tokens`, tokens per verifying forward pass
/// `1 + num_accepted_tokens / num_drafts`, and tokens per forward pass of a decoding sequence,
/// drafting or not, `1 + num_accepted_tokens / num_decode_steps`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpeculationStats {
    /// Forward passes of a sequence past its prompt (each generates one token, and the drafts it
    /// accepted if it verified any), with speculation or without.
    pub num_decode_steps: u64,
    /// Decode steps that verified drafts.
    pub num_drafts: u64,
    /// Draft tokens verified.
    pub num_draft_tokens: u64,
    /// Draft tokens accepted (as vLLM counts them, those accepted after a token that ended the
    /// sequence too).
    pub num_accepted_tokens: u64,
    /// Draft tokens verified by position in their step's drafts (index 0: the first draft).
    pub num_draft_tokens_per_pos: Vec<u64>,
    /// Draft tokens accepted by position (vLLM's `num_accepted_tokens_per_pos`): over
    /// `num_draft_tokens_per_pos`, how acceptance falls along the drafts, which picks
    /// `num_speculative_tokens`.
    pub num_accepted_tokens_per_pos: Vec<u64>,
}

impl SpeculationStats {
    /// The counters' growth since `before` (an earlier reading of the same counters).
    pub fn since(&self, before: &Self) -> Self {
        self.zip(before, |now, then| now - then)
    }

    /// Both counts together.
    pub fn plus(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a + b)
    }

    fn zip(&self, other: &Self, f: impl Fn(u64, u64) -> u64) -> Self {
        let per_pos = |a: &[u64], b: &[u64]| {
            (0..a.len().max(b.len()))
                .map(|i| f(a.get(i).copied().unwrap_or(0), b.get(i).copied().unwrap_or(0)))
                .collect()
        };
        Self {
            num_decode_steps: f(self.num_decode_steps, other.num_decode_steps),
            num_drafts: f(self.num_drafts, other.num_drafts),
            num_draft_tokens: f(self.num_draft_tokens, other.num_draft_tokens),
            num_accepted_tokens: f(self.num_accepted_tokens, other.num_accepted_tokens),
            num_draft_tokens_per_pos: per_pos(&self.num_draft_tokens_per_pos, &other.num_draft_tokens_per_pos),
            num_accepted_tokens_per_pos: per_pos(&self.num_accepted_tokens_per_pos, &other.num_accepted_tokens_per_pos),
        }
    }

    /// Counts a verifying step of `drafted` drafts that accepted the first `accepted`.
    fn verified(&mut self, drafted: usize, accepted: usize) {
        self.num_drafts += 1;
        self.num_draft_tokens += drafted as u64;
        self.num_accepted_tokens += accepted as u64;
        for (counts, n) in
            [(&mut self.num_draft_tokens_per_pos, drafted), (&mut self.num_accepted_tokens_per_pos, accepted)]
        {
            if counts.len() < n {
                counts.resize(n, 0);
            }
            counts[..n].iter_mut().for_each(|c| *c += 1);
        }
    }
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        let blocks = BlockManager::new(config.num_blocks, config.enable_prefix_caching);
        Self {
            config,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            pins: HashMap::new(),
            held: HashMap::new(),
            events: Vec::new(),
            block_copies: Vec::new(),
            num_preemptions: 0,
            num_arrivals: 0,
            speculation: SpeculationStats::default(),
        }
    }

    /// Queues a request behind those already waiting with a priority as
    /// good as its own.
    pub fn add(&mut self, new: NewSequence) {
        let prompt_len = new.prompt.len();
        let mut seq = Sequence {
            id: new.request_id,
            choice: 0,
            fork: new.n.max(1),
            provided_forks: Vec::new(),
            tokens: new.prompt,
            prompt_len,
            num_computed: 0,
            num_generated: 0,
            max_tokens: new.max_tokens,
            stop_token_ids: new.stop_token_ids,
            ignore_eos: new.ignore_eos,
            min_tokens: new.min_tokens,
            pin_on_finish: new.pin_on_finish,
            blocks: Vec::new(),
            provided_kv: None,
            cache_salt: new.cache_salt,
            hashes: Vec::new(),
            num_registered: 0,
            num_cached_tokens: None,
            priority: new.priority,
            arrival: self.num_arrivals,
            prompt_logprobs: new.prompt_logprobs,
            // Position 0 has no logprob: nothing comes before it.
            prompt_logprobs_next: 1,
            pooling: new.pooling.map(|pooling| Pooled { pooling, sum: Vec::new(), rows: 0 }),
            speculation: Default::default(),
            draft_lag: None,
        };
        self.num_arrivals += 1;
        if let Some(p) = new.provided {
            // The first token counts as generated but is fed by the first step.
            let mut firsts = p.first_tokens.into_iter();
            seq.tokens.extend(firsts.next());
            seq.num_generated = 1;
            seq.provided_kv = Some(match p.kv {
                ProvidedData::Bytes(data) => Some(data),
                ProvidedData::InBlocks(ids) => {
                    seq.blocks = ids;
                    None
                }
            });
            seq.provided_forks = firsts.collect();
        }
        self.enqueue(seq);
    }

    /// Plans the next step within the token budget: one token for each
    /// running decode, then the next chunk of each partly prefilled running
    /// sequence, then admits waiting sequences in order while the budget,
    /// blocks and `max_num_seqs` allow (see the module docs). When blocks run
    /// out for a running sequence, the worst-ranked running one is preempted.
    ///
    /// No sequence is admitted in a step that preempted one while others keep
    /// running: the blocks just freed are what the running ones need next.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.config.max_num_batched_tokens;
        let preempted = self.schedule_running(&mut plan, &mut budget);
        if !preempted || self.running.is_empty() {
            self.admit(&mut plan, &mut budget);
        }
        self.defer_draft_prefill(&mut plan);
        debug_assert!(plan.num_tokens() <= self.config.max_num_batched_tokens);
        plan
    }

    /// Records a finished step: the KV of every chunk is now computed, and
    /// `sampled[i]` is the token of the `i`-th sequence of `plan` with
    /// `need_logits`. Finishes the sequences that stop.
    pub fn finish_step(&mut self, plan: &StepPlan, sampled: &[u32]) {
        let mut sampled = sampled.iter().map(|&id| SampledToken { id, logprobs: None });
        let per_chunk = plan
            .seqs
            .iter()
            .map(
                |chunk| {
                    if chunk.need_logits {
                        sampled.by_ref().take(chunk.choices.len()).collect()
                    } else {
                        Vec::new()
                    }
                },
            )
            .collect();
        self.finish_step_with(plan, per_chunk);
    }

    /// [`Self::finish_step`] with each token's logprobs, which its `Token`
    /// event carries: `sampled[i]` holds the tokens of `plan.seqs[i]`, none for a chunk
    /// without logits, `chunk.choices.len()` (in choice order) for one with, more than one
    /// forking the sequence (see the module docs); for a chunk with drafts, the drafts it
    /// accepted and the token that followed them.
    pub fn finish_step_with(&mut self, plan: &StepPlan, sampled: Vec<Vec<SampledToken>>) {
        debug_assert_eq!(plan.seqs.len(), sampled.len());
        for (chunk, tokens) in plan.seqs.iter().zip(sampled) {
            // A sequence dropped since `schedule` no longer wants its token.
            let Some(pos) = self.running.iter().position(|s| s.is(&chunk.request_id, chunk.choices.start)) else {
                continue;
            };
            if chunk.need_logits && chunk.context_start >= chunk.prompt_len {
                self.speculation.num_decode_steps += 1;
            }
            if !chunk.drafts.is_empty() {
                self.finish_verified(pos, chunk, tokens);
                continue;
            }
            let seq = &mut self.running[pos];
            if !chunk.draft_kv {
                seq.draft_lag.get_or_insert(chunk.context_start);
            }
            seq.num_computed = chunk.context_start + chunk.tokens.len();
            register_computed_blocks(&mut self.blocks, seq, self.config.block_size);
            if seq.num_computed == seq.tokens.len() {
                if let Some(pooled) = &seq.pooling {
                    let event = EngineEvent::Embedding(pooled.vector());
                    let seq = self.running.remove(pos);
                    self.events.push((seq.id.clone(), event));
                    self.finish(seq, FinishReason::Stop);
                    continue;
                }
            }
            let mut tokens = tokens.into_iter();
            let Some(first) = tokens.next() else {
                continue;
            };
            // Choices 1.. fork off before choice 0 may finish and free the
            // blocks they share.
            let forks: Vec<SampledToken> = tokens.collect();
            if !forks.is_empty() {
                let parent = self.running[pos].clone();
                self.running[pos].fork = 1;
                for (i, token) in forks.into_iter().enumerate() {
                    self.start_fork(&parent, i as u32 + 1, token);
                }
            }
            self.emit(pos, first);
        }
    }

    /// A speculative decode's tokens: the drafts it accepted (their KV, written by this step,
    /// now counts as computed), then the token that followed them. The rejected drafts' KV stays
    /// past `num_computed`, in blocks the sequence holds, and is overwritten by its next step.
    fn finish_verified(&mut self, pos: usize, chunk: &ScheduledSeq, tokens: Vec<SampledToken>) {
        let accepted = tokens.len().saturating_sub(1);
        debug_assert!(tokens.iter().zip(&chunk.drafts).take(accepted).all(|(t, &d)| t.id == d));
        // As vLLM counts them: drafts accepted after a token that ends the sequence too.
        self.speculation.verified(chunk.drafts.len(), accepted);
        let seq = &mut self.running[pos];
        // The draft caught up and wrote its KV for every token fed: complete again.
        if let Some(lag) = seq.draft_lag.take() {
            self.blocks.clear_draft_stale(&seq.blocks[lag / self.config.block_size..]);
        }
        seq.speculation.verified(accepted, seq.num_generated + accepted + 1);
        seq.num_computed = chunk.context_start + 1;
        for (i, token) in tokens.into_iter().enumerate() {
            if i < accepted {
                self.running[pos].num_computed += 1;
            }
            if !self.emit(pos, token) {
                return;
            }
        }
        register_computed_blocks(&mut self.blocks, &mut self.running[pos], self.config.block_size);
    }

    /// Appends a generated token to running sequence `pos` and tells its request, then finishes
    /// the sequence if the token ends it (its computed full blocks registered first, as accepted
    /// drafts may have filled one). False when it did.
    fn emit(&mut self, pos: usize, token: SampledToken) -> bool {
        let seq = &mut self.running[pos];
        seq.tokens.push(token.id);
        seq.num_generated += 1;
        let num_cached_tokens = seq.num_cached_tokens.unwrap_or(0);
        let event = EngineEvent::Token { index: seq.choice, id: token.id, logprobs: token.logprobs, num_cached_tokens };
        self.events.push((seq.id.clone(), event));
        match self.stop_reason(&self.running[pos], token.id) {
            Some(reason) => {
                register_computed_blocks(&mut self.blocks, &mut self.running[pos], self.config.block_size);
                let seq = self.running.remove(pos);
                self.finish(seq, reason);
                false
            }
            None => true,
        }
    }

    /// Reports the prompt logprobs that `chunk`'s rows give (`row(i)` is the raw logits row of its
    /// token `i`, which predicts position `chunk.context_start + i + 1`), for the prompt
    /// positions not reported yet.
    pub fn report_prompt_logprobs<'a>(&mut self, chunk: &ScheduledSeq, row: impl Fn(usize) -> &'a [f32]) {
        let Some(seq) = self.running.iter_mut().find(|s| s.is(&chunk.request_id, chunk.choices.start)) else {
            return;
        };
        let Some(k) = seq.prompt_logprobs else { return };
        // A row predicts the token after it: the chunk covers positions after its first token.
        let start = seq.prompt_logprobs_next.max(chunk.context_start + 1);
        let end = (chunk.context_start + chunk.tokens.len() + 1).min(seq.prompt_len);
        if start >= end {
            return;
        }
        let logprobs = (start..end)
            .map(|p| TokenLogprobs::from_logits(row(p - chunk.context_start - 1), seq.tokens[p], k as usize))
            .collect();
        seq.prompt_logprobs_next = end;
        self.events.push((seq.id.clone(), EngineEvent::PromptLogprobs { start, logprobs }));
    }

    /// Takes the final hidden states `chunk` asked for (see [`ScheduledSeq::hidden`]) into its
    /// embedding's pooling, before [`Self::finish_step_with`] ends the sequence.
    pub fn report_hidden(&mut self, chunk: &ScheduledSeq, rows: &[Vec<f32>]) {
        let Some(seq) = self.running.iter_mut().find(|s| s.is(&chunk.request_id, chunk.choices.start)) else {
            return;
        };
        if let Some(pooled) = &mut seq.pooling {
            pooled.take(chunk.context_start, rows);
        }
    }

    /// Why a sequence that just generated `token` ends, if it does.
    fn stop_reason(&self, seq: &Sequence, token: u32) -> Option<FinishReason> {
        let stop = seq.num_generated > seq.min_tokens
            && (seq.stop_token_ids.contains(&token) || (!seq.ignore_eos && self.config.eos_token_ids.contains(&token)));
        if stop {
            Some(FinishReason::Stop)
        } else {
            seq.length_limit(self.config.max_model_len)
        }
    }

    /// Choice `choice` of `parent` (whose prompt is computed and whose own
    /// first token is not pushed yet) with its first token sampled: emits the
    /// token, then finishes the choice or runs it (its block copy queued in
    /// `block_copies`) or queues it for recompute when no block is free.
    fn start_fork(&mut self, parent: &Sequence, choice: u32, token: SampledToken) {
        let mut child = self.fork_child(parent, choice, token.id);
        let num_cached_tokens = child.num_cached_tokens.unwrap_or(0);
        let event = EngineEvent::Token { index: choice, id: token.id, logprobs: token.logprobs, num_cached_tokens };
        self.events.push((child.id.clone(), event));
        if let Some(reason) = self.stop_reason(&child, token.id) {
            self.finish(child, reason);
            return;
        }
        let mut copies = Vec::new();
        if self.share_prompt_blocks(parent, &mut child, &mut copies) {
            self.block_copies.extend(copies);
            self.running.push(child);
        } else {
            self.num_preemptions += 1;
            self.enqueue(child);
        }
    }

    /// Choice `choice` of `parent`: the prompt, then `first`; no blocks yet.
    fn fork_child(&self, parent: &Sequence, choice: u32, first: u32) -> Sequence {
        let mut child = parent.clone();
        child.choice = choice;
        child.fork = 1;
        child.provided_forks = Vec::new();
        child.provided_kv = None;
        child.tokens.truncate(parent.prompt_len);
        child.tokens.push(first);
        child.num_generated = 1;
        child.blocks = Vec::new();
        child.num_computed = 0;
        child.num_registered = 0;
        // The prompt's blocks (shared or copied) lack the draft's KV where the parent's did.
        child.draft_lag = parent.draft_lag;
        child
    }

    /// Gives `child` the parent's prompt KV: a reference on each full prompt
    /// block and a fresh copy of the partial one (pushed to `copies`). False,
    /// with nothing held, when no block is free for the copy.
    fn share_prompt_blocks(&mut self, parent: &Sequence, child: &mut Sequence, copies: &mut Vec<BlockCopy>) -> bool {
        let bs = self.config.block_size;
        let full = parent.prompt_len / bs;
        let mut blocks = parent.blocks[..full].to_vec();
        if !parent.prompt_len.is_multiple_of(bs) {
            let Some(fresh) = self.blocks.allocate(1) else {
                return false;
            };
            copies.push(BlockCopy { src: parent.blocks[full], dst: fresh[0] });
            blocks.extend(fresh);
        }
        self.blocks.retain(&parent.blocks[..full]);
        child.blocks = blocks;
        child.num_computed = parent.prompt_len;
        child.num_registered = parent.num_registered.min(full);
        child.hashes.truncate(full);
        true
    }

    /// Block copies of forks made by [`Self::finish_step_with`], to apply to
    /// the KV storage before anything else allocates (their sources may have
    /// been freed by a choice that finished in the same step).
    pub fn take_block_copies(&mut self) -> Vec<BlockCopy> {
        std::mem::take(&mut self.block_copies)
    }

    /// Ends a request at the client's wish: everything it owns is freed and it
    /// hears `Finished { Abort }`. False if the request is not here.
    /// Every choice still here hears it.
    pub fn abort(&mut self, request_id: &str) -> bool {
        let seqs = self.take_all(request_id);
        if seqs.is_empty() {
            return false;
        }
        tracing::debug!(request_id, "aborted");
        for seq in seqs {
            self.blocks.free_table(&seq.blocks);
            for index in seq.choices() {
                let event = EngineEvent::Finished {
                    index,
                    reason: FinishReason::Abort,
                    pinned_blocks: None,
                    num_prompt_tokens: seq.prompt_len,
                    num_cached_tokens: seq.num_cached_tokens.unwrap_or(0),
                };
                self.events.push((seq.id.clone(), event));
            }
        }
        true
    }

    /// Drops a request silently (nobody is listening any more).
    pub fn remove(&mut self, request_id: &str) -> bool {
        let seqs = self.take_all(request_id);
        if seqs.is_empty() {
            return false;
        }
        tracing::debug!(request_id, "dropped: its receiver is gone");
        for seq in seqs {
            self.blocks.free_table(&seq.blocks);
        }
        true
    }

    /// Ends requests with an error (a failed forward pass): each hears
    /// `Error(error)` and its blocks are freed.
    pub fn fail(&mut self, request_ids: &[&str], error: &RequestError) {
        for &id in request_ids {
            let seqs = self.take_all(id);
            if seqs.is_empty() {
                continue;
            }
            for seq in &seqs {
                self.blocks.free_table(&seq.blocks);
            }
            self.events.push((id.to_string(), EngineEvent::Error(error.clone())));
        }
    }

    /// Ends one pin: `block_ids` must be a whole `Finished.pinned_blocks`
    /// list, and each of its blocks loses that pin's reference. A list that
    /// no outstanding pin reported (already released, never pinned, a part of
    /// a pin) is ignored with a warning, so a retried release is harmless and
    /// can never free a running sequence's block, nor a block that another
    /// pin sharing a prefix with it still holds.
    ///
    /// Contract: each `Finished.pinned_blocks` list is released once by its
    /// owner (the kv-transfer connector does so exactly once). Two pins can
    /// only report the very same list for the same salted prompt, and then
    /// their references are interchangeable; only releasing such a list more
    /// times than it was pinned would take the other owner's pin.
    pub fn release(&mut self, block_ids: &[u32]) {
        let Some(count) = self.pins.get_mut(block_ids) else {
            tracing::warn!(blocks = ?block_ids, "release of blocks that no pin holds");
            return;
        };
        *count -= 1;
        if *count == 0 {
            self.pins.remove(block_ids);
        }
        for &id in block_ids {
            if let Some(pins) = self.held.get_mut(&id) {
                *pins -= 1;
                if *pins == 0 {
                    self.held.remove(&id);
                }
            }
        }
        self.blocks.free_table(block_ids);
    }

    /// Takes `num_blocks` free (or evictable) blocks for a hand-off to land
    /// in, or `None`, taking nothing, when there are not that many. They
    /// belong to no sequence until a [`NewSequence`] brings them back in
    /// [`ProvidedData::InBlocks`], or [`Self::unreserve`] frees them.
    /// Never preempts: a running sequence's blocks are not up for grabs.
    pub fn reserve(&mut self, num_blocks: usize) -> Option<Vec<u32>> {
        self.blocks.allocate(num_blocks)
    }

    /// One more owner on each reserved block (a puller still writing blocks
    /// a sequence now owns).
    pub fn retain_reserved(&mut self, block_ids: &[u32]) {
        self.blocks.retain(block_ids);
    }

    /// Frees blocks from [`Self::reserve`] that no sequence took, or drops
    /// a [`Self::retain_reserved`] owner.
    pub fn unreserve(&mut self, block_ids: &[u32]) {
        self.blocks.free_table(block_ids);
    }

    /// KV events (blocks cached and evicted) since the last call.
    pub fn take_kv_events(&mut self) -> Vec<KvEvent> {
        self.blocks.take_events()
    }

    /// Blocks that nobody owns but whose KV stays cached until evicted
    /// (counted in [`Self::num_free_blocks`] too).
    pub fn num_cached_blocks(&self) -> usize {
        self.blocks.num_cached()
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

    /// Prefill work not done yet, in tokens: whatever waiting sequences must
    /// compute (a preempted one recomputes its generated tokens too), and the
    /// prompt tokens running sequences have not reached. The demand signal
    /// a prefill pool scales on.
    pub fn num_pending_prefill_tokens(&self) -> usize {
        let waiting: usize = self.waiting.iter().map(Sequence::num_new).sum();
        let running: usize = self.running.iter().map(|s| s.prompt_len.saturating_sub(s.num_computed)).sum();
        waiting + running
    }

    /// Blocks available for allocation: free plus evictable cached ones.
    pub fn num_free_blocks(&self) -> usize {
        self.blocks.num_free()
    }

    /// Distinct blocks held by at least one pin.
    pub fn num_held_blocks(&self) -> usize {
        self.held.len()
    }

    pub fn num_total_blocks(&self) -> usize {
        self.blocks.num_total()
    }

    /// The model's eos tokens (the sampler masks them under `min_tokens`).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.config.eos_token_ids
    }

    /// What speculative decoding did so far.
    pub fn speculation(&self) -> &SpeculationStats {
        &self.speculation
    }

    /// Preemptions so far.
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// Plans the running sequences: decodes first (one token each), then
    /// the next chunk of each partly prefilled one, each within `budget`
    /// and given the blocks it needs. When blocks run out the worst-ranked
    /// running sequence is preempted (possibly the one asking; if it was
    /// planned already, its chunk is dropped and its tokens go back to the
    /// budget). True if anything was preempted.
    fn schedule_running(&mut self, plan: &mut StepPlan, budget: &mut usize) -> bool {
        let bs = self.config.block_size;
        let mut planned: Vec<Planned> = Vec::new();
        let mut preempted = false;
        let decoding = self.running.iter().filter(|s| s.num_new() == 1).count();
        let speculate = self.config.speculative.as_ref().is_some_and(|s| decoding <= s.disable_by_batch_size);
        for decodes in [true, false] {
            let mut i = 0;
            while i < self.running.len() && *budget > 0 {
                let seq = &self.running[i];
                if (seq.num_new() == 1) != decodes {
                    i += 1;
                    continue;
                }
                let (mut drafts, second_row) = if decodes && speculate {
                    self.drafts(seq, *budget - 1, decoding == 1)
                } else {
                    (Vec::new(), false)
                };
                let blocks_needed = |n: usize| blocks_for(seq.num_computed + n, bs).saturating_sub(seq.blocks.len());
                // Drafts that need more blocks than are free are dropped: they never preempt.
                if blocks_needed(1 + drafts.len()) > blocks_needed(1)
                    && blocks_needed(1 + drafts.len()) > self.blocks.num_free()
                {
                    drafts.clear();
                }
                let n = seq.num_new().min(*budget) + drafts.len();
                let need = blocks_needed(n);
                if need > 0 {
                    let Some(ids) = self.blocks.allocate(need) else {
                        let victim = self.preempt_worst(&mut planned, budget);
                        preempted = true;
                        // Sequence `i` moved down one, or went itself.
                        if victim < i {
                            i -= 1;
                        }
                        continue;
                    };
                    self.running[i].blocks.extend(ids);
                }
                self.running[i].speculation.proposed(second_row);
                planned.push(Planned { id: self.running[i].id.clone(), choice: self.running[i].choice, n, drafts });
                *budget -= n;
                i += 1;
            }
        }
        let by_model = self.config.speculative.as_ref().is_some_and(|s| s.draft_model().is_some());
        for Planned { id, choice, n, drafts } in planned {
            let seq = self.running.iter().find(|s| s.is(&id, choice)).expect("planned sequences are running");
            let mut chunk = seq.chunk(n - drafts.len());
            if by_model && drafts.is_empty() && seq.num_new() == 1 && seq.num_computed >= seq.prompt_len {
                // A decode that does not draft leaves the draft behind: its share of the step saved.
                // Prompt chunks may too, when crowded (see `defer_draft_prefill`).
                chunk.draft_kv = false;
            } else if let Some(lag) = seq.draft_lag.filter(|_| by_model && !drafts.is_empty()) {
                chunk.draft_catch_up = seq.tokens[lag..seq.num_computed].to_vec();
            }
            chunk.tokens.extend(&drafts);
            chunk.drafts = drafts;
            plan.seqs.push(chunk);
        }
        preempted
    }

    /// With a draft model and more sequences running than may draft (`disable_by_batch_size`),
    /// leaves the draft's KV of the step's prompt chunks unwritten: the draft catches up on them
    /// if the sequence ever drafts, and a sequence that finishes in a crowd never pays for the
    /// draft's prefill. Not a prompt whose blocks are to be handed off (a prefill worker's), which
    /// carry the draft's KV to the decode worker.
    fn defer_draft_prefill(&self, plan: &mut StepPlan) {
        let Some(speculative) = self.config.speculative.as_ref().filter(|s| s.draft_model().is_some()) else {
            return;
        };
        if self.running.len() <= speculative.disable_by_batch_size {
            return;
        }
        for chunk in plan.seqs.iter_mut().filter(|c| c.context_start < c.prompt_len) {
            let seq = self.running.iter().find(|s| s.is(&chunk.request_id, chunk.choices.start));
            if seq.is_some_and(|s| !s.pin_on_finish) {
                chunk.draft_kv = false;
            }
        }
    }

    /// The draft tokens a decoding sequence verifies in its next step, at most `room`: none
    /// without speculation, for a sequence that stands for several choices, or when its
    /// `max_tokens` or the context leaves room for one token only, or when a draft model lags by
    /// more tokens than are left to generate (its catch-up, a prefill of the draft, would cost
    /// more than the drafts of the tokens left save). A sequence decoding `alone`
    /// verifies one prompt-lookup draft whenever any suffix of it occurred before (see
    /// [`NgramLookup::second_row`]; true with such a draft).
    fn drafts(&self, seq: &Sequence, room: usize, alone: bool) -> (Vec<u32>, bool) {
        let Some(speculative) = &self.config.speculative else { return (Vec::new(), false) };
        if seq.fork != 1 || seq.pooling.is_some() {
            return (Vec::new(), false);
        }
        // Each accepted draft is one token generated before the one that follows them.
        let left = seq
            .max_tokens
            .saturating_sub(seq.num_generated)
            .min(self.config.max_model_len.saturating_sub(seq.tokens.len()));
        let most = room.min(left.saturating_sub(1));
        let k = seq.speculation.limit(speculative, seq.num_generated).min(most);
        match &speculative.method {
            SpeculativeMethod::Ngram(lookup) => match lookup.propose(&seq.tokens, k) {
                drafts if drafts.is_empty() && alone && most > 0 => (lookup.second_row(&seq.tokens), true),
                drafts => (drafts, false),
            },
            // A draft that fell far behind costs more to catch up than its drafts can save.
            SpeculativeMethod::DraftModel { .. }
                if seq.draft_lag.is_some_and(|lag| seq.num_computed.saturating_sub(lag) > left) =>
            {
                (Vec::new(), false)
            }
            // Slots the engine fills with the draft model's tokens before the step (see
            // `ScheduledSeq::drafts`).
            SpeculativeMethod::DraftModel { .. } => (vec![0; k], false),
        }
    }

    /// Preempts the worst-ranked running sequence, unplanning it. Returns
    /// the index it had in `running`.
    fn preempt_worst(&mut self, planned: &mut Vec<Planned>, budget: &mut usize) -> usize {
        let (victim, _) =
            self.running.iter().enumerate().max_by_key(|(_, s)| s.rank()).expect("a sequence asked for blocks");
        let seq = self.running.remove(victim);
        if let Some(p) = planned.iter().position(|planned| seq.is(&planned.id, planned.choice)) {
            *budget += planned.remove(p).n;
        }
        self.preempt(seq);
        victim
    }

    /// Frees a sequence's blocks and queues it for recompute at its rank.
    /// Its generated tokens stay in `tokens`, so recompute feeds them as
    /// prompt and nothing is emitted twice.
    fn preempt(&mut self, mut seq: Sequence) {
        tracing::debug!(request_id = %seq.id, num_tokens = seq.tokens.len(), "preempted for recompute");
        self.blocks.free_table(&seq.blocks);
        seq.blocks.clear();
        seq.num_registered = 0;
        seq.num_computed = 0;
        seq.draft_lag = None;
        seq.provided_kv = None;
        if let Some(pooled) = &mut seq.pooling {
            pooled.reset();
        }
        self.num_preemptions += 1;
        self.enqueue(seq);
    }

    /// Inserts a sequence into `waiting` after every sequence of a rank as
    /// good as its own.
    fn enqueue(&mut self, seq: Sequence) {
        let at = self.waiting.partition_point(|w| w.rank() <= seq.rank());
        self.waiting.insert(at, seq);
    }

    /// Moves waiting sequences to running, in order, while `budget`, blocks
    /// and `max_num_seqs` allow; the last one admitted may get only a first
    /// chunk of its prompt.
    fn admit(&mut self, plan: &mut StepPlan, budget: &mut usize) {
        let bs = self.config.block_size;
        while *budget > 0 {
            let Some(seq) = self.waiting.front() else {
                break;
            };
            let needed = blocks_for(seq.tokens.len(), bs);
            if let Some(error) = self.never_admissible(seq, needed) {
                let seq = self.waiting.pop_front().expect("front exists");
                tracing::debug!(request_id = %seq.id, %error, "rejected at admission");
                // The request is over: its other choices go with it.
                for other in self.take_all(&seq.id) {
                    self.blocks.free_table(&other.blocks);
                }
                self.events.push((seq.id, EngineEvent::Error(RequestError::new(FailureKind::Refused, error))));
                continue;
            }
            // A sequence that will fork reserves a place for every choice.
            let occupied: usize = self.running.iter().map(|s| s.fork).sum();
            if occupied + seq.fork > self.config.max_num_seqs {
                break;
            }
            // Strict order: a large request at the front waits for room
            // rather than being overtaken forever by small ones.
            let hits = self.cached_prefix();
            let seq = self.waiting.front().expect("front exists");
            let computed = if seq.provided_kv.is_some() { seq.prompt_len } else { hits.len() * bs };
            let n = (seq.tokens.len() - computed).min(*budget);
            if self.config.whole_prompts && n < seq.tokens.len() - computed {
                break;
            }
            // Provided KV already in blocks brings them; nothing else holds any.
            let held = seq.blocks.len();
            let fresh = blocks_for(computed + n, bs) - hits.len() - held;
            let Some(ids) = self.blocks.allocate_after_prefix(&hits, fresh) else {
                break;
            };
            let mut seq = self.waiting.pop_front().expect("front exists");
            seq.blocks.extend(ids);
            seq.num_computed = hits.len() * bs;
            seq.num_registered = hits.len();
            // A cached block some sequence decoded without drafting: the draft catches up from it.
            seq.draft_lag = hits.iter().position(|&id| self.blocks.is_draft_stale(id)).map(|i| i * bs);
            seq.num_cached_tokens.get_or_insert(seq.num_computed.min(seq.prompt_len));
            tracing::debug!(request_id = %seq.id, num_tokens = seq.tokens.len(), num_new = n, "admitted");
            if let Some(bytes) = seq.provided_kv.take() {
                if let Some(data) = bytes {
                    let block_ids = seq.blocks[..blocks_for(seq.prompt_len, bs)].to_vec();
                    plan.kv_writes.push(KvWrite { request_id: seq.id.clone(), block_ids, data });
                }
                seq.num_computed = seq.prompt_len;
                // The hand-off's blocks carry the draft's KV with the target's.
                seq.draft_lag = None;
                let forks = std::mem::take(&mut seq.provided_forks);
                seq.fork = 1;
                // The provided first tokens may already be the last ones allowed
                // (every choice has generated one token, of the same prompt).
                if let Some(reason) = seq.length_limit(self.config.max_model_len) {
                    for index in 1..=forks.len() as u32 {
                        self.events.push((seq.id.clone(), Self::finished_event(&seq, index, reason, None)));
                    }
                    self.finish(seq, reason);
                    continue;
                }
                // The other choices run from the next step, as decodes of their first token.
                for (i, &first) in forks.iter().enumerate() {
                    let mut child = self.fork_child(&seq, i as u32 + 1, first);
                    if self.share_prompt_blocks(&seq, &mut child, &mut plan.block_copies) {
                        self.running.push(child);
                    } else {
                        self.num_preemptions += 1;
                        self.enqueue(child);
                    }
                }
            }
            plan.seqs.push(seq.chunk(n));
            *budget -= n;
            self.running.push(seq);
        }
    }

    /// The cached blocks holding the longest prefix of the front waiting
    /// sequence's full blocks, at most all but the block of its last token:
    /// that token is always computed, so the step has logits to sample from
    /// (a prompt that is all full cached blocks recomputes its last block).
    /// Empty with caching off and for provided KV, which brings its own blocks.
    fn cached_prefix(&mut self) -> Vec<u32> {
        let bs = self.config.block_size;
        let Some(seq) = self.waiting.front_mut() else {
            return Vec::new();
        };
        if !self.config.enable_prefix_caching || seq.provided_kv.is_some() || seq.computes_whole_prompt() {
            return Vec::new();
        }
        extend_block_hashes(&seq.cache_salt, &seq.tokens, bs, &mut seq.hashes);
        let reusable = (seq.tokens.len().saturating_sub(1) / bs).min(seq.hashes.len());
        let mut hits = self.blocks.lookup(&seq.hashes[..reusable]);
        if seq.pin_on_finish {
            // Blocks to be handed off must carry the draft's KV: a block cached without it is
            // computed again (the draft's catch-up happens on decodes, which a hand-off skips).
            if let Some(stale) = hits.iter().position(|&id| self.blocks.is_draft_stale(id)) {
                hits.truncate(stale);
            }
        }
        hits
    }

    /// Why a waiting sequence can never run, if so.
    fn never_admissible(&self, seq: &Sequence, needed: usize) -> Option<String> {
        if seq.fork > self.config.max_num_seqs {
            return Some(format!("{} choices exceed max_num_seqs {}", seq.fork, self.config.max_num_seqs));
        }
        if needed > self.config.num_blocks {
            return Some(format!(
                "sequence of {} tokens needs {needed} KV blocks of {} tokens, the whole cache has {}",
                seq.tokens.len(),
                self.config.block_size,
                self.config.num_blocks
            ));
        }
        if let Some(Some(data)) = &seq.provided_kv {
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
    /// Only choice 0 pins: the prompt's blocks are the same KV for every choice.
    fn finish(&mut self, seq: Sequence, reason: FinishReason) {
        let pinned_blocks = if seq.pin_on_finish && seq.choice == 0 {
            let n = blocks_for(seq.prompt_len, self.config.block_size);
            let (pinned, rest) = seq.blocks.split_at(n);
            self.blocks.free_table(rest);
            // The sequence's reference on each pinned block becomes the pin's.
            for &id in pinned {
                *self.held.entry(id).or_insert(0) += 1;
            }
            *self.pins.entry(pinned.to_vec()).or_insert(0) += 1;
            Some(pinned.to_vec())
        } else {
            self.blocks.free_table(&seq.blocks);
            None
        };
        tracing::debug!(request_id = %seq.id, choice = seq.choice, ?reason, num_generated = seq.num_generated, ?pinned_blocks, "finished");
        let event = Self::finished_event(&seq, seq.choice, reason, pinned_blocks);
        self.events.push((seq.id, event));
    }

    /// `Finished` for choice `index` of `seq`'s request.
    fn finished_event(
        seq: &Sequence,
        index: u32,
        reason: FinishReason,
        pinned_blocks: Option<Vec<u32>>,
    ) -> EngineEvent {
        EngineEvent::Finished {
            index,
            reason,
            pinned_blocks,
            num_prompt_tokens: seq.prompt_len,
            num_cached_tokens: seq.num_cached_tokens.unwrap_or(0),
        }
    }

    /// Removes every sequence (choice) of a request from the queues.
    fn take_all(&mut self, request_id: &str) -> Vec<Sequence> {
        let mut taken = Vec::new();
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].id == request_id {
                taken.push(self.running.remove(i));
            } else {
                i += 1;
            }
        }
        let (mine, others): (VecDeque<Sequence>, VecDeque<Sequence>) =
            std::mem::take(&mut self.waiting).into_iter().partition(|s| s.id == request_id);
        self.waiting = others;
        taken.extend(mine);
        taken
    }
}

/// A running sequence planned into the step: `n` tokens, its `drafts` the last of them.
struct Planned {
    id: String,
    choice: u32,
    n: usize,
    drafts: Vec<u32>,
}

/// Caches the sequence's full blocks whose tokens all have KV now (prompt
/// and generated alike; a partial block never is).
fn register_computed_blocks(blocks: &mut BlockManager, seq: &mut Sequence, block_size: usize) {
    let full = seq.num_computed / block_size;
    if full <= seq.num_registered {
        return;
    }
    extend_block_hashes(&seq.cache_salt, &seq.tokens[..seq.num_computed], block_size, &mut seq.hashes);
    for i in seq.num_registered..full {
        let parent = i.checked_sub(1).map(|p| seq.hashes[p]);
        let tokens = &seq.tokens[i * block_size..(i + 1) * block_size];
        blocks.register(seq.blocks[i], seq.hashes[i], parent, tokens);
        if seq.draft_lag.is_some_and(|lag| lag < (i + 1) * block_size) {
            blocks.mark_draft_stale(seq.blocks[i]);
        }
    }
    seq.num_registered = full;
}

#[cfg(test)]
mod tests;

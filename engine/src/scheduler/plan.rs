//! What one step does, as the scheduler plans it for the engine ([`StepPlan`]), and the tokens
//! sampled from its logits ([`SampledToken`]).

use crate::forward::{DraftFill, ForwardBatch, Hidden};
use crate::sampler::TokenLogprobs;
use std::ops::Range;

/// A token sampled for one sequence of a step, with its logprobs if asked.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    pub logprobs: Option<TokenLogprobs>,
}

/// Everything one step does, in order: write provided KV, then run one
/// forward pass over `seqs`. The logits have one row per sequence with
/// `need_logits`, in the order of `seqs`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StepPlan {
    pub kv_writes: Vec<KvWrite>,
    /// Blocks to copy (`src -> dst`) after `kv_writes`, before the forward
    /// pass: forked choices' own copies of a partial prompt block.
    pub block_copies: Vec<BlockCopy>,
    pub seqs: Vec<ScheduledSeq>,
}

/// Copy block `src`'s KV into block `dst` (a fork's partial prompt block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCopy {
    pub src: u32,
    pub dst: u32,
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
    /// The chunk ends the sequence's known tokens: sample a token from its
    /// logits. False for a prefill chunk that is not the last.
    pub need_logits: bool,
    /// Return a logits row for every token (prompt logprobs), not just the last: row `i`
    /// predicts position `context_start + i + 1`. The last row is still the one sampled.
    pub all_logits: bool,
    /// The final hidden states the chunk needs (an embedding request's), after its logits rows.
    pub hidden: Hidden,
    /// With `need_logits`, the choices that sample from this row: just the
    /// sequence's own, or all `n` at the fork step (each with its own sampler).
    pub choices: Range<u32>,
    /// A speculative decode's draft tokens, the last `drafts.len()` of `tokens`: every token
    /// gets a logits row, row `i` is sampled only if the drafts before it were, and draft `i`
    /// is accepted when row `i` samples it (see [`crate::scheduler::SpeculativeConfig`]). With a
    /// draft model the scheduler plans them as zeros and the engine writes the draft's tokens
    /// over them, here and in `tokens`, before the step.
    pub drafts: Vec<u32>,
    /// With a draft model: whether the step writes the draft's KV for this chunk too (every
    /// decode that drafts, of its last draft only: see [`crate::DraftFill`]; every prefill chunk
    /// but those of a crowded step not to be handed off; a decode that does not draft leaves the
    /// draft behind, see `draft_catch_up`).
    pub draft_kv: bool,
    /// With a draft model, for a decode that drafts: the sequence's tokens before `tokens` whose
    /// draft KV is missing, at positions `context_start - draft_catch_up.len()..`, which the
    /// draft's first pass feeds before `tokens`.
    pub draft_catch_up: Vec<u32>,
}

impl ScheduledSeq {
    /// Its rows of the step's final hidden states.
    pub fn num_hidden_rows(&self) -> usize {
        match self.hidden {
            Hidden::None => 0,
            Hidden::Last => 1,
            Hidden::All => self.tokens.len(),
        }
    }

    /// Its rows of the step's logits.
    pub fn num_rows(&self) -> usize {
        if self.all_logits || !self.drafts.is_empty() {
            self.tokens.len()
        } else {
            usize::from(self.need_logits)
        }
    }
}

impl StepPlan {
    /// Whether the step has nothing to do.
    pub fn is_empty(&self) -> bool {
        self.kv_writes.is_empty() && self.block_copies.is_empty() && self.seqs.is_empty()
    }

    /// The forward batch of the step.
    pub fn to_batch(&self) -> ForwardBatch {
        let mut batch = ForwardBatch::default();
        for s in &self.seqs {
            batch.push(&s.tokens, s.context_start, s.prompt_len, s.block_table.clone(), s.need_logits);
            if !s.draft_kv {
                batch.fill_draft_last(DraftFill::Skip);
            } else if !s.drafts.is_empty() {
                // The draft's proposing passes fed all but the last draft.
                batch.fill_draft_last(DraftFill::Last);
            }
            if s.all_logits || !s.drafts.is_empty() {
                batch.score_last();
            }
            batch.pool_last(s.hidden);
        }
        batch
    }

    /// Tokens fed to the forward pass.
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }

    /// Rows of the logits: one per sequence that samples a token, one per token of a chunk
    /// with `all_logits`.
    pub fn num_logits(&self) -> usize {
        self.seqs.iter().map(ScheduledSeq::num_rows).sum()
    }

    /// Tokens sampled in all at most: one per row, `n` per forking row, one more per draft.
    pub fn num_samples(&self) -> usize {
        self.seqs.iter().filter(|s| s.need_logits).map(|s| s.choices.len() + s.drafts.len()).sum()
    }
}

//! One sequence: its tokens (prompt, then generated), how many have KV, its blocks and limits.

use super::block_manager::BlockHash;
use super::plan::ScheduledSeq;
use super::speculate::Adaptive;
use crate::forward::Hidden;
use crate::request::{FinishReason, Pooling};
use std::ops::Range;

/// One sequence as the scheduler tracks it: a request, or one choice of it once forked.
#[derive(Debug, Clone)]
pub(super) struct Sequence {
    pub(super) id: String,
    /// Which of the request's choices this is (0 before the fork).
    pub(super) choice: u32,
    /// Choices this sequence stands for: `n` until it forks, then 1.
    pub(super) fork: usize,
    /// With provided KV: the first tokens of choices `1..n`, forked at admission.
    pub(super) provided_forks: Vec<u32>,
    /// Prompt, then every generated token (the last one not yet fed).
    pub(super) tokens: Vec<u32>,
    pub(super) prompt_len: usize,
    /// Leading tokens of `tokens` whose KV is in `blocks`.
    pub(super) num_computed: usize,
    /// Generated tokens, counting a provided first token.
    pub(super) num_generated: usize,
    pub(super) max_tokens: usize,
    pub(super) stop_token_ids: Vec<u32>,
    pub(super) ignore_eos: bool,
    pub(super) min_tokens: usize,
    pub(super) pin_on_finish: bool,
    pub(super) blocks: Vec<u32>,
    /// Provided KV still to be taken in at admission: its bytes, or
    /// `Some(None)` when it is in the leading `blocks` already. Taken at
    /// admission; a preempted sequence recomputes instead.
    pub(super) provided_kv: Option<Option<Vec<u8>>>,
    pub(super) cache_salt: Vec<u8>,
    /// Chained hashes of the full blocks of `tokens` computed so far (tokens
    /// never change, so they stay valid across preemption).
    pub(super) hashes: Vec<BlockHash>,
    /// Leading blocks of `blocks` already registered in the prefix cache
    /// (or found there).
    pub(super) num_registered: usize,
    /// Prompt tokens found in the prefix cache at the first admission.
    pub(super) num_cached_tokens: Option<usize>,
    pub(super) priority: i32,
    /// Order of `Scheduler::add` calls.
    pub(super) arrival: u64,
    /// Report prompt logprobs, with this many top tokens.
    pub(super) prompt_logprobs: Option<u32>,
    /// The next prompt position whose logprob is to be reported (a recomputed prompt does not
    /// report again).
    pub(super) prompt_logprobs_next: usize,
    /// An embedding request's pooling and what it has pooled so far.
    pub(super) pooling: Option<Pooled>,
    /// How its speculative drafts fared so far.
    pub(super) speculation: Adaptive,
    /// With a draft model: the first position whose draft KV is missing, since decodes that do
    /// not draft leave the draft behind (and a cached block may have been left so); the next
    /// decode that drafts feeds the draft from here. `None`: the draft's KV is complete.
    pub(super) draft_lag: Option<usize>,
}

/// An embedding's pooling state, across the chunks of its prompt.
#[derive(Debug, Clone)]
pub(super) struct Pooled {
    pub(super) pooling: Pooling,
    /// The sum of the hidden states seen (mean), or the one kept (last, first token).
    pub(super) sum: Vec<f32>,
    /// Hidden states summed into `sum`.
    pub(super) rows: usize,
}

impl Pooled {
    /// Takes a chunk's hidden states: `rows` are those the chunk asked for, of the tokens from
    /// `context_start`.
    pub(super) fn take(&mut self, context_start: usize, rows: &[Vec<f32>]) {
        let keep = match self.pooling {
            Pooling::Last => rows.last(),
            Pooling::Cls => rows.first().filter(|_| context_start == 0),
            Pooling::Mean => {
                for row in rows {
                    if self.sum.is_empty() {
                        self.sum = vec![0.0; row.len()];
                    }
                    for (s, v) in self.sum.iter_mut().zip(row) {
                        *s += v;
                    }
                    self.rows += 1;
                }
                return;
            }
        };
        if let Some(row) = keep {
            self.sum.clone_from(row);
            self.rows = 1;
        }
    }

    /// The pooled vector.
    pub(super) fn vector(&self) -> Vec<f32> {
        let n = self.rows.max(1) as f32;
        self.sum.iter().map(|v| v / n).collect()
    }

    /// Forgets what was pooled: the prompt is computed again after a preemption.
    pub(super) fn reset(&mut self) {
        self.sum.clear();
        self.rows = 0;
    }
}

impl Sequence {
    /// The next `n` new tokens.
    pub(super) fn chunk(&self, n: usize) -> ScheduledSeq {
        let end = self.num_computed + n;
        ScheduledSeq {
            request_id: self.id.clone(),
            tokens: self.tokens[self.num_computed..end].to_vec(),
            context_start: self.num_computed,
            prompt_len: self.prompt_len,
            block_table: self.blocks.clone(),
            need_logits: end == self.tokens.len() && self.pooling.is_none(),
            // Row `i` predicts position `num_computed + i + 1`.
            all_logits: self.scores_prompt() && end >= self.prompt_logprobs_next,
            hidden: match self.pooling.as_ref().map(|p| p.pooling) {
                None => Hidden::None,
                Some(Pooling::Last) if end == self.tokens.len() => Hidden::Last,
                Some(Pooling::Last) => Hidden::None,
                Some(Pooling::Mean) => Hidden::All,
                Some(Pooling::Cls) if self.num_computed == 0 => Hidden::All,
                Some(Pooling::Cls) => Hidden::None,
            },
            choices: self.choice..self.choice + self.fork as u32,
            drafts: Vec::new(),
            draft_kv: true,
            draft_catch_up: Vec::new(),
        }
    }

    /// Whether every prompt token must be computed here: its prompt logprobs are still to be
    /// reported, or its embedding pools more than the last token.
    pub(super) fn computes_whole_prompt(&self) -> bool {
        self.scores_prompt() || self.pooling.as_ref().is_some_and(|p| p.pooling != Pooling::Last)
    }

    /// Whether prompt logprobs are still to be reported.
    pub(super) fn scores_prompt(&self) -> bool {
        self.prompt_logprobs.is_some() && self.prompt_logprobs_next < self.prompt_len
    }

    /// Whether this is the sequence's request and choice.
    pub(super) fn is(&self, request_id: &str, choice: u32) -> bool {
        self.id == request_id && self.choice == choice
    }

    /// The request's choices this sequence stands for.
    pub(super) fn choices(&self) -> Range<u32> {
        self.choice..self.choice + self.fork as u32
    }

    /// Tokens without KV yet.
    pub(super) fn num_new(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Scheduling order: smaller is served first, larger is preempted first.
    pub(super) fn rank(&self) -> (i32, u64) {
        (self.priority, self.arrival)
    }

    /// `Length` if the sequence may not generate another token.
    pub(super) fn length_limit(&self, max_model_len: usize) -> Option<FinishReason> {
        let done = self.num_generated >= self.max_tokens || self.tokens.len() >= max_model_len;
        done.then_some(FinishReason::Length)
    }
}

//! One forward step: what it computes ([`ForwardBatch`], the new tokens of several sequences,
//! flattened), the model that runs it ([`Forward`]; [`RankModel`] for one tensor-parallel rank's
//! shard), and what it returns ([`Logits`]).
//!
//! ```text
//! tokens:  | seq 0 chunk (prefill) | seq 1 (1 decode token) | seq 2 (1) |
//! seq i:   token_start..token_start+num_tokens, at positions
//!          context_start..context_start+num_tokens of that sequence
//! ```

pub use crate::error::ForwardError;

use crate::comm::Communicator;
use crate::kv::cache::{KvCacheShape, KvStorage};
use crate::kv::landing::Landings;

/// The new tokens of one sequence in a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqChunk {
    /// Index of this chunk's first token in [`ForwardBatch::tokens`].
    pub token_start: usize,
    /// Number of new tokens (the whole prompt for a prefill, 1 for a decode).
    pub num_tokens: usize,
    /// Tokens of this sequence already in the KV cache: the position of the
    /// chunk's first token.
    pub context_start: usize,
    /// Block ids holding this sequence's KV, in order. Must cover
    /// `context_start + num_tokens` tokens.
    pub block_table: Vec<u32>,
    /// Whether the step must return logits for the chunk's last token.
    pub need_logits: bool,
    /// Whether the step returns logits for every token of the chunk (prompt logprobs), not
    /// just the last.
    pub all_logits: bool,
    /// Which of the chunk's final hidden states (after the output norm, before the LM head)
    /// the step returns, for embeddings.
    pub hidden: Hidden,
    /// With a draft model ([`Forward::draft`]): which of the chunk's tokens the pass writes the
    /// draft's KV for too.
    pub draft_kv: DraftFill,
    /// The sequence's prompt length: rows at positions below it are prompt
    /// tokens, the rest were generated. Models must compute a row the same
    /// way however its sequence is batched, chunked or recomputed; this lets
    /// one treat the two kinds differently if it ever needs to.
    pub prompt_len: usize,
}

/// Which of a chunk's tokens a pass writes the draft model's KV for (see [`SeqChunk::draft_kv`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DraftFill {
    /// Every token's.
    #[default]
    All,
    /// The last token's only: a verifying chunk, whose other tokens the draft's proposing passes
    /// fed (the same bits: the kernels do not depend on the batch).
    Last,
    /// None: a decode that does not draft this step, or a prompt chunk in a crowded step; the
    /// engine catches the draft up when the sequence drafts.
    Skip,
}

/// The final hidden states a chunk asks for (see [`SeqChunk::hidden`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Hidden {
    /// None: a generation chunk.
    #[default]
    None,
    /// The chunk's last token's (last-token pooling).
    Last,
    /// Every token's (mean or first-token pooling).
    All,
}

/// All the work of one forward step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ForwardBatch {
    pub tokens: Vec<u32>,
    pub seqs: Vec<SeqChunk>,
    /// Hand-offs whose KV is still landing in blocks of this step (see
    /// [`crate::kv::landing`]): a model that [`Forward::waits_for_layers`] calls
    /// [`ForwardBatch::wait_for_layer`] before each layer's cache.
    pub landings: Landings,
}

impl ForwardBatch {
    /// Appends a sequence's chunk: `tokens` at positions `context_start..` of a
    /// sequence whose prompt has `prompt_len` tokens.
    pub fn push(
        &mut self,
        tokens: &[u32],
        context_start: usize,
        prompt_len: usize,
        block_table: Vec<u32>,
        need_logits: bool,
    ) {
        self.seqs.push(SeqChunk {
            token_start: self.tokens.len(),
            num_tokens: tokens.len(),
            context_start,
            block_table,
            need_logits,
            all_logits: false,
            hidden: Hidden::None,
            draft_kv: DraftFill::All,
            prompt_len,
        });
        self.tokens.extend_from_slice(tokens);
    }

    /// Sets which tokens of the last chunk pushed get the draft model's KV (see
    /// [`SeqChunk::draft_kv`]).
    pub fn fill_draft_last(&mut self, fill: DraftFill) {
        if let Some(chunk) = self.seqs.last_mut() {
            chunk.draft_kv = fill;
        }
    }

    /// The tokens whose draft model KV the pass writes, as a batch of their own (the same
    /// landings): every chunk's per its [`SeqChunk::draft_kv`].
    pub fn draft_chunks(&self) -> ForwardBatch {
        let mut batch = ForwardBatch { landings: self.landings.clone(), ..ForwardBatch::default() };
        for s in &self.seqs {
            let skipped = match s.draft_kv {
                DraftFill::All => 0,
                DraftFill::Last => s.num_tokens.saturating_sub(1),
                DraftFill::Skip => continue,
            };
            let tokens = &self.tokens[s.token_start + skipped..s.token_start + s.num_tokens];
            batch.push(tokens, s.context_start + skipped, s.prompt_len, s.block_table.clone(), false);
        }
        batch
    }

    /// Asks for a logits row for every token of the last chunk pushed (prompt logprobs).
    pub fn score_last(&mut self) {
        if let Some(chunk) = self.seqs.last_mut() {
            chunk.all_logits = true;
        }
    }

    /// The tokens (indices into [`Self::tokens`]) whose logits the step returns, in row order:
    /// every token of a chunk with `all_logits`, else the last token of one with `need_logits`.
    pub fn logit_rows(&self) -> Vec<usize> {
        let mut rows = Vec::new();
        for s in &self.seqs {
            if s.all_logits {
                rows.extend(s.token_start..s.token_start + s.num_tokens);
            } else if s.need_logits {
                rows.push(s.token_start + s.num_tokens - 1);
            }
        }
        rows
    }

    /// Asks for the final hidden states `hidden` of the last chunk pushed (embeddings).
    pub fn pool_last(&mut self, hidden: Hidden) {
        if let Some(chunk) = self.seqs.last_mut() {
            chunk.hidden = hidden;
        }
    }

    /// The tokens whose final hidden states the step returns, in row order (see
    /// [`SeqChunk::hidden`]).
    pub fn hidden_rows(&self) -> Vec<usize> {
        let mut rows = Vec::new();
        for s in &self.seqs {
            match s.hidden {
                Hidden::None => {}
                Hidden::Last => rows.push(s.token_start + s.num_tokens - 1),
                Hidden::All => rows.extend(s.token_start..s.token_start + s.num_tokens),
            }
        }
        rows
    }

    /// Blocks until layer `layer` of every hand-off still landing is in
    /// place. A failed one does not block: the engine fails its sequence
    /// after the step, whose other rows it does not touch.
    pub fn wait_for_layer(&self, layer: usize) {
        for landing in &self.landings.0 {
            let _ = landing.wait_for(layer);
        }
    }

    /// Number of logits rows the step returns (see [`Self::logit_rows`]).
    pub fn num_logits(&self) -> usize {
        self.seqs.iter().map(|s| if s.all_logits { s.num_tokens } else { usize::from(s.need_logits) }).sum()
    }
}

/// Logits of one step: one row of `vocab_size` values per token of
/// [`ForwardBatch::logit_rows`], in that order; and the final hidden states of
/// [`ForwardBatch::hidden_rows`], in that order.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    pub vocab_size: usize,
    pub data: Vec<f32>,
    /// One row per token of [`ForwardBatch::hidden_rows`] (usually none).
    pub hidden: Vec<Vec<f32>>,
}

impl Logits {
    /// Logits rows and no hidden states.
    pub fn new(vocab_size: usize, data: Vec<f32>) -> Self {
        Self { vocab_size, data, hidden: Vec::new() }
    }

    /// Number of rows.
    pub fn num_rows(&self) -> usize {
        self.data.len() / self.vocab_size.max(1)
    }

    /// The logits of row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab_size..(i + 1) * self.vocab_size]
    }

    /// The logits of row `i`, to process in place before sampling.
    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.vocab_size..(i + 1) * self.vocab_size]
    }
}

/// A model the serving loop can step: reads the batch's tokens, writes their
/// K/V into `kv` at the slots their block tables name, and returns logits.
/// Weights are shared and read-only, so `&self`.
pub trait Forward: Send + Sync + 'static {
    fn forward(&self, batch: &ForwardBatch, kv: &mut crate::KvStorage) -> Result<Logits, ForwardError>;
    /// Size of a logits row.
    fn vocab_size(&self) -> usize;
    /// Whether `forward` calls [`ForwardBatch::wait_for_layer`] before it
    /// touches each layer's cache; if not, the engine waits for every layer
    /// of a landing hand-off before the step.
    fn waits_for_layers(&self) -> bool {
        false
    }

    /// Whether the model is an encoder (BERT): every token attends to the whole prompt, so the
    /// engine schedules each prompt whole in one step, caches no prefix, and serves embeddings
    /// only (there is no LM head to sample from).
    fn encoder(&self) -> bool {
        false
    }

    /// The draft model that proposes speculative tokens, sharing this model's KV blocks (see
    /// [`crate::model::Drafted`]): the engine runs it alone to fill a step's draft slots.
    fn draft(&self) -> Option<&dyn Forward> {
        None
    }

    /// Tensor-parallel ranks the model runs on; the engine keeps one KV cache
    /// per rank, each holding that rank's share of the KV heads.
    fn tp_size(&self) -> usize {
        1
    }

    /// One step on every rank, `kv[r]` being rank `r`'s cache (the engine
    /// calls this, with [`Forward::tp_size`] caches). A single-rank model
    /// runs [`Forward::forward`] on the one cache; a tensor-parallel one
    /// hands each rank its own, and fails with [`ForwardError::Comm`] once a
    /// rank is gone, which the engine takes as fatal.
    fn forward_ranks(&self, batch: &ForwardBatch, kv: &[RankKv]) -> Result<Logits, ForwardError> {
        let [kv] = kv else {
            return Err(ForwardError::InvalidBatch(format!("{} KV caches for a single-rank model", kv.len())));
        };
        self.forward(batch, &mut kv.write().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// One tensor-parallel rank's KV cache, which the engine's step thread and
/// that rank's thread take turns to lock.
pub type RankKv = std::sync::Arc<std::sync::RwLock<crate::KvStorage>>;

/// One rank's shard of a model, as [`TensorParallel`](crate::model::TensorParallel) steps it: the
/// engine's kernels ([`crate::model::Llama::shard`]) or candle tensors on a
/// device ([`crate::model::DeviceLlama`]).
pub trait RankModel: Send + Sync + 'static {
    /// Rejects a batch this rank could not run; every rank would refuse it
    /// the same way, so rank 0 checks before any rank starts.
    fn check(&self, batch: &ForwardBatch, kv: &KvStorage) -> Result<(), ForwardError>;
    /// One step on this rank's KV cache, all-reducing its partial sums
    /// through `comm`; every rank returns the same logits.
    fn forward_rank(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvStorage,
        comm: &dyn Communicator,
    ) -> Result<Logits, ForwardError>;
    /// A follower's share of a step: [`RankModel::forward_rank`] without the
    /// LM head, since only rank 0's logits are sampled.
    fn follow_rank(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvStorage,
        comm: &dyn Communicator,
    ) -> Result<(), ForwardError>;
    /// The KV cache shape of this rank: its share of the KV heads.
    fn kv_shape(&self, block_size: usize, num_blocks: usize) -> KvCacheShape;
    /// Size of a logits row.
    fn vocab_size(&self) -> usize;
}

//! A target model and the draft model that proposes its speculative tokens, sharing KV blocks:
//! each block holds the target's layers, then the draft's (speculative decoding's draft-model
//! method, see [`crate::SpeculativeMethod::DraftModel`]).
//!
//! Every forward pass of the target runs the draft over the same tokens, except decodes that do
//! not draft this step ([`crate::SeqChunk::draft_kv`]: the draft's share of a large batch is
//! saved while drafting is off), so the draft's KV is valid wherever the target's is, up to a
//! sequence's `draft_lag`: a prompt prefilled here or on a prefill worker (its blocks carry both
//! models' layers across the hand-off), a prefix-cache hit, a recomputed sequence. Proposing is
//! then a few passes of the draft alone ([`Forward::draft`]), the first catching up on the tokens
//! it missed, each feeding the token it proposed; the verifying pass then writes the draft's KV
//! of the last draft only ([`crate::DraftFill::Last`]).

use std::sync::Arc;

use super::{Llama, ModelError, TensorParallel};
use crate::comm::cpu::CpuGroup;
use crate::comm::Communicator;
use crate::forward::{DraftFill, Forward, ForwardBatch, ForwardError, Logits, RankKv, RankModel};
use crate::kv::cache::{KvCacheShape, KvStorage};

/// A target [`Llama`] and its draft, the draft's KV in cache layers after the target's.
pub struct Drafted {
    target: Llama,
    draft: Llama,
}

impl Drafted {
    /// Pairs `target` with `draft`, which must share its vocabulary size and KV geometry (KV
    /// heads and head size), since its KV lives in the target's blocks.
    pub fn new(target: Llama, draft: Llama) -> Result<Self, ModelError> {
        let (t, d) = (target.config(), draft.config());
        let mut differences = Vec::new();
        for (what, ours, theirs) in [
            ("vocabulary size", t.vocab_size, d.vocab_size),
            ("KV heads", t.num_kv_heads, d.num_kv_heads),
            ("head size", t.head_dim, d.head_dim),
        ] {
            if ours != theirs {
                differences.push(format!("{what} {theirs} (the target's is {ours})"));
            }
        }
        if !differences.is_empty() {
            return Err(ModelError::Draft(format!(
                "the draft model's KV shares the target's blocks and its tokens are the target's, but it has {}",
                differences.join(", ")
            )));
        }
        let layers = t.num_layers;
        Ok(Self { target, draft: draft.after_kv_layers(layers) })
    }

    /// The KV cache shape of both models: the target's blocks with the draft's layers after its
    /// own.
    pub fn kv_shape(&self, block_size: usize, num_blocks: usize) -> KvCacheShape {
        let shape = self.target.kv_shape(block_size, num_blocks);
        KvCacheShape { num_layers: self.draft.kv_layers().end, ..shape }
    }

    /// The draft model.
    pub fn draft(&self) -> &Llama {
        &self.draft
    }

    /// The pair on `tp_size` CPU ranks: each rank holds its shard of both models and its share of
    /// both models' KV heads. The target's ranks write the draft's KV after their own; the draft
    /// proposes on a group of its own.
    pub fn place(self, tp_size: usize) -> Result<Arc<dyn Forward>, ModelError> {
        if tp_size <= 1 {
            return Ok(Arc::new(self));
        }
        let ranks = |shard: &dyn Fn(usize) -> Result<Box<dyn RankModel>, ModelError>| {
            CpuGroup::ranks(tp_size)
                .into_iter()
                .enumerate()
                .map(|(rank, comm)| Ok((shard(rank)?, Box::new(comm) as Box<dyn Communicator>)))
                .collect::<Result<Vec<_>, ModelError>>()
        };
        let pair = |rank| -> Result<Box<dyn RankModel>, ModelError> {
            let (target, draft) = (self.target.shard(rank, tp_size)?, self.draft.shard(rank, tp_size)?);
            Ok(Box::new(Self { target, draft }))
        };
        let draft = |rank| -> Result<Box<dyn RankModel>, ModelError> { Ok(Box::new(self.draft.shard(rank, tp_size)?)) };
        let target = TensorParallel::from_ranks(ranks(&pair)?)?;
        let draft = TensorParallel::from_ranks(ranks(&draft)?)?;
        Ok(Arc::new(DraftedRanks { target, draft }))
    }
}

/// Runs `fill` over the chunks of `batch` that write the draft's KV (see
/// [`crate::SeqChunk::draft_kv`]), if any.
fn for_draft_chunks(
    batch: &ForwardBatch,
    fill: impl FnOnce(&ForwardBatch) -> Result<(), ForwardError>,
) -> Result<(), ForwardError> {
    if batch.seqs.iter().all(|s| s.draft_kv == DraftFill::All) {
        return fill(batch);
    }
    let drafted = batch.draft_chunks();
    if drafted.seqs.is_empty() {
        return Ok(());
    }
    fill(&drafted)
}

impl Forward for Drafted {
    fn forward(&self, batch: &ForwardBatch, kv: &mut KvStorage) -> Result<Logits, ForwardError> {
        let logits = self.target.forward(batch, kv)?;
        for_draft_chunks(batch, |b| self.draft.fill_kv(b, kv))?;
        Ok(logits)
    }

    fn vocab_size(&self) -> usize {
        self.target.config().vocab_size
    }

    fn waits_for_layers(&self) -> bool {
        true
    }

    fn draft(&self) -> Option<&dyn Forward> {
        Some(&self.draft)
    }
}

/// One tensor-parallel rank of a [`Drafted`] pair (see [`Drafted::place`]).
impl RankModel for Drafted {
    fn check(&self, batch: &ForwardBatch, kv: &KvStorage) -> Result<(), ForwardError> {
        self.target.check(batch, kv)?;
        self.draft.check(batch, kv)
    }

    fn forward_rank(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvStorage,
        comm: &dyn Communicator,
    ) -> Result<Logits, ForwardError> {
        let logits = self.target.forward_rank(batch, kv, comm)?;
        for_draft_chunks(batch, |b| self.draft.follow_rank(b, kv, comm))?;
        Ok(logits)
    }

    fn follow_rank(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvStorage,
        comm: &dyn Communicator,
    ) -> Result<(), ForwardError> {
        self.target.follow_rank(batch, kv, comm)?;
        for_draft_chunks(batch, |b| self.draft.follow_rank(b, kv, comm))
    }

    fn kv_shape(&self, block_size: usize, num_blocks: usize) -> KvCacheShape {
        Drafted::kv_shape(self, block_size, num_blocks)
    }

    fn vocab_size(&self) -> usize {
        self.target.config().vocab_size
    }
}

/// A [`Drafted`] pair over tensor-parallel ranks: the target's group (each rank writing the
/// draft's KV after its own) and the draft's.
struct DraftedRanks {
    target: TensorParallel,
    draft: TensorParallel,
}

impl Forward for DraftedRanks {
    fn forward(&self, batch: &ForwardBatch, kv: &mut KvStorage) -> Result<Logits, ForwardError> {
        self.target.forward(batch, kv)
    }

    fn vocab_size(&self) -> usize {
        self.target.vocab_size()
    }

    fn waits_for_layers(&self) -> bool {
        self.target.waits_for_layers()
    }

    fn tp_size(&self) -> usize {
        self.target.tp_size()
    }

    fn forward_ranks(&self, batch: &ForwardBatch, kv: &[RankKv]) -> Result<Logits, ForwardError> {
        self.target.forward_ranks(batch, kv)
    }

    fn draft(&self) -> Option<&dyn Forward> {
        Some(&self.draft)
    }
}

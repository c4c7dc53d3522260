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
//! it missed; the verifying pass writes the draft's KV again for every token it feeds.

use super::{Llama, ModelError};
use crate::forward::{Forward, ForwardBatch, ForwardError, Logits};
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
}

impl Forward for Drafted {
    fn forward(&self, batch: &ForwardBatch, kv: &mut KvStorage) -> Result<Logits, ForwardError> {
        let logits = self.target.forward(batch, kv)?;
        if batch.seqs.iter().all(|s| s.draft_kv) {
            self.draft.fill_kv(batch, kv)?;
        } else {
            let drafted = batch.draft_chunks();
            if !drafted.seqs.is_empty() {
                self.draft.fill_kv(&drafted, kv)?;
            }
        }
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

//! The shape of one rank's KV blocks, and the head slicing between tensor
//! parallel sizes. Two ranks exchange blocks only when everything but the TP
//! split agrees; anything else would be silently misread.
//!
//! # The paged layout
//!
//! A rank's KV memory is one region of `num_layers × 2 × num_blocks`
//! *segments*. A segment is the K (`kv = 0`) or V (`kv = 1`) of one block of
//! one layer, `[slot][head][dim]` inside, at
//! [`KvLayout::segment_offset`]. The engine's cache follows this layout, which
//! is what lets the KV server write blocks to a socket, or a same-host peer
//! copy them, straight from the engine's memory.
//!
//! # Heads under tensor parallelism
//!
//! Rank `r` of `n` holds the global KV heads `[r·H/n, (r+1)·H/n)`, `H` the
//! model's KV heads ([`KvLayout::head_range`]). A puller asks each server rank
//! for the intersection of their ranges ([`pull_plan`]).

use proto::kv as pb;
use std::fmt;
use std::ops::Range;

/// Element type of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    F16,
    Bf16,
}

impl KvDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

/// What one rank's KV blocks look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: u32,
    /// KV heads this rank holds (`total_kv_heads / tp_size`).
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub dtype: KvDtype,
    pub block_size: u32,
    pub tp_size: u32,
    pub tp_rank: u32,
    /// KV heads of the whole model.
    pub total_kv_heads: u32,
    /// Speculative decoding's draft model, whose KV is the last layers of every block.
    pub draft: Option<DraftKv>,
}

/// The draft model whose KV follows the target's in every block (see [`KvLayout::draft`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DraftKv {
    /// Its layers, the last of [`KvLayout::num_layers`].
    pub layers: u32,
    /// Which draft: [`DraftKv::id_of`] its file.
    pub id: u64,
}

impl DraftKv {
    /// The id of a draft model file: xxh3-64 of its name and size, which tell the usual
    /// drafts apart (another model or quantization) without reading its weights.
    pub fn id_of(file_name: &str, size: u64) -> u64 {
        let mut bytes = file_name.as_bytes().to_vec();
        bytes.extend(size.to_le_bytes());
        xxhash_rust::xxh3::xxh3_64(&bytes)
    }
}

impl fmt::Display for DraftKv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "draft model {:016x} of {} layers", self.id, self.layers)
    }
}

/// The fields on which two layouts differ, as `name: ours vs theirs`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("incompatible KV layout: {}", .0.join(", "))]
pub struct LayoutMismatch(pub Vec<String>);

impl KvLayout {
    /// The layout of one rank of a model with `total_kv_heads`, split `tp_size` ways.
    pub fn for_rank(mut self, tp_size: u32, tp_rank: u32) -> Self {
        self.tp_size = tp_size;
        self.tp_rank = tp_rank;
        self.num_kv_heads = self.total_kv_heads / tp_size.max(1);
        self
    }

    /// Bytes of one block on this rank: K and V for every layer.
    pub fn block_bytes(&self) -> usize {
        2 * self.num_layers as usize * self.segment_bytes()
    }

    /// Bytes of one token's values for one head.
    pub fn head_bytes(&self) -> usize {
        self.head_dim as usize * self.dtype.size()
    }

    /// Bytes of one segment: one block's K (or V) of one layer, this rank's heads.
    pub fn segment_bytes(&self) -> usize {
        self.block_size as usize * self.num_kv_heads as usize * self.head_bytes()
    }

    /// Byte offset of segment (`layer`, `kv`, `block`) in a region of `num_blocks` blocks.
    pub fn segment_offset(&self, num_blocks: usize, layer: usize, kv: usize, block: usize) -> usize {
        ((layer * 2 + kv) * num_blocks + block) * self.segment_bytes()
    }

    /// The global KV heads this rank holds.
    pub fn head_range(&self) -> Range<u32> {
        let per_rank = self.total_kv_heads / self.tp_size.max(1);
        self.tp_rank * per_rank..(self.tp_rank + 1) * per_rank
    }

    /// Checks that the layout describes a real split: heads divide by TP size
    /// and the rank is inside it.
    pub fn check_valid(&self) -> Result<(), LayoutMismatch> {
        let mut problems = Vec::new();
        if self.tp_size == 0 || self.tp_rank >= self.tp_size {
            problems.push(format!("tp_rank {} outside tp_size {}", self.tp_rank, self.tp_size));
        } else if !self.total_kv_heads.is_multiple_of(self.tp_size) {
            problems.push(format!("{} KV heads do not divide by tp_size {}", self.total_kv_heads, self.tp_size));
        } else if self.num_kv_heads * self.tp_size != self.total_kv_heads {
            problems.push(format!(
                "num_kv_heads {} × tp_size {} is not total_kv_heads {}",
                self.num_kv_heads, self.tp_size, self.total_kv_heads
            ));
        }
        if let Some(d) = self.draft.filter(|d| d.layers == 0 || d.layers >= self.num_layers) {
            problems.push(format!("{d} is not within num_layers {} beside a target's", self.num_layers));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LayoutMismatch(problems))
        }
    }

    /// Checks that `theirs` can exchange blocks with `self`, naming every
    /// difference. TP sizes and ranks may differ: heads are sliced.
    pub fn check_compatible(&self, theirs: &KvLayout) -> Result<(), LayoutMismatch> {
        self.check_valid()?;
        theirs.check_valid()?;
        let mut diffs = Vec::new();
        let mut cmp = |name: &str, a: String, b: String| {
            if a != b {
                diffs.push(format!("{name} {a} vs {b}"));
            }
        };
        cmp("num_layers", self.num_layers.to_string(), theirs.num_layers.to_string());
        cmp("total_kv_heads", self.total_kv_heads.to_string(), theirs.total_kv_heads.to_string());
        cmp("head_dim", self.head_dim.to_string(), theirs.head_dim.to_string());
        cmp("dtype", self.dtype.to_string(), theirs.dtype.to_string());
        cmp("block_size", self.block_size.to_string(), theirs.block_size.to_string());
        let draft = |d: Option<DraftKv>| d.map_or("no draft model".to_string(), |d| d.to_string());
        cmp("speculative decoding", draft(self.draft), draft(theirs.draft));
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(LayoutMismatch(diffs))
        }
    }
}

impl From<KvLayout> for pb::KvLayout {
    fn from(l: KvLayout) -> Self {
        let dtype = match l.dtype {
            KvDtype::F32 => pb::KvDtype::F32,
            KvDtype::F16 => pb::KvDtype::F16,
            KvDtype::Bf16 => pb::KvDtype::Bf16,
        };
        pb::KvLayout {
            num_layers: l.num_layers,
            num_kv_heads: l.num_kv_heads,
            head_dim: l.head_dim,
            dtype: dtype as i32,
            block_size: l.block_size,
            tp_size: l.tp_size,
            tp_rank: l.tp_rank,
            total_kv_heads: l.total_kv_heads,
            draft: l.draft.map(|d| pb::DraftKv { layers: d.layers, id: d.id }),
        }
    }
}

impl TryFrom<pb::KvLayout> for KvLayout {
    type Error = LayoutMismatch;

    fn try_from(l: pb::KvLayout) -> Result<Self, Self::Error> {
        let dtype = match pb::KvDtype::try_from(l.dtype) {
            Ok(pb::KvDtype::F32) => KvDtype::F32,
            Ok(pb::KvDtype::F16) => KvDtype::F16,
            Ok(pb::KvDtype::Bf16) => KvDtype::Bf16,
            _ => return Err(LayoutMismatch(vec![format!("unknown dtype {}", l.dtype)])),
        };
        Ok(KvLayout {
            num_layers: l.num_layers,
            num_kv_heads: l.num_kv_heads,
            head_dim: l.head_dim,
            dtype,
            block_size: l.block_size,
            tp_size: l.tp_size,
            tp_rank: l.tp_rank,
            total_kv_heads: l.total_kv_heads,
            draft: l.draft.map(|d| DraftKv { layers: d.layers, id: d.id }),
        })
    }
}

/// One piece of a puller rank's heads: which server rank holds it and which
/// global heads to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullPiece {
    pub server_rank: u32,
    pub heads: Range<u32>,
}

/// The pieces `puller` needs from a server of `server_tp` ranks: the
/// intersection of its head range with each server rank's, in head order.
/// Together they cover the puller's heads exactly once.
pub fn pull_plan(puller: &KvLayout, server_tp: u32) -> Vec<PullPiece> {
    let mine = puller.head_range();
    (0..server_tp)
        .filter_map(|rank| {
            let theirs = puller.for_rank(server_tp, rank).head_range();
            let heads = mine.start.max(theirs.start)..mine.end.min(theirs.end);
            (heads.start < heads.end).then_some(PullPiece { server_rank: rank, heads })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn smollm() -> KvLayout {
        KvLayout {
            num_layers: 30,
            num_kv_heads: 3,
            head_dim: 64,
            dtype: KvDtype::F32,
            block_size: 16,
            tp_size: 1,
            tp_rank: 0,
            total_kv_heads: 3,
            draft: None,
        }
    }

    #[test]
    fn block_bytes_match_the_model_facts() {
        // 46,080 B per token in f32 for SmolLM2-135M.
        assert_eq!(smollm().block_bytes(), 46_080 * 16);
    }

    #[test]
    fn mismatch_names_every_difference() {
        let theirs = KvLayout { head_dim: 128, dtype: KvDtype::F16, ..smollm() };
        let err = smollm().check_compatible(&theirs).unwrap_err();
        assert_eq!(err.to_string(), "incompatible KV layout: head_dim 64 vs 128, dtype f32 vs f16");
        assert!(smollm().check_compatible(&smollm()).is_ok());
    }

    #[test]
    fn tp_sizes_may_differ_but_heads_must_divide() {
        let one = smollm();
        let three = smollm().for_rank(3, 2);
        assert_eq!((three.num_kv_heads, three.head_range()), (1, 2..3));
        assert!(one.check_compatible(&three).is_ok());
        let err = one.check_compatible(&smollm().for_rank(2, 0)).unwrap_err();
        assert_eq!(err.to_string(), "incompatible KV layout: 3 KV heads do not divide by tp_size 2");
    }

    #[test]
    fn segments_tile_the_region() {
        let l = smollm();
        assert_eq!(l.segment_bytes(), 16 * 3 * 64 * 4);
        assert_eq!(l.segment_offset(10, 0, 1, 0), 10 * l.segment_bytes());
        assert_eq!(l.segment_offset(10, 29, 1, 9) + l.segment_bytes(), 10 * l.block_bytes());
    }

    fn plan(puller_tp: u32, rank: u32, server_tp: u32, total: u32) -> Vec<(u32, Range<u32>)> {
        let layout = KvLayout { total_kv_heads: total, ..smollm() }.for_rank(puller_tp, rank);
        pull_plan(&layout, server_tp).into_iter().map(|p| (p.server_rank, p.heads)).collect()
    }

    #[test]
    fn pull_plans_cover_each_rank_once() {
        // TP 1 -> 3: each decode rank pulls its one head from the one prefill rank.
        assert_eq!(plan(3, 1, 1, 3), vec![(0, 1..2)]);
        // TP 3 -> 1: the one decode rank pulls a head from each prefill rank.
        assert_eq!(plan(1, 0, 3, 3), vec![(0, 0..1), (1, 1..2), (2, 2..3)]);
        assert_eq!(plan(3, 2, 3, 3), vec![(2, 2..3)]);
        // 8 heads: TP 2 -> 4 and 4 -> 2.
        assert_eq!(plan(4, 3, 2, 8), vec![(1, 6..8)]);
        assert_eq!(plan(2, 1, 4, 8), vec![(2, 4..6), (3, 6..8)]);
    }

    #[test]
    fn proto_round_trip() {
        let wire: pb::KvLayout = smollm().into();
        assert_eq!(KvLayout::try_from(wire).unwrap(), smollm());
        let bad = pb::KvLayout { dtype: 99, ..smollm().into() };
        assert!(KvLayout::try_from(bad).is_err());
    }
}

//! The shape of one KV block. Two engines exchange blocks only when their
//! layouts are equal; anything else would be silently misread.

use proto::kv as pb;
use std::fmt;

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

/// What one engine's KV blocks look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub dtype: KvDtype,
    pub block_size: u32,
    pub tp_size: u32,
    pub tp_rank: u32,
}

/// The fields on which two layouts differ, as `name: ours vs theirs`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("incompatible KV layout: {}", .0.join(", "))]
pub struct LayoutMismatch(pub Vec<String>);

impl KvLayout {
    /// Bytes of one block: K and V for every layer.
    pub fn block_bytes(&self) -> usize {
        2 * self.num_layers as usize
            * self.block_size as usize
            * self.num_kv_heads as usize
            * self.head_dim as usize
            * self.dtype.size()
    }

    /// Checks that `theirs` can exchange blocks with `self`, naming every difference.
    pub fn check_compatible(&self, theirs: &KvLayout) -> Result<(), LayoutMismatch> {
        let mut diffs = Vec::new();
        let mut cmp = |name: &str, a: String, b: String| {
            if a != b {
                diffs.push(format!("{name} {a} vs {b}"));
            }
        };
        cmp("num_layers", self.num_layers.to_string(), theirs.num_layers.to_string());
        cmp("num_kv_heads", self.num_kv_heads.to_string(), theirs.num_kv_heads.to_string());
        cmp("head_dim", self.head_dim.to_string(), theirs.head_dim.to_string());
        cmp("dtype", self.dtype.to_string(), theirs.dtype.to_string());
        cmp("block_size", self.block_size.to_string(), theirs.block_size.to_string());
        // Head slicing across different TP sizes is not supported yet: both sides must match.
        cmp("tp_size", self.tp_size.to_string(), theirs.tp_size.to_string());
        cmp("tp_rank", self.tp_rank.to_string(), theirs.tp_rank.to_string());
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
        })
    }
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
    fn proto_round_trip() {
        let wire: pb::KvLayout = smollm().into();
        assert_eq!(KvLayout::try_from(wire).unwrap(), smollm());
        let bad = pb::KvLayout { dtype: 99, ..smollm().into() };
        assert!(KvLayout::try_from(bad).is_err());
    }
}

//! The engine's KV cache seen by kv-transfer.

use engine::{EngineHandle, KvReservation};
use kv_transfer::{BlockSource, DraftKv, KvDtype, KvLayout, KvMemory, PullTarget};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Adapts one tensor-parallel rank of an [`EngineHandle`] to kv-transfer's
/// [`BlockSource`]: that rank's layout and memory.
pub struct EngineBlocks {
    layout: KvLayout,
    memory: KvMemory,
    releases: Arc<Releases>,
}

/// Counts the ranks' releases of each pin: the blocks are one set of ids for
/// every rank, freed in the engine once all ranks have let go of them.
struct Releases {
    engine: EngineHandle,
    /// Releases heard per pinned id list, below the rank count.
    heard: Mutex<HashMap<Vec<u32>, usize>>,
}

impl Releases {
    fn release(&self, ids: &[u32]) {
        let ranks = self.engine.tp_size();
        let done = {
            let mut heard = self.heard.lock().unwrap_or_else(PoisonError::into_inner);
            let count = heard.entry(ids.to_vec()).or_default();
            *count += 1;
            // Two live pins may list the same ids (one prompt twice); they
            // hold the same blocks, so any `ranks` releases may free one.
            let done = *count == ranks;
            if done {
                heard.remove(ids);
            }
            done
        };
        if done {
            self.engine.release_blocks(ids);
        }
    }
}

impl EngineBlocks {
    /// One block source per rank of `engine` (whose blocks carry `draft`'s KV too, if any),
    /// rank order.
    pub fn ranks(engine: &EngineHandle, draft: Option<DraftKv>) -> Vec<Arc<dyn BlockSource>> {
        let releases = Arc::new(Releases { engine: engine.clone(), heard: Mutex::new(HashMap::new()) });
        (0..engine.tp_size())
            .map(|rank| {
                let layout = kv_layout(engine, rank, draft);
                let arena = engine.kv_arena(rank);
                // SAFETY: the arena is the rank's KV cache in kv-transfer's
                // paged layout (the engine's `KvCacheShape::segment_offset`
                // is the same formula; a test below checks it), kept mapped
                // by the clone held as owner, and its memfd is the file it is
                // mapped from.
                let memory =
                    unsafe { KvMemory::new(arena.as_ptr(), arena.len(), &layout, arena.memfd(), Arc::new(arena)) };
                Arc::new(Self { layout, memory, releases: releases.clone() }) as Arc<dyn BlockSource>
            })
            .collect()
    }
}

/// Rank `rank`'s KV layout in kv-transfer's terms: f32, its share of the KV
/// heads, and `draft`'s layers after the target's if the engine has a draft model.
pub fn kv_layout(engine: &EngineHandle, rank: usize, draft: Option<DraftKv>) -> KvLayout {
    let shape = engine.shape();
    let tp_size = engine.tp_size() as u32;
    KvLayout {
        num_layers: shape.num_layers as u32,
        num_kv_heads: shape.num_kv_heads as u32,
        head_dim: shape.head_dim as u32,
        dtype: KvDtype::F32,
        block_size: shape.block_size as u32,
        tp_size,
        tp_rank: rank as u32,
        total_kv_heads: shape.num_kv_heads as u32 * tp_size,
        draft,
    }
}

/// The reserved blocks of `layout`'s rank as a pull target: the hand-off
/// lands straight in that rank's cache. `layout` is the engine's ([`kv_layout`]).
pub fn pull_target<'a>(blocks: &'a KvReservation, layout: &KvLayout) -> PullTarget<'a> {
    let rank = layout.tp_rank as usize;
    let arena = blocks.arena(rank);
    // SAFETY: the arena is the rank's KV cache in kv-transfer's layout (see
    // `EngineBlocks::ranks`), mapped while `blocks` lives, and the reserved
    // blocks are the engine's to leave alone until the reservation is
    // submitted or dropped, which the borrow of `blocks` outlasts.
    let target =
        unsafe { PullTarget::blocks(blocks.as_mut_ptr(rank), arena.len(), layout, blocks.block_ids().to_vec()) };
    target.expect("the engine reserves blocks of its own cache")
}

impl BlockSource for EngineBlocks {
    fn layout(&self) -> KvLayout {
        self.layout
    }

    fn memory(&self) -> KvMemory {
        self.memory.clone()
    }

    fn release_blocks(&self, ids: &[u32]) {
        self.releases.release(ids);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::KvCacheShape;

    #[test]
    fn the_engine_and_kv_transfer_agree_on_segment_offsets() {
        let shape = KvCacheShape { num_layers: 3, num_kv_heads: 2, head_dim: 4, block_size: 5, num_blocks: 7 };
        let layout = KvLayout {
            num_layers: 3,
            num_kv_heads: 2,
            head_dim: 4,
            dtype: KvDtype::F32,
            block_size: 5,
            tp_size: 1,
            tp_rank: 0,
            total_kv_heads: 2,
            draft: None,
        };
        assert_eq!(shape.block_bytes(), layout.block_bytes());
        for (layer, kv, block) in [(0, 0, 0), (0, 1, 3), (2, 1, 6), (1, 0, 4)] {
            assert_eq!(shape.segment_offset(layer, kv, block), layout.segment_offset(7, layer, kv, block));
        }
    }
}

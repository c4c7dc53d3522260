//! The engine's KV cache seen by kv-transfer.

use engine::{EngineHandle, KvReservation};
use kv_transfer::{BlockSource, KvDtype, KvLayout, KvMemory, PullTarget};
use std::sync::Arc;

/// Adapts an [`EngineHandle`] to kv-transfer's [`BlockSource`].
pub struct EngineBlocks {
    engine: EngineHandle,
    layout: KvLayout,
    memory: KvMemory,
}

impl EngineBlocks {
    pub fn new(engine: EngineHandle) -> Self {
        let layout = kv_layout(&engine);
        let arena = engine.kv_arena();
        // SAFETY: the arena is the engine's KV cache in kv-transfer's paged
        // layout (the engine's `KvCacheShape::segment_offset` is the same
        // formula; a test below checks it), kept mapped by the clone held as
        // owner, and its memfd is the file it is mapped from.
        let memory = unsafe { KvMemory::new(arena.as_ptr(), arena.len(), &layout, arena.memfd(), Arc::new(arena)) };
        Self { engine, layout, memory }
    }
}

/// The engine's KV layout in kv-transfer's terms. The engine keeps f32 KV
/// and runs on one rank.
pub fn kv_layout(engine: &EngineHandle) -> KvLayout {
    let shape = engine.shape();
    KvLayout {
        num_layers: shape.num_layers as u32,
        num_kv_heads: shape.num_kv_heads as u32,
        head_dim: shape.head_dim as u32,
        dtype: KvDtype::F32,
        block_size: shape.block_size as u32,
        tp_size: 1,
        tp_rank: 0,
        total_kv_heads: shape.num_kv_heads as u32,
    }
}

/// The reserved blocks as a pull target: the hand-off lands straight in the
/// engine's cache. `layout` is the engine's ([`kv_layout`]).
pub fn pull_target<'a>(blocks: &'a KvReservation, layout: &KvLayout) -> PullTarget<'a> {
    let arena = blocks.arena();
    // SAFETY: the arena is the engine's KV cache in kv-transfer's layout (see
    // `EngineBlocks::new`), mapped while `blocks` lives, and the reserved
    // blocks are the engine's to leave alone until the reservation is
    // submitted or dropped, which the borrow of `blocks` outlasts.
    let target = unsafe { PullTarget::blocks(blocks.as_mut_ptr(), arena.len(), layout, blocks.block_ids().to_vec()) };
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
        self.engine.release_blocks(ids);
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
        };
        assert_eq!(shape.block_bytes(), layout.block_bytes());
        for (layer, kv, block) in [(0, 0, 0), (0, 1, 3), (2, 1, 6), (1, 0, 4)] {
            assert_eq!(shape.segment_offset(layer, kv, block), layout.segment_offset(7, layer, kv, block));
        }
    }
}

//! The engine's KV cache seen by kv-transfer.

use engine::EngineHandle;
use kv_transfer::{BlockSource, KvDtype, KvLayout};

/// Adapts an [`EngineHandle`] to kv-transfer's [`BlockSource`].
pub struct EngineBlocks {
    engine: EngineHandle,
    layout: KvLayout,
}

impl EngineBlocks {
    pub fn new(engine: EngineHandle) -> Self {
        let layout = kv_layout(&engine);
        Self { engine, layout }
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
    }
}

impl BlockSource for EngineBlocks {
    fn layout(&self) -> KvLayout {
        self.layout
    }

    fn read_blocks(&self, ids: &[u32], out: &mut Vec<u8>) -> Result<(), String> {
        self.engine.read_blocks(ids, out).map_err(|e| e.to_string())
    }

    fn release_blocks(&self, ids: &[u32]) {
        self.engine.release_blocks(ids);
    }
}

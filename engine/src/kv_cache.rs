//! Paged KV storage: fixed-size blocks addressed by block id.
//!
//! For each layer, K and V are each one buffer of shape
//! `[num_blocks, block_size, num_kv_heads, head_dim]` (f32). A token at
//! position `p` of a sequence lives in block `block_table[p / block_size]`,
//! slot `p % block_size`.
//!
//! The hand-off format of a block (what [`KvStorage::read_blocks`] writes and
//! [`KvStorage::write_blocks`] reads) is, for each layer in order, the block's
//! K slice then its V slice, as little-endian f32.

/// The shape of the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheShape {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl KvCacheShape {
    /// f32 values of K (or V) in one block of one layer.
    pub fn block_elems(&self) -> usize {
        self.block_size * self.num_kv_heads * self.head_dim
    }

    /// Bytes of one block in the hand-off format (all layers, K and V).
    pub fn block_bytes(&self) -> usize {
        2 * self.num_layers * self.block_elems() * std::mem::size_of::<f32>()
    }
}

/// The KV cache of one engine.
pub struct KvStorage {
    shape: KvCacheShape,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// A block id outside the cache, or a payload of the wrong size.
#[derive(Debug, thiserror::Error)]
pub enum KvStorageError {
    #[error("block id {id} out of range (the cache has {num_blocks} blocks)")]
    BlockOutOfRange { id: u32, num_blocks: usize },
    #[error("KV payload of {got} bytes for {blocks} blocks, expected {expected}")]
    PayloadSize { got: usize, blocks: usize, expected: usize },
}

impl KvStorage {
    /// Allocates a zeroed cache.
    pub fn new(shape: KvCacheShape) -> Self {
        let per_layer = shape.num_blocks * shape.block_elems();
        Self {
            shape,
            k: (0..shape.num_layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..shape.num_layers).map(|_| vec![0.0; per_layer]).collect(),
        }
    }

    pub fn shape(&self) -> &KvCacheShape {
        &self.shape
    }

    /// K and V buffers of one layer, mutable (the forward pass writes new tokens).
    pub fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        (&mut self.k[layer], &mut self.v[layer])
    }

    /// K and V buffers of one layer.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.k[layer], &self.v[layer])
    }

    fn check(&self, ids: &[u32]) -> Result<(), KvStorageError> {
        match ids.iter().find(|&&id| id as usize >= self.shape.num_blocks) {
            Some(&id) => Err(KvStorageError::BlockOutOfRange { id, num_blocks: self.shape.num_blocks }),
            None => Ok(()),
        }
    }

    /// Appends the blocks, in the hand-off format, to `out`.
    pub fn read_blocks(&self, ids: &[u32], out: &mut Vec<u8>) -> Result<(), KvStorageError> {
        self.check(ids)?;
        let n = self.shape.block_elems();
        out.reserve(ids.len() * self.shape.block_bytes());
        for &id in ids {
            let start = id as usize * n;
            for layer in 0..self.shape.num_layers {
                for buf in [&self.k[layer], &self.v[layer]] {
                    for x in &buf[start..start + n] {
                        out.extend_from_slice(&x.to_le_bytes());
                    }
                }
            }
        }
        Ok(())
    }

    /// Fills the blocks from a payload in the hand-off format.
    pub fn write_blocks(&mut self, ids: &[u32], data: &[u8]) -> Result<(), KvStorageError> {
        self.check(ids)?;
        let expected = ids.len() * self.shape.block_bytes();
        if data.len() != expected {
            return Err(KvStorageError::PayloadSize { got: data.len(), blocks: ids.len(), expected });
        }
        let n = self.shape.block_elems();
        let mut chunks = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        for &id in ids {
            let start = id as usize * n;
            for layer in 0..self.shape.num_layers {
                for buf in [&mut self.k[layer], &mut self.v[layer]] {
                    for (dst, src) in buf[start..start + n].iter_mut().zip(&mut chunks) {
                        *dst = src;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_through_the_handoff_format() {
        let shape = KvCacheShape { num_layers: 2, num_kv_heads: 1, head_dim: 2, block_size: 2, num_blocks: 3 };
        let mut a = KvStorage::new(shape);
        for layer in 0..2 {
            let (k, v) = a.layer_mut(layer);
            k.iter_mut().enumerate().for_each(|(i, x)| *x = (layer * 100 + i) as f32);
            v.iter_mut().enumerate().for_each(|(i, x)| *x = -((layer * 100 + i) as f32));
        }
        let mut bytes = Vec::new();
        a.read_blocks(&[2, 0], &mut bytes).unwrap();
        assert_eq!(bytes.len(), 2 * shape.block_bytes());
        let mut b = KvStorage::new(shape);
        b.write_blocks(&[0, 1], &bytes).unwrap();
        // Block 2 of `a` landed in block 0 of `b`, block 0 of `a` in block 1.
        assert_eq!(&b.layer(1).0[0..4], &a.layer(1).0[8..12]);
        assert_eq!(&b.layer(0).1[4..8], &a.layer(0).1[0..4]);
        assert!(matches!(
            b.write_blocks(&[3], &bytes[..shape.block_bytes()]),
            Err(KvStorageError::BlockOutOfRange { id: 3, .. })
        ));
        assert!(matches!(b.write_blocks(&[0], &bytes), Err(KvStorageError::PayloadSize { .. })));
    }
}

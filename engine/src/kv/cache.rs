//! Paged KV storage: fixed-size blocks addressed by block id.
//!
//! The whole cache is ONE contiguous region (the paged layout every KV peer
//! follows). A *segment* is the K (`kv = 0`) or V (`kv = 1`) of one block of
//! one layer, `[slot][head][dim]` f32, [`KvCacheShape::segment_bytes`] long,
//! at byte offset
//!
//! ```text
//! ((layer * 2 + kv) * num_blocks + block) * segment_bytes
//! ```
//!
//! so the K of a layer is one `[num_blocks, block_size, num_kv_heads,
//! head_dim]` array and its V follows. A token at position `p` of a sequence
//! lives in block `block_table[p / block_size]`, slot `p % block_size`.
//!
//! The region is mapped from a memfd where the OS has them, so a same-host
//! peer can map it through `/proc/<pid>/fd/<fd>` ([`KvArena::memfd`]), and
//! from an anonymous mapping otherwise.
//!
//! The hand-off format of blocks (what [`KvStorage::read_blocks`] writes and
//! [`KvStorage::write_blocks`] reads) is LAYER-MAJOR: for each layer, for K
//! then V, for each requested block in order, that segment's bytes
//! (little-endian f32). It is the layout's order restricted to the requested
//! blocks, so both are a run of whole-segment copies.

use std::sync::Arc;

use memmap2::MmapMut;

// The region's bytes are native f32 and the hand-off format is little-endian.
#[cfg(target_endian = "big")]
compile_error!("the KV cache is copied byte for byte as little-endian f32");

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

    /// Bytes of one segment: the K (or V) of one block of one layer.
    pub fn segment_bytes(&self) -> usize {
        self.block_elems() * std::mem::size_of::<f32>()
    }

    /// Bytes of one block in the hand-off format (all layers, K and V).
    pub fn block_bytes(&self) -> usize {
        2 * self.num_layers * self.segment_bytes()
    }

    /// Byte offset of a segment in the region (`kv`: 0 for K, 1 for V).
    pub fn segment_offset(&self, layer: usize, kv: usize, block: usize) -> usize {
        ((layer * 2 + kv) * self.num_blocks + block) * self.segment_bytes()
    }

    /// Bytes of the whole region.
    pub fn total_bytes(&self) -> usize {
        self.num_blocks * self.block_bytes()
    }
}

/// The mapping behind a [`KvStorage`], shared with every [`KvArena`].
struct Region {
    /// Never touched after creation: it keeps the pages mapped until the
    /// last owner drops.
    _map: MmapMut,
    ptr: *mut u8,
    len: usize,
    /// Kept open so `/proc/<pid>/fd/<fd>` stays valid while the region lives.
    memfd: Option<std::fs::File>,
}

// SAFETY: `Region` only carries the address of a mapping it owns; who may
// touch which bytes is governed by `KvStorage` (the only writer, through
// `&mut self`) and the pinning contract documented on `KvArena`.
unsafe impl Send for Region {}
// SAFETY: as above; `Region` itself never reads or writes through `ptr`.
unsafe impl Sync for Region {}

impl Region {
    /// A zeroed region of `len` bytes: a memfd where possible, else
    /// anonymous; its pages are allocated now (see [`Region::prefault`]).
    fn new(len: usize) -> std::io::Result<Self> {
        #[cfg(target_os = "linux")]
        match Self::memfd(len) {
            Ok(region) => return Ok(region.prefault()),
            Err(error) => tracing::warn!(%error, "no memfd for the KV cache; same-host peers cannot map it"),
        }
        let mut map = MmapMut::map_anon(len)?;
        Ok(Self { ptr: map.as_mut_ptr(), _map: map, len, memfd: None }.prefault())
    }

    /// Allocates every page up front, as vLLM reserves its whole KV cache at
    /// start-up: the first write to a fresh page costs about 1 ms per MiB on
    /// a VM (zeroing and the fault), which a KV hand-off landing in fresh
    /// blocks would otherwise pay on its critical path. A kernel without
    /// `MADV_POPULATE_WRITE` (before 5.14) leaves the pages to fault lazily.
    fn prefault(self) -> Self {
        #[cfg(target_os = "linux")]
        {
            let start = std::time::Instant::now();
            match self._map.advise(memmap2::Advice::PopulateWrite) {
                Ok(()) => {
                    tracing::debug!(bytes = self.len, secs = start.elapsed().as_secs_f64(), "KV cache prefaulted")
                }
                Err(error) => tracing::debug!(%error, "KV cache pages left to fault on first use"),
            }
        }
        self
    }

    #[cfg(target_os = "linux")]
    fn memfd(len: usize) -> std::io::Result<Self> {
        use rustix::fs::{memfd_create, MemfdFlags};
        // CLOEXEC: a child process must not inherit the whole KV cache.
        let file = std::fs::File::from(memfd_create("pdserve-kv", MemfdFlags::CLOEXEC)?);
        // A fresh memfd reads as zeros up to its length.
        file.set_len(len as u64)?;
        // SAFETY: the memfd is ours alone (nobody else has its fd yet) and
        // keeps its length: it is never truncated.
        let mut map = unsafe { MmapMut::map_mut(&file)? };
        Ok(Self { ptr: map.as_mut_ptr(), _map: map, len, memfd: Some(file) })
    }
}

/// The KV cache's memory as raw bytes, for a KV server that reads pinned
/// blocks without the engine's lock.
///
/// The bytes follow the layout of the [module docs](self). The mapping stays
/// alive as long as any clone lives, even after the engine is gone.
///
/// # Reading through it
///
/// Only blocks that are pinned (held for a hand-off after their request
/// finished) may be read, and only until they are released: the engine never
/// writes a block while it is pinned, so such a read does not race with the
/// forward pass even though it takes no lock. Any other block may change at
/// any time.
#[derive(Clone)]
pub struct KvArena {
    region: Arc<Region>,
}

impl KvArena {
    /// The first byte of the region.
    pub fn as_ptr(&self) -> *const u8 {
        self.region.ptr
    }

    /// Bytes in the region.
    pub fn len(&self) -> usize {
        self.region.len
    }

    /// Whether the region is empty (a cache with no blocks).
    pub fn is_empty(&self) -> bool {
        self.region.len == 0
    }

    /// The memfd behind the mapping (a same-host peer opens
    /// `/proc/<pid>/fd/<fd>`), if any. It stays open while any clone lives.
    pub fn memfd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.region.memfd.as_ref().map(|f| f.as_raw_fd())
    }
}

impl std::fmt::Debug for KvArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvArena").field("len", &self.len()).field("memfd", &self.memfd()).finish()
    }
}

/// The KV cache of one engine.
pub struct KvStorage {
    shape: KvCacheShape,
    region: Arc<Region>,
    /// Per block: written from outside the forward pass (a hand-off, a
    /// block copy) since a model last took it ([`KvStorage::take_written`]).
    /// A model that mirrors the cache in device memory reloads such blocks;
    /// a model that reads this memory directly ignores the marks.
    written: Vec<bool>,
    /// Unique in the process: a mirror of this cache elsewhere knows it by
    /// this, since a later cache may be mapped at the same address.
    id: u64,
}

/// A block id outside the cache, a payload of the wrong size, or no memory.
#[derive(Debug, thiserror::Error)]
pub enum KvStorageError {
    #[error("block id {id} out of range (the cache has {num_blocks} blocks)")]
    BlockOutOfRange { id: u32, num_blocks: usize },
    #[error("KV payload of {got} bytes for {blocks} blocks, expected {expected}")]
    PayloadSize { got: usize, blocks: usize, expected: usize },
    #[error("mapping {bytes} bytes of KV cache failed: {source}")]
    Map { bytes: usize, source: std::io::Error },
}

impl KvStorage {
    /// Allocates a zeroed cache.
    ///
    /// # Panics
    ///
    /// If the memory cannot be mapped (as a `Vec` would on allocation
    /// failure); see [`KvStorage::try_new`].
    pub fn new(shape: KvCacheShape) -> Self {
        Self::try_new(shape).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Allocates a zeroed cache, or says why the memory could not be mapped.
    pub fn try_new(shape: KvCacheShape) -> Result<Self, KvStorageError> {
        let bytes = shape.total_bytes();
        let region = Region::new(bytes).map_err(|source| KvStorageError::Map { bytes, source })?;
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Self { shape, region: Arc::new(region), written: vec![false; shape.num_blocks], id })
    }

    pub fn shape(&self) -> &KvCacheShape {
        &self.shape
    }

    /// This cache's id, unique in the process.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// A handle on the cache's memory, for a KV server (see [`KvArena`]).
    pub fn arena(&self) -> KvArena {
        KvArena { region: self.region.clone() }
    }

    /// f32 values of K (or V) of one layer.
    fn layer_elems(&self) -> usize {
        self.shape.num_blocks * self.shape.block_elems()
    }

    /// K and V buffers of one layer, mutable (the forward pass writes new tokens).
    pub fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        assert!(layer < self.shape.num_layers, "layer {layer} out of range");
        let n = self.layer_elems();
        // SAFETY: K and V of `layer` are two disjoint in-bounds runs of `n`
        // f32 (the region is page-aligned and `total_bytes` long), and
        // `&mut self` makes this the only reference into the region; arena
        // readers only read pinned blocks, which the engine does not write.
        unsafe {
            let k = self.region.ptr.add(self.shape.segment_offset(layer, 0, 0)).cast::<f32>();
            (std::slice::from_raw_parts_mut(k, n), std::slice::from_raw_parts_mut(k.add(n), n))
        }
    }

    /// K and V buffers of one layer.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        assert!(layer < self.shape.num_layers, "layer {layer} out of range");
        let n = self.layer_elems();
        // SAFETY: as in `layer_mut`; `&self` excludes a writer through `self`.
        unsafe {
            let k = self.region.ptr.add(self.shape.segment_offset(layer, 0, 0)).cast::<f32>().cast_const();
            (std::slice::from_raw_parts(k, n), std::slice::from_raw_parts(k.add(n), n))
        }
    }

    /// The whole region as bytes.
    fn bytes(&self) -> &[u8] {
        // SAFETY: the region is `len` mapped bytes; see `layer`.
        unsafe { std::slice::from_raw_parts(self.region.ptr, self.region.len) }
    }

    /// The whole region as bytes, mutable.
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: the region is `len` mapped bytes; see `layer_mut`.
        unsafe { std::slice::from_raw_parts_mut(self.region.ptr, self.region.len) }
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
        out.reserve(ids.len() * self.shape.block_bytes());
        let bytes = self.bytes();
        for range in segments(self.shape, ids) {
            out.extend_from_slice(&bytes[range]);
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
        let shape = self.shape;
        let bytes = self.bytes_mut();
        for (range, src) in segments(shape, ids).zip(data.chunks_exact(shape.segment_bytes())) {
            bytes[range].copy_from_slice(src);
        }
        self.mark_written(ids);
        Ok(())
    }

    /// Marks blocks as written from outside the forward pass: through the
    /// arena (a hand-off pulled straight into reserved blocks) rather than
    /// through this storage. Ids outside the cache are ignored.
    pub fn mark_written(&mut self, ids: &[u32]) {
        for &id in ids {
            if let Some(w) = self.written.get_mut(id as usize) {
                *w = true;
            }
        }
    }

    /// Of `ids`, the blocks written from outside the forward pass since the
    /// last take (each once, in first-seen order); their marks are cleared.
    pub fn take_written(&mut self, ids: impl IntoIterator<Item = u32>) -> Vec<u32> {
        ids.into_iter().filter(|&id| self.written.get_mut(id as usize).is_some_and(std::mem::take)).collect()
    }

    /// Copies block `src`'s K and V, in every layer, over block `dst`.
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), KvStorageError> {
        self.check(&[src, dst])?;
        let seg = self.shape.segment_bytes();
        for lkv in 0..self.shape.num_layers * 2 {
            let from = self.shape.segment_offset(lkv / 2, lkv % 2, src as usize);
            let to = self.shape.segment_offset(lkv / 2, lkv % 2, dst as usize);
            self.bytes_mut().copy_within(from..from + seg, to);
        }
        self.mark_written(&[dst]);
        Ok(())
    }
}

/// Byte ranges of the blocks' segments in the region, in the hand-off order.
fn segments(shape: KvCacheShape, ids: &[u32]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let seg = shape.segment_bytes();
    (0..shape.num_layers * 2).flat_map(move |lkv| {
        ids.iter().map(move |&id| {
            let start = shape.segment_offset(lkv / 2, lkv % 2, id as usize);
            start..start + seg
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: KvCacheShape =
        KvCacheShape { num_layers: 2, num_kv_heads: 1, head_dim: 2, block_size: 2, num_blocks: 3 };

    /// A cache where K of layer `l` holds `l * 100 + i` at index `i`, V the negation.
    fn filled() -> KvStorage {
        let mut a = KvStorage::new(SHAPE);
        for layer in 0..SHAPE.num_layers {
            let (k, v) = a.layer_mut(layer);
            k.iter_mut().enumerate().for_each(|(i, x)| *x = (layer * 100 + i) as f32);
            v.iter_mut().enumerate().for_each(|(i, x)| *x = -((layer * 100 + i) as f32));
        }
        a
    }

    fn f32_at(arena: &KvArena, offset: usize) -> f32 {
        assert!(offset + 4 <= arena.len());
        // SAFETY: in bounds (checked above); nothing writes the cache meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(arena.as_ptr().add(offset), 4) };
        f32::from_le_bytes(bytes.try_into().unwrap())
    }

    #[test]
    fn the_arena_follows_the_paged_layout() {
        let mut a = KvStorage::new(SHAPE);
        let arena = a.arena();
        assert_eq!(arena.len(), SHAPE.total_bytes());
        assert_eq!(arena.len(), 2 * 2 * 3 * SHAPE.segment_bytes());
        assert!(arena.as_ptr().cast::<f32>().is_aligned());
        let (slot, head, dim) = (1, 0, 1);
        let within = ((slot * SHAPE.num_kv_heads + head) * SHAPE.head_dim + dim) * 4;
        for layer in 0..2 {
            for kv in 0..2 {
                for block in 0..3 {
                    let value = (1000 * layer + 100 * kv + block) as f32 + 0.5;
                    let (k, v) = a.layer_mut(layer);
                    let buf = if kv == 0 { k } else { v };
                    buf[block * SHAPE.block_elems() + within / 4] = value;
                    let offset = ((layer * 2 + kv) * SHAPE.num_blocks + block) * SHAPE.segment_bytes() + within;
                    assert_eq!(offset, SHAPE.segment_offset(layer, kv, block) + within);
                    assert_eq!(f32_at(&arena, offset), value, "layer {layer} kv {kv} block {block}");
                }
            }
        }
        // The mapping outlives the storage.
        drop(a);
        assert_eq!(f32_at(&arena, SHAPE.segment_offset(1, 1, 2) + within), 1102.5);
    }

    #[test]
    fn blocks_round_trip_through_the_layer_major_handoff_format() {
        let a = filled();
        let mut bytes = Vec::new();
        a.read_blocks(&[2, 0], &mut bytes).unwrap();
        assert_eq!(bytes.len(), 2 * SHAPE.block_bytes());
        // Layer-major: layer 0 K of blocks 2 then 0, layer 0 V of 2 then 0, then layer 1.
        let floats: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let n = SHAPE.block_elems();
        let expected: Vec<f32> = [(0, 1.0), (0, -1.0), (100, 1.0), (100, -1.0)]
            .into_iter()
            .flat_map(|(base, sign)| {
                [2, 0].into_iter().flat_map(move |b| (b * n..b * n + n).map(move |i| sign * (base + i) as f32))
            })
            .collect();
        assert_eq!(floats, expected);

        let mut b = KvStorage::new(SHAPE);
        b.write_blocks(&[0, 1], &bytes).unwrap();
        // Block 2 of `a` landed in block 0 of `b`, block 0 of `a` in block 1.
        for layer in 0..2 {
            let (ak, av) = a.layer(layer);
            let (bk, bv) = b.layer(layer);
            assert_eq!((&bk[0..4], &bv[0..4]), (&ak[8..12], &av[8..12]));
            assert_eq!((&bk[4..8], &bv[4..8]), (&ak[0..4], &av[0..4]));
            assert_eq!((&bk[8..12], &bv[8..12]), (&[0.0; 4][..], &[0.0; 4][..]));
        }
        assert!(matches!(
            b.write_blocks(&[3], &bytes[..SHAPE.block_bytes()]),
            Err(KvStorageError::BlockOutOfRange { id: 3, .. })
        ));
        assert!(matches!(b.write_blocks(&[0], &bytes), Err(KvStorageError::PayloadSize { .. })));
    }

    #[test]
    fn copy_block_copies_every_layer() {
        let mut a = filled();
        a.copy_block(2, 0).unwrap();
        for layer in 0..2 {
            let (k, v) = a.layer(layer);
            assert_eq!((&k[0..4], &v[0..4]), (&k[8..12], &v[8..12]));
            assert_eq!(k[4], (layer * 100 + 4) as f32);
        }
        assert!(matches!(a.copy_block(0, 3), Err(KvStorageError::BlockOutOfRange { id: 3, .. })));
    }

    #[test]
    fn writes_from_outside_the_forward_pass_are_marked_until_taken() {
        let mut a = filled();
        assert!(a.take_written(0..3).is_empty(), "a fresh cache has no outside writes");
        let mut bytes = Vec::new();
        a.read_blocks(&[0], &mut bytes).unwrap();
        a.write_blocks(&[1], &bytes).unwrap();
        a.copy_block(1, 2).unwrap();
        a.mark_written(&[0, 99]);
        // Only the blocks asked about are taken; the others keep their marks.
        assert_eq!(a.take_written([2, 2, 1]), vec![2, 1]);
        assert_eq!(a.take_written(0..3), vec![0]);
        assert!(a.take_written(0..3).is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_second_mapping_of_the_memfd_sees_the_same_bytes() {
        let mut a = KvStorage::new(SHAPE);
        let arena = a.arena();
        let fd = arena.memfd().expect("Linux has memfds");
        let file = std::fs::OpenOptions::new().read(true).write(true).open(format!("/proc/self/fd/{fd}")).unwrap();
        // SAFETY: the memfd keeps its length while `a` lives.
        let mut peer = unsafe { MmapMut::map_mut(&file).unwrap() };
        assert_eq!(peer.len(), arena.len());
        a.layer_mut(1).1[5] = 42.0;
        let offset = SHAPE.segment_offset(1, 1, 0) + 5 * 4;
        assert_eq!(f32::from_le_bytes(peer[offset..offset + 4].try_into().unwrap()), 42.0);
        // And the other way: a peer's write shows in the engine's view.
        peer[0..4].copy_from_slice(&7.0f32.to_le_bytes());
        assert_eq!(a.layer(0).0[0], 7.0);
    }
}

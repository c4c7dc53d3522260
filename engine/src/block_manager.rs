//! Physical KV blocks: which are free, and how many owners each used block has.
//!
//! The manager knows nothing about sequences or tokens; the scheduler keeps the
//! block tables. Every used block carries a reference count so that prefix
//! caching can later share one block between sequences (`retain` adds an owner,
//! `free` drops one) without changing this interface.

use std::collections::VecDeque;

/// Free list plus a reference count per block.
///
/// Plain data, owned by the scheduler on the engine thread: no locking.
#[derive(Debug, Clone)]
pub struct BlockManager {
    /// Owners of each block; 0 means the block is on the free list.
    ref_counts: Vec<u32>,
    /// Free block ids, reused oldest-freed first. Prefix caching will turn this
    /// into an eviction order (a freed block keeps its content until reused),
    /// which is why it is a queue and not a stack.
    free: VecDeque<u32>,
}

impl BlockManager {
    /// A manager for blocks `0..num_blocks`, all free.
    ///
    /// # Panics
    /// If `num_blocks` does not fit block ids (`u32`).
    pub fn new(num_blocks: usize) -> Self {
        let n = u32::try_from(num_blocks).expect("block ids are u32: num_blocks must fit");
        Self { ref_counts: vec![0; num_blocks], free: (0..n).collect() }
    }

    /// Takes `n` free blocks, each with one owner, or `None` (taking nothing)
    /// if fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.free.len() {
            return None;
        }
        let ids: Vec<u32> = self.free.drain(..n).collect();
        for &id in &ids {
            debug_assert_eq!(self.ref_counts[id as usize], 0, "free block {id} had owners");
            self.ref_counts[id as usize] = 1;
        }
        Some(ids)
    }

    /// Adds one owner to each of `ids` (a second sequence sharing a block).
    ///
    /// # Panics
    /// If a block is free: sharing a free block would let the allocator hand it
    /// out while it is in use.
    pub fn retain(&mut self, ids: &[u32]) {
        for &id in ids {
            let count = &mut self.ref_counts[id as usize];
            assert!(*count > 0, "retain of free block {id}");
            *count += 1;
        }
    }

    /// Drops one owner of each of `ids`; a block with no owner left goes back
    /// to the free list. Freeing a free block is a bug in the caller: it is
    /// logged and ignored rather than corrupting the free list.
    pub fn free(&mut self, ids: &[u32]) {
        for &id in ids {
            let Some(count) = self.ref_counts.get_mut(id as usize) else {
                tracing::error!(block = id, "free of a block outside the cache");
                continue;
            };
            match *count {
                0 => tracing::error!(block = id, "double free of a KV block"),
                1 => {
                    *count = 0;
                    self.free.push_back(id);
                }
                _ => *count -= 1,
            }
        }
    }

    /// Owners of a block (0 when free).
    pub fn ref_count(&self, id: u32) -> u32 {
        self.ref_counts.get(id as usize).copied().unwrap_or(0)
    }

    /// Blocks on the free list.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Blocks in the cache.
    pub fn num_total(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks with at least one owner.
    pub fn num_used(&self) -> usize {
        self.num_total() - self.num_free()
    }
}

/// Blocks needed to hold `num_tokens` tokens.
pub fn blocks_for(num_tokens: usize, block_size: usize) -> usize {
    num_tokens.div_ceil(block_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_in_order_and_refuses_without_taking_anything() {
        let mut m = BlockManager::new(4);
        assert_eq!(m.allocate(3), Some(vec![0, 1, 2]));
        assert_eq!((m.num_free(), m.num_used(), m.num_total()), (1, 3, 4));
        assert_eq!(m.allocate(2), None);
        assert_eq!(m.num_free(), 1, "a refused allocation takes nothing");
        assert_eq!(m.allocate(1), Some(vec![3]));
        assert_eq!(m.allocate(0), Some(vec![]));
        assert_eq!(m.allocate(1), None);
    }

    #[test]
    fn freed_blocks_are_reused_oldest_first() {
        let mut m = BlockManager::new(4);
        let a = m.allocate(4).unwrap();
        m.free(&[a[2]]);
        m.free(&[a[0]]);
        assert_eq!(m.num_free(), 2);
        assert_eq!(m.allocate(2), Some(vec![2, 0]));
    }

    #[test]
    fn a_shared_block_is_freed_by_its_last_owner() {
        let mut m = BlockManager::new(2);
        let a = m.allocate(1).unwrap();
        assert_eq!(a, vec![0]);
        m.retain(&a);
        assert_eq!(m.ref_count(0), 2);
        m.free(&a);
        assert_eq!((m.ref_count(0), m.num_free()), (1, 1));
        m.free(&a);
        assert_eq!((m.ref_count(0), m.num_free()), (0, 2));
    }

    #[test]
    fn double_free_and_out_of_range_are_ignored() {
        let mut m = BlockManager::new(2);
        let a = m.allocate(1).unwrap();
        m.free(&a);
        m.free(&a);
        m.free(&[7]);
        assert_eq!(m.num_free(), 2);
        assert_eq!(m.allocate(2), Some(vec![1, 0]));
    }

    #[test]
    #[should_panic(expected = "retain of free block 1")]
    fn retaining_a_free_block_panics() {
        let mut m = BlockManager::new(2);
        m.retain(&[1]);
    }

    #[test]
    fn blocks_for_rounds_up() {
        assert_eq!(blocks_for(0, 4), 0);
        assert_eq!(blocks_for(1, 4), 1);
        assert_eq!(blocks_for(4, 4), 1);
        assert_eq!(blocks_for(5, 4), 2);
    }
}

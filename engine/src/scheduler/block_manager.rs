//! Physical KV blocks: ref counts, the prefix cache (block hash -> block) and
//! the eviction order, plus the KV events that tell a router what is cached.
//!
//! The manager knows nothing about sequences; the scheduler keeps the block
//! tables, computes the [`BlockHash`]es of full blocks and calls
//! [`BlockManager::register`] once a block's tokens all have KV.
//!
//! # Block states
//!
//! ```text
//!             allocate                  free (last owner)
//!  free ───────────────────► in use ──────────────────────► free      (no hash)
//!   ▲                        │  ▲  │                        evictable (hashed)
//!   │        evict (LRU)     │  │  └── register: gets a hash   │
//!   └────────────────────────┼──┼───────────────────────────────┘
//!                            │  └── retain (a prefix hit) ◄─────┘
//! ```
//!
//! A block whose last owner lets go keeps its KV and its hash: it is
//! *evictable*, still found by [`BlockManager::lookup`], and only reused for
//! other tokens when no plain free block is left, least recently freed first.
//! Both free and evictable blocks count as available ([`BlockManager::num_free`]).

pub use prompt::block_hash::BlockHash;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// What changed in the prefix cache, for a router's block index. Drained with
/// [`BlockManager::take_events`] in the order things happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvEvent {
    /// A full block's KV is now cached under `block_hash`.
    BlockStored {
        block_hash: BlockHash,
        /// The previous block's hash; `None` for a sequence's first block.
        parent_hash: Option<BlockHash>,
        /// The block's tokens (`block_size` of them).
        token_ids: Vec<u32>,
        /// The physical block, for debugging; routers key on the hash.
        block_id: u32,
    },
    /// These hashes are no longer cached (their blocks were reused).
    BlockRemoved { block_hashes: Vec<BlockHash> },
    /// Nothing is cached any more.
    AllCleared,
}

/// Ref counts, the free list, the prefix cache and its eviction order.
///
/// Plain data, owned by the scheduler on the engine thread: no locking.
#[derive(Debug, Clone)]
pub struct BlockManager {
    /// Owners of each block; 0 means free or evictable.
    ref_counts: Vec<u32>,
    /// The hash each block is cached under (the entry of `cached` for it).
    hashes: Vec<Option<BlockHash>>,
    /// Each evictable block's key in `evictable`.
    stamps: Vec<u64>,
    /// Unowned blocks with no cached content, reused oldest-freed first.
    free: VecDeque<u32>,
    /// Unowned cached blocks by the time they were freed: the first is the
    /// least recently used, the next to evict.
    evictable: BTreeMap<u64, u32>,
    next_stamp: u64,
    /// Hash -> the one block cached under it.
    cached: HashMap<BlockHash, u32>,
    events: Vec<KvEvent>,
    /// Off: nothing is ever registered, looked up or reported.
    caching: bool,
    /// Blocks whose draft-model KV is missing somewhere (see [`Self::mark_draft_stale`]).
    draft_stale: Vec<bool>,
}

impl BlockManager {
    /// A manager for blocks `0..num_blocks`, all free; `caching` turns the
    /// prefix cache on.
    ///
    /// # Panics
    /// If `num_blocks` does not fit block ids (`u32`).
    pub fn new(num_blocks: usize, caching: bool) -> Self {
        let n = u32::try_from(num_blocks).expect("block ids are u32: num_blocks must fit");
        Self {
            ref_counts: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            stamps: vec![0; num_blocks],
            free: (0..n).collect(),
            evictable: BTreeMap::new(),
            next_stamp: 0,
            cached: HashMap::new(),
            events: Vec::new(),
            caching,
            draft_stale: vec![false; num_blocks],
        }
    }

    /// Takes `n` blocks, each with one owner, or `None` (taking nothing) if
    /// fewer than `n` are available. Plain free blocks go first, then
    /// evictable ones, least recently used first (reported as removed).
    pub fn allocate(&mut self, n: usize) -> Option<Vec<u32>> {
        if n > self.num_free() {
            return None;
        }
        let from_free = n.min(self.free.len());
        let mut ids: Vec<u32> = self.free.drain(..from_free).collect();
        let mut removed = Vec::new();
        while ids.len() < n {
            let (_, id) = self.evictable.pop_first()?;
            if let Some(hash) = self.hashes[id as usize].take() {
                self.cached.remove(&hash);
                removed.push(hash);
            }
            ids.push(id);
        }
        if !removed.is_empty() {
            self.events.push(KvEvent::BlockRemoved { block_hashes: removed });
        }
        for &id in &ids {
            debug_assert_eq!(self.ref_counts[id as usize], 0, "free block {id} had owners");
            self.ref_counts[id as usize] = 1;
            self.draft_stale[id as usize] = false;
        }
        Some(ids)
    }

    /// Takes the cached prefix `hits` (from [`Self::lookup`]) and `n` fresh
    /// blocks, returning `hits` followed by the fresh ids; or `None`, taking
    /// nothing, if the fresh blocks do not fit without evicting a hit.
    pub fn allocate_after_prefix(&mut self, hits: &[u32], n: usize) -> Option<Vec<u32>> {
        let idle_hits = hits.iter().filter(|&&id| self.ref_count(id) == 0).count();
        if n > self.num_free() - idle_hits {
            return None;
        }
        self.retain(hits);
        let fresh = self.allocate(n)?;
        Some(hits.iter().copied().chain(fresh).collect())
    }

    /// Adds one owner to each of `ids`: a sequence sharing a block, or
    /// reusing an evictable cached one (which stops being evictable).
    ///
    /// # Panics
    /// If a block is free and uncached: sharing it would let the allocator
    /// hand it out while it is in use.
    pub fn retain(&mut self, ids: &[u32]) {
        for &id in ids {
            let i = id as usize;
            if self.ref_counts[i] == 0 {
                assert!(self.hashes[i].is_some(), "retain of free block {id}");
                self.evictable.remove(&self.stamps[i]);
            }
            self.ref_counts[i] += 1;
        }
    }

    /// Drops one owner of each of `ids`, in order; a block with no owner left
    /// becomes evictable if cached, free otherwise. Freeing a free block is a
    /// bug in the caller: it is logged and ignored rather than corrupting the
    /// lists.
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
                    if self.hashes[id as usize].is_some() {
                        let stamp = self.next_stamp;
                        self.next_stamp += 1;
                        self.stamps[id as usize] = stamp;
                        self.evictable.insert(stamp, id);
                    } else {
                        self.free.push_back(id);
                    }
                }
                _ => *count -= 1,
            }
        }
    }

    /// Frees a sequence's block table from its end, so that its tail is
    /// evicted before its prefix, which more requests are likely to share.
    pub fn free_table(&mut self, table: &[u32]) {
        let reversed: Vec<u32> = table.iter().rev().copied().collect();
        self.free(&reversed);
    }

    /// The blocks cached under the longest prefix of `hashes` (a sequence's
    /// chained full-block hashes); empty with caching off.
    pub fn lookup(&self, hashes: &[BlockHash]) -> Vec<u32> {
        if !self.caching {
            return Vec::new();
        }
        hashes.iter().map_while(|h| self.cached.get(h).copied()).collect()
    }

    /// Caches owned block `id`, whose `block_size` tokens `token_ids` all have
    /// KV, under `hash` and reports it. A no-op with caching off, for a block
    /// already cached, or when another block is cached under `hash` (two
    /// sequences computed the same prefix at once): `id` then stays uncached.
    pub fn register(&mut self, id: u32, hash: BlockHash, parent_hash: Option<BlockHash>, token_ids: &[u32]) {
        let i = id as usize;
        if !self.caching || self.hashes[i].is_some() || self.cached.contains_key(&hash) {
            return;
        }
        debug_assert!(self.ref_counts[i] > 0, "register of unowned block {id}");
        self.hashes[i] = Some(hash);
        self.cached.insert(hash, id);
        self.events.push(KvEvent::BlockStored {
            block_hash: hash,
            parent_hash,
            token_ids: token_ids.to_vec(),
            block_id: id,
        });
    }

    /// Notes that block `id`'s draft-model KV is missing for some of its tokens (its sequence
    /// decoded them without drafting): a sequence reusing it from the prefix cache must feed the
    /// draft from there.
    pub fn mark_draft_stale(&mut self, id: u32) {
        self.draft_stale[id as usize] = true;
    }

    /// Notes that the draft's KV of `ids` is complete again (a sequence caught the draft up over
    /// them).
    pub fn clear_draft_stale(&mut self, ids: &[u32]) {
        for &id in ids {
            self.draft_stale[id as usize] = false;
        }
    }

    /// Whether block `id`'s draft-model KV is missing for some of its tokens.
    pub fn is_draft_stale(&self, id: u32) -> bool {
        self.draft_stale[id as usize]
    }

    /// Forgets every cached block, if none is in use (owned blocks may be
    /// cached, and a router must not lose them from its index). True if done.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.num_used() > 0 {
            return false;
        }
        if !self.cached.is_empty() {
            self.events.push(KvEvent::AllCleared);
        }
        self.cached.clear();
        self.hashes.iter_mut().for_each(|h| *h = None);
        self.free.extend(std::mem::take(&mut self.evictable).into_values());
        true
    }

    /// KV events since the last call, oldest first.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.events)
    }

    /// The hash block `id` is cached under, if any.
    pub fn hash_of(&self, id: u32) -> Option<BlockHash> {
        self.hashes.get(id as usize).copied().flatten()
    }

    /// Owners of a block (0 when free or evictable).
    pub fn ref_count(&self, id: u32) -> u32 {
        self.ref_counts.get(id as usize).copied().unwrap_or(0)
    }

    /// Blocks available to [`Self::allocate`]: free plus evictable.
    pub fn num_free(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Evictable blocks: unowned, still cached.
    pub fn num_cached(&self) -> usize {
        self.evictable.len()
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
        let mut m = BlockManager::new(4, true);
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
        let mut m = BlockManager::new(4, true);
        let a = m.allocate(4).unwrap();
        m.free(&[a[2]]);
        m.free(&[a[0]]);
        assert_eq!(m.num_free(), 2);
        assert_eq!(m.allocate(2), Some(vec![2, 0]));
    }

    #[test]
    fn a_shared_block_is_freed_by_its_last_owner() {
        let mut m = BlockManager::new(2, true);
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
        let mut m = BlockManager::new(2, true);
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
        let mut m = BlockManager::new(2, true);
        m.retain(&[1]);
    }

    fn h(n: u64) -> BlockHash {
        BlockHash(n)
    }

    #[test]
    fn a_registered_block_stays_cached_after_its_last_owner_and_is_reported() {
        let mut m = BlockManager::new(4, true);
        let a = m.allocate(2).unwrap();
        m.register(a[0], h(10), None, &[1, 2]);
        m.register(a[1], h(11), Some(h(10)), &[3, 4]);
        assert_eq!(
            m.take_events(),
            vec![
                KvEvent::BlockStored { block_hash: h(10), parent_hash: None, token_ids: vec![1, 2], block_id: 0 },
                KvEvent::BlockStored {
                    block_hash: h(11),
                    parent_hash: Some(h(10)),
                    token_ids: vec![3, 4],
                    block_id: 1
                },
            ]
        );
        m.free_table(&a);
        assert_eq!((m.num_free(), m.num_cached(), m.num_used()), (4, 2, 0));
        assert_eq!(m.lookup(&[h(10), h(11), h(12)]), vec![0, 1]);
        assert_eq!(m.lookup(&[h(12), h(10)]), Vec::<u32>::new(), "the first miss ends the prefix");
        // A hit takes the cached blocks back; they are no longer evictable.
        assert_eq!(m.allocate_after_prefix(&[0, 1], 1), Some(vec![0, 1, 2]));
        assert_eq!((m.ref_count(0), m.num_cached(), m.num_free()), (1, 0, 1));
        assert!(m.take_events().is_empty());
    }

    #[test]
    fn plain_free_blocks_go_first_then_evictable_ones_least_recently_freed_first() {
        let mut m = BlockManager::new(4, true);
        let a = m.allocate(3).unwrap();
        for (i, &id) in a.iter().enumerate() {
            m.register(id, h(i as u64), None, &[i as u32]);
        }
        m.take_events();
        // Freed from the tail: 2, then 1, then 0 is the LRU order.
        m.free_table(&a);
        assert_eq!(m.allocate(1), Some(vec![3]), "the never-used block first");
        assert!(m.take_events().is_empty());
        assert_eq!(m.allocate(2), Some(vec![2, 1]));
        assert_eq!(m.take_events(), vec![KvEvent::BlockRemoved { block_hashes: vec![h(2), h(1)] }]);
        assert_eq!(m.lookup(&[h(0)]), vec![0]);
        assert_eq!(m.lookup(&[h(1)]), Vec::<u32>::new());
        assert_eq!((m.hash_of(1), m.hash_of(0)), (None, Some(h(0))));
    }

    #[test]
    fn a_prefix_hit_is_never_evicted_to_make_room_for_its_own_sequence() {
        let mut m = BlockManager::new(2, true);
        let a = m.allocate(1).unwrap();
        m.register(a[0], h(7), None, &[1]);
        m.free(&a);
        assert_eq!(m.num_free(), 2);
        // One hit plus two fresh blocks would need the hit itself.
        assert_eq!(m.allocate_after_prefix(&[0], 2), None);
        assert_eq!((m.num_cached(), m.ref_count(0)), (1, 0), "a refusal takes nothing");
        assert_eq!(m.allocate_after_prefix(&[0], 1), Some(vec![0, 1]));
    }

    #[test]
    fn a_hash_is_cached_once_and_a_cached_block_is_registered_once() {
        let mut m = BlockManager::new(3, true);
        let a = m.allocate(2).unwrap();
        m.register(a[0], h(1), None, &[5]);
        m.register(a[1], h(1), None, &[5]);
        m.register(a[0], h(2), None, &[5]);
        assert_eq!(m.take_events().len(), 1);
        assert_eq!((m.hash_of(0), m.hash_of(1)), (Some(h(1)), None));
        m.free(&a);
        assert_eq!((m.num_cached(), m.free.len()), (1, 2), "the duplicate went back to the free list");
    }

    #[test]
    fn with_caching_off_nothing_is_cached_or_reported() {
        let mut m = BlockManager::new(2, false);
        let a = m.allocate(1).unwrap();
        m.register(a[0], h(1), None, &[5]);
        m.free(&a);
        assert_eq!((m.lookup(&[h(1)]), m.num_cached(), m.take_events()), (vec![], 0, vec![]));
    }

    #[test]
    fn reset_prefix_cache_needs_every_block_unowned() {
        let mut m = BlockManager::new(2, true);
        let a = m.allocate(1).unwrap();
        m.register(a[0], h(1), None, &[5]);
        m.take_events();
        assert!(!m.reset_prefix_cache());
        m.free(&a);
        assert!(m.reset_prefix_cache());
        assert_eq!(m.take_events(), vec![KvEvent::AllCleared]);
        assert_eq!((m.lookup(&[h(1)]), m.num_cached(), m.num_free()), (vec![], 0, 2));
    }

    #[test]
    fn blocks_for_rounds_up() {
        assert_eq!(blocks_for(0, 4), 0);
        assert_eq!(blocks_for(1, 4), 1);
        assert_eq!(blocks_for(4, 4), 1);
        assert_eq!(blocks_for(5, 4), 2);
    }
}

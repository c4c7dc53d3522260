//! Which worker serves each leg of a request.
//!
//! [`CacheAware`] (the default) places by the workers' prefix caches, as the
//! [`PrefixIndex`] of each pool sees them, and by load:
//!
//! ```text
//! first leg (prefill pool, or decode pool when colocated), over workers with
//! a free admission slot:
//!     cost(w) = uncached_tokens(w) + load_weight_tokens * load(w)
//!     uncached_tokens(w) = prompt_tokens - block_size * cached_blocks(w)
//!     load(w) = max(requests this router has in flight on w,
//!                   sequences w reported in its last KV event batch)
//! decode pool: least load(w), then most free KV blocks
//! ```
//!
//! Lowest cost wins. The credit for cached blocks is the prefill work they
//! save; the load term prices each request already on the worker as
//! `load_weight_tokens` of prefill. A guard keeps affinity from piling every
//! request on one worker (a hot shared prefix would otherwise draw all the
//! traffic, the "death spiral"): only workers within `max_imbalance` requests
//! of the least busy one compete on cost. Workers whose circuit breaker is
//! open, or whose KV event stream is down, are avoided while any other is
//! fine.
//!
//! Ties, and every choice on an idle cluster, are broken by rendezvous
//! hashing of the prompt's last full block (or its tokens when shorter)
//! against each worker's URL: no counter or clock takes part, so two router
//! replicas with the same view make the same choice, and new conversations
//! spread even when they all start with the same system prompt.
//!
//! A disaggregated request whose uncached part on the chosen decode worker is
//! at most `local_prefill_max_tokens` skips the hand-off: the decode worker
//! prefills it itself, which costs less than a transfer.
//!
//! [`RoundRobin`] ignores caches and load: the baseline of the affinity
//! benchmark.

pub mod prefix_index;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prompt::block_hash::{block_hashes, BlockHash};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::fleet::roster::Roster;
use crate::placement::prefix_index::PrefixIndex;

/// The leg of a request a worker is picked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leg {
    /// The prefill pool.
    Prefill,
    /// The decode pool.
    Decode,
}

/// A request as placement sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Tokens per KV block; 0 when no worker has reported one yet.
    pub block_size: usize,
    /// The salted, chained hashes of the prompt's full blocks.
    pub hashes: Vec<BlockHash>,
    /// The rendezvous key: the prompt's last full block, so conversations
    /// that share only a system prompt still spread over the workers.
    pub key: u64,
}

impl Demand {
    /// Hashes `prompt` in blocks of `block_size` with the request's salt,
    /// exactly as the workers do (`prompt::block_hash`).
    pub fn new(prompt: &[u32], cache_salt: Option<&str>, block_size: Option<u32>) -> Self {
        let salt = cache_salt.unwrap_or_default().as_bytes();
        let block_size = block_size.unwrap_or(0) as usize;
        let hashes = if block_size > 0 { block_hashes(salt, prompt, block_size) } else { Vec::new() };
        let key = match hashes.last() {
            Some(last) => last.0,
            // Shorter than a block: the salt and the tokens themselves.
            None => {
                let mut bytes = salt.to_vec();
                prompt.iter().for_each(|t| bytes.extend_from_slice(&t.to_le_bytes()));
                xxh3_64_with_seed(&bytes, 1)
            }
        };
        Self { prompt_tokens: prompt.len(), block_size, hashes, key }
    }

    /// Prompt tokens not covered by `cached_blocks` leading cached blocks.
    fn uncached_tokens(&self, cached_blocks: usize) -> usize {
        self.prompt_tokens.saturating_sub(cached_blocks * self.block_size)
    }
}

/// Requests each worker of the first leg runs now, as admission counts them,
/// and the cap on them.
#[derive(Debug, Clone, Copy)]
pub struct Slots<'a> {
    /// Per worker.
    pub in_flight: &'a [usize],
    /// A worker at the cap takes nothing more.
    pub cap: usize,
}

impl Slots<'_> {
    fn free(&self, worker: usize) -> bool {
        self.in_flight[worker] < self.cap
    }
}

/// The first leg's choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    /// The worker.
    pub worker: usize,
    /// Leading prompt blocks the index says it has cached.
    pub cached_blocks: usize,
}

/// The decode leg's choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePick {
    /// The decode worker.
    pub worker: usize,
    /// Skip the prefill worker: the uncached part is too small to hand off.
    pub prefill_locally: bool,
}

/// Picks workers. Worker indices are slots of the pools' [`Roster`]s (with
/// static lists, positions in the router's lists of prefill and decode
/// URLs); only filled slots are picked while any is filled.
pub trait Placement: Send + Sync + 'static {
    /// The block size prompts are hashed with; `None` while unknown.
    fn block_size(&self) -> Option<u32> {
        None
    }

    /// The worker of the first leg (`Leg::Prefill`, or `Leg::Decode` when
    /// serving colocated), among those with a free slot. Admission calls
    /// this only when at least one slot is free.
    fn pick_first(&self, leg: Leg, demand: &Demand, slots: &Slots<'_>) -> Pick;

    /// The decode worker of a disaggregated request; `in_flight` counts this
    /// router's decode streams per decode worker.
    fn pick_decode(&self, demand: &Demand, in_flight: &[usize]) -> DecodePick;

    /// A worker of `leg`'s pool (of `num` slots) other than `failed` to
    /// retry a call on that reached no client yet, if there is one.
    fn pick_retry(&self, leg: Leg, demand: &Demand, failed: usize, num: usize) -> Option<usize>;

    /// A call found `worker` unreachable: avoid it until it is seen again.
    fn mark_down(&self, _leg: Leg, _worker: usize) {}
}

/// Cycles through each pool independently, skipping empty slots. Lock-free:
/// one atomic per pool.
#[derive(Debug, Default)]
pub struct RoundRobin {
    prefill: AtomicUsize,
    decode: AtomicUsize,
    /// The pools' rosters; `None`: every slot is filled (static lists).
    rosters: Option<(Arc<Roster>, Arc<Roster>)>,
}

impl RoundRobin {
    /// Round-robin over the filled slots of these pools.
    pub fn over(prefill: Arc<Roster>, decode: Arc<Roster>) -> Self {
        Self { rosters: Some((prefill, decode)), ..Self::default() }
    }

    fn next(&self, leg: Leg) -> usize {
        let counter = match leg {
            Leg::Prefill => &self.prefill,
            Leg::Decode => &self.decode,
        };
        counter.fetch_add(1, Ordering::Relaxed)
    }

    fn roster(&self, leg: Leg) -> Option<&Roster> {
        match (&self.rosters, leg) {
            (None, _) => None,
            (Some((prefill, _)), Leg::Prefill) => Some(prefill),
            (Some((_, decode)), Leg::Decode) => Some(decode),
        }
    }

    fn is_active(&self, leg: Leg, worker: usize) -> bool {
        self.roster(leg).is_none_or(|r| r.is_active(worker))
    }

    fn is_available(&self, leg: Leg, worker: usize) -> bool {
        self.roster(leg).is_none_or(|r| r.available(worker))
    }

    /// The first of `n` slots from the next turn on that is filled and `ok`,
    /// preferring those whose breaker lets requests through.
    fn next_where(&self, leg: Leg, n: usize, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let n = n.max(1);
        let start = self.next(leg);
        let turn = || (0..n).map(|i| (start + i) % n).filter(|&w| self.is_active(leg, w) && ok(w));
        turn().find(|&w| self.is_available(leg, w)).or_else(|| turn().next())
    }
}

impl Placement for RoundRobin {
    fn pick_first(&self, leg: Leg, _: &Demand, slots: &Slots<'_>) -> Pick {
        let n = slots.in_flight.len();
        let worker = self.next_where(leg, n, |w| slots.free(w)).or_else(|| self.next_where(leg, n, |_| true));
        Pick { worker: worker.unwrap_or(0), cached_blocks: 0 }
    }

    fn pick_decode(&self, _: &Demand, in_flight: &[usize]) -> DecodePick {
        let worker = self.next_where(Leg::Decode, in_flight.len(), |_| true).unwrap_or(0);
        DecodePick { worker, prefill_locally: false }
    }

    fn pick_retry(&self, leg: Leg, _: &Demand, failed: usize, num: usize) -> Option<usize> {
        let others = || (1..num).map(|i| (failed + i) % num);
        others().find(|&w| self.is_available(leg, w)).or_else(|| others().find(|&w| self.is_active(leg, w)))
    }
}

/// The knobs of [`CacheAware`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheAwareConfig {
    /// Prefill tokens one in-flight request is worth in the cost.
    pub load_weight_tokens: usize,
    /// Most requests a worker may run beyond the least busy one and still be
    /// chosen for its cache.
    pub max_imbalance: usize,
    /// Uncached prompt tokens at or below which a disaggregated request is
    /// prefilled by its decode worker.
    pub local_prefill_max_tokens: usize,
}

/// Default of `--load-weight-tokens`.
pub const DEFAULT_LOAD_WEIGHT_TOKENS: usize = 64;
/// Default of `--max-load-imbalance`.
pub const DEFAULT_MAX_IMBALANCE: usize = 8;
/// Default of `--local-prefill-max-tokens`.
pub const DEFAULT_LOCAL_PREFILL_MAX_TOKENS: usize = 32;

impl Default for CacheAwareConfig {
    fn default() -> Self {
        Self {
            load_weight_tokens: DEFAULT_LOAD_WEIGHT_TOKENS,
            max_imbalance: DEFAULT_MAX_IMBALANCE,
            local_prefill_max_tokens: DEFAULT_LOCAL_PREFILL_MAX_TOKENS,
        }
    }
}

/// One pool: its index, and its roster for who is in it and each worker's
/// rendezvous identity.
#[derive(Debug)]
struct Pool {
    index: Arc<PrefixIndex>,
    roster: Arc<Roster>,
}

impl Pool {
    fn rendezvous(&self, demand: &Demand, worker: usize) -> u64 {
        xxh3_64_with_seed(&demand.key.to_le_bytes(), self.roster.id(worker))
    }

    /// The filled slots among `0..n`.
    fn members(&self, n: usize) -> Vec<usize> {
        (0..n).filter(|&w| self.roster.is_active(w)).collect()
    }

    /// `candidates`, narrowed to the workers whose breaker lets requests
    /// through and whose stream is up, else to those whose breaker does,
    /// else none narrowed: a pool all down still gets tried.
    fn prefer_up(&self, candidates: Vec<usize>) -> Vec<usize> {
        let available: Vec<usize> = candidates.iter().copied().filter(|&w| self.roster.available(w)).collect();
        let up: Vec<usize> = available.iter().copied().filter(|&w| self.index.is_up(w)).collect();
        [up, available].into_iter().find(|tier| !tier.is_empty()).unwrap_or(candidates)
    }

    fn load(&self, worker: usize, in_flight: usize) -> usize {
        in_flight.max(self.index.load(worker).num_sequences as usize)
    }

    /// The cheapest of `candidates` by the module's cost; `in_flight(w)` is
    /// the router's own count.
    fn cheapest(
        &self,
        config: &CacheAwareConfig,
        demand: &Demand,
        candidates: Vec<usize>,
        in_flight: impl Fn(usize) -> usize,
    ) -> Option<Pick> {
        let candidates = self.prefer_up(candidates);
        let least = candidates.iter().map(|&w| in_flight(w)).min()?;
        candidates
            .into_iter()
            .filter(|&w| in_flight(w) <= least + config.max_imbalance)
            .map(|w| {
                let cached_blocks = self.index.cached_blocks(w, &demand.hashes);
                let cost =
                    demand.uncached_tokens(cached_blocks) + config.load_weight_tokens * self.load(w, in_flight(w));
                (cost, std::cmp::Reverse(self.rendezvous(demand, w)), Pick { worker: w, cached_blocks })
            })
            .min_by_key(|&(cost, rank, _)| (cost, rank))
            .map(|(_, _, pick)| pick)
    }
}

/// Prefix-cache- and load-aware placement (see the module doc).
#[derive(Debug)]
pub struct CacheAware {
    prefill: Pool,
    decode: Pool,
    config: CacheAwareConfig,
}

impl CacheAware {
    /// Placement over the static pools at `prefill_urls` / `decode_urls`,
    /// whose prefix caches `prefill_index` / `decode_index` follow.
    pub fn new(
        prefill_index: Arc<PrefixIndex>,
        prefill_urls: &[String],
        decode_index: Arc<PrefixIndex>,
        decode_urls: &[String],
        config: CacheAwareConfig,
    ) -> Self {
        let prefill = (prefill_index, Arc::new(Roster::fixed(prefill_urls)));
        let decode = (decode_index, Arc::new(Roster::fixed(decode_urls)));
        Self::over(prefill, decode, config)
    }

    /// Placement over pools whose members come and go: each pool's prefix
    /// index and roster, slot for slot.
    pub fn over(
        (prefill_index, prefill_roster): (Arc<PrefixIndex>, Arc<Roster>),
        (decode_index, decode_roster): (Arc<PrefixIndex>, Arc<Roster>),
        config: CacheAwareConfig,
    ) -> Self {
        Self {
            prefill: Pool { index: prefill_index, roster: prefill_roster },
            decode: Pool { index: decode_index, roster: decode_roster },
            config,
        }
    }

    fn pool(&self, leg: Leg) -> &Pool {
        match leg {
            Leg::Prefill => &self.prefill,
            Leg::Decode => &self.decode,
        }
    }
}

impl Placement for CacheAware {
    fn block_size(&self) -> Option<u32> {
        self.prefill.index.block_size().or_else(|| self.decode.index.block_size())
    }

    fn pick_first(&self, leg: Leg, demand: &Demand, slots: &Slots<'_>) -> Pick {
        let members = self.pool(leg).members(slots.in_flight.len());
        let free: Vec<usize> = members.iter().copied().filter(|&w| slots.free(w)).collect();
        let candidates = if free.is_empty() { members } else { free };
        self.pool(leg)
            .cheapest(&self.config, demand, candidates, |w| slots.in_flight[w])
            .unwrap_or(Pick { worker: 0, cached_blocks: 0 })
    }

    fn pick_decode(&self, demand: &Demand, in_flight: &[usize]) -> DecodePick {
        let pool = &self.decode;
        let candidates = pool.prefer_up(pool.members(in_flight.len()));
        let worker = candidates
            .into_iter()
            .min_by_key(|&w| {
                let free_blocks = pool.index.load(w).free_blocks;
                (
                    pool.load(w, in_flight[w]),
                    std::cmp::Reverse(free_blocks),
                    std::cmp::Reverse(pool.rendezvous(demand, w)),
                )
            })
            .unwrap_or(0);
        let cached_blocks = pool.index.cached_blocks(worker, &demand.hashes);
        let prefill_locally = demand.uncached_tokens(cached_blocks) <= self.config.local_prefill_max_tokens;
        DecodePick { worker, prefill_locally }
    }

    fn pick_retry(&self, leg: Leg, demand: &Demand, failed: usize, num: usize) -> Option<usize> {
        let pool = self.pool(leg);
        let others = pool.members(num).into_iter().filter(|&w| w != failed).collect();
        pool.cheapest(&self.config, demand, others, |_| 0).map(|pick| pick.worker)
    }

    fn mark_down(&self, leg: Leg, worker: usize) {
        self.pool(leg).index.mark_down(worker);
    }
}

#[cfg(test)]
mod tests;

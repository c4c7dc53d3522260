//! The cost function's choices over hand-fed indexes.

use prompt::block_hash::block_hashes;
use proto::worker::kv_event::Event;
use proto::worker::{BlockStored, KvEvent, KvEventBatch, WorkerLoad};

use super::*;

const BLOCK: u32 = 4;

fn urls(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("http://10.0.0.{i}:7001")).collect()
}

/// Worker `w` of `index` up, with `prompt`'s first `blocks` blocks cached
/// under `salt`, and `sequences` running.
fn cache(index: &PrefixIndex, w: usize, salt: &str, prompt: &[u32], blocks: usize, sequences: u32) {
    let events = block_hashes(salt.as_bytes(), prompt, BLOCK as usize)
        .into_iter()
        .take(blocks)
        .map(|h| KvEvent { event: Some(Event::Stored(BlockStored { block_hash: h.0, parent_hash: None })) })
        .collect();
    let load = WorkerLoad {
        num_sequences: sequences,
        num_running: sequences,
        free_blocks: 50,
        total_blocks: 100,
        pinned_blocks: 0,
    };
    let batch = KvEventBatch {
        epoch: 1,
        seq: 1,
        snapshot: true,
        events,
        load: Some(load),
        block_size: BLOCK,
        heartbeat_ms: 500,
    };
    index.apply(w, &batch).unwrap();
}

fn policy(prefill: usize, decode: usize, config: CacheAwareConfig) -> (Arc<PrefixIndex>, Arc<PrefixIndex>, CacheAware) {
    let p = Arc::new(PrefixIndex::new(prefill));
    let d = Arc::new(PrefixIndex::new(decode));
    let placement = CacheAware::new(p.clone(), &urls(prefill), d.clone(), &urls(decode), config);
    (p, d, placement)
}

fn prompt(first: u32, len: u32) -> Vec<u32> {
    (first..first + len).collect()
}

fn pick(placement: &CacheAware, demand: &Demand, in_flight: &[usize]) -> Pick {
    placement.pick_first(Leg::Prefill, demand, &Slots { in_flight, cap: 64 })
}

#[test]
fn the_worker_holding_the_prefix_wins_on_an_idle_cluster() {
    let (p, _, placement) = policy(3, 1, CacheAwareConfig::default());
    let prompt = prompt(100, 40);
    for w in 0..3 {
        cache(&p, w, "", &prompt, if w == 2 { 8 } else { 0 }, 0);
    }
    let demand = Demand::new(&prompt, None, placement.block_size());
    assert_eq!(demand.hashes.len(), 10);
    assert_eq!(pick(&placement, &demand, &[0, 0, 0]), Pick { worker: 2, cached_blocks: 8 });
}

#[test]
fn another_tenants_cache_earns_no_credit() {
    let (p, _, placement) = policy(2, 1, CacheAwareConfig::default());
    let prompt = prompt(100, 40);
    cache(&p, 0, "tenant-a", &prompt, 10, 0);
    cache(&p, 1, "", &prompt, 0, 0);
    let a = Demand::new(&prompt, Some("tenant-a"), placement.block_size());
    let b = Demand::new(&prompt, Some("tenant-b"), placement.block_size());
    assert_eq!(pick(&placement, &a, &[0, 0]), Pick { worker: 0, cached_blocks: 10 });
    let for_b = pick(&placement, &b, &[0, 0]);
    assert_eq!(for_b.cached_blocks, 0, "tenant b must see none of tenant a's blocks");
    // With the cache out of the picture b goes where its own rendezvous says,
    // not necessarily to worker 0: check that holds for many b-prompts.
    let spread: std::collections::HashSet<usize> = (0..32)
        .map(|i| pick(&placement, &Demand::new(&prompt, Some(&format!("tenant-{i}")), Some(BLOCK)), &[0, 0]).worker)
        .collect();
    assert_eq!(spread.len(), 2, "uncached requests spread over both workers");
}

#[test]
fn two_replicas_with_the_same_view_choose_alike_and_spread_new_prompts() {
    let build = || {
        let (p, _, placement) = policy(4, 1, CacheAwareConfig::default());
        cache(&p, 1, "", &prompt(0, 64), 16, 0);
        for w in [0, 2, 3] {
            cache(&p, w, "", &prompt(0, 64), 2, 0);
        }
        placement
    };
    let (a, b) = (build(), build());
    let mut chosen = std::collections::HashSet::new();
    for first in 0..64 {
        let prompt = prompt(first * 7, 48);
        let demand = Demand::new(&prompt, None, Some(BLOCK));
        let on_a = pick(&a, &demand, &[0, 0, 0, 0]);
        assert_eq!(on_a, pick(&b, &demand, &[0, 0, 0, 0]));
        chosen.insert(on_a.worker);
    }
    assert_eq!(chosen.len(), 4, "new prompts reach every worker: {chosen:?}");
}

#[test]
fn load_outweighs_a_small_cache_hit() {
    let (p, _, placement) = policy(2, 1, CacheAwareConfig::default());
    let prompt = prompt(0, 40);
    cache(&p, 0, "", &prompt, 2, 0);
    cache(&p, 1, "", &prompt, 0, 0);
    let demand = Demand::new(&prompt, None, Some(BLOCK));
    assert_eq!(pick(&placement, &demand, &[0, 0]).worker, 0, "8 cached tokens decide when idle");
    // One more request on worker 0 is worth 64 tokens, more than 8 cached.
    assert_eq!(pick(&placement, &demand, &[1, 0]).worker, 1);
    // Sequences a worker reports (e.g. another router's) count as load too.
    cache(&p, 0, "", &prompt, 2, 3);
    assert_eq!(pick(&placement, &demand, &[0, 0]).worker, 1);
}

#[test]
fn affinity_never_piles_past_the_imbalance_guard() {
    let config = CacheAwareConfig { load_weight_tokens: 0, max_imbalance: 2, ..Default::default() };
    let (p, _, placement) = policy(2, 1, config);
    let prompt = prompt(0, 400);
    cache(&p, 0, "", &prompt, 100, 0);
    cache(&p, 1, "", &prompt, 0, 0);
    let demand = Demand::new(&prompt, None, Some(BLOCK));
    // Load is free in this config, so only the guard stops the pile-up.
    assert_eq!(pick(&placement, &demand, &[2, 0]).worker, 0);
    assert_eq!(pick(&placement, &demand, &[3, 0]).worker, 1);
}

#[test]
fn full_and_down_workers_are_avoided() {
    let (p, _, placement) = policy(3, 1, CacheAwareConfig::default());
    let prompt = prompt(0, 40);
    for (w, blocks) in [(0, 10), (1, 5), (2, 0)] {
        cache(&p, w, "", &prompt, blocks, 0);
    }
    let demand = Demand::new(&prompt, None, Some(BLOCK));
    let slots = Slots { in_flight: &[4, 0, 0], cap: 4 };
    assert_eq!(placement.pick_first(Leg::Prefill, &demand, &slots).worker, 1, "worker 0 is full");
    placement.mark_down(Leg::Prefill, 1);
    assert_eq!(placement.pick_first(Leg::Prefill, &demand, &slots).worker, 2, "worker 1 is down");
    // When no candidate is known to be up, placement still answers.
    placement.mark_down(Leg::Prefill, 2);
    assert!([1, 2].contains(&placement.pick_first(Leg::Prefill, &demand, &slots).worker));
}

#[test]
fn a_retry_goes_to_another_worker() {
    let (p, _, placement) = policy(3, 1, CacheAwareConfig::default());
    let prompt = prompt(0, 40);
    for (w, blocks) in [(0, 10), (1, 2), (2, 6)] {
        cache(&p, w, "", &prompt, blocks, 0);
    }
    let demand = Demand::new(&prompt, None, Some(BLOCK));
    assert_eq!(placement.pick_retry(Leg::Prefill, &demand, 0, 3), Some(2), "the next best cache");
    assert_eq!(
        CacheAware::new(p.clone(), &urls(1), p, &urls(1), Default::default()).pick_retry(Leg::Prefill, &demand, 0, 1),
        None
    );
}

#[test]
fn decode_goes_to_the_least_loaded_and_small_remainders_prefill_there() {
    let config = CacheAwareConfig { local_prefill_max_tokens: 8, ..Default::default() };
    let (_, d, placement) = policy(1, 2, config);
    let prompt = prompt(0, 42);
    cache(&d, 0, "", &prompt, 9, 2);
    cache(&d, 1, "", &prompt, 0, 0);
    let demand = Demand::new(&prompt, None, Some(BLOCK));
    assert_eq!(placement.pick_decode(&demand, &[0, 0]), DecodePick { worker: 1, prefill_locally: false });
    // Worker 1 now busier than worker 0's reported 2: worker 0, whose cache
    // leaves 42 - 36 = 6 tokens, at most 8, so no hand-off.
    assert_eq!(placement.pick_decode(&demand, &[0, 3]), DecodePick { worker: 0, prefill_locally: true });
    // Threshold 0 always hands off.
    let (_, d, strict) = policy(1, 2, CacheAwareConfig { local_prefill_max_tokens: 0, ..Default::default() });
    cache(&d, 0, "", &prompt, 10, 0);
    assert!(!strict.pick_decode(&demand, &[0, 5]).prefill_locally);
}

#[test]
fn round_robin_cycles_and_skips_full_workers() {
    let rr = RoundRobin::default();
    let demand = Demand::new(&[1, 2, 3], None, None);
    let slots = Slots { in_flight: &[0, 0, 0], cap: 1 };
    let picks: Vec<_> = (0..4).map(|_| rr.pick_first(Leg::Prefill, &demand, &slots).worker).collect();
    assert_eq!(picks, [0, 1, 2, 0]);
    let slots = Slots { in_flight: &[0, 1, 0], cap: 1 };
    assert_eq!(rr.pick_first(Leg::Prefill, &demand, &slots).worker, 2, "turn 1 is full: the next free one");
    assert_eq!(rr.pick_decode(&demand, &[0, 0]).worker, 0);
    assert_eq!(rr.pick_decode(&demand, &[0, 0]).worker, 1);
    assert_eq!(rr.pick_retry(Leg::Prefill, &demand, 2, 3), Some(0));
    assert_eq!(rr.pick_retry(Leg::Prefill, &demand, 0, 1), None);
}

#[test]
fn a_worker_whose_breaker_is_open_is_avoided_while_another_is_fine() {
    use crate::fleet::breaker::Failure;
    let demand = Demand::new(&prompt(0, 40), None, Some(BLOCK));
    let slots = Slots { in_flight: &[0, 0], cap: 8 };
    // Round-robin over rosters: the open worker's turns go to the other.
    let (prefill, decode) = (Arc::new(Roster::fixed(&urls(2))), Arc::new(Roster::fixed(&urls(2))));
    let rr = RoundRobin::over(prefill.clone(), decode.clone());
    prefill.breaker(0).failed(Failure::Unreachable);
    let picks: Vec<_> = (0..4).map(|_| rr.pick_first(Leg::Prefill, &demand, &slots).worker).collect();
    assert_eq!(picks, [1, 1, 1, 1]);
    assert_eq!(rr.pick_retry(Leg::Prefill, &demand, 1, 2), Some(0), "the only other one, open or not");
    decode.breaker(1).failed(Failure::Unreachable);
    assert!((0..3).all(|_| rr.pick_decode(&demand, &[0, 0]).worker == 0));

    // Cache-aware: the open worker loses even with the whole prompt cached.
    let p = Arc::new(PrefixIndex::new(2));
    let d = Arc::new(PrefixIndex::new(2));
    let prompt = prompt(0, 40);
    cache(&p, 0, "", &prompt, 2, 0);
    cache(&p, 1, "", &prompt, 0, 0);
    cache(&d, 0, "", &prompt, 0, 0);
    cache(&d, 1, "", &prompt, 0, 0);
    let (prefill, decode) = (Arc::new(Roster::fixed(&urls(2))), Arc::new(Roster::fixed(&urls(2))));
    let placement = CacheAware::over((p, prefill.clone()), (d, decode.clone()), Default::default());
    assert_eq!(pick(&placement, &demand, &[0, 0]).worker, 0, "its cache wins while closed");
    prefill.breaker(0).failed(Failure::Unreachable);
    assert_eq!(pick(&placement, &demand, &[0, 0]).worker, 1);
    // Every worker open: still placed, so a request is tried rather than lost.
    prefill.breaker(1).failed(Failure::Unreachable);
    assert_eq!(pick(&placement, &demand, &[0, 0]).worker, 0);
}

//! What the handles and the step thread share (see the [`crate::engine`] docs).

use crate::kv::cache::{KvArena, KvCacheShape, KvStorage};
use crate::scheduler::block_manager::KvEvent;
use crate::scheduler::SpeculationStats;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};

/// KV events kept for [`EngineHandle::take_kv_events`](crate::EngineHandle::take_kv_events) before the oldest are
/// dropped (about 6 MB with 16-token blocks).
pub const MAX_PENDING_KV_EVENTS: usize = 1 << 16;

/// What the handles and the step thread share.
pub(super) struct Shared {
    pub(super) shape: KvCacheShape,
    pub(super) max_model_len: usize,
    pub(super) vocab_size: usize,
    /// The model is an encoder ([`crate::Forward::encoder`]): it serves embeddings only.
    pub(super) encoder: bool,
    /// Most tokens of one step: an encoder's prompt must fit in one.
    pub(super) max_num_batched_tokens: usize,
    /// One cache per tensor-parallel rank, rank order.
    pub(super) kv: Vec<Arc<RwLock<KvStorage>>>,
    /// `kv`'s memory, taken once so handing it out needs no lock.
    pub(super) kv_arenas: Arc<[KvArena]>,
    /// Set once, when a step fails in a way no later step can recover from.
    pub(super) failure: OnceLock<String>,
    /// Ids submitted and not yet finished: the duplicate check and `num_sequences`.
    pub(super) live: Mutex<HashSet<String>>,
    pub(super) num_running: AtomicUsize,
    pub(super) num_waiting: AtomicUsize,
    pub(super) pending_prefill_tokens: AtomicUsize,
    pub(super) free_blocks: AtomicUsize,
    pub(super) cached_blocks: AtomicUsize,
    pub(super) held_blocks: AtomicUsize,
    /// KV events not yet taken (a short std mutex: push or take only).
    pub(super) kv_events: Mutex<Vec<KvEvent>>,
    pub(super) num_preemptions: AtomicU64,
    /// The scheduler's speculation counters, as of the last step.
    pub(super) speculation: Mutex<SpeculationStats>,
}

impl Shared {
    pub(super) fn live(&self) -> MutexGuard<'_, HashSet<String>> {
        // The set stays consistent even if a holder panicked: every critical
        // section is a single insert, remove or len.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

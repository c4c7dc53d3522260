//! The serving loop both worker kinds share.
//!
//! [`Engine::start`] spawns one OS thread that owns the [`Scheduler`] and the
//! samplers, and steps the model; an [`EngineHandle`] (cloneable, `Send +
//! Sync`) talks to it.
//!
//! # Shared state
//!
//! - **Commands** (submit, abort, release) go to the step thread over a std
//!   channel: it is an actor, so the scheduler needs no lock and a command is
//!   applied between two steps. When idle, the thread blocks on that channel.
//! - **KV storage**, one per tensor-parallel rank ([`Forward::tp_size`]), each
//!   in an `Arc<RwLock<KvStorage>>` (std): the step thread write-locks them
//!   only around `write_blocks` and `forward` (a follower rank locks its own
//!   for its share of the step), and
//!   [`EngineHandle::read_blocks`] read-locks it from any thread (the KV server
//!   serving pinned blocks). A read therefore waits at most one step. Nothing
//!   awaits under the lock, so a std lock fits; a poisoned lock (a panic in
//!   the model) is recovered from, because the blocks involved are freed.
//!   [`EngineHandle::kv_arena`] hands out the same memory without the lock,
//!   for pinned blocks only (see [`KvArena`](crate::KvArena)).
//! - **Stats** are atomics plus the set of live request ids (a short std
//!   mutex, also used to reject duplicate ids at submit). The step thread
//!   publishes them before it sends any event, so whoever has received
//!   `Finished` sees stats that already account for it.
//!
//! [`EngineHandle`] is in `handle`, the step thread in `step`, and what both hold in `shared`.

mod handle;
mod shared;
mod step;

pub use handle::{EngineHandle, EngineStats};
pub use shared::MAX_PENDING_KV_EVENTS;

use crate::forward::Forward;
use crate::kv::cache::{KvCacheShape, KvStorage};
use crate::scheduler::{Scheduler, SchedulerConfig, SpeculativeConfig};
use shared::Shared;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{mpsc, Arc, Mutex, OnceLock, RwLock};
use step::StepLoop;

/// Limits and defaults of one engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// Most sequences in one batch (at least 1).
    pub max_num_seqs: usize,
    /// Most tokens in one forward pass (at least 1; the workers default to
    /// 2048). Running decodes come first, and prompts are prefilled in
    /// chunks that fit what is left (chunked prefill).
    pub max_num_batched_tokens: usize,
    /// Longest a sequence (prompt + generated) may grow; generation stops
    /// with `Length` there.
    pub max_model_len: usize,
    /// Tokens that end every request with `Stop`.
    pub eos_token_ids: Vec<u32>,
    /// Seeds requests that bring none, combined with their arrival order.
    pub default_seed: u64,
    /// Reuse the KV of cached full blocks whose salted prefix matches a new
    /// prompt's, and report cached / evicted blocks as [`KvEvent`](crate::KvEvent)s. Default
    /// on in the workers; `false` computes every prompt and reports nothing.
    pub enable_prefix_caching: bool,
    /// Speculate on decodes with drafts found in each sequence's own tokens (see
    /// [`SpeculativeConfig`]); `None`: one token per decode step.
    pub speculative: Option<SpeculativeConfig>,
}

/// Starts engines.
pub struct Engine;

impl Engine {
    /// Allocates the KV cache (`shape` for each of the model's
    /// [`Forward::tp_size`] ranks) and spawns the thread running the step loop.
    /// The thread ends once every handle is dropped and no work is left.
    ///
    /// # Panics
    /// If `shape.block_size`, `config.max_num_seqs` or
    /// `config.max_num_batched_tokens` is 0, if the config names a draft model and `model` is
    /// not paired with one ([`crate::model::Loaded::with_draft_of`]) or the other way round, or
    /// the OS refuses
    /// to spawn a thread.
    pub fn start(model: Arc<dyn Forward>, shape: KvCacheShape, config: EngineConfig) -> EngineHandle {
        assert!(shape.block_size > 0, "KV block_size must be at least 1");
        assert!(config.max_num_seqs > 0, "max_num_seqs must be at least 1");
        assert!(config.max_num_batched_tokens > 0, "max_num_batched_tokens must be at least 1");
        let tp_size = model.tp_size();
        assert!(tp_size > 0, "a model runs on at least one rank");
        let drafting = config.speculative.as_ref().is_some_and(|s| s.draft_model().is_some());
        assert_eq!(drafting, model.draft().is_some(), "a draft-model config needs a model paired with its draft");
        let scheduler = Scheduler::new(SchedulerConfig {
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
            max_model_len: config.max_model_len,
            block_size: shape.block_size,
            num_blocks: shape.num_blocks,
            block_bytes: shape.block_bytes() * tp_size,
            eos_token_ids: config.eos_token_ids.clone(),
            // An encoder's KV depends on the tokens after it, so no prefix of it is reusable.
            enable_prefix_caching: config.enable_prefix_caching && !model.encoder(),
            whole_prompts: model.encoder(),
            speculative: config.speculative,
        });
        let kv: Vec<KvStorage> = (0..tp_size).map(|_| KvStorage::new(shape)).collect();
        let shared = Arc::new(Shared {
            shape,
            max_model_len: config.max_model_len,
            vocab_size: model.vocab_size(),
            encoder: model.encoder(),
            max_num_batched_tokens: config.max_num_batched_tokens,
            kv_arenas: kv.iter().map(KvStorage::arena).collect(),
            kv: kv.into_iter().map(|kv| Arc::new(RwLock::new(kv))).collect(),
            failure: OnceLock::new(),
            live: Mutex::new(HashSet::new()),
            num_running: AtomicUsize::new(0),
            num_waiting: AtomicUsize::new(0),
            pending_prefill_tokens: AtomicUsize::new(0),
            free_blocks: AtomicUsize::new(shape.num_blocks),
            cached_blocks: AtomicUsize::new(0),
            held_blocks: AtomicUsize::new(0),
            kv_events: Mutex::new(Vec::new()),
            num_preemptions: AtomicU64::new(0),
            speculation: Mutex::default(),
        });
        let (commands, receiver) = mpsc::channel();
        let step_loop = StepLoop {
            model,
            shared: shared.clone(),
            commands: receiver,
            scheduler,
            clients: HashMap::new(),
            default_seed: config.default_seed,
            num_unseeded: 0,
            sync_replies: Vec::new(),
            landings: HashMap::new(),
            held_back: Vec::new(),
        };
        std::thread::Builder::new()
            .name("engine-step".into())
            .spawn(move || step_loop.run())
            .expect("failed to spawn the engine step thread");
        EngineHandle { commands, shared }
    }
}

#[cfg(test)]
mod tests;

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
//!   for pinned blocks only (see [`KvArena`]).
//! - **Stats** are atomics plus the set of live request ids (a short std
//!   mutex, also used to reject duplicate ids at submit). The step thread
//!   publishes them before it sends any event, so whoever has received
//!   `Finished` sees stats that already account for it.
//!
//! # One step
//!
//! ```text
//! drain commands ─► drop requests whose receiver is gone ─► schedule (plan)
//!   ─► [write lock: write provided KV, copy forked blocks, forward]
//!   ─► sample per sequence (one token per choice of a forking row)
//!   ─► scheduler.finish_step ─► [write lock: copy the new forks' blocks]
//!   ─► publish stats ─► send events
//! ```
//!
//! A request with `n > 1` choices has one sampler per choice; it is over
//! (and leaves the live set) when its last choice's `Finished` is sent.

use crate::batch::{Forward, ForwardError, Logits};
use crate::block_manager::{blocks_for, KvEvent};
use crate::kv::cache::{KvArena, KvCacheShape, KvStorage, KvStorageError};
use crate::kv::landing::{KvLanding, Landings};
use crate::request::{
    Command, EngineError, EngineEvent, EngineRequest, FailureKind, KvReservation, KvSource, RequestError, Submission,
    MAX_N,
};
use crate::sampler::{argmax, Sampler};
use crate::scheduler::{
    BlockCopy, NewSequence, ProvidedData, ProvidedKv, SampledToken, ScheduledSeq, Scheduler, SchedulerConfig, StepPlan,
};
use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

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
    /// prompt's, and report cached / evicted blocks as [`KvEvent`]s. Default
    /// on in the workers; `false` computes every prompt and reports nothing.
    pub enable_prefix_caching: bool,
}

/// A snapshot of the engine's load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Live requests: submitted and not finished (waiting + running).
    pub num_sequences: usize,
    pub num_running: usize,
    /// Sequences the scheduler holds back (not admitted, or preempted).
    pub num_waiting: usize,
    /// Prompt tokens admitted but not computed yet
    /// ([`Scheduler::num_pending_prefill_tokens`]).
    pub pending_prefill_tokens: usize,
    /// Blocks available for allocation: never used, freed, or cached but
    /// unowned (evictable): an idle engine with no pins has all blocks free.
    pub free_blocks: usize,
    pub total_blocks: usize,
    /// Of `free_blocks`, those still holding cached KV (evictable, LRU).
    pub cached_blocks: usize,
    /// Blocks pinned by finished `pin_on_finish` requests, not yet released.
    pub held_blocks: usize,
    /// Sequences preempted (for recompute) since start.
    pub num_preemptions: u64,
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
    /// `config.max_num_batched_tokens` is 0, or the OS refuses
    /// to spawn a thread.
    pub fn start(model: Arc<dyn Forward>, shape: KvCacheShape, config: EngineConfig) -> EngineHandle {
        assert!(shape.block_size > 0, "KV block_size must be at least 1");
        assert!(config.max_num_seqs > 0, "max_num_seqs must be at least 1");
        assert!(config.max_num_batched_tokens > 0, "max_num_batched_tokens must be at least 1");
        let tp_size = model.tp_size();
        assert!(tp_size > 0, "a model runs on at least one rank");
        let scheduler = Scheduler::new(SchedulerConfig {
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
            max_model_len: config.max_model_len,
            block_size: shape.block_size,
            num_blocks: shape.num_blocks,
            block_bytes: shape.block_bytes() * tp_size,
            eos_token_ids: config.eos_token_ids.clone(),
            enable_prefix_caching: config.enable_prefix_caching,
        });
        let kv: Vec<KvStorage> = (0..tp_size).map(|_| KvStorage::new(shape)).collect();
        let shared = Arc::new(Shared {
            shape,
            max_model_len: config.max_model_len,
            vocab_size: model.vocab_size(),
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

/// A handle on a running engine; clone it freely.
///
/// The engine is an actor: `submit`, `abort` and `release_blocks` only queue
/// a command for the step thread and return at once. `stats` reads atomics
/// and a short std mutex; `read_blocks` takes the KV read lock.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle").field("shape", &self.shared.shape).field("stats", &self.stats()).finish()
    }
}

impl EngineHandle {
    /// Validates and queues a request; its events arrive on the receiver.
    /// Dropping the receiver aborts the request.
    pub fn submit(&self, req: EngineRequest) -> Result<UnboundedReceiver<EngineEvent>, EngineError> {
        if let Some(reason) = self.shared.failure.get() {
            return Err(EngineError::Failed(reason.clone()));
        }
        self.validate(&req)?;
        let request_id = req.request_id.clone();
        if !self.shared.live().insert(request_id.clone()) {
            return Err(EngineError::DuplicateRequestId(request_id));
        }
        let (events, receiver) = unbounded_channel();
        if self.commands.send(Command::Submit(Box::new(Submission { request: req, events }))).is_err() {
            self.shared.live().remove(&request_id);
            return Err(EngineError::Stopped);
        }
        Ok(receiver)
    }

    /// Ends a live request at once: its blocks are freed (pinned or not) and
    /// it hears `Finished { Abort }`. Unknown ids are ignored.
    pub fn abort(&self, request_id: &str) {
        // A stopped engine has nothing left to abort.
        let _ = self.commands.send(Command::Abort(request_id.to_string()));
    }

    /// Load and KV occupancy, without waiting for the step thread.
    pub fn stats(&self) -> EngineStats {
        let s = &self.shared;
        EngineStats {
            num_sequences: s.live().len(),
            num_running: s.num_running.load(Ordering::Acquire),
            num_waiting: s.num_waiting.load(Ordering::Acquire),
            pending_prefill_tokens: s.pending_prefill_tokens.load(Ordering::Acquire),
            free_blocks: s.free_blocks.load(Ordering::Acquire),
            total_blocks: s.shape.num_blocks,
            cached_blocks: s.cached_blocks.load(Ordering::Acquire),
            held_blocks: s.held_blocks.load(Ordering::Acquire),
            num_preemptions: s.num_preemptions.load(Ordering::Acquire),
        }
    }

    /// Appends blocks in the engine's hand-off format to `out`: each rank's
    /// ([`KvStorage::read_blocks`]) in rank order, one rank's alone without
    /// tensor parallelism. What [`KvSource::Provided`] takes. Waits for a
    /// running forward pass to end. Blocks that are not held may be
    /// overwritten by the next step.
    pub fn read_blocks(&self, ids: &[u32], out: &mut Vec<u8>) -> Result<(), KvStorageError> {
        for kv in &self.shared.kv {
            kv.read().unwrap_or_else(PoisonError::into_inner).read_blocks(ids, out)?;
        }
        Ok(())
    }

    /// Tensor-parallel rank `rank`'s KV cache memory, for a KV server that
    /// reads pinned blocks without waiting for a step (see [`KvArena`] for
    /// what it may read).
    ///
    /// # Panics
    /// If `rank` is not below [`EngineHandle::tp_size`].
    pub fn kv_arena(&self, rank: usize) -> KvArena {
        self.shared.kv_arenas[rank].clone()
    }

    /// Tensor-parallel ranks of the model, each with its own KV cache of
    /// [`EngineHandle::shape`].
    pub fn tp_size(&self) -> usize {
        self.shared.kv.len()
    }

    /// Why the engine can run no more steps ([`EngineError::Failed`]), once
    /// it cannot: a worker reports itself unhealthy from then on.
    pub fn failure(&self) -> Option<String> {
        self.shared.failure.get().cloned()
    }

    /// Takes blocks for `num_tokens` of handed-off KV to be written into
    /// (see [`KvReservation`]), or `None` when the cache has no room for them
    /// now: the caller then brings the KV as bytes ([`KvSource::Provided`]),
    /// which waits for room at admission. Never preempts and never waits for
    /// room; it waits for the step running now to end.
    pub async fn reserve_kv(&self, num_tokens: usize) -> Result<Option<KvReservation>, EngineError> {
        let s = &self.shared;
        let num_blocks = blocks_for(num_tokens, s.shape.block_size);
        if let Some(reason) = s.failure.get() {
            return Err(EngineError::Failed(reason.clone()));
        }
        let empty = KvReservation { ids: Vec::new(), arenas: s.kv_arenas.clone(), commands: self.commands.clone() };
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.commands.send(Command::Reserve { num_blocks, empty, reply }).map_err(|_| EngineError::Stopped)?;
        // The step thread answers every Reserve; a dropped future drops the
        // reservation with its receiver, which frees the blocks.
        answer.await.map_err(|_| EngineError::Stopped)
    }

    /// Frees blocks held for a finished `pin_on_finish` request: `ids` must be
    /// its whole `Finished.pinned_blocks` list, released once by whoever
    /// received it (see [`Scheduler::release`]). A list that no outstanding
    /// pin reported is ignored (with a warning), so a release can be retried;
    /// blocks shared with another pin stay held for it.
    pub fn release_blocks(&self, ids: &[u32]) {
        let _ = self.commands.send(Command::Release(ids.to_vec()));
    }

    /// KV events (blocks cached, evicted) since the last call, oldest first,
    /// for a worker to stream to routers. The step thread queues them before
    /// it sends a step's request events; with one consumer nothing is repeated.
    /// At most [`MAX_PENDING_KV_EVENTS`] wait: older ones are dropped, so a
    /// consumer must take them at least that often to see them all.
    pub fn take_kv_events(&self) -> Vec<KvEvent> {
        std::mem::take(&mut *self.shared.kv_events.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The KV cache's shape, on each rank.
    pub fn shape(&self) -> KvCacheShape {
        self.shared.shape
    }

    /// Blocks the calling thread until the step thread has applied every
    /// command sent before (at most one step plus the commands): after it,
    /// `stats` reflects earlier `abort`s and `release_blocks`. Meant for tests
    /// and shutdown; do not call it on an async runtime's hot path.
    pub fn sync(&self) {
        let (reply, done) = mpsc::channel();
        if self.commands.send(Command::Sync(reply)).is_ok() {
            let _ = done.recv();
        }
    }

    fn validate(&self, req: &EngineRequest) -> Result<(), EngineError> {
        let s = &self.shared;
        let prompt_len = req.prompt_token_ids.len();
        if prompt_len == 0 {
            return Err(EngineError::EmptyPrompt { request_id: req.request_id.clone() });
        }
        if prompt_len >= s.max_model_len {
            return Err(EngineError::PromptTooLong { prompt_len, max_model_len: s.max_model_len });
        }
        let blocks_needed = blocks_for(prompt_len, s.shape.block_size);
        if blocks_needed > s.shape.num_blocks {
            return Err(EngineError::PromptExceedsCache {
                prompt_len,
                blocks_needed,
                block_size: s.shape.block_size,
                num_blocks: s.shape.num_blocks,
            });
        }
        let p = &req.sampling;
        p.validate()?;
        if !(1..=MAX_N).contains(&req.n) {
            return Err(EngineError::InvalidSampling { field: "n", limit: "in [1, 16]", value: req.n.to_string() });
        }
        if let Some(&(token, _)) = p.logit_bias.iter().find(|(t, _)| *t as usize >= s.vocab_size) {
            return Err(EngineError::TokenOutOfVocab { token, vocab_size: s.vocab_size });
        }
        let first_tokens = req.kv.first_tokens();
        if let Some(first) = first_tokens.filter(|first| first.len() != req.n as usize) {
            return Err(EngineError::InvalidSampling {
                field: "first_tokens",
                limit: "one per choice (n)",
                value: format!("{} for n = {}", first.len(), req.n),
            });
        }
        if let KvSource::Reserved { blocks, .. } = &req.kv {
            if blocks.ids.len() != blocks_needed {
                return Err(EngineError::ReservationSize { reserved: blocks.ids.len(), prompt_len, blocks_needed });
            }
        }
        let out_of_vocab = req
            .prompt_token_ids
            .iter()
            .chain(first_tokens.unwrap_or_default())
            .copied()
            .find(|&t| t as usize >= s.vocab_size);
        if let Some(token) = out_of_vocab {
            return Err(EngineError::TokenOutOfVocab { token, vocab_size: s.vocab_size });
        }
        Ok(())
    }
}

/// KV events kept for [`EngineHandle::take_kv_events`] before the oldest are
/// dropped (about 6 MB with 16-token blocks).
pub const MAX_PENDING_KV_EVENTS: usize = 1 << 16;

/// What the handles and the step thread share.
struct Shared {
    shape: KvCacheShape,
    max_model_len: usize,
    vocab_size: usize,
    /// One cache per tensor-parallel rank, rank order.
    kv: Vec<Arc<RwLock<KvStorage>>>,
    /// `kv`'s memory, taken once so handing it out needs no lock.
    kv_arenas: Arc<[KvArena]>,
    /// Set once, when a step fails in a way no later step can recover from.
    failure: OnceLock<String>,
    /// Ids submitted and not yet finished: the duplicate check and `num_sequences`.
    live: Mutex<HashSet<String>>,
    num_running: AtomicUsize,
    num_waiting: AtomicUsize,
    pending_prefill_tokens: AtomicUsize,
    free_blocks: AtomicUsize,
    cached_blocks: AtomicUsize,
    held_blocks: AtomicUsize,
    /// KV events not yet taken (a short std mutex: push or take only).
    kv_events: Mutex<Vec<KvEvent>>,
    num_preemptions: AtomicU64,
}

impl Shared {
    fn live(&self) -> MutexGuard<'_, HashSet<String>> {
        // The set stays consistent even if a holder panicked: every critical
        // section is a single insert, remove or len.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The step thread's view of a live request.
struct Client {
    events: UnboundedSender<EngineEvent>,
    /// One per choice.
    samplers: Vec<Sampler>,
    /// Choices that have not heard `Finished` yet.
    unfinished: usize,
}

/// State owned by the step thread.
struct StepLoop {
    model: Arc<dyn Forward>,
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    scheduler: Scheduler,
    clients: HashMap<String, Client>,
    default_seed: u64,
    /// Requests seeded from `default_seed` so far.
    num_unseeded: u64,
    sync_replies: Vec<mpsc::Sender<()>>,
    /// Admitted requests whose hand-off may still be landing, until a step
    /// of theirs has run (and so waited for every layer).
    landings: HashMap<String, Arc<KvLanding>>,
    /// Submissions still landing that arrived while the engine was busy:
    /// admitted once their landing settles, or as soon as the engine idles.
    held_back: Vec<Submission>,
}

impl StepLoop {
    fn run(mut self) {
        let mut handles_gone = false;
        loop {
            handles_gone |= self.drain_commands();
            self.admit_held_back(false);
            self.drop_closed_clients();
            self.settle();
            let plan = self.scheduler.schedule();
            if plan.is_empty() && !self.held_back.is_empty() {
                // Idle now: a landing hand-off may stream into its first step.
                self.admit_held_back(true);
                continue;
            }
            if plan.is_empty() {
                // Nothing runs and nothing waiting fits: only a command can
                // change that, so block for one.
                self.settle();
                if handles_gone {
                    break;
                }
                match self.commands.recv() {
                    Ok(command) => self.apply(command),
                    Err(_) => break,
                }
                continue;
            }
            self.execute(plan);
            self.settle();
        }
        tracing::debug!(num_waiting = self.scheduler.num_waiting(), "engine step loop stopped: every handle is gone");
    }

    /// Applies every queued command without blocking. True if every handle
    /// is gone.
    fn drain_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(command) => self.apply(command),
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => return true,
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Submit(submission) if self.shared.failure.get().is_some() => {
                // Sent before the engine failed: it hears why, like the others.
                let request_id = submission.request.request_id.clone();
                self.admit_request(*submission);
                let reason = self.shared.failure.get().cloned().unwrap_or_default();
                self.scheduler.fail(
                    &[&request_id],
                    &RequestError::new(FailureKind::Engine, format!("the engine has failed: {reason}")),
                );
            }
            Command::Submit(submission) => {
                let busy = self.scheduler.num_running() + self.scheduler.num_waiting() > 0;
                if busy && still_landing(&submission.request) {
                    self.held_back.push(*submission);
                } else {
                    self.admit_request(*submission);
                }
            }
            Command::Abort(request_id) => {
                // One held back is admitted first, to hear its abort like any other.
                if let Some(at) = self.held_back.iter().position(|s| s.request.request_id == request_id) {
                    let submission = self.held_back.remove(at);
                    self.admit_request(submission);
                }
                self.scheduler.abort(&request_id);
                self.landings.remove(&request_id);
            }
            Command::Release(ids) => {
                tracing::debug!(blocks = ?ids, "releasing held blocks");
                self.scheduler.release(&ids);
            }
            Command::Reserve { num_blocks, mut empty, reply } => {
                let reservation = self.scheduler.reserve(num_blocks).map(|ids| {
                    empty.ids = ids;
                    empty
                });
                tracing::debug!(num_blocks, granted = reservation.is_some(), "KV blocks reserved for a hand-off");
                // A receiver that is gone hands the reservation back here,
                // whose drop queues an Unreserve.
                let _ = reply.send(reservation);
            }
            Command::Unreserve(ids) => {
                tracing::debug!(blocks = ?ids, "freeing reserved KV blocks");
                self.scheduler.unreserve(&ids);
            }
            Command::Retain(ids) => self.scheduler.retain_reserved(&ids),
            Command::Sync(reply) => self.sync_replies.push(reply),
        }
    }

    fn admit_request(&mut self, Submission { request, events }: Submission) {
        let seed = request.sampling.seed.unwrap_or_else(|| {
            self.num_unseeded += 1;
            self.default_seed.wrapping_add(self.num_unseeded)
        });
        let provided = match request.kv {
            KvSource::Compute => None,
            KvSource::Provided { data, first_tokens } => {
                Some(ProvidedKv { kv: ProvidedData::Bytes(data), first_tokens })
            }
            KvSource::Reserved { mut blocks, first_tokens, landing } => {
                if let Some(landing) = landing {
                    self.landings.insert(request.request_id.clone(), landing);
                }
                let ids = blocks.take();
                // The puller wrote (or is writing) them through the arena.
                for kv in self.shared.kv.iter() {
                    kv.write().unwrap_or_else(PoisonError::into_inner).mark_written(&ids);
                }
                Some(ProvidedKv { kv: ProvidedData::InBlocks(ids), first_tokens })
            }
        };
        tracing::debug!(
            request_id = %request.request_id,
            prompt_len = request.prompt_token_ids.len(),
            max_tokens = request.sampling.max_tokens,
            provided_kv = provided.is_some(),
            pin_on_finish = request.pin_on_finish,
            priority = request.priority,
            seed,
            "queued"
        );
        let n = request.n.max(1) as usize;
        let mut samplers: Vec<Sampler> = (0..n)
            .map(|choice| {
                Sampler::new(&request.sampling, seed)
                    .with_stream(choice as u64)
                    .with_eos(self.scheduler.eos_token_ids())
                    .with_prompt(&request.prompt_token_ids)
            })
            .collect();
        if let Some(p) = &provided {
            // Generated token 1 of each choice, for the penalties and `min_tokens`.
            for (sampler, &first) in samplers.iter_mut().zip(&p.first_tokens) {
                sampler.record(first);
            }
        }
        self.clients.insert(request.request_id.clone(), Client { events, samplers, unfinished: n });
        self.scheduler.add(NewSequence {
            request_id: request.request_id,
            prompt: request.prompt_token_ids,
            max_tokens: request.sampling.max_tokens as usize,
            stop_token_ids: request.sampling.stop_token_ids,
            ignore_eos: request.sampling.ignore_eos,
            min_tokens: request.sampling.min_tokens as usize,
            pin_on_finish: request.pin_on_finish,
            cache_salt: request.cache_salt.map(String::into_bytes).unwrap_or_default(),
            provided,
            priority: request.priority,
            n,
        });
    }

    /// Drops requests whose receiver is gone before spending a step on them
    /// (a waiting request never gets a send that could fail).
    fn drop_closed_clients(&mut self) {
        let closed: Vec<String> =
            self.clients.iter().filter(|(_, c)| c.events.is_closed()).map(|(id, _)| id.clone()).collect();
        for id in closed {
            self.drop_request(&id);
        }
    }

    /// Admits held-back submissions whose landing settled, or all of them.
    fn admit_held_back(&mut self, all: bool) {
        let (ready, waiting): (Vec<Submission>, Vec<Submission>) =
            std::mem::take(&mut self.held_back).into_iter().partition(|s| all || !still_landing(&s.request));
        self.held_back = waiting;
        for submission in ready {
            self.admit_request(submission);
        }
    }

    fn drop_request(&mut self, request_id: &str) {
        self.landings.remove(request_id);
        self.scheduler.remove(request_id);
        self.clients.remove(request_id);
        self.shared.live().remove(request_id);
    }

    /// Runs one planned step: provided KV writes and the forward pass under
    /// the KV write lock, then sampling.
    fn execute(&mut self, plan: StepPlan) {
        let mut batch = plan.to_batch();
        let landings: Vec<(String, Arc<KvLanding>)> = plan
            .seqs
            .iter()
            .filter_map(|s| self.landings.remove(&s.request_id).map(|l| (s.request_id.clone(), l)))
            .collect();
        // Block copies (a fork's partial block) and models that do not wait
        // per layer need the whole KV in place before the step.
        if !self.model.waits_for_layers() || !plan.block_copies.is_empty() {
            for (_, landing) in &landings {
                let _ = landing.wait_for(usize::MAX);
            }
        }
        batch.landings = Landings(landings.iter().map(|(_, l)| l.clone()).collect());
        let span = tracing::debug_span!(
            "engine_step",
            num_seqs = plan.seqs.len(),
            num_tokens = batch.tokens.len(),
            num_kv_writes = plan.kv_writes.len()
        );
        let _entered = span.enter();
        let mut failed_writes = Vec::new();
        let num_ranks = self.shared.kv.len();
        for (rank, kv) in self.shared.kv.iter().enumerate() {
            let mut kv = kv.write().unwrap_or_else(PoisonError::into_inner);
            for w in &plan.kv_writes {
                // Every rank's hand-off bytes, one after another (see `read_blocks`).
                let per_rank = w.data.len() / num_ranks;
                let data = &w.data[rank * per_rank..(rank + 1) * per_rank];
                // The scheduler checked the size and the ids come from the
                // block manager, so this is a bug path.
                if let Err(e) = kv.write_blocks(&w.block_ids, data) {
                    tracing::error!(request_id = %w.request_id, rank, error = %e, "writing provided KV failed");
                    failed_writes.push((w.request_id.as_str(), e.to_string()));
                }
            }
            // After the writes: a fork at admission copies provided KV.
            copy_blocks(&mut kv, &plan.block_copies);
        }
        failed_writes.dedup_by(|a, b| a.0 == b.0);
        let result = (!plan.seqs.is_empty()).then(|| {
            // A panicking model fails this batch, not the whole engine.
            match catch_unwind(AssertUnwindSafe(|| self.model.forward_ranks(&batch, &self.shared.kv))) {
                Ok(result) => result.map_err(StepFailure::from),
                Err(panic) => Err(StepFailure { message: panic_message(panic.as_ref()), fatal: false }),
            }
        });
        for (request_id, error) in failed_writes {
            self.scheduler.fail(
                &[request_id],
                &RequestError::new(FailureKind::KvWrite, format!("writing provided KV failed: {error}")),
            );
        }
        // The step waited for every layer: each landing is complete or
        // failed, and a failed one's row must not be sampled into a token.
        for (request_id, landing) in &landings {
            if let Some(reason) = landing.failure() {
                tracing::warn!(%request_id, %reason, "KV hand-off failed while streaming in");
                self.scheduler.fail(
                    &[request_id],
                    &RequestError::new(FailureKind::Handoff, format!("the KV hand-off failed: {reason}")),
                );
            }
        }
        let Some(result) = result else { return };
        let logits = result.and_then(|logits| {
            self.check_logits(&plan, logits).map_err(|message| StepFailure { message, fatal: false })
        });
        match logits {
            Ok(mut logits) => {
                // Row `i` belongs to the `i`-th sequence with logits; a
                // prefill chunk that is not the last samples nothing.
                let mut sampled: Vec<SampledToken> = Vec::with_capacity(plan.num_samples());
                for (i, s) in plan.seqs.iter().filter(|s| s.need_logits).enumerate() {
                    sampled.extend(self.sample_row(s, logits.row_mut(i)));
                }
                self.scheduler.finish_step_with(&plan, sampled);
                // Forks just made copy their partial prompt block now, before
                // any block freed in this step can be reused.
                let copies = self.scheduler.take_block_copies();
                if !copies.is_empty() {
                    for kv in &self.shared.kv {
                        copy_blocks(&mut kv.write().unwrap_or_else(PoisonError::into_inner), &copies);
                    }
                }
            }
            Err(StepFailure { message, fatal: false }) => {
                tracing::error!(error = %message, "forward pass failed; failing its sequences");
                let ids: Vec<&str> = plan.seqs.iter().map(|s| s.request_id.as_str()).collect();
                self.scheduler
                    .fail(&ids, &RequestError::new(FailureKind::Forward, format!("forward pass failed: {message}")));
            }
            Err(StepFailure { message, fatal: true }) => self.fail_engine(&message),
        }
    }

    /// No step can run any more: fails every request, now and from now on
    /// (see [`EngineError::Failed`]).
    fn fail_engine(&mut self, reason: &str) {
        tracing::error!(%reason, "the engine has failed; failing every request");
        let _ = self.shared.failure.set(reason.to_string());
        for submission in std::mem::take(&mut self.held_back) {
            self.admit_request(submission);
        }
        let ids: Vec<String> = self.clients.keys().cloned().collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        self.scheduler.fail(&ids, &RequestError::new(FailureKind::Engine, format!("the engine has failed: {reason}")));
        self.landings.clear();
    }

    /// The tokens of one logits row: one per choice in `s.choices`, each from
    /// its own sampler. A single choice samples the row in place; several
    /// each take a copy (sampling processes the row).
    fn sample_row(&mut self, s: &ScheduledSeq, row: &mut [f32]) -> Vec<SampledToken> {
        let Some(client) = self.clients.get_mut(&s.request_id) else {
            return s.choices.clone().map(|_| SampledToken { id: argmax(row), logprobs: None }).collect();
        };
        let single = s.choices.len() == 1;
        let raw = if single { Vec::new() } else { row.to_vec() };
        s.choices
            .clone()
            .map(|choice| {
                let sampler = &mut client.samplers[choice as usize];
                let (id, logprobs) = if single {
                    sampler.sample_with_logprobs(row)
                } else {
                    sampler.sample_with_logprobs(&mut raw.clone())
                };
                SampledToken { id, logprobs }
            })
            .collect()
    }

    fn check_logits(&self, plan: &StepPlan, logits: Logits) -> Result<Logits, String> {
        let rows = plan.num_logits();
        let expected = rows * self.shared.vocab_size;
        if logits.vocab_size != self.shared.vocab_size || logits.data.len() != expected {
            return Err(format!(
                "model returned {} logits of vocab {} for {rows} sequences, expected vocab {} ({expected} values)",
                logits.data.len(),
                logits.vocab_size,
                self.shared.vocab_size
            ));
        }
        Ok(logits)
    }

    /// Publishes stats, then delivers events, then answers syncs. A request
    /// whose receiver is gone is dropped on its first failed send.
    fn settle(&mut self) {
        let events = self.scheduler.take_events();
        // Which events end their request: an error, or its last choice's `Finished`.
        let terminal: Vec<bool> = events
            .iter()
            .map(|(id, event)| match event {
                EngineEvent::Token { .. } => false,
                EngineEvent::Error(_) => true,
                EngineEvent::Finished { .. } => self.clients.get_mut(id).is_none_or(|c| {
                    c.unfinished = c.unfinished.saturating_sub(1);
                    c.unfinished == 0
                }),
            })
            .collect();
        {
            let mut live = self.shared.live();
            for ((id, _), _) in events.iter().zip(&terminal).filter(|(_, &t)| t) {
                live.remove(id);
            }
        }
        self.publish_stats();
        let mut gone = Vec::new();
        let mut released_undelivered = false;
        for ((id, event), terminal) in events.into_iter().zip(terminal) {
            let Some(client) = self.clients.get(&id) else {
                continue;
            };
            let pinned = match &event {
                EngineEvent::Finished { pinned_blocks: Some(blocks), .. } => Some(blocks.clone()),
                _ => None,
            };
            let delivered = client.events.send(event).is_ok();
            // Nobody learned of these pins, so nobody would ever release them.
            if let (false, Some(blocks)) = (delivered, pinned) {
                self.scheduler.release(&blocks);
                released_undelivered = true;
            }
            if terminal {
                self.clients.remove(&id);
            } else if !delivered {
                gone.push(id);
            }
        }
        for id in &gone {
            self.drop_request(id);
        }
        if !gone.is_empty() || released_undelivered {
            self.publish_stats();
        }
        for reply in self.sync_replies.drain(..) {
            let _ = reply.send(());
        }
    }

    fn publish_stats(&mut self) {
        let kv_events = self.scheduler.take_kv_events();
        if !kv_events.is_empty() {
            let mut pending = self.shared.kv_events.lock().unwrap_or_else(PoisonError::into_inner);
            pending.extend(kv_events);
            // Nobody drains them (yet): keep memory bounded. A router index
            // that misses old events only under-counts cached blocks.
            if pending.len() > MAX_PENDING_KV_EVENTS {
                let excess = pending.len() - MAX_PENDING_KV_EVENTS;
                tracing::debug!(dropped = excess, "KV events not taken in time; dropping the oldest");
                pending.drain(..excess);
            }
        }
        let (s, sched) = (&self.shared, &self.scheduler);
        s.num_running.store(sched.num_running(), Ordering::Release);
        s.num_waiting.store(sched.num_waiting(), Ordering::Release);
        s.pending_prefill_tokens.store(sched.num_pending_prefill_tokens(), Ordering::Release);
        s.free_blocks.store(sched.num_free_blocks(), Ordering::Release);
        s.cached_blocks.store(sched.num_cached_blocks(), Ordering::Release);
        s.held_blocks.store(sched.num_held_blocks(), Ordering::Release);
        s.num_preemptions.store(sched.num_preemptions(), Ordering::Release);
    }
}

/// Whether a request's KV is still streaming in.
fn still_landing(request: &EngineRequest) -> bool {
    matches!(&request.kv, KvSource::Reserved { landing: Some(landing), .. } if !landing.is_settled())
}

/// Why a step's forward pass failed, and whether any later step can succeed.
struct StepFailure {
    message: String,
    /// A broken tensor-parallel group: every later step would fail too.
    fatal: bool,
}

impl From<ForwardError> for StepFailure {
    fn from(error: ForwardError) -> Self {
        let fatal = matches!(error, ForwardError::Comm(_));
        Self { message: error.to_string(), fatal }
    }
}

/// Copies each block's KV to its destination (forks' partial prompt blocks).
/// Both ids come from the block manager, so a failure is a bug: logged.
fn copy_blocks(kv: &mut KvStorage, copies: &[BlockCopy]) {
    for c in copies {
        if let Err(e) = kv.copy_block(c.src, c.dst) {
            tracing::error!(src = c.src, dst = c.dst, error = %e, "copying a forked block failed");
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    format!("the model panicked: {message}")
}

#[cfg(test)]
#[path = "serving/engine_tests.rs"]
mod tests;

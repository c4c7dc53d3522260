//! The handle callers hold on a running engine.

use super::shared::Shared;
use crate::kv::cache::{KvArena, KvCacheShape, KvStorageError};
use crate::request::{Command, EngineError, EngineEvent, EngineRequest, KvReservation, KvSource, Submission, MAX_N};
use crate::scheduler::block_manager::{blocks_for, KvEvent};
use crate::scheduler::SpeculationStats;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, PoisonError};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// A snapshot of the engine's load.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Live requests: submitted and not finished (waiting + running).
    pub num_sequences: usize,
    pub num_running: usize,
    /// Sequences the scheduler holds back (not admitted, or preempted).
    pub num_waiting: usize,
    /// Prompt tokens admitted but not computed yet
    /// ([`Scheduler::num_pending_prefill_tokens`](crate::scheduler::Scheduler::num_pending_prefill_tokens)).
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
    /// What speculative decoding did since start.
    pub speculation: SpeculationStats,
}

/// A handle on a running engine; clone it freely.
///
/// The engine is an actor: `submit`, `abort` and `release_blocks` only queue
/// a command for the step thread and return at once. `stats` reads atomics
/// and a short std mutex; `read_blocks` takes the KV read lock.
#[derive(Clone)]
pub struct EngineHandle {
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) shared: Arc<Shared>,
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
            speculation: s.speculation.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        }
    }

    /// Appends blocks in the engine's hand-off format to `out`: each rank's
    /// ([`KvStorage::read_blocks`](crate::KvStorage::read_blocks)) in rank order, one rank's alone without
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
    /// received it (see [`Scheduler::release`](crate::scheduler::Scheduler::release)). A list that no outstanding
    /// pin reported is ignored (with a warning), so a release can be retried;
    /// blocks shared with another pin stay held for it.
    pub fn release_blocks(&self, ids: &[u32]) {
        let _ = self.commands.send(Command::Release(ids.to_vec()));
    }

    /// KV events (blocks cached, evicted) since the last call, oldest first,
    /// for a worker to stream to routers. The step thread queues them before
    /// it sends a step's request events; with one consumer nothing is repeated.
    /// At most [`MAX_PENDING_KV_EVENTS`](super::MAX_PENDING_KV_EVENTS) wait: older ones are dropped, so a
    /// consumer must take them at least that often to see them all.
    pub fn take_kv_events(&self) -> Vec<KvEvent> {
        std::mem::take(&mut *self.shared.kv_events.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Width of a logits row: token ids must be below it.
    pub fn vocab_size(&self) -> usize {
        self.shared.vocab_size
    }

    /// Longest sequence (prompt and generated tokens) the engine runs.
    pub fn max_model_len(&self) -> usize {
        self.shared.max_model_len
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
        // A generation needs room for a token after the prompt; an encoder's prompt is all there is.
        if prompt_len >= s.max_model_len + usize::from(s.encoder) {
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
        if s.encoder && req.pooling.is_none() {
            return Err(EngineError::EncoderOnly);
        }
        if s.encoder && prompt_len > s.max_num_batched_tokens {
            return Err(EngineError::PromptExceedsStep {
                prompt_len,
                max_num_batched_tokens: s.max_num_batched_tokens,
            });
        }
        if req.pooling.is_some() {
            let refused = [
                (req.n != 1, "more than one choice"),
                (req.kv.first_tokens().is_some(), "its KV computed elsewhere"),
                (req.pin_on_finish, "its KV pinned for a hand-off"),
                (req.grammar.is_some(), "a structured output"),
                (req.sampling.prompt_logprobs.is_some(), "prompt logprobs"),
            ];
            if let Some((_, what)) = refused.into_iter().find(|(bad, _)| *bad) {
                return Err(EngineError::InvalidEmbedding(what));
            }
        }
        let p = &req.sampling;
        p.validate()?;
        if let Some(width) = req.grammar.as_ref().map(|g| g.vocab_size()).filter(|&w| w != s.vocab_size) {
            return Err(EngineError::InvalidSampling {
                field: "grammar",
                limit: "compiled for the model's vocabulary",
                value: format!("a vocabulary of {width} tokens, not {}", s.vocab_size),
            });
        }
        if !(1..=MAX_N).contains(&req.n) {
            return Err(EngineError::InvalidSampling { field: "n", limit: "in [1, 16]", value: req.n.to_string() });
        }
        // Every token id the sampling names is one of the vocabulary.
        let named = p.logit_bias.iter().map(|&(t, _)| t).chain(p.allowed_token_ids.iter().flatten().copied());
        let mut named = named.chain(p.bad_words.iter().flatten().copied()).chain(p.stop_token_ids.iter().copied());
        if let Some(token) = named.find(|&t| t as usize >= s.vocab_size) {
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

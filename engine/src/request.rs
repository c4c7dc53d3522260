//! What a caller hands the engine and hears back: the request ([`EngineRequest`], where its
//! prompt's KV comes from, blocks reserved for it), its events, and the errors that refuse or fail
//! it. The scheduler and the engine both speak these types, so they sit below both.
//!
//! The commands the engine's handles send its step thread are here too, not in [`crate::engine`]:
//! a [`KvReservation`] rides in a request's [`KvSource`] and sends on that same channel, so the
//! request, the reservation and the command refer to each other and must share a module to keep
//! the module graph free of circles.

use crate::kv::cache::KvArena;
use crate::kv::landing::KvLanding;
use crate::sampler::{SamplingParams, TokenLogprobs, MAX_TOP_LOGPROBS};
use std::sync::{mpsc, Arc};
use tokio::sync::mpsc::UnboundedSender;

/// One generation request.
#[derive(Debug)]
pub struct EngineRequest {
    /// Unique among the engine's live requests.
    pub request_id: String,
    pub prompt_token_ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// Where the prompt's KV comes from.
    pub kv: KvSource,
    /// Keep the blocks covering the prompt when the request finishes (for a
    /// remote decode to pull); they are reported in `Finished.pinned_blocks`
    /// and stay allocated until [`EngineHandle::release_blocks`](crate::EngineHandle::release_blocks).
    pub pin_on_finish: bool,
    /// Isolates the request's prefix cache: only requests with the same salt
    /// share cached blocks. `None` shares with every unsalted request.
    pub cache_salt: Option<String>,
    /// Lower values are admitted first (ties by arrival), and when KV blocks
    /// run out the worst priority is preempted first. Default 0.
    pub priority: i32,
    /// Choices to generate from the one prompt (parallel sampling), in
    /// `1..=`[`MAX_N`]; 1 is the usual request. The prompt is computed once
    /// and its KV blocks are shared (see [`crate::scheduler`]). Choice `i`
    /// draws from stream `i` of the ChaCha8 generator seeded with the
    /// request's seed, so with a seed every choice is reproducible, and
    /// choice 0 draws exactly what an `n = 1` request draws.
    pub n: u32,
    /// The structured output every choice is held to, compiled (each choice
    /// gets its own copy). Compiled before submission, never on the step
    /// thread: a schema can take milliseconds to compile.
    pub grammar: Option<constraint::Grammar>,
    /// Embed instead of generating: the prompt is computed and its final hidden states pooled
    /// into one [`EngineEvent::Embedding`], then the request finishes with no token; its
    /// sampling parameters play no part.
    pub pooling: Option<Pooling>,
}

/// Scales an embedding to unit L2 norm (a zero vector stays zero), as `normalize` asks for.
pub fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x = (f64::from(*x) / norm) as f32);
    }
}

/// How an embedding pools the final hidden states (after the output norm) of its prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// The last token's: what a causal model has seen the whole prompt by (vLLM's default for
    /// decoder models).
    Last,
    /// The mean over every prompt token.
    Mean,
    /// The first token's (BERT's CLS).
    Cls,
}

impl EngineRequest {
    /// A request generating one choice from `prompt_token_ids` as `sampling` asks, computing its
    /// prompt here (no cache salt, priority 0, no grammar: set them on the result).
    pub fn generate(request_id: impl Into<String>, prompt_token_ids: Vec<u32>, sampling: SamplingParams) -> Self {
        Self {
            request_id: request_id.into(),
            prompt_token_ids,
            sampling,
            kv: KvSource::Compute,
            pin_on_finish: false,
            cache_salt: None,
            priority: 0,
            n: 1,
            grammar: None,
            pooling: None,
        }
    }

    /// An embedding request for `prompt_token_ids`, pooled by `pooling` (no cache salt, priority
    /// 0: set them on the result).
    pub fn embedding(request_id: impl Into<String>, prompt_token_ids: Vec<u32>, pooling: Pooling) -> Self {
        Self { pooling: Some(pooling), ..Self::generate(request_id, prompt_token_ids, SamplingParams::greedy(1)) }
    }
}

/// Most choices one request may ask for (as the router's `n` limit).
pub const MAX_N: u32 = 16;

/// Where a request's prompt KV comes from.
pub enum KvSource {
    /// The engine prefills the prompt itself.
    Compute,
    /// A prefill worker computed it: `data` is the prompt's KV in the hand-off
    /// format for `ceil(prompt_len / block_size)` blocks, and `first_tokens`
    /// the token it sampled for each choice (`n` of them, choice order). Each
    /// counts as its choice's generated token 1; it is not emitted again nor
    /// checked against stop tokens. The engine copies `data` into blocks it
    /// allocates at admission.
    Provided { data: Vec<u8>, first_tokens: Vec<u32> },
    /// Like `Provided`, with the KV written into `blocks` (from
    /// [`EngineHandle::reserve_kv`](crate::EngineHandle::reserve_kv), one per `block_size` prompt tokens), which
    /// become the sequence's own: nothing is copied at admission. With
    /// `landing`, the KV may still be arriving layer by layer (per-layer
    /// streaming): the puller must hold its own [`KvReservation::share`] of
    /// the blocks until it is done. An idle engine starts the first step at
    /// once, each layer waiting for its KV; a busy one admits the request
    /// once every layer has landed, so a slow pull never stalls the others.
    /// A failed landing fails the request.
    Reserved { blocks: KvReservation, first_tokens: Vec<u32>, landing: Option<Arc<KvLanding>> },
}

impl KvSource {
    /// The first token of each choice, when the prompt was computed elsewhere.
    pub(crate) fn first_tokens(&self) -> Option<&[u32]> {
        match self {
            KvSource::Compute => None,
            KvSource::Provided { first_tokens, .. } | KvSource::Reserved { first_tokens, .. } => Some(first_tokens),
        }
    }
}

impl std::fmt::Debug for KvSource {
    // The payload can be megabytes: show its size, not its bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvSource::Compute => f.write_str("Compute"),
            KvSource::Provided { data, first_tokens } => {
                f.debug_struct("Provided").field("data_len", &data.len()).field("first_tokens", first_tokens).finish()
            }
            KvSource::Reserved { blocks, first_tokens, landing } => f
                .debug_struct("Reserved")
                .field("blocks", &blocks.ids)
                .field("first_tokens", first_tokens)
                .field("landing", landing)
                .finish(),
        }
    }
}

/// Blocks taken from the cache for a hand-off to land in before its request
/// is submitted (vLLM's "waiting for remote KV"): the puller writes them
/// straight into the engine's memory, so admission copies nothing.
///
/// The blocks belong to no sequence and to no prefix-cache entry while
/// reserved, so the engine neither reads nor writes them: the puller may
/// write them through [`KvReservation::as_mut_ptr`] without the engine's
/// lock while steps run. Submitting the reservation in
/// [`KvSource::Reserved`] hands the blocks to the request; dropping it
/// (a failed pull, a cancelled request) frees them.
pub struct KvReservation {
    pub(crate) ids: Vec<u32>,
    /// Every rank's cache, rank order: the same block ids in each.
    pub(crate) arenas: Arc<[KvArena]>,
    pub(crate) commands: mpsc::Sender<Command>,
}

impl KvReservation {
    /// The reserved blocks, in prompt order.
    pub fn block_ids(&self) -> &[u32] {
        &self.ids
    }

    /// Tensor-parallel rank `rank`'s cache memory, in the layout of
    /// [`crate::kv::cache`]; the reserved ids name blocks of every rank's.
    ///
    /// # Panics
    /// If `rank` is not below the engine's [`EngineHandle::tp_size`](crate::EngineHandle::tp_size).
    pub fn arena(&self, rank: usize) -> &KvArena {
        &self.arenas[rank]
    }

    /// The first byte of rank `rank`'s cache memory, for writing the reserved
    /// blocks' segments — and nothing else — until the reservation is
    /// submitted or dropped.
    ///
    /// # Panics
    /// If `rank` is not below the engine's [`EngineHandle::tp_size`](crate::EngineHandle::tp_size).
    pub fn as_mut_ptr(&self, rank: usize) -> *mut u8 {
        self.arenas[rank].as_ptr().cast_mut()
    }

    /// A second hold on the same blocks, for a puller that writes them while
    /// the request runs: they are freed once both holds are gone.
    pub fn share(&self) -> KvReservation {
        // Queued before either hold can be dropped, so the count never
        // reaches zero in between.
        let _ = self.commands.send(Command::Retain(self.ids.clone()));
        KvReservation { ids: self.ids.clone(), arenas: self.arenas.clone(), commands: self.commands.clone() }
    }

    /// The ids, which the caller now owns.
    pub(crate) fn take(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.ids)
    }
}

impl Drop for KvReservation {
    fn drop(&mut self) {
        if !self.ids.is_empty() {
            let ids = self.take();
            // A stopped engine has no blocks left to free.
            let _ = self.commands.send(Command::Unreserve(ids));
        }
    }
}

/// What a request hears. Each choice (`index` in `0..n`) hears its tokens,
/// then one `Finished`; the request is over when every choice has finished,
/// or at an `Error`, which ends all its choices. Nothing follows.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// A generated token of choice `index`, with its logprobs when the
    /// request asked for them (`SamplingParams::logprobs`).
    Token {
        index: u32,
        id: u32,
        logprobs: Option<TokenLogprobs>,
        /// Prompt tokens whose KV came from the prefix cache at the request's first admission,
        /// on every token: a reader that stops early (a stop string) still has it.
        num_cached_tokens: usize,
    },
    /// With `SamplingParams::prompt_logprobs`: the logprobs of prompt tokens `start..start +
    /// logprobs.len()`, each given the tokens before it. They come in order, from position 1 (the
    /// first token has none) to the prompt's end, before the first `Token`, once per request
    /// whatever its choices.
    PromptLogprobs { start: usize, logprobs: Vec<TokenLogprobs> },
    /// An embedding request's pooled vector (not normalized), before its `Finished`.
    Embedding(Vec<f32>),
    /// Generation of choice `index` ended.
    Finished {
        index: u32,
        reason: FinishReason,
        /// With `pin_on_finish` (and not aborted), on choice 0's: the held
        /// blocks covering the prompt, in prompt order.
        pinned_blocks: Option<Vec<u32>>,
        num_prompt_tokens: usize,
        /// Prompt tokens whose KV came from the prefix cache (not computed),
        /// at the request's first admission.
        num_cached_tokens: usize,
    },
    /// The request failed and is gone (bad provided KV, failed forward pass,
    /// a sequence too long for the whole cache).
    Error(RequestError),
}

/// Why a request failed, for callers that answer each kind differently (a
/// failed hand-off can be recomputed; a failed engine takes the worker out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// It can never run here: more KV than the whole cache, more choices than
    /// `max_num_seqs`, provided KV of the wrong size.
    Refused,
    /// Writing its provided KV into the cache failed.
    KvWrite,
    /// Its KV, streaming in from a prefill worker, stopped before every layer
    /// landed.
    Handoff,
    /// A forward pass over it failed; the engine goes on.
    Forward,
    /// The engine has failed and refuses every request from now on.
    Engine,
}

/// A failed request: its kind, and the engine's words for it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    /// What failed.
    pub kind: FailureKind,
    /// The whole message, for logs and clients.
    pub message: String,
}

impl RequestError {
    /// A failure of `kind`, described by `message`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop or EOS token was generated (and emitted).
    Stop,
    /// `max_tokens` generated, or the sequence reached `max_model_len`.
    Length,
    /// [`EngineHandle::abort`](crate::EngineHandle::abort), or the receiver was dropped.
    Abort,
}

/// A request the engine refuses at submit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EngineError {
    #[error("request {request_id:?} has an empty prompt")]
    EmptyPrompt { request_id: String },
    #[error("prompt of {prompt_len} tokens does not fit max_model_len {max_model_len} (it must be shorter to leave room for a token)")]
    PromptTooLong { prompt_len: usize, max_model_len: usize },
    #[error("prompt of {prompt_len} tokens needs {blocks_needed} KV blocks of {block_size} tokens, the whole cache has {num_blocks}")]
    PromptExceedsCache { prompt_len: usize, blocks_needed: usize, block_size: usize, num_blocks: usize },
    #[error("a request with id {0:?} is already live")]
    DuplicateRequestId(String),
    #[error("max_tokens must be at least 1, got 0")]
    ZeroMaxTokens,
    #[error("temperature must be finite and >= 0, got {0}")]
    InvalidTemperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    InvalidTopP(f32),
    /// Another sampling parameter out of its range (see [`SamplingParams`]).
    #[error("{field} must be {limit}, got {value}")]
    InvalidSampling { field: &'static str, limit: &'static str, value: String },
    #[error("token id {token} is outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfVocab { token: u32, vocab_size: usize },
    #[error("{reserved} reserved KV blocks for a prompt of {prompt_len} tokens, which needs {blocks_needed}")]
    ReservationSize { reserved: usize, prompt_len: usize, blocks_needed: usize },
    /// An embedding request that asks for something only a generation has.
    #[error("an embedding request cannot have {0}")]
    InvalidEmbedding(&'static str),
    /// A generation request for an encoder, which has no LM head.
    #[error("the model is an encoder: it serves embeddings only, not generation")]
    EncoderOnly,
    /// An encoder's prompt longer than one step holds (it is computed whole).
    #[error("the prompt has {prompt_len} tokens, but an encoder computes a prompt in one step of at most {max_num_batched_tokens} (--max-num-batched-tokens)")]
    PromptExceedsStep { prompt_len: usize, max_num_batched_tokens: usize },
    #[error("the engine has stopped")]
    Stopped,
    /// The engine can run no step any more (a tensor-parallel rank died):
    /// every request it had failed, and it takes no new ones.
    #[error("the engine has failed: {0}")]
    Failed(String),
}

impl SamplingParams {
    /// Checks every bound the sampler relies on. The engine checks on submit;
    /// workers call it before costly work (a KV pull) so a bad request fails first.
    pub fn validate(&self) -> Result<(), EngineError> {
        let p = self;
        if p.max_tokens == 0 {
            return Err(EngineError::ZeroMaxTokens);
        }
        if !p.temperature.is_finite() || p.temperature < 0.0 {
            return Err(EngineError::InvalidTemperature(p.temperature));
        }
        if !(p.top_p > 0.0 && p.top_p <= 1.0) {
            return Err(EngineError::InvalidTopP(p.top_p));
        }
        let invalid =
            |field, limit, value: f32| Err(EngineError::InvalidSampling { field, limit, value: value.to_string() });
        if !(0.0..=1.0).contains(&p.min_p) {
            return invalid("min_p", "in [0, 1]", p.min_p);
        }
        if !(-2.0..=2.0).contains(&p.presence_penalty) {
            return invalid("presence_penalty", "in [-2, 2]", p.presence_penalty);
        }
        if !(-2.0..=2.0).contains(&p.frequency_penalty) {
            return invalid("frequency_penalty", "in [-2, 2]", p.frequency_penalty);
        }
        if !(p.repetition_penalty > 0.0 && p.repetition_penalty <= 2.0) {
            return invalid("repetition_penalty", "in (0, 2]", p.repetition_penalty);
        }
        if let Some(&(_, bias)) = p.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return invalid("logit_bias", "in [-100, 100]", bias);
        }
        if let Some(k) = p.logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return Err(EngineError::InvalidSampling { field: "logprobs", limit: "in [0, 20]", value: k.to_string() });
        }
        if p.allowed_token_ids.as_ref().is_some_and(Vec::is_empty) {
            let value = "[]".to_string();
            return Err(EngineError::InvalidSampling { field: "allowed_token_ids", limit: "not empty", value });
        }
        if let Some(k) = p.prompt_logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            let value = k.to_string();
            return Err(EngineError::InvalidSampling { field: "prompt_logprobs", limit: "in [0, 20]", value });
        }
        Ok(())
    }
}

/// What the engine's handles, and reservations as they are shared or dropped, tell its step thread.
pub(crate) enum Command {
    Submit(Box<Submission>),
    Abort(String),
    Release(Vec<u32>),
    /// Fill `empty` with `num_blocks` blocks and send it back, or `None`.
    Reserve {
        num_blocks: usize,
        empty: KvReservation,
        reply: tokio::sync::oneshot::Sender<Option<KvReservation>>,
    },
    Unreserve(Vec<u32>),
    /// One more hold on reserved blocks ([`KvReservation::share`]).
    Retain(Vec<u32>),
    Sync(mpsc::Sender<()>),
}

/// A request on its way to the step thread, with where its events go.
pub(crate) struct Submission {
    pub(crate) request: EngineRequest,
    pub(crate) events: UnboundedSender<EngineEvent>,
}

//! The seam between the router's stages and the workers: what a validated
//! request asks of them ([`GenerateRequest`], [`Sampling`]) and what comes
//! back ([`TokenStream`] of [`TokenChunk`]s, [`Finish`], [`BackendError`]).
//! [`crate::pd`] implements [`Backend`] over the prefill and decode workers.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::admission::Chooser;
use crate::placement::Demand;

/// How to pick tokens, validated: no option is left open except the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 is greedy.
    pub temperature: f32,
    /// In (0, 1]; 1 is off.
    pub top_p: f32,
    /// 0 is off.
    pub top_k: u32,
    /// `None` lets the worker pick.
    pub seed: Option<u64>,
    /// Most tokens to generate, the first included.
    pub max_tokens: u32,
    /// In [0, 1]; 0 is off.
    pub min_p: f32,
    /// In [-2, 2]; 0 is off.
    pub presence_penalty: f32,
    /// In [-2, 2]; 0 is off.
    pub frequency_penalty: f32,
    /// In (0, 2]; 1 is off.
    pub repetition_penalty: f32,
    /// Token ids in the vocabulary with biases in [-100, 100], sorted by id.
    pub logit_bias: Vec<(u32, f32)>,
    /// Token ids (in the vocabulary) that end generation.
    pub stop_token_ids: Vec<u32>,
    /// Keep generating past the model's eos tokens.
    pub ignore_eos: bool,
    /// No stop before this many tokens; at most `max_tokens`.
    pub min_tokens: u32,
    /// `None`: no logprobs; `Some(k)`: each token's logprob and the `k`
    /// (at most 20) most likely tokens'.
    pub logprobs: Option<u32>,
    /// `None`: none. `Some(k)`: vLLM's prompt logprobs, each prompt token's logprob given the
    /// tokens before it and the `k` (at most 20) most likely tokens' there.
    pub prompt_logprobs: Option<u32>,
    /// vLLM's `allowed_token_ids` (in the vocabulary, not empty): every other token is masked.
    pub allowed_token_ids: Option<Vec<u32>>,
    /// vLLM's `bad_words`, tokenized: each a token sequence the output may not end with.
    pub bad_words: Vec<Vec<u32>>,
    /// Choices generated from the one prompt, in [1, 16].
    pub n: u32,
    /// The structured output every choice is held to (checked to compile).
    pub constraint: Option<Arc<constraint::Constraint>>,
    /// Tokens at the end of the prompt that are already part of the constrained answer (a
    /// recomputed hand-off's first token).
    pub constraint_prefix: Vec<u32>,
}

impl Default for Sampling {
    /// vLLM's defaults: temperature 1, every filter and penalty off, 16 tokens.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            max_tokens: 16,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            min_tokens: 0,
            logprobs: None,
            prompt_logprobs: None,
            allowed_token_ids: None,
            bad_words: Vec::new(),
            n: 1,
            constraint: None,
            constraint_prefix: Vec::new(),
        }
    }
}

/// vLLM's beam search (`use_beam_search`): how many beams, and how length weighs in their score.
/// It runs over the backend step by step (`crate::generate`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamSearch {
    /// Beams kept each step and answered (`n`), at most [`MAX_BEAM_WIDTH`].
    pub width: u32,
    /// The exponent of the length a beam's cumulative logprob is divided by.
    pub length_penalty: f32,
}

/// The widest beam search: each step asks `2 × width` alternatives per beam, and the workers give
/// at most 20.
pub const MAX_BEAM_WIDTH: u32 = 10;

/// One generation as the backend sees it.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Carried in every worker call and log line.
    pub request_id: String,
    /// The prompt, tokenized.
    pub prompt_token_ids: Arc<Vec<u32>>,
    /// Sampling parameters.
    pub sampling: Sampling,
    /// Scheduling priority on the workers, lower first.
    pub priority: i32,
    /// Prefix-cache salt; `None` shares blocks with unsalted requests.
    pub cache_salt: Option<String>,
    /// The worker of the first leg (prefill, or decode when colocated) that
    /// admission reserved a slot on; `None` lets placement pick.
    pub first_worker: Option<usize>,
    /// The prompt as placement sees it, its salted block hashes computed
    /// once ([`GenerateRequest::demand_for`]) for every placement decision.
    pub demand: Arc<Demand>,
}

impl GenerateRequest {
    /// Placement's view of `prompt` under `cache_salt`, for workers whose KV
    /// blocks hold `block_size` tokens ([`Backend::block_size`]).
    pub fn demand_for(prompt: &[u32], cache_salt: Option<&str>, block_size: Option<u32>) -> Arc<Demand> {
        Arc::new(Demand::new(prompt, cache_salt, block_size))
    }
}

/// How an embedding pools the final hidden states of its prompt's tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Pooling {
    /// The model's own: what its Sentence-Transformers config names, else the last token's
    /// (the worker knows which).
    #[default]
    Model,
    /// The last token's: a causal model's whole prompt is behind it (vLLM's default for them).
    Last,
    /// The mean over every token.
    Mean,
    /// The first token's.
    Cls,
}

/// One embedding as the backend sees it: a prompt computed and pooled on one worker, with no
/// token sampled and nothing handed off.
#[derive(Debug, Clone)]
pub struct EmbedRequest {
    /// Carried in the worker call and its log lines.
    pub request_id: String,
    /// The prompt, tokenized.
    pub prompt_token_ids: Arc<Vec<u32>>,
    /// How its final hidden states become one vector.
    pub pooling: Pooling,
    /// Scale the vector to unit L2 norm.
    pub normalize: bool,
    /// Scheduling priority on the worker, lower first.
    pub priority: i32,
    /// Prefix-cache salt; `None` shares blocks with unsalted requests.
    pub cache_salt: Option<String>,
    /// The worker admission reserved a slot on; `None` lets placement pick.
    pub first_worker: Option<usize>,
    /// The prompt as placement sees it (its salted block hashes).
    pub demand: Arc<Demand>,
}

/// A pooled vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    /// One value per hidden dimension of the model.
    pub embedding: Vec<f32>,
    /// Prompt tokens the worker served from its prefix cache.
    pub cached_tokens: u32,
}

/// Why the workers ended a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token (or a stop string, decided by the router).
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// A worker failed mid-generation (vLLM's `error`); never sent by a
    /// worker, only set by the router on the choices a failure cut short.
    Error,
}

impl Finish {
    /// The OpenAI `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Error => "error",
        }
    }
}

/// The logprobs of one generated token, as the workers computed them: the
/// log-softmax of the raw logits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenLogprobs {
    /// The generated token's logprob.
    pub logprob: f32,
    /// The most likely tokens and their logprobs, most likely first.
    pub top: Vec<(u32, f32)>,
    /// The token's rank in its row, 1 for the most likely (0 when the worker did not say).
    pub rank: u32,
}

/// Newly generated tokens of one choice; `finish` is set on that choice's
/// last chunk.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenChunk {
    /// The choice, in `0..n`.
    pub index: u32,
    /// New token ids, in order.
    pub token_ids: Vec<u32>,
    /// With `Sampling::logprobs`: one entry per token id; else empty.
    pub logprobs: Vec<TokenLogprobs>,
    /// Set when the generation is over.
    pub finish: Option<Finish>,
    /// Prompt tokens served from the workers' prefix cache, on the chunks of the worker that
    /// computed the prompt (the prefill worker's first tokens; colocated, every chunk).
    pub cached_tokens: Option<u32>,
    /// With `Sampling::prompt_logprobs`, on chunks before any token: the logprobs of the next
    /// prompt tokens from token 1 on, in order.
    pub prompt_logprobs: Vec<TokenLogprobs>,
}

/// A worker call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// No worker could be reached (503).
    #[error("no worker available: {0}")]
    Unavailable(String),
    /// A worker answered with an error or broke the protocol (502).
    #[error("worker error: {0}")]
    Worker(String),
    /// The worker aborted the request (502).
    #[error("the worker aborted the request")]
    Aborted,
    /// The decode worker could not get the prompt's KV from the prefill
    /// worker (the prefill worker died, stalled, or sent corrupt blocks);
    /// the decode worker itself is fine (502).
    #[error("KV hand-off failed: {0}")]
    KvTransfer(String),
}

impl BackendError {
    /// A stable label for the OpenAI `code` field.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unavailable(_) => "worker_unavailable",
            Self::Worker(_) => "worker_error",
            Self::Aborted => "worker_aborted",
            Self::KvTransfer(_) => "kv_transfer_failed",
        }
    }
}

/// The generated tokens of one request, its choices' chunks interleaved.
/// Ends once every choice's chunk with a finish reason went by, or after an
/// error.
pub type TokenStream = BoxStream<'static, Result<TokenChunk, BackendError>>;

/// The seam between HTTP and the workers.
pub trait Backend: Send + Sync + 'static {
    /// Tokens per KV block on the workers, once known: what a request's
    /// prompt is hashed in.
    fn block_size(&self) -> Option<u32> {
        None
    }

    /// How admission should pick the first leg's worker for `request` when
    /// its turn comes; `None`: the least busy one.
    fn first_leg_chooser(&self, _request: &GenerateRequest) -> Option<Chooser> {
        None
    }

    /// Starts a generation. Dropping the stream cancels it.
    fn generate(&self, request: GenerateRequest) -> TokenStream;

    /// How admission should pick the worker of an embedding; `None`: the least busy one.
    fn embed_chooser(&self, _request: &EmbedRequest) -> Option<Chooser> {
        None
    }

    /// Computes and pools one prompt. Dropping the future cancels it. A backend without
    /// workers that embed keeps this answer.
    fn embed(&self, _request: EmbedRequest) -> BoxFuture<'static, Result<Embedded, BackendError>> {
        Box::pin(std::future::ready(Err(BackendError::Unavailable("no worker here computes embeddings".into()))))
    }
}

//! Offline batch inference, vLLM's `LLM.generate` / `LLM.chat`: a list of prompts in, a list of
//! outputs out, in the same order.
//!
//! Every request is submitted to the engine at once, so the engine's scheduler batches them
//! (continuous batching, chunked prefill, prefix caching) exactly as it batches concurrent
//! requests of a server: nothing runs one by one. The calls block the calling thread while the
//! engine works (they drive the engine's event channels on a private single-threaded runtime);
//! from async code, call them inside `spawn_blocking`.
//!
//! Prompts follow the router's rules: a text prompt gets BOS first when the model asks for it
//! (`add_bos_token`); a chat is rendered through the model's chat template
//! ([`prompt::chat_template`]), which places its own special tokens, and is encoded without
//! adding any; token-id prompts go in unchanged.

use crate::engine::{Engine, EngineConfig, EngineHandle};
use crate::model::{ComputeDevice, Loaded, Model, ModelInfo, WeightDtype};
use crate::request::{EngineError, EngineEvent, EngineRequest, FailureKind, FinishReason, Pooling, RequestError};
use crate::{SamplingParams, TokenLogprobs};
pub use prompt::chat_template::TemplateMessage as ChatMessage;
use prompt::chat_template::{ChatTemplate, RenderOptions};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use constraint::{Constraint, ConstraintError, Grammar, Vocabulary};
use prompt::beam::Beams;
use prompt::decode::Decoder;
use prompt::detokenize::{Detokenizer, StopCheck, StopMatcher};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedReceiver;

/// A prompt for [`Llm::generate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// Text, tokenized with the model's tokenizer (BOS first when the model asks for it).
    Text(String),
    /// Token ids, used as they are.
    TokenIds(Vec<u32>),
}

impl From<&str> for Prompt {
    fn from(text: &str) -> Self {
        Prompt::Text(text.to_string())
    }
}

impl From<Vec<u32>> for Prompt {
    fn from(ids: Vec<u32>) -> Self {
        Prompt::TokenIds(ids)
    }
}

/// What one request asks the model: a prompt or a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Prompt(Prompt),
    /// A conversation, rendered through the chat template with the assistant's turn opened.
    Chat(Vec<ChatMessage>),
}

/// One request of [`Llm::run`]: its input and its own sampling parameters.
#[derive(Debug, Clone)]
pub struct Request {
    pub input: Input,
    pub sampling: SamplingParams,
    /// The structured output the answer is held to (vLLM's `structured_outputs`).
    pub constraint: Option<Constraint>,
    /// vLLM's `bad_words` as text: tokenized as the server tokenizes them (see
    /// [`prompt::bad_words`]) into `sampling.bad_words`.
    pub bad_words: Vec<String>,
    /// Leave special tokens out of the output's text (vLLM's default, true).
    pub skip_special_tokens: bool,
    /// How a conversation is rendered (as `LLM.chat` takes it); unused for prompts.
    pub chat: ChatOptions,
    /// Stop strings: the output ends where the first one starts (finish `Stop`), and the request
    /// stops generating there.
    pub stop: Vec<String>,
    /// Keep the stop string that ended the output in its text (vLLM's default, false).
    pub include_stop_str_in_output: bool,
    /// Choices to generate from the one prompt (vLLM's `n`), in `1..=16`; choice `i` draws from
    /// stream `i` of the request's seed, as the server's.
    pub n: u32,
    /// Keep only the prompt's last this many tokens (vLLM's `truncate_prompt_tokens`).
    pub truncate_prompt_tokens: Option<usize>,
}

/// vLLM's `LLM.chat` rendering options.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatOptions {
    /// OpenAI tool dicts for the template's `tools`.
    pub tools: Option<Vec<serde_json::Value>>,
    /// End with the assistant's turn header (default true).
    pub add_generation_prompt: bool,
    /// Leave the last message open for the model to continue (default false).
    pub continue_final_message: bool,
    /// Extra template variables (`chat_template_kwargs`, e.g. `enable_thinking`).
    pub kwargs: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Default for ChatOptions {
    fn default() -> Self {
        Self { tools: None, add_generation_prompt: true, continue_final_message: false, kwargs: None }
    }
}

impl Request {
    /// A request for `input` under `sampling`, with no structured output or bad words, special
    /// tokens left out of the text.
    pub fn new(input: Input, sampling: SamplingParams) -> Self {
        let (constraint, bad_words, chat, stop) = (None, Vec::new(), ChatOptions::default(), Vec::new());
        Self {
            input,
            sampling,
            constraint,
            bad_words,
            skip_special_tokens: true,
            chat,
            stop,
            include_stop_str_in_output: false,
            n: 1,
            truncate_prompt_tokens: None,
        }
    }
}

/// The result of one request: its prompt and each choice's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The choices, in order (`n` of them, one by default).
    pub choices: Vec<Choice>,
    /// Tokens of the prompt as the model saw it (after templating and BOS).
    pub num_prompt_tokens: usize,
    /// Those tokens.
    pub prompt_token_ids: Vec<u32>,
    /// Of those, tokens whose KV came from the prefix cache.
    pub num_cached_tokens: usize,
    /// With `prompt_logprobs` asked: the logprobs of prompt tokens 1.. (token 0 has none), each
    /// given the tokens before it; empty otherwise.
    pub prompt_logprobs: Vec<TokenLogprobs>,
}

impl Output {
    /// The first (with the default `n`, the only) choice.
    pub fn first(&self) -> &Choice {
        &self.choices[0]
    }
}

/// One choice of an [`Output`].
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The generated text, special tokens (such as EOS) left out unless asked for, cut at a stop
    /// string.
    pub text: String,
    /// Every generated token id, a final stop / EOS token included.
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// With `logprobs` asked: those of each generated token, in order; empty otherwise.
    pub logprobs: Vec<TokenLogprobs>,
}

/// vLLM's `BeamSearchParams` for [`Llm::beam_search`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamSearchParams {
    /// Beams kept each step and answered, in `1..=10` (each step asks `2 × beam_width` top
    /// tokens, and at most 20 are given).
    pub beam_width: usize,
    /// Most tokens a beam generates.
    pub max_tokens: u32,
    /// The exponent of the length a beam's cumulative logprob is divided by (vLLM's default 1).
    pub length_penalty: f32,
    /// Let the model's eos tokens not end a beam.
    pub ignore_eos: bool,
}

/// One beam of [`Llm::beam_search`]'s answer.
#[derive(Debug, Clone, PartialEq)]
pub struct BeamOutput {
    /// Its generated tokens, a final eos included.
    pub token_ids: Vec<u32>,
    /// Their text, special tokens left out.
    pub text: String,
    /// The sum of its tokens' raw logprobs.
    pub cumulative_logprob: f32,
    /// `Stop` when an eos ended it, else `Length`.
    pub finish_reason: FinishReason,
}

/// How far a batch has got, for a progress bar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Requests finished (or failed).
    pub done: usize,
    pub total: usize,
    /// Tokens generated so far, over all requests.
    pub generated_tokens: usize,
    /// Prompt tokens of the requests finished.
    pub prompt_tokens: usize,
    /// Since the batch was submitted.
    pub elapsed: Duration,
}

impl Progress {
    /// Generated tokens per second since the batch was submitted.
    pub fn tokens_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.generated_tokens as f64 / secs
        } else {
            0.0
        }
    }
}

/// Why a request (or the set-up) failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OfflineError {
    #[error("the model has no chat template; use a text or token-id prompt")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    Template(String),
    #[error("tokenizer: {0}")]
    Tokenize(String),
    /// The request's structured output cannot be enforced.
    #[error("structured output: {0}")]
    Constraint(#[from] ConstraintError),
    /// The model cannot run as asked (its placement failed).
    #[error(transparent)]
    Load(Arc<crate::model::ModelError>),
    #[error("the KV cache budget of {budget} B holds no block of {block_bytes} B")]
    NoKvBlocks { budget: usize, block_bytes: usize },
    #[error("max_model_len {max_model_len} exceeds the model's context length {context_length}")]
    MaxModelLen { max_model_len: usize, context_length: usize },
    /// The prompt and `max_tokens` do not fit the context (as the server refuses them).
    #[error(
        "This model's maximum context length is {context_length} tokens. However, you requested {total} tokens ({prompt_tokens} in the prompt, {max_tokens} in the completion)."
    )]
    ContextExceeded { prompt_tokens: usize, max_tokens: u32, total: usize, context_length: usize },
    /// The engine refused the request at submit.
    #[error(transparent)]
    Rejected(#[from] EngineError),
    /// The engine failed the request while running it.
    #[error("the engine failed the request: {0}")]
    Failed(RequestError),
    /// Request `index` (0-based, in input order) of a batch failed.
    #[error("request {index}: {source}")]
    Request { index: usize, source: Box<OfflineError> },
}

/// Engine sizing for [`Llm::new`]; the defaults are the workers'.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LlmConfig {
    /// Memory for the KV cache, allocated once; it holds as many whole blocks as fit.
    pub kv_cache_bytes: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Most tokens in one forward pass.
    pub max_num_batched_tokens: usize,
    /// Longest sequence (prompt + completion); `None`: the model's context length.
    pub max_model_len: Option<usize>,
    /// Seed for requests that bring none.
    pub seed: u64,
    pub enable_prefix_caching: bool,
    /// Speculative decoding (see [`crate::SpeculativeConfig`]); `None`: off.
    pub speculative: Option<crate::SpeculativeConfig>,
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            kv_cache_bytes: 768 << 20,
            block_size: 16,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            max_model_len: None,
            seed: 0,
            enable_prefix_caching: true,
            speculative: None,
        }
    }
}

/// What [`Llm`] needs to turn inputs into token ids and ids into text.
#[derive(Debug, Clone, Default)]
pub struct TextConfig {
    /// The Jinja chat template, if the model has one.
    pub chat_template: Option<String>,
    pub bos_token: String,
    pub eos_token: String,
    /// Put BOS first in text prompts.
    pub add_bos_token: bool,
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation: a structured output allows them only where it may end.
    pub eos_token_ids: Vec<u32>,
    /// The model is an encoder: text prompts get its tokenizer's special tokens
    /// (`[CLS]` … `[SEP]`), and it embeds only.
    pub encoder: bool,
    /// The pooling the model's own config names, for [`Llm::default_pooling`].
    pub pooling: Option<Pooling>,
}

impl From<&ModelInfo> for TextConfig {
    fn from(info: &ModelInfo) -> Self {
        Self {
            chat_template: info.chat_template.clone(),
            bos_token: info.bos_token.clone(),
            eos_token: info.eos_token.clone(),
            add_bos_token: info.add_bos_token,
            bos_token_id: info.bos_token_id,
            eos_token_ids: info.eos_token_ids.clone(),
            encoder: info.encoder,
            pooling: info.pooling,
        }
    }
}

/// A model with a running engine, for offline batches.
pub struct Llm {
    engine: EngineHandle,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    text: TextConfig,
    /// Built on the first structured output.
    vocabulary: OnceLock<Result<Vocabulary, ConstraintError>>,
}

impl std::fmt::Debug for Llm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llm").field("engine", &self.engine).finish_non_exhaustive()
    }
}

/// One submitted request's output in the making.
struct Pending {
    prompt_token_ids: Vec<u32>,
    prompt_logprobs: Vec<TokenLogprobs>,
    num_cached_tokens: usize,
    skip_special_tokens: bool,
    choices: Vec<ChoiceState>,
}

/// One choice's tokens so far, and how it ended.
#[derive(Default)]
struct ChoiceState {
    token_ids: Vec<u32>,
    logprobs: Vec<TokenLogprobs>,
    watch: Option<StopWatch>,
    finish: Option<FinishReason>,
}

impl Pending {
    /// Takes choice `choice`'s next token; true once every choice is past a stop string or over.
    fn token(&mut self, choice: u32, id: u32, logprobs: Option<TokenLogprobs>) -> bool {
        if let Some(c) = self.choices.get_mut(choice as usize) {
            // Past a stop string: not part of the output.
            if !c.watch.as_ref().is_some_and(StopWatch::stopped) {
                c.token_ids.push(id);
                c.logprobs.extend(logprobs);
                c.watch.as_mut().map(|w| w.push(id));
            }
        }
        self.choices.iter().all(|c| c.finish.is_some() || c.watch.as_ref().is_some_and(StopWatch::stopped))
    }

    /// Choice `choice` ended; true once every choice has.
    fn finished(&mut self, choice: u32, reason: FinishReason) -> bool {
        if let Some(c) = self.choices.get_mut(choice as usize) {
            c.finish = Some(reason);
        }
        self.choices.iter().all(|c| c.finish.is_some())
    }

    fn output(self, tokenizer: &Tokenizer) -> Result<Output, OfflineError> {
        let skip = self.skip_special_tokens;
        let choices = self
            .choices
            .into_iter()
            .map(|c| {
                let (text, stopped) = match c.watch.map(StopWatch::finish) {
                    Some(watched) => watched,
                    None => (
                        tokenizer.decode(&c.token_ids, skip).map_err(|e| OfflineError::Tokenize(e.to_string()))?,
                        false,
                    ),
                };
                // A stop string ends a choice as `Stop`, whatever the engine made of the abort.
                let finish_reason = if stopped { FinishReason::Stop } else { c.finish.unwrap_or(FinishReason::Abort) };
                Ok(Choice { text, token_ids: c.token_ids, finish_reason, logprobs: c.logprobs })
            })
            .collect::<Result<_, OfflineError>>()?;
        Ok(Output {
            choices,
            num_prompt_tokens: self.prompt_token_ids.len(),
            prompt_token_ids: self.prompt_token_ids,
            num_cached_tokens: self.num_cached_tokens,
            prompt_logprobs: self.prompt_logprobs,
        })
    }
}

/// A request's text followed as its tokens come, for its stop strings.
struct StopWatch {
    detok: Detokenizer,
    stops: StopMatcher,
    text: String,
    include_stop_str: bool,
    stopped: bool,
}

impl StopWatch {
    fn new(decoder: Decoder, stops: Vec<String>, skip_special_tokens: bool, include_stop_str: bool) -> Self {
        let detok = Detokenizer::new(decoder).skip_special_tokens(skip_special_tokens);
        Self { detok, stops: StopMatcher::new(stops), text: String::new(), include_stop_str, stopped: false }
    }

    /// Takes a token; true once a stop string appeared (the text then ends there).
    fn push(&mut self, id: u32) -> bool {
        let from = self.text.len();
        self.text.push_str(&self.detok.push(id));
        self.check(from)
    }

    fn check(&mut self, from: usize) -> bool {
        if let StopCheck::StopAt(at) = self.stops.check(&self.text, from) {
            let end = if self.include_stop_str { at + self.stops.len_at(&self.text, at) } else { at };
            self.text.truncate(end);
            self.stopped = true;
        }
        self.stopped
    }

    fn stopped(&self) -> bool {
        self.stopped
    }

    /// The output's text, and whether a stop string ended it.
    fn finish(mut self) -> (String, bool) {
        if !self.stopped {
            let from = self.text.len();
            self.text.push_str(&self.detok.flush());
            self.check(from);
        }
        (self.text, self.stopped)
    }
}

/// Makes request ids unique across batches and `Llm`s sharing an engine.
static NEXT_BATCH: AtomicU64 = AtomicU64::new(0);

impl Llm {
    /// Starts an engine over a loaded model.
    pub fn new(loaded: impl Into<Loaded<Model>>, config: LlmConfig) -> Result<Self, OfflineError> {
        let loaded = loaded.into();
        // A draft model named by the speculative config is loaded here unless paired already.
        let loaded = match (&loaded.model, &config.speculative) {
            (Model::Drafted(_), _) | (_, None) => loaded,
            (_, Some(speculative)) => loaded
                .with_draft_of(Some(speculative), &crate::model::LoadOptions::default())
                .map_err(|e| OfflineError::Load(Arc::new(e)))?,
        };
        let Loaded { model, tokenizer, info } = loaded;
        let block_bytes = model.kv_shape(config.block_size, 1).block_bytes();
        let num_blocks =
            match model.encoder_blocks(config.block_size, config.max_num_batched_tokens, config.max_num_seqs) {
                Some(blocks) => blocks,
                None => config.kv_cache_bytes / block_bytes,
            };
        if num_blocks == 0 {
            return Err(OfflineError::NoKvBlocks { budget: config.kv_cache_bytes, block_bytes });
        }
        let max_model_len = config.max_model_len.unwrap_or(info.context_length);
        if max_model_len > info.context_length {
            return Err(OfflineError::MaxModelLen { max_model_len, context_length: info.context_length });
        }
        let shape = model.kv_shape(config.block_size, num_blocks);
        let engine_config = EngineConfig {
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
            max_model_len,
            eos_token_ids: info.eos_token_ids.clone(),
            default_seed: config.seed,
            enable_prefix_caching: config.enable_prefix_caching,
            speculative: config.speculative.clone(),
        };
        let model =
            model.place(ComputeDevice::Cpu, 1, WeightDtype::Auto).map_err(|e| OfflineError::Load(Arc::new(e)))?;
        let engine = Engine::start(model, shape, engine_config);
        Self::from_engine(engine, tokenizer, TextConfig::from(&info))
    }

    /// Wraps an engine started elsewhere (as the workers start it from their flags).
    pub fn from_engine(engine: EngineHandle, tokenizer: Tokenizer, text: TextConfig) -> Result<Self, OfflineError> {
        let template = match &text.chat_template {
            Some(source) if !source.is_empty() => Some(
                ChatTemplate::new(source, &text.bos_token, &text.eos_token)
                    .map_err(|e| OfflineError::Template(e.to_string()))?,
            ),
            _ => None,
        };
        Ok(Self { engine, tokenizer, template, text, vocabulary: OnceLock::new() })
    }

    /// The running engine.
    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Generates for every prompt with the same parameters; outputs are in prompt order. Fails
    /// with the first failed request's error ([`OfflineError::Request`]) after all have run.
    pub fn generate(&self, prompts: Vec<Prompt>, params: &SamplingParams) -> Result<Vec<Output>, OfflineError> {
        let requests = prompts.into_iter().map(|p| Request::new(Input::Prompt(p), params.clone()));
        collect(self.run(requests.collect(), &mut |_| {}))
    }

    /// Answers every conversation through the chat template; outputs are in input order.
    pub fn chat(
        &self,
        conversations: Vec<Vec<ChatMessage>>,
        params: &SamplingParams,
    ) -> Result<Vec<Output>, OfflineError> {
        let requests = conversations.into_iter().map(|c| Request::new(Input::Chat(c), params.clone()));
        collect(self.run(requests.collect(), &mut |_| {}))
    }

    /// The pooling for embeddings that name none: the model's own (its Sentence-Transformers
    /// config's), else the last token's (vLLM's default for decoders).
    pub fn default_pooling(&self) -> Pooling {
        self.text.pooling.unwrap_or(Pooling::Last)
    }

    /// vLLM's `LLM.encode` / `LLM.embed`: each prompt's final hidden states pooled by `pooling`
    /// (and scaled to unit length with `normalize`), in prompt order, all prompts batched together.
    /// Fails with the first failed prompt's error ([`OfflineError::Request`]) after all have run.
    pub fn encode(
        &self,
        prompts: Vec<Prompt>,
        pooling: Pooling,
        normalize: bool,
    ) -> Result<Vec<Vec<f32>>, OfflineError> {
        let results = self.encode_each(prompts, pooling, normalize, &mut |_| {});
        results
            .into_iter()
            .enumerate()
            .map(|(index, r)| r.map_err(|e| OfflineError::Request { index, source: Box::new(e) }))
            .collect()
    }

    /// [`Self::encode`] with one result per prompt (a prompt that fails does not stop the others),
    /// calling `progress` as each is done.
    pub fn encode_each(
        &self,
        prompts: Vec<Prompt>,
        pooling: Pooling,
        normalize: bool,
        progress: &mut dyn FnMut(&Progress),
    ) -> Vec<Result<Vec<f32>, OfflineError>> {
        let started = Instant::now();
        let batch = NEXT_BATCH.fetch_add(1, Ordering::Relaxed);
        let submitted: Vec<Result<(usize, UnboundedReceiver<EngineEvent>), OfflineError>> = (0..)
            .zip(prompts)
            .map(|(index, prompt)| {
                let ids = self.prompt_ids(&Input::Prompt(prompt))?;
                let len = ids.len();
                let request = EngineRequest::embedding(format!("offline-{batch}-{index}"), ids, pooling);
                Ok((len, self.engine.submit(request)?))
            })
            .collect();
        let total = submitted.len();
        let mut state = Progress { done: 0, total, generated_tokens: 0, prompt_tokens: 0, elapsed: Duration::ZERO };
        progress(&state);
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime");
        let pooled = |mut events: UnboundedReceiver<EngineEvent>| {
            let mut vector = None;
            runtime.block_on(async {
                while let Some(event) = events.recv().await {
                    match event {
                        EngineEvent::Embedding(v) => vector = Some(v),
                        EngineEvent::Error(e) => return Err(OfflineError::Failed(e)),
                        EngineEvent::Finished { .. } => break,
                        EngineEvent::Token { .. } | EngineEvent::PromptLogprobs { .. } => {}
                    }
                }
                Ok(())
            })?;
            let mut vector = vector.ok_or_else(|| {
                OfflineError::Failed(RequestError::new(FailureKind::Engine, "ended without its embedding"))
            })?;
            if normalize {
                crate::request::l2_normalize(&mut vector);
            }
            Ok::<_, OfflineError>(vector)
        };
        // The engine runs every request meanwhile: waiting on each in turn costs nothing.
        submitted
            .into_iter()
            .map(|s| {
                let result = s.and_then(|(len, events)| {
                    let vector = pooled(events)?;
                    state.prompt_tokens += len;
                    Ok(vector)
                });
                state.done += 1;
                state.elapsed = started.elapsed();
                progress(&state);
                result
            })
            .collect()
    }

    /// vLLM's `LLM.beam_search`: for each prompt, the `beam_width` best beams, best first (see
    /// [`prompt::beam`] for the score). Each step asks every live beam of every prompt for its
    /// `2 × beam_width` most likely next tokens, all in one batch.
    pub fn beam_search(
        &self,
        prompts: Vec<Prompt>,
        params: &BeamSearchParams,
    ) -> Result<Vec<Vec<BeamOutput>>, OfflineError> {
        let width = params.beam_width;
        if !(1..=10).contains(&width) {
            let value = width.to_string();
            return Err(EngineError::InvalidSampling { field: "beam_width", limit: "in [1, 10]", value }.into());
        }
        let eos = self.text.eos_token_ids.clone();
        let ends = if params.ignore_eos { Vec::new() } else { eos.clone() };
        let context_length = self.engine.max_model_len();
        let mut searches = Vec::with_capacity(prompts.len());
        for prompt in &prompts {
            let ids = self.prompt_ids(&Input::Prompt(prompt.clone()))?;
            let total = ids.len() + params.max_tokens as usize;
            if total > context_length {
                let (prompt_tokens, max_tokens) = (ids.len(), params.max_tokens);
                return Err(OfflineError::ContextExceeded { prompt_tokens, max_tokens, total, context_length });
            }
            let beams = Beams::new(width, params.length_penalty, ids.len(), ends.clone(), eos.clone());
            searches.push((ids, beams));
        }
        let ask = SamplingParams {
            temperature: 0.0,
            max_tokens: 1,
            logprobs: Some(2 * width as u32),
            ignore_eos: true,
            ..SamplingParams::default()
        };
        for _ in 0..params.max_tokens {
            let requests: Vec<Request> = searches
                .iter()
                .flat_map(|(ids, beams)| beams.live().iter().map(move |b| [ids.as_slice(), &b.tokens].concat()))
                .map(|ids| Request::new(Input::Prompt(Prompt::TokenIds(ids)), ask.clone()))
                .collect();
            if requests.is_empty() {
                break;
            }
            let mut answers = collect(self.run(requests, &mut |_| {}))?.into_iter();
            for (_, beams) in &mut searches {
                let asks = answers.by_ref().take(beams.live().len());
                beams.step(
                    asks.map(|out| out.first().logprobs.first().map(|l| l.top.clone()).unwrap_or_default()).collect(),
                );
            }
        }
        searches
            .into_iter()
            .map(|(_, beams)| {
                beams
                    .finish()
                    .into_iter()
                    .map(|beam| {
                        let text = self
                            .tokenizer
                            .decode(&beam.tokens, true)
                            .map_err(|e| OfflineError::Tokenize(e.to_string()))?;
                        let finish_reason = if beam.ended { FinishReason::Stop } else { FinishReason::Length };
                        Ok(BeamOutput { token_ids: beam.tokens, text, cumulative_logprob: beam.logprob, finish_reason })
                    })
                    .collect()
            })
            .collect()
    }

    /// Runs requests with their own parameters, all submitted at once, calling `progress` as
    /// tokens arrive (at most every 50 ms) and whenever a request ends. One result per request,
    /// in input order: a request that fails does not stop the others.
    pub fn run(
        &self,
        requests: Vec<Request>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Vec<Result<Output, OfflineError>> {
        let started = Instant::now();
        let total = requests.len();
        let batch = NEXT_BATCH.fetch_add(1, Ordering::Relaxed);
        let mut results: Vec<Option<Result<Output, OfflineError>>> = (0..total).map(|_| None).collect();
        // Requests with stop strings follow their text as it comes, to stop where one appears.
        let decoder =
            requests.iter().any(|r| !r.stop.is_empty()).then(|| Decoder::new(Arc::new(self.tokenizer.clone())));
        let mut pending: Vec<Option<Pending>> = (0..total).map(|_| None).collect();
        let mut running = Vec::new();
        for (index, request) in requests.into_iter().enumerate() {
            match self.submit(request, format!("offline-{batch}-{index}"), decoder.as_ref()) {
                Ok((events, state)) => {
                    pending[index] = Some(state);
                    running.push((index, events));
                }
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        let mut state = Progress {
            done: total - running.len(),
            total,
            generated_tokens: 0,
            prompt_tokens: 0,
            elapsed: Duration::ZERO,
        };
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a current-thread runtime");
        runtime.block_on(async {
            // Funnel every request's events into one channel, tagged with the request's index.
            let (merged, mut events) = tokio::sync::mpsc::unbounded_channel();
            for (index, mut rx) in running {
                let merged = merged.clone();
                tokio::spawn(async move {
                    while let Some(event) = rx.recv().await {
                        if merged.send((index, event)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(merged);
            let mut last_report = Instant::now();
            progress(&Progress { elapsed: started.elapsed(), ..state });
            while let Some((index, event)) = events.recv().await {
                let Some(request) = pending[index].as_mut() else { continue };
                let done = match event {
                    EngineEvent::Token { index: choice, id, logprobs, .. } => {
                        if request.token(choice, id, logprobs) {
                            // Every choice is past a stop string: the rest is not wanted.
                            self.engine.abort(&format!("offline-{batch}-{index}"));
                        }
                        state.generated_tokens += 1;
                        if last_report.elapsed() >= Duration::from_millis(50) {
                            last_report = Instant::now();
                            progress(&Progress { elapsed: started.elapsed(), ..state });
                        }
                        false
                    }
                    // The offline batch generates; it submits no embedding request.
                    EngineEvent::Embedding(_) => false,
                    EngineEvent::PromptLogprobs { logprobs, .. } => {
                        request.prompt_logprobs.extend(logprobs);
                        false
                    }
                    EngineEvent::Finished { index: choice, reason, num_cached_tokens, .. } => {
                        request.num_cached_tokens = num_cached_tokens;
                        request.finished(choice, reason)
                    }
                    EngineEvent::Error(e) => {
                        pending[index] = None;
                        results[index] = Some(Err(OfflineError::Failed(e)));
                        true
                    }
                };
                if done {
                    if let Some(request) = pending[index].take() {
                        let output = request.output(&self.tokenizer);
                        state.prompt_tokens += output.as_ref().map_or(0, |o| o.num_prompt_tokens);
                        results[index] = Some(output);
                    }
                    state.done += 1;
                    progress(&Progress { elapsed: started.elapsed(), ..state });
                }
            }
        });
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(OfflineError::Failed(RequestError::new(
                        FailureKind::Engine,
                        "the engine stopped before the request ended",
                    )))
                })
            })
            .collect()
    }

    /// Checks, prepares and submits one request; its events and its output in the making.
    fn submit(
        &self,
        request: Request,
        request_id: String,
        decoder: Option<&Decoder>,
    ) -> Result<(UnboundedReceiver<EngineEvent>, Pending), OfflineError> {
        let mut ids = self.prompt_ids_with(&request.input, &request.chat)?;
        if let Some(keep) = request.truncate_prompt_tokens {
            // As vLLM: the end of the prompt, nearest to what is generated, stays.
            ids.drain(..ids.len().saturating_sub(keep.max(1)));
        }
        let context_length = self.engine.max_model_len();
        let total = ids.len() + request.sampling.max_tokens as usize;
        // A prompt alone too long is the engine's to refuse; one that fits, but not with all it
        // asks to generate, is refused here, as the server refuses it.
        if ids.len() < context_length && total > context_length {
            let (prompt_tokens, max_tokens) = (ids.len(), request.sampling.max_tokens);
            return Err(OfflineError::ContextExceeded { prompt_tokens, max_tokens, total, context_length });
        }
        let mut grammar = request.constraint.as_ref().map(|c| self.compile(c)).transpose()?;
        if let Some(grammar) = &mut grammar {
            grammar.follow_prompt(&ids);
        }
        let mut sampling = request.sampling;
        sampling.bad_words.extend(prompt::bad_words::bad_word_sequences(&request.bad_words, |w| self.tokenize(w))?);
        let n = request.n.max(1);
        let watch = |_| {
            let decoder = decoder.filter(|_| !request.stop.is_empty())?.clone();
            let (stops, skip, include) =
                (request.stop.clone(), request.skip_special_tokens, request.include_stop_str_in_output);
            Some(StopWatch::new(decoder, stops, skip, include))
        };
        let pending = Pending {
            prompt_token_ids: ids.clone(),
            prompt_logprobs: Vec::new(),
            num_cached_tokens: 0,
            skip_special_tokens: request.skip_special_tokens,
            choices: (0..n).map(|choice| ChoiceState { watch: watch(choice), ..ChoiceState::default() }).collect(),
        };
        let events =
            self.engine.submit(EngineRequest { n, grammar, ..EngineRequest::generate(request_id, ids, sampling) })?;
        Ok((events, pending))
    }

    /// A structured output compiled against the model's vocabulary (built on first use).
    pub fn compile(&self, constraint: &Constraint) -> Result<Grammar, ConstraintError> {
        let vocabulary = self.vocabulary.get_or_init(|| {
            let decoder = Decoder::new(Arc::new(self.tokenizer.clone()));
            Vocabulary::new(&decoder, self.engine.vocab_size(), &self.text.eos_token_ids)
        });
        let (grammar, _) = vocabulary.as_ref().map_err(Clone::clone)?.compile(constraint)?;
        Ok(grammar)
    }

    /// The token ids the model sees for an input (a conversation rendered with the default
    /// options).
    pub fn prompt_ids(&self, input: &Input) -> Result<Vec<u32>, OfflineError> {
        self.prompt_ids_with(input, &ChatOptions::default())
    }

    /// The token ids the model sees for an input, a conversation rendered as `chat` asks.
    pub fn prompt_ids_with(&self, input: &Input, chat: &ChatOptions) -> Result<Vec<u32>, OfflineError> {
        match input {
            Input::Prompt(Prompt::TokenIds(ids)) => Ok(ids.clone()),
            Input::Prompt(Prompt::Text(text)) if self.text.encoder => {
                let encoding =
                    self.tokenizer.encode(text.as_str(), true).map_err(|e| OfflineError::Tokenize(e.to_string()))?;
                Ok(encoding.get_ids().to_vec())
            }
            Input::Prompt(Prompt::Text(text)) => {
                let bos = self.text.bos_token_id.filter(|_| self.text.add_bos_token);
                Ok(bos.into_iter().chain(self.tokenize(text)?).collect())
            }
            Input::Chat(messages) => {
                let template = self.template.as_ref().ok_or(OfflineError::NoChatTemplate)?;
                let options = RenderOptions {
                    tools: chat.tools.as_deref(),
                    add_generation_prompt: chat.add_generation_prompt,
                    continue_final_message: chat.continue_final_message,
                    kwargs: chat.kwargs.as_ref(),
                };
                let text =
                    template.render_with(messages, &options).map_err(|e| OfflineError::Template(e.to_string()))?;
                self.tokenize(&text)
            }
        }
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, OfflineError> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| OfflineError::Tokenize(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// All outputs, or the first failure with its index.
fn collect(results: Vec<Result<Output, OfflineError>>) -> Result<Vec<Output>, OfflineError> {
    results
        .into_iter()
        .enumerate()
        .map(|(index, r)| r.map_err(|e| OfflineError::Request { index, source: Box::new(e) }))
        .collect()
}

#[cfg(test)]
mod tests;

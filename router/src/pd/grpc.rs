//! The gRPC edge: tonic clients of the prefill and decode pools, the
//! conversions between wire and domain types, and model-card loading.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use futures::stream::StreamExt;
use proto::worker::decode_client::DecodeClient;
use proto::worker::prefill_client::PrefillClient;
use proto::worker::worker_client::WorkerClient;
use proto::worker::{
    DecodeRequest, EmbedRequest as WireEmbedRequest, FinishReason, GetModelCardRequest, KvTransferParams, ModelCard,
    Pooling as WirePooling, PrefillRequest, ReleaseKvRequest, SamplingParams,
};
use thread_local::ThreadLocal;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::Instrument;

use crate::backend::{
    BackendError, EmbedRequest, Embedded, Finish, GenerateRequest, Pooling, Sampling, TokenChunk, TokenLogprobs,
    TokenStream,
};
use crate::fleet::breaker::Failure;
use crate::fleet::roster::Roster;
use crate::pd::{DecodeLeg, FirstToken, PrefillOutcome, WorkerLegs};
use crate::placement::Leg;

/// vLLM's `kv_transfer_params` asking the prefill worker to pin the KV for a
/// remote decode. The router writes only this; the answer is opaque to it.
const REMOTE_DECODE: &str = r#"{"do_remote_decode":true}"#;

/// How long one connection attempt may take before the worker counts as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings on every worker connection, idle or not, and how long an
/// answer may take: a worker that stalls (frozen, or cut off without a
/// reset) fails its calls within about 6 s instead of hanging them. A busy
/// worker still answers pings: its engine runs off the I/O threads.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(4);

/// Why the worker pools could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A worker URL does not parse.
    #[error("invalid worker url `{url}`: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// No worker answered `GetModelCard` in time.
    #[error("no worker returned a model card within {timeout:?}; last error: {last_error}")]
    NoModelCard { timeout: Duration, last_error: String },
}

/// `url` as a gRPC endpoint.
fn endpoint(url: &str) -> Result<Endpoint, WorkerError> {
    Endpoint::from_shared(url.to_owned())
        .map_err(|e| WorkerError::InvalidUrl { url: url.to_owned(), reason: e.to_string() })
}

/// A channel that connects on first use, so the router starts before its workers.
fn channel(url: &str) -> Result<Channel, WorkerError> {
    Ok(endpoint(url)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// `Worker` service clients for `urls`, in order; nothing connects until used.
pub fn worker_clients(urls: &[String]) -> Result<Vec<WorkerClient<Channel>>, WorkerError> {
    urls.iter().map(|url| Ok(WorkerClient::new(channel(url)?))).collect()
}

/// One pool's channels, slot for slot with its [`Roster`]: a slot's channel
/// is made on first use and remade when another worker takes the slot.
///
/// Each thread has its own channel to each worker: a channel's tasks (its buffer and its
/// HTTP/2 connection) live on the runtime that made it, so a call from the router's HTTP thread
/// that owns them crosses no thread (see `http::threads`).
#[derive(Debug)]
struct Channels {
    roster: Arc<Roster>,
    slots: Vec<ThreadLocal<RefCell<Option<Slot>>>>,
}

/// A slot's member, by URL, and this thread's channel to it.
type Slot = (String, Channel);

impl Channels {
    fn new(roster: Arc<Roster>) -> Self {
        let slots = (0..roster.capacity()).map(|_| ThreadLocal::new()).collect();
        Self { roster, slots }
    }

    /// The channel to the worker in slot `worker` for a call about to be
    /// made (the probe, if its breaker is half-open); `Unavailable` when the
    /// slot is empty (the worker left since it was picked).
    fn dispatch(&self, worker: usize) -> Result<Channel, BackendError> {
        let channel = self.get(worker)?;
        self.roster.breaker(worker).dispatched();
        Ok(channel)
    }

    /// Feeds a call's result to the worker's breaker.
    fn report<T>(&self, worker: usize, result: &Result<T, Status>) {
        let breaker = self.roster.breaker(worker);
        match result {
            Ok(_) => breaker.succeeded(),
            Err(status) => {
                if let Some(failure) = breaker_failure(status) {
                    tracing::debug!(worker, code = ?status.code(), "worker call failed");
                    breaker.failed(failure);
                }
            }
        }
    }

    /// The channel to the worker in slot `worker`; `Unavailable` when the
    /// slot is empty (the worker left since it was picked).
    fn get(&self, worker: usize) -> Result<Channel, BackendError> {
        let member = self
            .roster
            .member(worker)
            .ok_or_else(|| BackendError::Unavailable(format!("worker {worker} left the pool")))?;
        let mut slot = self.slots[worker].get_or_default().borrow_mut();
        match &*slot {
            Some((url, channel)) if *url == member.url => Ok(channel.clone()),
            _ => {
                let made = channel(&member.url).map_err(|e| BackendError::Unavailable(e.to_string()))?;
                *slot = Some((member.url, made.clone()));
                Ok(made)
            }
        }
    }
}

/// The prefill and decode pools as [`WorkerLegs`].
#[derive(Debug, Clone)]
pub struct GrpcWorkers {
    prefill: Arc<Channels>,
    decode: Arc<Channels>,
}

impl GrpcWorkers {
    /// The static pools at these URLs; nothing connects until the first
    /// request, and a URL that does not parse is an error now.
    pub fn new(prefill_urls: &[String], decode_urls: &[String]) -> Result<Self, WorkerError> {
        for url in prefill_urls.iter().chain(decode_urls) {
            endpoint(url)?;
        }
        Ok(Self::over(Arc::new(Roster::fixed(prefill_urls)), Arc::new(Roster::fixed(decode_urls))))
    }

    /// The pools whose members these rosters hold, whenever a call is made.
    pub fn over(prefill: Arc<Roster>, decode: Arc<Roster>) -> Self {
        Self { prefill: Arc::new(Channels::new(prefill)), decode: Arc::new(Channels::new(decode)) }
    }
}

impl From<&Sampling> for SamplingParams {
    fn from(s: &Sampling) -> Self {
        Self {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            seed: s.seed,
            max_tokens: s.max_tokens,
            // The workers add the model's eos ids themselves.
            stop_token_ids: s.stop_token_ids.clone(),
            min_p: s.min_p,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            repetition_penalty: Some(s.repetition_penalty),
            logit_bias: s.logit_bias.iter().copied().collect(),
            ignore_eos: s.ignore_eos,
            min_tokens: s.min_tokens,
            logprobs: s.logprobs,
            prompt_logprobs: s.prompt_logprobs,
            allowed_token_ids: s.allowed_token_ids.clone().unwrap_or_default(),
            bad_words: s.bad_words.iter().map(|w| proto::worker::TokenIds { token_ids: w.clone() }).collect(),
            n: s.n,
            constraint: s.constraint.as_deref().map(wire_constraint),
            constraint_prefix: s.constraint_prefix.clone(),
        }
    }
}

/// A constraint on the wire (`worker::convert::constraint` reads it back).
fn wire_constraint(c: &constraint::Constraint) -> proto::worker::Constraint {
    use constraint::{Constraint, Whitespace};
    use proto::worker::constraint::Kind;
    use proto::worker::json_constraint::Whitespace as Ws;
    let kind = match c {
        Constraint::Json { schema, whitespace } => Kind::Json(proto::worker::JsonConstraint {
            schema: schema.to_string(),
            whitespace: match whitespace {
                Whitespace::Compact => None,
                Whitespace::Flexible => Some(Ws::Flexible(true)),
                Whitespace::Pattern(p) => Some(Ws::Pattern(p.clone())),
            },
        }),
        Constraint::Regex(rx) => Kind::Regex(rx.clone()),
        Constraint::Choice(choices) => Kind::Choice(proto::worker::Choices { choices: choices.clone() }),
        Constraint::Lark(grammar) => Kind::Lark(grammar.clone()),
    };
    proto::worker::Constraint { kind: Some(kind) }
}

fn logprobs(wire: proto::worker::TokenLogprobs) -> TokenLogprobs {
    TokenLogprobs {
        logprob: wire.logprob,
        top: wire.top.into_iter().map(|t| (t.token_id, t.logprob)).collect(),
        rank: wire.rank,
    }
}

/// What a failed call says about the worker's health: only unreachable
/// workers and their own internal failures count; a refusal of the request
/// (bad argument, full, cancelled) or a failed KV pull from another worker
/// says nothing against it.
fn breaker_failure(status: &Status) -> Option<Failure> {
    match status.code() {
        Code::Unavailable => Some(Failure::Unreachable),
        Code::Internal | Code::Unknown | Code::DeadlineExceeded => Some(Failure::Error),
        _ => None,
    }
}

fn backend_error(status: Status) -> BackendError {
    match status.code() {
        Code::Unavailable => BackendError::Unavailable(status.message().to_owned()),
        Code::Aborted | Code::Cancelled => BackendError::Aborted,
        // The decode worker's answer to a failed KV pull.
        Code::DataLoss => BackendError::KvTransfer(status.message().to_owned()),
        code => BackendError::Worker(format!("{code:?}: {}", status.message())),
    }
}

fn finish(reason: FinishReason) -> Result<Option<Finish>, BackendError> {
    match reason {
        FinishReason::Unspecified => Ok(None),
        FinishReason::Stop => Ok(Some(Finish::Stop)),
        FinishReason::Length => Ok(Some(Finish::Length)),
        FinishReason::Abort => Err(BackendError::Aborted),
    }
}

impl WorkerLegs for GrpcWorkers {
    fn num_prefill(&self) -> usize {
        self.prefill.slots.len()
    }

    fn num_decode(&self) -> usize {
        self.decode.slots.len()
    }

    fn prefill(
        &self,
        worker: usize,
        request: GenerateRequest,
    ) -> BoxFuture<'static, Result<PrefillOutcome, BackendError>> {
        let channel = match self.prefill.dispatch(worker) {
            Ok(channel) => channel,
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        let pool = self.prefill.clone();
        let mut client = PrefillClient::new(channel);
        let span = tracing::info_span!(
            "prefill",
            otel.kind = "client",
            request_id = %request.request_id,
            worker,
            prompt_tokens = request.prompt_token_ids.len(),
        );
        let wire = PrefillRequest {
            request_id: request.request_id,
            prompt_token_ids: request.prompt_token_ids.to_vec(),
            sampling: Some((&request.sampling).into()),
            kv_transfer_params: Some(KvTransferParams { json: REMOTE_DECODE.to_string() }),
            cache_salt: request.cache_salt,
            priority: request.priority,
        };
        let wire = traced(wire, &span);
        async move {
            let answer = client.prefill(wire).await;
            pool.report(worker, &answer);
            let answer = answer.map_err(backend_error)?.into_inner();
            // Opaque: forwarded to the decode worker as the prefill worker wrote it.
            let handoff = answer.kv_transfer_params.clone().filter(|p| !p.json.is_empty());
            let num_cached_tokens = answer.num_cached_tokens;
            let choices = if answer.choices.is_empty() {
                // A worker that predates `choices`: its one choice is in the top-level fields.
                vec![FirstToken {
                    token_id: answer.first_token_id,
                    logprobs: answer.first_token_logprobs.clone().map(logprobs),
                    finish: finish(answer.finish_reason())?,
                }]
            } else {
                let mut choices = Vec::with_capacity(answer.choices.len());
                for c in answer.choices {
                    let finish = finish(c.finish_reason())?;
                    choices.push(FirstToken { token_id: c.token_id, logprobs: c.logprobs.map(logprobs), finish });
                }
                choices
            };
            let prompt_logprobs = answer.prompt_logprobs.into_iter().map(logprobs).collect();
            Ok(PrefillOutcome { choices, handoff, num_cached_tokens, prompt_logprobs })
        }
        .instrument(span)
        .boxed()
    }

    fn decode(&self, worker: usize, leg: DecodeLeg) -> BoxFuture<'static, Result<TokenStream, BackendError>> {
        let channel = match self.decode.dispatch(worker) {
            Ok(channel) => channel,
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        let pool = self.decode.clone();
        let mut client = DecodeClient::new(channel);
        let span = tracing::info_span!(
            "decode",
            otel.kind = "client",
            request_id = %leg.request.request_id,
            worker,
            prompt_tokens = leg.request.prompt_token_ids.len(),
        );
        // After a hand-off the prompt's KV came over the wire: the prefill worker's count of
        // cached tokens stands. Colocated (or recomputing), the decode worker's does.
        let computes_prompt = leg.handoff.is_none();
        let wire = DecodeRequest {
            request_id: leg.request.request_id,
            prompt_token_ids: leg.request.prompt_token_ids.to_vec(),
            sampling: Some((&leg.request.sampling).into()),
            kv_transfer_params: leg.handoff,
            first_token_id: leg.first_token_ids.first().copied(),
            first_token_ids: leg.first_token_ids,
            cache_salt: leg.request.cache_salt,
            priority: leg.request.priority,
        };
        let wire = traced(wire, &span);
        async move {
            let opened = client.decode(wire).await;
            pool.report(worker, &opened);
            let chunks = opened.map_err(backend_error)?.into_inner();
            let tokens = chunks.map(move |chunk| {
                if let Err(status) = &chunk {
                    // A stream the worker broke off counts against it.
                    pool.report(worker, &Err::<(), _>(status.clone()));
                }
                let chunk = chunk.map_err(backend_error)?;
                let finish = finish(chunk.finish_reason())?;
                if !chunk.logprobs.is_empty() && chunk.logprobs.len() != chunk.token_ids.len() {
                    return Err(BackendError::Worker(format!(
                        "decode chunk with {} tokens carries {} logprobs",
                        chunk.token_ids.len(),
                        chunk.logprobs.len()
                    )));
                }
                let prompt_logprobs = chunk.prompt_logprobs.into_iter().map(logprobs).collect();
                let logprobs = chunk.logprobs.into_iter().map(logprobs).collect();
                let cached_tokens = computes_prompt.then_some(chunk.num_cached_tokens);
                let (index, token_ids) = (chunk.index, chunk.token_ids);
                Ok(TokenChunk { index, finish, token_ids, logprobs, cached_tokens, prompt_logprobs })
            });
            Ok(tokens.boxed())
        }
        .instrument(span)
        .boxed()
    }

    fn release_kv(&self, worker: usize, remote_request_id: String) -> BoxFuture<'static, Result<bool, BackendError>> {
        let channel = self.prefill.get(worker);
        let span = tracing::info_span!("release_kv", otel.kind = "client", %remote_request_id, worker);
        let wire = traced(ReleaseKvRequest { remote_request_id }, &span);
        async move {
            let mut client = PrefillClient::new(channel?);
            let answer = client.release_kv(wire).await.map_err(backend_error)?;
            Ok(answer.into_inner().released)
        }
        .instrument(span)
        .boxed()
    }
    fn embed(
        &self,
        leg: Leg,
        worker: usize,
        request: EmbedRequest,
    ) -> BoxFuture<'static, Result<Embedded, BackendError>> {
        let pool = match leg {
            Leg::Prefill => self.prefill.clone(),
            Leg::Decode => self.decode.clone(),
        };
        let channel = match pool.dispatch(worker) {
            Ok(channel) => channel,
            Err(e) => return futures::future::ready(Err(e)).boxed(),
        };
        let mut client = WorkerClient::new(channel);
        let span = tracing::info_span!(
            "embed",
            otel.kind = "client",
            request_id = %request.request_id,
            worker,
            prompt_tokens = request.prompt_token_ids.len(),
        );
        let pooling = match request.pooling {
            Pooling::Model => WirePooling::Unspecified,
            Pooling::Last => WirePooling::Last,
            Pooling::Mean => WirePooling::Mean,
            Pooling::Cls => WirePooling::Cls,
        };
        let wire = WireEmbedRequest {
            request_id: request.request_id,
            prompt_token_ids: request.prompt_token_ids.to_vec(),
            pooling: pooling as i32,
            normalize: request.normalize,
            cache_salt: request.cache_salt,
            priority: request.priority,
        };
        let wire = traced(wire, &span);
        async move {
            let answer = client.embed(wire).await;
            pool.report(worker, &answer);
            let answer = answer.map_err(backend_error)?.into_inner();
            if answer.embedding.is_empty() {
                return Err(BackendError::Worker("an empty embedding".into()));
            }
            Ok(Embedded { embedding: answer.embedding, cached_tokens: answer.num_cached_tokens })
        }
        .instrument(span)
        .boxed()
    }
}

/// A gRPC request carrying `span`'s trace context, so the worker's span
/// joins the router's trace as its child.
fn traced<T>(message: T, span: &tracing::Span) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    cluster::telemetry::inject_span(span, request.metadata_mut());
    request
}

/// The largest model card the router accepts. A card carries the model's
/// tokenizer as JSON: 14 MB for Gemma 3's 262k pieces and their merges, over
/// tonic's default limit of 4 MiB.
const MODEL_CARD_MAX_BYTES: usize = 256 << 20;

/// Asks each worker in turn for the model card until one answers, backing off
/// between rounds: workers may still be loading their model.
pub async fn load_model_card(urls: &[String], timeout: Duration) -> Result<ModelCard, WorkerError> {
    let client = |url| Ok(WorkerClient::new(channel(url)?).max_decoding_message_size(MODEL_CARD_MAX_BYTES));
    let clients = urls.iter().map(|url| Ok((url, client(url)?))).collect::<Result<Vec<_>, WorkerError>>()?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut backoff = Duration::from_millis(100);
    let mut last_error = String::from("no worker configured");
    loop {
        for (url, client) in &clients {
            let mut client = client.clone();
            let call = client.get_model_card(GetModelCardRequest {});
            match tokio::time::timeout(CONNECT_TIMEOUT, call).await {
                Ok(Ok(card)) => {
                    tracing::info!(worker = %url, "model card loaded");
                    return Ok(card.into_inner());
                }
                Ok(Err(status)) => last_error = format!("{url}: {}", status.message()),
                Err(_) => last_error = format!("{url}: timed out"),
            }
        }
        if tokio::time::Instant::now() + backoff > deadline {
            return Err(WorkerError::NoModelCard { timeout, last_error });
        }
        tracing::debug!(%last_error, ?backoff, "waiting for a worker's model card");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sampling_field_goes_on_the_wire() {
        let sampling = Sampling {
            temperature: 0.5,
            top_p: 0.9,
            top_k: 3,
            seed: Some(4),
            max_tokens: 20,
            min_p: 0.1,
            presence_penalty: 0.2,
            frequency_penalty: -0.3,
            repetition_penalty: 1.4,
            logit_bias: vec![(2, -1.0), (9, 5.0)],
            stop_token_ids: vec![7],
            ignore_eos: true,
            min_tokens: 6,
            logprobs: Some(3),
            prompt_logprobs: Some(2),
            allowed_token_ids: Some(vec![4, 9]),
            bad_words: vec![vec![1, 2]],
            n: 2,
            constraint: Some(Arc::new(constraint::Constraint::Json {
                schema: serde_json::json!({"type": "object"}),
                whitespace: constraint::Whitespace::Pattern(" ?".into()),
            })),
            constraint_prefix: vec![5],
        };
        let wire = SamplingParams::from(&sampling);
        let want = SamplingParams {
            temperature: 0.5,
            top_p: 0.9,
            top_k: 3,
            seed: Some(4),
            max_tokens: 20,
            stop_token_ids: vec![7],
            min_p: 0.1,
            presence_penalty: 0.2,
            frequency_penalty: -0.3,
            repetition_penalty: Some(1.4),
            logit_bias: [(2, -1.0), (9, 5.0)].into_iter().collect(),
            ignore_eos: true,
            min_tokens: 6,
            logprobs: Some(3),
            prompt_logprobs: Some(2),
            allowed_token_ids: vec![4, 9],
            bad_words: vec![proto::worker::TokenIds { token_ids: vec![1, 2] }],
            n: 2,
            constraint: Some(proto::worker::Constraint {
                kind: Some(proto::worker::constraint::Kind::Json(proto::worker::JsonConstraint {
                    schema: r#"{"type":"object"}"#.into(),
                    whitespace: Some(proto::worker::json_constraint::Whitespace::Pattern(" ?".into())),
                })),
            }),
            constraint_prefix: vec![5],
        };
        assert_eq!(wire, want);
        // The defaults: repetition 1 is sent, so no worker reads proto's 0.
        assert_eq!(SamplingParams::from(&Sampling::default()).repetition_penalty, Some(1.0));
    }
}

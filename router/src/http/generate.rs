//! `/v1/chat/completions`, `/v1/completions` and `/v1/responses`: one path for all. The
//! handler extracts, prepares, hands the request to the generate step and
//! answers as one JSON body or as server-sent events ([`super::sse`]).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures::stream::{BoxStream, StreamExt};
use tracing::Instrument;

use crate::backend::BackendError;
use crate::fleet::model::{unix_now, Model};
use crate::generate::{generate, GenerateError, Job};
use crate::http::error::{ApiError, AppJson, ErrorResponse};
use crate::http::sse::{sse, Streamed};
use crate::http::state::AppState;
use crate::prepare::request::responses::ResponsesRequest;
use crate::prepare::request::{ChatCompletionRequest, CompletionRequest};
use crate::prepare::responses::{validate_responses, ValidResponses};
use crate::prepare::validate::{check_request_id, validate_chat, validate_completion, ValidRequest, ValidationError};
use crate::respond::format::{ChatFormat, ChunkFormat, Collected, CompletionFormat, ResponseMeta};
use crate::respond::response::{ChatCompletion, Completion, NamedStreamEvent, StreamEvent};
use crate::respond::responses::{ResponseObject, ResponsesFormat};
use crate::respond::stream::Delta;
use crate::tenancy::Caller;

/// Header that carries the request id in and out.
const REQUEST_ID: &str = "x-request-id";

/// `POST /v1/chat/completions`.
#[utoipa::path(post, path = "/v1/chat/completions", description = "OpenAI's chat completions with vLLM's extras: every field is honoured or refused with a 400 naming it.", tag = "openai", request_body = ChatCompletionRequest,
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "A `chat.completion`; with `stream`, `text/event-stream` of \
            `chat.completion.chunk`s (each a `data:` line) ending in `data: [DONE]`",
            content((ChatCompletion = "application/json"), (StreamEvent = "text/event-stream"))),
        (status = 400, description = "A parameter is missing or out of range; `param` names it", body = ErrorResponse),
        (status = 401, description = "API keys are configured and none valid was given", body = ErrorResponse),
        (status = 403, description = "The key's tenant may not use `model`", body = ErrorResponse),
        (status = 404, description = "`model` is not a served model", body = ErrorResponse),
        (status = 413, description = "The body is larger than the router accepts", body = ErrorResponse),
        (status = 429, description = "The admission queue is full, or a limit of the key is reached; see `Retry-After`", body = ErrorResponse),
        (status = 502, description = "A worker failed", body = ErrorResponse),
        (status = 503, description = "The model is still loading or no worker is reachable", body = ErrorResponse),
    ))]
pub async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    AppJson(body): AppJson<ChatCompletionRequest>,
) -> Response {
    handle(state, caller, headers, body).await
}

/// `POST /v1/completions`.
#[utoipa::path(post, path = "/v1/completions", description = "OpenAI's completions with vLLM's extras (a batch of prompts, echo with logprobs, prompt logprobs, beam search).", tag = "openai", request_body = CompletionRequest,
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "A `text_completion`; with `stream`, `text/event-stream` of \
            `text_completion` chunks (each a `data:` line) ending in `data: [DONE]`",
            content((Completion = "application/json"), (StreamEvent = "text/event-stream"))),
        (status = 400, description = "A parameter is missing or out of range; `param` names it", body = ErrorResponse),
        (status = 401, description = "API keys are configured and none valid was given", body = ErrorResponse),
        (status = 403, description = "The key's tenant may not use `model`", body = ErrorResponse),
        (status = 404, description = "`model` is not a served model", body = ErrorResponse),
        (status = 413, description = "The body is larger than the router accepts", body = ErrorResponse),
        (status = 429, description = "The admission queue is full, or a limit of the key is reached; see `Retry-After`", body = ErrorResponse),
        (status = 502, description = "A worker failed", body = ErrorResponse),
        (status = 503, description = "The model is still loading or no worker is reachable", body = ErrorResponse),
    ))]
pub async fn completions(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    AppJson(body): AppJson<CompletionRequest>,
) -> Response {
    handle(state, caller, headers, body).await
}

/// `POST /v1/responses`.
#[utoipa::path(post, path = "/v1/responses", description = "OpenAI's Responses API, stateless: run as a chat completion, \
    with every field honoured or refused with a 400 naming it. Nothing is stored, so `store: true`, \
    `previous_response_id`, `background` and `conversation` are refused.", tag = "openai", request_body = ResponsesRequest,
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "A `response`; with `stream`, `text/event-stream` of typed events (`event:` and \
            `data:` lines), from `response.created` to `response.completed` or `response.incomplete`",
            content((ResponseObject = "application/json"), (NamedStreamEvent = "text/event-stream"))),
        (status = 400, description = "A parameter is missing, out of range or not supported; `param` names it", body = ErrorResponse),
        (status = 401, description = "API keys are configured and none valid was given", body = ErrorResponse),
        (status = 403, description = "The key's tenant may not use `model`", body = ErrorResponse),
        (status = 404, description = "`model` is not a served model", body = ErrorResponse),
        (status = 413, description = "The body is larger than the router accepts", body = ErrorResponse),
        (status = 429, description = "The admission queue is full, or a limit of the key is reached; see `Retry-After`", body = ErrorResponse),
        (status = 502, description = "A worker failed", body = ErrorResponse),
        (status = 503, description = "The model is still loading or no worker is reachable", body = ErrorResponse),
    ))]
pub async fn responses(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    AppJson(body): AppJson<ResponsesRequest>,
) -> Response {
    handle(state, caller, headers, body).await
}

/// What differs between the generation endpoints.
trait Endpoint: Sized {
    /// The `endpoint` of the request's span.
    const NAME: &'static str;
    /// How its answers are written.
    type Format: ChunkFormat;
    /// The body's `model`.
    fn model(&self) -> Option<&str>;
    /// vLLM's `request_id` extra, when the body has it.
    fn request_id(&self) -> Option<&str>;
    /// The end user, logged.
    fn user(&self) -> Option<&str>;
    /// The names of the body's fields that are part of neither API (ignored).
    fn unknown(&self) -> Vec<&str>;
    /// OpenAI's `safety_identifier`, logged as `user` is.
    fn safety_identifier(&self) -> Option<&str> {
        None
    }
    /// The prepared requests (one, or one per prompt of a completions batch) and the format
    /// their answer is written in.
    fn prepare(self, model: &Model) -> Result<(Vec<ValidRequest>, Self::Format), ValidationError>;
}

impl Endpoint for ChatCompletionRequest {
    const NAME: &'static str = "chat";
    type Format = ChatFormat;

    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn request_id(&self) -> Option<&str> {
        self.params.request_id.as_deref()
    }

    fn user(&self) -> Option<&str> {
        self.params.user.as_deref()
    }

    fn unknown(&self) -> Vec<&str> {
        self.unknown.keys().map(String::as_str).collect()
    }

    fn safety_identifier(&self) -> Option<&str> {
        self.safety_identifier.as_deref()
    }

    fn prepare(self, model: &Model) -> Result<(Vec<ValidRequest>, ChatFormat), ValidationError> {
        let valid = validate_chat(model, self)?;
        let format = ChatFormat::new(valid.parse_tool_calls)
            .with_echo(valid.echo.clone())
            .with_reasoning(valid.include_reasoning);
        Ok((vec![valid], format))
    }
}

impl Endpoint for CompletionRequest {
    const NAME: &'static str = "completions";
    type Format = CompletionFormat;

    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn request_id(&self) -> Option<&str> {
        self.params.request_id.as_deref()
    }

    fn user(&self) -> Option<&str> {
        self.params.user.as_deref()
    }

    fn unknown(&self) -> Vec<&str> {
        self.unknown.keys().map(String::as_str).collect()
    }

    fn prepare(self, model: &Model) -> Result<(Vec<ValidRequest>, CompletionFormat), ValidationError> {
        let valid = validate_completion(model, self)?;
        let format = CompletionFormat::new(valid.iter().map(|v| v.echo.clone()).collect(), valid[0].sampling.n.max(1));
        Ok((valid, format))
    }
}

impl Endpoint for ResponsesRequest {
    const NAME: &'static str = "responses";
    type Format = ResponsesFormat;

    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    fn unknown(&self) -> Vec<&str> {
        self.unknown.keys().map(String::as_str).collect()
    }

    fn safety_identifier(&self) -> Option<&str> {
        self.safety_identifier.as_deref()
    }

    fn prepare(self, model: &Model) -> Result<(Vec<ValidRequest>, ResponsesFormat), ValidationError> {
        let ValidResponses { valid, echo } = validate_responses(model, self)?;
        let format =
            ResponsesFormat::new(echo, valid.parse_tool_calls, valid.prompt_token_ids.len(), model.decoder.clone());
        Ok((vec![valid], format))
    }
}

/// Either endpoint: the span, the model, preparation under the caller's key,
/// then the answer. Every response carries the request id.
async fn handle<E: Endpoint>(state: AppState, caller: Caller, headers: HeaderMap, body: E) -> Response {
    let arrival = Instant::now();
    let request_id = request_id(&headers, body.request_id());
    let user = body.user();
    let span = tracing::info_span!("request", request_id = %request_id, endpoint = E::NAME, user,
        safety_identifier = body.safety_identifier(), model = tracing::field::Empty);
    cluster::telemetry::set_parent_from_http(&span, &headers);
    let answer = async {
        let unknown = body.unknown();
        if !unknown.is_empty() {
            // As vLLM: fields of neither API are ignored, and named in the log.
            tracing::debug!(fields = ?unknown, "ignored fields that are part of neither the OpenAI nor the vLLM API");
        }
        let (served, model) = state.model(body.model()).await?;
        tracing::Span::current().record("model", model.served_name.as_str());
        let (valid, format) = body.prepare(&model)?;
        caller.authorize(&model.served_name)?;
        // A batch's prompts run as requests of their own, `<id>-<i>` on the workers, as vLLM's.
        let batched = valid.len() > 1;
        let jobs = (0..)
            .zip(valid)
            .map(|(i, mut valid): (usize, ValidRequest)| {
                // The request runs under its tenant's cache salt.
                valid.cache_salt = caller.cache_salt(valid.cache_salt.take());
                let request_id = if batched { format!("{request_id}-{i}") } else { request_id.clone() };
                let (caller, served, model) = (caller.clone(), served.clone(), model.clone());
                Job { request_id, arrival, caller, served, model, valid }
            })
            .collect();
        answer(&state, &request_id, jobs, format).await
    }
    .instrument(span)
    .await;
    with_request_id(answer.unwrap_or_else(IntoResponse::into_response), &request_id)
}

/// The client's `X-Request-Id`, else the body's `request_id` (vLLM's extra)
/// when it is valid, else a fresh uuid. An invalid body id is refused by
/// validation, and the refusal carries the uuid.
pub(super) fn request_id(headers: &HeaderMap, body_id: Option<&str>) -> String {
    let header = headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty());
    let body = body_id.filter(|id| check_request_id(id).is_ok());
    header.or(body).map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

pub(super) fn with_request_id(mut response: Response, request_id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// Runs `jobs` (one, or one per prompt of a completions batch) and answers in `format`: a stream
/// of events, or one body once every choice is done. A batch's choices are numbered prompt-major,
/// as OpenAI numbers them: choice `j` of prompt `i` is `i * n + j`.
async fn answer<F: ChunkFormat>(
    state: &AppState,
    request_id: &str,
    jobs: Vec<Job>,
    format: F,
) -> Result<Response, ApiError> {
    let valid = &jobs[0].valid;
    let (stream, include_usage, return_token_ids) = (valid.stream, valid.include_usage, valid.return_token_ids);
    let continuous_usage = valid.continuous_usage;
    let (logprobs, per_prompt) = (valid.sampling.logprobs.is_some(), valid.sampling.n.max(1));
    let prompt_logprobs_field = valid.prompt_logprobs_field;
    let model = jobs[0].model.served_name.clone();
    // As vLLM: the response id is the request id (the client's, or a fresh uuid).
    let id = format!("{}{}", format.id_prefix(), request_id);
    let system_fingerprint = jobs[0].model.fingerprint.clone();
    // Each prompt waits for its own turn; a refusal of any drops those already started.
    let mut generations = Vec::with_capacity(jobs.len());
    for job in jobs {
        generations.push(generate(&state.metrics, state.usage(), job).await?);
    }
    let prompts: Vec<Arc<Vec<u32>>> = generations.iter().map(|g| g.prompt.clone()).collect();
    let prompt_tokens: usize = prompts.iter().map(|p| p.len()).sum();
    let deltas = prompt_major(generations.into_iter().map(|g| g.deltas).collect(), per_prompt);
    let meta = ResponseMeta {
        id,
        created: unix_now(),
        system_fingerprint,
        model,
        prompt_token_ids: return_token_ids.then(|| prompts.clone()),
        logprobs,
        prompt_logprobs_field,
        n: per_prompt * prompts.len() as u32,
        per_prompt,
    };
    if stream {
        let stream = Streamed { meta, format, deltas, prompt_tokens, include_usage, continuous_usage };
        return Ok(sse(stream).await);
    }
    let collected = collect(deltas, meta.n).await?;
    let completion_tokens: usize = collected.iter().map(|c| c.token_ids.len()).sum();
    tracing::info!(prompt_tokens, completion_tokens, "request done");
    let body = format.whole(&meta, prompt_tokens, collected);
    Ok(([(CONTENT_TYPE, "application/json")], body).into_response())
}

/// The deltas of every prompt's generation as one stream, each choice renumbered prompt-major.
fn prompt_major(
    mut streams: Vec<BoxStream<'static, Result<Delta, BackendError>>>,
    per_prompt: u32,
) -> BoxStream<'static, Result<Delta, BackendError>> {
    if streams.len() == 1 {
        return streams.remove(0);
    }
    let renumbered = (0u32..).zip(streams).map(|(prompt, deltas)| {
        deltas.map(move |delta| delta.map(|d| Delta { index: prompt * per_prompt + d.index, ..d })).boxed()
    });
    futures::stream::select_all(renumbered).boxed()
}

impl From<GenerateError> for ApiError {
    fn from(e: GenerateError) -> Self {
        match e {
            GenerateError::Limit(e) => Self::Limit(e),
            GenerateError::Admission(e) => Self::Admission(e),
        }
    }
}

/// Every choice's whole output, in choice order.
async fn collect(
    mut deltas: BoxStream<'static, Result<Delta, BackendError>>,
    n: u32,
) -> Result<Vec<Collected>, BackendError> {
    let mut outs: Vec<Collected> = (0..n.max(1)).map(|_| Collected::default()).collect();
    while let Some(delta) = deltas.next().await {
        let delta = delta?;
        let Some(out) = outs.get_mut(delta.index as usize) else {
            return Err(BackendError::Worker(format!("a delta for choice {} of {n}", delta.index)));
        };
        out.text.push_str(&delta.text);
        out.token_ids.extend(delta.token_ids);
        out.logprobs.extend(delta.logprobs);
        out.finish = delta.finish.or(out.finish);
        out.stop_reason = delta.stop_reason.or(out.stop_reason.take());
        out.cached_tokens = delta.cached_tokens.or(out.cached_tokens);
        out.prompt_logprobs = delta.prompt_logprobs.or(out.prompt_logprobs.take());
    }
    Ok(outs)
}

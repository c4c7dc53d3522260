//! `/v1/chat/completions` and `/v1/completions`: validate, start the
//! generation, answer as one JSON body or as server-sent events.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::admission::hold;
use crate::fleet::model::{unix_now, Model};
use crate::fleet::served::ServedModel;
use crate::http::error::ErrorResponse;
use crate::http::error::{ApiError, AppJson};
use crate::http::state::AppState;
use crate::pd::{BackendError, Finish, GenerateRequest};
use crate::prepare::request::{ChatCompletionRequest, CompletionRequest};
use crate::prepare::validate::{check_request_id, validate_chat, validate_completion, ValidRequest};
use crate::respond::format::{ChatFormat, ChunkFormat, Collected, CompletionFormat, ResponseMeta};
use crate::respond::response::Usage;
use crate::respond::stream::{deltas, Delta, Output};
use crate::tenancy::limits::Running;
use crate::tenancy::usage::{meter, UsageRecord};
use crate::tenancy::Caller;

/// Header that carries the request id in and out.
const REQUEST_ID: &str = "x-request-id";
/// Stream events buffered between the generation task and the client.
const EVENT_BUFFER: usize = 32;

/// `POST /v1/chat/completions`.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "A `chat.completion`; with `stream`, `text/event-stream` of \
            `chat.completion.chunk`s ending in `[DONE]`",
            content(("application/json"), ("text/event-stream"))),
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
    let arrival = Instant::now();
    let request_id = request_id(&headers, body.params.request_id.as_deref());
    let user = body.params.user.clone();
    let span = tracing::info_span!("request", request_id = %request_id, endpoint = "chat", user = user.as_deref(),
        model = tracing::field::Empty);
    cluster::telemetry::set_parent_from_http(&span, &headers);
    let answer = async {
        let (served, model) = state.model(body.model.as_deref()).await?;
        tracing::Span::current().record("model", model.served_name.as_str());
        let valid = for_caller(&caller, &model, validate_chat(&model, body)?)?;
        let format = ChatFormat::new(valid.parse_tool_calls).with_echo(valid.echo.clone());
        Ok::<_, ApiError>(run(&state, &served, &caller, &model, &request_id, arrival, valid, format).await)
    }
    .instrument(span)
    .await;
    with_request_id(answer.unwrap_or_else(IntoResponse::into_response), &request_id)
}

/// `POST /v1/completions`.
#[utoipa::path(post, path = "/v1/completions", tag = "openai", request_body = CompletionRequest,
    responses(
        (status = 200, description = "A `text_completion`; with `stream`, `text/event-stream` of \
            chunks ending in `[DONE]`",
            content(("application/json"), ("text/event-stream"))),
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
    let arrival = Instant::now();
    let request_id = request_id(&headers, body.params.request_id.as_deref());
    let user = body.params.user.clone();
    let span = tracing::info_span!("request", request_id = %request_id, endpoint = "completions",
        user = user.as_deref(), model = tracing::field::Empty);
    cluster::telemetry::set_parent_from_http(&span, &headers);
    let answer = async {
        let (served, model) = state.model(body.model.as_deref()).await?;
        tracing::Span::current().record("model", model.served_name.as_str());
        let valid = for_caller(&caller, &model, validate_completion(&model, body)?)?;
        let format = CompletionFormat::new(valid.echo.clone());
        Ok::<_, ApiError>(run(&state, &served, &caller, &model, &request_id, arrival, valid, format).await)
    }
    .instrument(span)
    .await;
    with_request_id(answer.unwrap_or_else(IntoResponse::into_response), &request_id)
}

/// `valid` as `caller` may send it: on a model its tenant may use, under
/// its tenant's cache salt.
fn for_caller(caller: &Caller, model: &Model, mut valid: ValidRequest) -> Result<ValidRequest, ApiError> {
    caller.authorize(&model.served_name)?;
    valid.cache_salt = caller.cache_salt(valid.cache_salt.take());
    Ok(valid)
}

/// Holds `valid` to its caller's limits, counting a refusal in the metrics.
fn caller_limits(state: &AppState, caller: &Caller, valid: &ValidRequest) -> Result<Running, ApiError> {
    let most_new_tokens = u64::from(valid.sampling.max_tokens) * u64::from(valid.sampling.n.max(1));
    caller.check_request().and_then(|()| caller.admit(valid.prompt_token_ids.len(), most_new_tokens)).map_err(|e| {
        state.metrics.tenants().limited(caller.tenant(), caller.key_id(), e.kind());
        ApiError::Limit(e)
    })
}

/// The client's `X-Request-Id`, else the body's `request_id` (vLLM's extra)
/// when it is valid, else a fresh uuid. An invalid body id is refused by
/// validation, and the refusal carries the uuid.
fn request_id(headers: &HeaderMap, body_id: Option<&str>) -> String {
    let header = headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty());
    let body = body_id.filter(|id| check_request_id(id).is_ok());
    header.or(body).map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned)
}

fn with_request_id(mut response: Response, request_id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    response
}

/// Starts the generation on `served`'s workers and answers in the
/// endpoint's format. `arrival` is when the handler started, the origin of
/// the time to first token.
#[allow(clippy::too_many_arguments)]
async fn run<F: ChunkFormat>(
    state: &AppState,
    served: &ServedModel,
    caller: &Caller,
    model: &Model,
    request_id: &str,
    arrival: Instant,
    valid: ValidRequest,
    format: F,
) -> Response {
    let running = match caller_limits(state, caller, &valid) {
        Ok(running) => running,
        Err(e) => return e.into_response(),
    };
    let prompt = Arc::new(valid.prompt_token_ids);
    let meta = ResponseMeta {
        id: format!("{}-{}", format.id_prefix(), uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model: model.served_name.clone(),
        prompt_token_ids: valid.return_token_ids.then(|| prompt.clone()),
        logprobs: valid.sampling.logprobs.is_some(),
        n: valid.sampling.n,
    };
    // Each choice has its own detokenizer, stop strings and max_tokens count.
    let outputs = (0..valid.sampling.n.max(1))
        .map(|_| {
            Output::new(model.tokenizer.clone(), valid.stops.clone(), valid.sampling.max_tokens)
                .include_stop_str(valid.include_stop_str_in_output)
                .skip_special_tokens(valid.skip_special_tokens)
        })
        .collect();
    // Waits here, before any byte of the answer, so a full queue is a plain 429.
    // A client that leaves while queued drops this future and its place in line.
    let queued = Instant::now();
    let mut request = GenerateRequest {
        request_id: request_id.to_owned(),
        prompt_token_ids: prompt.clone(),
        sampling: valid.sampling,
        priority: valid.priority,
        cache_salt: valid.cache_salt,
        first_worker: None,
    };
    // Placement runs when the turn comes, on the load of that moment.
    let chooser = served.backend.first_leg_chooser(&request);
    let permit = match served.admission.admit_with(request.priority, chooser).await {
        Ok(permit) => permit,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let name = model.served_name.as_str();
    // Only admitted requests: a refusal never waited, and its prompt never runs.
    state.metrics.observe_queue_time(name, queued.elapsed());
    state.metrics.count_prompt_tokens(name, prompt.len());
    request.first_worker = Some(permit.worker());
    let tokens = served.backend.generate(request);
    // The slot is held until the token stream ends or is dropped (client gone).
    let tokens = hold(state.metrics.time_tokens(name, tokens, arrival), permit);
    let usage = UsageRecord::start(state.usage(), caller, request_id, name, prompt.len(), running);
    let deltas = meter(state.metrics.count_deltas(name, deltas(tokens, outputs)), usage);
    if valid.stream {
        let stream = Streamed { meta, format, deltas, prompt_tokens: prompt.len(), include_usage: valid.include_usage };
        return sse(stream).into_response();
    }
    let collected = match collect(deltas, meta.n).await {
        Ok(collected) => collected,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let completion_tokens: usize = collected.iter().map(|c| c.token_ids.len()).sum();
    tracing::info!(prompt_tokens = prompt.len(), completion_tokens, "request done");
    Json(format.whole(&meta, prompt.len(), collected)).into_response()
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
    }
    Ok(outs)
}

/// One streaming answer in the making.
struct Streamed<F> {
    meta: ResponseMeta,
    format: F,
    deltas: BoxStream<'static, Result<Delta, BackendError>>,
    prompt_tokens: usize,
    include_usage: bool,
}

/// Runs the stream in its own task so a slow client never stalls the token
/// stream's bookkeeping, and stops it (dropping the generation) as soon as
/// the client goes away.
fn sse<F: ChunkFormat>(streamed: Streamed<F>) -> impl IntoResponse {
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    tokio::spawn(write_events(streamed, tx).in_current_span());
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}

async fn write_events<F: ChunkFormat>(mut s: Streamed<F>, tx: mpsc::Sender<Result<Event, Infallible>>) {
    let send = |data: String| {
        let tx = tx.clone();
        async move { tx.send(Ok(Event::default().data(data))).await.is_ok() }
    };
    for chunk in s.format.opening(&s.meta) {
        if !send(chunk).await {
            return;
        }
    }
    let mut completion_tokens = 0;
    let mut first = true;
    let mut finished = vec![false; s.meta.n.max(1) as usize];
    loop {
        let next = tokio::select! {
            next = s.deltas.next() => next,
            () = tx.closed() => {
                tracing::info!("client disconnected");
                return;
            }
        };
        let delta = match next {
            None => break,
            Some(Ok(delta)) => delta,
            Some(Err(e)) => {
                let error = ApiError::from(e);
                tracing::warn!(%error, "stream failed");
                // Each choice the failure cut short ends visibly, as vLLM's
                // do: `finish_reason: "error"`, then the error itself.
                for index in (0..finished.len()).filter(|&i| !finished[i]) {
                    let end = Delta { index: index as u32, finish: Some(Finish::Error), ..Delta::default() };
                    for chunk in s.format.delta(&s.meta, &end, first) {
                        send(chunk).await;
                    }
                    first = false;
                }
                send(error.body().to_string()).await;
                break;
            }
        };
        if let Some(done) = finished.get_mut(delta.index as usize) {
            *done |= delta.finish.is_some();
        }
        completion_tokens += delta.token_ids.len();
        for chunk in s.format.delta(&s.meta, &delta, first) {
            if !send(chunk).await {
                return;
            }
        }
        first = false;
    }
    tracing::info!(prompt_tokens = s.prompt_tokens, completion_tokens, "request done");
    if s.include_usage {
        let usage = Usage::new(s.prompt_tokens as u32, completion_tokens as u32);
        send(s.format.usage(&s.meta, usage)).await;
    }
    send("[DONE]".to_owned()).await;
}

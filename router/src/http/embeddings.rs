//! `POST /v1/embeddings`, vLLM's `/pooling`, `/score` and the `/rerank` routes: each extracts, prepares, runs the
//! embed step and answers one JSON body. Scores are cosine similarities of the texts' embeddings,
//! as vLLM scores with an embedding model.

use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use tracing::Instrument;

use crate::backend::Embedded;
use crate::fleet::model::{unix_now, Model};
use crate::generate::{embed, EmbedError, Job};
use crate::http::error::{ApiError, AppJson, ErrorResponse};
use crate::http::generate::{request_id, with_request_id};
use crate::http::state::AppState;
use crate::prepare::embeddings::{not_matryoshka, validate_embedding, EmbeddingRequest, ValidEmbedding};
use crate::prepare::scoring::{validate_rerank, validate_score, RerankRequest, ScoreRequest, ValidScoring};
use crate::prepare::validate::ValidationError;
use crate::respond::embeddings::{
    EmbeddingData, EmbeddingList, EmbeddingUsage, EmbeddingVector, PoolingData, PoolingList,
};
use crate::respond::scoring::{
    cosine, RerankDocument, RerankResponse, RerankResult, RerankUsage, ScoreData, ScoreList,
};
use crate::tenancy::Caller;

/// `POST /v1/embeddings`.
#[utoipa::path(post, path = "/v1/embeddings", description = "OpenAI's embeddings with vLLM's extras: each input's \
    final hidden states pooled into one vector (the last token's by default, L2-normalized), computed by the \
    first leg's workers (prefill, or decode when colocated) as prefill-only work placed by prefix affinity.",
    tag = "openai", request_body = EmbeddingRequest,
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "A `list` of `embedding`s, one per input in input order", body = EmbeddingList),
        PooledErrors,
    ))]
pub async fn embeddings(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    AppJson(body): AppJson<EmbeddingRequest>,
) -> Response {
    vectors_of(&state, caller, &headers, body, "embeddings", |call, vectors| {
        let data = (0..).zip(vectors).map(|(index, embedding)| EmbeddingData { object: "embedding", index, embedding });
        Json(EmbeddingList {
            id: format!("embd-{}", call.request_id),
            object: "list",
            created: unix_now(),
            usage: call.usage(),
            model: call.model,
            data: data.collect(),
        })
        .into_response()
    })
    .await
}

/// `POST /pooling`.
#[utoipa::path(post, path = "/pooling", description = "vLLM's pooling: the body of `/v1/embeddings` (`input` or \
    `messages`), answered with each input's pooled hidden states as a `pooling` object.",
    tag = "vllm", request_body = EmbeddingRequest,
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "A `list` of `pooling` objects, one per input in input order", body = PoolingList),
        PooledErrors,
    ))]
pub async fn pooling(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    AppJson(body): AppJson<EmbeddingRequest>,
) -> Response {
    vectors_of(&state, caller, &headers, body, "pooling", |call, vectors| {
        let data = (0..).zip(vectors).map(|(index, data)| PoolingData { object: "pooling", index, data });
        Json(PoolingList {
            id: format!("pool-{}", call.request_id),
            object: "list",
            created: unix_now(),
            usage: call.usage(),
            model: call.model,
            data: data.collect(),
        })
        .into_response()
    })
    .await
}

/// The flow of `/v1/embeddings` and `/pooling`: the body's inputs embedded, their vectors
/// encoded as it asks, then `answer`.
async fn vectors_of(
    state: &AppState,
    caller: Caller,
    headers: &HeaderMap,
    body: EmbeddingRequest,
    endpoint: &'static str,
    answer: impl FnOnce(Call, Vec<EmbeddingVector>) -> Response,
) -> Response {
    let head = Head::of(headers, body.request_id.as_deref(), body.user.clone(), &body.unknown, body.model.clone());
    pooled(
        state,
        caller,
        headers,
        head,
        endpoint,
        |model| {
            let valid = validate_embedding(model, body)?;
            Ok((valid.clone(), valid))
        },
        |call, vectors, valid| Ok(answer(call, encoded(vectors, &valid)?)),
    )
    .await
}

/// The vectors as `encoding_format` asks, once their size is checked against `dimensions`.
fn encoded(vectors: Vec<Embedded>, valid: &ValidEmbedding) -> Result<Vec<EmbeddingVector>, ApiError> {
    let size = vectors.first().map_or(0, |v| v.embedding.len());
    // A worker whose card did not say its size is checked on its answer.
    if let Some(wanted) = valid.dimensions.filter(|&d| d as usize != size) {
        return Err(ApiError::from(not_matryoshka(size, wanted)));
    }
    Ok(vectors.into_iter().map(|v| EmbeddingVector::new(v.embedding, valid.encoding)).collect())
}

/// `POST /score` (and `/v1/score`).
#[utoipa::path(post, path = "/score", description = "vLLM's score: the cosine similarity of `text_1`'s and \
    `text_2`'s embeddings, one to each or pair by pair.", tag = "vllm", request_body = ScoreRequest,
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "A `list` of `score`s, one per text of `text_2`", body = ScoreList),
        PooledErrors,
    ))]
pub async fn score(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    AppJson(body): AppJson<ScoreRequest>,
) -> Response {
    let head = Head::of(&headers, body.request_id.as_deref(), body.user.clone(), &body.unknown, body.model.clone());
    pooled(
        &state,
        caller,
        &headers,
        head,
        "score",
        |model| {
            let ValidScoring { embedding, pairs } = validate_score(model, body)?;
            Ok((embedding, pairs))
        },
        |call, vectors, pairs| {
            let data = (0..)
                .zip(pairs)
                .map(|(index, (a, b))| ScoreData {
                    index,
                    object: "score",
                    score: cosine(&vectors[a].embedding, &vectors[b].embedding),
                })
                .collect();
            Ok(Json(ScoreList {
                id: format!("score-{}", call.request_id),
                object: "list",
                created: unix_now(),
                model: call.model,
                data,
                usage: EmbeddingUsage { prompt_tokens: call.prompt_tokens, total_tokens: call.prompt_tokens },
            })
            .into_response())
        },
    )
    .await
}

/// `POST /rerank` (and `/v1/rerank`, `/v2/rerank`).
#[utoipa::path(post, path = "/rerank", description = "Jina's and Cohere's rerank: the documents ordered by the \
    cosine similarity of their embeddings to the query's, best first.", tag = "vllm", request_body = RerankRequest,
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The best `top_n` documents, most relevant first", body = RerankResponse),
        PooledErrors,
    ))]
pub async fn rerank(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    AppJson(body): AppJson<RerankRequest>,
) -> Response {
    let head = Head::of(&headers, body.request_id.as_deref(), body.user.clone(), &body.unknown, body.model.clone());
    let documents = body.documents.clone().unwrap_or_default();
    pooled(
        &state,
        caller,
        &headers,
        head,
        "rerank",
        |model| {
            let (ValidScoring { embedding, pairs }, top_n, with_text) = validate_rerank(model, body)?;
            Ok((embedding, (pairs, top_n, with_text)))
        },
        |call, vectors, (pairs, top_n, with_text)| {
            let mut results: Vec<RerankResult> = (0..)
                .zip(pairs)
                .map(|(index, (query, document))| RerankResult {
                    index,
                    document: with_text.then(|| RerankDocument { text: documents[index as usize].clone() }),
                    relevance_score: cosine(&vectors[query].embedding, &vectors[document].embedding),
                })
                .collect();
            // Best first; ties keep document order.
            results.sort_by(|a, b| b.relevance_score.total_cmp(&a.relevance_score));
            results.truncate(top_n);
            Ok(Json(RerankResponse {
                id: format!("rerank-{}", call.request_id),
                model: call.model,
                usage: RerankUsage { total_tokens: call.prompt_tokens },
                results,
            })
            .into_response())
        },
    )
    .await
}

/// The errors every pooled endpoint may answer, for the OpenAPI document.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // Never built: it only describes the answers `ApiError` gives.
enum PooledErrors {
    #[response(status = 400, description = "A parameter is missing or out of range; `param` names it")]
    BadRequest(ErrorResponse),
    #[response(status = 401, description = "API keys are configured and none valid was given")]
    Unauthorized(ErrorResponse),
    #[response(status = 403, description = "The key's tenant may not use `model`")]
    Forbidden(ErrorResponse),
    #[response(status = 404, description = "`model` is not a served model")]
    NotFound(ErrorResponse),
    #[response(status = 413, description = "The body is larger than the router accepts")]
    TooLarge(ErrorResponse),
    #[response(
        status = 429,
        description = "The admission queue is full, or a limit of the key is reached; see `Retry-After`"
    )]
    TooManyRequests(ErrorResponse),
    #[response(status = 502, description = "A worker failed")]
    BadGateway(ErrorResponse),
    #[response(status = 503, description = "The model is still loading or no worker is reachable")]
    Unavailable(ErrorResponse),
}

/// What a pooled request's span and model lookup need from its body, taken before the body is.
struct Head {
    request_id: String,
    user: Option<String>,
    /// Fields of neither API, logged.
    unknown: Vec<String>,
    model: Option<String>,
}

impl Head {
    fn of(
        headers: &HeaderMap,
        body_id: Option<&str>,
        user: Option<String>,
        unknown: &serde_json::Map<String, serde_json::Value>,
        model: Option<String>,
    ) -> Self {
        Self { request_id: request_id(headers, body_id), user, unknown: unknown.keys().cloned().collect(), model }
    }
}

/// What the answer of a pooled request is made from, beside its vectors.
struct Call {
    request_id: String,
    /// The served model name.
    model: String,
    /// Tokens of every input.
    prompt_tokens: u32,
}

impl Call {
    /// The usage of embeddings: their inputs' tokens, nothing generated.
    fn usage(&self) -> EmbeddingUsage {
        EmbeddingUsage { prompt_tokens: self.prompt_tokens, total_tokens: self.prompt_tokens }
    }
}

/// The path every pooled endpoint shares: the span, the model, `prepare` (the inputs to embed and
/// what the answer needs), the caller's key and tenant salt, the embed step, then `answer`.
/// Every response carries the request id.
async fn pooled<T>(
    state: &AppState,
    caller: Caller,
    headers: &HeaderMap,
    head: Head,
    endpoint: &'static str,
    prepare: impl FnOnce(&Model) -> Result<(ValidEmbedding, T), ValidationError>,
    answer: impl FnOnce(Call, Vec<Embedded>, T) -> Result<Response, ApiError>,
) -> Response {
    let arrival = Instant::now();
    let Head { request_id, user, unknown, model } = head;
    let span = tracing::info_span!("request", request_id = %request_id, endpoint, user,
        model = tracing::field::Empty);
    cluster::telemetry::set_parent_from_http(&span, headers);
    let response = async {
        if !unknown.is_empty() {
            tracing::debug!(fields = ?unknown, "ignored fields that are part of neither the OpenAI nor the vLLM API");
        }
        let (served, model) = state.model(model.as_deref()).await?;
        tracing::Span::current().record("model", model.served_name.as_str());
        let (mut valid, context) = prepare(&model)?;
        caller.authorize(&model.served_name)?;
        // The inputs run under their tenant's cache salt.
        valid.cache_salt = caller.cache_salt(valid.cache_salt.take());
        let prompt_tokens: usize = valid.inputs.iter().map(Vec::len).sum();
        let call = Call {
            request_id: request_id.clone(),
            model: model.served_name.clone(),
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
        };
        let job = Job { request_id: request_id.clone(), arrival, caller, served, model, valid };
        let vectors = embed(&state.metrics, state.usage(), job).await.map_err(|e| match e {
            EmbedError::Refused(e) => ApiError::from(e),
            EmbedError::Backend(e) => ApiError::from(e),
        })?;
        tracing::info!(prompt_tokens, inputs = vectors.len(), "request done");
        answer(call, vectors, context)
    }
    .instrument(span)
    .await;
    with_request_id(response.unwrap_or_else(IntoResponse::into_response), &request_id)
}

//! `POST /v1/embeddings`: extracts, prepares, runs the embed step and answers one JSON body.

use std::time::Instant;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use crate::fleet::model::unix_now;
use crate::generate::{embed, EmbedError, Job};
use crate::http::error::{ApiError, AppJson, ErrorResponse};
use crate::http::generate::{request_id, with_request_id};
use crate::http::state::AppState;
use crate::prepare::embeddings::{validate_embedding, EmbeddingRequest};
use crate::prepare::validate::ValidationError;
use crate::respond::embeddings::{EmbeddingData, EmbeddingList, EmbeddingUsage, EmbeddingVector};
use crate::tenancy::Caller;

/// `POST /v1/embeddings`.
#[utoipa::path(post, path = "/v1/embeddings", description = "OpenAI's embeddings with vLLM's extras: each input's \
    final hidden states pooled into one vector (the last token's by default, L2-normalized), computed by the \
    first leg's workers (prefill, or decode when colocated) as prefill-only work placed by prefix affinity.",
    tag = "openai", request_body = EmbeddingRequest,
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "A `list` of `embedding`s, one per input in input order", body = EmbeddingList),
        (status = 400, description = "A parameter is missing or out of range; `param` names it", body = ErrorResponse),
        (status = 401, description = "API keys are configured and none valid was given", body = ErrorResponse),
        (status = 403, description = "The key's tenant may not use `model`", body = ErrorResponse),
        (status = 404, description = "`model` is not a served model", body = ErrorResponse),
        (status = 413, description = "The body is larger than the router accepts", body = ErrorResponse),
        (status = 429, description = "The admission queue is full, or a limit of the key is reached; see `Retry-After`", body = ErrorResponse),
        (status = 502, description = "A worker failed", body = ErrorResponse),
        (status = 503, description = "The model is still loading or no worker is reachable", body = ErrorResponse),
    ))]
pub async fn embeddings(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    AppJson(body): AppJson<EmbeddingRequest>,
) -> Response {
    let arrival = Instant::now();
    let request_id = request_id(&headers, body.request_id.as_deref());
    let span = tracing::info_span!("request", request_id = %request_id, endpoint = "embeddings",
        user = body.user.as_deref(), model = tracing::field::Empty);
    cluster::telemetry::set_parent_from_http(&span, &headers);
    let answer = async {
        if !body.unknown.is_empty() {
            let fields: Vec<&str> = body.unknown.keys().map(String::as_str).collect();
            tracing::debug!(?fields, "ignored fields that are part of neither the OpenAI nor the vLLM API");
        }
        let (served, model) = state.model(body.model.as_deref()).await?;
        tracing::Span::current().record("model", model.served_name.as_str());
        let mut valid = validate_embedding(&model, body)?;
        caller.authorize(&model.served_name)?;
        // The inputs run under their tenant's cache salt.
        valid.cache_salt = caller.cache_salt(valid.cache_salt.take());
        let (encoding, dimensions) = (valid.encoding, valid.dimensions);
        let prompt_tokens: usize = valid.inputs.iter().map(Vec::len).sum();
        let served_name = model.served_name.clone();
        let job = Job { request_id: request_id.clone(), arrival, caller, served, model, valid };
        let vectors = embed(&state.metrics, state.usage(), job).await.map_err(|e| match e {
            EmbedError::Refused(e) => ApiError::from(e),
            EmbedError::Backend(e) => ApiError::from(e),
        })?;
        let size = vectors.first().map_or(0, |v| v.embedding.len());
        if let Some(wanted) = dimensions.filter(|&d| d as usize != size) {
            return Err(ApiError::from(ValidationError::Unsupported {
                field: "dimensions",
                reason: format!(
                    "this model's embeddings have {size} dimensions and it was not trained for shorter ones \
                     (Matryoshka), so {wanted} cannot be given"
                ),
            }));
        }
        tracing::info!(prompt_tokens, inputs = vectors.len(), "request done");
        let data = (0..)
            .zip(vectors)
            .map(|(index, v)| EmbeddingData {
                object: "embedding",
                index,
                embedding: EmbeddingVector::new(v.embedding, encoding),
            })
            .collect();
        let tokens = u32::try_from(prompt_tokens).unwrap_or(u32::MAX);
        let list = EmbeddingList {
            id: format!("embd-{request_id}"),
            object: "list",
            created: unix_now(),
            model: served_name,
            data,
            usage: EmbeddingUsage { prompt_tokens: tokens, total_tokens: tokens },
        };
        Ok::<_, ApiError>(axum::Json(list).into_response())
    }
    .instrument(span)
    .await;
    with_request_id(answer.unwrap_or_else(IntoResponse::into_response), &request_id)
}

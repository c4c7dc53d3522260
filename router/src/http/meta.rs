//! The endpoints around generation: liveness, readiness, the model list and
//! the Prometheus scrape.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::fleet::model::Model;
use crate::http::error::{ApiError, ErrorResponse};
use crate::http::state::AppState;
use crate::respond::response::{ModelList, ModelObject};
use crate::tenancy::Caller;

/// Liveness: 200 while the router serves HTTP at all.
#[utoipa::path(get, path = "/health", description = "Liveness: 200 while the router serves HTTP at all.", tag = "meta", responses((status = 200, description = "The router is alive")))]
pub async fn health() -> StatusCode {
    StatusCode::OK
}

/// Readiness: 200 while some model can serve (its card loaded, a worker in
/// every pool it needs) and the router is not shutting down; 503 otherwise.
#[utoipa::path(get, path = "/ready", description = "Readiness: 200 while some model can serve (its card loaded, a reachable worker in every pool it needs).", tag = "meta", responses(
    (status = 200, description = "Requests can be served"),
    (status = 503, description = "No model can serve (loading, or a pool without workers), or the router is shutting down",
     body = ErrorResponse)))]
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.readiness.draining() {
        return ApiError::ShuttingDown.into_response();
    }
    match state.models.blocker() {
        None => StatusCode::OK.into_response(),
        Some(why) => ApiError::from(why).into_response(),
    }
}

/// The served models the caller's key may use, those whose card has loaded.
#[utoipa::path(get, path = "/v1/models", description = "The served models this key may use, with their context length.", tag = "openai", security((), ("bearer" = [])), responses(
    (status = 200, description = "A `list` of the served models this key may use", body = ModelList),
    (status = 401, description = "API keys are configured and none valid was given", body = ErrorResponse),
    (status = 503, description = "No model has loaded yet", body = ErrorResponse)))]
pub async fn models(State(state): State<AppState>, caller: Caller) -> Result<Json<ModelList>, ApiError> {
    let mut loaded: Vec<Arc<Model>> = state.models.all().iter().filter_map(|m| m.loaded()).collect();
    if loaded.is_empty() {
        // Before any card, wait for one, as a single-model router always has.
        loaded.push(state.models.first_loaded().await?);
    }
    let data = loaded
        .iter()
        .filter(|model| caller.may_use(&model.served_name))
        .map(|model| ModelObject {
            id: model.served_name.clone(),
            object: "model",
            created: model.created,
            owned_by: "pdserve",
            max_model_len: model.context_length,
        })
        .collect();
    Ok(Json(ModelList { object: "list", data }))
}

/// `GET /metrics`: the Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", description = "Prometheus text exposition of the router's metrics.", tag = "meta", responses(
    (status = 200, description = "Prometheus text format", content_type = "text/plain"),
    (status = 500, description = "The metrics could not be encoded")))]
pub async fn render_metrics(State(state): State<AppState>) -> Response {
    let models: Vec<_> = state.models.all().iter().filter_map(|m| m.scrape()).collect();
    match state.metrics.render(&models) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

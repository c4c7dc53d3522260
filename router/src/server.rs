//! Routes and shared state. Generation handlers live in `handlers.rs`, vLLM's
//! tokenize / detokenize / version in `tokenize_api.rs`, metrics in `metrics.rs`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::watch;

use crate::admission::{Admission, AdmissionConfig};
use crate::error::ApiError;
use crate::handlers;
use crate::metrics::{self, Metrics};
use crate::model::Model;
use crate::openai::response::{ModelList, ModelObject};
use crate::pd::Backend;
use crate::tokenize_api;

/// What every handler shares. Cheap to clone.
///
/// The model arrives after start-up (workers may still be loading), through a
/// `watch` channel: requests that come earlier wait for it.
#[derive(Clone)]
pub struct AppState {
    model: watch::Receiver<Option<Arc<Model>>>,
    /// The workers, behind the PD seam.
    pub backend: Arc<dyn Backend>,
    /// The model's admission queue over the first leg's workers.
    pub admission: Admission,
    /// This router's metrics and their registry.
    pub metrics: Arc<Metrics>,
}

impl AppState {
    /// State whose model is set later through the returned sender; default
    /// admission limits over one worker until [`AppState::with_admission`].
    pub fn loading(backend: Arc<dyn Backend>) -> (Self, watch::Sender<Option<Arc<Model>>>) {
        let (tx, model) = watch::channel(None);
        (Self { model, backend, admission: default_admission(), metrics: Arc::default() }, tx)
    }

    /// State with the model already loaded (tests, embedding).
    pub fn ready(model: Model, backend: Arc<dyn Backend>) -> Self {
        let (_, model) = watch::channel(Some(Arc::new(model)));
        Self { model, backend, admission: default_admission(), metrics: Arc::default() }
    }

    /// The same state with `admission` as its queue.
    pub fn with_admission(self, admission: Admission) -> Self {
        Self { admission, ..self }
    }

    /// The same state recording into `metrics` (shared with the backend, which
    /// counts prefix-cached tokens).
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Self {
        Self { metrics, ..self }
    }

    /// The model if loaded now.
    fn loaded(&self) -> Option<Arc<Model>> {
        self.model.borrow().clone()
    }

    /// The model, waiting for it while it loads; `NotReady` if loading failed.
    pub async fn model(&self) -> Result<Arc<Model>, ApiError> {
        if let Some(model) = self.loaded() {
            return Ok(model);
        }
        let mut rx = self.model.clone();
        let model = rx.wait_for(Option::is_some).await.map_err(|_| ApiError::NotReady)?;
        model.clone().ok_or(ApiError::NotReady)
    }
}

fn default_admission() -> Admission {
    Admission::new(AdmissionConfig::default(), 1)
}

/// The HTTP application.
pub fn app(state: AppState) -> Router {
    // Only the generation routes are counted and timed: probes and scrapes
    // would drown them.
    let generation = Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route_layer(middleware::from_fn_with_state(state.metrics.clone(), metrics::track));
    Router::new()
        .merge(generation)
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/tokenize", post(tokenize_api::tokenize))
        .route("/detokenize", post(tokenize_api::detokenize))
        .route("/version", get(tokenize_api::version))
        .route("/metrics", get(render_metrics))
        .with_state(state)
}

/// 200 once the model card is loaded, 503 before.
async fn health(State(state): State<AppState>) -> Response {
    match state.loaded() {
        Some(_) => StatusCode::OK.into_response(),
        None => ApiError::NotReady.into_response(),
    }
}

async fn models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let model = state.model().await?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![ModelObject {
            id: model.served_name.clone(),
            object: "model",
            created: model.created,
            owned_by: "pdserve",
            max_model_len: model.context_length,
        }],
    }))
}

/// `GET /metrics`: the Prometheus text exposition.
async fn render_metrics(State(state): State<AppState>) -> Response {
    match state.metrics.render(&state.admission.stats()) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

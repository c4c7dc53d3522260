//! Routes and shared state. Generation handlers live in `handlers.rs`, vLLM's
//! tokenize / detokenize / version in `tokenize_api.rs`, metrics in `metrics.rs`,
//! the OpenAPI document of all of them in `openai/openapi.rs`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, Method, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use tokio::sync::watch;

use crate::admission::{Admission, AdmissionConfig};
use crate::error::ApiError;
use crate::handlers;
use crate::metrics::{self, Metrics};
use crate::model::Model;
use crate::openai::openapi::{self, ErrorResponse};
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

/// One route: its method and path (for the OpenAPI check), its handler, and
/// whether it is a generation route.
struct Route {
    method: Method,
    path: &'static str,
    handler: MethodRouter<AppState>,
    generation: bool,
}

/// Every route, in one table so tests can hold `/openapi.json` to what the
/// router really serves.
fn routes() -> Vec<Route> {
    let route = |method, path, handler, generation| Route { method, path, handler, generation };
    vec![
        route(Method::POST, "/v1/chat/completions", post(handlers::chat_completions), true),
        route(Method::POST, "/v1/completions", post(handlers::completions), true),
        route(Method::GET, "/v1/models", get(models), false),
        route(Method::GET, "/health", get(health), false),
        route(Method::POST, "/tokenize", post(tokenize_api::tokenize), false),
        route(Method::POST, "/detokenize", post(tokenize_api::detokenize), false),
        route(Method::GET, "/version", get(tokenize_api::version), false),
        route(Method::GET, "/metrics", get(render_metrics), false),
        route(Method::GET, "/openapi.json", get(openapi_json), false),
    ]
}

/// The method and path of every route [`app`] serves.
pub fn served_routes() -> Vec<(Method, &'static str)> {
    routes().into_iter().map(|r| (r.method, r.path)).collect()
}

/// The HTTP application.
pub fn app(state: AppState) -> Router {
    let (mut generation, mut other) = (Router::new(), Router::new());
    for Route { path, handler, generation: is_generation, .. } in routes() {
        if is_generation {
            generation = generation.route(path, handler);
        } else {
            other = other.route(path, handler);
        }
    }
    // Only the generation routes are counted and timed: probes and scrapes
    // would drown them.
    let generation = generation.route_layer(middleware::from_fn_with_state(state.metrics.clone(), metrics::track));
    Router::new().merge(generation).merge(other).with_state(state)
}

/// `GET /openapi.json`: built once, it never changes while the router runs.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "This OpenAPI document", content_type = "application/json")))]
pub(crate) async fn openapi_json() -> Response {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let document = DOCUMENT.get_or_init(openapi::document).clone();
    ([(header::CONTENT_TYPE, "application/json")], document).into_response()
}

/// 200 once the model card is loaded, 503 before.
#[utoipa::path(get, path = "/health", tag = "meta", responses(
    (status = 200, description = "The model is loaded"),
    (status = 503, description = "The model is still loading", body = ErrorResponse)))]
pub(crate) async fn health(State(state): State<AppState>) -> Response {
    match state.loaded() {
        Some(_) => StatusCode::OK.into_response(),
        None => ApiError::NotReady.into_response(),
    }
}

/// The served model.
#[utoipa::path(get, path = "/v1/models", tag = "openai", responses(
    (status = 200, description = "A `list` of the one served model", content_type = "application/json"),
    (status = 503, description = "The model is still loading", body = ErrorResponse)))]
pub(crate) async fn models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
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
#[utoipa::path(get, path = "/metrics", tag = "meta", responses(
    (status = 200, description = "Prometheus text format", content_type = "text/plain"),
    (status = 500, description = "The metrics could not be encoded")))]
pub(crate) async fn render_metrics(State(state): State<AppState>) -> Response {
    match state.metrics.render(&state.admission.stats()) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

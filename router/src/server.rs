//! Routes and shared state. Generation handlers live in `handlers.rs`, vLLM's
//! tokenize / detokenize / version in `tokenize_api.rs`, metrics in `metrics.rs`,
//! the OpenAPI document of all of them in `openai/openapi.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use tokio::sync::watch;

use crate::error::ApiError;
use crate::handlers;
use crate::metrics::{self, Metrics};
use crate::model::{Model, ModelName};
use crate::openai::openapi::{self, ErrorResponse};
use crate::openai::response::{ModelList, ModelObject};
use crate::pd::Backend;
use crate::served::{ServedModel, ServedModels};
use crate::tenancy::keys::KeyRing;
use crate::tenancy::usage::{UsageLog, UsageSink};
use crate::tenancy::Caller;
use crate::tenancy::Keys;
use crate::tokenize_api;

/// Request bodies accepted by default: room for a long prompt given as
/// token ids, while a flood of huge bodies cannot fill the memory.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 << 20;

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The served models, each with its workers, queue and card.
    pub models: Arc<ServedModels>,
    /// This router's metrics and their registry.
    pub metrics: Arc<Metrics>,
    /// Whether the router is shutting down.
    pub readiness: Arc<Readiness>,
    /// The API keys; open when none are configured.
    pub keys: Arc<Keys>,
    /// Where each request's usage line is appended, if anywhere.
    pub usage_log: Option<Arc<UsageLog>>,
    /// The largest request body accepted.
    pub max_body_bytes: usize,
}

/// Whether the router still takes requests: `/ready` turns 503 once it is
/// shutting down, whatever its models.
#[derive(Debug, Default)]
pub struct Readiness {
    draining: AtomicBool,
}

impl Readiness {
    /// Stops reporting ready: the router is shutting down.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

impl AppState {
    /// State serving `models`.
    pub fn new(models: Arc<ServedModels>) -> Self {
        Self {
            models,
            metrics: Arc::default(),
            readiness: Arc::default(),
            keys: Arc::new(Keys::new(KeyRing::open())),
            usage_log: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// State serving one model.
    pub fn serving(model: ServedModel) -> Self {
        Self::new(Arc::new(ServedModels::new(vec![model])))
    }

    /// State serving one model whose card is set later through the returned
    /// sender (named from it).
    pub fn loading(backend: Arc<dyn Backend>) -> (Self, watch::Sender<Option<Arc<Model>>>) {
        let (model, tx) = ServedModel::loading(ModelName::unknown(), backend);
        (Self::serving(model), tx)
    }

    /// State serving one model already loaded (tests, embedding).
    pub fn ready(model: Model, backend: Arc<dyn Backend>) -> Self {
        Self::serving(ServedModel::ready(model, backend))
    }

    /// The same state behind `keys`, logging usage to `usage_log`.
    pub fn with_tenancy(self, keys: Arc<Keys>, usage_log: Option<Arc<UsageLog>>) -> Self {
        Self { keys, usage_log, ..self }
    }

    /// The same state accepting bodies of up to `bytes`.
    pub fn with_max_body_bytes(self, bytes: usize) -> Self {
        Self { max_body_bytes: bytes, ..self }
    }

    /// Where a request's usage goes.
    pub fn usage(&self) -> UsageSink {
        UsageSink::new(self.metrics.tenants(), self.usage_log.clone())
    }

    /// The same state, draining as `readiness` says.
    pub fn with_readiness(self, readiness: Arc<Readiness>) -> Self {
        Self { readiness, ..self }
    }

    /// The same state recording into `metrics` (shared with the backends,
    /// which count placements and prefix-cached tokens).
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Self {
        Self { metrics, ..self }
    }

    /// The model a request names and its card, waiting for the card while
    /// it loads.
    pub async fn model(&self, requested: Option<&str>) -> Result<(Arc<ServedModel>, Arc<Model>), ApiError> {
        let served = self.models.resolve(requested).await?;
        let model = served.model().await?;
        Ok((served, model))
    }
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
        route(Method::GET, "/ready", get(ready), false),
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
    let limit = DefaultBodyLimit::max(state.max_body_bytes);
    Router::new().merge(generation).merge(other).layer(limit).with_state(state)
}

/// `GET /openapi.json`: built once, it never changes while the router runs.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "This OpenAPI document", content_type = "application/json")))]
pub(crate) async fn openapi_json() -> Response {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let document = DOCUMENT.get_or_init(openapi::document).clone();
    ([(header::CONTENT_TYPE, "application/json")], document).into_response()
}

/// Liveness: 200 while the router serves HTTP at all.
#[utoipa::path(get, path = "/health", tag = "meta", responses((status = 200, description = "The router is alive")))]
pub(crate) async fn health() -> StatusCode {
    StatusCode::OK
}

/// Readiness: 200 while some model can serve (its card loaded, a worker in
/// every pool it needs) and the router is not shutting down; 503 otherwise.
#[utoipa::path(get, path = "/ready", tag = "meta", responses(
    (status = 200, description = "Requests can be served"),
    (status = 503, description = "No model can serve (loading, or a pool without workers), or the router is shutting down",
     body = ErrorResponse)))]
pub(crate) async fn ready(State(state): State<AppState>) -> Response {
    if state.readiness.draining() {
        return ApiError::ShuttingDown.into_response();
    }
    match state.models.blocker() {
        None => StatusCode::OK.into_response(),
        Some(why) => why.into_response(),
    }
}

/// The served models the caller's key may use, those whose card has loaded.
#[utoipa::path(get, path = "/v1/models", tag = "openai", responses(
    (status = 200, description = "A `list` of the served models this key may use", content_type = "application/json"),
    (status = 401, description = "API keys are configured and none valid was given", body = ErrorResponse),
    (status = 503, description = "No model has loaded yet", body = ErrorResponse)))]
pub(crate) async fn models(State(state): State<AppState>, caller: Caller) -> Result<Json<ModelList>, ApiError> {
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
#[utoipa::path(get, path = "/metrics", tag = "meta", responses(
    (status = 200, description = "Prometheus text format", content_type = "text/plain"),
    (status = 500, description = "The metrics could not be encoded")))]
pub(crate) async fn render_metrics(State(state): State<AppState>) -> Response {
    let models: Vec<_> = state.models.all().iter().filter_map(|m| m.scrape()).collect();
    match state.metrics.render(&models) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

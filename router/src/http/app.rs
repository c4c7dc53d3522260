//! The route table and the application: generation in [`super::generate`],
//! vLLM's tokenize / detokenize / version in [`super::tokenize`], probes,
//! models and metrics in [`super::meta`], the OpenAPI document of all of them
//! in [`super::openapi`].

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::middleware;
use axum::routing::{get, post, MethodRouter};
use axum::Router;

use crate::http::error::ApiError;
use crate::http::state::AppState;
use crate::http::{embeddings, generate, meta, openapi, tokenize};
use crate::metrics;

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
        route(Method::POST, "/v1/chat/completions", post(generate::chat_completions), true),
        route(Method::POST, "/v1/completions", post(generate::completions), true),
        route(Method::POST, "/v1/responses", post(generate::responses), true),
        route(Method::POST, "/v1/embeddings", post(embeddings::embeddings), true),
        route(Method::POST, "/pooling", post(embeddings::pooling), true),
        route(Method::POST, "/score", post(embeddings::score), true),
        route(Method::POST, "/v1/score", post(embeddings::score), true),
        route(Method::POST, "/rerank", post(embeddings::rerank), true),
        route(Method::POST, "/v1/rerank", post(embeddings::rerank), true),
        route(Method::POST, "/v2/rerank", post(embeddings::rerank), true),
        route(Method::GET, "/v1/models", get(meta::models), false),
        route(Method::GET, "/health", get(meta::health), false),
        route(Method::GET, "/ready", get(meta::ready), false),
        route(Method::POST, "/tokenize", post(tokenize::tokenize), false),
        route(Method::POST, "/detokenize", post(tokenize::detokenize), false),
        route(Method::GET, "/version", get(tokenize::version), false),
        route(Method::GET, "/tokenizer_info", get(tokenize::tokenizer_info), false),
        route(Method::GET, "/metrics", get(meta::render_metrics), false),
        route(Method::GET, "/openapi.json", get(openapi::openapi_json), false),
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
    Router::new()
        .merge(generation)
        .merge(other)
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(limit)
        .with_state(state)
}

/// An OpenAI-shaped 404 for a path no route serves (`/v1/images/generations`, a typo), so SDKs raise
/// a `NotFoundError` that says what happened.
async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound { method: method.to_string(), path: uri.path().to_owned() }
}

/// An OpenAI-shaped 405 for a served path called with another method.
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed { method: method.to_string(), path: uri.path().to_owned() }
}

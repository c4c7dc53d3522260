//! The pdserve router: an OpenAI-compatible HTTP front that tokenizes,
//! sends each request through a prefill worker and a decode worker (or a
//! decode worker alone, colocated), and streams the text back.
//!
//! # Layout
//!
//! - [`server`]: routes and shared state; [`app`] builds the `Router`.
//! - [`handlers`]: the two generation endpoints, JSON and SSE.
//! - [`tokenize_api`]: vLLM's `/tokenize`, `/detokenize` and `/version`.
//! - [`openai`]: request and response types, chunk formats.
//! - [`validation`]: OpenAI body -> [`validation::ValidRequest`], every bound checked.
//! - [`error`]: [`error::ApiError`], the one error-to-response mapping, and `AppJson`.
//! - [`model`], [`tokenize`]: model card -> tokenizer, chat template (`cluster::chat_template`), prompt ids.
//! - [`pd`]: the [`pd::Backend`] seam and the prefill -> decode orchestration.
//! - [`placement`]: which worker serves a leg: cost over cached prefixes and load, or round-robin.
//! - [`prefix_index`]: each worker's cached block hashes, followed from its KV event stream.
//! - [`admission`]: the priority queue in front of the workers, capped in flight and in length.
//! - [`workers`]: the gRPC clients and model-card loading.
//! - [`stream`]: incremental detokenization, stop strings, deltas.
//! - [`metrics`]: the Prometheus metrics served at `GET /metrics`.

pub mod admission;
pub mod error;
pub mod handlers;
pub mod metrics;
pub mod model;
pub mod openai;
pub mod pd;
pub mod placement;
pub mod prefix_index;
pub mod server;
pub mod stream;
pub mod tokenize;
pub mod tokenize_api;
pub mod tool_calls;
pub mod validation;
pub mod workers;

#[cfg(test)]
mod admission_http_tests;
#[cfg(test)]
mod e2e_tests;
#[cfg(test)]
mod http_tests;
#[cfg(test)]
mod testutil;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;

pub use server::{app, AppState};

use crate::admission::{Admission, AdmissionConfig};
use crate::metrics::Metrics;
use crate::model::{Model, ModelError};
use crate::pd::{KvFailurePolicy, PdBackend};
use crate::placement::{CacheAware, CacheAwareConfig, Placement, RoundRobin};
use crate::prefix_index::PrefixIndex;
use crate::workers::{load_model_card, worker_clients, GrpcWorkers, WorkerError};

/// How the router places requests on workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// By cached prefix and load ([`CacheAware`]), following every worker's
    /// KV event stream.
    CacheAware(CacheAwareConfig),
    /// In turn, blind to caches and load ([`RoundRobin`]).
    RoundRobin,
}

impl Default for Policy {
    fn default() -> Self {
        Self::CacheAware(CacheAwareConfig::default())
    }
}

/// What the router needs to run, resolved from the command line.
#[derive(Debug, Clone)]
pub struct Config {
    /// Prefill workers' gRPC URLs; empty means colocated serving.
    pub prefill_urls: Vec<String>,
    /// Decode workers' gRPC URLs; at least one.
    pub decode_urls: Vec<String>,
    /// Overrides the model card's name; `None` keeps it.
    pub served_model_name: Option<String>,
    /// How long to wait for a worker's model card at start-up.
    pub model_card_timeout: Duration,
    /// In-flight and queue limits of the admission queue.
    pub admission: AdmissionConfig,
    /// The placement policy.
    pub policy: Policy,
    /// What a failed KV hand-off does to its request.
    pub on_kv_failure: KvFailurePolicy,
}

/// Why the router stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The worker configuration is unusable or no worker answered.
    #[error(transparent)]
    Workers(#[from] WorkerError),
    /// The model card could not be used.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The HTTP server failed.
    #[error("http server: {0}")]
    Io(#[from] std::io::Error),
    /// `decode_urls` is empty.
    #[error("at least one decode worker is required")]
    NoDecodeWorker,
}

/// Serves on `listener` until `shutdown` resolves. The model card is loaded
/// in the background: `/health` answers 503 and generation requests wait
/// until it arrives. Fails if no worker answers within the configured time.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    if config.decode_urls.is_empty() {
        return Err(RunError::NoDecodeWorker);
    }
    let workers = GrpcWorkers::new(&config.prefill_urls, &config.decode_urls)?;
    let metrics = Arc::new(Metrics::new());
    let placement = placement(&config, &metrics)?;
    let backend = Arc::new(
        PdBackend::new(workers, placement)
            .with_cached_tokens(metrics.prefix_cached_tokens())
            .with_placement_counters(metrics.placement())
            .with_kv_failure_policy(config.on_kv_failure),
    );
    // Requests queue for the first leg they need: prefill, or decode when colocated.
    let first_leg_workers =
        if config.prefill_urls.is_empty() { config.decode_urls.len() } else { config.prefill_urls.len() };
    let admission = Admission::new(config.admission, first_leg_workers);
    let (state, model_tx) = AppState::loading(backend);
    let state = state.with_admission(admission).with_metrics(metrics);

    // Any worker serves the card; decode workers exist in every mode.
    let card_urls: Vec<String> = config.decode_urls.iter().chain(&config.prefill_urls).cloned().collect();
    let load = async move {
        let card = load_model_card(&card_urls, config.model_card_timeout).await?;
        let model = Model::from_card(&card, config.served_model_name)?;
        tracing::info!(model = %model.served_name, context_length = model.context_length, "model ready");
        let _ = model_tx.send(Some(Arc::new(model)));
        // Keep the sender alive so waiting requests never see "closed".
        std::future::pending::<()>().await;
        Ok::<(), RunError>(())
    };

    let listener = listener.tap_io(|tcp| {
        // Tokens are small writes; Nagle would delay each SSE event.
        let _ = tcp.set_nodelay(true);
    });
    let serve = axum::serve(listener, app(state)).with_graceful_shutdown(shutdown);
    tokio::select! {
        served = serve => Ok(served?),
        loaded = load => loaded,
    }
}

/// The configured policy; with [`Policy::CacheAware`], one task per worker
/// follows its KV event stream into the pool's [`PrefixIndex`] for as long
/// as the runtime lives.
fn placement(config: &Config, metrics: &Metrics) -> Result<Arc<dyn Placement>, WorkerError> {
    let Policy::CacheAware(knobs) = config.policy else {
        return Ok(Arc::new(RoundRobin::default()));
    };
    let follow_pool = |urls: &[String]| -> Result<Arc<PrefixIndex>, WorkerError> {
        let index = Arc::new(PrefixIndex::new(urls.len()));
        for (worker, client) in worker_clients(urls)?.into_iter().enumerate() {
            tokio::spawn(prefix_index::follow(index.clone(), worker, client));
        }
        Ok(index)
    };
    let prefill = follow_pool(&config.prefill_urls)?;
    let decode = follow_pool(&config.decode_urls)?;
    metrics.watch_indexes(vec![("prefill", prefill.clone()), ("decode", decode.clone())]);
    Ok(Arc::new(CacheAware::new(prefill, &config.prefill_urls, decode, &config.decode_urls, knobs)))
}

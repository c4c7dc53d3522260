//! The pdserve router: an OpenAI-compatible HTTP front that tokenizes,
//! sends each request through a prefill worker and a decode worker (or a
//! decode worker alone, colocated), and streams the text back.
//!
//! # Layout
//!
//! - [`server`]: routes and shared state; [`app`] builds the `Router`.
//! - [`served`]: the served models by name; a request's `model` picks one.
//! - [`pools`]: one model's worker pools, placement and queue, from the command line or discovery.
//! - [`handlers`]: the two generation endpoints, JSON and SSE.
//! - [`tokenize_api`]: vLLM's `/tokenize`, `/detokenize` and `/version`.
//! - [`openai`]: request and response types, chunk formats.
//! - [`validation`]: OpenAI body -> [`validation::ValidRequest`], every bound checked.
//! - [`error`]: [`error::ApiError`], the one error-to-response mapping, and `AppJson`.
//! - [`model`], [`tokenize`]: model card -> tokenizer, chat template (`prompt::chat_template`), prompt ids.
//! - [`pd`]: the [`pd::Backend`] seam and the prefill -> decode orchestration.
//! - [`placement`]: which worker serves a leg: cost over cached prefixes and load, or round-robin.
//! - [`prefix_index`]: each worker's cached block hashes, followed from its KV event stream.
//! - [`roster`]: who is in each pool now: worker slots, filled and emptied as workers come and go.
//! - [`breaker`]: each slot's circuit breaker (closed / open / half-open), fed by the gRPC edge.
//! - [`discovery`]: every model's pools kept in step with etcd registrations (`--etcd`).
//! - [`admission`]: the priority queue in front of the workers, capped in flight and in length.
//! - [`workers`]: the gRPC clients and model-card loading.
//! - [`stream`]: incremental detokenization, stop strings, deltas.
//! - [`metrics`]: the Prometheus metrics served at `GET /metrics`.
//! - [`tenancy`]: API keys and tenants, their limits, and each request's usage.

pub mod admission;
pub mod breaker;
pub mod discovery;
pub mod error;
pub mod handlers;
pub mod metrics;
pub mod model;
pub mod openai;
pub mod pd;
pub mod placement;
pub mod pools;
pub mod prefix_index;
pub mod roster;
pub mod served;
pub mod server;
pub mod stream;
pub mod tenancy;
pub mod tokenize;
pub mod tokenize_api;
pub mod tool_calls;
pub mod validation;
pub mod workers;

#[cfg(test)]
mod admission_http_tests;
#[cfg(test)]
mod bad_input_tests;
#[cfg(test)]
mod e2e_tests;
#[cfg(test)]
mod http_tests;
#[cfg(test)]
mod models_http_tests;
#[cfg(test)]
mod sse_props_tests;
#[cfg(test)]
mod tenancy_http_tests;
#[cfg(any(test, feature = "test-util"))]
pub mod testutil;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::net::TcpListener;

pub use pools::WorkerUrl;
pub use server::{app, AppState};

use cluster::discovery::EtcdConfig;

use crate::admission::AdmissionConfig;
use crate::discovery::{ModelPools, NewModel};
use crate::metrics::Metrics;
use crate::model::{ModelError, ModelName};
use crate::pd::KvFailurePolicy;
use crate::placement::CacheAwareConfig;
use crate::pools::{load_discovered, load_static, static_models, Pools};
use crate::served::ServedModels;
use crate::server::Readiness;
use crate::tenancy::keys::{KeyRing, KeysError};
use crate::tenancy::usage::UsageLog;
use crate::tenancy::Keys;
use crate::workers::WorkerError;

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
    /// Prefill workers, each for a named model or the unnamed one; a model
    /// with none is served colocated. Unused with [`Config::discovery`].
    pub prefill: Vec<WorkerUrl>,
    /// Decode workers; at least one per model without discovery.
    pub decode: Vec<WorkerUrl>,
    /// Find the workers in etcd instead of the lists above; each model is
    /// then named by its workers' registrations.
    pub discovery: Option<Discovery>,
    /// Names the unnamed model of the lists above instead of its card.
    pub served_model_name: Option<String>,
    /// How long to wait for a worker's model card at start-up (static lists;
    /// with discovery the router waits for workers as long as it takes).
    pub model_card_timeout: Duration,
    /// In-flight and queue limits of the admission queue.
    pub admission: AdmissionConfig,
    /// The placement policy.
    pub policy: Policy,
    /// What a failed KV hand-off does to its request.
    pub on_kv_failure: KvFailurePolicy,
    /// How long in-flight requests may run once shutdown began.
    pub shutdown_grace: Duration,
    /// API keys, usage log and body size.
    pub tenancy: Tenancy,
}

/// Who may call the router and what is recorded of it, opened before the
/// router listens so a bad keys file stops it at once.
#[derive(Debug, Clone)]
pub struct Tenancy {
    /// The API keys; open when none are configured.
    pub keys: Arc<Keys>,
    /// Follow the keys file stored in etcd (`--api-keys-from-etcd`): `keys`
    /// starts closed and takes each version as it is written.
    pub keys_from_etcd: bool,
    /// Where each request's usage line is appended, if anywhere.
    pub usage_log: Option<Arc<UsageLog>>,
    /// The largest request body accepted (`--max-request-body-bytes`).
    pub max_body_bytes: usize,
}

impl Default for Tenancy {
    fn default() -> Self {
        Self {
            keys: Arc::new(Keys::new(KeyRing::open())),
            keys_from_etcd: false,
            usage_log: None,
            max_body_bytes: server::DEFAULT_MAX_BODY_BYTES,
        }
    }
}

impl Tenancy {
    /// Reads the keys file (`--api-keys`), or starts closed to follow the
    /// one in etcd (`keys_from_etcd`), or neither: the API is open. Opens the
    /// usage log (`--usage-log`) for appending.
    pub fn open(
        keys_file: Option<&std::path::Path>,
        keys_from_etcd: bool,
        usage_log: Option<&std::path::Path>,
        max_body_bytes: usize,
    ) -> Result<Self, RunError> {
        let keys = match keys_file {
            Some(path) => KeyRing::load(path)?,
            None if keys_from_etcd => KeyRing::closed(),
            None => KeyRing::open(),
        };
        let usage_log = usage_log
            .map(|path| UsageLog::open(path).map_err(|source| RunError::UsageLog { path: path.to_owned(), source }))
            .transpose()?
            .map(Arc::new);
        Ok(Self { keys: Arc::new(Keys::new(keys)), keys_from_etcd, usage_log, max_body_bytes })
    }
}

/// Workers found through etcd (`--etcd`).
#[derive(Debug, Clone)]
pub struct Discovery {
    /// The etcd endpoints and the cluster's key prefix.
    pub etcd: EtcdConfig,
    /// Slots per pool: the most workers of one role placed at once.
    pub max_workers_per_pool: usize,
    /// Ignore prefill workers: decode workers prefill themselves.
    pub colocated: bool,
}

/// Default of `--max-workers-per-pool`.
pub const DEFAULT_MAX_WORKERS_PER_POOL: usize = 256;

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
    /// Neither decode workers nor discovery were given.
    #[error("at least one decode worker is required (--decode, or --etcd to discover them)")]
    NoDecodeWorker,
    /// A named model has prefill workers but no decode worker.
    #[error("model {0} has no decode worker (--decode {0}=URL)")]
    NoDecodeFor(String),
    /// Two models of the command line are served under one name.
    #[error("two models are served as {0}; name one with --served-model-name or NAME=URL")]
    DuplicateModel(String),
    /// `--served-model-name` where it names nothing.
    #[error("--served-model-name names the workers given without NAME=; with --etcd, give it to the workers")]
    ServedNameUnused,
    /// etcd discovery could not start.
    #[error("etcd discovery: {0}")]
    Discovery(#[from] discovery::FollowError),
    /// The keys file is unusable.
    #[error(transparent)]
    Keys(#[from] KeysError),
    /// `--api-keys-from-etcd` without `--etcd`.
    #[error("--api-keys-from-etcd needs --etcd")]
    KeysNeedEtcd,
    /// The usage log cannot be opened for appending.
    #[error("cannot open the usage log {path}")]
    UsageLog { path: PathBuf, source: std::io::Error },
}

/// Serves on `listener` until `shutdown` resolves, then stops taking
/// requests (`/ready` answers 503) and lets the running ones finish for up
/// to the configured grace period. The model card is loaded in the
/// background: `/ready` answers 503 and generation requests wait until it
/// arrives. With static lists, fails if no worker answers within the
/// configured time; with discovery, waits for workers as long as it takes.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    if !config.tenancy.keys.current().is_open() {
        tracing::info!("API keys required");
    }
    let metrics = Arc::new(Metrics::new());
    let (models, loads, _discovery) = match &config.discovery {
        None => {
            let (models, loads) = static_pools(&config, &metrics)?;
            (models, loads, None)
        }
        Some(d) => {
            if config.served_model_name.is_some() {
                return Err(RunError::ServedNameUnused);
            }
            let models = Arc::new(ServedModels::new(Vec::new()));
            let new_model = discovered_model(d, &config, &metrics, &models);
            let follow = discovery::follow(d.etcd.clone(), new_model)?;
            (models, Vec::new(), Some(AbortOnDrop(follow)))
        }
    };
    let readiness = Arc::new(Readiness::default());
    let state = AppState::new(models)
        .with_metrics(metrics)
        .with_readiness(readiness.clone())
        .with_tenancy(config.tenancy.keys.clone(), config.tenancy.usage_log.clone())
        .with_max_body_bytes(config.tenancy.max_body_bytes);
    let _keys = match (&config.discovery, config.tenancy.keys_from_etcd) {
        (Some(d), true) => Some(AbortOnDrop(tenancy::etcd::follow_keys(d.etcd.clone(), config.tenancy.keys.clone())?)),
        (None, true) => return Err(RunError::KeysNeedEtcd),
        (_, false) => None,
    };
    // Each static load ends only in an error (which stops the router).
    let load = async move {
        if loads.is_empty() {
            std::future::pending::<()>().await;
        }
        futures::future::try_join_all(loads).await.map(drop)
    };

    let listener = listener.tap_io(|tcp| {
        // Tokens are small writes; Nagle would delay each SSE event.
        let _ = tcp.set_nodelay(true);
    });
    let (began_tx, began) = tokio::sync::oneshot::channel::<()>();
    let draining = readiness.clone();
    let shutdown = async move {
        shutdown.await;
        tracing::info!(grace = ?config.shutdown_grace, "shutting down: refusing new requests, finishing running ones");
        draining.start_draining();
        let _ = began_tx.send(());
    };
    let serve = axum::serve(listener, app(state)).with_graceful_shutdown(shutdown);
    let grace = config.shutdown_grace;
    let deadline = async move {
        if began.await.is_err() {
            return std::future::pending().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        served = serve => Ok(served?),
        loaded = load => loaded,
        () = deadline => {
            tracing::warn!(?grace, "requests still running at the end of the shutdown grace period; exiting");
            Ok(())
        }
    }
}

/// The command line's models, each with its pools, and the futures loading
/// their cards.
#[allow(clippy::type_complexity)]
fn static_pools(
    config: &Config,
    metrics: &Metrics,
) -> Result<(Arc<ServedModels>, Vec<BoxFuture<'static, Result<(), RunError>>>), RunError> {
    let groups = static_models(&config.prefill, &config.decode)?;
    if config.served_model_name.is_some() && groups.iter().all(|g| g.name.is_some()) {
        return Err(RunError::ServedNameUnused);
    }
    let named: Vec<String> = groups.iter().filter_map(|g| g.name.clone()).collect();
    let mut served = Vec::new();
    let mut loads = Vec::new();
    for group in groups {
        let pools = Pools::fixed(&group, config)?;
        pools.follow_static()?;
        let name = group.name.clone().map_or_else(ModelName::unknown, ModelName::known);
        let (model, tx) = pools.serve(name.clone(), config, metrics);
        served.push(model);
        // Only the unnamed model can collide: it learns its name from its card.
        let taken = if group.name.is_none() { named.clone() } else { Vec::new() };
        let fallback = config.served_model_name.clone();
        let load = load_static(group, config.model_card_timeout, name, fallback, tx, taken);
        loads.push(load.boxed());
    }
    Ok((Arc::new(ServedModels::new(served)), loads))
}

/// Discovery's maker of a newly registered model: empty pools, a served
/// model of that name, and a task loading its card from the workers.
fn discovered_model(d: &Discovery, config: &Config, metrics: &Arc<Metrics>, models: &Arc<ServedModels>) -> NewModel {
    let (d, config, metrics, models) = (d.clone(), config.clone(), metrics.clone(), models.clone());
    let mut loaders: Vec<AbortOnDrop> = Vec::new();
    Box::new(move |name: &str| {
        let pools = Arc::new(Pools::empty(d.max_workers_per_pool, d.colocated, &config));
        let name = ModelName::known(name);
        let (model, tx) = pools.serve(name.clone(), &config, &metrics);
        models.add(model);
        let (prefill, decode) = pools.handles();
        loaders.push(AbortOnDrop(tokio::spawn(load_discovered(pools, config.model_card_timeout, name, tx))));
        ModelPools { prefill, decode }
    })
}

/// Aborts the task when the router stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

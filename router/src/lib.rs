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
//! - [`roster`]: who is in each pool now: worker slots, filled and emptied as workers come and go.
//! - [`breaker`]: each slot's circuit breaker (closed / open / half-open), fed by the gRPC edge.
//! - [`discovery`]: the pools' rosters kept in step with etcd registrations (`--etcd`).
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
pub mod prefix_index;
pub mod roster;
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
use tokio::net::TcpListener;

pub use server::{app, AppState};

use cluster::discovery::EtcdConfig;

use crate::admission::{Admission, AdmissionConfig};
use crate::discovery::PoolHandle;
use crate::metrics::Metrics;
use crate::model::{Model, ModelError};
use crate::pd::{KvFailurePolicy, PdBackend};
use crate::placement::{CacheAware, CacheAwareConfig, Placement, RoundRobin};
use crate::prefix_index::PrefixIndex;
use crate::roster::Roster;
use crate::server::Readiness;
use crate::tenancy::keys::{KeyRing, KeysError};
use crate::tenancy::usage::UsageLog;
use crate::tenancy::Keys;
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
    /// Prefill workers' gRPC URLs; empty means colocated serving. Unused
    /// with [`Config::discovery`].
    pub prefill_urls: Vec<String>,
    /// Decode workers' gRPC URLs; at least one without discovery.
    pub decode_urls: Vec<String>,
    /// Find the workers in etcd instead of the lists above.
    pub discovery: Option<Discovery>,
    /// Overrides the model card's name; `None` keeps it.
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

/// The two pools' rosters, prefix indexes and the first leg's admission.
struct Pools {
    prefill: PoolHandle,
    decode: PoolHandle,
    /// The queue in front of the first leg's pool (also in its handle).
    admission: Admission,
}

impl Pools {
    /// The static lists, or empty pools for discovery to fill.
    fn new(config: &Config, metrics: &Metrics) -> Result<Self, RunError> {
        let (prefill, decode, fixed) = match &config.discovery {
            None => {
                if config.decode_urls.is_empty() {
                    return Err(RunError::NoDecodeWorker);
                }
                // Parses every URL now: a typo fails at start-up.
                GrpcWorkers::new(&config.prefill_urls, &config.decode_urls)?;
                (Roster::fixed(&config.prefill_urls), Roster::fixed(&config.decode_urls), true)
            }
            Some(d) => {
                let prefill_slots = if d.colocated { 0 } else { d.max_workers_per_pool };
                (Roster::with_capacity(prefill_slots), Roster::with_capacity(d.max_workers_per_pool), false)
            }
        };
        let index = |roster: &Roster| {
            matches!(config.policy, Policy::CacheAware(_)).then(|| Arc::new(PrefixIndex::new(roster.capacity())))
        };
        let (prefill_index, decode_index) = (index(&prefill), index(&decode));
        // Requests queue for the first leg they need: prefill, or decode when colocated.
        let first_leg = if prefill.capacity() > 0 { &prefill } else { &decode };
        let admission = if fixed {
            Admission::new(config.admission, first_leg.capacity())
        } else {
            Admission::empty(config.admission, first_leg.capacity())
        };
        let first_is_prefill = prefill.capacity() > 0;
        let pool = |roster: Roster, index: Option<Arc<PrefixIndex>>, first: bool| PoolHandle {
            roster: Arc::new(roster),
            index,
            admission: first.then(|| admission.clone()),
        };
        let pools = Self {
            prefill: pool(prefill, prefill_index, first_is_prefill),
            decode: pool(decode, decode_index, !first_is_prefill),
            admission,
        };
        metrics.watch_rosters(vec![("prefill", pools.prefill.roster.clone()), ("decode", pools.decode.roster.clone())]);
        if let (Some(p), Some(d)) = (&pools.prefill.index, &pools.decode.index) {
            metrics.watch_indexes(vec![
                ("prefill", p.clone(), pools.prefill.roster.clone()),
                ("decode", d.clone(), pools.decode.roster.clone()),
            ]);
        }
        Ok(pools)
    }

    /// One task per worker of a static list following its KV event stream
    /// into the pool's index, for as long as the runtime lives.
    fn follow_static(&self) -> Result<(), WorkerError> {
        for pool in [&self.prefill, &self.decode] {
            let Some(index) = &pool.index else { continue };
            let urls: Vec<String> =
                (0..pool.roster.capacity()).filter_map(|w| pool.roster.member(w)).map(|m| m.url).collect();
            for (worker, client) in worker_clients(&urls)?.into_iter().enumerate() {
                tokio::spawn(prefix_index::follow(index.clone(), worker, client));
            }
        }
        Ok(())
    }

    fn placement(&self, policy: Policy) -> Arc<dyn Placement> {
        let (prefill, decode) = (&self.prefill, &self.decode);
        match (policy, &prefill.index, &decode.index) {
            (Policy::CacheAware(knobs), Some(p), Some(d)) => Arc::new(CacheAware::over(
                (p.clone(), prefill.roster.clone()),
                (d.clone(), decode.roster.clone()),
                knobs,
            )),
            _ => Arc::new(RoundRobin::over(prefill.roster.clone(), decode.roster.clone())),
        }
    }

    /// The URLs of every worker in the pools now, decode first.
    fn urls(&self) -> Vec<String> {
        [&self.decode, &self.prefill]
            .iter()
            .flat_map(|pool| pool.roster.active().into_iter().filter_map(|w| pool.roster.member(w)).map(|m| m.url))
            .collect()
    }
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
    let pools = Arc::new(Pools::new(&config, &metrics)?);
    let workers = GrpcWorkers::over(pools.prefill.roster.clone(), pools.decode.roster.clone());
    let backend = Arc::new(
        PdBackend::new(workers, pools.placement(config.policy))
            .with_cached_tokens(metrics.prefix_cached_tokens())
            .with_placement_counters(metrics.placement())
            .with_kv_failure_policy(config.on_kv_failure),
    );
    let mut needed = vec![("decode", pools.decode.roster.clone())];
    if pools.prefill.roster.capacity() > 0 {
        needed.push(("prefill", pools.prefill.roster.clone()));
    }
    let readiness = Arc::new(Readiness::over(needed));
    let (state, model_tx) = AppState::loading(backend);
    let state = state
        .with_admission(pools.admission.clone())
        .with_metrics(metrics)
        .with_readiness(readiness.clone())
        .with_tenancy(config.tenancy.keys.clone(), config.tenancy.usage_log.clone())
        .with_max_body_bytes(config.tenancy.max_body_bytes);

    let _discovery = match &config.discovery {
        None => {
            pools.follow_static()?;
            None
        }
        Some(d) => Some(AbortOnDrop(discovery::follow(d.etcd.clone(), pools.prefill.clone(), pools.decode.clone())?)),
    };
    let _keys = match (&config.discovery, config.tenancy.keys_from_etcd) {
        (Some(d), true) => Some(AbortOnDrop(tenancy::etcd::follow_keys(d.etcd.clone(), config.tenancy.keys.clone())?)),
        (None, true) => return Err(RunError::KeysNeedEtcd),
        (_, false) => None,
    };
    let load = load_model(config.clone(), pools.clone(), model_tx);

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

/// Loads the model card from whichever worker answers, then keeps the
/// model's sender alive so waiting requests never see "closed". With
/// discovery, waits for workers to register and retries for as long as it
/// takes; with static lists, gives up after the configured time.
async fn load_model(
    config: Config,
    pools: Arc<Pools>,
    model_tx: tokio::sync::watch::Sender<Option<Arc<Model>>>,
) -> Result<(), RunError> {
    let card = if config.discovery.is_none() {
        // Any worker serves the card; decode workers exist in every mode.
        let urls: Vec<String> = config.decode_urls.iter().chain(&config.prefill_urls).cloned().collect();
        load_model_card(&urls, config.model_card_timeout).await?
    } else {
        loop {
            let urls = pools.urls();
            if urls.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            match load_model_card(&urls, config.model_card_timeout).await {
                Ok(card) => break card,
                Err(e) => tracing::warn!(error = %e, "no registered worker returned a model card yet; retrying"),
            }
        }
    };
    let model = Model::from_card(&card, config.served_model_name)?;
    tracing::info!(model = %model.served_name, context_length = model.context_length, "model ready");
    let _ = model_tx.send(Some(Arc::new(model)));
    std::future::pending::<()>().await;
    Ok(())
}

/// Aborts the task when the router stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

//! The pdserve router: an OpenAI-compatible HTTP front that tokenizes,
//! sends each request through a prefill worker and a decode worker (or a
//! decode worker alone, colocated), and streams the text back.
//!
//! # Layout, in the order a request meets it
//!
//! - [`http`]: all axum code. [`http::threads`] serves it from threads of their own, one event
//!   loop each; [`http::app`] is the route table; [`http::generate`] is the one
//!   handler body of `/v1/chat/completions`, `/v1/completions` and `/v1/responses`, [`http::sse`]
//!   writes their streams; [`http::embeddings`] answers `/v1/embeddings`; [`http::meta`] (health, ready, models, metrics), [`http::tokenize`] (vLLM's
//!   `/tokenize`, `/detokenize`, `/version`), [`http::auth`] (the API key extractor),
//!   [`http::error`] (the one error-to-response mapping) and [`http::openapi`].
//! - [`tenancy`]: API keys and tenants, their limits, and each request's usage.
//! - [`fleet`]: who serves what: the served models by name ([`fleet::served`]), each model's
//!   card ([`fleet::model`]: tokenizer, chat template, limits), pools ([`fleet::pools`]), slots
//!   ([`fleet::roster`]) and breakers ([`fleet::breaker`]), kept in step with etcd by
//!   [`fleet::discovery`].
//! - [`prepare`]: an OpenAI body ([`prepare::request`]) -> [`prepare::validate::ValidRequest`]:
//!   the template rendered and the prompt tokenized ([`prepare::tokenize`]), every bound checked
//!   ([`prepare::responses`] translates a Responses API body onto a chat one;
//!   [`prepare::embeddings`] checks an embedding body).
//! - [`generate`]: the caller's limits, [`admission`] (the priority queue in front of the
//!   workers), the [`backend`] and the stream decorators, without HTTP ([`generate::embed`]
//!   for embeddings).
//! - [`backend`]: the seam between the stages and the workers, and the domain types that cross it.
//! - [`placement`]: which worker serves a leg, by cached prefix ([`placement::prefix_index`],
//!   followed from each worker's KV events) and load, or round-robin.
//! - [`pd`]: the backend over the workers: the prefill -> decode run, and the gRPC client
//!   ([`pd::grpc`]).
//! - [`respond`]: tokens -> text deltas (incremental detokenization, stop strings, tool calls)
//!   -> OpenAI response bodies and stream chunks.
//! - [`metrics`]: the Prometheus metrics served at `GET /metrics`.
//! - [`config`]: what the router needs to run, from the command line; [`run`] serves it.

pub mod admission;
pub mod backend;
pub mod config;
pub mod fleet;
pub mod generate;
pub mod http;
pub mod metrics;
pub mod pd;
pub mod placement;
pub mod prepare;
pub mod respond;
pub mod tenancy;

#[cfg(any(test, feature = "test-util"))]
pub mod testutil;

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::net::TcpListener;

pub use config::{Config, Discovery, Policy, RunError, Tenancy, WorkerUrl, DEFAULT_MAX_WORKERS_PER_POOL};
pub use http::app::app;
pub use http::state::AppState;

use crate::fleet::discovery::{ModelPools, NewModel};
use crate::fleet::model::ModelName;
use crate::fleet::pools::{load_discovered, load_static, static_models, CardLoad, Pools};
use crate::fleet::served::ServedModels;
use crate::http::state::Readiness;
use crate::metrics::Metrics;

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
            let follow = fleet::discovery::follow(d.etcd.clone(), new_model)?;
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

    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut began = stop.clone();
    let draining = readiness.clone();
    let shutdown = async move {
        shutdown.await;
        tracing::info!(grace = ?config.shutdown_grace, "shutting down: refusing new requests, finishing running ones");
        draining.start_draining();
        let _ = stop_tx.send(true);
        // The serving threads hold the receivers; the sender lives until they end.
        std::future::pending::<()>().await;
    };
    let serve = http::threads::serve(listener, app(state), config.http_threads, stop);
    let grace = config.shutdown_grace;
    let deadline = async move {
        if began.wait_for(|began| *began).await.is_err() {
            return std::future::pending().await;
        }
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        served = serve => Ok(served?),
        () = shutdown => unreachable!("the shutdown future never ends"),
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
        let load = load_static(group, CardLoad::of(config), name, fallback, tx, taken);
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
        loaders.push(AbortOnDrop(tokio::spawn(load_discovered(pools, CardLoad::of(&config), name, tx))));
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

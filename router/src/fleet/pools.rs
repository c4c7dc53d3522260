//! One served model's worker pools, and how they come to be: from the
//! command line (`--prefill [NAME=]URL`, `--decode [NAME=]URL`, grouped by
//! model) or empty for discovery to fill. Each model gets its own rosters,
//! prefix indexes, placement, backend and admission queue, so one model's
//! load or outage never touches another's.

use std::sync::Arc;
use std::time::Duration;

use crate::admission::Admission;
use crate::config::{Config, Policy, RunError, WorkerUrl};
use crate::fleet::discovery::PoolHandle;
use crate::fleet::model::{Model, ModelName};
use crate::fleet::roster::Roster;
use crate::fleet::served::ServedModel;
use crate::metrics::{Metrics, ScrapedPool};
use crate::pd::grpc::{load_model_card, worker_clients, GrpcWorkers, WorkerError};
use crate::pd::PdBackend;
use crate::placement::prefix_index::{self, PrefixIndex};
use crate::placement::{CacheAware, Placement, RoundRobin};
use proto::worker::ModelCard;

/// The workers of one model on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticModel {
    /// The name it is served as; `None` for the unnamed one.
    pub name: Option<String>,
    /// Its prefill workers; none serves it colocated.
    pub prefill: Vec<String>,
    /// Its decode workers, at least one.
    pub decode: Vec<String>,
}

/// The command line's workers grouped by model: the unnamed model first,
/// then the named ones in the order they first appear.
pub fn static_models(prefill: &[WorkerUrl], decode: &[WorkerUrl]) -> Result<Vec<StaticModel>, RunError> {
    let mut models: Vec<StaticModel> = Vec::new();
    let workers = prefill.iter().map(|w| (w, true)).chain(decode.iter().map(|w| (w, false)));
    for (worker, is_prefill) in workers {
        let at = models.iter().position(|m| m.name == worker.model).unwrap_or_else(|| {
            models.push(StaticModel { name: worker.model.clone(), prefill: Vec::new(), decode: Vec::new() });
            models.len() - 1
        });
        let list = if is_prefill { &mut models[at].prefill } else { &mut models[at].decode };
        list.push(worker.url.clone());
    }
    // Stable: the named ones keep their order of first appearance.
    models.sort_by_key(|m| m.name.is_some());
    if models.is_empty() {
        return Err(RunError::NoDecodeWorker);
    }
    match models.iter().find(|m| m.decode.is_empty()) {
        Some(StaticModel { name: Some(name), .. }) => Err(RunError::NoDecodeFor(name.clone())),
        Some(StaticModel { name: None, .. }) => Err(RunError::NoDecodeWorker),
        None => Ok(models),
    }
}

/// One model's two pools and the admission queue of its first leg.
pub struct Pools {
    prefill: PoolHandle,
    decode: PoolHandle,
    /// The queue in front of the first leg's pool (also in its handle).
    admission: Admission,
}

impl Pools {
    /// The pools of a model listed on the command line; every URL is parsed
    /// now, so a typo fails at start-up.
    pub fn fixed(model: &StaticModel, config: &Config) -> Result<Self, RunError> {
        GrpcWorkers::new(&model.prefill, &model.decode)?;
        Ok(Self::new(Roster::fixed(&model.prefill), Roster::fixed(&model.decode), true, config))
    }

    /// Empty pools for discovery to fill: `slots` per pool, no prefill pool
    /// when `colocated`.
    pub fn empty(slots: usize, colocated: bool, config: &Config) -> Self {
        let prefill_slots = if colocated { 0 } else { slots };
        Self::new(Roster::with_capacity(prefill_slots), Roster::with_capacity(slots), false, config)
    }

    fn new(prefill: Roster, decode: Roster, filled: bool, config: &Config) -> Self {
        let index = |roster: &Roster| {
            matches!(config.policy, Policy::CacheAware(_)).then(|| Arc::new(PrefixIndex::new(roster.capacity())))
        };
        let (prefill_index, decode_index) = (index(&prefill), index(&decode));
        // Requests queue for the first leg they need: prefill, or decode when colocated.
        let first_is_prefill = prefill.capacity() > 0;
        let first_leg = if first_is_prefill { &prefill } else { &decode };
        let admission = if filled {
            Admission::new(config.admission, first_leg.capacity())
        } else {
            Admission::empty(config.admission, first_leg.capacity())
        };
        let pool = |roster: Roster, index: Option<Arc<PrefixIndex>>, first: bool| PoolHandle {
            roster: Arc::new(roster),
            index,
            admission: first.then(|| admission.clone()),
        };
        Self {
            prefill: pool(prefill, prefill_index, first_is_prefill),
            decode: pool(decode, decode_index, !first_is_prefill),
            admission,
        }
    }

    /// The prefill and decode handles, for discovery to fill.
    pub fn handles(&self) -> (PoolHandle, PoolHandle) {
        (self.prefill.clone(), self.decode.clone())
    }

    /// One task per worker of a static list following its KV event stream
    /// into the pool's index, for as long as the runtime lives.
    pub fn follow_static(&self) -> Result<(), WorkerError> {
        for pool in [&self.prefill, &self.decode] {
            let Some(index) = &pool.index else { continue };
            for (worker, client) in worker_clients(&members(pool))?.into_iter().enumerate() {
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

    /// The model served by these pools, named `name`, counting into
    /// `metrics`; its card arrives through the returned sender.
    pub fn serve(
        &self,
        name: ModelName,
        config: &Config,
        metrics: &Metrics,
    ) -> (ServedModel, tokio::sync::watch::Sender<Option<Arc<Model>>>) {
        let workers = GrpcWorkers::over(self.prefill.roster.clone(), self.decode.roster.clone());
        let backend = PdBackend::new(workers, self.placement(config.policy))
            .with_placement_counters(metrics.placement(name.clone()))
            .with_kv_failure_policy(config.on_kv_failure);
        let (served, tx) = ServedModel::loading(name, Arc::new(backend));
        let needed = [("decode", &self.decode), ("prefill", &self.prefill)]
            .into_iter()
            .filter(|(_, pool)| pool.roster.capacity() > 0)
            .map(|(pool, handle)| ScrapedPool { pool, roster: handle.roster.clone(), index: handle.index.clone() })
            .collect();
        (served.with_admission(self.admission.clone()).with_pools(needed), tx)
    }

    /// The URLs of every worker in the pools now, decode first.
    fn urls(&self) -> Vec<String> {
        [&self.decode, &self.prefill].into_iter().flat_map(members).collect()
    }
}

fn members(pool: &PoolHandle) -> Vec<String> {
    pool.roster.active().into_iter().filter_map(|w| pool.roster.member(w)).map(|m| m.url).collect()
}

/// How model cards are loaded: how long a worker may take to answer, and the router's own chat
/// template, which replaces every card's.
#[derive(Debug, Clone)]
pub struct CardLoad {
    /// The wait for a worker's card at start-up (static lists).
    pub timeout: Duration,
    /// `--chat-template`.
    pub chat_template: Option<String>,
}

impl CardLoad {
    /// As `config` asks.
    pub fn of(config: &Config) -> Self {
        Self { timeout: config.model_card_timeout, chat_template: config.chat_template.clone() }
    }

    fn apply(&self, mut card: ModelCard) -> ModelCard {
        if let Some(template) = &self.chat_template {
            card.chat_template = template.clone();
        }
        card
    }
}

/// Loads a static model's card from whichever of its workers answers
/// within `timeout`, names the model (`name` if known, else `fallback`,
/// else the card's) and hands it to its requests; then holds the sender so
/// waiting requests never see "closed". A name in `taken` (another model's)
/// is an error.
pub async fn load_static(
    model: StaticModel,
    load: CardLoad,
    name: ModelName,
    fallback: Option<String>,
    tx: tokio::sync::watch::Sender<Option<Arc<Model>>>,
    taken: Vec<String>,
) -> Result<(), RunError> {
    // Any worker serves the card; decode workers exist in every mode.
    let urls: Vec<String> = model.decode.iter().chain(&model.prefill).cloned().collect();
    let card = load.apply(load_model_card(&urls, load.timeout).await?);
    let model = Model::from_card(&card, name.get().map(str::to_owned).or(fallback))?;
    if taken.contains(&model.served_name) {
        return Err(RunError::DuplicateModel(model.served_name));
    }
    name.learn(&model.served_name);
    tracing::info!(model = %model.served_name, context_length = model.context_length, "model ready");
    let _ = tx.send(Some(Arc::new(model)));
    std::future::pending::<()>().await;
    Ok(())
}

/// Loads a discovered model's card from whichever of its registered workers
/// answers, retrying for as long as it takes (workers come and go, and a
/// card that cannot be used may be fixed by the next worker).
pub async fn load_discovered(
    pools: Arc<Pools>,
    load: CardLoad,
    name: ModelName,
    tx: tokio::sync::watch::Sender<Option<Arc<Model>>>,
) {
    let served_name = name.label().to_owned();
    loop {
        let urls = pools.urls();
        if urls.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let loaded = load_model_card(&urls, load.timeout)
            .await
            .map_err(RunError::from)
            .and_then(|card| Ok(Model::from_card(&load.apply(card), Some(served_name.clone()))?));
        match loaded {
            Ok(model) => {
                tracing::info!(model = %model.served_name, context_length = model.context_length, "model ready");
                let _ = tx.send(Some(Arc::new(model)));
                break;
            }
            Err(e) => {
                tracing::warn!(model = %served_name, error = %e, "no registered worker returned a usable model card yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(args: &[&str]) -> Vec<WorkerUrl> {
        args.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn a_name_before_equals_picks_the_model_and_a_url_alone_the_unnamed_one() {
        assert_eq!("http://h:1".parse(), Ok(WorkerUrl::unnamed("http://h:1")));
        let named: WorkerUrl = "smollm2/v1=http://h:1".parse().unwrap();
        assert_eq!((named.model.as_deref(), named.url.as_str()), (Some("smollm2/v1"), "http://h:1"));
        // An `=` inside the URL is the URL's.
        assert_eq!("http://h:1/?a=b".parse(), Ok(WorkerUrl::unnamed("http://h:1/?a=b")));
        assert!("=http://h:1".parse::<WorkerUrl>().unwrap_err().contains("empty"));
    }

    #[test]
    fn workers_group_by_model_with_the_unnamed_first() {
        let prefill = urls(&["b=http://p1", "http://p0"]);
        let decode = urls(&["a=http://d1", "b=http://d2", "http://d0", "a=http://d3"]);
        let models = static_models(&prefill, &decode).unwrap();
        let shape: Vec<_> = models.iter().map(|m| (m.name.as_deref(), m.prefill.len(), m.decode.len())).collect();
        assert_eq!(shape, [(None, 1, 1), (Some("b"), 1, 1), (Some("a"), 0, 2)]);
        assert_eq!(models[2].decode, ["http://d1", "http://d3"]);
    }

    #[test]
    fn a_model_without_decode_workers_is_refused() {
        let err = static_models(&urls(&["b=http://p1"]), &urls(&["http://d0"])).unwrap_err();
        assert_eq!(err.to_string(), "model b has no decode worker (--decode b=URL)");
        assert!(matches!(static_models(&[], &[]), Err(RunError::NoDecodeWorker)));
    }
}

//! The models this router serves. Each has its own worker pools, placement,
//! admission queue and card; a request's `model` picks one, by exact name
//! (`model_name/model_version` names included: a name is opaque here).
//!
//! A model's name is known from the start (a named static pool, an etcd
//! registration) or once its card loads (an unnamed static pool). A request
//! naming no known model waits for the unnamed ones to load before it is
//! refused, so a client early at start-up never sees a false 404.

use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::admission::{Admission, AdmissionConfig};
use crate::backend::Backend;
use crate::fleet::breaker::Circuit;
use crate::fleet::model::{Model, ModelName};
use crate::metrics::{ModelScrape, ScrapedPool};

/// Why a request's model cannot serve it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unservable {
    /// The request names no model and more than one is served.
    #[error("`model` is required")]
    Unnamed,
    /// The request names a model that is not served.
    #[error("The model `{0}` does not exist.")]
    NotFound(String),
    /// The model card has not loaded (or failed to).
    #[error("the model is still loading")]
    NotReady,
    /// A pool the model needs has no worker now.
    #[error("no {0} worker is available")]
    NoWorkers(&'static str),
}

/// One served model and what its requests run on.
pub struct ServedModel {
    name: ModelName,
    model: watch::Receiver<Option<Arc<Model>>>,
    /// Its workers, behind the PD seam.
    pub backend: Arc<dyn Backend>,
    /// Its admission queue over the first leg's workers.
    pub admission: Admission,
    /// The pools a request needs a worker in; also what `/metrics` reports.
    pools: Vec<ScrapedPool>,
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedModel").field("name", &self.name.get()).finish_non_exhaustive()
    }
}

impl ServedModel {
    /// A model whose card is sent later through the returned sender; default
    /// admission limits over one worker until [`ServedModel::with_admission`].
    pub fn loading(name: ModelName, backend: Arc<dyn Backend>) -> (Self, watch::Sender<Option<Arc<Model>>>) {
        let (tx, model) = watch::channel(None);
        let served =
            Self { name, model, backend, admission: Admission::new(AdmissionConfig::default(), 1), pools: Vec::new() };
        (served, tx)
    }

    /// A model already loaded (tests, embedding).
    pub fn ready(model: Model, backend: Arc<dyn Backend>) -> Self {
        let name = ModelName::known(model.served_name.clone());
        let (served, tx) = Self::loading(name, backend);
        let _ = tx.send(Some(Arc::new(model)));
        served
    }

    /// The same model with `admission` as its queue.
    pub fn with_admission(self, admission: Admission) -> Self {
        Self { admission, ..self }
    }

    /// The same model, ready only while each of `pools` has a worker.
    pub fn with_pools(self, pools: Vec<ScrapedPool>) -> Self {
        Self { pools, ..self }
    }

    /// Its name, once known: given, or its card's once loaded.
    pub fn name(&self) -> Option<&str> {
        match self.name.get() {
            Some(name) => Some(name),
            None => self.loaded().map(|model| self.name.learn(&model.served_name)),
        }
    }

    /// The card-derived model if loaded now.
    pub fn loaded(&self) -> Option<Arc<Model>> {
        self.model.borrow().clone()
    }

    /// The model, waiting for it while it loads; `NotReady` if loading failed.
    pub async fn model(&self) -> Result<Arc<Model>, Unservable> {
        if let Some(model) = self.loaded() {
            return Ok(model);
        }
        let mut rx = self.model.clone();
        let model = rx.wait_for(Option::is_some).await.map_err(|_| Unservable::NotReady)?;
        model.clone().ok_or(Unservable::NotReady)
    }

    /// Why it cannot serve now, if it cannot: its card is not loaded, or a
    /// pool it needs has no reachable worker.
    pub fn blocker(&self) -> Option<Unservable> {
        if self.loaded().is_none() {
            return Some(Unservable::NotReady);
        }
        self.pools.iter().find(|p| !reachable(p)).map(|p| Unservable::NoWorkers(p.pool))
    }

    /// Its gauges' sources, once it has a name to label them with.
    pub fn scrape(&self) -> Option<ModelScrape> {
        Some(ModelScrape {
            name: self.name()?.to_owned(),
            admission: self.admission.stats(),
            pools: self.pools.clone(),
        })
    }
}

/// Whether some worker of `pool` can be sent a request: in the pool, its breaker not open (its
/// last call found it unreachable, or kept failing), and, where placement follows the workers'
/// KV event streams, its stream up (a killed worker's stream ends at once, before any request
/// finds it dead).
fn reachable(pool: &ScrapedPool) -> bool {
    pool.roster.active().into_iter().any(|worker| {
        pool.roster.breaker(worker).circuit() != Circuit::Open
            && pool.index.as_ref().is_none_or(|index| index.is_up(worker))
    })
}

/// Every model the router serves, by name. Models are added (static pools at
/// start, etcd registrations as they appear) and never removed: a model
/// whose workers all left answers 503 until one returns.
#[derive(Debug)]
pub struct ServedModels {
    list: RwLock<Vec<Arc<ServedModel>>>,
    /// How many models there are, for requests waiting for the first.
    count: watch::Sender<usize>,
}

impl ServedModels {
    /// The models in `list`.
    pub fn new(list: Vec<ServedModel>) -> Self {
        let list: Vec<Arc<ServedModel>> = list.into_iter().map(Arc::new).collect();
        let (count, _) = watch::channel(list.len());
        Self { list: RwLock::new(list), count }
    }

    /// Adds a model (its name must be known and new: discovery creates one
    /// per registered name).
    pub fn add(&self, model: ServedModel) -> Arc<ServedModel> {
        let model = Arc::new(model);
        let mut list = self.list.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        list.push(model.clone());
        self.count.send_replace(list.len());
        model
    }

    /// Every model now, in the order they were added.
    pub fn all(&self) -> Vec<Arc<ServedModel>> {
        self.list.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The model a request names: `requested` exactly, or the only model
    /// when it names none. Waits for the first model to exist (etcd, before
    /// any worker registered) and for unnamed models to learn their names.
    pub async fn resolve(&self, requested: Option<&str>) -> Result<Arc<ServedModel>, Unservable> {
        // The sender lives as long as `self`, so this cannot fail.
        let _ = self.count.subscribe().wait_for(|n| *n > 0).await;
        let Some(name) = requested else {
            return match self.all().as_slice() {
                [only] => Ok(only.clone()),
                _ => Err(Unservable::Unnamed),
            };
        };
        if let Some(found) = self.find(name) {
            return Ok(found);
        }
        for unnamed in self.all().iter().filter(|m| m.name().is_none()) {
            // A failed load leaves it unnamed; it cannot be the one asked for.
            let _ = unnamed.model().await;
        }
        self.find(name).ok_or_else(|| Unservable::NotFound(name.to_owned()))
    }

    /// The first card to load among the models there are once there is one.
    pub async fn first_loaded(&self) -> Result<Arc<Model>, Unservable> {
        let _ = self.count.subscribe().wait_for(|n| *n > 0).await;
        let models = self.all();
        let loads = models.iter().map(|m| Box::pin(m.model()));
        let (first, _) = futures::future::select_ok(loads).await?;
        Ok(first)
    }

    /// The model named `name` now.
    pub fn find(&self, name: &str) -> Option<Arc<ServedModel>> {
        self.all().into_iter().find(|m| m.name() == Some(name))
    }

    /// Why no request can be served now, if none can: ready while any model
    /// is, so one model's outage never takes the others out of service.
    pub fn blocker(&self) -> Option<Unservable> {
        let mut first = None;
        for model in self.all() {
            match model.blocker() {
                None => return None,
                Some(why) => {
                    first.get_or_insert(why);
                }
            }
        }
        Some(first.unwrap_or(Unservable::NotReady))
    }
}

#[cfg(test)]
mod tests;

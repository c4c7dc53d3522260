//! What every handler shares.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use crate::backend::Backend;
use crate::fleet::model::{Model, ModelName};
use crate::fleet::served::{ServedModel, ServedModels};
use crate::http::error::ApiError;
use crate::metrics::Metrics;
use crate::tenancy::keys::KeyRing;
use crate::tenancy::usage::{UsageLog, UsageSink};
use crate::tenancy::Keys;

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

impl axum::extract::FromRef<AppState> for Arc<Keys> {
    fn from_ref(state: &AppState) -> Self {
        state.keys.clone()
    }
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

    /// Whether shutdown has begun.
    pub fn draining(&self) -> bool {
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

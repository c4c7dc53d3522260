//! What the router needs to run, resolved from the command line, and why it
//! can stop with an error.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use cluster::discovery::EtcdConfig;

use crate::admission::AdmissionConfig;
use crate::fleet::discovery;
use crate::fleet::model::ModelError;
use crate::http::state::DEFAULT_MAX_BODY_BYTES;
use crate::pd::grpc::WorkerError;
use crate::pd::KvFailurePolicy;
use crate::placement::CacheAwareConfig;
use crate::tenancy::keys::{KeyRing, KeysError};
use crate::tenancy::usage::UsageLog;
use crate::tenancy::Keys;

/// A worker on the command line: `URL`, or `NAME=URL` for the model served
/// as `NAME` (which may be a `model_name/model_version`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerUrl {
    /// The model it serves; `None`: the one named by `--served-model-name`
    /// or its card.
    pub model: Option<String>,
    /// Its gRPC URL.
    pub url: String,
}

impl WorkerUrl {
    /// A worker of the unnamed model.
    pub fn unnamed(url: impl Into<String>) -> Self {
        Self { model: None, url: url.into() }
    }
}

impl FromStr for WorkerUrl {
    type Err = String;

    fn from_str(arg: &str) -> Result<Self, Self::Err> {
        // A URL's scheme comes before any `=` it could hold, so a `=` before
        // the first `://` ends a model name.
        let named = arg.split_once('=').filter(|(name, _)| !name.contains("://"));
        match named {
            Some(("", _)) => Err(format!("`{arg}`: the model name before `=` is empty")),
            Some((name, url)) => Ok(Self { model: Some(name.to_owned()), url: url.to_owned() }),
            None => Ok(Self::unnamed(arg)),
        }
    }
}

/// How the router places requests on workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// By cached prefix and load ([`crate::placement::CacheAware`]), following every worker's
    /// KV event stream.
    CacheAware(CacheAwareConfig),
    /// In turn, blind to caches and load ([`crate::placement::RoundRobin`]).
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
    /// A Jinja chat template every model is served with instead of its card's (vLLM's
    /// `--chat-template`); a request's own `chat_template` still wins.
    pub chat_template: Option<String>,
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
    /// Threads of its own that serve HTTP, each with a single-threaded event loop and its own
    /// connections to the workers (see `http::threads`); `None` serves on the caller's runtime.
    pub http_threads: Option<NonZeroUsize>,
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
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
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

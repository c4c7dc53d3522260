//! Worker discovery through etcd.
//!
//! A worker [`register`]s one key, `<prefix>/workers/<instance_id>`, whose
//! value is a protobuf [`WorkerRegistration`], attached to a lease it keeps
//! alive. A worker that dies stops renewing and its key vanishes within the
//! lease's TTL; one that stops cleanly revokes the lease at once.
//!
//! A router [`watch_workers`]: it reads the prefix, then follows its changes
//! from the revision it read, and publishes the whole set after every change.
//! [`watch_prefix`] does the same for any other folder of keys (the router's
//! API keys).
//!
//! Both sides outlive etcd outages. While etcd is unreachable the watcher
//! keeps its last known set (marked disconnected) and retries; the worker
//! retries too, and once etcd answers again it registers anew if its lease is
//! gone (an etcd that lost its data, or an outage longer than the TTL).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use prost::Message;
pub use proto::discovery::{Role, WorkerRegistration};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Default of `--etcd-prefix`.
pub const DEFAULT_PREFIX: &str = "/pdserve";
/// Default lease TTL of a worker's key.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// Longest wait of one unary etcd call; a hung call counts as an outage.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Retry delays after a failure: doubling from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(2));

/// Where the cluster's keys live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members (`http://host:2379`).
    pub endpoints: Vec<String>,
    /// Key prefix every key of this cluster starts with.
    pub prefix: String,
}

impl EtcdConfig {
    /// `endpoints` under the [`DEFAULT_PREFIX`].
    pub fn new(endpoints: Vec<String>) -> Self {
        Self { endpoints, prefix: DEFAULT_PREFIX.to_owned() }
    }

    /// The folder of worker keys, with its trailing slash.
    pub fn workers_prefix(&self) -> String {
        format!("{}/workers/", self.prefix.trim_end_matches('/'))
    }

    /// The key holding the router's API keys file (`--api-keys-from-etcd`).
    pub fn api_keys_key(&self) -> String {
        format!("{}/api-keys", self.prefix.trim_end_matches('/'))
    }

    fn worker_key(&self, instance_id: &str) -> String {
        format!("{}{instance_id}", self.workers_prefix())
    }

    async fn connect(&self) -> Result<Client, etcd_client::Error> {
        // Keep-alive pings notice a peer that vanished without closing the
        // connection, which would otherwise leave a watch silent forever.
        let options = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), CALL_TIMEOUT)
            .with_keep_alive_while_idle(true);
        Client::connect(&self.endpoints, Some(options)).await
    }
}

/// Why a registration cannot start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// No endpoint was given.
    #[error("no etcd endpoint given")]
    NoEndpoint,
    /// The lease TTL is under etcd's minimum of one second.
    #[error("the etcd lease TTL must be at least 1 s, not {0:?}")]
    TtlTooShort(Duration),
    /// The registration has no instance id to key it by.
    #[error("a worker registration needs an instance id")]
    NoInstanceId,
}

/// Whether a worker's key is in etcd now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrationState {
    /// Not (or no longer) registered: etcd is unreachable or the lease lapsed.
    Pending,
    /// The key is in etcd under a lease being kept alive.
    Registered,
}

/// A worker's live registration; see the module doc.
///
/// Dropping it stops the renewals without revoking the lease, as a crash
/// would: the key lasts until the TTL runs out. [`Registration::deregister`]
/// removes it at once.
#[derive(Debug)]
pub struct Registration {
    state: watch::Receiver<RegistrationState>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// Registers `worker` under `config`'s prefix with a lease of `ttl`, and keeps
/// it registered (see the module doc) until the returned handle is dropped or
/// deregistered. Returns at once; the first registration happens in the
/// background.
pub fn register(config: EtcdConfig, worker: WorkerRegistration, ttl: Duration) -> Result<Registration, DiscoveryError> {
    if config.endpoints.is_empty() {
        return Err(DiscoveryError::NoEndpoint);
    }
    if ttl < Duration::from_secs(1) {
        return Err(DiscoveryError::TtlTooShort(ttl));
    }
    if worker.instance_id.is_empty() {
        return Err(DiscoveryError::NoInstanceId);
    }
    let (state_tx, state) = watch::channel(RegistrationState::Pending);
    let (stop_tx, stop) = oneshot::channel();
    let task = tokio::spawn(keep_registered(config, worker, ttl, state_tx, stop));
    Ok(Registration { state, stop: Some(stop_tx), task })
}

impl Registration {
    /// Whether the key is in etcd now.
    pub fn state(&self) -> RegistrationState {
        *self.state.borrow()
    }

    /// Waits until the key is in etcd.
    pub async fn registered(&self) {
        let mut state = self.state.clone();
        let _ = state.wait_for(|s| *s == RegistrationState::Registered).await;
    }

    /// Revokes the lease, which deletes the key, and stops. If etcd cannot be
    /// reached the key lasts until its TTL runs out.
    pub async fn deregister(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The registration loop: register, renew until something fails, start over.
async fn keep_registered(
    config: EtcdConfig,
    worker: WorkerRegistration,
    ttl: Duration,
    state: watch::Sender<RegistrationState>,
    mut stop: oneshot::Receiver<()>,
) {
    let key = config.worker_key(&worker.instance_id);
    let value = worker.encode_to_vec();
    let mut backoff = Backoff::default();
    loop {
        // Not raced against `stop`: a put cancelled after etcd applied it would leave the key
        // behind for a whole TTL. Each call is bounded, so a deregistration waits little.
        let lease = put_with_lease(&config, &key, &value, ttl).await;
        if !matches!(stop.try_recv(), Err(oneshot::error::TryRecvError::Empty)) {
            if let Ok((mut client, lease)) = lease {
                revoke(&mut client, lease, &key).await;
            }
            return;
        }
        match lease {
            Ok((mut client, lease)) => {
                tracing::info!(key, lease, "registered in etcd");
                state.send_replace(RegistrationState::Registered);
                backoff.reset();
                let ended = tokio::select! {
                    _ = &mut stop => None,
                    ended = renew(&mut client, lease, ttl) => Some(ended),
                };
                state.send_replace(RegistrationState::Pending);
                match ended {
                    None => {
                        revoke(&mut client, lease, &key).await;
                        return;
                    }
                    Some(why) => tracing::warn!(key, %why, "etcd registration lost; registering again"),
                }
            }
            Err(e) => tracing::warn!(key, error = %e, "cannot register in etcd; retrying"),
        }
        tokio::select! {
            _ = &mut stop => return,
            _ = backoff.wait() => {}
        }
    }
}

/// Revokes `lease`, which deletes `key` now rather than when the lease lapses.
async fn revoke(client: &mut Client, lease: i64, key: &str) {
    match tokio::time::timeout(CALL_TIMEOUT, client.lease_revoke(lease)).await {
        Ok(Ok(_)) => tracing::info!(key, "deregistered from etcd"),
        _ => tracing::warn!(key, "could not revoke the etcd lease; the key lapses with it"),
    }
}

/// Grants a lease and puts the key under it.
async fn put_with_lease(
    config: &EtcdConfig,
    key: &str,
    value: &[u8],
    ttl: Duration,
) -> Result<(Client, i64), etcd_client::Error> {
    let mut client = config.connect().await?;
    let ttl_secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
    let lease = timed(client.lease_grant(ttl_secs, None)).await?.id();
    timed(client.put(key, value, Some(PutOptions::new().with_lease(lease)))).await?;
    Ok((client, lease))
}

/// Renews `lease` three times per TTL; returns why it stopped.
async fn renew(client: &mut Client, lease: i64, ttl: Duration) -> String {
    let (mut keeper, mut answers) = match timed(client.lease_keep_alive(lease)).await {
        Ok(pair) => pair,
        Err(e) => return e.to_string(),
    };
    let mut tick = tokio::time::interval(ttl / 3);
    loop {
        tick.tick().await;
        if let Err(e) = keeper.keep_alive().await {
            return e.to_string();
        }
        match tokio::time::timeout(CALL_TIMEOUT, answers.message()).await {
            // etcd answers TTL 0 for a lease it no longer has.
            Ok(Ok(Some(answer))) if answer.ttl() > 0 => {}
            Ok(Ok(Some(_))) => return "the lease expired".to_owned(),
            Ok(Ok(None)) => return "the keep-alive stream ended".to_owned(),
            Ok(Err(e)) => return e.to_string(),
            Err(_) => return format!("no keep-alive answer within {CALL_TIMEOUT:?}"),
        }
    }
}

/// Every value under a watched prefix, by key, as last seen.
#[derive(Debug, Clone, PartialEq)]
pub struct Watched<T> {
    /// The values, by their etcd key.
    pub by_key: BTreeMap<String, T>,
    /// Whether the watch is live; while it is not, `by_key` is the last
    /// known set.
    pub connected: bool,
}

impl<T> Default for Watched<T> {
    fn default() -> Self {
        Self { by_key: BTreeMap::new(), connected: false }
    }
}

/// Every registered worker, by key, as a router last saw them.
pub type Workers = Watched<WorkerRegistration>;

/// A live view of the values under a prefix; see [`watch_prefix`].
#[derive(Debug)]
pub struct PrefixWatch<T> {
    values: watch::Receiver<Arc<Watched<T>>>,
    task: JoinHandle<()>,
}

/// A live view of the registered workers; see [`watch_workers`].
pub type WorkersWatch = PrefixWatch<WorkerRegistration>;

impl<T> PrefixWatch<T> {
    /// The set now, and every change after: a receiver sees the latest set
    /// whenever it looks, skipping intermediate ones.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Watched<T>>> {
        self.values.clone()
    }

    /// The set now.
    pub fn current(&self) -> Arc<Watched<T>> {
        self.values.borrow().clone()
    }
}

impl<T> Drop for PrefixWatch<T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads an etcd value into a `T`; `None` skips it (the decoder says why).
pub type Decoder<T> = fn(key: &str, value: &[u8]) -> Option<T>;

/// Follows the workers registered under `config`'s prefix until the returned
/// handle is dropped. Starts empty and disconnected; see the module doc.
pub fn watch_workers(config: EtcdConfig) -> Result<WorkersWatch, DiscoveryError> {
    let prefix = config.workers_prefix();
    watch_prefix(config, prefix, decode)
}

/// Follows every key under `prefix`, read by `decoder`, until the returned
/// handle is dropped: a snapshot, then its changes; through etcd outages it
/// keeps the last known values and reconnects. Starts empty and disconnected.
pub fn watch_prefix<T: Clone + Send + Sync + 'static>(
    config: EtcdConfig,
    prefix: String,
    decoder: Decoder<T>,
) -> Result<PrefixWatch<T>, DiscoveryError> {
    if config.endpoints.is_empty() {
        return Err(DiscoveryError::NoEndpoint);
    }
    let (tx, values) = watch::channel(Arc::new(Watched::default()));
    let task = tokio::spawn(follow(config, prefix, decoder, tx));
    Ok(PrefixWatch { values, task })
}

/// The watch loop: read the prefix, follow it, start over on any failure.
async fn follow<T: Clone>(config: EtcdConfig, prefix: String, decoder: Decoder<T>, tx: watch::Sender<Arc<Watched<T>>>) {
    let mut backoff = Backoff::default();
    loop {
        match follow_once(&config, &prefix, decoder, &tx, &mut backoff).await {
            Ok(()) => tracing::warn!(prefix, "etcd watch ended; reconnecting"),
            Err(e) => tracing::warn!(prefix, error = %e, "etcd watch failed; keeping the last known values"),
        }
        tx.send_modify(|values| {
            if values.connected {
                Arc::make_mut(values).connected = false;
            }
        });
        backoff.wait().await;
    }
}

/// One connection's worth of [`follow`]: a snapshot, then its changes.
async fn follow_once<T: Clone>(
    config: &EtcdConfig,
    prefix: &str,
    decoder: Decoder<T>,
    tx: &watch::Sender<Arc<Watched<T>>>,
    backoff: &mut Backoff,
) -> Result<(), etcd_client::Error> {
    let mut client = config.connect().await?;
    let snapshot = timed(client.get(prefix, Some(GetOptions::new().with_prefix()))).await?;
    let revision = snapshot.header().map_or(0, |h| h.revision());
    let mut by_key = BTreeMap::new();
    for kv in snapshot.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        if let Some(value) = decoder(&key, kv.value()) {
            by_key.insert(key, value);
        }
    }
    let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let mut stream = timed(client.watch(prefix, Some(options))).await?;
    tx.send_replace(Arc::new(Watched { by_key, connected: true }));
    backoff.reset();
    while let Some(answer) = stream.message().await? {
        if answer.canceled() {
            // Compacted past our revision, or the server cancelled: re-read.
            tracing::warn!(reason = answer.cancel_reason(), "etcd cancelled the watch");
            return Ok(());
        }
        if answer.events().is_empty() {
            continue;
        }
        tx.send_modify(|values| {
            let values = Arc::make_mut(values);
            for event in answer.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                match event.event_type() {
                    EventType::Put => match decoder(&key, kv.value()) {
                        Some(value) => {
                            values.by_key.insert(key, value);
                        }
                        // A value that no longer reads is gone, not stale.
                        None => {
                            values.by_key.remove(&key);
                        }
                    },
                    EventType::Delete => {
                        values.by_key.remove(&key);
                    }
                }
            }
        });
    }
    Ok(())
}

/// A worker's registration; `None`, with a warning, for anything else.
fn decode(key: &str, value: &[u8]) -> Option<WorkerRegistration> {
    match WorkerRegistration::decode(value) {
        Ok(worker) => Some(worker),
        Err(e) => {
            tracing::warn!(key, error = %e, "ignoring an etcd key that is not a worker registration");
            None
        }
    }
}

/// `call`, failing after [`CALL_TIMEOUT`].
async fn timed<T>(
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(etcd_client::Error::IoError(std::io::ErrorKind::TimedOut.into())))
}

/// Doubling retry delays, from [`BACKOFF`]'s first to its last.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF.0 }
    }
}

impl Backoff {
    async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(BACKOFF.1);
    }

    fn reset(&mut self) {
        self.next = BACKOFF.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_keys_sit_under_one_folder_whatever_the_prefix_slash() {
        let mut config = EtcdConfig::new(vec!["http://127.0.0.1:2379".into()]);
        assert_eq!(config.worker_key("a"), "/pdserve/workers/a");
        config.prefix = "/team/x/".into();
        assert_eq!(config.workers_prefix(), "/team/x/workers/");
        assert_eq!(config.worker_key("a"), "/team/x/workers/a");
    }

    #[tokio::test]
    async fn a_registration_needs_an_endpoint_an_id_and_a_ttl_of_a_second() {
        let worker = WorkerRegistration { instance_id: "w".into(), ..Default::default() };
        let none = EtcdConfig::new(vec![]);
        assert!(matches!(register(none, worker.clone(), DEFAULT_LEASE_TTL), Err(DiscoveryError::NoEndpoint)));
        let config = EtcdConfig::new(vec!["http://127.0.0.1:1".into()]);
        let short = register(config.clone(), worker.clone(), Duration::from_millis(500));
        assert!(matches!(short, Err(DiscoveryError::TtlTooShort(_))));
        let anonymous = WorkerRegistration::default();
        assert!(matches!(register(config, anonymous, DEFAULT_LEASE_TTL), Err(DiscoveryError::NoInstanceId)));
    }

    #[test]
    fn a_value_that_is_not_a_registration_is_skipped() {
        assert!(decode("/pdserve/workers/x", &[0xff, 0xff, 0xff]).is_none());
        let worker = WorkerRegistration { instance_id: "x".into(), role: Role::Decode as i32, ..Default::default() };
        assert_eq!(decode("/pdserve/workers/x", &worker.encode_to_vec()), Some(worker));
    }
}

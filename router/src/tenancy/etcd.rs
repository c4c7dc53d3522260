//! The keys file kept in etcd (`--api-keys-from-etcd`): one key,
//! `<prefix>/api-keys`, holding the same TOML as `--api-keys`. Every router
//! replica follows it, so a key is added, limited or revoked everywhere by
//! one `etcdctl put`.
//!
//! Each new version replaces the ring in use once it parses; one that does
//! not is refused with an error in the log and the ring in use stays. A
//! deleted key closes the API (fail closed); an etcd outage keeps the ring
//! in use.

use std::sync::Arc;

use cluster::discovery::{watch_prefix, EtcdConfig, Watched};
use tokio::task::JoinHandle;

use super::keys::KeyRing;
use super::Keys;
use crate::fleet::discovery::FollowError;

/// Follows the keys file in etcd into `keys` until the task is aborted.
pub fn follow_keys(config: EtcdConfig, keys: Arc<Keys>) -> Result<JoinHandle<()>, FollowError> {
    let key = config.api_keys_key();
    let watch = watch_prefix(config, key.clone(), |_, value| String::from_utf8(value.to_vec()).ok())?;
    Ok(tokio::spawn(async move {
        let mut updates = watch.subscribe();
        let mut applied: Option<String> = None;
        loop {
            let values: Arc<Watched<String>> = updates.borrow_and_update().clone();
            // Disconnected: keep what is in use, whatever the last view says.
            if values.connected {
                apply(&keys, &key, values.by_key.get(&key), &mut applied);
            }
            if updates.changed().await.is_err() {
                return;
            }
        }
    }))
}

/// Puts `text` (the value at `key`, if any) in use unless it is the one
/// already applied.
fn apply(keys: &Keys, key: &str, text: Option<&String>, applied: &mut Option<String>) {
    if text == applied.as_ref() {
        return;
    }
    match text {
        None => {
            tracing::error!(key, "no API keys in etcd: every request is refused until some are written");
            keys.replace(KeyRing::closed());
        }
        Some(text) => match KeyRing::parse_after(text, &keys.current()) {
            Ok(ring) => {
                tracing::info!(key, keys = ring.len(), "API keys loaded from etcd");
                keys.replace(ring);
            }
            Err(e) => {
                // The last good version stays in use: a typo must not open or close the API.
                tracing::error!(key, error = %e, "refusing the new API keys from etcd; keeping the ones in use");
            }
        },
    }
    *applied = text.cloned();
}

//! The pools' members kept in step with etcd (`--etcd`): each registration
//! under the prefix fills a slot of its role's [`Roster`], and each one that
//! goes (deregistered, or its lease lapsed) empties it.
//!
//! A worker joining gets admission slots and, with cache-aware placement, a
//! task following its KV event stream; a worker leaving loses both at once.
//! Requests already running on it go on until they end or fail. While etcd
//! is unreachable the last known set stays (`cluster::discovery`).

use std::collections::HashMap;
use std::sync::Arc;

use cluster::discovery::{EtcdConfig, Role, WorkerRegistration, Workers, WorkersWatch};
use tokio::task::JoinHandle;

use crate::admission::Admission;
use crate::prefix_index::{self, PrefixIndex};
use crate::roster::{Member, Roster};
use crate::workers::worker_clients;

/// One pool and what follows its membership.
#[derive(Debug, Clone)]
pub struct PoolHandle {
    /// Its slots.
    pub roster: Arc<Roster>,
    /// Its prefix index, with cache-aware placement.
    pub index: Option<Arc<PrefixIndex>>,
    /// The admission queue, when this pool is the requests' first leg.
    pub admission: Option<Admission>,
}

impl PoolHandle {
    fn join(&self, key: &str, url: &str) -> Option<(usize, Option<JoinHandle<()>>)> {
        let slot = self.roster.join(Member::new(url, key))?;
        let follower = self.index.as_ref().and_then(|index| {
            let client = worker_clients(&[url.to_owned()]).ok()?.pop()?;
            Some(tokio::spawn(prefix_index::follow(index.clone(), slot, client)))
        });
        if let Some(admission) = &self.admission {
            admission.set_active(slot, true);
        }
        Some((slot, follower))
    }

    fn leave(&self, key: &str) -> Option<usize> {
        let slot = self.roster.leave(key)?;
        if let Some(admission) = &self.admission {
            admission.set_active(slot, false);
        }
        if let Some(index) = &self.index {
            index.mark_down(slot);
        }
        Some(slot)
    }
}

/// A worker the router placed in a slot.
struct Placed {
    role: Role,
    slot: usize,
    follower: Option<JoinHandle<()>>,
}

/// Follows `config`'s registrations into `prefill` and `decode` for as long
/// as the returned task runs. A pool of no slots (colocated serving has no
/// prefill pool) ignores its role's registrations.
pub fn follow(config: EtcdConfig, prefill: PoolHandle, decode: PoolHandle) -> Result<JoinHandle<()>, FollowError> {
    let watch = cluster::discovery::watch_workers(config)?;
    Ok(tokio::spawn(apply_changes(watch, prefill, decode)))
}

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct FollowError(#[from] cluster::discovery::DiscoveryError);

async fn apply_changes(watch: WorkersWatch, prefill: PoolHandle, decode: PoolHandle) {
    let mut updates = watch.subscribe();
    let mut placed: HashMap<String, Placed> = HashMap::new();
    loop {
        let workers: Arc<Workers> = updates.borrow_and_update().clone();
        reconcile(&workers, &mut placed, &prefill, &decode);
        if updates.changed().await.is_err() {
            return;
        }
    }
}

/// Makes the pools hold exactly the registered workers.
fn reconcile(workers: &Workers, placed: &mut HashMap<String, Placed>, prefill: &PoolHandle, decode: &PoolHandle) {
    let pool = |role: Role| match role {
        Role::Prefill => Some(prefill),
        Role::Decode => Some(decode),
        Role::Unspecified => None,
    };
    let gone: Vec<String> = placed
        .iter()
        .filter(|(key, p)| workers.by_key.get(*key).is_none_or(|w| w.role() != p.role))
        .map(|(key, _)| key.clone())
        .collect();
    for key in gone {
        let Some(left) = placed.remove(&key) else { continue };
        if let Some(follower) = left.follower {
            follower.abort();
        }
        if let Some(pool) = pool(left.role) {
            pool.leave(&key);
        }
        tracing::info!(key, role = left.role.as_str_name(), slot = left.slot, "worker left");
    }
    for (key, worker) in &workers.by_key {
        if placed.contains_key(key) {
            continue;
        }
        let Some(pool) = pool(worker.role()).filter(|p| p.roster.capacity() > 0) else {
            continue;
        };
        if let Err(why) = usable(worker) {
            tracing::warn!(key, why, "ignoring a worker registration");
            continue;
        }
        match pool.join(key, &worker.grpc_url) {
            Some((slot, follower)) => {
                tracing::info!(key, url = worker.grpc_url, role = worker.role().as_str_name(), slot, "worker joined");
                placed.insert(key.clone(), Placed { role: worker.role(), slot, follower });
            }
            None => tracing::warn!(key, capacity = pool.roster.capacity(), "pool full; raise --max-workers-per-pool"),
        }
    }
}

/// Whether the router can place work on `worker`.
fn usable(worker: &WorkerRegistration) -> Result<(), &'static str> {
    if !(worker.grpc_url.starts_with("http://") || worker.grpc_url.starts_with("https://")) {
        return Err("its grpc_url is not an http(s) URL");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::AdmissionConfig;

    fn registration(id: &str, role: Role) -> WorkerRegistration {
        WorkerRegistration {
            instance_id: id.into(),
            role: role as i32,
            grpc_url: format!("http://127.0.0.1:1/{id}"),
            ..Default::default()
        }
    }

    fn workers(list: &[(&str, Role)]) -> Workers {
        let by_key = list.iter().map(|(id, role)| (format!("/w/{id}"), registration(id, *role))).collect();
        Workers { by_key, connected: true }
    }

    fn pool(capacity: usize, admission: Option<Admission>) -> PoolHandle {
        PoolHandle { roster: Arc::new(Roster::with_capacity(capacity)), index: None, admission }
    }

    #[tokio::test]
    async fn registrations_fill_and_empty_their_pools_slots_and_admission() {
        let admission = Admission::empty(AdmissionConfig::default(), 2);
        let (prefill, decode) = (pool(2, Some(admission.clone())), pool(2, None));
        let mut placed = HashMap::new();

        reconcile(&workers(&[("p1", Role::Prefill), ("d1", Role::Decode)]), &mut placed, &prefill, &decode);
        assert_eq!((prefill.roster.active(), decode.roster.active()), (vec![0], vec![0]));
        assert_eq!(admission.stats().active, [true, false]);

        // p1 goes, p2 and p3 come, d1 re-registers as prefill (a new role
        // means a new member), a broken registration is ignored.
        let mut next = workers(&[("p2", Role::Prefill), ("p3", Role::Prefill), ("d1", Role::Prefill)]);
        next.by_key.insert(
            "/w/bad".into(),
            WorkerRegistration { grpc_url: "10.0.0.1:7001".into(), ..registration("bad", Role::Decode) },
        );
        reconcile(&next, &mut placed, &prefill, &decode);
        assert_eq!(decode.roster.active(), Vec::<usize>::new());
        assert_eq!(prefill.roster.active(), [0, 1], "two slots: the third prefill worker does not fit");
        assert_eq!(admission.stats().active, [true, true]);
        assert_eq!(placed.len(), 2);

        reconcile(&workers(&[]), &mut placed, &prefill, &decode);
        assert!(placed.is_empty() && prefill.roster.active().is_empty());
        assert_eq!(admission.stats().active, [false, false]);
    }

    #[tokio::test]
    async fn a_pool_of_no_slots_ignores_its_role() {
        let (prefill, decode) = (pool(0, None), pool(1, None));
        let mut placed = HashMap::new();
        reconcile(&workers(&[("p1", Role::Prefill), ("d1", Role::Decode)]), &mut placed, &prefill, &decode);
        assert_eq!(placed.len(), 1);
        assert_eq!(decode.roster.active(), [0]);
    }
}

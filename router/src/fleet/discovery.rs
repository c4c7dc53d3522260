//! The pools' members kept in step with etcd (`--etcd`): each registration
//! under the prefix fills a slot of its role's [`Roster`] in the pools of its
//! `model_name`, and each one that goes (deregistered, or its lease lapsed)
//! empties it. A model name seen for the first time gets its pools then.
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
use crate::fleet::roster::{Member, Roster};
use crate::pd::grpc::worker_clients;
use crate::placement::prefix_index::{self, PrefixIndex};

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
    model: String,
    role: Role,
    slot: usize,
    follower: Option<JoinHandle<()>>,
}

/// The two pools of one model.
#[derive(Debug, Clone)]
pub struct ModelPools {
    /// Its prefill pool (no slots when serving colocated).
    pub prefill: PoolHandle,
    /// Its decode pool.
    pub decode: PoolHandle,
}

impl ModelPools {
    fn of(&self, role: Role) -> Option<&PoolHandle> {
        match role {
            Role::Prefill => Some(&self.prefill),
            Role::Decode => Some(&self.decode),
            Role::Unspecified => None,
        }
    }
}

/// Makes the pools of a model seen for the first time, by name.
pub type NewModel = Box<dyn FnMut(&str) -> ModelPools + Send>;

/// Follows `config`'s registrations into the pools of their models for as
/// long as the returned task runs, making each model's pools with
/// `new_model` when its first worker registers.
pub fn follow(config: EtcdConfig, new_model: NewModel) -> Result<JoinHandle<()>, FollowError> {
    let watch = cluster::discovery::watch_workers(config)?;
    Ok(tokio::spawn(apply_changes(watch, new_model)))
}

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct FollowError(#[from] cluster::discovery::DiscoveryError);

/// What discovery placed: every model's pools, and where each worker went.
struct Membership {
    models: HashMap<String, ModelPools>,
    placed: HashMap<String, Placed>,
    new_model: NewModel,
}

async fn apply_changes(watch: WorkersWatch, new_model: NewModel) {
    let mut updates = watch.subscribe();
    let mut state = Membership { models: HashMap::new(), placed: HashMap::new(), new_model };
    loop {
        let workers: Arc<Workers> = updates.borrow_and_update().clone();
        state.reconcile(&workers);
        if updates.changed().await.is_err() {
            return;
        }
    }
}

impl Membership {
    /// Makes the pools hold exactly the registered workers.
    fn reconcile(&mut self, workers: &Workers) {
        let gone: Vec<String> = self
            .placed
            .iter()
            .filter(|(key, p)| workers.by_key.get(*key).is_none_or(|w| w.role() != p.role || w.model_name != p.model))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            let Some(left) = self.placed.remove(&key) else { continue };
            if let Some(follower) = left.follower {
                follower.abort();
            }
            if let Some(pool) = self.models.get(&left.model).and_then(|m| m.of(left.role)) {
                pool.leave(&key);
            }
            tracing::info!(key, model = left.model, role = left.role.as_str_name(), slot = left.slot, "worker left");
        }
        for (key, worker) in &workers.by_key {
            if self.placed.contains_key(key) {
                continue;
            }
            if let Err(why) = usable(worker) {
                tracing::warn!(key, why, "ignoring a worker registration");
                continue;
            }
            let new_model = &mut self.new_model;
            let model = self.models.entry(worker.model_name.clone()).or_insert_with(|| new_model(&worker.model_name));
            let Some(pool) = model.of(worker.role()).filter(|p| p.roster.capacity() > 0) else {
                continue;
            };
            match pool.join(key, &worker.grpc_url) {
                Some((slot, follower)) => {
                    tracing::info!(
                        key,
                        model = worker.model_name,
                        url = worker.grpc_url,
                        role = worker.role().as_str_name(),
                        slot,
                        "worker joined"
                    );
                    let placed = Placed { model: worker.model_name.clone(), role: worker.role(), slot, follower };
                    self.placed.insert(key.clone(), placed);
                }
                None => {
                    tracing::warn!(key, capacity = pool.roster.capacity(), "pool full; raise --max-workers-per-pool")
                }
            }
        }
    }
}

/// Whether the router can place work on `worker`.
fn usable(worker: &WorkerRegistration) -> Result<(), &'static str> {
    if !(worker.grpc_url.starts_with("http://") || worker.grpc_url.starts_with("https://")) {
        return Err("its grpc_url is not an http(s) URL");
    }
    if worker.model_name.is_empty() {
        return Err("it names no model");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::AdmissionConfig;

    fn registration(id: &str, model: &str, role: Role) -> WorkerRegistration {
        WorkerRegistration {
            instance_id: id.into(),
            model_name: model.into(),
            role: role as i32,
            grpc_url: format!("http://127.0.0.1:1/{id}"),
            ..Default::default()
        }
    }

    fn workers(list: &[(&str, &str, Role)]) -> Workers {
        let by_key =
            list.iter().map(|(id, model, role)| (format!("/w/{id}"), registration(id, model, *role))).collect();
        Workers { by_key, connected: true }
    }

    fn pool(capacity: usize, admission: Option<Admission>) -> PoolHandle {
        PoolHandle { roster: Arc::new(Roster::with_capacity(capacity)), index: None, admission }
    }

    /// Discovery making pools of `slots` (prefill `prefill_slots`) per model,
    /// the prefill pool holding the admission; what it made, by name.
    fn placement(
        prefill_slots: usize,
        slots: usize,
    ) -> (Membership, Arc<std::sync::Mutex<HashMap<String, ModelPools>>>) {
        let made = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let record = made.clone();
        let new_model: NewModel = Box::new(move |name: &str| {
            let admission = Admission::empty(AdmissionConfig::default(), prefill_slots.max(slots));
            let pools = ModelPools { prefill: pool(prefill_slots, Some(admission)), decode: pool(slots, None) };
            record.lock().unwrap().insert(name.to_owned(), pools.clone());
            pools
        });
        (Membership { models: HashMap::new(), placed: HashMap::new(), new_model }, made)
    }

    #[tokio::test]
    async fn registrations_fill_and_empty_their_pools_slots_and_admission() {
        let (mut state, made) = placement(2, 2);
        state.reconcile(&workers(&[("p1", "m", Role::Prefill), ("d1", "m", Role::Decode)]));
        let m = made.lock().unwrap()["m"].clone();
        let admission = m.prefill.admission.clone().unwrap();
        assert_eq!((m.prefill.roster.active(), m.decode.roster.active()), (vec![0], vec![0]));
        assert_eq!(admission.stats().active, [true, false]);

        // p1 goes, p2 and p3 come, d1 re-registers as prefill (a new role
        // means a new member), a broken registration is ignored.
        let mut next = workers(&[("p2", "m", Role::Prefill), ("p3", "m", Role::Prefill), ("d1", "m", Role::Prefill)]);
        next.by_key.insert(
            "/w/bad".into(),
            WorkerRegistration { grpc_url: "10.0.0.1:7001".into(), ..registration("bad", "m", Role::Decode) },
        );
        next.by_key.insert("/w/nameless".into(), registration("nameless", "", Role::Decode));
        state.reconcile(&next);
        assert_eq!(m.decode.roster.active(), Vec::<usize>::new());
        assert_eq!(m.prefill.roster.active(), [0, 1], "two slots: the third prefill worker does not fit");
        assert_eq!(admission.stats().active, [true, true]);
        assert_eq!(state.placed.len(), 2);
        assert_eq!(made.lock().unwrap().len(), 1, "a registration naming no model makes no pools");

        state.reconcile(&workers(&[]));
        assert!(state.placed.is_empty() && m.prefill.roster.active().is_empty());
        assert_eq!(admission.stats().active, [false, false]);
    }

    #[tokio::test]
    async fn each_model_name_gets_its_own_pools() {
        let (mut state, made) = placement(1, 2);
        state.reconcile(&workers(&[
            ("a1", "llama/v1", Role::Decode),
            ("a2", "llama/v1", Role::Decode),
            ("b1", "llama/v2", Role::Decode),
            ("b2", "llama/v2", Role::Prefill),
        ]));
        let (v1, v2) = {
            let made = made.lock().unwrap();
            (made["llama/v1"].clone(), made["llama/v2"].clone())
        };
        assert_eq!((v1.decode.roster.active(), v1.prefill.roster.active()), (vec![0, 1], vec![]));
        assert_eq!((v2.decode.roster.active(), v2.prefill.roster.active()), (vec![0], vec![0]));

        // a2 goes and b1 moves to v1: it leaves v2's pool for a2's old slot.
        state.reconcile(&workers(&[
            ("a1", "llama/v1", Role::Decode),
            ("b1", "llama/v1", Role::Decode),
            ("b2", "llama/v2", Role::Prefill),
        ]));
        assert_eq!(v1.decode.roster.active().len(), 2);
        assert!(v2.decode.roster.active().is_empty());
        assert_eq!(made.lock().unwrap().len(), 2, "pools are made once per name");
    }

    #[tokio::test]
    async fn a_pool_of_no_slots_ignores_its_role() {
        let (mut state, made) = placement(0, 1);
        state.reconcile(&workers(&[("p1", "m", Role::Prefill), ("d1", "m", Role::Decode)]));
        assert_eq!(state.placed.len(), 1);
        assert_eq!(made.lock().unwrap()["m"].decode.roster.active(), [0]);
    }
}

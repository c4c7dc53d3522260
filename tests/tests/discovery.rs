//! Worker discovery over a real etcd: registration, lease expiry, outages.

// Each test holds its turn (a std mutex) while its processes run, awaits included.
#![allow(clippy::await_holding_lock)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::discovery::{
    register, watch_workers, EtcdConfig, RegistrationState, Role, WorkerRegistration, Workers, WorkersWatch,
};
use serde_json::{json, Value};
use tests::etcd::Etcd;
use tests::process::Process;
use tokio::sync::watch;

fn worker(id: &str, role: Role) -> WorkerRegistration {
    WorkerRegistration {
        instance_id: id.into(),
        role: role as i32,
        model_name: "m".into(),
        grpc_url: format!("http://127.0.0.1:1/{id}"),
        tensor_parallel_size: 1,
        block_size: 16,
        context_length: 2048,
        kv_endpoints: vec![],
        http_url: String::new(),
    }
}

fn config(etcd: &Etcd) -> EtcdConfig {
    EtcdConfig { endpoints: vec![etcd.url()], prefix: format!("/test-{}", std::process::id()) }
}

/// Waits until the watched set satisfies `ok`; panics with `what` after `limit`.
async fn until(
    workers: &mut watch::Receiver<Arc<Workers>>,
    limit: Duration,
    what: &str,
    ok: impl Fn(&Workers) -> bool,
) -> Arc<Workers> {
    let seen = tokio::time::timeout(limit, workers.wait_for(|w| ok(w))).await.map(|seen| seen.map(|w| w.clone()));
    match seen {
        Ok(seen) => seen.expect("the watch task lives as long as its handle"),
        Err(_) => panic!("{what}: not within {limit:?}; last seen {:?}", workers.borrow()),
    }
}

fn ids(workers: &Workers) -> Vec<String> {
    workers.by_key.values().map(|w| w.instance_id.clone()).collect()
}

fn follow(config: &EtcdConfig) -> (WorkersWatch, watch::Receiver<Arc<Workers>>) {
    let watch = watch_workers(config.clone()).expect("an endpoint is given");
    let rx = watch.subscribe();
    (watch, rx)
}

#[tokio::test]
async fn workers_appear_with_their_registration_and_leave_at_once_on_deregister() {
    let etcd = Etcd::start();
    let config = config(&etcd);
    let (_watch, mut seen) = follow(&config);
    let prefill = register(config.clone(), worker("p1", Role::Prefill), Duration::from_secs(10)).unwrap();
    let decode = register(config.clone(), worker("d1", Role::Decode), Duration::from_secs(10)).unwrap();
    prefill.registered().await;
    assert_eq!(prefill.state(), RegistrationState::Registered);

    let both = until(&mut seen, Duration::from_secs(10), "both registered", |w| w.by_key.len() == 2).await;
    assert!(both.connected);
    let key = format!("{}p1", config.workers_prefix());
    assert_eq!(both.by_key.get(&key), Some(&worker("p1", Role::Prefill)), "{both:?}");

    // Revoking the lease deletes the key now, not after the 10 s TTL.
    let started = Instant::now();
    decode.deregister().await;
    let left = until(&mut seen, Duration::from_secs(5), "d1 deregistered", |w| w.by_key.len() == 1).await;
    assert_eq!(ids(&left), ["p1"]);
    assert!(started.elapsed() < Duration::from_secs(5));

    // A watcher started now reads the current set from its snapshot.
    let (_late, mut late) = follow(&config);
    let snapshot = until(&mut late, Duration::from_secs(10), "late watcher connected", |w| w.connected).await;
    assert_eq!(ids(&snapshot), ["p1"]);
}

/// A worker told to deregister while its registration is still in flight leaves no key behind
/// for a TTL: the registration completes, then its lease is revoked (a put cancelled after etcd
/// applied it used to linger for the whole 10 s).
#[tokio::test]
async fn a_deregistration_racing_the_registration_leaves_no_key() {
    let etcd = Etcd::start();
    let config = config(&etcd);
    for round in 0..40u64 {
        let id = format!("w{round}");
        let registration = register(config.clone(), worker(&id, Role::Decode), Duration::from_secs(30)).unwrap();
        // Let the registration reach etcd, or not: either way nothing may be left.
        tokio::time::sleep(Duration::from_micros(round * 150)).await;
        registration.deregister().await;
        let (_late, mut late) = follow(&config);
        let snapshot = until(&mut late, Duration::from_secs(10), "watcher connected", |w| w.connected).await;
        assert!(ids(&snapshot).is_empty(), "round {round}: {snapshot:?}");
    }
}

#[tokio::test]
async fn a_worker_that_stops_renewing_disappears_within_its_ttl() {
    let etcd = Etcd::start();
    let config = config(&etcd);
    let (_watch, mut seen) = follow(&config);
    let ttl = Duration::from_secs(2);
    let crashed = register(config.clone(), worker("w", Role::Decode), ttl).unwrap();
    crashed.registered().await;
    until(&mut seen, Duration::from_secs(10), "registered", |w| w.by_key.len() == 1).await;

    // Dropping the handle stops the renewals without revoking: a crash.
    let started = Instant::now();
    drop(crashed);
    tokio::time::sleep(ttl / 4).await;
    assert_eq!(seen.borrow().by_key.len(), 1, "the key must outlive the process until its lease lapses");
    until(&mut seen, ttl + Duration::from_secs(3), "lease lapsed", |w| w.by_key.is_empty()).await;
    let gone_after = started.elapsed();
    assert!(gone_after >= ttl / 2, "gone after {gone_after:?}, before the lease could lapse");
}

#[tokio::test]
async fn through_an_etcd_outage_the_watch_keeps_its_set_and_workers_register_again() {
    let mut etcd = Etcd::start();
    let config = config(&etcd);
    let (_watch, mut seen) = follow(&config);
    let ttl = Duration::from_secs(2);
    let registration = register(config.clone(), worker("w", Role::Prefill), ttl).unwrap();
    until(&mut seen, Duration::from_secs(10), "registered", |w| w.connected && w.by_key.len() == 1).await;

    // etcd down for longer than the TTL: the router keeps serving with the
    // last known set, marked disconnected.
    etcd.kill();
    let kept = until(&mut seen, Duration::from_secs(10), "outage noticed", |w| !w.connected).await;
    assert_eq!(ids(&kept), ["w"]);
    tokio::time::sleep(ttl + Duration::from_secs(1)).await;
    assert_eq!(ids(&seen.borrow()), ["w"]);
    assert_eq!(registration.state(), RegistrationState::Pending);

    // Back with its data: the watch reconnects and the worker is there.
    etcd.restart(false);
    let back = until(&mut seen, Duration::from_secs(15), "reconnected", |w| w.connected).await;
    assert_eq!(ids(&back), ["w"]);
    registration.registered().await;

    // Back without its data (a replaced member): the worker's lease is gone,
    // so it must register anew for the watch to see it again.
    etcd.restart(true);
    let reconnected =
        until(&mut seen, Duration::from_secs(15), "re-registered", |w| w.connected && w.by_key.len() == 1).await;
    assert_eq!(ids(&reconnected), ["w"]);
    // The registration survives etcd's restarts: its lease is being renewed.
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(ids(&seen.borrow()), ["w"]);
    assert_eq!(registration.state(), RegistrationState::Registered);
}

#[tokio::test]
async fn a_worker_whose_lease_is_revoked_behind_its_back_registers_again() {
    let etcd = Etcd::start();
    let config = config(&etcd);
    let (_watch, mut seen) = follow(&config);
    let ttl = Duration::from_secs(3);
    let registration = register(config.clone(), worker("w", Role::Decode), ttl).unwrap();
    until(&mut seen, Duration::from_secs(10), "registered", |w| w.by_key.len() == 1).await;

    // An operator (or etcd losing it) revokes the lease while the worker's
    // connection stays up: the next renewal learns it and registers anew.
    let mut admin = etcd_client::Client::connect([etcd.url()], None).await.unwrap();
    for lease in admin.leases().await.unwrap().leases() {
        admin.lease_revoke(lease.id()).await.unwrap();
    }
    until(&mut seen, Duration::from_secs(5), "revoked", |w| w.by_key.is_empty()).await;
    until(&mut seen, ttl + Duration::from_secs(3), "registered again", |w| w.by_key.len() == 1).await;
    registration.registered().await;
}

#[tokio::test]
async fn worker_processes_register_what_routers_need_and_leave_on_sigterm() {
    let etcd = Etcd::start();
    let config = config(&etcd);
    let (_watch, mut seen) = follow(&config);
    let etcd_flags = ["--etcd", &etcd.url(), "--etcd-prefix", &config.prefix, "--etcd-lease-ttl-secs", "60"];
    let model = tests::model_path();
    let model = model.to_str().expect("utf-8 model path");
    let mut decode = Process::start(
        "decode-worker",
        &[&["--listen", "127.0.0.1:0", "--mock", "--model", model], &etcd_flags[..]].concat(),
    );
    let mut prefill = tests::start_prefill_with("127.0.0.1:0", &etcd_flags);

    let both = until(&mut seen, Duration::from_secs(30), "both workers registered", |w| w.by_key.len() == 2).await;
    let find = |role: Role| both.by_key.values().find(|w| w.role() == role).cloned().expect("one of each role");
    let (p, d) = (find(Role::Prefill), find(Role::Decode));
    assert_eq!((p.grpc_url.as_str(), d.grpc_url.as_str()), (prefill.url(), decode.url()));
    assert_eq!(p.model_name, d.model_name);
    assert!(!p.model_name.is_empty());
    assert_eq!((p.block_size, p.tensor_parallel_size, p.context_length), (16, 1, 8192), "{p:?}");
    assert_eq!(p.kv_endpoints.len(), 1, "{p:?}");
    assert!(p.kv_endpoints[0].starts_with("127.0.0.1:"), "{p:?}");
    assert!(d.kv_endpoints.is_empty());
    assert_ne!(p.instance_id, d.instance_id);

    // SIGTERM: the worker deregisters at once, not after its 60 s lease.
    let status = decode.terminate(Duration::from_secs(10)).expect("the decode worker exits on SIGTERM");
    assert!(status.success(), "{status}");
    let left = until(&mut seen, Duration::from_secs(5), "decode worker gone", |w| w.by_key.len() == 1).await;
    assert_eq!(left.by_key.values().next().map(|w| w.role()), Some(Role::Prefill));
    prefill.terminate(Duration::from_secs(10)).expect("the prefill worker exits on SIGTERM");
    until(&mut seen, Duration::from_secs(5), "prefill worker gone", |w| w.by_key.is_empty()).await;
}

/// A router and mock workers on one etcd: the router finds the workers there.
struct EtcdCluster {
    etcd: Etcd,
    prefix: String,
    router: Process,
}

impl EtcdCluster {
    fn start(router_flags: &[&str]) -> Self {
        let etcd = Etcd::start();
        let prefix = format!("/cluster-{}", std::process::id());
        let url = etcd.url();
        let mut args = vec!["--host", "127.0.0.1", "--port", "0", "--etcd", &url, "--etcd-prefix", &prefix];
        args.extend(router_flags);
        let router = Process::start("router", &args);
        Self { etcd, prefix, router }
    }

    /// A mock worker (`prefill-worker` or `decode-worker`) registered with a 2 s lease.
    fn worker(&self, bin: &str) -> Process {
        let model = tests::model_path();
        let url = self.etcd.url();
        let args = [
            "--mock",
            "--listen",
            "127.0.0.1:0",
            "--model",
            model.to_str().expect("utf-8 model path"),
            "--etcd",
            &url,
            "--etcd-prefix",
            &self.prefix,
            "--etcd-lease-ttl-secs",
            "2",
        ];
        Process::start(bin, &args)
    }

    async fn complete(&self) -> (u16, Value) {
        let body = json!({"prompt": "Hello", "max_tokens": 3});
        let url = format!("{}/v1/completions", self.router.url());
        let response = reqwest::Client::new().post(url).json(&body).send().await.expect("POST");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn ready(&self) -> u16 {
        reqwest::get(format!("{}/ready", self.router.url())).await.map(|r| r.status().as_u16()).unwrap_or(0)
    }

    /// Waits until `/ready` answers `status`.
    async fn until_ready_is(&self, status: u16, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.ready().await != status {
            assert!(Instant::now() < deadline, "/ready did not turn {status} within {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn placements(&self, worker: &str) -> f64 {
        tests::metrics::value(
            self.router.url(),
            "pdserve_router_placements_total",
            &[("pool", "decode"), ("worker", worker)],
        )
        .await
    }
}

#[tokio::test]
async fn a_router_on_etcd_follows_workers_as_they_join_leave_and_die() {
    let _turn = tests::take_turn();
    let cluster = EtcdCluster::start(&["--policy", "round-robin", "--local-prefill-max-tokens", "0"]);
    // No worker yet: alive, not ready, and a request gets a clean 503.
    assert_eq!(reqwest::get(format!("{}/health", cluster.router.url())).await.unwrap().status(), 200);
    assert_eq!(cluster.ready().await, 503);

    let _prefill = cluster.worker("prefill-worker");
    let mut first = cluster.worker("decode-worker");
    cluster.until_ready_is(200, Duration::from_secs(20)).await;
    let (status, answer) = cluster.complete().await;
    assert_eq!(status, 200, "{answer}");

    // A second decode worker joins: round-robin sends it every other request.
    let mut second = cluster.worker("decode-worker");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.placements("1").await == 0.0 {
        assert!(Instant::now() < deadline, "the second decode worker never got a request");
        assert_eq!(cluster.complete().await.0, 200);
    }

    // The first leaves cleanly: every request still succeeds, on the second.
    first.terminate(Duration::from_secs(10)).expect("the decode worker exits on SIGTERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = cluster.placements("1").await;
    for _ in 0..6 {
        let (status, answer) = cluster.complete().await;
        assert_eq!(status, 200, "{answer}");
    }
    assert_eq!(cluster.placements("1").await, before + 6.0, "every request went to the worker left");

    // The second dies (SIGKILL): within its 2 s lease the pool is empty, so
    // the router is not ready and answers 503, never a hang.
    second.kill();
    cluster.until_ready_is(503, Duration::from_secs(6)).await;
    let (status, answer) =
        tokio::time::timeout(Duration::from_secs(10), cluster.complete()).await.expect("an answer, not a hang");
    assert_eq!(status, 503, "{answer}");

    // A new one joins: served again.
    let _third = cluster.worker("decode-worker");
    cluster.until_ready_is(200, Duration::from_secs(10)).await;
    let (status, answer) = cluster.complete().await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn a_router_on_etcd_keeps_serving_through_an_etcd_outage() {
    let _turn = tests::take_turn();
    let mut cluster = EtcdCluster::start(&["--local-prefill-max-tokens", "0"]);
    let _prefill = cluster.worker("prefill-worker");
    let _decode = cluster.worker("decode-worker");
    cluster.until_ready_is(200, Duration::from_secs(20)).await;

    // etcd gone for longer than the workers' leases: the router keeps the
    // workers it knew.
    cluster.etcd.kill();
    for _ in 0..4 {
        let (status, answer) = cluster.complete().await;
        assert_eq!(status, 200, "{answer}");
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    // etcd back without its data: the workers register again and the
    // router's view follows them (between its reconnect and their
    // re-registration the router may briefly see no worker).
    cluster.etcd.restart(true);
    let (_watch, mut seen) =
        follow(&EtcdConfig { endpoints: vec![cluster.etcd.url()], prefix: cluster.prefix.clone() });
    until(&mut seen, Duration::from_secs(15), "workers registered again", |w| w.connected && w.by_key.len() == 2).await;
    cluster.until_ready_is(200, Duration::from_secs(5)).await;
    for _ in 0..4 {
        let (status, answer) = cluster.complete().await;
        assert_eq!(status, 200, "{answer}");
    }
}

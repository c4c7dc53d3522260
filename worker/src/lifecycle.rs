//! How a worker process lives and stops: its HTTP face (`/health`, `/ready`,
//! `/metrics`) and the graceful shutdown on SIGTERM.
//!
//! On SIGTERM (or Ctrl-C) a worker, in order: turns `/ready` to 503, leaves
//! etcd (routers watching it stop placing work here), keeps taking calls for
//! a moment so that requests a router placed just before it heard are not
//! refused, ends its KV event streams, and stops its gRPC server, which
//! refuses new calls and lets the running ones finish. Whatever still runs
//! when `--shutdown-grace-secs` (counted from the signal) is over is cut off,
//! so a stuck request never holds up a rolling update.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cluster::discovery::{Registration, Role};
use engine::EngineHandle;

use crate::structured::Grammars;
use futures::Stream;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tokio::net::{TcpListener, TcpStream};

use crate::discovery::{DiscoveryArgs, Endpoints};
use crate::kv_events::KvEventPublisher;

/// Default of `--shutdown-grace-secs`.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long a leaving worker still takes calls (at most half its grace):
/// a router places a request's decode leg after its prefill, so one placed
/// before the router heard of the leave can arrive a little later.
const LEAVE_DELAY: Duration = Duration::from_secs(1);

/// The worker's HTTP face and shutdown flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LifecycleArgs {
    /// Address of the HTTP server for `/health` (liveness), `/ready`
    /// (readiness) and `/metrics` (Prometheus); port 0 picks a free one.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub http_listen: SocketAddr,
    /// Seconds a stopping worker lets running requests finish before it exits.
    #[arg(long, default_value_t = DEFAULT_SHUTDOWN_GRACE.as_secs())]
    pub shutdown_grace_secs: u64,
}

/// What `/health`, `/ready` and `/metrics` report. Cheap to clone.
#[derive(Clone)]
pub struct Face {
    engine: Option<EngineHandle>,
    draining: Arc<AtomicBool>,
    metrics: Arc<WorkerMetrics>,
}

impl Face {
    /// The face of a worker of `role` over `engine` (`None`: a mock worker,
    /// always healthy, with no engine figures).
    pub fn new(role: Role, engine: Option<EngineHandle>) -> Self {
        Self { engine, draining: Arc::default(), metrics: Arc::new(WorkerMetrics::new(role)) }
    }

    /// Why the worker cannot serve at all, if it cannot: its engine failed
    /// (a tensor-parallel rank died), which only a restart mends.
    fn failure(&self) -> Option<String> {
        self.engine.as_ref().and_then(EngineHandle::failure)
    }

    /// Stops reporting ready: the first step of a shutdown.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Serves the face on `listener` for as long as the process lives.
    pub fn serve(self, listener: TcpListener) {
        let app = axum::Router::new()
            .route("/health", get(health))
            .route("/ready", get(ready))
            .route("/metrics", get(metrics))
            .with_state(self);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the health and metrics server stopped");
            }
        });
    }
}

/// Binds `--http-listen` and serves the face of a `role` worker there;
/// returns it and the bound address.
pub async fn start_face(
    args: &LifecycleArgs,
    role: Role,
    engine: Option<(EngineHandle, &Grammars)>,
) -> anyhow::Result<(Face, SocketAddr)> {
    use anyhow::Context;
    let listener =
        TcpListener::bind(args.http_listen).await.with_context(|| format!("binding HTTP on {}", args.http_listen))?;
    let addr = listener.local_addr()?;
    let face = Face::new(role, engine.as_ref().map(|(engine, _)| engine.clone()));
    if let Some((_, grammars)) = engine {
        grammars.register(&face.metrics.registry)?;
    }
    face.clone().serve(listener);
    Ok((face, addr))
}

/// Liveness: 503 once the engine failed, so an orchestrator restarts it.
async fn health(State(face): State<Face>) -> Response {
    match face.failure() {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("engine failed: {why}\n")).into_response(),
    }
}

/// Readiness: alive and not shutting down.
async fn ready(State(face): State<Face>) -> Response {
    if let Some(why) = face.failure() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("engine failed: {why}\n")).into_response();
    }
    if face.draining.load(Ordering::Acquire) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

async fn metrics(State(face): State<Face>) -> Response {
    if let Some(engine) = &face.engine {
        face.metrics.observe(engine);
    }
    match face.metrics.render() {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// The worker's gauges: the demand signals an autoscaler reads.
struct WorkerMetrics {
    registry: Registry,
    pending_prefill_tokens: IntGauge,
    running: IntGauge,
    waiting: IntGauge,
    kv_usage: prometheus::Gauge,
    kv_blocks: IntGauge,
    kv_free_blocks: IntGauge,
    preemptions: IntCounter,
    /// Decode steps, then drafts, draft tokens and accepted tokens of speculative decoding.
    speculation: [IntCounter; 4],
    /// Draft tokens verified and accepted by their position in a step's drafts.
    per_position: [IntCounterVec; 2],
}

impl WorkerMetrics {
    fn new(role: Role) -> Self {
        let role = match role {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Unspecified => "unspecified",
        };
        let registry = Registry::new_custom(Some("pdserve_worker".into()), Some([("role".into(), role.into())].into()))
            .expect("valid registry prefix and labels");
        let gauge = |name: &str, help: &str| {
            let gauge = IntGauge::with_opts(Opts::new(name, help)).expect("valid gauge options");
            registry.register(Box::new(gauge.clone())).expect("metric registered once");
            gauge
        };
        let pending_prefill_tokens =
            gauge("queued_prefill_tokens", "Prompt tokens admitted but not computed yet (waiting or mid-chunk).");
        let running = gauge("running_sequences", "Sequences the engine is running.");
        let waiting = gauge("waiting_sequences", "Sequences waiting for admission or preempted.");
        let kv_blocks = gauge("kv_blocks", "KV cache blocks in all.");
        let kv_free_blocks = gauge("kv_free_blocks", "KV cache blocks free or evictable.");
        let kv_usage = prometheus::Gauge::with_opts(Opts::new(
            "kv_usage_ratio",
            "Share of KV cache blocks in use (not free or evictable), 0 to 1.",
        ))
        .expect("valid gauge options");
        registry.register(Box::new(kv_usage.clone())).expect("metric registered once");
        let counter = |name: &str, help: &str| {
            let counter = IntCounter::with_opts(Opts::new(name, help)).expect("valid counter options");
            registry.register(Box::new(counter.clone())).expect("metric registered once");
            counter
        };
        let preemptions = counter("preemptions_total", "Sequences preempted for recompute.");
        // vLLM's spec_decode counters and the decode steps: acceptance = accepted / draft tokens,
        // tokens per verifying forward pass = 1 + accepted / drafts, tokens per forward pass of a
        // decoding sequence (drafting or not) = 1 + accepted / decode steps.
        let speculation = [
            counter(
                "decode_steps_total",
                "Forward passes of a sequence past its prompt, each generating a token and the drafts it accepted.",
            ),
            counter("spec_decode_num_drafts_total", "Decode steps of a sequence that verified draft tokens."),
            counter("spec_decode_num_draft_tokens_total", "Draft tokens verified."),
            counter("spec_decode_num_accepted_tokens_total", "Draft tokens accepted."),
        ];
        let per_position = |name: &str, help: &str| {
            let counter = IntCounterVec::new(Opts::new(name, help), &["position"]).expect("valid counter options");
            registry.register(Box::new(counter.clone())).expect("metric registered once");
            counter
        };
        let per_position = [
            per_position(
                "spec_decode_num_draft_tokens_per_pos",
                "Draft tokens verified, by position in their step's drafts (0: the first).",
            ),
            per_position(
                "spec_decode_num_accepted_tokens_per_pos",
                "Draft tokens accepted, by position in their step's drafts (0: the first).",
            ),
        ];
        Self {
            registry,
            pending_prefill_tokens,
            running,
            waiting,
            kv_usage,
            kv_blocks,
            kv_free_blocks,
            preemptions,
            speculation,
            per_position,
        }
    }

    fn observe(&self, engine: &EngineHandle) {
        let stats = engine.stats();
        let int = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.pending_prefill_tokens.set(int(stats.pending_prefill_tokens));
        self.running.set(int(stats.num_running));
        self.waiting.set(int(stats.num_waiting));
        self.kv_blocks.set(int(stats.total_blocks));
        self.kv_free_blocks.set(int(stats.free_blocks));
        let used = stats.total_blocks.saturating_sub(stats.free_blocks);
        self.kv_usage.set(if stats.total_blocks == 0 { 0.0 } else { used as f64 / stats.total_blocks as f64 });
        // The engine counts since start; each counter only moves forward to it.
        let advance = |counter: &IntCounter, total: u64| counter.inc_by(total.saturating_sub(counter.get()));
        advance(&self.preemptions, stats.num_preemptions);
        let spec = stats.speculation;
        for (counter, total) in self.speculation.iter().zip([
            spec.num_decode_steps,
            spec.num_drafts,
            spec.num_draft_tokens,
            spec.num_accepted_tokens,
        ]) {
            advance(counter, total);
        }
        for (counters, totals) in
            self.per_position.iter().zip([&spec.num_draft_tokens_per_pos, &spec.num_accepted_tokens_per_pos])
        {
            for (position, &total) in totals.iter().enumerate() {
                advance(&counters.with_label_values(&[&position.to_string()]), total);
            }
        }
    }

    fn render(&self) -> Result<String, prometheus::Error> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// A worker process with everything bound and built, about to say so.
pub struct Launch {
    /// The binary's name, which starts the lines it prints.
    pub name: &'static str,
    /// Its pool.
    pub role: Role,
    /// The model card it registers.
    pub card: proto::worker::ModelCard,
    /// Its tensor-parallel ranks.
    pub tensor_parallel_size: usize,
    /// The bound gRPC listener.
    pub listener: TcpListener,
    /// Each rank's kv-transfer endpoint (`host:port`); none on a decode worker.
    pub kv: Vec<String>,
    /// What follows the address on the listening line, such as ` (mock: no model)`.
    pub detail: String,
    /// The HTTP face and where it listens.
    pub face: (Face, SocketAddr),
    /// The KV event streams its `Worker` service publishes.
    pub kv_events: KvEventPublisher,
}

impl Launch {
    /// Prints the two lines tests and launchers wait for (the HTTP face's,
    /// then the gRPC listener's), registers in etcd when `discovery` says
    /// so, and serves `services` until SIGTERM as [`Lifecycle`] does.
    pub async fn serve(
        self,
        discovery: &DiscoveryArgs,
        lifecycle: &LifecycleArgs,
        services: tonic::transport::server::Router,
    ) -> anyhow::Result<()> {
        let Self { name, role, card, tensor_parallel_size, listener, kv, detail, face: (face, http), kv_events } = self;
        let addr = listener.local_addr()?;
        println!("{name} health and metrics on http://{http}");
        println!("{name} listening on http://{addr}{detail}");
        let endpoints = Endpoints { grpc: addr, kv, http: Some(http) };
        let registration = discovery.announce(role, &card, tensor_parallel_size, &endpoints)?;
        let grace = Duration::from_secs(lifecycle.shutdown_grace_secs);
        Lifecycle { face, registration, kv_events, grace }
            .serve(services, crate::service::nodelay_incoming(listener))
            .await?;
        Ok(())
    }
}

/// A worker's gRPC services and how they stop; see the module doc.
pub struct Lifecycle {
    /// The HTTP face, told when draining starts.
    pub face: Face,
    /// The etcd registration to leave first, if the worker has one.
    pub registration: Option<Registration>,
    /// The KV event streams to end (they never end alone).
    pub kv_events: KvEventPublisher,
    /// How long running requests may take once the shutdown began.
    pub grace: Duration,
}

impl Lifecycle {
    /// Serves `server` on `incoming` until SIGTERM / Ctrl-C, then shuts down
    /// as the module doc says.
    pub async fn serve(
        self,
        server: tonic::transport::server::Router,
        incoming: impl Stream<Item = std::io::Result<TcpStream>> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let (began_tx, began) = tokio::sync::oneshot::channel::<()>();
        let Self { face, registration, kv_events, grace } = self;
        let shutdown = async move {
            cluster::shutdown::signal().await;
            tracing::info!(?grace, "shutting down: leaving the cluster, letting running requests finish");
            face.start_draining();
            let _ = began_tx.send(());
            if let Some(registration) = registration {
                registration.deregister().await;
            }
            tokio::time::sleep(LEAVE_DELAY.min(grace / 2)).await;
            kv_events.shutdown();
        };
        let serve = server.serve_with_incoming_shutdown(incoming, shutdown);
        let deadline = async move {
            if began.await.is_err() {
                return std::future::pending().await;
            }
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            served = serve => served,
            () = deadline => {
                tracing::warn!(?grace, "requests still running at the end of the shutdown grace period; exiting");
                Ok(())
            }
        }
    }
}

//! The router's Prometheus metrics, served as text at `GET /metrics`.
//!
//! Each router owns its [`Registry`] instead of the process-wide default one,
//! so several routers in one process (tests, embedding) keep separate counts
//! and never collide on registration.
//!
//! Where each metric is recorded:
//! - requests and end-to-end latency: [`track`], a middleware on the
//!   generation routes, through a [`RequestGuard`] that counts the request
//!   once when it is dropped: after the handler for a JSON answer, when the
//!   body is dropped for a stream (its end, or the client going away);
//! - queue time and prompt tokens: the handler, once admitted;
//! - first-token and inter-token latency: [`Metrics::time_tokens`] over the
//!   backend's token stream; generated tokens: [`Metrics::count_deltas`] over
//!   the deltas the client is sent, so they match the reported usage;
//! - prefix-cached tokens: the disaggregated backend, from the prefill answer;
//! - admission gauges: read from the queue at scrape time ([`Metrics::render`]);
//! - per-key usage and refusals ([`TenantCounters`]): the usage record of each
//!   admitted request when it ends (`tenancy::usage`), and the handler for a
//!   request a key's limits refuse.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use futures::stream::{BoxStream, StreamExt};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::admission::AdmissionStats;
use crate::backend::{BackendError, TokenStream};
use crate::fleet::model::ModelName;
use crate::fleet::roster::Roster;
use crate::pd::PlacementCounters;
use crate::placement::prefix_index::PrefixIndex;
use crate::respond::stream::Delta;

/// One served model as a scrape sees it: the source of its admission and
/// worker gauges, read at scrape time (the queue and rosters are the one
/// source of truth).
#[derive(Debug)]
pub struct ModelScrape {
    /// The `model` label.
    pub name: String,
    /// Its admission queue now.
    pub admission: AdmissionStats,
    /// Its pools.
    pub pools: Vec<ScrapedPool>,
}

/// A pool whose workers `/metrics` reports.
#[derive(Debug, Clone)]
pub struct ScrapedPool {
    /// `prefill` or `decode`.
    pub pool: &'static str,
    /// Its slots and their breakers.
    pub roster: Arc<Roster>,
    /// Its prefix index, with cache-aware placement.
    pub index: Option<Arc<PrefixIndex>>,
}

/// Prefix of every metric name.
const PREFIX: &str = "pdserve_router_";

/// `status` label of a request whose client left before any response: the
/// handler was dropped, so no status exists (nginx's "client closed request").
const CLIENT_CLOSED: &str = "499";

/// Time to first token: a prefill, often behind a queue; ms to tens of seconds.
const TTFT_BUCKETS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];
/// Between tokens: one decode step, normally a few ms to a few hundred.
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 10.0,
];
/// Compiling a structured output: a regex in tens of microseconds, a large schema in tens of
/// milliseconds.
const COMPILE_BUCKETS: &[f64] = &[0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0];
/// Whole requests and queue waits: up to minutes for long generations.
const REQUEST_BUCKETS: &[f64] =
    &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0];

/// The metrics of one router and the registry that exports them. Shared
/// behind an `Arc`; every handle inside is cheap to clone.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    time_to_first_token: HistogramVec,
    inter_token_latency: HistogramVec,
    e2e_request_latency: Histogram,
    queue_time: HistogramVec,
    requests: IntCounterVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    prefix_cached_tokens: IntCounterVec,
    hit_blocks: IntCounterVec,
    total_blocks: IntCounterVec,
    placements: IntCounterVec,
    worker_up: IntGaugeVec,
    worker_cached_blocks: IntGaugeVec,
    worker_pinned_blocks: IntGaugeVec,
    admission_queue_depth: IntGaugeVec,
    inflight_requests: IntGaugeVec,
    tenants: TenantCounters,
    worker_circuit_state: IntGaugeVec,
    structured_requests: IntCounterVec,
    structured_compile: HistogramVec,
}

/// Per-key counters, labelled by tenant and key id (`anonymous` without keys).
#[derive(Debug, Clone)]
pub struct TenantCounters {
    requests: IntCounterVec,
    prompt_tokens: IntCounterVec,
    completion_tokens: IntCounterVec,
    rate_limited: IntCounterVec,
}

impl TenantCounters {
    fn register(registry: &Registry) -> Self {
        let vec = |name: &str, help: &str, labels: &[&str]| {
            let counter =
                IntCounterVec::new(Opts::new(format!("{PREFIX}{name}"), help), labels).expect("valid counter options");
            register(registry, counter)
        };
        Self {
            requests: vec(
                "key_requests_total",
                "Admitted requests by key and how they ended (completed, failed, cancelled).",
                &["tenant", "key", "outcome"],
            ),
            prompt_tokens: vec(
                "key_prompt_tokens_total",
                "Prompt tokens of admitted requests, by key.",
                &["tenant", "key"],
            ),
            completion_tokens: vec(
                "key_completion_tokens_total",
                "Tokens sent to clients, by key, cancelled streams included.",
                &["tenant", "key"],
            ),
            rate_limited: vec(
                "key_limited_requests_total",
                "Requests a key's limits refused, by limit.",
                &["tenant", "key", "limit"],
            ),
        }
    }

    /// Records one admitted request that ended.
    pub fn record(&self, tenant: &str, key: &str, outcome: &str, prompt_tokens: u64, completion_tokens: u64) {
        self.requests.with_label_values(&[tenant, key, outcome]).inc();
        self.prompt_tokens.with_label_values(&[tenant, key]).inc_by(prompt_tokens);
        self.completion_tokens.with_label_values(&[tenant, key]).inc_by(completion_tokens);
    }

    /// Counts a request refused by the key's `limit`.
    pub fn limited(&self, tenant: &str, key: &str, limit: &str) {
        self.rate_limited.with_label_values(&[tenant, key, limit]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric, registered in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let per_model_histogram = |name: &str, help: &str, buckets: &[f64]| {
            let opts = HistogramOpts::new(format!("{PREFIX}{name}"), help).buckets(buckets.to_vec());
            register(&registry, HistogramVec::new(opts, &["model"]).expect("valid histogram options"))
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let counter =
                IntCounterVec::new(Opts::new(format!("{PREFIX}{name}"), help), labels).expect("valid counter options");
            register(&registry, counter)
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let gauge =
                IntGaugeVec::new(Opts::new(format!("{PREFIX}{name}"), help), labels).expect("valid gauge options");
            register(&registry, gauge)
        };
        let e2e_request_latency = HistogramOpts::new(
            format!("{PREFIX}e2e_request_latency_seconds"),
            "Time from a successful request's arrival to its end (last byte, or the client leaving a stream).",
        )
        .buckets(REQUEST_BUCKETS.to_vec());
        let e2e_request_latency =
            register(&registry, Histogram::with_opts(e2e_request_latency).expect("valid histogram options"));
        let pool_worker = &["model", "pool", "worker"];
        Self {
            time_to_first_token: per_model_histogram(
                "time_to_first_token_seconds",
                "Time from the request's arrival to its first generated token.",
                TTFT_BUCKETS,
            ),
            inter_token_latency: per_model_histogram(
                "inter_token_latency_seconds",
                "Time between successive token chunks of a request (one token each, normally).",
                ITL_BUCKETS,
            ),
            e2e_request_latency,
            queue_time: per_model_histogram(
                "queue_time_seconds",
                "Time an admitted request waited in the admission queue.",
                REQUEST_BUCKETS,
            ),
            requests: counter_vec(
                "requests_total",
                "Generation requests by endpoint and HTTP status code.",
                &["endpoint", "status"],
            ),
            prompt_tokens: counter_vec("prompt_tokens_total", "Prompt tokens of admitted requests.", &["model"]),
            generation_tokens: counter_vec("generation_tokens_total", "Generated tokens sent to clients.", &["model"]),
            prefix_cached_tokens: counter_vec(
                "prefix_cached_tokens_total",
                "Prompt tokens the prefill workers served from their prefix cache (disaggregated serving).",
                &["model"],
            ),
            hit_blocks: counter_vec(
                "prefix_hit_blocks_total",
                "Leading prompt blocks the chosen first-leg worker had cached, as the router's prefix index saw them.",
                &["model"],
            ),
            total_blocks: counter_vec(
                "prompt_blocks_total",
                "Full KV blocks of the prompts placed: the prefix hit rate's denominator.",
                &["model"],
            ),
            placements: counter_vec("placements_total", "Request legs placed, by pool and worker index.", pool_worker),
            structured_requests: counter_vec(
                "structured_output_requests_total",
                "Admitted requests held to a structured output, by kind (json, regex, choice, grammar).",
                &["model", "kind"],
            ),
            structured_compile: per_model_histogram(
                "structured_output_compile_seconds",
                "Time the router took to compile a request's structured output against the vocabulary.",
                COMPILE_BUCKETS,
            ),
            worker_up: gauge_vec(
                "worker_up",
                "1 while the worker's KV event stream is live and snapshotted.",
                pool_worker,
            ),
            worker_circuit_state: gauge_vec(
                "worker_circuit_state",
                "The worker's circuit breaker: 0 closed, 1 open (no requests), 2 half-open (one probe request).",
                pool_worker,
            ),
            worker_cached_blocks: gauge_vec(
                "worker_cached_blocks",
                "KV blocks the router's prefix index holds for the worker.",
                pool_worker,
            ),
            worker_pinned_blocks: gauge_vec(
                "worker_pinned_blocks",
                "KV blocks the worker holds for hand-offs not released yet, as it last reported.",
                pool_worker,
            ),
            admission_queue_depth: gauge_vec(
                "admission_queue_depth",
                "Requests waiting in the model's admission queue.",
                &["model"],
            ),
            inflight_requests: gauge_vec(
                "inflight_requests",
                "Admitted requests running, by worker index in the model's first-leg pool.",
                &["model", "worker"],
            ),
            tenants: TenantCounters::register(&registry),
            registry,
        }
    }

    /// The per-key counters.
    pub fn tenants(&self) -> TenantCounters {
        self.tenants.clone()
    }

    /// The placement and prefix-cache counters of the model named `model`,
    /// for its backend.
    pub fn placement(&self, model: ModelName) -> PlacementCounters {
        PlacementCounters {
            model,
            cached_tokens: self.prefix_cached_tokens.clone(),
            hit_blocks: self.hit_blocks.clone(),
            total_blocks: self.total_blocks.clone(),
            placements: self.placements.clone(),
        }
    }

    /// Records how long an admitted request for `model` waited for its slot.
    pub fn observe_queue_time(&self, model: &str, waited: Duration) {
        self.queue_time.with_label_values(&[model]).observe(waited.as_secs_f64());
    }

    /// Counts an admitted request for `model` held to a structured output of `kind`, and how long
    /// its compile took.
    pub fn count_structured_output(&self, model: &str, kind: &str, compile: Duration) {
        self.structured_requests.with_label_values(&[model, kind]).inc();
        self.structured_compile.with_label_values(&[model]).observe(compile.as_secs_f64());
    }

    /// Counts the prompt tokens of an admitted request for `model`.
    pub fn count_prompt_tokens(&self, model: &str, tokens: usize) {
        self.prompt_tokens.with_label_values(&[model]).inc_by(tokens as u64);
    }

    /// `tokens` of a request for `model`, observing the time to its first
    /// token (from `arrival`) and the time between later chunks as they go by.
    pub fn time_tokens(&self, model: &str, tokens: TokenStream, arrival: Instant) -> TokenStream {
        let (first, between) = (
            self.time_to_first_token.with_label_values(&[model]),
            self.inter_token_latency.with_label_values(&[model]),
        );
        let mut last: Option<Instant> = None;
        tokens
            .inspect(move |item| {
                // Errors and empty finish chunks carry no token to time.
                if !item.as_ref().is_ok_and(|chunk| !chunk.token_ids.is_empty()) {
                    return;
                }
                let now = Instant::now();
                match last {
                    None => first.observe((now - arrival).as_secs_f64()),
                    Some(previous) => between.observe((now - previous).as_secs_f64()),
                }
                last = Some(now);
            })
            .boxed()
    }

    /// `deltas` of a request for `model`, counting the generated tokens they
    /// carry: the same tokens the usage reports, and those of a stream cut
    /// short too.
    pub fn count_deltas(
        &self,
        model: &str,
        deltas: BoxStream<'static, Result<Delta, BackendError>>,
    ) -> BoxStream<'static, Result<Delta, BackendError>> {
        let generated = self.generation_tokens.with_label_values(&[model]);
        deltas
            .inspect(move |item| {
                if let Ok(delta) = item {
                    generated.inc_by(delta.token_ids.len() as u64);
                }
            })
            .boxed()
    }

    /// The Prometheus text exposition, with the admission and worker gauges
    /// set from `models` as they are now. Workers and models that went lose
    /// their series: the gauges start from none at each scrape.
    pub fn render(&self, models: &[ModelScrape]) -> Result<String, prometheus::Error> {
        for gauge in [
            &self.admission_queue_depth,
            &self.inflight_requests,
            &self.worker_up,
            &self.worker_cached_blocks,
            &self.worker_pinned_blocks,
            &self.worker_circuit_state,
        ] {
            gauge.reset();
        }
        for model in models {
            self.set_model_gauges(model);
        }
        let mut text = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut text)?;
        String::from_utf8(text).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }

    fn set_model_gauges(&self, model: &ModelScrape) {
        let (name, admission) = (model.name.as_str(), &model.admission);
        self.admission_queue_depth.with_label_values(&[name]).set(admission.queued as i64);
        for (worker, &running) in admission.in_flight.iter().enumerate() {
            if admission.active.get(worker) == Some(&true) || running > 0 {
                self.inflight_requests.with_label_values(&[name, &worker.to_string()]).set(running as i64);
            }
        }
        for ScrapedPool { pool, roster, index } in &model.pools {
            for worker in roster.active() {
                let state = roster.breaker(worker).circuit().gauge();
                self.worker_circuit_state.with_label_values(&[name, pool, &worker.to_string()]).set(state);
            }
            let Some(index) = index else { continue };
            for (worker, summary) in index.summary().iter().enumerate().filter(|(w, _)| roster.is_active(*w)) {
                let labels = [name, pool, &worker.to_string()];
                self.worker_up.with_label_values(&labels).set(summary.up.into());
                self.worker_cached_blocks.with_label_values(&labels).set(summary.cached_blocks as i64);
                self.worker_pinned_blocks.with_label_values(&labels).set(summary.pinned_blocks.into());
            }
        }
    }
}

/// Registers `collector` in `registry` and hands it back. Names are fixed and
/// distinct and the registry is fresh, so a failure is a bug.
fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    registry.register(Box::new(collector.clone())).expect("metric registered twice");
    collector
}

/// One request in flight: on drop, counts it under its status and, when it
/// succeeded, records its end-to-end latency. Living in the response body of
/// a stream, it sees the end of the stream however it comes, and as it drops
/// exactly once the request is counted exactly once.
#[derive(Debug)]
pub struct RequestGuard {
    metrics: Arc<Metrics>,
    endpoint: String,
    arrival: Instant,
    /// `None` until the handler answered.
    status: Option<StatusCode>,
}

impl RequestGuard {
    /// A request to `endpoint` arriving now.
    pub fn new(metrics: Arc<Metrics>, endpoint: String) -> Self {
        Self { metrics, endpoint, arrival: Instant::now(), status: None }
    }

    /// The status the request was answered with.
    pub fn set_status(&mut self, status: StatusCode) {
        self.status = Some(status);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let status = self.status.map_or_else(|| CLIENT_CLOSED.to_owned(), |s| s.as_u16().to_string());
        self.metrics.requests.with_label_values(&[self.endpoint.as_str(), status.as_str()]).inc();
        // Failures end early and would skew the latency of real work.
        if self.status.is_some_and(|s| s.is_success()) {
            self.metrics.e2e_request_latency.observe(self.arrival.elapsed().as_secs_f64());
        }
    }
}

/// Middleware for the generation routes: counts each request and times it
/// end to end through a [`RequestGuard`].
pub async fn track(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    // The route's pattern, not the raw path: bounded label values.
    let endpoint = request.extensions().get::<MatchedPath>().map_or("unknown", MatchedPath::as_str).to_owned();
    // Created before the handler runs, so a client leaving while queued
    // (the handler future dropped) is counted too.
    let mut guard = RequestGuard::new(metrics, endpoint);
    let response = next.run(request).await;
    guard.set_status(response.status());
    let streaming =
        response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streaming {
        // A JSON answer is complete once the handler returns: the guard drops here.
        return response;
    }
    // The stream goes on after the handler: the body carries the guard until
    // hyper drops it, at the end of the stream or when the client goes away.
    response.map(|body| {
        Body::from_stream(body.into_data_stream().map(move |frame| {
            let _alive = &guard;
            frame
        }))
    })
}

#[cfg(test)]
mod tests;

//! `router`: parse flags, set up tracing, bind, run until Ctrl-C or SIGTERM.

use std::num::NonZeroUsize;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use router::pd::KvFailurePolicy;
use router::placement::{self, CacheAwareConfig};
use tokio::net::TcpListener;

// A request is about two thousand small allocations (JSON values, token
// strings, stream chunks); mimalloc serves them with a quarter fewer
// instructions than glibc's allocator (callgrind, `pdserve-router-overhead`'s
// requests).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// OpenAI-compatible router in front of prefill and decode workers.
#[derive(Debug, Parser)]
#[command(name = "router", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on; 0 picks a free one.
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Prefill worker gRPC URL (repeatable); `NAME=URL` for the model served as NAME (several
    /// models at once, each with its own pools). A model without one is served colocated.
    #[arg(long = "prefill", value_name = "[NAME=]URL")]
    prefill: Vec<router::WorkerUrl>,
    /// Decode worker gRPC URL (repeatable; at least one per model unless `--etcd` finds them);
    /// `NAME=URL` as for `--prefill`.
    #[arg(long = "decode", value_name = "[NAME=]URL", required_unless_present = "etcd", conflicts_with = "etcd")]
    decode: Vec<router::WorkerUrl>,
    /// etcd client URLs (comma-separated or repeated): find the workers
    /// registered there instead of `--prefill` / `--decode`, following them
    /// as they come and go; each model is served under the name its workers
    /// register (their `--served-model-name`).
    #[arg(long, value_name = "URL", value_delimiter = ',', env = "PDSERVE_ETCD", conflicts_with = "prefill")]
    etcd: Vec<String>,
    /// Key prefix of the cluster in etcd (the workers' `--etcd-prefix`).
    #[arg(long, default_value = cluster::discovery::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// With `--etcd`: the most workers of one role the router places at once.
    #[arg(long, default_value_t = router::DEFAULT_MAX_WORKERS_PER_POOL,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    max_workers_per_pool: usize,
    /// With `--etcd`: ignore prefill workers and serve colocated (decode
    /// workers prefill themselves).
    #[arg(long, requires = "etcd")]
    colocated: bool,
    /// Seconds running requests may take to finish once the router is asked
    /// to stop (SIGTERM); new requests are refused meanwhile.
    #[arg(long, default_value_t = 30)]
    shutdown_grace_secs: u64,
    /// Model name clients use for the workers given without `NAME=`; defaults to the model
    /// card's name. With `--etcd`, give it to the workers instead.
    #[arg(long, conflicts_with = "etcd")]
    served_model_name: Option<String>,
    /// Seconds to wait at start-up for a worker to return the model card.
    #[arg(long, default_value_t = 120)]
    model_card_timeout_secs: u64,
    /// A Jinja chat template to serve every model with instead of its own, as vLLM's
    /// `--chat-template`: a file, or the template itself (text with a `{`).
    #[arg(long, value_parser = chat_template)]
    chat_template: Option<String>,
    /// Requests running at once on each worker of a request's first leg (prefill, or decode when
    /// colocated); more wait in the admission queue, lowest `priority` first.
    #[arg(long, default_value_t = router::admission::DEFAULT_MAX_INFLIGHT_PER_WORKER,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_inflight_per_worker: usize,
    /// Requests that may wait for a slot; past this a request gets 429 with `Retry-After`.
    #[arg(long, default_value_t = router::admission::DEFAULT_MAX_QUEUED_REQUESTS)]
    max_queued_requests: usize,
    /// How requests are placed: by cached prefix and load (following each worker's KV event
    /// stream), or in turn.
    #[arg(long, value_enum, default_value_t = PolicyArg::CacheAware)]
    policy: PolicyArg,
    /// Cache-aware cost: prefill tokens each request already running on a worker is worth.
    #[arg(long, default_value_t = placement::DEFAULT_LOAD_WEIGHT_TOKENS)]
    load_weight_tokens: usize,
    /// Cache-aware guard: a worker running more than this many requests beyond the least busy
    /// one is not chosen for its cache.
    #[arg(long, default_value_t = placement::DEFAULT_MAX_IMBALANCE)]
    max_load_imbalance: usize,
    /// Disaggregated requests with at most this many prompt tokens uncached on their decode
    /// worker skip the hand-off and prefill there; 0 always hands off.
    #[arg(long, default_value_t = placement::DEFAULT_LOCAL_PREFILL_MAX_TOKENS)]
    local_prefill_max_tokens: usize,
    /// When a decode worker cannot get a prompt's KV from its prefill worker (which died, stalled
    /// or sent corrupt blocks): `recompute` has the decode worker compute the prompt and go on
    /// (requests with n = 1; others fail), `fail` ends the stream with an error.
    #[arg(long, value_enum, default_value_t = KvFailureArg::Recompute)]
    kv_transfer_failure: KvFailureArg,
    /// API keys and tenants (TOML; keys kept as SHA-256 digests, see
    /// `router/src/tenancy/keys.rs`). Without it the API is open.
    #[arg(long, value_name = "PATH", env = "PDSERVE_API_KEYS")]
    api_keys: Option<std::path::PathBuf>,
    /// Follow the keys file stored in etcd at `<etcd-prefix>/api-keys` (same
    /// format as `--api-keys`), taking each new version as it is written; no
    /// request is let in until the first one is read.
    #[arg(long, requires = "etcd", conflicts_with = "api_keys")]
    api_keys_from_etcd: bool,
    /// Append one JSON line per finished request (tenant, key, tokens, outcome) to this file.
    #[arg(long, value_name = "PATH")]
    usage_log: Option<std::path::PathBuf>,
    /// The largest request body accepted; larger ones get 413.
    #[arg(long, default_value_t = router::http::state::DEFAULT_MAX_BODY_BYTES,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_request_body_bytes: usize,
    /// Threads serving HTTP, each with its own event loop and its own connections to the
    /// workers, so a request never changes thread (vLLM's `--api-server-count` in spirit);
    /// default: one per core.
    #[arg(long, value_name = "N")]
    http_threads: Option<NonZeroUsize>,
}

/// `--kv-transfer-failure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KvFailureArg {
    Recompute,
    Fail,
}

/// `--chat-template`: the file's text, else the argument itself when it reads as a template.
fn chat_template(arg: &str) -> Result<String, String> {
    match std::fs::read_to_string(arg) {
        Ok(text) => Ok(text),
        Err(_) if arg.contains('{') => Ok(arg.to_owned()),
        Err(e) => Err(format!("{arg}: {e} (give a template file, or the template itself)")),
    }
}

/// `--policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PolicyArg {
    CacheAware,
    RoundRobin,
}

// This runtime keeps the background work (card loading, discovery, KV event streams, telemetry);
// requests are served on `--http-threads` threads of their own.
#[tokio::main(worker_threads = 1)]
async fn main() {
    let args: Args = cluster::cli::parse("router");
    let telemetry = cluster::telemetry::init("router");
    let served = serve(args).await;
    // Flushed before a failure exits the process, so its last spans are exported too.
    drop(telemetry);
    cluster::cli::exit_on_error("router", served);
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let config = router::Config {
        prefill: args.prefill,
        decode: args.decode,
        discovery: (!args.etcd.is_empty()).then_some(router::Discovery {
            etcd: cluster::discovery::EtcdConfig { endpoints: args.etcd, prefix: args.etcd_prefix },
            max_workers_per_pool: args.max_workers_per_pool,
            colocated: args.colocated,
        }),
        shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
        served_model_name: args.served_model_name,
        model_card_timeout: Duration::from_secs(args.model_card_timeout_secs),
        chat_template: args.chat_template,
        admission: router::admission::AdmissionConfig {
            max_inflight_per_worker: args.max_inflight_per_worker,
            max_queued: args.max_queued_requests,
        },
        policy: match args.policy {
            PolicyArg::CacheAware => router::Policy::CacheAware(CacheAwareConfig {
                load_weight_tokens: args.load_weight_tokens,
                max_imbalance: args.max_load_imbalance,
                local_prefill_max_tokens: args.local_prefill_max_tokens,
            }),
            PolicyArg::RoundRobin => router::Policy::RoundRobin,
        },
        on_kv_failure: match args.kv_transfer_failure {
            KvFailureArg::Recompute => KvFailurePolicy::Recompute,
            KvFailureArg::Fail => KvFailurePolicy::Fail,
        },
        http_threads: Some(
            args.http_threads.unwrap_or_else(|| std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)),
        ),
        tenancy: router::Tenancy::open(
            args.api_keys.as_deref(),
            args.api_keys_from_etcd,
            args.usage_log.as_deref(),
            args.max_request_body_bytes,
        )?,
    };
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    // Tests and scripts wait for this exact line on stdout.
    println!("router listening on http://{addr}");
    tracing::info!(%addr, "router listening");
    router::run(listener, config, cluster::shutdown::signal()).await?;
    tracing::info!("router stopped");
    Ok(())
}

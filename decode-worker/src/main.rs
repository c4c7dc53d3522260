//! The decode worker: pulls a prompt's KV from a prefill worker (or prefills
//! locally) and streams the generated tokens.

mod mock_http;
mod service;

use anyhow::Context;
use kv_transfer::{KvPuller, PullerConfig, TransportPolicy};
use proto::worker::{decode_server::DecodeServer, worker_server::WorkerServer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use worker::discovery::{DiscoveryArgs, Role};
use worker::lifecycle::{start_face, Launch, LifecycleArgs};
use worker::{load_engine, EngineArgs, WorkerService};

#[derive(Debug, clap::Parser)]
#[command(name = "decode-worker", about = "Decode worker: token generation from handed-off or local KV")]
struct Args {
    /// Address of the gRPC server.
    #[arg(long, default_value = "127.0.0.1:7002")]
    listen: SocketAddr,
    /// How KV comes from prefill workers: `auto` maps a same-host prefill
    /// worker's KV cache and copies from it, TCP otherwise; `tcp` always
    /// uses TCP.
    #[arg(long, default_value = "auto", value_parser = parse_transport)]
    kv_transport: TransportPolicy,
    /// Do not ask for and verify a checksum of each KV transfer.
    #[arg(long)]
    no_kv_checksum: bool,
    /// Milliseconds a KV pull may wait on a silent prefill worker (for any
    /// answer, or for 4 MiB of blocks) before the request fails.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    kv_stall_timeout_ms: u64,
    /// Start decoding a handed-off prompt while its KV is still arriving:
    /// each layer of the first step waits for its own KV (per-layer
    /// streaming). Used only when the engine is otherwise idle, so a slow
    /// pull never stalls running sequences; a busy engine admits the request
    /// once its KV has landed, as without the flag.
    #[arg(long)]
    kv_layer_streaming: bool,
    /// For benchmarks only: stream `max_tokens` of a fixed token at once,
    /// without loading the weights (the model's tokenizer and chat template
    /// are still read, for the model card).
    #[arg(long)]
    mock: bool,
    /// With `--mock`: also serve an OpenAI HTTP face (`/v1/chat/completions`,
    /// `/v1/completions`, `/v1/models`, `/health`) on this address, the
    /// direct baseline of benchmarks and the worker of HTTP gateways.
    #[arg(long, value_name = "ADDR", requires = "mock")]
    mock_http_listen: Option<SocketAddr>,
    /// With `--mock`: answer colocated requests with this text (tokenized),
    /// then stop; for client tests that need a known answer, e.g. a tool call.
    #[arg(long, value_name = "TEXT", requires = "mock")]
    mock_reply: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    discovery: DiscoveryArgs,
    #[command(flatten)]
    lifecycle: LifecycleArgs,
}

#[tokio::main]
async fn main() {
    let args: Args = cluster::cli::parse("decode-worker");
    let telemetry = cluster::telemetry::init("decode-worker");
    let served = serve(args).await;
    // Flushed before a failure exits the process, so its last spans are exported too.
    drop(telemetry);
    cluster::cli::exit_on_error("decode-worker", served);
}

async fn serve(args: Args) -> anyhow::Result<()> {
    if args.mock {
        return serve_mock(args).await;
    }
    let loaded = load_engine(&args.engine)?;
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding gRPC on {}", args.listen))?;
    let pullers: Vec<_> = (0..loaded.engine.tp_size())
        .map(|rank| {
            Arc::new(KvPuller::new(PullerConfig {
                layout: worker::blocks::kv_layout(&loaded.engine, rank, loaded.draft),
                transport: args.kv_transport,
                checksum: !args.no_kv_checksum,
                idle_timeout: Duration::from_millis(args.kv_stall_timeout_ms),
            }))
        })
        .collect();
    let face = start_face(&args.lifecycle, Role::Decode, Some((loaded.engine.clone(), &loaded.grammars))).await?;
    let worker = WorkerService::new(loaded.card.clone(), loaded.engine.clone(), None).with_pullers(pullers.clone());
    let launch = Launch {
        name: "decode-worker",
        role: Role::Decode,
        card: loaded.card.clone(),
        tensor_parallel_size: loaded.engine.tp_size(),
        listener,
        kv: vec![],
        detail: String::new(),
        face,
        kv_events: worker.kv_events().clone(),
    };
    let decode = service::DecodeService::new(loaded.engine, pullers, loaded.vocab_size, loaded.grammars)
        .with_layer_streaming(args.kv_layer_streaming);
    let services = tonic::transport::Server::builder()
        .add_service(WorkerServer::new(worker))
        .add_service(DecodeServer::new(decode));
    launch.serve(&args.discovery, &args.lifecycle, services).await
}

/// `--mock`: the same gRPC services, answered without a model, and the
/// optional OpenAI HTTP face.
async fn serve_mock(args: Args) -> anyhow::Result<()> {
    let mut model = worker::mock::MockModel::load(&args.engine)?;
    if let Some(reply) = &args.mock_reply {
        model = model.with_reply(&args.engine, reply)?;
    }
    if let Some(http) = args.mock_http_listen {
        let listener = TcpListener::bind(http).await.with_context(|| format!("binding HTTP on {http}"))?;
        // Before the gRPC line: whoever waits for that one has this one already.
        println!("decode-worker mock HTTP face on http://{}", listener.local_addr()?);
        let model = model.clone();
        tokio::spawn(async move {
            if let Err(e) = mock_http::serve(listener, &model).await {
                tracing::error!("mock HTTP face stopped: {e:#}");
            }
        });
    }
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding gRPC on {}", args.listen))?;
    let worker = worker::mock::MockWorker::new(model.card.clone());
    let launch = Launch {
        name: "decode-worker",
        role: Role::Decode,
        card: model.card.clone(),
        tensor_parallel_size: 1,
        listener,
        kv: vec![],
        detail: " (mock: no model)".into(),
        face: start_face(&args.lifecycle, Role::Decode, None).await?,
        kv_events: worker.kv_events().clone(),
    };
    let decode = worker::mock::MockDecode::new(&model);
    let services = tonic::transport::Server::builder()
        .add_service(WorkerServer::new(worker))
        .add_service(DecodeServer::new(decode));
    launch.serve(&args.discovery, &args.lifecycle, services).await
}

/// Parses `--kv-transport`.
fn parse_transport(text: &str) -> Result<TransportPolicy, String> {
    match text {
        "auto" => Ok(TransportPolicy::Auto),
        "tcp" => Ok(TransportPolicy::Tcp),
        other => Err(format!("{other:?} is not a KV transport (auto or tcp)")),
    }
}

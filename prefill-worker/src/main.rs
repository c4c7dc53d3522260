//! The prefill worker: runs prompts, samples the first token, and pins the
//! prompt's KV blocks for a decode worker to pull.

mod service;

use anyhow::Context;
use kv_transfer::{ConnectorConfig, KvConnectors};
use proto::worker::{prefill_server::PrefillServer, worker_server::WorkerServer};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use worker::blocks::EngineBlocks;
use worker::discovery::{DiscoveryArgs, Role};
use worker::lifecycle::{start_face, Launch, LifecycleArgs};
use worker::{load_engine, EngineArgs, WorkerService};

#[derive(Debug, clap::Parser)]
#[command(name = "prefill-worker", about = "Prefill worker: prompt processing and KV hand-off")]
struct Args {
    /// Address of the gRPC server.
    #[arg(long, default_value = "127.0.0.1:7001")]
    listen: SocketAddr,
    /// Address of the kv-transfer server (port 0 picks a free one). With
    /// `--tensor-parallel-size N`, rank `r` serves its heads on port + `r`
    /// (each on a free port with 0).
    #[arg(long, default_value = "127.0.0.1:0")]
    kv_listen: SocketAddr,
    /// Host decode workers reach the kv-transfer server at; defaults to
    /// `--advertise-host`, else the `--kv-listen` IP.
    #[arg(long)]
    kv_advertise_host: Option<String>,
    /// Milliseconds a pinned hand-off lives without a pull or a renewal
    /// before its blocks are freed: what a decode worker that dies mid-pull
    /// costs at most.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(100..))]
    kv_lease_ms: u64,
    /// Do not offer same-host decode workers the shared mapping of the KV
    /// cache; every pull then goes over TCP.
    #[arg(long)]
    no_kv_shared_memory: bool,
    /// Identifies this engine in `remote_engine_id`; a fresh id by default.
    #[arg(long)]
    engine_id: Option<String>,
    /// For benchmarks only: answer at once with a fixed token and a fake KV
    /// hand-off, without loading the weights (the model's tokenizer and chat
    /// template are still read, for the model card). No kv-transfer server.
    #[arg(long)]
    mock: bool,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    discovery: DiscoveryArgs,
    #[command(flatten)]
    lifecycle: LifecycleArgs,
}

#[tokio::main]
async fn main() {
    let args: Args = cluster::cli::parse("prefill-worker");
    let telemetry = cluster::telemetry::init("prefill-worker");
    let served = serve(args).await;
    // Flushed before a failure exits the process, so its last spans are exported too.
    drop(telemetry);
    cluster::cli::exit_on_error("prefill-worker", served);
}

async fn serve(args: Args) -> anyhow::Result<()> {
    if args.mock {
        return serve_mock(args).await;
    }
    let loaded = load_engine(&args.engine)?;
    let mut kv_listeners = Vec::new();
    for rank in 0..loaded.engine.tp_size() {
        let port = match args.kv_listen.port() {
            0 => Some(0),
            port => u16::try_from(rank).ok().and_then(|r| port.checked_add(r)),
        };
        let port = port.with_context(|| format!("--kv-listen {}: no port for rank {rank}", args.kv_listen))?;
        let addr = SocketAddr::new(args.kv_listen.ip(), port);
        kv_listeners.push(TcpListener::bind(addr).await.with_context(|| format!("binding kv-transfer on {addr}"))?);
    }
    let engine_id = args.engine_id.unwrap_or_else(|| format!("prefill-{}", uuid::Uuid::new_v4()));
    let config = ConnectorConfig {
        engine_id,
        advertise_host: match args.kv_advertise_host.clone().or_else(|| args.discovery.advertise_host.clone()) {
            Some(host) => host,
            None => args.kv_listen.ip().to_string(),
        },
        lease: Duration::from_millis(args.kv_lease_ms),
        shared_memory: !args.no_kv_shared_memory,
    };
    let kv_host = config.advertise_host.clone();
    let connector = KvConnectors::start(kv_listeners, config, EngineBlocks::ranks(&loaded.engine, loaded.draft))?;
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding gRPC on {}", args.listen))?;
    let face = start_face(&args.lifecycle, Role::Prefill, Some((loaded.engine.clone(), &loaded.grammars))).await?;
    let worker = WorkerService::new(loaded.card.clone(), loaded.engine.clone(), Some(connector.clone()));
    let max_model_len = loaded.card.context_length as usize;
    let launch = Launch {
        name: "prefill-worker",
        role: Role::Prefill,
        card: loaded.card.clone(),
        tensor_parallel_size: loaded.engine.tp_size(),
        listener,
        kv: connector.ports().iter().map(|port| format!("{kv_host}:{port}")).collect(),
        detail: format!(" (kv-transfer port {})", connector.port()),
        face,
        kv_events: worker.kv_events().clone(),
    };
    let prefill =
        service::PrefillService::new(loaded.engine, connector, loaded.vocab_size, max_model_len, loaded.grammars);
    let services = tonic::transport::Server::builder()
        .add_service(WorkerServer::new(worker))
        .add_service(PrefillServer::new(prefill));
    launch.serve(&args.discovery, &args.lifecycle, services).await
}

/// `--mock`: the same gRPC services, answered without a model.
async fn serve_mock(args: Args) -> anyhow::Result<()> {
    let model = worker::mock::MockModel::load(&args.engine)?;
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding gRPC on {}", args.listen))?;
    let engine_id = args.engine_id.unwrap_or_else(|| format!("mock-prefill-{}", uuid::Uuid::new_v4()));
    let worker = worker::mock::MockWorker::new(model.card.clone());
    let launch = Launch {
        name: "prefill-worker",
        role: Role::Prefill,
        card: model.card.clone(),
        tensor_parallel_size: 1,
        listener,
        kv: vec![],
        detail: " (mock: no model)".into(),
        face: start_face(&args.lifecycle, Role::Prefill, None).await?,
        kv_events: worker.kv_events().clone(),
    };
    let prefill = worker::mock::MockPrefill::new(&model, engine_id);
    let services = tonic::transport::Server::builder()
        .add_service(WorkerServer::new(worker))
        .add_service(PrefillServer::new(prefill));
    launch.serve(&args.discovery, &args.lifecycle, services).await
}

//! The decode worker: pulls a prompt's KV from a prefill worker (or prefills
//! locally) and streams the generated tokens.

mod service;

use anyhow::Context;
use proto::worker::{decode_server::DecodeServer, worker_server::WorkerServer};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use worker::{load_engine, EngineArgs, WorkerService};

#[derive(Debug, clap::Parser)]
#[command(name = "decode-worker", about = "Decode worker: token generation from handed-off or local KV")]
struct Args {
    /// Address of the gRPC server.
    #[arg(long, default_value = "127.0.0.1:7002")]
    listen: SocketAddr,
    /// Seconds a KV pull from a prefill worker may take before the request fails.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    kv_pull_timeout_secs: u64,
    #[command(flatten)]
    engine: EngineArgs,
}

#[tokio::main]
async fn main() {
    let args: Args = cluster::cli::parse("decode-worker");
    cluster::telemetry::init();
    cluster::cli::exit_on_error("decode-worker", serve(args).await);
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let loaded = load_engine(&args.engine)?;
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding gRPC on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let worker = WorkerService::new(loaded.card.clone(), loaded.engine.clone(), None);
    let decode =
        service::DecodeService::new(loaded.engine, loaded.vocab_size, Duration::from_secs(args.kv_pull_timeout_secs));
    // Tests and the launcher wait for this line.
    println!("decode-worker listening on http://{addr}");
    // The server drains open streams before it stops; KV event streams never
    // end on their own, so they are ended first.
    let kv_events = worker.kv_events().clone();
    let shutdown = async move {
        cluster::shutdown::signal().await;
        kv_events.shutdown();
    };
    tonic::transport::Server::builder()
        .add_service(WorkerServer::new(worker))
        .add_service(DecodeServer::new(decode))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

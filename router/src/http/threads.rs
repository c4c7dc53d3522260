//! Serving HTTP from threads of their own, each with a single-threaded event loop (Envoy's and
//! nginx's worker model).
//!
//! On a work-stealing runtime a request hops between threads: the connection's task wakes
//! another worker to run the gRPC channel's task, the answer wakes the first one again, and each
//! wake-up of an idle core is tens of microseconds. Here a connection, its requests, their gRPC
//! channels to the workers (one per thread, see `pd::grpc`) and their streams all stay on the
//! thread that accepted it: every hop is a task switch, not a thread wake-up. The threads accept
//! from one listening socket, so an idle thread takes the next connection first.
//!
//! What is shared (served models, admission, placement, metrics) is `Sync` and runtime-agnostic;
//! the caller's runtime keeps the background work (card loading, discovery, KV event streams).

use std::future::Future;
use std::io;
use std::num::NonZeroUsize;
use std::pin::Pin;

use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

/// Serves `app` on `listener` until `shutdown` is set, then lets running requests finish (the
/// caller bounds how long). `None` serves on the caller's runtime; `Some(n)` on `n` threads of
/// its own.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    threads: Option<NonZeroUsize>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let Some(threads) = threads else {
        return serve_one(listener, app, shutdown).await;
    };
    let listener = listener.into_std()?;
    let mut ended = Vec::with_capacity(threads.get());
    for index in 0..threads.get() {
        let (listener, app, shutdown) = (listener.try_clone()?, app.clone(), shutdown.clone());
        let (tx, rx) = oneshot::channel();
        let thread = std::thread::Builder::new().name(format!("http-{index}")).spawn(move || {
            let served = tokio::runtime::Builder::new_current_thread().enable_all().build().and_then(|runtime| {
                runtime.block_on(async { serve_one(TcpListener::from_std(listener)?, app, shutdown).await })
            });
            let _ = tx.send(served);
        })?;
        ended.push(thread_end(rx, thread));
    }
    // Every thread ends at the shutdown; the first to fail stops the router.
    let mut ended = futures::future::select_all(ended);
    loop {
        let (served, _, rest) = ended.await;
        served?;
        if rest.is_empty() {
            return Ok(());
        }
        ended = futures::future::select_all(rest);
    }
}

/// A serving thread's result once the thread is gone; a thread that panicked is an error.
fn thread_end(
    ended: oneshot::Receiver<io::Result<()>>,
    thread: std::thread::JoinHandle<()>,
) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send>> {
    Box::pin(async move {
        let served = ended.await.unwrap_or_else(|_| Err(io::Error::other("an HTTP thread panicked")));
        // It has sent its result: what is left is its exit.
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        served
    })
}

/// One event loop's share of the connections.
async fn serve_one(listener: TcpListener, app: Router, mut shutdown: watch::Receiver<bool>) -> io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        // Tokens are small writes; Nagle would delay each SSE event.
        let _ = tcp.set_nodelay(true);
    });
    let stop = async move {
        let _ = shutdown.wait_for(|&stop| stop).await;
    };
    axum::serve(listener, app).with_graceful_shutdown(stop).await
}

//! The prefill side of the hand-off: pins a finished prompt's blocks under a
//! timeout and serves them to the decode worker that pulls them.
//!
//! A pin lives until the puller releases it, the router gives it up
//! ([`KvConnector::release`]), or its timeout passes; in each case the blocks
//! go back to the engine exactly once.

use crate::frame::{read_frame, write_frame};
use crate::layout::KvLayout;
use crate::params::RemotePrefill;
use proto::kv::{frame::Kind, pull_response, Frame, PullRequest, PullResponse, ReleaseResponse};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

/// Where the connector reads pinned blocks from and gives them back to: the
/// engine.
pub trait BlockSource: Send + Sync + 'static {
    /// The layout of the engine's blocks.
    fn layout(&self) -> KvLayout;
    /// Appends the blocks, in the hand-off format, to `out`. May block while
    /// the engine is mid-step.
    fn read_blocks(&self, ids: &[u32], out: &mut Vec<u8>) -> Result<(), String>;
    /// Returns pinned blocks to the engine's free pool.
    fn release_blocks(&self, ids: &[u32]);
}

/// Pinned hand-offs at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PinStats {
    pub requests: usize,
    pub blocks: usize,
}

struct Pin {
    block_ids: Vec<u32>,
    expires: Instant,
}

struct Inner {
    engine_id: String,
    advertise_host: String,
    port: u16,
    tp_size: u32,
    source: Arc<dyn BlockSource>,
    pin_timeout: Duration,
    // A std mutex: no await while held, and every critical section is a map operation.
    pins: Mutex<HashMap<String, Pin>>,
}

/// The prefill worker's KV server and pin table. Cheap to clone.
#[derive(Clone)]
pub struct KvConnector {
    inner: Arc<Inner>,
}

/// How a [`KvConnector`] is set up.
pub struct ConnectorConfig {
    /// Identifies this engine instance in `remote_engine_id`.
    pub engine_id: String,
    /// The host decode workers connect to (put in `remote_host`).
    pub advertise_host: String,
    /// Pins nobody pulls or releases are freed after this long.
    pub pin_timeout: Duration,
}

impl KvConnector {
    /// Serves pulls on `listener` and starts the expiry reaper.
    pub fn start(
        listener: TcpListener,
        config: ConnectorConfig,
        source: Arc<dyn BlockSource>,
    ) -> std::io::Result<Self> {
        let port = listener.local_addr()?.port();
        let tp_size = source.layout().tp_size;
        let inner = Arc::new(Inner {
            engine_id: config.engine_id,
            advertise_host: config.advertise_host,
            port,
            tp_size,
            source,
            pin_timeout: config.pin_timeout,
            pins: Mutex::new(HashMap::new()),
        });
        tokio::spawn(accept_loop(listener, Arc::clone(&inner)));
        tokio::spawn(reap_loop(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// The port the KV server listens on.
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// Pins `block_ids` for `request_id` and returns the params a decode
    /// worker needs to pull them.
    pub fn pin(&self, request_id: &str, block_ids: Vec<u32>, num_tokens: u32) -> RemotePrefill {
        let inner = &self.inner;
        let remote = RemotePrefill {
            remote_engine_id: inner.engine_id.clone(),
            remote_block_ids: block_ids.clone(),
            remote_host: inner.advertise_host.clone(),
            remote_port: inner.port,
            tp_size: inner.tp_size,
            remote_request_id: request_id.to_string(),
            num_tokens,
        };
        let old = inner
            .pins
            .lock()
            .expect("pin table poisoned")
            .insert(request_id.to_string(), Pin { block_ids, expires: Instant::now() + inner.pin_timeout });
        if let Some(old) = old {
            // A request id reused while its previous pin is live: never leak the old blocks.
            warn!(request_id, "replacing a live pin");
            inner.source.release_blocks(&old.block_ids);
        }
        remote
    }

    /// Frees a pin at once; false when there was none (already pulled or expired).
    pub fn release(&self, request_id: &str) -> bool {
        self.inner.release(request_id)
    }

    /// Pinned requests and blocks right now.
    pub fn stats(&self) -> PinStats {
        let pins = self.inner.pins.lock().expect("pin table poisoned");
        PinStats { requests: pins.len(), blocks: pins.values().map(|p| p.block_ids.len()).sum() }
    }
}

impl Inner {
    fn release(&self, request_id: &str) -> bool {
        let pin = self.pins.lock().expect("pin table poisoned").remove(request_id);
        match pin {
            Some(pin) => {
                self.source.release_blocks(&pin.block_ids);
                debug!(request_id, blocks = pin.block_ids.len(), "released pinned KV");
                true
            }
            None => false,
        }
    }

    /// Checks a pull against the pin table and extends the pin while it is served.
    fn admit_pull(&self, req: &PullRequest) -> Result<(), String> {
        if req.engine_id != self.engine_id {
            return Err(format!("engine id {:?} is not this engine ({:?})", req.engine_id, self.engine_id));
        }
        let theirs = req.layout.ok_or("pull without a KV layout")?;
        let theirs = KvLayout::try_from(theirs).map_err(|e| e.to_string())?;
        self.source.layout().check_compatible(&theirs).map_err(|e| e.to_string())?;
        let mut pins = self.pins.lock().expect("pin table poisoned");
        let pin = pins
            .get_mut(&req.request_id)
            .ok_or_else(|| format!("no pinned KV for request {:?} (expired or released)", req.request_id))?;
        if pin.block_ids != req.block_ids {
            return Err(format!(
                "request {:?} pinned blocks {:?}, pull asked for {:?}",
                req.request_id, pin.block_ids, req.block_ids
            ));
        }
        pin.expires = Instant::now() + self.pin_timeout;
        Ok(())
    }

    fn reap_expired(&self) {
        let now = Instant::now();
        let expired: Vec<(String, Pin)> = {
            let mut pins = self.pins.lock().expect("pin table poisoned");
            let ids: Vec<String> = pins.iter().filter(|(_, p)| p.expires <= now).map(|(id, _)| id.clone()).collect();
            ids.into_iter().filter_map(|id| pins.remove(&id).map(|p| (id, p))).collect()
        };
        for (request_id, pin) in expired {
            info!(request_id, blocks = pin.block_ids.len(), "pinned KV expired unpulled; releasing");
            self.source.release_blocks(&pin.block_ids);
        }
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let inner = Arc::clone(&inner);
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(stream, &inner).await {
                        debug!(%peer, error = %e, "kv-transfer connection ended with an error");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "kv-transfer accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn reap_loop(inner: std::sync::Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        match inner.upgrade() {
            Some(inner) => inner.reap_expired(),
            None => return,
        }
    }
}

async fn serve_connection(mut stream: TcpStream, inner: &Arc<Inner>) -> std::io::Result<()> {
    let _peer: Option<SocketAddr> = stream.peer_addr().ok();
    while let Some(frame) = read_frame(&mut stream).await? {
        match frame.kind {
            Some(Kind::Pull(req)) => serve_pull(&mut stream, inner, req).await?,
            Some(Kind::Release(req)) => {
                let released = req.engine_id == inner.engine_id && inner.release(&req.request_id);
                let answer = Frame { kind: Some(Kind::ReleaseResponse(ReleaseResponse { released })) };
                write_frame(&mut stream, &answer).await?;
            }
            _ => {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected frame from a puller"));
            }
        }
    }
    Ok(())
}

async fn serve_pull(stream: &mut TcpStream, inner: &Arc<Inner>, req: PullRequest) -> std::io::Result<()> {
    let read = match inner.admit_pull(&req) {
        Ok(()) => {
            let source = Arc::clone(&inner.source);
            let ids = req.block_ids.clone();
            // The engine may hold its cache lock for a whole step: read off the async runtime.
            tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                source.read_blocks(&ids, &mut out).map(|()| out)
            })
            .await
            .unwrap_or_else(|e| Err(format!("block read panicked: {e}")))
        }
        Err(e) => Err(e),
    };
    match read {
        Ok(bytes) => {
            let header = PullResponse { result: Some(pull_response::Result::NumBytes(bytes.len() as u64)) };
            write_frame(stream, &Frame { kind: Some(Kind::PullResponse(header)) }).await?;
            stream.write_all(&bytes).await?;
            stream.flush().await?;
            debug!(request_id = req.request_id, bytes = bytes.len(), "served KV pull");
        }
        Err(message) => {
            warn!(request_id = req.request_id, %message, "refused KV pull");
            let header = PullResponse { result: Some(pull_response::Result::Error(message)) };
            write_frame(stream, &Frame { kind: Some(Kind::PullResponse(header)) }).await?;
        }
    }
    Ok(())
}

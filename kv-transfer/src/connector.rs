//! The prefill side of the hand-off: pins a finished prompt's blocks under a
//! lease and serves them to the decode ranks that pull them.
//!
//! A pin lives until the puller releases it, the router gives it up
//! ([`KvConnector::release`]), or its lease runs out without a pull or a
//! renewal; in each case the blocks go back to the engine exactly once. A
//! lease is seconds long: a decode rank that dies mid-pull costs its blocks
//! for at most that long.

use crate::checksum::Checksum;
use crate::frame::{read_frame, write_frame};
use crate::layout::KvLayout;
use crate::memory::{walk, KvMemory, PieceShape};
use crate::params::RemotePrefill;
use crate::shm;
use proto::kv::{
    frame::Kind, hello_ack, pull_response, Accepted, Frame, HelloAck, PullDone, PullRequest, PullResponse,
    ReleaseResponse, Transport,
};
use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn, Instrument};

/// Where the connector reads pinned blocks from and gives them back to: the
/// engine (one rank of it).
pub trait BlockSource: Send + Sync + 'static {
    /// The layout of this rank's blocks.
    fn layout(&self) -> KvLayout;
    /// This rank's KV memory, in the paged layout.
    fn memory(&self) -> KvMemory;
    /// Returns pinned blocks to the engine's free pool.
    fn release_blocks(&self, ids: &[u32]);
}

/// Pinned hand-offs at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PinStats {
    pub requests: usize,
    pub blocks: usize,
}

/// How a connector identifies itself and how long pins live.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// Unique per engine instance, so a pull never reaches a restarted engine's blocks.
    pub engine_id: String,
    /// The host decode workers dial.
    pub advertise_host: String,
    /// How long a pin lives without a pull or renewal.
    pub lease: Duration,
    /// Offer same-host pullers the shared mapping of the KV memory.
    pub shared_memory: bool,
}

struct Pin {
    block_ids: Vec<u32>,
    expires: Instant,
}

struct Inner {
    config: ConnectorConfig,
    port: u16,
    source: Arc<dyn BlockSource>,
    memory: KvMemory,
    layout: KvLayout,
    pins: Mutex<HashMap<String, Pin>>,
}

/// The prefill side of kv-transfer: a pin table and a KV server.
#[derive(Clone)]
pub struct KvConnector {
    inner: Arc<Inner>,
}

impl KvConnector {
    /// Serves pulls on `listener` from `source`'s memory.
    pub fn start(
        listener: TcpListener,
        config: ConnectorConfig,
        source: Arc<dyn BlockSource>,
    ) -> std::io::Result<Self> {
        let port = listener.local_addr()?.port();
        let layout = source.layout();
        let memory = source.memory();
        let inner = Arc::new(Inner { config, port, source, memory, layout, pins: Mutex::new(HashMap::new()) });
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
            remote_engine_id: inner.config.engine_id.clone(),
            remote_block_ids: block_ids.clone(),
            remote_host: inner.config.advertise_host.clone(),
            remote_port: inner.port,
            tp_size: inner.layout.tp_size,
            remote_request_id: request_id.to_string(),
            num_tokens,
            lease_ms: inner.config.lease.as_millis() as u64,
            remote_ports: Vec::new(),
        };
        let pin = Pin { block_ids, expires: Instant::now() + inner.config.lease };
        let old = inner.pins.lock().expect("pin table poisoned").insert(request_id.to_string(), pin);
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

/// The KV servers of every tensor-parallel rank of one prefill engine, each
/// on its own port and serving its rank's heads. A pin covers the same block
/// ids on every rank; each rank's [`BlockSource`] hears its own release, so
/// the engine frees the blocks once every rank has (see the worker's blocks).
#[derive(Clone)]
pub struct KvConnectors {
    ranks: Vec<KvConnector>,
}

impl KvConnectors {
    /// Rank `r` serves `sources[r]` on `listeners[r]`; one engine id for all.
    ///
    /// # Panics
    /// If there are no ranks, or not one listener per source.
    pub fn start(
        listeners: Vec<TcpListener>,
        config: ConnectorConfig,
        sources: Vec<Arc<dyn BlockSource>>,
    ) -> std::io::Result<Self> {
        assert!(!sources.is_empty() && listeners.len() == sources.len(), "one listener per rank");
        let ranks = listeners
            .into_iter()
            .zip(sources)
            .map(|(listener, source)| KvConnector::start(listener, config.clone(), source))
            .collect::<std::io::Result<_>>()?;
        Ok(Self { ranks })
    }

    /// Pins `block_ids` on every rank; the params list every rank's port.
    pub fn pin(&self, request_id: &str, block_ids: Vec<u32>, num_tokens: u32) -> RemotePrefill {
        let mut remote = self.ranks[0].pin(request_id, block_ids.clone(), num_tokens);
        for rank in &self.ranks[1..] {
            rank.pin(request_id, block_ids.clone(), num_tokens);
        }
        if self.ranks.len() > 1 {
            remote.remote_ports = self.ports();
        }
        remote
    }

    /// Frees the pin on every rank; false when no rank held it any more.
    pub fn release(&self, request_id: &str) -> bool {
        self.ranks.iter().fold(false, |any, rank| rank.release(request_id) | any)
    }

    /// Rank 0's KV server port.
    pub fn port(&self) -> u16 {
        self.ranks[0].port()
    }

    /// Every rank's KV server port, rank order.
    pub fn ports(&self) -> Vec<u16> {
        self.ranks.iter().map(KvConnector::port).collect()
    }

    /// Pins of the engine: each rank's pins are freed on their own (as its
    /// pullers finish), so those of the rank that still holds the most.
    pub fn stats(&self) -> PinStats {
        self.ranks.iter().map(KvConnector::stats).fold(PinStats::default(), |a, b| PinStats {
            requests: a.requests.max(b.requests),
            blocks: a.blocks.max(b.blocks),
        })
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

    /// Pushes a pin's expiry one lease ahead; false when it is gone.
    fn renew(&self, request_id: &str) -> bool {
        let mut pins = self.pins.lock().expect("pin table poisoned");
        match pins.get_mut(request_id) {
            Some(pin) => {
                pin.expires = Instant::now() + self.config.lease;
                true
            }
            None => false,
        }
    }

    /// Checks a pull against the pin table and renews the pin.
    fn admit_pull(&self, req: &PullRequest) -> Result<PieceShape, String> {
        let shape = PieceShape {
            server: self.layout,
            server_blocks: self.memory.num_blocks(),
            block_ids: req.block_ids.clone(),
            heads: req.head_start..req.head_end,
        };
        shape.check()?;
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
        pin.expires = Instant::now() + self.config.lease;
        Ok(shape)
    }

    fn reap_expired(&self) {
        let now = Instant::now();
        let expired: Vec<(String, Pin)> = {
            let mut pins = self.pins.lock().expect("pin table poisoned");
            let ids: Vec<String> = pins.iter().filter(|(_, p)| p.expires <= now).map(|(id, _)| id.clone()).collect();
            ids.into_iter().filter_map(|id| pins.remove(&id).map(|p| (id, p))).collect()
        };
        for (request_id, pin) in expired {
            info!(request_id, blocks = pin.block_ids.len(), "pinned KV lease expired; releasing");
            self.source.release_blocks(&pin.block_ids);
        }
    }

    /// The layout exchange: accept `theirs` or say what differs.
    fn hello(&self, engine_id: &str, theirs: Option<proto::kv::KvLayout>) -> Result<Accepted, String> {
        if engine_id != self.config.engine_id {
            return Err(format!("engine id {engine_id:?} is not this engine ({:?})", self.config.engine_id));
        }
        let theirs = KvLayout::try_from(theirs.ok_or("hello without a KV layout")?).map_err(|e| e.to_string())?;
        self.layout
            .check_compatible(&theirs)
            .map_err(|e| format!("{e} (this prefill worker's first, the decode worker's second)"))?;
        let shared_memory =
            if self.config.shared_memory { shm::advertise(self.memory.memfd(), self.memory.len()) } else { None };
        Ok(Accepted { layout: Some(self.layout.into()), num_blocks: self.memory.num_blocks() as u32, shared_memory })
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let _ = socket2::SockRef::from(&stream).set_send_buffer_size(crate::client::SOCKET_BUFFER);
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

fn invalid(message: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message.to_string())
}

async fn serve_connection(mut stream: TcpStream, inner: &Arc<Inner>) -> std::io::Result<()> {
    let Some(Frame { kind: Some(Kind::Hello(hello)) }) = read_frame(&mut stream).await? else {
        return Err(invalid("a kv-transfer connection must open with a hello"));
    };
    let result = match inner.hello(&hello.engine_id, hello.layout) {
        Ok(accepted) => hello_ack::Result::Accepted(accepted),
        Err(message) => {
            warn!(%message, "refused a KV puller");
            hello_ack::Result::Error(message)
        }
    };
    let refused = matches!(result, hello_ack::Result::Error(_));
    write_frame(&mut stream, &Frame { kind: Some(Kind::HelloAck(HelloAck { result: Some(result) })) }).await?;
    if refused {
        return Ok(());
    }
    while let Some(frame) = read_frame(&mut stream).await? {
        match frame.kind {
            Some(Kind::Pull(req)) => {
                let span = tracing::info_span!(
                    "kv_serve",
                    otel.kind = "server",
                    request_id = %req.request_id,
                    blocks = req.block_ids.len(),
                    heads = req.head_end.saturating_sub(req.head_start),
                    bytes = tracing::field::Empty,
                );
                if let Some(traceparent) = &req.traceparent {
                    cluster::telemetry::set_parent_from_traceparent(&span, traceparent);
                }
                serve_pull(&mut stream, inner, req).instrument(span).await?
            }
            Some(Kind::Renew(req)) => {
                inner.renew(&req.request_id);
            }
            Some(Kind::Release(req)) => {
                let released = inner.release(&req.request_id);
                let answer = Frame { kind: Some(Kind::ReleaseResponse(ReleaseResponse { released })) };
                write_frame(&mut stream, &answer).await?;
            }
            _ => return Err(invalid("unexpected frame from a puller")),
        }
    }
    Ok(())
}

/// Slices gathered per `writev`; Linux takes up to 1024.
const IOVECS: usize = 64;
/// Bytes between lease renewals while a pull is being written.
const RENEW_EVERY: usize = 64 << 20;

async fn serve_pull(stream: &mut TcpStream, inner: &Arc<Inner>, req: PullRequest) -> std::io::Result<()> {
    let transport = Transport::try_from(req.transport).unwrap_or(Transport::Unspecified);
    let admitted = inner.admit_pull(&req).and_then(|shape| match transport {
        Transport::Tcp => Ok(shape),
        Transport::Shm if inner.config.shared_memory && inner.memory.memfd().is_some() => Ok(shape),
        Transport::Shm => Err("this KV server offers no shared memory".into()),
        Transport::Unspecified => Err("pull without a transport".into()),
    });
    let shape = match admitted {
        Ok(shape) => shape,
        Err(message) => {
            warn!(request_id = req.request_id, %message, "refused KV pull");
            let header = PullResponse { result: Some(pull_response::Result::Error(message)) };
            return write_frame(stream, &Frame { kind: Some(Kind::PullResponse(header)) }).await;
        }
    };
    let bytes = shape.payload_bytes();
    tracing::Span::current().record("bytes", bytes);
    let header = PullResponse { result: Some(pull_response::Result::NumBytes(bytes as u64)) };
    write_frame(stream, &Frame { kind: Some(Kind::PullResponse(header)) }).await?;
    let mut checksum = req.checksum.then(Checksum::new);
    let memory = &inner.memory;
    if transport == Transport::Tcp {
        write_payload(stream, walk(memory, &shape, false), checksum.as_mut(), || inner.renew(&req.request_id)).await?;
    } else if let Some(sum) = checksum.as_mut() {
        // The puller copies on its own; it still needs the sum of what we hold.
        walk(memory, &shape, false).for_each(|s| sum.update(s));
    }
    let done = PullDone { checksum: checksum.map_or(0, Checksum::finish) };
    write_frame(stream, &Frame { kind: Some(Kind::PullDone(done)) }).await?;
    if req.release && transport == Transport::Tcp {
        inner.release(&req.request_id);
    }
    debug!(request_id = req.request_id, bytes, ?transport, "served KV pull");
    Ok(())
}

/// Writes `slices` with gathered writes straight from the KV memory: no copy
/// into a message, and the socket always has the next slices queued.
async fn write_payload<'a>(
    stream: &mut TcpStream,
    slices: impl Iterator<Item = &'a [u8]>,
    mut checksum: Option<&mut Checksum>,
    renew: impl Fn() -> bool,
) -> std::io::Result<()> {
    let mut slices = slices.peekable();
    let mut since_renew = 0;
    let mut batch: Vec<IoSlice<'a>> = Vec::with_capacity(IOVECS);
    while slices.peek().is_some() {
        batch.clear();
        batch.extend(slices.by_ref().take(IOVECS).map(|s| {
            if let Some(sum) = checksum.as_deref_mut() {
                sum.update(s);
            }
            IoSlice::new(s)
        }));
        let mut rest: &mut [IoSlice<'a>] = &mut batch;
        while !rest.is_empty() {
            let n = stream.write_vectored(rest).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            since_renew += n;
            IoSlice::advance_slices(&mut rest, n);
        }
        if since_renew >= RENEW_EVERY {
            since_renew = 0;
            renew();
        }
    }
    stream.flush().await
}

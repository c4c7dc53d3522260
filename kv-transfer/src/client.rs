//! The decode side of the hand-off: each decode rank pulls its slice of KV
//! heads from the prefill ranks that hold them, into one buffer in the
//! hand-off format (layer-major, its own heads); then the blocks are released.
//!
//! Connections are kept per KV server after the layout exchange, so a small
//! pull costs one round trip. A same-host server's KV memory is mapped once
//! per connection and copied from directly; any other server sends the bytes
//! over TCP.

use crate::checksum::Checksum;
use crate::frame::{read_frame, write_frame};
use crate::layout::{pull_plan, KvLayout, PullPiece};
use crate::memory::{PieceShape, PullTarget};
use crate::params::RemotePrefill;
use crate::shm::PeerMapping;
use crate::KvTransferError;
use proto::kv::{frame::Kind, hello_ack, pull_response, Frame, Hello, PullRequest, ReleaseRequest, Renew, Transport};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tracing::debug;

/// Which transports a puller may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportPolicy {
    /// Shared memory with a same-host server, TCP otherwise.
    Auto,
    /// TCP always.
    Tcp,
}

/// How a decode rank pulls.
#[derive(Debug, Clone)]
pub struct PullerConfig {
    /// This rank's layout; the buffer holds its heads.
    pub layout: KvLayout,
    pub transport: TransportPolicy,
    /// Ask for and verify a checksum of every transfer.
    pub checksum: bool,
    /// Longest wait for any one answer or 4 MiB of payload: a stalled or
    /// dead peer fails the pull after this, never hangs it.
    pub idle_timeout: Duration,
}

/// The blocks of one hand-off, as this rank holds them.
#[derive(Debug)]
pub struct Pulled {
    /// Hand-off format: for each layer, K then V, each block in order.
    pub data: Vec<u8>,
    /// How the bytes came (the last piece's, when there were several).
    pub transport: Transport,
}

/// One open connection to a KV server, after the layout exchange.
struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    server: KvLayout,
    server_blocks: usize,
    peer: Option<PeerMapping>,
}

impl Conn {
    /// Whether the server's end is still open: an idle connection has
    /// nothing to read, so a read that does not block means EOF or an error.
    fn is_open(&self) -> bool {
        if !self.reader.buffer().is_empty() {
            return false; // Bytes nobody asked for: out of step.
        }
        let mut probe = [0u8; 1];
        matches!(self.reader.get_ref().try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Pulls hand-offs for one decode rank, keeping connections between pulls.
pub struct KvPuller {
    config: PullerConfig,
    idle: Mutex<HashMap<String, Vec<Conn>>>,
    tcp_pulls: AtomicU64,
    shm_pulls: AtomicU64,
}

/// Pieces pulled so far, by transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullCounts {
    pub tcp: u64,
    pub shm: u64,
}

/// Payload bytes read or copied between timeout checks and lease renewals.
const CHUNK: usize = 4 << 20;
/// Socket buffer asked for on KV connections (the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`).
pub(crate) const SOCKET_BUFFER: usize = 4 << 20;

impl KvPuller {
    pub fn new(config: PullerConfig) -> Self {
        Self { config, idle: Mutex::new(HashMap::new()), tcp_pulls: AtomicU64::new(0), shm_pulls: AtomicU64::new(0) }
    }

    /// The layout this rank pulls into.
    pub fn layout(&self) -> &KvLayout {
        &self.config.layout
    }

    /// Pieces pulled so far, by transport.
    pub fn counts(&self) -> PullCounts {
        PullCounts { tcp: self.tcp_pulls.load(Ordering::Relaxed), shm: self.shm_pulls.load(Ordering::Relaxed) }
    }

    /// Bytes of `remote`'s blocks as this rank holds them.
    pub fn buffer_len(&self, remote: &RemotePrefill) -> usize {
        remote.remote_block_ids.len() * self.config.layout.block_bytes()
    }

    /// Pulls this rank's heads of `remote`'s blocks into a new buffer in the
    /// hand-off format. The pin stays: call [`KvPuller::release`] once every
    /// rank has pulled.
    pub async fn pull(&self, remote: &RemotePrefill) -> Result<Pulled, KvTransferError> {
        let mut data = vec![0; self.buffer_len(remote)];
        let transport = self.pull_into(remote, &mut PullTarget::buffer(&mut data, &self.config.layout)).await?;
        Ok(Pulled { data, transport })
    }

    /// Like [`KvPuller::pull`], into `target`: a reused buffer (whose pages
    /// are already there, which is most of the cost of a large pull into
    /// fresh memory), or blocks of the decode engine's own cache.
    pub async fn pull_into(
        &self,
        remote: &RemotePrefill,
        target: &mut PullTarget<'_>,
    ) -> Result<Transport, KvTransferError> {
        self.check_target(remote, target)?;
        let mut transport = Transport::Tcp;
        let plan = pull_plan(&self.config.layout, remote.tp_size);
        for (i, piece) in plan.iter().enumerate() {
            transport = self.pull_piece(remote, piece, target, false, i + 1 == plan.len()).await?;
        }
        Ok(transport)
    }

    fn check_target(&self, remote: &RemotePrefill, target: &PullTarget<'_>) -> Result<(), KvTransferError> {
        let (want, have) = (remote.remote_block_ids.len(), target.block_ids().len());
        if want == have {
            return Ok(());
        }
        Err(KvTransferError::Target(format!("{want} blocks to pull into {have}")))
    }

    /// Frees the pins on every prefill rank; true when each still held one.
    pub async fn release(&self, remote: &RemotePrefill) -> Result<bool, KvTransferError> {
        let mut all = true;
        for rank in 0..remote.tp_size.max(1) {
            let addr = remote.rank_addr(rank);
            let mut conn = self.checkout(&addr, remote).await?;
            let release = ReleaseRequest { request_id: remote.remote_request_id.clone() };
            let answer = async {
                write_frame(&mut conn.writer, &Frame { kind: Some(Kind::Release(release)) }).await?;
                read_frame(&mut conn.reader).await
            };
            match self.within(&addr, answer).await?.and_then(|f| f.kind) {
                Some(Kind::ReleaseResponse(r)) => all &= r.released,
                _ => return Err(protocol(&addr, "expected a release response")),
            }
            self.checkin(addr, conn);
        }
        Ok(all)
    }

    /// Pulls into `target`, then releases: the whole hand-off for a
    /// single-rank decode.
    pub async fn pull_and_release(
        &self,
        remote: &RemotePrefill,
        target: &mut PullTarget<'_>,
    ) -> Result<Transport, KvTransferError> {
        let pulled = match pull_plan(&self.config.layout, remote.tp_size).as_slice() {
            // One server rank: over TCP it frees the pin as the payload goes
            // out, without a round trip of ours.
            [piece] => match self.check_target(remote, target) {
                Ok(()) => match self.pull_piece(remote, piece, target, true, true).await {
                    Ok(Transport::Tcp) => return Ok(Transport::Tcp),
                    other => other,
                },
                Err(e) => Err(e),
            },
            _ => self.pull_into(remote, target).await,
        };
        self.release_after(remote, pulled).await
    }

    /// Releases `remote`'s pins after a pull that ended as `pulled`, and
    /// returns it: a failed pull must not hold the blocks for a lease. Not
    /// after a pull the peer left unanswered, though: the release would
    /// wait out the idle timeout a second time before the request can move
    /// on, and the pins' lease frees the blocks anyway.
    pub async fn release_after<T>(
        &self,
        remote: &RemotePrefill,
        pulled: Result<T, KvTransferError>,
    ) -> Result<T, KvTransferError> {
        if let Err(e @ KvTransferError::Timeout { .. }) = pulled {
            return Err(e);
        }
        let released = self.release(remote).await;
        let pulled = pulled?;
        released?;
        Ok(pulled)
    }

    async fn pull_piece(
        &self,
        remote: &RemotePrefill,
        piece: &PullPiece,
        target: &mut PullTarget<'_>,
        release: bool,
        report: bool,
    ) -> Result<Transport, KvTransferError> {
        let addr = remote.rank_addr(piece.server_rank);
        let mut conn = self.checkout(&addr, remote).await?;
        let shape = PieceShape {
            server: conn.server,
            server_blocks: conn.server_blocks,
            block_ids: remote.remote_block_ids.clone(),
            heads: piece.heads.clone(),
        };
        shape.check().map_err(|m| protocol(&addr, &m))?;
        let transport = if conn.peer.is_some() { Transport::Shm } else { Transport::Tcp };
        let pull = PullRequest {
            request_id: remote.remote_request_id.clone(),
            block_ids: remote.remote_block_ids.clone(),
            head_start: piece.heads.start,
            head_end: piece.heads.end,
            transport: transport as i32,
            checksum: self.config.checksum,
            release,
            traceparent: cluster::telemetry::current_traceparent(),
        };
        let header = async {
            write_frame(&mut conn.writer, &Frame { kind: Some(Kind::Pull(pull)) }).await?;
            read_frame(&mut conn.reader).await
        };
        let num_bytes = match self.within(&addr, header).await?.and_then(|f| f.kind) {
            Some(Kind::PullResponse(r)) => match r.result {
                Some(pull_response::Result::NumBytes(n)) => n as usize,
                Some(pull_response::Result::Error(message)) => {
                    // The connection is still in step: keep it.
                    self.checkin(addr.clone(), conn);
                    return Err(KvTransferError::Refused { addr, message });
                }
                None => return Err(protocol(&addr, "empty pull response")),
            },
            _ => return Err(protocol(&addr, "expected a pull response")),
        };
        if num_bytes != shape.payload_bytes() {
            return Err(protocol(
                &addr,
                &format!("peer announced {num_bytes} bytes, {} expected", shape.payload_bytes()),
            ));
        }
        let land = target.landing(&self.config.layout, &shape);
        let dst: Vec<Range<usize>> = land.ranges().collect();
        // Over TCP the server walks its own side.
        let src: Vec<Range<usize>> =
            if transport == Transport::Shm { shape.ranges(land.per_slot).collect() } else { Vec::new() };
        // The payload is layer-major: equal runs per layer, landed (and
        // reported, for streaming) one layer at a time.
        let num_layers = self.config.layout.num_layers as usize;
        let per_layer = (dst.len() / num_layers).max(1);
        let mut sum = self.config.checksum.then(Checksum::new);
        let mut since_renew = 0;
        for (layer, dst) in dst.chunks(per_layer).enumerate() {
            if transport == Transport::Tcp {
                let dst = coalesce(dst.iter().cloned());
                self.receive(&addr, &mut conn, &dst, target, sum.as_mut()).await?;
            } else {
                // The server sums its side meanwhile, on another core.
                let src = &src[layer * per_layer..layer * per_layer + dst.len()];
                let copy = SharedCopy { src, dst, since_renew: &mut since_renew };
                self.copy_shared(&addr, &mut conn, remote, copy, target, sum.as_mut()).await?;
            }
            if report && layer + 1 < num_layers {
                target.report(layer as u32 + 1);
            }
        }
        let expected = match self.within(&addr, read_frame(&mut conn.reader)).await?.and_then(|f| f.kind) {
            Some(Kind::PullDone(done)) => done.checksum,
            _ => return Err(protocol(&addr, "expected the end of the pull")),
        };
        if let Some(sum) = sum {
            let got = sum.finish();
            if got != expected {
                return Err(KvTransferError::Checksum { addr, expected, got });
            }
        }
        if report {
            target.report(num_layers as u32);
        }
        debug!(request_id = remote.remote_request_id, bytes = num_bytes, ?transport, "pulled KV");
        let counter = if transport == Transport::Shm { &self.shm_pulls } else { &self.tcp_pulls };
        counter.fetch_add(1, Ordering::Relaxed);
        self.checkin(addr, conn);
        Ok(transport)
    }

    /// Reads the TCP payload into its landing ranges.
    async fn receive(
        &self,
        addr: &str,
        conn: &mut Conn,
        dst: &[Range<usize>],
        target: &mut PullTarget<'_>,
        mut sum: Option<&mut Checksum>,
    ) -> Result<(), KvTransferError> {
        for range in dst {
            for chunk in target.bytes_mut(range.clone()).chunks_mut(CHUNK) {
                self.within(addr, conn.reader.read_exact(chunk)).await?;
                if let Some(sum) = sum.as_deref_mut() {
                    sum.update(chunk);
                }
            }
        }
        Ok(())
    }

    /// Copies from the server's mapping, renewing the pin as it goes.
    async fn copy_shared(
        &self,
        addr: &str,
        conn: &mut Conn,
        remote: &RemotePrefill,
        copy: SharedCopy<'_>,
        target: &mut PullTarget<'_>,
        mut sum: Option<&mut Checksum>,
    ) -> Result<(), KvTransferError> {
        let peer = conn.peer.as_ref().expect("shared pulls need a mapping");
        let SharedCopy { src, dst, since_renew } = copy;
        for (s, d) in coalesce_pairs(src, dst) {
            let from = peer.bytes(s).map_err(|m| protocol(addr, &m))?;
            let to = target.bytes_mut(d);
            match sum.as_deref_mut() {
                // A long run in one copy takes memcpy's fastest (streaming) path.
                None => to.copy_from_slice(from),
                // Summed piece by piece, each while it is still in the cache.
                Some(sum) => {
                    for (to, from) in to.chunks_mut(SUM_PIECE).zip(from.chunks(SUM_PIECE)) {
                        to.copy_from_slice(from);
                        sum.update(to);
                    }
                }
            }
            *since_renew += to.len();
            if *since_renew >= 16 * CHUNK {
                *since_renew = 0;
                let renew = Renew { request_id: remote.remote_request_id.clone() };
                self.within(addr, write_frame(&mut conn.writer, &Frame { kind: Some(Kind::Renew(renew)) })).await?;
            }
        }
        Ok(())
    }

    /// An idle connection to `addr`, or a new one after the layout exchange.
    async fn checkout(&self, addr: &str, remote: &RemotePrefill) -> Result<Conn, KvTransferError> {
        loop {
            let idle = self.idle.lock().expect("connection pool poisoned").get_mut(addr).and_then(Vec::pop);
            match idle {
                // A server that restarted or went away closed its end while
                // the connection sat idle: drop it rather than fail a pull on it.
                Some(conn) if !conn.is_open() => continue,
                Some(conn) => return Ok(conn),
                None => return self.connect(addr, remote).await,
            }
        }
    }

    fn checkin(&self, addr: String, conn: Conn) {
        self.idle.lock().expect("connection pool poisoned").entry(addr).or_default().push(conn);
    }

    async fn connect(&self, addr: &str, remote: &RemotePrefill) -> Result<Conn, KvTransferError> {
        let stream = self.within(addr, TcpStream::connect(addr)).await?;
        let _ = stream.set_nodelay(true);
        // A deep receive queue keeps the sender writing while we copy out.
        let _ = socket2::SockRef::from(&stream).set_recv_buffer_size(SOCKET_BUFFER);
        let (reader, mut writer) = stream.into_split();
        let mut reader = BufReader::with_capacity(64 << 10, reader);
        let hello = Hello { layout: Some(self.config.layout.into()), engine_id: remote.remote_engine_id.clone() };
        let ack = async {
            write_frame(&mut writer, &Frame { kind: Some(Kind::Hello(hello)) }).await?;
            read_frame(&mut reader).await
        };
        let accepted = match self.within(addr, ack).await?.and_then(|f| f.kind) {
            Some(Kind::HelloAck(ack)) => match ack.result {
                Some(hello_ack::Result::Accepted(a)) => a,
                Some(hello_ack::Result::Error(message)) => {
                    return Err(KvTransferError::Refused { addr: addr.to_string(), message })
                }
                None => return Err(protocol(addr, "empty hello answer")),
            },
            _ => return Err(protocol(addr, "expected a hello answer")),
        };
        let server = accepted.layout.ok_or_else(|| protocol(addr, "hello answer without a layout"))?;
        let server = KvLayout::try_from(server).map_err(|e| protocol(addr, &e.to_string()))?;
        self.config
            .layout
            .check_compatible(&server)
            .map_err(|e| KvTransferError::Refused { addr: addr.to_string(), message: e.to_string() })?;
        let peer = match (self.config.transport, &accepted.shared_memory) {
            (TransportPolicy::Auto, Some(shared)) => match PeerMapping::open(shared) {
                Ok(peer) => Some(peer),
                Err(reason) => {
                    debug!(addr, %reason, "KV server's shared memory unusable; TCP it is");
                    None
                }
            },
            _ => None,
        };
        Ok(Conn { reader, writer, server, server_blocks: accepted.num_blocks as usize, peer })
    }

    /// Runs one network step under the idle timeout.
    async fn within<T>(
        &self,
        addr: &str,
        step: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> Result<T, KvTransferError> {
        match tokio::time::timeout(self.config.idle_timeout, step).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(KvTransferError::Io { addr: addr.to_string(), source }),
            Err(_) => {
                Err(KvTransferError::Timeout { addr: addr.to_string(), secs: self.config.idle_timeout.as_secs_f64() })
            }
        }
    }
}

fn protocol(addr: &str, message: &str) -> KvTransferError {
    KvTransferError::Protocol { addr: addr.to_string(), message: message.to_string() }
}

/// Runs to copy out of a server's mapping, paired in order, and the bytes
/// copied since the pin was last renewed.
struct SharedCopy<'a> {
    src: &'a [Range<usize>],
    dst: &'a [Range<usize>],
    since_renew: &'a mut usize,
}

/// Bytes copied then summed at a time: small enough to stay in L2.
const SUM_PIECE: usize = 256 << 10;

/// Pairs of source and destination runs, each merged with the next where
/// both continue it (consecutive blocks on both sides, the usual case), so
/// the copy runs in long stretches.
fn coalesce_pairs(src: &[Range<usize>], dst: &[Range<usize>]) -> Vec<(Range<usize>, Range<usize>)> {
    let mut out: Vec<(Range<usize>, Range<usize>)> = Vec::new();
    for (s, d) in src.iter().zip(dst) {
        match out.last_mut() {
            Some((ls, ld)) if ls.end == s.start && ld.end == d.start => {
                ls.end = s.end;
                ld.end = d.end;
            }
            _ => out.push((s.clone(), d.clone())),
        }
    }
    out
}

/// Merges ranges that follow each other, so a whole-heads pull reads into
/// one run per contiguous stretch of the buffer.
fn coalesce(ranges: impl Iterator<Item = Range<usize>>) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

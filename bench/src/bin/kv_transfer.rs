//! `pdserve-kv-bench`: the KV hand-off's bandwidth and latency, against a single-threaded memcpy
//! of the same bytes.
//!
//! # Setup
//!
//! Everything runs in this one process, on loopback: a fake prefill engine rank (its KV memory a
//! shared mapping of an unlinked file in `/dev/shm`, filled with non-zero bytes first so every
//! page is resident), the real [`KvConnector`] serving it on `127.0.0.1`, and a real [`KvPuller`]
//! pulling from it, on a tokio multi-thread runtime (one per size, dropped after it, so the
//! server memory of one size is freed before the next is allocated). The layout is SmolLM2-135M's:
//! 30 layers, 3 KV heads of 64 f32 dims, 16-token blocks, 737,280 B a block, tensor parallel 1 on
//! both sides; a pull takes every head, so each segment travels whole.
//!
//! Paths: **tcp** (`TransportPolicy::Tcp`: gathered writes from the block memory into the socket,
//! read into the puller's buffer) and **shm** (`TransportPolicy::Auto`: the puller maps the
//! server's file and copies the blocks out itself; every pull is checked to have really come as
//! `Transport::Shm`), each with the per-transfer xxh3 checksum on (the default) and off.
//!
//! # Figures
//!
//! - Bandwidth, per size (`--sizes`, default 1 MiB, 16 MiB, 256 MiB, 1 GiB, each rounded up to
//!   whole blocks: the payload is the rounded size, which the table shows): the connector pins
//!   blocks `0..n` (the whole region) under a fresh request id (not timed), then the time of
//!   `KvPuller::pull_into`, from the call to its return, is the pull time. The pulls land in one
//!   buffer per path, made by an untimed warm pull first (which also opens the connection, and
//!   for shm the mapping, and is checked byte for byte against the server's memory): a decode
//!   worker pulls into KV memory it allocated once, so page faults of fresh memory are not part
//!   of a hand-off. `release` follows each pull and is timed apart. Then `--reps` timed pulls
//!   (default 5, 3 from 1 GiB up). Best and median (nearest rank) are shown;
//!   GB/s is payload bytes / pull time, GB = 10⁹ B.
//! - Baseline, per size, before the transfers (its buffers freed before the server memory is
//!   made): `copy_from_slice` of the payload's byte count between two page-aligned buffers
//!   pre-faulted by an untimed copy, on one thread, whole and in 32 KiB pieces; `--reps` timed copies each, best and
//!   median. "× memcpy" is a path's best GB/s over the whole memcpy's best GB/s, beside the
//!   targets: tcp ≥ 0.60, shm ≥ 0.85. Also per size, **tcp raw**: the same bytes over a plain
//!   loopback TCP connection from one pre-faulted buffer to another (a 1-byte request, then
//!   `write_all` / `read_exact`, no protocol, no checksum), the ceiling any TCP transport has here;
//!   and **shm raw**: the same bytes copied in 32 KiB pieces out of a read-only mapping of a
//!   /dev/shm file into a pre-faulted buffer, the ceiling of a shared-memory transport.
//! - Every buffer is page-aligned, as KV memory is (see [`page_aligned`] for why it matters).
//! - Latency: one 16-token block (737,280 B), checksum on, both paths, on a warm connection (100
//!   untimed pulls first): `--latency-pulls` timed pulls, each pinned before (not timed) and
//!   released after; p50 and p99 of the pull time, and of pull + release, in µs.
//!
//! Peak memory is about 3× the largest payload (two memcpy buffers, freed; then the server memory
//! and one puller buffer at a time). The server, the puller and the checksums share this
//! machine's cores, the server's writes and the puller's reads competing for them: on a small
//! or busy machine every figure is lower. The load average at start and end is printed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bench::{align, load_average, percentile};
use clap::Parser;
use kv_transfer::{
    BlockSource, ConnectorConfig, KvConnector, KvDtype, KvLayout, KvMemory, KvPuller, PullTarget, PullerConfig,
    RemotePrefill, Transport, TransportPolicy,
};
use serde::Serialize;
use tokio::net::TcpListener;

const NAME: &str = "pdserve-kv-bench";
const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The piece size of the chunked memcpy.
const PIECE: usize = 32 << 10;
/// Targets: a path's best GB/s over the whole memcpy's best.
const TCP_TARGET: f64 = 0.60;
const SHM_TARGET: f64 = 0.85;
/// Untimed one-block pulls before the latency is measured.
const LATENCY_WARMUP: u64 = 100;
/// The fill pattern's period (prime, so it lines up with no layout stride) and its template.
const PERIOD: usize = 251;
const TEMPLATE_LEN: usize = PERIOD * 4096;

/// The KV hand-off's bandwidth and latency on loopback, against memcpy.
#[derive(Debug, Parser)]
#[command(name = NAME, version)]
struct Args {
    /// Payload sizes, comma-separated (`1MiB`, `16M`, `1GiB` or bytes), each rounded up to whole
    /// 737,280 B blocks.
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_values = ["1MiB", "16MiB", "256MiB", "1GiB"])]
    sizes: Vec<u64>,
    /// Leave out the sizes above this one (e.g. `16MiB` for a quick run).
    #[arg(long, value_parser = parse_size)]
    max_size: Option<u64>,
    /// Timed repetitions per size and path (memcpy included); default 5, 3 from 1 GiB up.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    reps: Option<u32>,
    /// Timed one-block pulls per path for the latency percentiles.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    latency_pulls: u64,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// `16MiB`, `16M`, `512KiB`, `1GiB`, `1G` or plain bytes; binary units.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{s:?} is not a size such as 16MiB"))?;
    let unit = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => KIB,
        "m" | "mi" | "mib" => MIB,
        "g" | "gi" | "gib" => GIB,
        other => return Err(format!("unknown unit {other:?} in {s:?} (use KiB, MiB or GiB)")),
    };
    let bytes = n.checked_mul(unit).ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes == 0 {
        return Err("a size must be positive".into());
    }
    Ok(bytes)
}

/// `1 GiB`, `16 MiB`, `1.5 MiB`, `512 KiB`, `100 B`.
fn size_label(bytes: u64) -> String {
    let (unit, name) =
        [(GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")].into_iter().find(|(u, _)| bytes >= *u).unwrap_or((1, "B"));
    let value = bytes as f64 / unit as f64;
    if bytes.is_multiple_of(unit) {
        format!("{value:.0} {name}")
    } else {
        format!("{value:.2} {name}")
    }
}

/// SmolLM2-135M's KV layout, one rank.
fn smollm() -> KvLayout {
    KvLayout {
        num_layers: 30,
        num_kv_heads: 3,
        head_dim: 64,
        dtype: KvDtype::F32,
        block_size: 16,
        tp_size: 1,
        tp_rank: 0,
        total_kv_heads: 3,
        draft: None,
    }
}

fn main() {
    let args: Args = cluster::cli::parse(NAME);
    cluster::cli::exit_on_error(NAME, run(args));
}

fn run(args: Args) -> anyhow::Result<()> {
    let load_at_start = load_average();
    let layout = smollm();
    let block_bytes = layout.block_bytes();
    let mut sizes: Vec<u64> = args.sizes.iter().copied().filter(|&s| args.max_size.is_none_or(|m| s <= m)).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let template: Vec<u8> = (0..TEMPLATE_LEN).map(|i| 1 + (i % PERIOD) as u8).collect();
    let mut results = Vec::new();
    for &requested in &sizes {
        let blocks = (requested as usize).div_ceil(block_bytes);
        let bytes = blocks * block_bytes;
        let reps = args.reps.unwrap_or(if requested >= GIB { 3 } else { 5 });
        eprintln!("{NAME}: {} ({blocks} blocks, {bytes} B), {reps} reps", size_label(requested));
        // The memcpy's buffers are freed when it returns, before the server memory exists.
        let (whole, pieces) = memcpy(bytes, reps);
        let raw_shm = shm_copy(bytes, reps)?;
        let runtime = runtime()?;
        let raw_tcp = runtime.block_on(raw_tcp(bytes, reps))?;
        let paths = runtime.block_on(bandwidth(blocks, reps, &template))?;
        drop(runtime);
        results.push(SizeResult { requested, blocks, bytes, reps, whole, pieces, raw_shm, raw_tcp, paths });
    }
    eprintln!("{NAME}: latency, {} one-block pulls per path", args.latency_pulls);
    let runtime = runtime()?;
    let latency = runtime.block_on(latency(args.latency_pulls, &template))?;
    drop(runtime);
    let report = Report::new(results, latency, [load_at_start, load_average()], args.latency_pulls);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// `bytes` of zeroed, prefaulted, page-aligned memory. Every buffer here is
/// page-aligned, as KV memory is: on some CPUs (this development VM's AMD
/// EPYC among them) `rep movsb`, which glibc's memcpy uses for mid-sized
/// copies, runs 3–4× slower when the destination sits 16 bytes off the
/// source's alignment, as two `Vec`s can, which would measure the
/// allocator rather than the transport.
fn page_aligned(bytes: usize) -> memmap2::MmapMut {
    let mut map = memmap2::MmapMut::map_anon(bytes.max(1)).expect("anonymous mapping");
    map.fill(0);
    map
}

/// Seconds of `reps` single-threaded copies of `bytes`: whole, then in 32 KiB pieces.
fn memcpy(bytes: usize, reps: u32) -> (Vec<f64>, Vec<f64>) {
    let mut src = page_aligned(bytes);
    src.fill(0x5a);
    let mut dst = page_aligned(bytes);
    // Untimed: faults in every page of `dst` (`src`'s were written by its fill).
    dst.copy_from_slice(std::hint::black_box(&src));
    let mut whole = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        whole.push(start.elapsed().as_secs_f64());
    }
    let mut pieces = Vec::new();
    for _ in 0..reps {
        let start = Instant::now();
        for (d, s) in dst.chunks_mut(PIECE).zip(std::hint::black_box(&src).chunks(PIECE)) {
            d.copy_from_slice(s);
        }
        std::hint::black_box(&mut dst);
        pieces.push(start.elapsed().as_secs_f64());
    }
    (whole, pieces)
}

/// Seconds of `reps` single-threaded copies of `bytes` in 32 KiB pieces out
/// of a read-only shared mapping of an unlinked /dev/shm file (written
/// through another mapping first) into a pre-faulted buffer: the ceiling of
/// any shared-memory transport on this machine, whose shared pages may read
/// slower than private memory.
fn shm_copy(bytes: usize, reps: u32) -> anyhow::Result<Vec<f64>> {
    let file = tempfile::tempfile_in("/dev/shm").or_else(|_| tempfile::tempfile())?;
    file.set_len(bytes as u64)?;
    // SAFETY: the file is this function's alone.
    let mut writer = unsafe { memmap2::MmapMut::map_mut(&file)? };
    writer.fill(0x5a);
    let reader = unsafe { memmap2::Mmap::map(&file)? };
    let mut dst = page_aligned(bytes);
    let mut seconds = Vec::new();
    for rep in 0..=reps {
        let start = Instant::now();
        for (d, s) in dst.chunks_mut(PIECE).zip(std::hint::black_box(&reader[..]).chunks(PIECE)) {
            d.copy_from_slice(s);
        }
        std::hint::black_box(&mut dst);
        // Rep 0 faults the mapping and `dst` in, untimed.
        if rep > 0 {
            seconds.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(seconds)
}

/// Seconds of `reps` plain loopback TCP transfers of `bytes` from one
/// pre-faulted buffer to another on one connection (a 1-byte request, then
/// the bytes): the kernel's ceiling for any TCP transport on this machine.
async fn raw_tcp(bytes: usize, reps: u32) -> anyhow::Result<Vec<f64>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await?;
        let mut src = page_aligned(bytes);
        src.fill(0x5a);
        let mut ask = [0u8; 1];
        while s.read_exact(&mut ask).await.is_ok() {
            s.write_all(&src).await?;
        }
        anyhow::Ok(())
    });
    let mut client = tokio::net::TcpStream::connect(addr).await?;
    client.set_nodelay(true)?;
    let mut dst = page_aligned(bytes);
    let mut seconds = Vec::new();
    for rep in 0..=reps {
        let start = Instant::now();
        client.write_all(&[1]).await?;
        client.read_exact(&mut dst).await?;
        // Rep 0 faults `dst` in, untimed.
        if rep > 0 {
            seconds.push(start.elapsed().as_secs_f64());
        }
    }
    drop(client);
    server.await??;
    Ok(seconds)
}

/// A fake engine rank: shared memory filled with the pattern; releases only counted.
struct Rank {
    layout: KvLayout,
    memory: KvMemory,
    released: AtomicUsize,
}

impl BlockSource for Rank {
    fn layout(&self) -> KvLayout {
        self.layout
    }
    fn memory(&self) -> KvMemory {
        self.memory.clone()
    }
    fn release_blocks(&self, ids: &[u32]) {
        self.released.fetch_add(ids.len(), Ordering::Relaxed);
    }
}

/// A KV server over `blocks` blocks, every byte of them written (the pattern, never zero).
async fn serve(blocks: usize, template: &[u8]) -> anyhow::Result<KvConnector> {
    let layout = smollm();
    let file = tempfile::tempfile_in("/dev/shm").context("creating the server's KV memory in /dev/shm")?;
    let memory = KvMemory::shared(&layout, blocks, file).context("mapping the server's KV memory")?;
    let mut at = 0;
    while at < memory.len() {
        let n = template.len().min(memory.len() - at);
        // SAFETY: no connector serves this memory yet.
        unsafe { memory.fill(at, &template[..n]) };
        at += n;
    }
    let rank = Arc::new(Rank { layout, memory, released: AtomicUsize::new(0) });
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let config = ConnectorConfig {
        engine_id: "bench-prefill".into(),
        advertise_host: "127.0.0.1".into(),
        lease: Duration::from_secs(600),
        shared_memory: true,
    };
    Ok(KvConnector::start(listener, config, rank as Arc<dyn BlockSource>)?)
}

/// The two ways a puller gets blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Path {
    Tcp,
    Shm,
}

impl Path {
    fn policy(self) -> TransportPolicy {
        match self {
            Path::Tcp => TransportPolicy::Tcp,
            Path::Shm => TransportPolicy::Auto,
        }
    }
    fn transport(self) -> Transport {
        match self {
            Path::Tcp => Transport::Tcp,
            Path::Shm => Transport::Shm,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Path::Tcp => "tcp",
            Path::Shm => "shm",
        }
    }
    fn target(self) -> f64 {
        match self {
            Path::Tcp => TCP_TARGET,
            Path::Shm => SHM_TARGET,
        }
    }
}

fn puller(path: Path, checksum: bool) -> KvPuller {
    KvPuller::new(PullerConfig {
        layout: smollm(),
        transport: path.policy(),
        checksum,
        idle_timeout: Duration::from_secs(60),
    })
}

/// A fresh request id for every pin.
fn pin(connector: &KvConnector, blocks: usize) -> RemotePrefill {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = format!("bench-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let ids: Vec<u32> = (0..blocks as u32).collect();
    connector.pin(&id, ids, (blocks * smollm().block_size as usize) as u32)
}

/// One timed pull into `buf` + release: (pull seconds, release seconds).
async fn timed_pull(
    puller: &KvPuller,
    connector: &KvConnector,
    blocks: usize,
    path: Path,
    buf: &mut [u8],
) -> anyhow::Result<(f64, f64)> {
    let remote = pin(connector, blocks);
    ensure!(buf.len() == puller.buffer_len(&remote), "a pull buffer of {} bytes", buf.len());
    let start = Instant::now();
    let transport = puller.pull_into(&remote, &mut PullTarget::buffer(buf, &smollm())).await?;
    let pull_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let released = puller.release(&remote).await?;
    let release_s = start.elapsed().as_secs_f64();
    ensure!(released, "the pin of {} was gone before its release", remote.remote_request_id);
    ensure!(transport == path.transport(), "a {} pull came over {:?}", path.name(), transport);
    Ok((pull_s, release_s))
}

/// One path at one size: pull seconds and release seconds of each rep.
struct PathResult {
    path: Path,
    checksum: bool,
    pull: Vec<f64>,
    release: Vec<f64>,
}

async fn bandwidth(blocks: usize, reps: u32, template: &[u8]) -> anyhow::Result<Vec<PathResult>> {
    let connector = serve(blocks, template).await?;
    let mut out = Vec::new();
    for path in [Path::Tcp, Path::Shm] {
        for checksum in [true, false] {
            let puller = puller(path, checksum);
            // Warm: the connection and mapping now exist; the payload is the server's, byte for byte
            // (blocks 0..n of a region of n blocks: the hand-off format is the region's layout).
            // Page-aligned and prefaulted, as a decode engine's KV memory is.
            let mut buf = page_aligned(blocks * smollm().block_bytes());
            timed_pull(&puller, &connector, blocks, path, &mut buf).await?;
            ensure!(
                buf.chunks(template.len()).all(|c| c == &template[..c.len()]),
                "the {} pull's payload differs from the server's memory",
                path.name()
            );
            let (mut pull, mut release) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                let (p, r) = timed_pull(&puller, &connector, blocks, path, &mut buf).await?;
                pull.push(p);
                release.push(r);
            }
            out.push(PathResult { path, checksum, pull, release });
        }
    }
    ensure!(connector.stats().requests == 0, "pins left after the bandwidth runs");
    Ok(out)
}

/// Per path: microseconds of each pull and of each pull + release of one block.
async fn latency(pulls: u64, template: &[u8]) -> anyhow::Result<Vec<(Path, Vec<f64>, Vec<f64>)>> {
    let connector = serve(1, template).await?;
    let mut out = Vec::new();
    for path in [Path::Tcp, Path::Shm] {
        let puller = puller(path, true);
        let mut buf = page_aligned(smollm().block_bytes());
        for _ in 0..LATENCY_WARMUP {
            timed_pull(&puller, &connector, 1, path, &mut buf).await?;
        }
        let (mut pull, mut total) = (Vec::new(), Vec::new());
        for _ in 0..pulls {
            let (p, r) = timed_pull(&puller, &connector, 1, path, &mut buf).await?;
            pull.push(p * 1e6);
            total.push((p + r) * 1e6);
        }
        out.push((path, pull, total));
    }
    Ok(out)
}

/// Raw results of one size.
struct SizeResult {
    requested: u64,
    blocks: usize,
    bytes: usize,
    reps: u32,
    whole: Vec<f64>,
    pieces: Vec<f64>,
    raw_shm: Vec<f64>,
    raw_tcp: Vec<f64>,
    paths: Vec<PathResult>,
}

/// Best and median of a set of timed runs of `bytes`.
#[derive(Debug, Clone, Serialize)]
struct Timing {
    best_ms: f64,
    median_ms: f64,
    best_gb_per_s: f64,
    median_gb_per_s: f64,
}

impl Timing {
    fn of(bytes: usize, mut seconds: Vec<f64>) -> Self {
        seconds.sort_by(f64::total_cmp);
        let (best, median) = (seconds[0], percentile(&seconds, 0.5));
        Timing {
            best_ms: best * 1e3,
            median_ms: median * 1e3,
            best_gb_per_s: bytes as f64 / best / 1e9,
            median_gb_per_s: bytes as f64 / median / 1e9,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct PathRow {
    path: Path,
    checksum: bool,
    pull: Timing,
    release_median_us: f64,
    /// Best GB/s over the whole memcpy's best GB/s.
    ratio_vs_memcpy: f64,
    target: f64,
    target_met: bool,
}

#[derive(Debug, Clone, Serialize)]
struct SizeRow {
    /// The size asked for; `bytes` is it rounded up to whole blocks.
    requested_bytes: u64,
    blocks: usize,
    bytes: usize,
    reps: u32,
    memcpy_whole: Timing,
    memcpy_32kib: Timing,
    /// A plain copy out of a /dev/shm mapping: the shared-memory ceiling.
    shm_copy_raw: Timing,
    /// Plain loopback TCP of the same bytes, no protocol: the kernel's ceiling.
    tcp_loopback_raw: Timing,
    paths: Vec<PathRow>,
}

#[derive(Debug, Clone, Serialize)]
struct LatencyRow {
    path: Path,
    pulls: u64,
    p50_us: f64,
    p99_us: f64,
    pull_release_p50_us: f64,
    pull_release_p99_us: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Report {
    /// SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64, f32, 16-token blocks.
    layout: String,
    block_bytes: usize,
    bandwidth: Vec<SizeRow>,
    /// One block, checksum on.
    latency: Vec<LatencyRow>,
    /// `/proc/loadavg`'s 1-minute figure at start and at end.
    load_average: [Option<f64>; 2],
    /// The machine's cores, shared by the server, the puller and the checksums.
    cores: usize,
}

impl Report {
    fn new(
        sizes: Vec<SizeResult>,
        latency: Vec<(Path, Vec<f64>, Vec<f64>)>,
        load: [Option<f64>; 2],
        pulls: u64,
    ) -> Self {
        let layout = smollm();
        let bandwidth = sizes
            .into_iter()
            .map(|s| {
                let whole = Timing::of(s.bytes, s.whole);
                let paths = s
                    .paths
                    .into_iter()
                    .map(|p| {
                        let pull = Timing::of(s.bytes, p.pull);
                        let mut release = p.release;
                        release.sort_by(f64::total_cmp);
                        let ratio = pull.best_gb_per_s / whole.best_gb_per_s;
                        PathRow {
                            path: p.path,
                            checksum: p.checksum,
                            release_median_us: percentile(&release, 0.5) * 1e6,
                            ratio_vs_memcpy: ratio,
                            target: p.path.target(),
                            target_met: ratio >= p.path.target(),
                            pull,
                        }
                    })
                    .collect();
                SizeRow {
                    requested_bytes: s.requested,
                    blocks: s.blocks,
                    bytes: s.bytes,
                    reps: s.reps,
                    memcpy_32kib: Timing::of(s.bytes, s.pieces),
                    shm_copy_raw: Timing::of(s.bytes, s.raw_shm),
                    tcp_loopback_raw: Timing::of(s.bytes, s.raw_tcp),
                    memcpy_whole: whole,
                    paths,
                }
            })
            .collect();
        let latency = latency
            .into_iter()
            .map(|(path, mut pull, mut total)| {
                pull.sort_by(f64::total_cmp);
                total.sort_by(f64::total_cmp);
                LatencyRow {
                    path,
                    pulls,
                    p50_us: percentile(&pull, 0.5),
                    p99_us: percentile(&pull, 0.99),
                    pull_release_p50_us: percentile(&total, 0.5),
                    pull_release_p99_us: percentile(&total, 0.99),
                }
            })
            .collect();
        Report {
            layout: format!(
                "SmolLM2-135M: {} layers, {} KV heads, head_dim {}, {}, {}-token blocks",
                layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype, layout.block_size
            ),
            block_bytes: layout.block_bytes(),
            bandwidth,
            latency,
            load_average: load,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    fn table(&self) -> String {
        let load = self.load_average.map(|l| l.map_or("?".to_string(), |l| format!("{l:.2}")));
        let mut out = format!(
            "{NAME}: KV hand-off on loopback, one process; {} ({} B a block)\n\
             load average {} at start, {} at end; {} cores shared by the KV server, the puller and the checksums\n\n",
            self.layout, self.block_bytes, load[0], load[1], self.cores
        );
        out.push_str(
            "bandwidth of one hand-off: pull time into a reused buffer, warm connection; GB = 1e9 B; \
             × memcpy = best GB/s / whole memcpy's best; shm raw = plain copy out of a /dev/shm mapping; \
             tcp raw = plain loopback TCP of the same bytes\n",
        );
        let header = [
            "size",
            "blocks",
            "path",
            "checksum",
            "reps",
            "best ms",
            "median ms",
            "best GB/s",
            "median GB/s",
            "× memcpy",
            "target",
            "met",
            "release µs",
        ];
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
        for s in &self.bandwidth {
            let timing = |t: &Timing| {
                [
                    format!("{:.3}", t.best_ms),
                    format!("{:.3}", t.median_ms),
                    format!("{:.2}", t.best_gb_per_s),
                    format!("{:.2}", t.median_gb_per_s),
                ]
            };
            let mut row = |path: &str, checksum: &str, t: &Timing, rest: [String; 4]| {
                let mut cells = vec![
                    format!("{} ({} B)", size_label(s.requested_bytes), s.bytes),
                    s.blocks.to_string(),
                    path.to_string(),
                    checksum.to_string(),
                    s.reps.to_string(),
                ];
                cells.extend(timing(t));
                cells.extend(rest);
                rows.push(cells);
            };
            let none = || ["-".to_string(), "-".to_string(), "-".to_string(), "-".to_string()];
            row("memcpy", "-", &s.memcpy_whole, none());
            row("memcpy 32 KiB", "-", &s.memcpy_32kib, none());
            row("shm raw (copy)", "-", &s.shm_copy_raw, none());
            row("tcp raw (kernel)", "-", &s.tcp_loopback_raw, none());
            for p in &s.paths {
                row(
                    p.path.name(),
                    if p.checksum { "on" } else { "off" },
                    &p.pull,
                    [
                        format!("{:.2}", p.ratio_vs_memcpy),
                        format!("≥ {:.2}", p.target),
                        if p.target_met { "yes" } else { "no" }.to_string(),
                        format!("{:.0}", p.release_median_us),
                    ],
                );
            }
        }
        out.push_str(&align(&rows, 4));
        out.push_str(&format!("targets: tcp ≥ {TCP_TARGET:.2} × memcpy, shm ≥ {SHM_TARGET:.2} × memcpy\n\n"));
        out.push_str(&format!(
            "latency of a one-block pull ({} B, 16 tokens, checksum on, warm connection)\n",
            self.block_bytes
        ));
        let mut rows: Vec<Vec<String>> =
            vec![["path", "pulls", "p50 µs", "p99 µs", "pull+release p50 µs", "pull+release p99 µs"]
                .iter()
                .map(|s| s.to_string())
                .collect()];
        for l in &self.latency {
            rows.push(vec![
                l.path.name().to_string(),
                l.pulls.to_string(),
                format!("{:.1}", l.p50_us),
                format!("{:.1}", l.p99_us),
                format!("{:.1}", l.pull_release_p50_us),
                format!("{:.1}", l.pull_release_p99_us),
            ]);
        }
        out.push_str(&align(&rows, 1));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("16MiB"), Ok(16 * MIB));
        assert_eq!(parse_size("16M"), Ok(16 * MIB));
        assert_eq!(parse_size("1GiB"), Ok(GIB));
        assert_eq!(parse_size("512kib"), Ok(512 * KIB));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("16 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn labels_and_block_rounding() {
        assert_eq!(size_label(GIB), "1 GiB");
        assert_eq!(size_label(16 * MIB), "16 MiB");
        assert_eq!(size_label(3 * MIB / 2), "1.50 MiB");
        assert_eq!(smollm().block_bytes(), 737_280);
        assert_eq!((MIB as usize).div_ceil(smollm().block_bytes()), 2);
        assert_eq!((GIB as usize).div_ceil(smollm().block_bytes()), 1457);
    }
}

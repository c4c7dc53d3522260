//! `pdserve-tp-bench`: the tensor-parallel communicator and decode speed on
//! CPU ranks, or with `--device cuda` (the `cuda` feature) on GPUs over NCCL.
//!
//! For each size from 4 KiB to 16 MiB of f32 it runs `--world-size` ranks
//! (threads, one per rank, as the workers run them) that all-reduce the same
//! buffer `--reps` times after untimed warm-up rounds, and prints the p50 and
//! p99 latency of one all-reduce (the slowest rank's time for each round),
//! its bus bandwidth as NCCL's tests define it (`2 × (n − 1) / n × bytes /
//! time`: the bytes each rank must send and receive at the least), and a
//! copy of the same bytes measured in the same run. On the CPU the buffers
//! are host memory and the copy a single-threaded memcpy (small sizes stay
//! in the cache, so their memcpy is the cache's speed); on GPUs they are
//! tensors in GPU memory, reduced where they are as the model reduces them,
//! and the copy is GPU 0's device-to-device copy.
//!
//! Then it runs the default model in the engine unsharded and sharded over
//! `--world-size` ranks (as a worker's `--device` and
//! `--tensor-parallel-size` place it) and prints decode tokens/s for one
//! sequence and for `--batch` sequences (128-token prompts, `--max-tokens`
//! generated; llama-batched-bench's S_TG: tokens after every sequence's first
//! over the time they took).
//!
//! On a machine with fewer cores than ranks the ranks take turns on the
//! cores and every barrier waits for a descheduled thread: the figures then
//! show that machine, not the communicator's floor. The load average at
//! start and end is printed.

use std::sync::Barrier;
use std::time::Instant;

use bench::ours::{blocks_for, decode_tokens_per_sec, run, warm_up, Ours};
use bench::{align, load_average, percentile};
use clap::Parser;
use engine::comm::cpu::CpuGroup;
use engine::comm::Communicator;
use engine::model::ComputeDevice;
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "pdserve-tp-bench",
    about = "All-reduce latency and bandwidth of the tensor-parallel communicator, and decode tokens/s at TP=1 and TP=N"
)]
struct Args {
    /// Ranks in the group (GPUs 0..N with `--device cuda`).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=64))]
    world_size: u64,
    /// `cpu`: the CPU communicator and the engine's kernels; `cuda`: NCCL
    /// and the model on GPUs (a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: ComputeDevice,
    /// Timed all-reduces per size.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..))]
    reps: u64,
    /// Sequences of the batched decode figure.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=64))]
    batch: u64,
    /// Tokens each sequence generates in the decode figures.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(2..=512))]
    max_tokens: u32,
    /// The GGUF model of the decode figures.
    #[arg(long, env = "PDSERVE_MODEL", default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: std::path::PathBuf,
    /// Skip the decode figures (the communicator alone).
    #[arg(long)]
    no_decode: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Decode tokens/s of one engine configuration.
#[derive(Debug, Serialize)]
struct DecodeRow {
    tp_size: usize,
    sequences: usize,
    tokens_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Row {
    bytes: usize,
    reps: u64,
    p50_us: f64,
    p99_us: f64,
    /// Bus bandwidth at the p50 latency, GB/s.
    bus_gb_per_s: f64,
    /// A copy of the same bytes (see the module docs), GB/s.
    copy_gb_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    device: String,
    world_size: u64,
    cores: usize,
    load_average_start: Option<f64>,
    load_average_end: Option<f64>,
    all_reduce: Vec<Row>,
    decode: Vec<DecodeRow>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Fails fast, in the engine's words, on a build without CUDA or a missing GPU.
    args.device.candle()?;
    let load_average_start = load_average();
    let sizes: Vec<usize> = (12..=24).step_by(2).map(|p| 1usize << p).collect();
    let world = args.world_size as usize;
    let all_reduce = sizes
        .iter()
        .map(|&bytes| match args.device {
            ComputeDevice::Cpu => Ok(measure_cpu(world, bytes, args.reps)),
            ComputeDevice::Cuda(_) => gpu::measure(world, bytes, args.reps),
        })
        .collect::<anyhow::Result<_>>()?;
    let decode = if args.no_decode { Vec::new() } else { decode_figures(&args)? };
    let report = Report {
        device: args.device.to_string(),
        world_size: args.world_size,
        cores: std::thread::available_parallelism().map_or(1, usize::from),
        load_average_start,
        load_average_end: load_average(),
        all_reduce,
        decode,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Decode tokens/s unsharded and on `--world-size` ranks, one sequence and a batch.
fn decode_figures(args: &Args) -> anyhow::Result<Vec<DecodeRow>> {
    let ours = Ours::load(&args.model)?;
    let prompts = ours.prompts()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut rows = Vec::new();
    let mut tp_sizes = vec![1, args.world_size as usize];
    tp_sizes.dedup();
    for tp_size in tp_sizes {
        let batch = args.batch as usize;
        let blocks = blocks_for(batch, 128 + args.max_tokens as usize);
        let engine = ours.engine_on(args.device, tp_size, blocks, batch)?;
        runtime.block_on(warm_up(&engine, &prompts))?;
        for sequences in [1, batch] {
            let timelines = runtime.block_on(run(&engine, prompts.batch(sequences, 128)?, args.max_tokens))?;
            rows.push(DecodeRow { tp_size, sequences, tokens_per_s: decode_tokens_per_sec(&timelines)? });
        }
    }
    Ok(rows)
}

/// Untimed all-reduces before the timed ones of each size.
const WARMUP: u64 = 10;

/// Runs `rank_loop` on every rank at once, each on its own thread; it times
/// `WARMUP + reps` all-reduces after the barrier and returns the timed ones'
/// seconds. A round's time is its slowest rank's; returns them sorted.
fn rounds<C: Send>(ranks: Vec<C>, reps: u64, rank_loop: impl Fn(C, &Barrier) -> Vec<f64> + Sync) -> Vec<f64> {
    let start = Barrier::new(ranks.len());
    let per_rank: Vec<Vec<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks.into_iter().map(|comm| s.spawn(|| rank_loop(comm, &start))).collect();
        handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
    });
    let mut rounds: Vec<f64> = (0..reps as usize).map(|i| per_rank.iter().map(|t| t[i]).fold(0.0, f64::max)).collect();
    rounds.sort_by(f64::total_cmp);
    rounds
}

/// The row of one size, from its sorted round times.
fn row(world: usize, bytes: usize, reps: u64, rounds: &[f64], copy_gb_per_s: f64) -> Row {
    let p50 = percentile(rounds, 0.5);
    let bus = 2.0 * (world as f64 - 1.0) / world as f64 * bytes as f64 / p50 / 1e9;
    Row { bytes, reps, p50_us: p50 * 1e6, p99_us: percentile(rounds, 0.99) * 1e6, bus_gb_per_s: bus, copy_gb_per_s }
}

/// One size on CPU ranks, host buffers.
fn measure_cpu(world: usize, bytes: usize, reps: u64) -> Row {
    let len = bytes / 4;
    let rounds = rounds(CpuGroup::ranks(world), reps, |comm, start| {
        let mut data = vec![comm.rank() as f32; len];
        let mut times = Vec::with_capacity(reps as usize);
        start.wait();
        for round in 0..WARMUP + reps {
            let t = Instant::now();
            comm.all_reduce_sum(&mut data).expect("all-reduce");
            if round >= WARMUP {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        times
    });
    row(world, bytes, reps, &rounds, memcpy_gb_per_s(bytes, reps))
}

/// The best of 5 timed loops of `reps` copies by `copy` (one copy of a few
/// KiB is too short to time alone), as GB/s of `bytes`.
fn copy_gb_per_s(bytes: usize, reps: u64, mut copy: impl FnMut()) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            copy();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    bytes as f64 / best / 1e9
}

/// Single-threaded memcpy of `bytes`.
fn memcpy_gb_per_s(bytes: usize, reps: u64) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    copy_gb_per_s(bytes, reps, || {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    })
}

/// NCCL over GPUs `0..world`, on tensors in GPU memory.
#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use candle_core::Tensor;
    use engine::comm::nccl::NcclGroup;

    pub fn measure(world: usize, bytes: usize, reps: u64) -> anyhow::Result<Row> {
        let len = bytes / 4;
        let ranks = NcclGroup::ranks(world).map_err(|e| anyhow::anyhow!("{e}"))?;
        let rounds = rounds(ranks, reps, |comm, start| {
            let device = ComputeDevice::Cuda(comm.rank()).candle().expect("CUDA device of a rank");
            let y = Tensor::full(comm.rank() as f32, len, &device).expect("a rank's buffer");
            let mut times = Vec::with_capacity(reps as usize);
            start.wait();
            for round in 0..WARMUP + reps {
                let t = Instant::now();
                // Returns once the sum is complete (the communicator waits for it).
                comm.all_reduce_sum_tensor(&y).expect("all-reduce");
                if round >= WARMUP {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            times
        });
        let device = ComputeDevice::Cuda(0).candle()?;
        let src = Tensor::full(1f32, len, &device)?;
        let copy = copy_gb_per_s(bytes, reps, || {
            drop(src.copy().expect("device copy"));
            device.synchronize().expect("synchronize");
        });
        Ok(row(world, bytes, reps, &rounds, copy))
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    use super::Row;

    pub fn measure(_: usize, _: usize, _: u64) -> anyhow::Result<Row> {
        anyhow::bail!("--device cuda needs a build with --features cuda")
    }
}

fn print_table(r: &Report) {
    let (what, copy) = if r.device == "cpu" {
        ("CPU communicator all-reduce (sum of f32 in host memory)", "memcpy GB/s")
    } else {
        ("NCCL all-reduce (sum of f32 tensors in GPU memory)", "GPU copy GB/s")
    };
    println!(
        "{what}, {} ranks as threads on {} cores; load average {} at start, {} at end",
        r.world_size,
        r.cores,
        r.load_average_start.map_or("?".into(), |l| format!("{l:.2}")),
        r.load_average_end.map_or("?".into(), |l| format!("{l:.2}")),
    );
    println!();
    let header = ["size", "reps", "p50 µs", "p99 µs", "bus GB/s", copy];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for row in &r.all_reduce {
        rows.push(vec![
            size_label(row.bytes),
            row.reps.to_string(),
            format!("{:.1}", row.p50_us),
            format!("{:.1}", row.p99_us),
            format!("{:.2}", row.bus_gb_per_s),
            format!("{:.2}", row.copy_gb_per_s),
        ]);
    }
    print!("{}", align(&rows, 1));
    println!("bus GB/s = 2 × (ranks − 1) / ranks × bytes / p50 (NCCL's bus bandwidth); copy: best of 5 loops of `reps` copies (single-threaded on the CPU)");
    if r.decode.is_empty() {
        return;
    }
    println!();
    println!("Decode in the engine on {}, 128-token prompts (tokens/s after every sequence's first token):", r.device);
    println!();
    let mut rows: Vec<Vec<String>> = vec![["TP", "sequences", "decode tok/s", "vs TP=1"].map(String::from).to_vec()];
    for row in &r.decode {
        let base = r.decode.iter().find(|b| b.tp_size == 1 && b.sequences == row.sequences);
        rows.push(vec![
            row.tp_size.to_string(),
            row.sequences.to_string(),
            format!("{:.1}", row.tokens_per_s),
            base.map_or("?".into(), |b| format!("{:.2}×", row.tokens_per_s / b.tokens_per_s)),
        ]);
    }
    print!("{}", align(&rows, 2));
}

fn size_label(bytes: usize) -> String {
    if bytes >= 1 << 20 {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes >> 10)
    }
}

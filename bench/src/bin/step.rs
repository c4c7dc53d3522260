//! `pdserve-step-bench`: what a forward step costs by how many rows it carries: one sequence's
//! `r` new tokens at a given context, a logits row each, as a speculative verifying pass of
//! `r - 1` drafts computes them, against a one-row decode.
//!
//! A verifying pass of `r` rows gains time only when it yields more tokens than its cost in
//! one-row steps, so the ratios here bound what speculation can give on this machine: with the
//! tokens per verifying pass that `pdserve-spec-bench` prints, the decode speed-up is at most
//! that figure over the ratio of the pass's rows. The step runs straight on the model (no
//! scheduler, no sampling), the row counts interleaved so that a drift of the machine's speed
//! touches them all alike; each figure is the median over `--iterations` steps. CPU time is the
//! process's threads' time on a CPU over the step (`/proc/self/task/*/schedstat`, in ns), which
//! other tenants of the machine do not inflate as they do the wall time.
//!
//! Under the table, what bounds each extra row: its multiply-adds (every weight of every product,
//! the LM head's included), the least time they take at this CPU's peak rate of int8
//! multiply-adds (AVX-512 VNNI's `vpdpbusd` on every thread, the instruction the quantized
//! weights' products run on, which no kernel passes), and what a row past the first cost at each
//! context: its products, its attention over the context, its norms and activations.

use std::path::PathBuf;
use std::time::Instant;

use bench::{align, load_average, percentile};
use clap::Parser;
use engine::{Forward, ForwardBatch, KvStorage};

const NAME: &str = "pdserve-step-bench";

/// Tokens per KV block of the cache the steps run over.
const BLOCK_SIZE: usize = 16;

#[derive(Debug, Parser)]
#[command(name = NAME, version, about = "The cost of a forward step by its rows")]
struct Args {
    /// The GGUF to run.
    #[arg(long, env = "PDSERVE_MODEL", default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Tokens already in the sequence's cache, each a row of the table (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "50,300")]
    context: Vec<usize>,
    /// Most rows a step carries: every count from 1 up is measured.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(1..=64))]
    rows: u32,
    /// Steps of each row count.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    iterations: u32,
    /// Threads (default: the machine's cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
}

fn main() {
    let args: Args = cluster::cli::parse(NAME);
    let threads =
        args.threads.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |t| t as usize);
    cluster::cli::exit_on_error(NAME, bench::set_threads(threads).and_then(|()| run(&args, threads)));
}

/// Nanoseconds the process's threads have spent on a CPU; `None` without `/proc`'s schedstat.
fn cpu_ns() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Median wall and CPU milliseconds of a step, per row count (index 0: one row).
struct Costs {
    wall: Vec<f64>,
    cpu: Option<Vec<f64>>,
}

fn measure(model: &engine::model::Llama, context: usize, rows: usize, iterations: u32) -> anyhow::Result<Costs> {
    let blocks = (context + rows).div_ceil(BLOCK_SIZE);
    let mut kv = KvStorage::new(model.kv_shape(BLOCK_SIZE, blocks));
    let table: Vec<u32> = (0..blocks as u32).collect();
    let vocab = model.vocab_size() as u32;
    // Any tokens do: the step's cost does not depend on them.
    let prompt: Vec<u32> = (0..context as u32).map(|i| (100 + 7 * i) % vocab).collect();
    if context > 0 {
        let mut batch = ForwardBatch::default();
        batch.push(&prompt, 0, context, table.clone(), true);
        model.forward(&batch, &mut kv)?;
    }
    let (mut wall, mut cpu) = (vec![Vec::new(); rows], vec![Vec::new(); rows]);
    // One untimed round first: the first steps pay for page faults.
    for round in 0..=iterations {
        for r in 1..=rows {
            let tokens: Vec<u32> = (0..r as u32).map(|i| (200 + i) % vocab).collect();
            let mut batch = ForwardBatch::default();
            batch.push(&tokens, context, context, table.clone(), true);
            // Every row's logits, as a verifying pass.
            batch.score_last();
            // The CPU reading (a few /proc files) before the clock starts and after it stops.
            let cpu_start = cpu_ns();
            let start = Instant::now();
            model.forward(&batch, &mut kv)?;
            let elapsed = start.elapsed().as_secs_f64() * 1e3;
            let cpu_used = cpu_ns().zip(cpu_start).map(|(end, start)| end.saturating_sub(start) as f64 / 1e6);
            if round > 0 {
                wall[r - 1].push(elapsed);
                cpu[r - 1].extend(cpu_used);
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.5)
    };
    let cpu = cpu.iter().all(|c| c.len() == iterations as usize).then(|| cpu.into_iter().map(median).collect());
    Ok(Costs { wall: wall.into_iter().map(median).collect(), cpu })
}

fn run(args: &Args, threads: usize) -> anyhow::Result<()> {
    let loaded =
        engine::model::load_gguf(&args.model).map_err(|e| anyhow::anyhow!("loading {}: {e}", args.model.display()))?;
    let load_start = load_average();
    let mut table = vec![["context", "rows", "wall ms", "vs 1 row", "CPU ms", "vs 1 row"].map(String::from).to_vec()];
    let mut measured = Vec::new();
    for &context in &args.context {
        let costs = measure(&loaded.model, context, args.rows as usize, args.iterations)?;
        for (i, wall) in costs.wall.iter().enumerate() {
            let cpu = costs.cpu.as_ref().map(|c| (c[i], c[i] / c[0]));
            table.push(vec![
                context.to_string(),
                (i + 1).to_string(),
                format!("{wall:.3}"),
                format!("{:.2}×", wall / costs.wall[0]),
                cpu.map_or("-".into(), |(c, _)| format!("{c:.3}")),
                cpu.map_or("-".into(), |(_, r)| format!("{r:.2}×")),
            ]);
        }
        eprintln!("{NAME}: context {context} done");
        measured.push((context, costs));
    }
    println!(
        "forward steps of one sequence by rows (a logits row each), {} on {threads} threads, median of {} steps",
        args.model.display(),
        args.iterations
    );
    let load = |l: Option<f64>| l.map_or("-".into(), |l| format!("{l:.2}"));
    println!("load average {} at start, {} at end\n", load(load_start), load(load_average()));
    println!("{}", align(&table, 0));
    println!("a verifying pass of r rows saves time only when it gives more tokens than its cost in one-row steps");
    let macs = multiply_adds_per_row(loaded.model.config());
    let peak = int8_peak(threads);
    println!("\neach row's products: {:.1} M multiply-adds", macs / 1e6);
    match peak {
        Some(peak) => println!(
            "this CPU's int8 peak: {:.0} G multiply-adds/s (vpdpbusd on {threads} threads): a row's products take at least {:.3} ms",
            peak / 1e9,
            macs / peak * 1e3
        ),
        None => println!("this CPU's int8 peak: not measured (no AVX-512 VNNI)"),
    }
    for (context, costs) in &measured {
        let (rows, last) = (costs.wall.len(), costs.wall.last().copied().unwrap_or(0.0));
        if rows > 1 {
            let extra = (last - costs.wall[0]) / (rows - 1) as f64;
            let floor = peak.map_or(String::new(), |peak| format!(", {:.1}× that least", extra / (macs / peak * 1e3)));
            println!("context {context}: each row past the first {extra:.3} ms (over rows 2-{rows}){floor}");
        }
    }
    Ok(())
}

/// Multiply-adds of one token's products in a dense model: attention's Q, K, V and output
/// projections, the gated MLP's three, and the LM head.
fn multiply_adds_per_row(c: &engine::model::Config) -> f64 {
    let attention = c.hidden * (c.q_dim() + 2 * c.kv_dim()) + c.q_dim() * c.hidden;
    let mlp = 3 * c.hidden * c.ffn;
    (c.num_layers * (attention + mlp) + c.hidden * c.vocab_size) as f64
}

/// Multiply-adds per second that `threads` threads issuing nothing but independent `vpdpbusd`
/// (64 int8 multiply-adds each) reach; `None` on a CPU without AVX-512 VNNI.
fn int8_peak(threads: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni") {
        const ROUNDS: u64 = 10_000_000;
        let start = Instant::now();
        let spinners: Vec<_> = (0..threads)
            .map(|_| {
                // SAFETY: the CPU has the features (checked above).
                std::thread::spawn(|| unsafe { vnni::spin(ROUNDS) })
            })
            .collect();
        let sums: i32 = spinners.into_iter().map(|s| s.join().unwrap_or(0)).fold(0, i32::wrapping_add);
        std::hint::black_box(sums);
        let total = threads as f64 * ROUNDS as f64 * (vnni::CHAINS * 64) as f64;
        return Some(total / start.elapsed().as_secs_f64());
    }
    let _ = threads;
    None
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    /// Independent accumulators: enough to cover the instruction's latency on every port.
    pub const CHAINS: usize = 16;

    /// `rounds` rounds of one `vpdpbusd` per accumulator.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 VNNI.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn spin(rounds: u64) -> i32 {
        // Values the compiler cannot see, so that it cannot fold the products.
        let (a, b) = (std::hint::black_box(_mm512_set1_epi8(3)), std::hint::black_box(_mm512_set1_epi8(5)));
        let mut chains = [_mm512_setzero_si512(); CHAINS];
        for _ in 0..rounds {
            for chain in chains.iter_mut() {
                *chain = _mm512_dpbusd_epi32(*chain, a, b);
            }
        }
        let sum = chains.iter().fold(_mm512_setzero_si512(), |s, &c| _mm512_add_epi32(s, c));
        _mm512_reduce_add_epi32(sum)
    }
}

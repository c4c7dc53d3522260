//! `pdserve-bench`: this engine and llama.cpp on the same GGUF, the same machine and the same thread
//! count, in one run, side by side.
//!
//! Our engine runs in-process (`engine::model::load_gguf`, `Engine::start`, `EngineHandle::submit`,
//! as the workers build it); llama.cpp runs as `llama-batched-bench` and `llama-server` built by
//! `scripts/setup-llama-cpp.sh`.
//!
//! # The five figures
//!
//! 1. **Single-stream decode tokens/s**: one 128-token prompt, 128 tokens generated. Target ≥ 1.0×
//!    llama.cpp.
//! 2. **Aggregate decode tokens/s at 16 sequences**: 16 distinct 128-token prompts submitted at
//!    once, 128 tokens each. Target ≥ 1.3× llama.cpp.
//! 3. **Prefill tokens/s**, one 512-token prompt: 512 / (time from submit to the first token);
//!    llama.cpp: `S_PP` of `llama-batched-bench -npp 512 -npl 1`. Target ≥ 1.0×.
//! 4. **TTFT with a cached 1,024-token prefix over TTFT uncached** (a 32-token suffix after the
//!    prefix; median of 3 rounds). Ours with prefix caching; llama.cpp's own through `llama-server
//!    -np 1` with `cache_prompt` (wall time of a one-token completion). Target ≤ 25% (ours).
//! 5. **Peak RSS** (`VmHWM`) of a child process running 64 sequences of 1,024 tokens (1,000-token
//!    prompts, 24 generated) at once, against the budget `(weights + KV) × 1.10`: weights is the
//!    resident-set growth across `load_gguf`, KV is the engine's cache sized for exactly those
//!    sequences (blocks × block bytes). Ours only.
//!
//! # Decode tokens/s, defined the same on both sides
//!
//! llama-batched-bench's `S_TG` is `pl × tg / t_tg`: `tg` one-token decode steps for `pl`
//! sequences after the prompts are in the cache, prefill excluded. Ours counts the same thing from
//! token arrival times: the tokens that arrive after every sequence has its first token (the first
//! token comes from the prefill logits, so what follows are decode steps), over the time from that
//! moment to the last token. With one sequence that is (generated − 1) / (t_last − t_first).
//!
//! # Fairness
//!
//! - Same thread count: `--threads` (default: the machine's cores) sizes rayon's global pool and
//!   candle's pools (`RAYON_NUM_THREADS` / `CANDLE_NUM_THREADS`, read when candle first computes),
//!   and is passed to llama.cpp as `-t` and `-tb`.
//! - Prompts are real token ids (tokenized English text) that differ per sequence from the first
//!   block on, and figures 1–3 run with prefix caching off, so no cache hit inflates them.
//!   llama-batched-bench uses random ids; the speed of a forward pass does not depend on the ids.
//! - Our engine is warmed up with one short request first; llama-batched-bench warms itself up.
//! - Ours and llama.cpp run one after the other, never at once; other load on the machine makes
//!   every figure noisy (±10–15% on a shared 2-core box). llama.cpp's threads meet at a barrier
//!   after every operation, so when other processes take the cores it slows down far more than
//!   ours: the report prints the load average at start and end, and only runs on an otherwise idle
//!   machine compare fairly.

mod figures;
mod report;
mod rss;

use bench::llama_cpp::LlamaCpp;
use bench::ours;
use clap::{Parser, Subcommand};
use ours::Ours;
use report::Report;
use std::path::PathBuf;

const NAME: &str = "pdserve-bench";

/// Compares this engine with llama.cpp on the same GGUF and thread count.
#[derive(Debug, Parser)]
#[command(name = NAME, version)]
struct Args {
    /// GGUF model file, run by both engines.
    #[arg(long, env = "PDSERVE_MODEL", default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Where llama-batched-bench and llama-server are (scripts/setup-llama-cpp.sh builds them).
    #[arg(long, default_value = ".cache/llama.cpp/bin")]
    llama_cpp_dir: PathBuf,
    /// Threads for both engines (default: the machine's cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Run one figure only (1 to 5).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=5))]
    only: Option<u8>,
    /// Measure our engine only.
    #[arg(long)]
    skip_llama_cpp: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    child: Option<ChildCommand>,
}

#[derive(Debug, Subcommand)]
enum ChildCommand {
    /// Figure 5's measurement, run in a fresh process by the bench itself.
    #[command(name = "rss-child", hide = true)]
    RssChild {
        #[arg(long)]
        seqs: usize,
        #[arg(long)]
        tokens: usize,
        #[arg(long)]
        generated: usize,
    },
}

fn main() {
    let args: Args = cluster::cli::parse(NAME);
    let threads =
        args.threads.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |n| n as usize);
    cluster::cli::exit_on_error(NAME, bench::set_threads(threads).and_then(|()| run(args, threads)));
}

fn run(args: Args, threads: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    if let Some(ChildCommand::RssChild { seqs, tokens, generated }) = args.child {
        let report = runtime.block_on(rss::child(&args.model, seqs, tokens, generated))?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    anyhow::ensure!(args.model.is_file(), "model file {} not found (run scripts/fetch-model.sh)", args.model.display());
    // The comparison is the point of a run: without the baseline it stops before measuring.
    let llama = LlamaCpp::find_unless(args.skip_llama_cpp, &args.llama_cpp_dir, threads, &args.model)?;
    let load_at_start = bench::load_average();
    let wanted = |n: u8| args.only.is_none_or(|only| only == n);
    let ours = if (1..=4).any(wanted) { Some(Ours::load(&args.model)?) } else { None };
    let mut figures = Vec::new();
    if let Some(ours) = &ours {
        figures.extend(runtime.block_on(figures::throughput(ours, llama.as_ref(), &wanted))?);
        if wanted(4) {
            figures.push(runtime.block_on(figures::prefix_ttft(ours, llama.as_ref()))?);
        }
    }
    if wanted(5) {
        figures.push(figures::peak_rss(&args.model, threads));
    }
    let report = Report {
        model: args.model.display().to_string(),
        threads,
        load_average: [load_at_start, bench::load_average()],
        llama_cpp_missing: llama.is_none().then(|| "skipped (--skip-llama-cpp)".to_string()),
        figures,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    // A side that failed (llama.cpp crashing, say) leaves its figures without a comparison: the
    // report shows why, and the run fails so no script takes it for a complete one.
    let failed: Vec<String> =
        report.figures.iter().filter(|f| !f.errors.is_empty()).map(|f| f.number.to_string()).collect();
    anyhow::ensure!(
        failed.is_empty(),
        "figure(s) {} incomplete: a side failed (its error is in the report)",
        failed.join(", ")
    );
    Ok(())
}

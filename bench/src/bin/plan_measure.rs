//! `pdserve-plan-measure`: measures the cost profile `pdserve-plan` simulates
//! with, by running the real engine in-process (as the workers run it), and
//! fits it by least squares (`planner::fit`).
//!
//! - Prefill: one prompt at a time on an idle engine, `max_tokens` 1, at each
//!   `--prompt-lens`; a prompt within the step budget (2,048 tokens) is one
//!   step, so its TTFT is one prefill step. The median of `--repeats`.
//! - Decode: `B` prompts of `C` tokens submitted together for each `B` in
//!   `--batches` and `C` in `--contexts`, `--decode-tokens` each with EOS
//!   ignored. Once every sequence has its first token every step is a pure
//!   decode of all `B`; the step time is `B` over the decode tokens/s of that
//!   window (`bench::ours::decode_tokens_per_sec`), the context its mean.
//! - Hand-off: the KV bytes of one token from the model's KV shape; the
//!   bandwidth and fixed latency are flags. The defaults fit what the README
//!   reports for the development VM: shared memory with its checksum moves
//!   about 4 GB/s (`pdserve-kv-bench`), and a 1,024-token prompt's 47 MB hand-off
//!   adds about 23 ms to the second token (`pdserve-handoff-ttft`), so about
//!   11 ms of it is fixed. Calibrate both on the machine you plan for.
//!
//! Prefix caching is off and every prompt is distinct, so no step is shortened
//! by a cache hit. Writes the profile JSON (with its samples) to `--out` or
//! stdout, and a measured-against-fitted table to stderr.

use anyhow::Context;
use bench::load_average;
use bench::ours::{blocks_for, decode_tokens_per_sec, run, warm_up, Ours, BLOCK_SIZE};
use clap::Parser;
use planner::cost::{CostProfile, DecodeSample, HandoffCost, PrefillSample};
use planner::fit::{fit_decode, fit_prefill};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "pdserve-plan-measure", about = "Measure the engine's step costs and fit pdserve-plan's cost profile")]
struct Args {
    /// The GGUF model to measure.
    #[arg(long, env = "PDSERVE_MODEL", default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Prompt lengths of the prefill samples (each at most 2,048: one step).
    #[arg(long, value_delimiter = ',', default_value = "16,64,128,256,512,1024,2000")]
    prompt_lens: Vec<usize>,
    /// Batch sizes of the decode samples.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
    batches: Vec<usize>,
    /// Prompt lengths of the decode samples (the KV each sequence attends over).
    #[arg(long, value_delimiter = ',', default_value = "32,256")]
    contexts: Vec<usize>,
    /// Tokens each decode sample generates.
    #[arg(long, default_value_t = 17, value_parser = clap::value_parser!(u32).range(4..))]
    decode_tokens: u32,
    /// Timings per prefill length (the median is kept).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    repeats: u32,
    /// Hand-off throughput, GB/s.
    #[arg(long, default_value_t = 4.0)]
    handoff_bandwidth_gbps: f64,
    /// Hand-off fixed cost, milliseconds.
    #[arg(long, default_value_t = 11.0)]
    handoff_latency_ms: f64,
    /// Where to write the profile (default: stdout).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.prompt_lens.iter().all(|&l| (1..=2048).contains(&l)),
        "--prompt-lens must be in 1..=2048 (one step of the 2,048-token budget)"
    );
    anyhow::ensure!(args.batches.iter().all(|&b| (1..=256).contains(&b)), "--batches must be in 1..=256");
    let load_start = load_average();
    let ours = Ours::load(&args.model)?;
    let prompts = ours.prompts()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;

    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let max_context = args.contexts.iter().copied().max().unwrap_or(1) + args.decode_tokens as usize;
    let longest = args.prompt_lens.iter().copied().max().unwrap_or(1);
    let blocks = blocks_for(max_batch, max_context).max(blocks_for(1, longest + 1)) + 16;
    let engine = ours.engine(blocks, max_batch, false);
    runtime.block_on(warm_up(&engine, &prompts))?;

    let mut prefill = Vec::new();
    for &len in &args.prompt_lens {
        let mut times = Vec::new();
        for _ in 0..args.repeats {
            let timeline = runtime.block_on(run(&engine, vec![prompts.next(len)?], 1))?;
            times.push(timeline[0].ttft_secs());
        }
        times.sort_by(f64::total_cmp);
        let secs = times[times.len() / 2];
        eprintln!("prefill {len:>5} tokens: {:8.2} ms", secs * 1e3);
        prefill.push(PrefillSample { tokens: len as u64, context: 0, secs });
    }

    let mut decode = Vec::new();
    for &context in &args.contexts {
        for &batch in &args.batches {
            let timelines = runtime.block_on(run(&engine, prompts.batch(batch, context)?, args.decode_tokens))?;
            let secs = batch as f64 / decode_tokens_per_sec(&timelines)?;
            // The counted steps feed generated tokens 2..=decode_tokens: each
            // sequence attends over its prompt plus about half of them.
            let per_seq = context as f64 + (f64::from(args.decode_tokens) + 2.0) / 2.0;
            let total = (batch as f64 * per_seq).round() as u64;
            eprintln!("decode batch {batch:>3} x {context:>5} context: {:8.2} ms/step", secs * 1e3);
            decode.push(DecodeSample { batch: batch as u64, context: total, secs });
        }
    }

    let profile = CostProfile {
        description: format!(
            "{} on {} cores, load average {} -> {}; hand-off {} GB/s + {} ms (flags)",
            args.model.file_name().map_or_else(|| args.model.display().to_string(), |f| f.to_string_lossy().into()),
            std::thread::available_parallelism().map_or(1, usize::from),
            load_start.map_or("?".into(), |l| format!("{l:.2}")),
            load_average().map_or("?".into(), |l| format!("{l:.2}")),
            args.handoff_bandwidth_gbps,
            args.handoff_latency_ms,
        ),
        prefill: fit_prefill(&prefill)?,
        decode: fit_decode(&decode)?,
        handoff: HandoffCost {
            latency_s: args.handoff_latency_ms / 1e3,
            bytes_per_token: ours.block_bytes() as f64 / BLOCK_SIZE as f64,
            bandwidth_bytes_per_s: args.handoff_bandwidth_gbps * 1e9,
        },
        prefill_samples: prefill,
        decode_samples: decode,
    };
    profile.validate()?;
    report_fit(&profile);
    let json = serde_json::to_string_pretty(&profile)?;
    match &args.out {
        Some(path) => std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?,
        None => println!("{json}"),
    }
    Ok(())
}

/// Each sample beside what the fitted profile predicts for it.
fn report_fit(profile: &CostProfile) {
    let p = &profile.prefill;
    let d = &profile.decode;
    eprintln!(
        "fit: prefill {:.3} ms + {:.4} ms/token + {:.3e} ms/attention pair; decode {:.3} ms + {:.4} ms/seq + {:.3e} ms/context token",
        p.base_s * 1e3,
        p.per_token_s * 1e3,
        p.per_attention_pair_s * 1e3,
        d.base_s * 1e3,
        d.per_seq_s * 1e3,
        d.per_context_token_s * 1e3
    );
    for s in &profile.prefill_samples {
        let fitted = p.step_secs(s.tokens, planner::cost::attention_pairs(s.tokens, s.context));
        eprintln!(
            "  prefill {:>5}: measured {:8.2} ms, fitted {:8.2} ms ({:+.1}%)",
            s.tokens,
            s.secs * 1e3,
            fitted * 1e3,
            (fitted / s.secs - 1.0) * 100.0
        );
    }
    for s in &profile.decode_samples {
        let fitted = d.step_secs(s.batch, s.context);
        eprintln!(
            "  decode {:>3} seqs, {:>6} ctx: measured {:7.2} ms, fitted {:7.2} ms ({:+.1}%)",
            s.batch,
            s.context,
            s.secs * 1e3,
            fitted * 1e3,
            (fitted / s.secs - 1.0) * 100.0
        );
    }
}

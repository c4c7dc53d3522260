//! `pdserve-structured-bench`: what structured outputs cost the engine, on the default model.
//!
//! - **Compile time** of each schema of the test corpus (`tests/data/structured/schemas.json`)
//!   against the model's vocabulary, and the one-off vocabulary build.
//! - **Decode tokens/s** with a JSON schema against the same requests unconstrained, run side by
//!   side in the same process: one sequence and `--batch` sequences, greedy, `--max-tokens` each
//!   (the schema's array is long enough that no answer completes before that, and eos is ignored,
//!   so both runs generate exactly as many tokens).
//! - **Mask time per token** (p50/p99/mean): every mask the engine's samplers computed in the
//!   constrained runs (on the step thread, between the forward pass and the draw), as a worker's
//!   `structured_output_mask_seconds` histogram sees them; and the mean for a whole batch as a
//!   share of a decode step.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bench::ours::{blocks_for, decode_tokens_per_sec, run_constrained, warm_up, Ours};
use bench::{align, load_average, percentile};
use clap::Parser;
use constraint::{Constraint, Vocabulary, Whitespace};
use prompt::decode::Decoder;
use serde::Serialize;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "pdserve-structured-bench",
    about = "Compile time, mask time and decode tokens/s of structured outputs"
)]
struct Args {
    /// Sequences of the batched figure.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=64))]
    batch: u64,
    /// Tokens each sequence generates.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(8..=512))]
    max_tokens: u32,
    /// The GGUF model.
    #[arg(long, env = "PDSERVE_MODEL", default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: std::path::PathBuf,
    /// The schema corpus whose compile times are measured.
    #[arg(long, default_value = "tests/data/structured/schemas.json")]
    schemas: std::path::PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct DecodeRow {
    sequences: usize,
    unconstrained_tokens_per_s: f64,
    constrained_tokens_per_s: f64,
    ratio: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    vocabulary_build_ms: f64,
    schemas: usize,
    compile_ms_p50: f64,
    compile_ms_p99: f64,
    compile_ms_max: f64,
    masks: usize,
    mask_us_p50: f64,
    mask_us_p99: f64,
    mask_us_mean: f64,
    decode: Vec<DecodeRow>,
    /// A whole batch's masks (mean × sequences) over one decode step of that batch.
    batch_mask_share_of_step: f64,
    load_average_start: Option<f64>,
    load_average_end: Option<f64>,
}

/// Objects enough that no answer of `--max-tokens` completes the array.
fn bench_constraint() -> Constraint {
    let schema = json!({
        "type": "array", "minItems": 200,
        "items": {"type": "object", "additionalProperties": false, "required": ["id", "name", "tags", "score"],
                  "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 100000},
                                 "name": {"type": "string", "maxLength": 16},
                                 "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["new", "used", "rare"]}},
                                 "score": {"type": "number", "minimum": 0, "maximum": 10}}}
    });
    Constraint::Json { schema, whitespace: Whitespace::Compact }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let load_average_start = load_average();
    let ours = Ours::load(&args.model)?;
    let batch = args.batch as usize;
    let engine = ours.engine(blocks_for(batch, 64 + args.max_tokens as usize + 16), batch, false);

    let started = Instant::now();
    let decoder = Decoder::new(Arc::new(ours.tokenizer.clone()));
    let masks: Arc<Mutex<Vec<f64>>> = Arc::default();
    let observed = masks.clone();
    let vocabulary = Vocabulary::new(&decoder, engine.vocab_size(), ours.eos_token_ids())?
        .with_mask_observer(Arc::new(move |took| observed.lock().expect("unpoisoned").push(took.as_secs_f64() * 1e6)));
    let vocabulary_build_ms = started.elapsed().as_secs_f64() * 1e3;

    let corpus: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&args.schemas)?)?;
    let mut compile_ms = Vec::with_capacity(corpus.len());
    for case in &corpus {
        let constraint = Constraint::Json { schema: case["schema"].clone(), whitespace: Whitespace::Compact };
        let (_, took) = vocabulary.compile(&constraint)?;
        compile_ms.push(took.as_secs_f64() * 1e3);
    }
    compile_ms.sort_by(f64::total_cmp);

    let (grammar, _) = vocabulary.compile(&bench_constraint())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let prompts = ours.prompts()?;
    let mut decode = Vec::new();
    runtime.block_on(async {
        warm_up(&engine, &prompts).await?;
        for sequences in [1, batch] {
            let batch_prompts = prompts.batch(sequences, 64)?;
            let free = run_constrained(&engine, batch_prompts.clone(), args.max_tokens, None).await?;
            let held = run_constrained(&engine, batch_prompts, args.max_tokens, Some(&grammar)).await?;
            anyhow::ensure!(
                held.iter().all(|t| t.tokens.len() == args.max_tokens as usize),
                "a constrained answer ended early"
            );
            let (free, held) = (decode_tokens_per_sec(&free)?, decode_tokens_per_sec(&held)?);
            decode.push(DecodeRow {
                sequences,
                unconstrained_tokens_per_s: free,
                constrained_tokens_per_s: held,
                ratio: held / free,
            });
        }
        anyhow::Ok(())
    })?;

    let mut mask_us = std::mem::take(&mut *masks.lock().expect("unpoisoned"));
    mask_us.sort_by(f64::total_cmp);
    let mask_us_mean = mask_us.iter().sum::<f64>() / mask_us.len().max(1) as f64;
    let batched = decode.last().expect("two decode rows");
    let (batch_sequences, step_us) =
        (batched.sequences, 1e6 * batched.sequences as f64 / batched.unconstrained_tokens_per_s);
    let report = Report {
        vocabulary_build_ms,
        schemas: corpus.len(),
        compile_ms_p50: percentile(&compile_ms, 0.5),
        compile_ms_p99: percentile(&compile_ms, 0.99),
        compile_ms_max: compile_ms.last().copied().unwrap_or(f64::NAN),
        masks: mask_us.len(),
        mask_us_p50: percentile(&mask_us, 0.5),
        mask_us_p99: percentile(&mask_us, 0.99),
        mask_us_mean,
        batch_mask_share_of_step: mask_us_mean * batch_sequences as f64 / step_us,
        decode,
        load_average_start,
        load_average_end: load_average(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "vocabulary build {:.1} ms; compile of {} schemas: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        report.vocabulary_build_ms, report.schemas, report.compile_ms_p50, report.compile_ms_p99, report.compile_ms_max
    );
    println!(
        "mask per token ({} masks in the engine): p50 {:.1} µs, p99 {:.1} µs, mean {:.1} µs; a batch of {} (mean) is {:.1}% of its decode step",
        report.masks,
        report.mask_us_p50,
        report.mask_us_p99,
        report.mask_us_mean,
        batch_sequences,
        100.0 * report.batch_mask_share_of_step
    );
    let mut rows = vec![["sequences", "unconstrained tok/s", "JSON schema tok/s", "ratio"].map(String::from).to_vec()];
    for r in &report.decode {
        rows.push(vec![
            r.sequences.to_string(),
            format!("{:.1}", r.unconstrained_tokens_per_s),
            format!("{:.1}", r.constrained_tokens_per_s),
            format!("{:.3}×", r.ratio),
        ]);
    }
    print!("{}", align(&rows, 1));
    println!(
        "target: ratio ≥ 0.9×; load average {} at start, {} at end",
        report.load_average_start.map_or("?".into(), |l| format!("{l:.2}")),
        report.load_average_end.map_or("?".into(), |l| format!("{l:.2}"))
    );
    Ok(())
}

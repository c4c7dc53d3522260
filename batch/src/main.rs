//! `pdserve-batch`: offline batch inference over a JSONL file, like vLLM's `LLM.generate` /
//! `LLM.chat`, through [`engine::offline::Llm`].
//!
//! ```text
//! pdserve-batch --model M.gguf --input prompts.jsonl --output results.jsonl [engine flags]
//! ```
//!
//! Every line of the input becomes one request (see [`input`] for the format); all are submitted
//! to the engine at once and batched by it. The output has one JSON line per input line, in input
//! order (see [`output`]). A progress bar on stderr shows requests done, tokens/s and the ETA.
//!
//! # Errors
//!
//! - A malformed line (bad JSON, an unknown field, no prompt, a sampling value out of range) fails
//!   the whole run **before the model is loaded**, naming every bad line: nothing has run, so
//!   nothing is lost, and the file can be fixed and run again.
//! - A request the engine refuses or fails once running (a prompt longer than the context, a
//!   token id outside the vocabulary, a chat the template rejects) gets an error record
//!   (`{"line", "id", "error"}`) at its place in the output; the other requests' results are
//!   all written, and the run exits with status 1 saying how many failed.

mod input;
mod output;

use anyhow::Context;
use clap::Parser;
use engine::offline::{Llm, Progress, TextConfig};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;
use worker::args::EngineArgs;

const NAME: &str = "pdserve-batch";

/// Offline batch inference: a JSONL file of prompts in, a JSONL file of completions out.
#[derive(Debug, Parser)]
#[command(name = NAME, version)]
struct Args {
    #[command(flatten)]
    engine: EngineArgs,
    /// Requests, one JSON object per line: {"prompt": ...} | {"prompt_token_ids": [...]} |
    /// {"messages": [...]}, with optional "id" and sampling fields (max_tokens, temperature, ...).
    #[arg(long)]
    input: PathBuf,
    /// Where the results go, one JSON line per input line, in input order.
    #[arg(long)]
    output: PathBuf,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

fn main() {
    let args: Args = cluster::cli::parse(NAME);
    let telemetry = cluster::telemetry::init(NAME);
    let ran = run(args);
    drop(telemetry);
    cluster::cli::exit_on_error(NAME, ran);
}

fn run(args: Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.input).with_context(|| format!("reading {}", args.input.display()))?;
    let lines = input::parse(&text).map_err(|errors| {
        let more = match errors.len() {
            1 => String::new(),
            n => format!(" ({} more bad lines, the first at line {})", n - 1, errors[1].number),
        };
        anyhow::anyhow!("{}: {}{more}; nothing was run", args.input.display(), errors[0])
    })?;
    // Create the output before the (slow) model load, so a bad path fails at once.
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&args.output).with_context(|| format!("creating {}", args.output.display()))?,
    );

    let loaded = worker::load::load_engine(&args.engine)?;
    let card = loaded.card;
    let tokenizer = tokenizers::Tokenizer::from_str(&card.tokenizer_json)
        .map_err(|e| anyhow::anyhow!("reading the model's tokenizer: {e}"))?;
    let bos_token_id = Some(card.bos_token.as_str()).filter(|t| !t.is_empty()).and_then(|t| tokenizer.token_to_id(t));
    let text_config = TextConfig {
        chat_template: Some(card.chat_template).filter(|t| !t.is_empty()),
        bos_token: card.bos_token,
        eos_token: card.eos_token,
        add_bos_token: card.add_bos_token,
        bos_token_id,
        eos_token_ids: card.eos_token_ids,
    };
    let llm = Llm::from_engine(loaded.engine, tokenizer, text_config)?;

    let bar = progress_bar(lines.len() as u64, args.no_progress);
    let mut last = None;
    // Sampled lines run together; beam-search lines each run their search after them.
    let (beams, sampled): (Vec<&input::Line>, Vec<&input::Line>) = lines.iter().partition(|l| l.beam.is_some());
    let requests = sampled.iter().map(|l| l.request.clone()).collect();
    let mut results = llm.run(requests, &mut |p: &Progress| {
        bar.set_position(p.done as u64);
        bar.set_message(format!("{} tokens, {:.1} tok/s", p.generated_tokens, p.tokens_per_sec()));
        last = Some(*p);
    });
    bar.finish_and_clear();
    let mut records: Vec<(usize, serde_json::Value, bool)> = sampled
        .iter()
        .zip(results.drain(..))
        .map(|(line, result)| match result {
            Ok(o) => (line.number, output::success(line, &o), true),
            Err(e) => (line.number, output::failure(line, &e), false),
        })
        .collect();
    for line in beams {
        let Some((params, prompt)) = line.beam.clone() else { continue };
        records.push(match llm.beam_search(vec![prompt], &params) {
            Ok(mut found) => (line.number, output::beams(line, &found.remove(0)), true),
            Err(e) => (line.number, output::failure(line, &e), false),
        });
    }
    records.sort_by_key(|(number, _, _)| *number);

    let mut failed = 0;
    for (_, record, ok) in records {
        failed += usize::from(!ok);
        serde_json::to_writer(&mut out, &record)?;
        out.write_all(b"\n")?;
    }
    out.flush().with_context(|| format!("writing {}", args.output.display()))?;

    if let Some(p) = last {
        eprintln!(
            "{NAME}: {} requests, {} tokens generated in {:.1} s ({:.1} tok/s) -> {}",
            p.total,
            p.generated_tokens,
            p.elapsed.as_secs_f64(),
            p.tokens_per_sec(),
            args.output.display()
        );
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} requests failed (error records in {})",
        lines.len(),
        args.output.display()
    );
    Ok(())
}

/// Requests done of total, tokens/s, ETA; drawn on stderr only when it is a terminal.
fn progress_bar(total: u64, hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style =
        ProgressStyle::with_template("{bar:30} {pos}/{len} requests · {msg} · {elapsed_precise} elapsed, ETA {eta}")
            .expect("a valid progress template");
    bar.set_style(style);
    bar
}

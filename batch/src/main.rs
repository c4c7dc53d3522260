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
//! With `--embed` the batch embeds instead (see [`embed`]): each line's prompt pooled into one
//! vector (`--pooling`, default the model's own; L2-normalized unless `--no-normalize`), as
//! vLLM's `LLM.embed` does, with the same progress bar.
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

mod embed;
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
    /// Embed each line's prompt instead of generating: one vector per line.
    #[arg(long)]
    embed: bool,
    /// With --embed: how a prompt's final hidden states become one vector (default: the model's
    /// own, its Sentence-Transformers pooling config's, else the last token's).
    #[arg(long, value_enum, requires = "embed")]
    pooling: Option<PoolingArg>,
    /// With --embed: leave the vectors as pooled, not scaled to unit length.
    #[arg(long, requires = "embed")]
    no_normalize: bool,
}

/// `--pooling`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PoolingArg {
    /// The last token's.
    Last,
    /// The mean over every token.
    Mean,
    /// The first token's (BERT's CLS).
    Cls,
}

impl From<PoolingArg> for engine::Pooling {
    fn from(p: PoolingArg) -> Self {
        match p {
            PoolingArg::Last => Self::Last,
            PoolingArg::Mean => Self::Mean,
            PoolingArg::Cls => Self::Cls,
        }
    }
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
    if args.embed {
        return run_embed(&args, &text);
    }
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

    let llm = start_llm(&args)?;

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

/// Loads the model and starts its engine, as the workers do from the same flags.
fn start_llm(args: &Args) -> anyhow::Result<Llm> {
    let loaded = worker::load::load_engine(&args.engine)?;
    let card = loaded.card;
    let tokenizer = tokenizers::Tokenizer::from_str(&card.tokenizer_json)
        .map_err(|e| anyhow::anyhow!("reading the model's tokenizer: {e}"))?;
    let bos_token_id = Some(card.bos_token.as_str()).filter(|t| !t.is_empty()).and_then(|t| tokenizer.token_to_id(t));
    let pooling = worker::convert::model_pooling(&card);
    let text_config = TextConfig {
        chat_template: Some(card.chat_template).filter(|t| !t.is_empty()),
        bos_token: card.bos_token,
        eos_token: card.eos_token,
        add_bos_token: card.add_bos_token,
        bos_token_id,
        eos_token_ids: card.eos_token_ids,
        encoder: card.encoder,
        pooling,
    };
    Ok(Llm::from_engine(loaded.engine, tokenizer, text_config)?)
}

/// `--embed`: every line's prompt embedded, the records written in input order.
fn run_embed(args: &Args, text: &str) -> anyhow::Result<()> {
    let lines = embed::parse(text).map_err(|errors| {
        anyhow::anyhow!("{}: {} ({} bad lines); nothing was run", args.input.display(), errors[0], errors.len())
    })?;
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&args.output).with_context(|| format!("creating {}", args.output.display()))?,
    );
    let llm = start_llm(args)?;
    let pooling = args.pooling.map_or_else(|| llm.default_pooling(), Into::into);
    let bar = progress_bar(lines.len() as u64, args.no_progress);
    let mut last = None;
    let prompts = lines.iter().map(|l| l.prompt.clone()).collect();
    let results = llm.encode_each(prompts, pooling, !args.no_normalize, &mut |p: &Progress| {
        bar.set_position(p.done as u64);
        let per_sec = p.prompt_tokens as f64 / p.elapsed.as_secs_f64().max(1e-9);
        bar.set_message(format!("{} prompt tokens, {per_sec:.1} tok/s", p.prompt_tokens));
        last = Some(*p);
    });
    bar.finish_and_clear();
    let mut failed = 0;
    for (line, result) in lines.iter().zip(results) {
        let record = match result {
            Ok(vector) => {
                let prompt_tokens = llm.prompt_ids(&engine::offline::Input::Prompt(line.prompt.clone()))?.len();
                embed::success(line, &vector, prompt_tokens)
            }
            Err(e) => {
                failed += 1;
                serde_json::json!({ "line": line.number, "id": line.id, "error": e.to_string() })
            }
        };
        serde_json::to_writer(&mut out, &record)?;
        out.write_all(b"\n")?;
    }
    out.flush().with_context(|| format!("writing {}", args.output.display()))?;
    if let Some(p) = last {
        let secs = p.elapsed.as_secs_f64();
        eprintln!(
            "{NAME}: {} inputs, {} prompt tokens embedded in {secs:.1} s ({:.1} inputs/s, {:.1} tok/s) -> {}",
            p.total,
            p.prompt_tokens,
            p.total as f64 / secs.max(1e-9),
            p.prompt_tokens as f64 / secs.max(1e-9),
            args.output.display()
        );
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} inputs failed (error records in {})",
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

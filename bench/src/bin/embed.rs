//! `pdserve-embed-bench`: embedding throughput, ours beside llama.cpp's `llama-embedding`, on the
//! same GGUF, sentences and thread count, in one run.
//!
//! Two figures, each sentences/s and prompt tokens/s:
//! - **batch 1**: the sentences embedded one after another, each alone in its forward pass;
//! - **batch 32**: 32 sentences at a time in one forward pass.
//!
//! Ours is [`engine::offline::Llm::encode`] (the engine the workers run, last-token pooling,
//! L2-normalized), timed from submit to the last vector. llama.cpp's is the `prompt eval time` that
//! `llama-embedding --pooling last --embd-normalize 2` reports for the same sentences (its own
//! tokenizer gives the same ids, as `tests/data/golden/smollm2-embeddings.json` shows): its model
//! load and tokenization are left out, as ours are. `llama-embedding` packs prompts into one batch
//! up to its context size, so batch 1 runs with a context just longer than one sentence (every
//! sentence is over half of it) and batch 32 with one that holds exactly 32.
//!
//! With `--encoder DIR` (a BERT folder such as all-MiniLM-L6-v2) ours is also measured on it
//! (llama.cpp needs a GGUF conversion of it, which no package ships).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use bench::{align, load_average};
use clap::Parser;
use engine::model::{load, LoadOptions};
use engine::offline::{Llm, LlmConfig, Prompt};
use engine::Pooling;
use serde::Serialize;

const NAME: &str = "pdserve-embed-bench";

/// The sentences' text: numbered, the same words after, so their lengths differ by a token or two.
const WORDS: &str = "the river runs past the old mill where the miller keeps a ledger of every sack of grain \
brought in from the farms up the valley and in spring the water rises";

#[derive(Debug, Parser)]
#[command(name = NAME, version, about = "Embedding throughput, ours beside llama.cpp's llama-embedding")]
struct Args {
    /// The decoder GGUF both engines embed with.
    #[arg(long, env = "PDSERVE_MODEL", default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Also measure ours on this BERT encoder folder.
    #[arg(long)]
    encoder: Option<PathBuf>,
    /// Where llama-embedding is (scripts/setup-llama-cpp.sh builds it).
    #[arg(long, default_value = ".cache/llama.cpp/bin")]
    llama_cpp_dir: PathBuf,
    /// Threads for both engines (default: the machine's cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Sentences embedded per figure (a multiple of 32).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(32..=4096))]
    sentences: u64,
    /// Words per sentence after its number.
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u64).range(4..=30))]
    words: u64,
    /// Measure ours only.
    #[arg(long)]
    skip_llama_cpp: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// One figure of one engine.
#[derive(Debug, Clone, Copy, Serialize)]
struct Throughput {
    secs: f64,
    sentences_per_s: f64,
    tokens_per_s: f64,
}

impl Throughput {
    fn new(sentences: usize, tokens: usize, secs: f64) -> Self {
        Self { secs, sentences_per_s: sentences as f64 / secs, tokens_per_s: tokens as f64 / secs }
    }
}

#[derive(Debug, Serialize)]
struct Row {
    model: String,
    batch: usize,
    ours: Throughput,
    llama_cpp: Option<Throughput>,
    ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    threads: usize,
    sentences: usize,
    prompt_tokens: usize,
    rows: Vec<Row>,
    llama_cpp_skipped: Option<String>,
    load_average_start: Option<f64>,
    load_average_end: Option<f64>,
}

fn main() {
    let args: Args = cluster::cli::parse(NAME);
    let threads =
        args.threads.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |t| t as usize);
    cluster::cli::exit_on_error(NAME, bench::set_threads(threads).and_then(|()| run(args, threads)));
}

fn run(args: Args, threads: usize) -> anyhow::Result<()> {
    anyhow::ensure!(args.sentences.is_multiple_of(32), "--sentences must be a multiple of 32");
    let load_start = load_average();
    let words: Vec<&str> = WORDS.split(' ').take(args.words as usize).collect();
    let texts: Vec<String> = (0..args.sentences).map(|n| format!("Record {n}: {}.", words.join(" "))).collect();

    let decoder = Llm::new(
        load(&args.model, &LoadOptions::default())
            .map_err(|e| anyhow::anyhow!("loading {}: {e}", args.model.display()))?,
        LlmConfig { enable_prefix_caching: false, ..LlmConfig::default() },
    )?;
    let lengths: Vec<usize> = texts
        .iter()
        .map(|t| decoder.prompt_ids(&engine::offline::Input::Prompt(Prompt::Text(t.clone()))).map(|ids| ids.len()))
        .collect::<Result<_, _>>()?;
    let prompt_tokens: usize = lengths.iter().sum();
    let model_name = args.model.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned());

    let llama = if args.skip_llama_cpp {
        Err("--skip-llama-cpp".to_string())
    } else {
        LlamaEmbedding::find(&args.llama_cpp_dir, threads, &args.model)
    };
    let mut rows = Vec::new();
    for batch in [1, 32] {
        let ours = ours(&decoder, &texts, batch, Pooling::Last, prompt_tokens)?;
        let llama_cpp = match &llama {
            Ok(l) => Some(l.run(&texts, &lengths, batch)?),
            Err(_) => None,
        };
        let ratio = llama_cpp.map(|l| ours.sentences_per_s / l.sentences_per_s);
        rows.push(Row { model: model_name.clone(), batch, ours, llama_cpp, ratio });
    }
    drop(decoder);
    if let Some(dir) = &args.encoder {
        let encoder = Llm::new(
            load(dir, &LoadOptions::default()).map_err(|e| anyhow::anyhow!("loading {}: {e}", dir.display()))?,
            LlmConfig { max_num_batched_tokens: 2048, ..LlmConfig::default() },
        )?;
        let tokens: usize = texts
            .iter()
            .map(|t| encoder.prompt_ids(&engine::offline::Input::Prompt(Prompt::Text(t.clone()))).map(|ids| ids.len()))
            .sum::<Result<_, _>>()?;
        let name = dir.file_name().map_or_else(String::new, |s| s.to_string_lossy().into_owned());
        for batch in [1, 32] {
            let ours = ours(&encoder, &texts, batch, encoder.default_pooling(), tokens)?;
            rows.push(Row { model: name.clone(), batch, ours, llama_cpp: None, ratio: None });
        }
    }
    let report = Report {
        threads,
        sentences: texts.len(),
        prompt_tokens,
        rows,
        llama_cpp_skipped: llama.err(),
        load_average_start: load_start,
        load_average_end: load_average(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Ours: `batch` sentences per `Llm::encode` call, after one warm-up call.
fn ours(llm: &Llm, texts: &[String], batch: usize, pooling: Pooling, tokens: usize) -> anyhow::Result<Throughput> {
    let prompts = |chunk: &[String]| chunk.iter().cloned().map(Prompt::Text).collect::<Vec<_>>();
    llm.encode(prompts(&texts[..batch]), pooling, true)?;
    let started = Instant::now();
    for chunk in texts.chunks(batch) {
        let vectors = llm.encode(prompts(chunk), pooling, true)?;
        anyhow::ensure!(vectors.len() == chunk.len(), "{} vectors for {} sentences", vectors.len(), chunk.len());
    }
    Ok(Throughput::new(texts.len(), tokens, started.elapsed().as_secs_f64()))
}

/// llama.cpp's `llama-embedding`.
struct LlamaEmbedding {
    bin: PathBuf,
    threads: usize,
    model: PathBuf,
}

impl LlamaEmbedding {
    fn find(dir: &Path, threads: usize, model: &Path) -> Result<Self, String> {
        let bin = dir.join("llama-embedding");
        if !bin.is_file() {
            return Err(format!("{} not found: run scripts/setup-llama-cpp.sh", bin.display()));
        }
        Ok(Self { bin, threads, model: model.to_path_buf() })
    }

    /// Embeds `texts` (`lengths` tokens each) `batch` to a forward pass; its reported prompt
    /// evaluation time.
    fn run(&self, texts: &[String], lengths: &[usize], batch: usize) -> anyhow::Result<Throughput> {
        let longest = lengths.iter().copied().max().unwrap_or(1);
        let shortest = lengths.iter().copied().min().unwrap_or(1);
        // A batch is cut where the next prompt would pass the context: batch 1 needs every
        // sentence over half the context, batch 32 a context of the 32 longest.
        let ctx = match batch {
            1 => {
                anyhow::ensure!(2 * shortest > longest, "sentences of {shortest} to {longest} tokens pair up");
                longest
            }
            n => {
                let mut sorted = lengths.to_vec();
                sorted.sort_unstable();
                let room: usize = sorted.iter().rev().take(n).sum();
                anyhow::ensure!(room < sorted.iter().take(n + 1).sum(), "sentences too unequal for batches of {n}");
                room
            }
        };
        let file = tempfile_path("pdserve-embed-bench");
        std::fs::write(&file, texts.join("\n"))?;
        let ctx = ctx.to_string();
        let threads = self.threads.to_string();
        let output = Command::new(&self.bin)
            .arg("-m")
            .arg(&self.model)
            .arg("-f")
            .arg(&file)
            .args(["--pooling", "last", "--embd-normalize", "2", "-c", &ctx, "-b", &ctx, "-ub", &ctx])
            .args(["-t", &threads, "-tb", &threads])
            .stdin(Stdio::null())
            .output()?;
        let _ = std::fs::remove_file(&file);
        let log = String::from_utf8_lossy(&output.stderr);
        anyhow::ensure!(output.status.success(), "llama-embedding failed ({}): {}", output.status, last_lines(&log));
        let (ms, tokens) =
            prompt_eval(&log).ok_or_else(|| anyhow::anyhow!("no prompt eval time in: {}", last_lines(&log)))?;
        let want: usize = lengths.iter().sum();
        anyhow::ensure!(tokens == want, "llama-embedding evaluated {tokens} tokens, ours {want}");
        Ok(Throughput::new(texts.len(), tokens, ms / 1000.0))
    }
}

/// `prompt eval time = <ms> ms / <tokens> tokens` from llama.cpp's performance printout.
fn prompt_eval(log: &str) -> Option<(f64, usize)> {
    let line = log.lines().find(|l| l.contains("prompt eval time"))?;
    let after = line.split('=').nth(1)?;
    let mut parts = after.split('/');
    let ms = parts.next()?.trim().trim_end_matches("ms").trim().parse().ok()?;
    let tokens = parts.next()?.split_whitespace().next()?.parse().ok()?;
    Some((ms, tokens))
}

fn last_lines(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

fn tempfile_path(stem: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{stem}-{}.txt", std::process::id()))
}

fn print_table(report: &Report) {
    println!(
        "{NAME}: {} sentences, {} prompt tokens (decoder), {} threads, load average {:?} -> {:?}",
        report.sentences, report.prompt_tokens, report.threads, report.load_average_start, report.load_average_end
    );
    let fmt =
        |t: &Option<Throughput>| t.map_or("-".into(), |t| format!("{:.1} / {:.0}", t.sentences_per_s, t.tokens_per_s));
    let mut rows = vec![vec![
        "model".to_string(),
        "batch".into(),
        "ours sent/s / tok/s".into(),
        "llama.cpp sent/s / tok/s".into(),
        "ours / llama.cpp".into(),
    ]];
    for r in &report.rows {
        rows.push(vec![
            r.model.clone(),
            r.batch.to_string(),
            fmt(&Some(r.ours)),
            fmt(&r.llama_cpp),
            r.ratio.map_or("-".into(), |x| format!("{x:.2}x")),
        ]);
    }
    print!("{}", align(&rows, 1));
    if let Some(why) = &report.llama_cpp_skipped {
        println!("llama.cpp not measured: {why}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_eval_time_parses() {
        let log = "llama_perf_context_print:        load time =     123.40 ms\n\
                   llama_perf_context_print: prompt eval time =     456.78 ms /   800 tokens (    0.57 ms per token,  1751.39 tokens per second)\n";
        assert_eq!(prompt_eval(log), Some((456.78, 800)));
        assert_eq!(prompt_eval("nothing"), None);
    }
}

//! `pdserve-embed-bench`: embedding throughput, ours beside llama.cpp's, on the same GGUF,
//! sentences and thread count, in one run.
//!
//! Two figures, each sentences/s and prompt tokens/s:
//! - **batch 1**: the sentences embedded one after another, each alone in its forward pass;
//! - **batch 32**: 32 sentences at a time in one forward pass.
//!
//! Ours is [`engine::offline::Llm::encode`] (the engine the workers run, last-token pooling,
//! L2-normalized), `batch` sentences a call, timed from submit to the last vector. llama.cpp's is
//! `llama-server --embeddings --pooling last` (its `/v1/embeddings`, L2-normalized; its tokenizer
//! gives the same ids, as `tests/data/golden/smollm2-embeddings.json` shows), `batch` sentences a
//! request over loopback HTTP, with one slot for batch 1 and 32 slots for batch 32. Both warm up
//! with one call first. (`llama-embedding` itself cannot embed one sentence a pass: it packs
//! prompts into its context, at least 256 tokens, and prints no usable timing.)
//!
//! With `--encoder DIR` (a BERT folder such as all-MiniLM-L6-v2) ours is also measured on it
//! (llama.cpp needs a GGUF conversion of it, which no package ships).

use std::path::PathBuf;
use std::time::Instant;

use bench::llama_cpp::LlamaCpp;
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
    /// Where llama-server is (scripts/setup-llama-cpp.sh builds it).
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
        LlamaCpp::find(&args.llama_cpp_dir, threads, &args.model)
    };
    let mut rows = Vec::new();
    for batch in [1, 32] {
        let ours = ours(&decoder, &texts, batch, Pooling::Last, prompt_tokens)?;
        let llama_cpp = match &llama {
            Ok(cpp) => Some(llama_cpp(cpp, &texts, &lengths, batch)?),
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

/// llama.cpp's side: `llama-server --embeddings`, one `/v1/embeddings` request per `batch`
/// sentences, after one warm-up request; the wall time of the requests. With batch 1 the server
/// has one slot; with 32, 32 slots whose prompts it decodes in one batch.
fn llama_cpp(cpp: &LlamaCpp, texts: &[String], lengths: &[usize], batch: usize) -> anyhow::Result<Throughput> {
    let longest = lengths.iter().copied().max().unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let server = cpp.embedding_server(batch * (longest + 8), batch).await?;
        let client = reqwest::Client::new();
        server.embed(&client, &texts[..batch]).await?;
        let mut secs = 0.0;
        for chunk in texts.chunks(batch) {
            secs += server.embed(&client, chunk).await?;
        }
        Ok(Throughput::new(texts.len(), lengths.iter().sum(), secs))
    })
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

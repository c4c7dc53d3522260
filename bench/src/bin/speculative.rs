//! `pdserve-spec-bench`: speculative decoding (prompt lookup or a draft model) against the same
//! engine without it, in one run, on the same model, prompts and threads; and llama.cpp's own
//! speculative decoding beside it.
//!
//! Two workloads of chat requests (greedy, answers as long as the model makes them up to
//! `--max-tokens`):
//! - **copy**: answers that copy from their prompt (a summary that quotes, a rewrite, a code edit,
//!   a JSON extraction), where the drafts are often right;
//! - **chat**: open-ended questions, where they seldom are.
//!
//! Each is run one request at a time (**single stream**), then copy and chat requests
//! alternating, `--concurrent` at once (**16 concurrent** by default: every prompt twice),
//! submitted straight to the engine the workers run (the prompt through the chat template, as
//! [`Llm::chat`] would). A figure is generated tokens over the wall time from the first submit to
//! the last answer, prefill included; single stream also prints the **decode speed-up**, of each
//! answer's tokens after its first over the time from its first token to its last (the prompt's
//! prefill, which speculation does not touch, left out: the time per output token). Every figure
//! is the median of `--repeat` runs, without and with speculation alternating, each after a
//! short warm-up answer. The speculative run prints its acceptance (accepted / proposed draft
//! tokens) and the tokens each verifying step gave (1 + accepted / drafts), and checks that every
//! answer is the same token for token as without speculation (greedy).
//!
//! # llama.cpp beside it
//!
//! Unless `--skip-llama-cpp`, `llama-server` (built by `scripts/setup-llama-cpp.sh`) then runs
//! the same model and prompts, each workload single stream only: a fresh server per mode and
//! workload (`-np 1`, the same `-t`/`-tb` as our threads, on a free 127.0.0.1 port, stopped
//! after), the prompts as user messages through `/v1/chat/completions` (its chat template
//! applies) one at a time, greedy, the same `max_tokens`, after one short warm-up request of
//! another prompt. Prompt caching is off (`--no-cache-prompt --cache-ram 0` and `cache_prompt:
//! false`; an answer whose `timings.cache_n` is above 0 fails the run). Once without
//! speculation, then once per llama.cpp mode that corresponds to our config (`--spec-type`, k =
//! our `num_speculative_tokens`, n = our `prompt_lookup_max`):
//! - `"method": "ngram"`: every n-gram type this llama.cpp has, each a row:
//!   - `ngram-simple`: the last n tokens looked up in the sequence, up to k tokens that followed
//!     copied (prompt lookup with one n-gram size; `--spec-ngram-simple-size-n min(n, k)
//!     --spec-ngram-simple-size-m k`: it drafts nothing when n is above k);
//!   - `ngram-map-k` / `ngram-map-k4v`: the same lookup through a hash map of the n-grams, the
//!     latter keeping up to 4 continuations per n-gram and drafting the most frequent
//!     (`--spec-ngram-map-k[4v]-size-n n --spec-ngram-map-k[4v]-size-m k`);
//!   - `ngram-mod`: a hash table of n-grams shared by all sequences of the server
//!     (`--spec-ngram-mod-n-match n --spec-ngram-mod-n-max k --spec-ngram-mod-n-min 1`; its
//!     default match length, 24, hardly ever matches in answers this short);
//!   - `ngram-cache`: `llama-lookup`'s 1- to 4-gram cache of the context, whose draft length is
//!     fixed at 8 in this llama.cpp (not k).
//! - `"method": "draft_model"`: `-md <draft> --spec-type draft-simple --spec-draft-n-max k`
//!   (this llama.cpp loads a draft given only `-md` but does not speculate with it, and has no
//!   `--draft-max` any more).
//!
//! A figure is the answers' `usage.completion_tokens` over the wall time from the first request
//! to the last answer, and the decode rate `timings.predicted_n` - 1 over `predicted_ms` (the
//! server's time from the first token to the last) summed over the answers; acceptance is
//! `timings.draft_n_accepted` over `timings.draft_n` summed over the answers; one run each. The
//! second table prints them per mode beside our speed-up and acceptance
//! on the same workload in the same run. A mode whose server fails shows its error, and the run
//! then fails after printing.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bench::llama_cpp::{self, LlamaCpp};
use bench::{align, load_average};
use clap::Parser;
use engine::model::{load, LoadOptions};
use engine::offline::{ChatMessage, Input, Llm, LlmConfig};
use engine::{EngineEvent, EngineRequest, SamplingParams, SpeculationStats, SpeculativeConfig, SpeculativeMethod};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

const NAME: &str = "pdserve-spec-bench";

/// The mode of the rows that run one request at a time.
const SINGLE_STREAM: &str = "single stream";

/// Prefills of the long prompt timed with speculation and without, alternating.
const PREFILL_RUNS: usize = 5;

/// llama-server's context beyond `--max-tokens`: room for the longest prompt in its chat template.
const LLAMA_CTX: usize = 1024;

/// What the copy tasks work on.
const ARTICLE: &str = "The town council met on Tuesday evening to discuss the new bridge over the river. \
The mayor said that the bridge would cost about four million pounds and take two years to build. \
Several farmers asked whether the road to the market would stay open during the works. \
The engineer answered that one lane would stay open at all times, except for two weekends in the summer. \
The council voted seven to two in favour of the plan, and work will start in March.";

const CODE: &str = "def add(a, b):\n    return a + b\n\n\ndef total(values):\n    result = 0\n    for value in values:\n        result = add(result, value)\n    return result\n\n\nprint(total([1, 2, 3, 4]))\n";

const PEOPLE: &str = "Alice Martin is 34 and lives in Leeds. Her brother Tom Martin is 29 and lives in York. \
Their friend Sara Khan, who is 41, moved to Bristol last year. Sara's cousin David Okafor is 37 and lives in Leeds too.";

fn copy_tasks() -> Vec<String> {
    vec![
        format!("Summarize this article in a few sentences, quoting its key sentences word for word:\n\n{ARTICLE}"),
        format!("Rewrite this article exactly, only replacing the word \"bridge\" with \"tunnel\":\n\n{ARTICLE}"),
        format!("Rename the function `add` to `plus` in this Python code and print the whole code:\n\n{CODE}"),
        format!("Extract every person as a JSON list of objects with keys \"name\", \"age\" and \"city\":\n\n{PEOPLE}"),
    ]
}

fn chat_tasks() -> Vec<String> {
    [
        "Tell me a short story about a dragon who learns to bake bread.",
        "What are the main benefits of regular exercise?",
        "Explain how rainbows form.",
        "Write a short poem about autumn leaves.",
    ]
    .map(String::from)
    .to_vec()
}

#[derive(Debug, Parser)]
#[command(name = NAME, version, about = "Speculative decoding against the same engine without it")]
struct Args {
    /// The GGUF to run.
    #[arg(long, env = "PDSERVE_MODEL", default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// The speculative config (as the workers' `--speculative-config`).
    #[arg(long, default_value = r#"{"method": "ngram", "num_speculative_tokens": 4}"#,
          value_parser = |text: &str| SpeculativeConfig::from_json(text))]
    speculative_config: SpeculativeConfig,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// Requests at once in the concurrent runs, each a row (comma-separated: `2,4,8,16` finds
    /// where verifying stops paying, with `disable_by_batch_size` raised past them).
    #[arg(long, value_delimiter = ',', default_value = "16", value_parser = clap::value_parser!(u32).range(2..))]
    concurrent: Vec<u32>,
    /// Threads, ours and llama.cpp's (default: the machine's cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Where llama-server is (scripts/setup-llama-cpp.sh builds it).
    #[arg(long, default_value = ".cache/llama.cpp/bin")]
    llama_cpp_dir: PathBuf,
    /// Times each of our runs, without and with speculation alternating; a figure is the median
    /// (this machine's speed drifts by several percent from one run to the next).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Measure our engine only, not llama.cpp's speculative decoding beside it.
    #[arg(long)]
    skip_llama_cpp: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// One engine's figure.
#[derive(Debug, Clone, Copy, Serialize)]
struct Figure {
    tokens: usize,
    secs: f64,
    tokens_per_s: f64,
    /// Run one at a time: the tokens each answer decoded after its first over the time from its
    /// first token to its last, summed over the answers (the prompts' prefill left out); `None`
    /// for requests run at once.
    decode_tokens_per_s: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Row {
    workload: &'static str,
    mode: String,
    plain: Figure,
    speculative: Figure,
    speedup: f64,
    /// Of the decoding rates alone (single stream).
    decode_speedup: Option<f64>,
    /// Accepted over proposed draft tokens.
    acceptance: f64,
    /// Tokens per verifying forward pass of a sequence.
    tokens_per_verify: f64,
    /// Tokens per forward pass of a decoding sequence, verifying or not.
    tokens_per_pass: f64,
    /// Draft tokens proposed per generated token (how often there was something to verify).
    drafts_per_token: f64,
    same_tokens: bool,
}

/// A llama-server configuration: a name for the table and its speculative flags.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct LlamaMode {
    name: String,
    flags: Vec<String>,
}

/// One llama.cpp speculative mode on one workload, single stream, against llama.cpp without it.
#[derive(Debug, Serialize)]
struct LlamaRow {
    workload: &'static str,
    mode: LlamaMode,
    plain: Figure,
    /// `None` when the mode's server failed (see `error`).
    speculative: Option<LlamaSpeculative>,
    error: Option<String>,
    /// Ours on the same workload in this run (the single-stream row).
    our_speedup: f64,
    our_decode_speedup: Option<f64>,
    our_acceptance: f64,
}

/// A llama.cpp speculative mode's figures.
#[derive(Debug, Serialize)]
struct LlamaSpeculative {
    figure: Figure,
    speedup: f64,
    /// Of the decoding rates alone (`timings.predicted_n` over `predicted_ms`).
    decode_speedup: Option<f64>,
    /// `draft_n_accepted` over `draft_n`.
    acceptance: f64,
    /// Draft tokens proposed per generated token.
    drafts_per_token: f64,
    /// Every answer the same text as without speculation (greedy).
    same_text: bool,
}

/// llama.cpp's side of the report.
#[derive(Debug, Serialize)]
struct LlamaReport {
    /// The arguments of the server without speculation; each mode adds its flags.
    server_args: Vec<String>,
    rows: Vec<LlamaRow>,
}

#[derive(Debug, Serialize)]
struct Report {
    threads: usize,
    speculative: String,
    max_tokens: u32,
    /// Runs each of our figures is the median of.
    repeat: u32,
    rows: Vec<Row>,
    prefill: Prefill,
    /// `None` with `--skip-llama-cpp`.
    llama_cpp: Option<LlamaReport>,
    load_average: [Option<f64>; 2],
}

fn main() {
    let args: Args = cluster::cli::parse(NAME);
    let threads =
        args.threads.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), |t| t as usize);
    cluster::cli::exit_on_error(NAME, bench::set_threads(threads).and_then(|()| run(args, threads)));
}

fn llm(args: &Args, speculative: Option<SpeculativeConfig>) -> anyhow::Result<Llm> {
    let loaded = load(&args.model, &LoadOptions::default())
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", args.model.display()))?;
    // Prefix caching off: a repeated prompt would be cheaper the second time.
    Ok(Llm::new(loaded, LlmConfig { enable_prefix_caching: false, speculative, ..LlmConfig::default() })?)
}

/// The answers' token ids and the run's figure: `prompts` one at a time, or all at once.
fn measure(llm: &Llm, prompts: &[String], max_tokens: u32, at_once: bool) -> anyhow::Result<(Vec<Vec<u32>>, Figure)> {
    let params = SamplingParams { temperature: 0.0, max_tokens, ..SamplingParams::default() };
    let start = Instant::now();
    let answers = if at_once {
        let submitted = prompts.iter().map(|p| submit(llm, p, &params)).collect::<anyhow::Result<Vec<_>>>()?;
        submitted.into_iter().map(receive).collect::<anyhow::Result<Vec<_>>>()?
    } else {
        prompts.iter().map(|p| submit(llm, p, &params).and_then(receive)).collect::<anyhow::Result<Vec<_>>>()?
    };
    let secs = start.elapsed().as_secs_f64();
    let tokens = answers.iter().map(|a| a.ids.len()).sum();
    // Answers received one at a time were timed as their tokens came.
    let decode_tokens_per_s = (!at_once).then(|| {
        let decoded = answers.iter().map(|a| a.ids.len().saturating_sub(1)).sum::<usize>();
        decoded as f64 / answers.iter().map(|a| a.decoding.as_secs_f64()).sum::<f64>()
    });
    let ids = answers.into_iter().map(|a| a.ids).collect();
    Ok((ids, Figure { tokens, secs, tokens_per_s: tokens as f64 / secs, decode_tokens_per_s }))
}

/// A short answer to `prompt`: the first forward pass pays for page faults and thread start.
fn warm_up(llm: &Llm, prompt: &str) -> anyhow::Result<()> {
    let params = SamplingParams { temperature: 0.0, max_tokens: 4, ..SamplingParams::default() };
    receive(submit(llm, prompt, &params)?).map(drop)
}

/// Runs of the same prompts as one: their answers (which must be the same every time, as they are
/// greedy) and the median of each rate.
fn median_run(runs: Vec<(Vec<Vec<u32>>, Figure)>) -> anyhow::Result<(Vec<Vec<u32>>, Figure)> {
    let (ids, first) = runs.first().cloned().ok_or_else(|| anyhow::anyhow!("no run"))?;
    anyhow::ensure!(runs.iter().all(|(other, _)| *other == ids), "a greedy answer changed from one run to the next");
    let secs = llama_cpp::median(runs.iter().map(|(_, f)| f.secs).collect());
    let decode: Option<Vec<f64>> = runs.iter().map(|(_, f)| f.decode_tokens_per_s).collect();
    let figure = Figure {
        tokens: first.tokens,
        secs,
        tokens_per_s: first.tokens as f64 / secs,
        decode_tokens_per_s: decode.map(llama_cpp::median),
    };
    Ok((ids, figure))
}

/// One answer: its token ids and the time from its first token to its last.
struct Answer {
    ids: Vec<u32>,
    decoding: Duration,
}

/// Submits `prompt` as a user message through the chat template, straight to the engine, so the
/// tokens can be timed as they come (what [`Llm::chat`] would submit).
fn submit(llm: &Llm, prompt: &str, params: &SamplingParams) -> anyhow::Result<UnboundedReceiver<EngineEvent>> {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    let input = Input::Chat(vec![ChatMessage::text("user", prompt.to_string())]);
    let request_id = format!("spec-bench-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    Ok(llm.engine().submit(EngineRequest::generate(request_id, llm.prompt_ids(&input)?, params.clone()))?)
}

/// Waits for a submitted request's answer, timing its tokens as they come.
fn receive(mut events: UnboundedReceiver<EngineEvent>) -> anyhow::Result<Answer> {
    let (mut ids, mut first, mut last) = (Vec::new(), None, None);
    while let Some(event) = events.blocking_recv() {
        match event {
            EngineEvent::Token { id, .. } => {
                let now = Instant::now();
                (first, last) = (first.or(Some(now)), Some(now));
                ids.push(id);
            }
            EngineEvent::Finished { .. } => {
                let decoding = first.zip(last).map_or(Duration::ZERO, |(first, last)| last - first);
                return Ok(Answer { ids, decoding });
            }
            EngineEvent::Error(e) => anyhow::bail!("engine error: {e}"),
            EngineEvent::PromptLogprobs { .. } | EngineEvent::Embedding(_) => anyhow::bail!("unasked-for event"),
        }
    }
    anyhow::bail!("the engine dropped a request without finishing it")
}

fn run(args: Args, threads: usize) -> anyhow::Result<()> {
    // The comparison is part of a run: without llama.cpp it stops before measuring anything.
    let llama = LlamaCpp::find_unless(args.skip_llama_cpp, &args.llama_cpp_dir, threads, &args.model)?;
    let load_start = load_average();
    let (rows, prefill) = measure_ours(&args)?;
    let llama_cpp = match &llama {
        Some(cpp) => Some(measure_llama_cpp(cpp, &args, &rows)?),
        None => None,
    };
    let report = Report {
        threads,
        speculative: args.speculative_config.to_string(),
        max_tokens: args.max_tokens,
        repeat: args.repeat,
        rows,
        prefill,
        llama_cpp,
        load_average: [load_start, load_average()],
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
        if let Some(llama_cpp) = &report.llama_cpp {
            print!("\n{}", llama_table(llama_cpp, &report));
        }
    }
    // A mode whose server failed leaves its row without figures: the report shows why, and the
    // run fails so no script takes it for a complete one.
    let failed: Vec<String> = report
        .llama_cpp
        .iter()
        .flat_map(|l| &l.rows)
        .filter(|r| r.error.is_some())
        .map(|r| format!("{} on {}", r.mode.name, r.workload))
        .collect();
    anyhow::ensure!(failed.is_empty(), "llama.cpp mode(s) {} failed (the error is in the report)", failed.join(", "));
    Ok(())
}

/// The single-stream prompts of each workload.
fn single_stream_workloads() -> [(&'static str, Vec<String>); 2] {
    [("copy", copy_tasks()), ("chat", chat_tasks())]
}

/// What a prompt's prefill costs with speculation on: a draft model's prompt KV is computed with
/// the target's (on the prefill worker, in a cluster), prompt lookup adds nothing.
#[derive(Debug, Serialize)]
struct Prefill {
    prompt_tokens: usize,
    /// Median milliseconds to the one token of a `max_tokens: 1` answer, of three.
    plain_ms: f64,
    speculative_ms: f64,
}

/// [`Prefill`]: a long prompt (the article four times) answered with one token, by each engine.
fn measure_prefill(plain: &Llm, speculating: &Llm) -> anyhow::Result<Prefill> {
    let prompt = format!("Rewrite this text exactly:\n\n{}", [ARTICLE; 4].join("\n\n"));
    let params = SamplingParams { temperature: 0.0, max_tokens: 1, ..SamplingParams::default() };
    let conversation = vec![vec![ChatMessage::text("user", prompt)]];
    let mut prompt_tokens = 0;
    let mut time = |llm: &Llm| -> anyhow::Result<f64> {
        let start = Instant::now();
        let outputs = llm.chat(conversation.clone(), &params)?;
        prompt_tokens = outputs[0].prompt_token_ids.len();
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    // A first prompt pays for page faults; then the two alternate, as the machine's speed drifts.
    time(plain)?;
    time(speculating)?;
    let (mut plain_times, mut speculative_times) = (Vec::new(), Vec::new());
    for _ in 0..PREFILL_RUNS {
        plain_times.push(time(plain)?);
        speculative_times.push(time(speculating)?);
    }
    let (plain_ms, speculative_ms) = (llama_cpp::median(plain_times), llama_cpp::median(speculative_times));
    Ok(Prefill { prompt_tokens, plain_ms, speculative_ms })
}

/// Our engine with and without speculation, a row per workload and mode, and the prefill's cost.
fn measure_ours(args: &Args) -> anyhow::Result<(Vec<Row>, Prefill)> {
    let plain = llm(args, None)?;
    let speculating = llm(args, Some(args.speculative_config.clone()))?;
    let prefill = measure_prefill(&plain, &speculating)?;
    let (copy, chat) = (copy_tasks(), chat_tasks());
    // Copy and chat prompts alternating, as many as each concurrent run takes (16: each twice).
    let mixed = |n: u32| {
        let pick = |i: usize| if i.is_multiple_of(2) { &copy[i / 2 % copy.len()] } else { &chat[i / 2 % chat.len()] };
        (0..n as usize).map(|i| pick(i).clone()).collect()
    };
    let mut runs: Vec<(&str, String, Vec<String>, bool)> =
        single_stream_workloads().into_iter().map(|(w, prompts)| (w, SINGLE_STREAM.into(), prompts, false)).collect();
    runs.extend(args.concurrent.iter().map(|&n| ("copy + chat", format!("{n} concurrent"), mixed(n), true)));
    let mut rows = Vec::new();
    for (workload, mode, prompts, at_once) in runs {
        let (mut plain_runs, mut spec_runs) = (Vec::new(), Vec::new());
        let mut spec = SpeculationStats::default();
        for _ in 0..args.repeat {
            warm_up(&plain, &prompts[0])?;
            plain_runs.push(measure(&plain, &prompts, args.max_tokens, at_once)?);
            warm_up(&speculating, &prompts[0])?;
            let before = speculating.engine().stats().speculation;
            spec_runs.push(measure(&speculating, &prompts, args.max_tokens, at_once)?);
            spec = spec.plus(&speculating.engine().stats().speculation.since(&before));
        }
        let (plain_ids, plain_figure) = median_run(plain_runs)?;
        let (spec_ids, spec_figure) = median_run(spec_runs)?;
        rows.push(Row {
            workload,
            mode: mode.clone(),
            plain: plain_figure,
            speculative: spec_figure,
            speedup: spec_figure.tokens_per_s / plain_figure.tokens_per_s,
            decode_speedup: decode_speedup(&plain_figure, &spec_figure),
            acceptance: ratio(spec.num_accepted_tokens, spec.num_draft_tokens),
            tokens_per_verify: 1.0 + ratio(spec.num_accepted_tokens, spec.num_drafts),
            tokens_per_pass: 1.0 + ratio(spec.num_accepted_tokens, spec.num_decode_steps),
            drafts_per_token: ratio(spec.num_draft_tokens, spec_figure.tokens as u64 * u64::from(args.repeat)),
            same_tokens: plain_ids == spec_ids,
        });
        if !args.json {
            eprintln!("{NAME}: {workload} {mode} done");
        }
    }
    Ok((rows, prefill))
}

/// `a / b`, 0 when `b` is.
fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// llama.cpp's speculative modes that correspond to `config`, each with its `llama-server`
/// flags: every n-gram type for prompt lookup, `draft-simple` for a draft model (see the module
/// doc).
fn llama_modes(config: &SpeculativeConfig) -> Vec<LlamaMode> {
    let k = config.num_speculative_tokens;
    match &config.method {
        SpeculativeMethod::Ngram(lookup) => {
            let n = lookup.prompt_lookup_max;
            let map = |kind: &str| {
                let sizes = [(format!("--spec-{kind}-size-n"), n), (format!("--spec-{kind}-size-m"), k)];
                spec_mode(kind, format!("{kind} n={n} k={k}"), &sizes)
            };
            let simple = [("--spec-ngram-simple-size-n".into(), n.min(k)), ("--spec-ngram-simple-size-m".into(), k)];
            let modulo = [
                ("--spec-ngram-mod-n-match".into(), n),
                ("--spec-ngram-mod-n-max".into(), k),
                ("--spec-ngram-mod-n-min".into(), 1),
            ];
            vec![
                spec_mode("ngram-simple", format!("ngram-simple n={} k={k}", n.min(k)), &simple),
                map("ngram-map-k"),
                map("ngram-map-k4v"),
                spec_mode("ngram-mod", format!("ngram-mod n={n} k={k}"), &modulo),
                spec_mode("ngram-cache", "ngram-cache k=8 (fixed)".into(), &[]),
            ]
        }
        SpeculativeMethod::DraftModel { model } => {
            let mut mode =
                spec_mode("draft-simple", format!("draft-simple k={k}"), &[("--spec-draft-n-max".into(), k)]);
            mode.flags.splice(0..0, ["-md".to_string(), model.display().to_string()]);
            vec![mode]
        }
    }
}

/// `--spec-type kind` and each flag with its value.
fn spec_mode(kind: &str, name: String, values: &[(String, usize)]) -> LlamaMode {
    let mut flags = vec!["--spec-type".to_string(), kind.to_string()];
    for (flag, value) in values {
        flags.extend([flag.clone(), value.to_string()]);
    }
    LlamaMode { name, flags }
}

/// llama-server without speculation and in every mode of [`llama_modes`], each workload single
/// stream, a row per mode and workload beside ours (`ours`' single-stream rows).
fn measure_llama_cpp(cpp: &LlamaCpp, args: &Args, ours: &[Row]) -> anyhow::Result<LlamaReport> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let modes = llama_modes(&args.speculative_config);
    let mut server_args = Vec::new();
    let mut rows = Vec::new();
    for (workload, prompts) in single_stream_workloads() {
        let ours = ours.iter().find(|r| r.workload == workload && r.mode == SINGLE_STREAM);
        let ours = ours.ok_or_else(|| anyhow::anyhow!("no single-stream row of ours for {workload}"))?;
        // Without a baseline no mode compares: that fails the run.
        let plain = runtime.block_on(llama_run(cpp, &[], &prompts, args.max_tokens))?;
        server_args = plain.server_args.clone();
        for mode in &modes {
            let spec = runtime.block_on(llama_run(cpp, &mode.flags, &prompts, args.max_tokens));
            if !args.json {
                eprintln!("{NAME}: llama.cpp {} {workload} single stream done", mode.name);
            }
            let (speculative, error) = match spec {
                Ok(spec) => (Some(compare(&plain, &spec)), None),
                Err(e) => (None, Some(format!("{e:#}"))),
            };
            rows.push(LlamaRow {
                workload,
                mode: mode.clone(),
                plain: plain.figure,
                speculative,
                error,
                our_speedup: ours.speedup,
                our_decode_speedup: ours.decode_speedup,
                our_acceptance: ours.acceptance,
            });
        }
    }
    Ok(LlamaReport { server_args, rows })
}

/// One llama-server run of a workload: its answers, figure and draft counters.
struct LlamaRun {
    texts: Vec<String>,
    figure: Figure,
    draft_n: u64,
    draft_n_accepted: u64,
    server_args: Vec<String>,
}

/// A fresh chat server with `flags`, warmed up with one short request of a prompt not measured,
/// then `prompts` one at a time; the server is stopped on return, failed or not.
async fn llama_run(cpp: &LlamaCpp, flags: &[String], prompts: &[String], max_tokens: u32) -> anyhow::Result<LlamaRun> {
    let server = cpp.chat_server(LLAMA_CTX + max_tokens as usize, flags).await?;
    let client = reqwest::Client::new();
    // Not one of the prompts: a mode that keeps n-grams across requests learns nothing from it.
    server.chat(&client, "Hello!", 4).await?;
    let start = Instant::now();
    let mut answers = Vec::new();
    for prompt in prompts {
        answers.push(server.chat(&client, prompt, max_tokens).await?);
    }
    let secs = start.elapsed().as_secs_f64();
    let tokens = answers.iter().map(|a| a.completion_tokens as usize).sum::<usize>();
    // As ours: each answer's tokens after its first over its time from the first to the last.
    let decoded = answers.iter().map(|a| a.predicted_n.saturating_sub(1)).sum::<u64>() as f64
        / answers.iter().map(|a| a.predicted_ms / 1e3).sum::<f64>();
    Ok(LlamaRun {
        texts: answers.iter().map(|a| a.text.clone()).collect(),
        figure: Figure { tokens, secs, tokens_per_s: tokens as f64 / secs, decode_tokens_per_s: Some(decoded) },
        draft_n: answers.iter().map(|a| a.draft_n).sum(),
        draft_n_accepted: answers.iter().map(|a| a.draft_n_accepted).sum(),
        server_args: server.args().to_vec(),
    })
}

/// `spec`'s decoding rate over `plain`'s, when both were measured.
fn decode_speedup(plain: &Figure, spec: &Figure) -> Option<f64> {
    Some(spec.decode_tokens_per_s? / plain.decode_tokens_per_s?)
}

/// A speculative run's figures against the plain one.
fn compare(plain: &LlamaRun, spec: &LlamaRun) -> LlamaSpeculative {
    LlamaSpeculative {
        figure: spec.figure,
        speedup: spec.figure.tokens_per_s / plain.figure.tokens_per_s,
        decode_speedup: decode_speedup(&plain.figure, &spec.figure),
        acceptance: ratio(spec.draft_n_accepted, spec.draft_n),
        drafts_per_token: ratio(spec.draft_n, spec.figure.tokens as u64),
        same_text: spec.texts == plain.texts,
    }
}

fn table(report: &Report) -> String {
    let mut lines = vec![
        format!(
            "speculative decoding ({}) against none; {} threads, greedy, up to {} tokens per answer, \
             each figure the median of {} runs (without and with alternating)",
            report.speculative, report.threads, report.max_tokens, report.repeat
        ),
        format!(
            "load average {} at start, {} at end",
            report.load_average[0].map_or("?".into(), |l| format!("{l:.2}")),
            report.load_average[1].map_or("?".into(), |l| format!("{l:.2}"))
        ),
        String::new(),
    ];
    let mut rows = vec![[
        "workload",
        "mode",
        "tokens",
        "plain tok/s",
        "spec tok/s",
        "speed-up",
        "decode speed-up",
        "acceptance",
        "tokens/verify",
        "tokens/pass",
        "drafts/token",
        "same tokens",
    ]
    .map(String::from)
    .to_vec()];
    for r in &report.rows {
        rows.push(vec![
            r.workload.to_string(),
            r.mode.to_string(),
            r.speculative.tokens.to_string(),
            format!("{:.1}", r.plain.tokens_per_s),
            format!("{:.1}", r.speculative.tokens_per_s),
            format!("{:.2}×", r.speedup),
            times(r.decode_speedup),
            format!("{:.0}%", r.acceptance * 100.0),
            format!("{:.2}", r.tokens_per_verify),
            format!("{:.2}", r.tokens_per_pass),
            format!("{:.2}", r.drafts_per_token),
            if r.same_tokens { "yes" } else { "NO" }.to_string(),
        ]);
    }
    lines.push(align(&rows, 2));
    let p = &report.prefill;
    lines.push(format!(
        "prefill of a {}-token prompt (one token answered, median of {PREFILL_RUNS}): plain {:.0} ms, speculative {:.0} ms ({:.2}×)",
        p.prompt_tokens,
        p.plain_ms,
        p.speculative_ms,
        p.speculative_ms / p.plain_ms
    ));
    lines.join("\n")
}

/// A ratio as the tables print it, `-` when not measured.
fn times(ratio: Option<f64>) -> String {
    ratio.map_or("-".into(), |r| format!("{r:.2}×"))
}

/// The llama.cpp rows, ours beside them, and the flags each mode ran with.
fn llama_table(llama: &LlamaReport, report: &Report) -> String {
    let mut lines = vec![
        format!(
            "llama.cpp's speculative decoding against none (llama-server, single stream, greedy, up to {} tokens), \
             ours from the table above",
            report.max_tokens
        ),
        format!("llama-server {}", llama.server_args.join(" ")),
        String::new(),
    ];
    let mut rows = vec![[
        "workload",
        "llama.cpp mode",
        "tokens",
        "plain tok/s",
        "spec tok/s",
        "speed-up",
        "decode speed-up",
        "acceptance",
        "drafts/token",
        "same text",
        "our speed-up",
        "our decode speed-up",
        "our acceptance",
    ]
    .map(String::from)
    .to_vec()];
    for r in &llama.rows {
        let spec = match &r.speculative {
            Some(s) => vec![
                s.figure.tokens.to_string(),
                format!("{:.1}", r.plain.tokens_per_s),
                format!("{:.1}", s.figure.tokens_per_s),
                format!("{:.2}×", s.speedup),
                times(s.decode_speedup),
                format!("{:.0}%", s.acceptance * 100.0),
                format!("{:.2}", s.drafts_per_token),
                if s.same_text { "yes" } else { "NO" }.to_string(),
            ],
            None => {
                let plain = format!("{:.1}", r.plain.tokens_per_s);
                ["-", &plain, "FAILED", "-", "-", "-", "-", "-"].map(String::from).to_vec()
            }
        };
        let ours = [
            format!("{:.2}×", r.our_speedup),
            times(r.our_decode_speedup),
            format!("{:.0}%", r.our_acceptance * 100.0),
        ];
        rows.push([vec![r.workload.to_string(), r.mode.name.clone()], spec, ours.to_vec()].concat());
    }
    lines.push(align(&rows, 2));
    // Each mode's flags once (the rows repeat them per workload), then the failures.
    let mut seen = Vec::new();
    for r in &llama.rows {
        if !seen.contains(&&r.mode.name) {
            seen.push(&r.mode.name);
            lines.push(format!("{}: {}", r.mode.name, r.mode.flags.join(" ")));
        }
    }
    for r in &llama.rows {
        if let Some(error) = &r.error {
            lines.push(format!("{} {} failed: {error}", r.workload, r.mode.name));
        }
    }
    lines.push(String::new());
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(mode: &LlamaMode) -> String {
        mode.flags.join(" ")
    }

    #[test]
    fn prompt_lookup_maps_to_every_ngram_type_with_our_lengths() {
        let config = SpeculativeConfig::from_json(r#"{"method": "ngram", "num_speculative_tokens": 3}"#).unwrap();
        let modes = llama_modes(&config);
        let names: Vec<&str> = modes.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ngram-simple n=3 k=3",
                "ngram-map-k n=4 k=3",
                "ngram-map-k4v n=4 k=3",
                "ngram-mod n=4 k=3",
                "ngram-cache k=8 (fixed)"
            ]
        );
        // ngram-simple drafts nothing with a lookup longer than its drafts: n is capped at k.
        assert_eq!(
            flags(&modes[0]),
            "--spec-type ngram-simple --spec-ngram-simple-size-n 3 --spec-ngram-simple-size-m 3"
        );
        assert_eq!(
            flags(&modes[2]),
            "--spec-type ngram-map-k4v --spec-ngram-map-k4v-size-n 4 --spec-ngram-map-k4v-size-m 3"
        );
        assert_eq!(
            flags(&modes[3]),
            "--spec-type ngram-mod --spec-ngram-mod-n-match 4 --spec-ngram-mod-n-max 3 --spec-ngram-mod-n-min 1"
        );
        assert_eq!(flags(&modes[4]), "--spec-type ngram-cache");
    }

    #[test]
    fn a_draft_model_maps_to_draft_simple() {
        let json = r#"{"method": "draft_model", "model": "d.gguf", "num_speculative_tokens": 5}"#;
        let modes = llama_modes(&SpeculativeConfig::from_json(json).unwrap());
        assert_eq!(modes.len(), 1);
        assert_eq!(flags(&modes[0]), "-md d.gguf --spec-type draft-simple --spec-draft-n-max 5");
    }
}

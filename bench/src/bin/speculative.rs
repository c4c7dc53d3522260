//! `pdserve-spec-bench`: speculative decoding by prompt lookup against the same engine without
//! it, in one run, on the same model, prompts and threads.
//!
//! Two workloads of chat requests (greedy, answers as long as the model makes them up to
//! `--max-tokens`):
//! - **copy**: answers that copy from their prompt (a summary that quotes, a rewrite, a code edit,
//!   a JSON extraction), where the drafts are often right;
//! - **chat**: open-ended questions, where they seldom are.
//!
//! Each is run one request at a time (**single stream**), then copy and chat requests
//! alternating, `--concurrent` at once (**16 concurrent** by default: every prompt twice). A figure is generated tokens
//! over the wall time from the first submit to the last answer ([`Llm::chat`], the engine the
//! workers run). The speculative run prints its acceptance (accepted / proposed draft tokens) and
//! the tokens each verifying step gave (1 + accepted / drafts), and checks that every answer is
//! the same token for token as without speculation (greedy).

use std::path::PathBuf;
use std::time::Instant;

use bench::{align, load_average};
use clap::Parser;
use engine::model::{load, LoadOptions};
use engine::offline::{ChatMessage, Llm, LlmConfig};
use engine::{SamplingParams, SpeculationStats, SpeculativeConfig};
use serde::Serialize;

const NAME: &str = "pdserve-spec-bench";

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
    /// Threads (default: the machine's cores).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
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
}

#[derive(Debug, Serialize)]
struct Row {
    workload: &'static str,
    mode: String,
    plain: Figure,
    speculative: Figure,
    speedup: f64,
    /// Accepted over proposed draft tokens.
    acceptance: f64,
    /// Tokens per verifying forward pass of a sequence.
    tokens_per_verify: f64,
    /// Draft tokens proposed per generated token (how often there was something to verify).
    drafts_per_token: f64,
    same_tokens: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    threads: usize,
    speculative: String,
    max_tokens: u32,
    rows: Vec<Row>,
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
    let conversation = |p: &String| vec![ChatMessage::text("user", p.clone())];
    // Warm-up: the first forward pass pays for page faults and thread start.
    llm.chat(vec![conversation(&prompts[0])], &SamplingParams { max_tokens: 4, ..params.clone() })?;
    let start = Instant::now();
    let outputs = if at_once {
        llm.chat(prompts.iter().map(conversation).collect(), &params)?
    } else {
        let mut outputs = Vec::new();
        for p in prompts {
            outputs.extend(llm.chat(vec![conversation(p)], &params)?);
        }
        outputs
    };
    let secs = start.elapsed().as_secs_f64();
    let ids: Vec<Vec<u32>> = outputs.iter().map(|o| o.first().token_ids.clone()).collect();
    let tokens = ids.iter().map(Vec::len).sum();
    Ok((ids, Figure { tokens, secs, tokens_per_s: tokens as f64 / secs }))
}

fn run(args: Args, threads: usize) -> anyhow::Result<()> {
    let load_start = load_average();
    let plain = llm(&args, None)?;
    let speculating = llm(&args, Some(args.speculative_config.clone()))?;
    let (copy, chat) = (copy_tasks(), chat_tasks());
    // Copy and chat prompts alternating, as many as each concurrent run takes (16: each twice).
    let mixed = |n: u32| {
        let pick = |i: usize| if i.is_multiple_of(2) { &copy[i / 2 % copy.len()] } else { &chat[i / 2 % chat.len()] };
        (0..n as usize).map(|i| pick(i).clone()).collect()
    };
    let mut runs: Vec<(&str, String, Vec<String>, bool)> = vec![
        ("copy", "single stream".into(), copy.clone(), false),
        ("chat", "single stream".into(), chat.clone(), false),
    ];
    runs.extend(args.concurrent.iter().map(|&n| ("copy + chat", format!("{n} concurrent"), mixed(n), true)));
    let mut rows = Vec::new();
    for (workload, mode, prompts, at_once) in runs {
        let (plain_ids, plain_figure) = measure(&plain, &prompts, args.max_tokens, at_once)?;
        let before = speculating.engine().stats().speculation;
        let (spec_ids, spec_figure) = measure(&speculating, &prompts, args.max_tokens, at_once)?;
        let spec = since(speculating.engine().stats().speculation, before);
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        rows.push(Row {
            workload,
            mode: mode.clone(),
            plain: plain_figure,
            speculative: spec_figure,
            speedup: spec_figure.tokens_per_s / plain_figure.tokens_per_s,
            acceptance: ratio(spec.num_accepted_tokens, spec.num_draft_tokens),
            tokens_per_verify: 1.0 + ratio(spec.num_accepted_tokens, spec.num_drafts),
            drafts_per_token: ratio(spec.num_draft_tokens, spec_figure.tokens as u64),
            same_tokens: plain_ids == spec_ids,
        });
        if !args.json {
            eprintln!("{NAME}: {workload} {mode} done");
        }
    }
    let report = Report {
        threads,
        speculative: args.speculative_config.to_string(),
        max_tokens: args.max_tokens,
        rows,
        load_average: [load_start, load_average()],
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

/// The counters' growth from `before` to `after`.
fn since(after: SpeculationStats, before: SpeculationStats) -> SpeculationStats {
    SpeculationStats {
        num_drafts: after.num_drafts - before.num_drafts,
        num_draft_tokens: after.num_draft_tokens - before.num_draft_tokens,
        num_accepted_tokens: after.num_accepted_tokens - before.num_accepted_tokens,
    }
}

fn table(report: &Report) -> String {
    let mut lines = vec![
        format!(
            "speculative decoding ({}) against none; {} threads, greedy, up to {} tokens per answer",
            report.speculative, report.threads, report.max_tokens
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
        "acceptance",
        "tokens/verify",
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
            format!("{:.0}%", r.acceptance * 100.0),
            format!("{:.2}", r.tokens_per_verify),
            format!("{:.2}", r.drafts_per_token),
            if r.same_tokens { "yes" } else { "NO" }.to_string(),
        ]);
    }
    lines.push(align(&rows, 2));
    lines.join("\n")
}

//! `pdserve-handoff-ttft`: what the KV hand-off costs a long prompt, on this
//! one machine. One prefill worker and one decode worker run as real
//! processes (by default the decode worker maps the prefill worker's KV cache
//! through shared memory; `--kv-transport tcp` makes it pull over TCP), with
//! two routers over them: a disaggregated one over both with
//! `--local-prefill-max-tokens 0`, so every request hands off, and a colocated
//! one over the decode worker alone, which prefills locally.
//!
//! Every request is a streamed `/v1/completions` call whose prompt is
//! `--prompt-tokens` token ids (1,024 by default), greedy, `max_tokens` 2,
//! `ignore_eos` (an eos first token does not end it early) and
//! `return_token_ids` (each chunk says which generated tokens it carries).
//! No two prompts share a first token (the rest are pseudo-random ids in
//! 1000..20000), so neither side is helped by a prefix cache. The usage chunk
//! is checked: the router counted exactly the prompt's tokens and
//! `max_tokens` completion tokens.
//!
//! How each figure is measured, client side, from just before the request is
//! sent:
//! - TTFT: until the SSE chunk that carries the first generated token id is
//!   read off the socket. Disaggregated, the prefill worker computes the
//!   prompt and samples this token itself.
//! - second token: until the chunk carrying the second generated token id.
//!   Disaggregated, the decode worker pulls the prompt's KV from the prefill
//!   worker between the two, so this is the figure that contains the hand-off;
//!   colocated, it is one decode step after the first token.
//! - gap: second token minus TTFT, per request.
//!
//! A token whose text is not complete yet (part of a UTF-8 character) gives
//! no chunk of its own; its id then comes in the next chunk, and its time is
//! that chunk's. Such requests are counted (`merged`) rather than dropped.
//!
//! Requests run one at a time, never concurrently: `--warmup` untimed pairs
//! first, then `--requests` timed pairs, each pair one disaggregated and one
//! colocated request, the order within a pair alternating so neither mode
//! always follows the other. Percentiles are nearest-rank; the overhead
//! ratios are disaggregated p50 over colocated p50. After the run the decode
//! worker's `GetStats` shows which transport its KV pulls took.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bench::{align, load_average, percentile};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use tests::process::Process;
use tests::{start_decode_with, start_prefill, start_router, take_turn, worker_stats};

/// The second-token overhead this bench is judged against: at most 5%.
const SECOND_TOKEN_TARGET: f64 = 1.05;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Transport {
    /// The decode worker's default: shared memory with a same-host prefill worker.
    Auto,
    /// Always TCP (`--kv-transport tcp` on the decode worker).
    Tcp,
}

#[derive(Debug, Parser)]
#[command(
    name = "pdserve-handoff-ttft",
    about = "KV hand-off cost: TTFT and second-token time, disaggregated against colocated"
)]
struct Args {
    /// Timed requests per mode.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,
    /// Untimed warm-up requests per mode.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(2..))]
    prompt_tokens: u64,
    /// Tokens generated per request (at least 2: the hand-off comes before the second).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(2..))]
    max_tokens: u64,
    /// The decode worker's KV transport.
    #[arg(long, value_enum, default_value_t = Transport::Auto)]
    kv_transport: Transport,
    /// Start the decode worker with `--kv-layer-streaming`: its first step
    /// runs while the KV arrives, each layer waiting for its own.
    #[arg(long)]
    kv_layer_streaming: bool,
    /// Seed of the prompts' pseudo-random token ids.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Disaggregated,
    Colocated,
}

/// One timed request.
struct Sample {
    ttft: Duration,
    second: Duration,
    /// The first token came in the same chunk as the second.
    merged: bool,
}

/// The figures of one mode.
#[derive(Debug, Serialize)]
struct ModeReport {
    mode: Mode,
    requests: usize,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    second_token_p50_ms: f64,
    second_token_p99_ms: f64,
    gap_p50_ms: f64,
    gap_p99_ms: f64,
    /// Requests whose first token had no chunk of its own.
    merged: usize,
    /// Every request's TTFT and second-token time, in send order.
    ttft_ms: Vec<f64>,
    second_token_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    prompt_tokens: u64,
    max_tokens: u64,
    requests_per_mode: u64,
    warmup_per_mode: u64,
    kv_transport: Transport,
    kv_layer_streaming: bool,
    modes: Vec<ModeReport>,
    /// Disaggregated TTFT p50 over colocated.
    ttft_p50_ratio: f64,
    /// Disaggregated second-token p50 over colocated (target ≤ 1.05).
    second_token_p50_ratio: f64,
    second_token_target: f64,
    /// The decode worker's KV pulls over the run, by transport.
    kv_pulls_shm: u64,
    kv_pulls_tcp: u64,
    /// 1-minute load average at start and end.
    load_average: [Option<f64>; 2],
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    let _turn = take_turn();
    let load_average_start = load_average();

    eprintln!("starting a prefill worker, a decode worker and two routers ...");
    let prefill = start_prefill("127.0.0.1:0");
    let mut decode_flags: Vec<&str> = match args.kv_transport {
        Transport::Auto => vec![],
        Transport::Tcp => vec!["--kv-transport", "tcp"],
    };
    if args.kv_layer_streaming {
        decode_flags.push("--kv-layer-streaming");
    }
    let decode = start_decode_with(&decode_flags);
    let disaggregated = start_router(&[&prefill], &[&decode], &["--local-prefill-max-tokens", "0"]);
    let colocated = start_router(&[], &[&decode], &[]);

    let result = runtime.block_on(run(&args, &disaggregated, &colocated, &decode));
    let load_average_end = load_average();
    drop((disaggregated, colocated, decode, prefill));
    let (modes, (kv_pulls_shm, kv_pulls_tcp)) = result?;

    let (d, c) = (&modes[0], &modes[1]);
    let report = Report {
        prompt_tokens: args.prompt_tokens,
        max_tokens: args.max_tokens,
        requests_per_mode: args.requests,
        warmup_per_mode: args.warmup,
        kv_transport: args.kv_transport,
        kv_layer_streaming: args.kv_layer_streaming,
        ttft_p50_ratio: d.ttft_p50_ms / c.ttft_p50_ms,
        second_token_p50_ratio: d.second_token_p50_ms / c.second_token_p50_ms,
        second_token_target: SECOND_TOKEN_TARGET,
        kv_pulls_shm,
        kv_pulls_tcp,
        load_average: [load_average_start, load_average_end],
        modes,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Runs the warm-up and timed pairs; the modes' reports and the decode
/// worker's (shm, tcp) pulls over the run.
async fn run(
    args: &Args,
    disaggregated: &Process,
    colocated: &Process,
    decode: &Process,
) -> anyhow::Result<(Vec<ModeReport>, (u64, u64))> {
    let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let before = worker_stats(decode.url()).await;
    let mut next_prompt = 0u64;
    let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    let pairs = args.warmup + args.requests;
    for pair in 0..pairs {
        let timed = pair >= args.warmup;
        let order =
            if pair % 2 == 0 { [Mode::Disaggregated, Mode::Colocated] } else { [Mode::Colocated, Mode::Disaggregated] };
        for mode in order {
            let url = match mode {
                Mode::Disaggregated => disaggregated.url(),
                Mode::Colocated => colocated.url(),
            };
            let prompt = prompt_ids(args.seed, next_prompt, args.prompt_tokens as usize);
            next_prompt += 1;
            let sample = request(&client, url, &prompt, args.max_tokens)
                .await
                .with_context(|| format!("{mode:?} request {pair}"))?;
            if timed {
                samples[mode as usize].push(sample);
            }
        }
        eprintln!("pair {}/{pairs}{}", pair + 1, if timed { "" } else { " (warm-up)" });
    }
    let after = worker_stats(decode.url()).await;
    let pulls = (after.kv_pulls_shm - before.kv_pulls_shm, after.kv_pulls_tcp - before.kv_pulls_tcp);
    let [d, c] = samples;
    Ok((vec![mode_report(Mode::Disaggregated, &d), mode_report(Mode::Colocated, &c)], pulls))
}

/// Request `index`'s prompt: a first token no other request has, then
/// pseudo-random ids in 1000..20000 (xorshift64*, seeded per request).
fn prompt_ids(seed: u64, index: u64, len: usize) -> Vec<u32> {
    let mut state = (seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(index.wrapping_add(1)).max(1);
    let mut ids = vec![1000 + index as u32];
    ids.extend((1..len).map(|_| {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        1000 + (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as u32 % 19_000
    }));
    ids
}

/// Sends one streamed completion and times its first two generated tokens.
async fn request(client: &reqwest::Client, url: &str, prompt: &[u32], max_tokens: u64) -> anyhow::Result<Sample> {
    let body = json!({
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true,
        "ignore_eos": true, "return_token_ids": true, "stream_options": {"include_usage": true},
    });
    let body = serde_json::to_vec(&body)?;
    let sent = Instant::now();
    let response = client
        .post(format!("{url}/v1/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await?
        .error_for_status()?;
    let mut bytes = response.bytes_stream();
    let mut buffer = String::new();
    let (mut generated, mut chunks_with_tokens) = (0usize, 0usize);
    let (mut ttft, mut second) = (None, None);
    let mut usage = None;
    let mut done = false;
    while let Some(chunk) = bytes.next().await {
        let now = sent.elapsed();
        buffer.push_str(std::str::from_utf8(&chunk?)?);
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data:")).map(str::trim) else { continue };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let chunk: Value = serde_json::from_str(data).with_context(|| format!("SSE chunk {data}"))?;
            if chunk.get("error").is_some() {
                bail!("stream error: {data}");
            }
            if let Some(ids) = chunk["prompt_token_ids"].as_array() {
                ensure!(ids.len() == prompt.len(), "the router saw {} prompt tokens, not {}", ids.len(), prompt.len());
            }
            if !chunk["usage"].is_null() {
                usage = Some(chunk["usage"].clone());
            }
            let tokens = chunk["choices"][0]["token_ids"].as_array().map_or(0, Vec::len);
            if tokens == 0 {
                continue;
            }
            chunks_with_tokens += 1;
            generated += tokens;
            if generated >= 1 && ttft.is_none() {
                ttft = Some(now);
            }
            if generated >= 2 && second.is_none() {
                second = Some(now);
            }
        }
    }
    ensure!(done, "the stream ended without [DONE]");
    let usage = usage.context("no usage chunk")?;
    ensure!(
        usage["prompt_tokens"] == prompt.len() && usage["completion_tokens"] == max_tokens,
        "usage {usage} for a {}-token prompt and max_tokens {max_tokens}",
        prompt.len()
    );
    let (Some(ttft), Some(second)) = (ttft, second) else { bail!("only {generated} generated tokens streamed") };
    // The first token's chunk was withheld when the chunk carrying the
    // second token also carried the first.
    let merged = ttft == second || chunks_with_tokens < 2;
    Ok(Sample { ttft, second, merged })
}

fn mode_report(mode: Mode, samples: &[Sample]) -> ModeReport {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let sorted = |f: &dyn Fn(&Sample) -> f64| {
        let mut v: Vec<f64> = samples.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let ttft = sorted(&|s| ms(s.ttft));
    let second = sorted(&|s| ms(s.second));
    let gap = sorted(&|s| ms(s.second - s.ttft));
    ModeReport {
        mode,
        requests: samples.len(),
        ttft_p50_ms: percentile(&ttft, 0.50),
        ttft_p99_ms: percentile(&ttft, 0.99),
        second_token_p50_ms: percentile(&second, 0.50),
        second_token_p99_ms: percentile(&second, 0.99),
        gap_p50_ms: percentile(&gap, 0.50),
        gap_p99_ms: percentile(&gap, 0.99),
        merged: samples.iter().filter(|s| s.merged).count(),
        ttft_ms: samples.iter().map(|s| ms(s.ttft)).collect(),
        second_token_ms: samples.iter().map(|s| ms(s.second)).collect(),
    }
}

fn print_table(r: &Report) {
    println!(
        "KV hand-off: {}-token prompts, max_tokens {}, {} timed + {} warm-up requests per mode, one at a time; \
         decode worker --kv-transport {}{}",
        r.prompt_tokens,
        r.max_tokens,
        r.requests_per_mode,
        r.warmup_per_mode,
        match r.kv_transport {
            Transport::Auto => "auto (shared memory on this host)",
            Transport::Tcp => "tcp",
        },
        if r.kv_layer_streaming { " --kv-layer-streaming" } else { "" }
    );
    println!();
    let mut rows = vec![[
        "mode",
        "requests",
        "TTFT p50",
        "TTFT p99",
        "2nd token p50",
        "2nd token p99",
        "gap p50",
        "gap p99",
        "merged",
    ]
    .map(String::from)
    .to_vec()];
    let f = |v: f64| format!("{v:.1} ms");
    for m in &r.modes {
        rows.push(vec![
            format!("{:?}", m.mode).to_lowercase(),
            m.requests.to_string(),
            f(m.ttft_p50_ms),
            f(m.ttft_p99_ms),
            f(m.second_token_p50_ms),
            f(m.second_token_p99_ms),
            f(m.gap_p50_ms),
            f(m.gap_p99_ms),
            m.merged.to_string(),
        ]);
    }
    print!("{}", align(&rows, 1));
    println!();
    let met = |ok: bool| if ok { "yes" } else { "no" };
    println!(
        "TTFT p50, disaggregated / colocated: {:.3} ({:+.1}%)",
        r.ttft_p50_ratio,
        100.0 * (r.ttft_p50_ratio - 1.0)
    );
    println!(
        "second-token p50, disaggregated / colocated: {:.3} ({:+.1}%; target <= {:.2}: {})",
        r.second_token_p50_ratio,
        100.0 * (r.second_token_p50_ratio - 1.0),
        r.second_token_target,
        met(r.second_token_p50_ratio <= r.second_token_target)
    );
    println!("decode worker KV pulls over the run: kv_pulls_shm {}, kv_pulls_tcp {}", r.kv_pulls_shm, r.kv_pulls_tcp);
    println!(
        "load average: {} at start, {} at end (2 cores shared by every process and the client)",
        r.load_average[0].map_or("?".into(), |l| format!("{l:.2}")),
        r.load_average[1].map_or("?".into(), |l| format!("{l:.2}"))
    );
}

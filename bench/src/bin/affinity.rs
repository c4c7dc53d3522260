//! `pdserve-affinity`: the prefix-affinity benchmark. A multi-turn chat
//! workload (conversations sharing one system prompt, each turn resending the
//! whole history) runs through a disaggregated cluster with two prefill
//! workers, once with cache-aware placement and once round-robin, on fresh
//! workers each time. It prints, per policy: the prompt tokens the prefill
//! workers served from their prefix cache against the single-worker ideal,
//! the spread of requests over the prefill workers, and TTFT percentiles.
//!
//! The ideal is computed, not run: the prompts are tokenized through the
//! router's `/tokenize`, and a request's ideal cached part is its longest
//! prefix of full blocks already sent by an earlier request (at most
//! `len - 1` tokens, as an engine must compute one), which is what one worker
//! with an unbounded cache would serve.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bench::{load_average, percentile};
use clap::Parser;
use futures::stream::{self, StreamExt};
use prompt::block_hash::block_hashes;
use serde::Serialize;
use serde_json::{json, Value};
use tests::metrics::{sample, scrape};
use tests::process::Process;
use tests::{start_decode, start_prefill, start_router};

#[derive(Debug, Parser)]
#[command(name = "pdserve-affinity", about = "Prefix-affinity benchmark: cache-aware placement against round-robin")]
struct Args {
    /// Conversations.
    #[arg(long, default_value_t = 32)]
    conversations: usize,
    /// Turns per conversation.
    #[arg(long, default_value_t = 6)]
    turns: usize,
    /// Conversations in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Prefill workers (at least 2).
    #[arg(long, default_value_t = 2)]
    prefill_workers: usize,
    /// Tokens generated per turn.
    #[arg(long, default_value_t = 12)]
    max_tokens: u32,
    /// The workers' KV block size (their `--block-size`).
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// About 300 tokens, as system prompts of deployed assistants commonly are.
const SYSTEM_PROMPT: &str = "You are the front-desk assistant of the Riverside Public Library. You answer \
    questions from visitors about books, shelves, opening hours, memberships, fees, events and the rules of \
    the reading rooms. The library opens from nine in the morning to eight in the evening on weekdays, and \
    from ten to five on Saturdays; it is closed on Sundays and public holidays. Members may borrow up to six \
    items at once for three weeks, renewable twice unless someone else has reserved the item. Late returns \
    cost twenty cents per item per day, capped at five dollars per item. Children under twelve need a parent \
    to sign their membership form. The quiet reading room is on the second floor; group study rooms are on \
    the third floor and must be booked at the desk or online, for at most two hours a day. Non-fiction is \
    shelved by the Dewey decimal system on the first floor, fiction alphabetically by author on the ground \
    floor, and the children's section is in the east wing. Keep every answer short, friendly and factual. \
    When you do not know something, say so and suggest asking a librarian at the desk. Never invent titles, \
    authors, dates or prices, and never promise that a specific book is available.";

const TOPICS: [&str; 8] =
    ["astronomy", "gardening", "medieval history", "chess", "bread baking", "sailing", "birdwatching", "poetry"];

/// The figures of one policy's run.
#[derive(Debug, Serialize)]
struct PolicyReport {
    policy: &'static str,
    requests: usize,
    prompt_tokens: u64,
    /// Prompt tokens the prefill workers reported served from cache.
    cached_tokens: u64,
    /// `cached_tokens / prompt_tokens`.
    hit_rate: f64,
    /// `hit_rate / ideal hit rate`.
    hit_rate_vs_ideal: f64,
    /// Requests per prefill worker.
    per_worker: Vec<u64>,
    /// Most loaded worker's requests over the mean.
    max_over_mean_load: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    wall_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    conversations: usize,
    turns: usize,
    concurrency: usize,
    prefill_workers: usize,
    ideal_hit_rate: f64,
    policies: Vec<PolicyReport>,
    /// Round-robin's TTFT p50 over cache-aware's (target ≥ 2).
    ttft_p50_speedup: f64,
    /// Cache-aware hit rate over the ideal (target ≥ 0.95).
    hit_rate_vs_ideal: f64,
    /// 1-minute load average at start and end.
    load_average: [Option<f64>; 2],
}

/// One conversation's messages so far.
fn user_turn(conversation: usize, turn: usize) -> String {
    let topic = TOPICS[conversation % TOPICS.len()];
    format!(
        "Visitor {conversation}, question {turn}: I am looking for books on {topic} for a project I am working \
         on this month. Which floor and shelf should I try first, how many of them can I take home at once, and \
         what happens if I return them a few days late?"
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.prefill_workers < 2 {
        bail!("--prefill-workers must be at least 2");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let load_average_start = load_average();
    let mut policies = Vec::new();
    let mut ideal_hit_rate = 0.0;
    for policy in ["cache-aware", "round-robin"] {
        eprintln!("running {policy} ...");
        let (report, ideal) = runtime.block_on(run_policy(&args, policy))?;
        ideal_hit_rate = ideal;
        policies.push(report);
    }
    let (ours, rr) = (&policies[0], &policies[1]);
    let report = Report {
        conversations: args.conversations,
        turns: args.turns,
        concurrency: args.concurrency,
        prefill_workers: args.prefill_workers,
        ideal_hit_rate,
        ttft_p50_speedup: rr.ttft_p50_ms / ours.ttft_p50_ms,
        hit_rate_vs_ideal: ours.hit_rate_vs_ideal,
        load_average: [load_average_start, load_average()],
        policies,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "prefix affinity: {} conversations x {} turns, {} at once, {} prefill workers + 1 decode worker",
        r.conversations, r.turns, r.concurrency, r.prefill_workers
    );
    println!("single-worker ideal hit rate: {:.1}%", 100.0 * r.ideal_hit_rate);
    println!();
    println!(
        "| policy | requests | hit rate | vs ideal | requests per worker | max/mean load | TTFT p50 | TTFT p99 | wall |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for p in &r.policies {
        println!(
            "| {} | {} | {:.1}% | {:.1}% | {:?} | {:.2} | {:.0} ms | {:.0} ms | {:.0} s |",
            p.policy,
            p.requests,
            100.0 * p.hit_rate,
            100.0 * p.hit_rate_vs_ideal,
            p.per_worker,
            p.max_over_mean_load,
            p.ttft_p50_ms,
            p.ttft_p99_ms,
            p.wall_s
        );
    }
    println!();
    let met = |ok: bool| if ok { "yes" } else { "no" };
    println!(
        "hit rate vs ideal: {:.1}% (target >= 95%: {})",
        100.0 * r.hit_rate_vs_ideal,
        met(r.hit_rate_vs_ideal >= 0.95)
    );
    println!(
        "TTFT p50, round-robin / cache-aware: {:.2}x (target >= 2x: {})",
        r.ttft_p50_speedup,
        met(r.ttft_p50_speedup >= 2.0)
    );
    println!(
        "load average: {} at start, {} at end (2 cores shared by every process and the client)",
        r.load_average[0].map_or("?".into(), |l| format!("{l:.2}")),
        r.load_average[1].map_or("?".into(), |l| format!("{l:.2}"))
    );
}

/// What one request gave back.
struct Turn {
    ttft: Duration,
    prompt_ids: Vec<u32>,
}

async fn run_policy(args: &Args, policy: &'static str) -> anyhow::Result<(PolicyReport, f64)> {
    // Fresh workers: no policy inherits the other's caches.
    let prefill: Vec<Process> = (0..args.prefill_workers).map(|_| start_prefill("127.0.0.1:0")).collect();
    let decode = start_decode();
    let prefill_refs: Vec<&Process> = prefill.iter().collect();
    let router = start_router(&prefill_refs, &[&decode], &["--policy", policy, "--local-prefill-max-tokens", "0"]);
    let url = router.url().to_owned();
    if policy == "cache-aware" {
        // Round-robin follows no KV event streams.
        wait_for_workers(&url, args.prefill_workers).await?;
    }
    let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let before = scrape(&url).await;

    let started = Instant::now();
    let conversations: Vec<anyhow::Result<Vec<Turn>>> = stream::iter(0..args.conversations)
        .map(|c| converse(&client, &url, c, args))
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let wall = started.elapsed();
    let after = scrape(&url).await;
    let turns: Vec<Turn> =
        conversations.into_iter().collect::<anyhow::Result<Vec<_>>>()?.into_iter().flatten().collect();

    let delta = |name: &str, labels: &[(&str, &str)]| sample(&after, name, labels) - sample(&before, name, labels);
    let prompt_tokens = delta("pdserve_router_prompt_tokens_total", &[]) as u64;
    let cached_tokens = delta("pdserve_router_prefix_cached_tokens_total", &[]) as u64;
    let per_worker: Vec<u64> = (0..args.prefill_workers)
        .map(|w| delta("pdserve_router_placements_total", &[("pool", "prefill"), ("worker", &w.to_string())]) as u64)
        .collect();
    let mean = per_worker.iter().sum::<u64>() as f64 / per_worker.len() as f64;
    let max = per_worker.iter().copied().max().unwrap_or(0) as f64;
    let ideal = ideal_hit_rate(&turns, args.block_size);
    let hit_rate = cached_tokens as f64 / prompt_tokens.max(1) as f64;
    let mut ttfts: Vec<f64> = turns.iter().map(|t| t.ttft.as_secs_f64() * 1000.0).collect();
    ttfts.sort_by(f64::total_cmp);
    let report = PolicyReport {
        policy,
        requests: turns.len(),
        prompt_tokens,
        cached_tokens,
        hit_rate,
        hit_rate_vs_ideal: hit_rate / ideal,
        per_worker,
        max_over_mean_load: max / mean.max(f64::MIN_POSITIVE),
        ttft_p50_ms: percentile(&ttfts, 0.50),
        ttft_p99_ms: percentile(&ttfts, 0.99),
        wall_s: wall.as_secs_f64(),
    };
    drop((router, decode, prefill));
    Ok((report, ideal))
}

async fn wait_for_workers(url: &str, workers: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = scrape(url).await;
        let up = (0..workers)
            .filter(|w| {
                sample(&text, "pdserve_router_worker_up", &[("pool", "prefill"), ("worker", &w.to_string())]) == 1.0
            })
            .count();
        if up == workers {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {up} of {workers} prefill workers' KV event streams came up");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs one conversation's turns in order, each resending the history.
async fn converse(client: &reqwest::Client, url: &str, conversation: usize, args: &Args) -> anyhow::Result<Vec<Turn>> {
    let mut messages = vec![json!({"role": "system", "content": SYSTEM_PROMPT})];
    let mut turns = Vec::with_capacity(args.turns);
    for turn in 0..args.turns {
        messages.push(json!({"role": "user", "content": user_turn(conversation, turn)}));
        let tokenized: Value = client
            .post(format!("{url}/tokenize"))
            .json(&json!({"messages": messages}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let prompt_ids: Vec<u32> = serde_json::from_value(tokenized["tokens"].clone()).context("/tokenize tokens")?;
        let body = json!({
            "messages": messages, "max_tokens": args.max_tokens, "temperature": 0, "stream": true,
        });
        let sent = Instant::now();
        let response =
            client.post(format!("{url}/v1/chat/completions")).json(&body).send().await?.error_for_status()?;
        let (ttft, reply) = read_stream(response, sent).await?;
        messages.push(json!({"role": "assistant", "content": reply}));
        turns.push(Turn { ttft, prompt_ids });
    }
    Ok(turns)
}

/// Time to the first content delta, and the whole reply.
async fn read_stream(response: reqwest::Response, sent: Instant) -> anyhow::Result<(Duration, String)> {
    let mut bytes = response.bytes_stream();
    let mut buffer = String::new();
    let mut reply = String::new();
    let mut ttft = None;
    while let Some(chunk) = bytes.next().await {
        buffer.push_str(std::str::from_utf8(&chunk?)?);
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
            if data == "[DONE]" {
                continue;
            }
            let chunk: Value = serde_json::from_str(data).with_context(|| format!("SSE chunk {data}"))?;
            if chunk.get("error").is_some() {
                bail!("stream error: {data}");
            }
            if let Some(content) = chunk["choices"][0]["delta"]["content"].as_str() {
                // The opening role chunk carries "" and no token yet.
                if !content.is_empty() && ttft.is_none() {
                    ttft = Some(sent.elapsed());
                }
                reply.push_str(content);
            }
        }
    }
    Ok((ttft.unwrap_or_else(|| sent.elapsed()), reply))
}

/// The cached share one worker with an unbounded cache would reach.
fn ideal_hit_rate(turns: &[Turn], block_size: usize) -> f64 {
    let mut seen = HashSet::new();
    let (mut cached, mut total) = (0usize, 0usize);
    // Turns come grouped by conversation, each in order. A turn can only
    // reuse its own conversation's earlier turns and the shared system
    // prompt, so this order gives the same ideal as the real send order.
    for turn in turns {
        let hashes = block_hashes(b"", &turn.prompt_ids, block_size);
        let usable = turn.prompt_ids.len().saturating_sub(1) / block_size;
        let hit = hashes.iter().take(usable).take_while(|h| seen.contains(*h)).count();
        cached += hit * block_size;
        total += turn.prompt_ids.len();
        seen.extend(hashes);
    }
    cached as f64 / total.max(1) as f64
}

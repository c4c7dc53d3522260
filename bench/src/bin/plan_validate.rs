//! `pdserve-plan-validate`: checks `pdserve-plan`'s prediction against the
//! real cluster on this machine.
//!
//! It starts `--prefill` prefill workers and `--decode` decode workers as real
//! processes (`--prefill 0`: colocated serving over the decode workers) and a
//! router over them with `--local-prefill-max-tokens 0`, so every request
//! hands off as the simulator assumes. Prefix caching is off on every worker
//! and every prompt is distinct, as in the simulation.
//!
//! The requests are the planner's own trace: `--workload`'s seed gives the
//! same prompt and answer lengths and the same arrival times (scaled to each
//! rate) that the simulator runs. Each is a streamed `/v1/completions` call of
//! pseudo-random token ids, greedy, `ignore_eos`, `max_tokens` its answer
//! length, sent open-loop at its arrival time. Client side, from the arrival
//! time it was due (so a late client counts against the cluster):
//! - TTFT: until the first chunk that carries a generated token;
//! - TPOT: from there to the chunk with the last token, over the tokens after the first.
//!
//! For each rate of `--rates` (default: 0.5, 0.75, 1 and 1.25 times the
//! predicted goodput) it prints the measured SLO attainment beside the
//! simulator's on the same trace, then the measured goodput (the highest rate
//! tried that met the target) beside the predicted one. A rate's tail is
//! drained before the next rate starts.
//!
//! The simulator's workers are separate machines; here they share this one.
//! Run this and `pdserve-plan-measure` with the same `RAYON_NUM_THREADS` (the
//! cores over the workers), which the worker processes inherit, so the profile
//! is the speed of one worker's share.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use bench::{align, load_average, percentile};
use clap::Parser;
use futures::StreamExt;
use planner::{CostProfile, EngineLimits, Scenario, Topology, Workload};
use serde::Serialize;
use serde_json::{json, Value};
use tests::process::Process;
use tests::{start_decode_with, start_prefill_with, start_router, take_turn};
use tokio::time::Instant;

#[derive(Debug, Parser)]
#[command(
    name = "pdserve-plan-validate",
    about = "Measured SLO attainment and goodput beside pdserve-plan's prediction"
)]
struct Args {
    /// Cost profile JSON (from `pdserve-plan-measure`, on this machine).
    #[arg(long)]
    profile: PathBuf,
    /// Workload JSON (the planner's format).
    #[arg(long)]
    workload: PathBuf,
    /// Prefill workers; 0 is colocated serving.
    #[arg(long, default_value_t = 1)]
    prefill: usize,
    /// Decode workers.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=8))]
    decode: u64,
    /// Requests per rate (overrides the workload's `requests`; at least 10).
    #[arg(long, default_value_t = 100)]
    requests: usize,
    /// Rates to run, requests per second; default: 0.5, 0.75, 1, 1.25 × the predicted goodput.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Each worker's --max-num-seqs.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Each worker's --max-num-batched-tokens.
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// One request as the client saw it (seconds).
#[derive(Debug, Clone, Copy)]
struct Measured {
    ttft: f64,
    tpot: f64,
}

/// One rate: predicted and measured side by side.
#[derive(Debug, Serialize)]
struct RateRow {
    rate: f64,
    predicted: planner::RatePoint,
    measured_attainment: f64,
    measured_ttft_attainment: f64,
    measured_tpot_attainment: f64,
    measured_ttft_p50_ms: f64,
    measured_ttft_p90_ms: f64,
    measured_tpot_p50_ms: f64,
    measured_tpot_p90_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    topology: Topology,
    workload: Workload,
    limits: EngineLimits,
    predicted_goodput: f64,
    /// The highest rate run whose measured attainment met the target (0: none).
    measured_goodput: f64,
    rows: Vec<RateRow>,
    load_average: [Option<f64>; 2],
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cost = CostProfile::load(&args.profile)?;
    let mut workload = Workload::load(&args.workload)?;
    workload.requests = args.requests;
    workload.validate()?;
    let limits = EngineLimits { max_num_seqs: args.max_num_seqs, max_num_batched_tokens: args.max_num_batched_tokens };
    let topology = Topology::new(args.prefill, args.decode as usize);
    let trace = workload.trace();
    let scenario = Scenario { cost: &cost, limits, workload: &workload, trace: &trace };
    let predicted_goodput = scenario.goodput(topology).rate;
    let rates = if args.rates.is_empty() {
        ensure!(predicted_goodput > 0.0, "the planner predicts no goodput for this workload: give --rates");
        [0.5, 0.75, 1.0, 1.25].map(|f| f * predicted_goodput).to_vec()
    } else {
        args.rates.clone()
    };
    ensure!(rates.iter().all(|r| r.is_finite() && *r > 0.0), "--rates must be > 0");

    let runtime = tokio::runtime::Runtime::new()?;
    let _turn = take_turn();
    let load_start = load_average();
    eprintln!("starting {} ...", topology.label());
    let worker_flags = [
        "--no-prefix-caching".to_string(),
        "--max-num-seqs".to_string(),
        args.max_num_seqs.to_string(),
        "--max-num-batched-tokens".to_string(),
        args.max_num_batched_tokens.to_string(),
    ];
    let flags: Vec<&str> = worker_flags.iter().map(String::as_str).collect();
    let prefill: Vec<Process> = (0..args.prefill).map(|_| start_prefill_with("127.0.0.1:0", &flags)).collect();
    let decode: Vec<Process> = (0..args.decode).map(|_| start_decode_with(&flags)).collect();
    // Every request hands off, and the router never queues below the engines' own limit.
    let inflight = args.max_num_seqs.max(1024).to_string();
    let router = start_router(
        &prefill.iter().collect::<Vec<_>>(),
        &decode.iter().collect::<Vec<_>>(),
        &["--local-prefill-max-tokens", "0", "--max-inflight-per-worker", &inflight],
    );

    let mut rows = Vec::new();
    for (i, &rate) in rates.iter().enumerate() {
        eprintln!("rate {rate:.3} req/s: {} requests ...", workload.requests);
        // Later rates reuse the cluster; offset the prompts so none repeats.
        let measured = runtime.block_on(drive(router.url(), &workload, &trace, rate, i as u64))?;
        rows.push(row(&scenario, topology, rate, &measured));
    }
    drop((router, decode, prefill));
    let measured_goodput =
        rows.iter().filter(|r| r.measured_attainment >= workload.attainment).map(|r| r.rate).fold(0.0, f64::max);
    let report = Report {
        topology,
        workload: workload.clone(),
        limits,
        predicted_goodput,
        measured_goodput,
        rows,
        load_average: [load_start, load_average()],
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Sends the trace at `rate` and waits for every answer.
async fn drive(
    url: &str,
    workload: &Workload,
    trace: &planner::Trace,
    rate: f64,
    pass: u64,
) -> anyhow::Result<Vec<Measured>> {
    let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let start = Instant::now() + Duration::from_millis(200);
    let tasks: Vec<_> = trace
        .requests
        .iter()
        .zip(trace.arrivals(rate))
        .enumerate()
        .map(|(i, (r, at))| {
            let client = client.clone();
            let url = url.to_string();
            let due = start + Duration::from_secs_f64(at);
            let prompt = prompt_ids(workload.seed, pass * 1_000_000 + i as u64, r.input as usize);
            let max_tokens = r.output;
            tokio::spawn(async move {
                tokio::time::sleep_until(due).await;
                request(&client, &url, due, &prompt, max_tokens).await.with_context(|| format!("request {i}"))
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await??);
    }
    Ok(out)
}

/// Request `index`'s prompt: a first token no other request has, then
/// pseudo-random ids in 1000..20000 (xorshift64*), so no prefix is shared.
fn prompt_ids(seed: u64, index: u64, len: usize) -> Vec<u32> {
    let mut state = (seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(index.wrapping_add(1)).max(1);
    let mut ids = vec![1000 + (index % 19_000) as u32];
    ids.extend((1..len).map(|_| {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        1000 + (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as u32 % 19_000
    }));
    ids
}

/// One streamed completion; TTFT from `due`, TPOT over the tokens after the first.
async fn request(
    client: &reqwest::Client,
    url: &str,
    due: Instant,
    prompt: &[u32],
    max_tokens: u32,
) -> anyhow::Result<Measured> {
    let body = json!({
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": true,
        "ignore_eos": true, "return_token_ids": true,
    });
    let response = client
        .post(format!("{url}/v1/completions"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body)?)
        .send()
        .await?
        .error_for_status()?;
    let mut bytes = response.bytes_stream();
    let mut buffer = String::new();
    let (mut generated, mut first, mut last) = (0u32, None, None);
    let mut done = false;
    while let Some(chunk) = bytes.next().await {
        let now = Instant::now();
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
            let tokens = chunk["choices"][0]["token_ids"].as_array().map_or(0, Vec::len) as u32;
            if tokens > 0 {
                generated += tokens;
                first.get_or_insert(now);
                last = Some(now);
            }
        }
    }
    ensure!(done, "the stream ended without [DONE]");
    ensure!(generated == max_tokens, "{generated} tokens streamed, max_tokens {max_tokens}");
    let (Some(first), Some(last)) = (first, last) else { bail!("no token streamed") };
    let ttft = (first - due).as_secs_f64();
    let tpot = if max_tokens > 1 { (last - first).as_secs_f64() / f64::from(max_tokens - 1) } else { 0.0 };
    Ok(Measured { ttft, tpot })
}

/// Measured figures over the workload's measured range, beside the prediction.
fn row(scenario: &Scenario<'_>, topology: Topology, rate: f64, measured: &[Measured]) -> RateRow {
    let w = scenario.workload;
    let m = &measured[w.measured()];
    let n = m.len().max(1) as f64;
    let ttft_ok = |r: &Measured| r.ttft * 1e3 <= w.slo.ttft_ms;
    let tpot_ok = |r: &Measured| r.tpot * 1e3 <= w.slo.tpot_ms;
    let sorted = |f: &dyn Fn(&Measured) -> f64| {
        let mut v: Vec<f64> = m.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let ttft = sorted(&|r| r.ttft * 1e3);
    let tpot = sorted(&|r| r.tpot * 1e3);
    RateRow {
        rate,
        predicted: scenario.evaluate(topology, rate),
        measured_attainment: m.iter().filter(|r| ttft_ok(r) && tpot_ok(r)).count() as f64 / n,
        measured_ttft_attainment: m.iter().filter(|r| ttft_ok(r)).count() as f64 / n,
        measured_tpot_attainment: m.iter().filter(|r| tpot_ok(r)).count() as f64 / n,
        measured_ttft_p50_ms: percentile(&ttft, 0.5),
        measured_ttft_p90_ms: percentile(&ttft, 0.9),
        measured_tpot_p50_ms: percentile(&tpot, 0.5),
        measured_tpot_p90_ms: percentile(&tpot, 0.9),
    }
}

fn print_table(r: &Report) {
    let w = &r.workload;
    println!(
        "{}: {} requests per rate (seed {}), SLO TTFT {} ms, TPOT {} ms, target {:.0}%",
        r.topology.label(),
        w.requests,
        w.seed,
        w.slo.ttft_ms,
        w.slo.tpot_ms,
        w.attainment * 100.0
    );
    let mut rows = vec![[
        "rate/s",
        "attained pred",
        "attained real",
        "TTFT p90 pred",
        "TTFT p90 real",
        "TPOT p90 pred",
        "TPOT p90 real",
    ]
    .map(String::from)
    .to_vec()];
    let pct = |v: f64| format!("{:.1}%", v * 100.0);
    let ms = |v: f64| format!("{v:.1} ms");
    for row in &r.rows {
        rows.push(vec![
            format!("{:.3}", row.rate),
            pct(row.predicted.attainment),
            pct(row.measured_attainment),
            ms(row.predicted.ttft_p90_ms),
            ms(row.measured_ttft_p90_ms),
            ms(row.predicted.tpot_p90_ms),
            ms(row.measured_tpot_p90_ms),
        ]);
    }
    print!("{}", align(&rows, 0));
    println!(
        "goodput: predicted {:.3} req/s, measured {:.3} req/s (the highest rate run that met {:.0}%)",
        r.predicted_goodput,
        r.measured_goodput,
        w.attainment * 100.0
    );
    println!(
        "load average: {} at start, {} at end",
        r.load_average[0].map_or("?".into(), |l| format!("{l:.2}")),
        r.load_average[1].map_or("?".into(), |l| format!("{l:.2}"))
    );
}

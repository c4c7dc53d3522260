//! `pdserve-router-overhead`: what the router adds to a request, measured against mock workers
//! that answer instantly, next to SMG (the Shepherd Model Gateway) in the same place.
//!
//! # Setup
//!
//! Every process runs here, on loopback ports the OS picks, as a child of the benchmark (killed
//! when it ends, on panic and Ctrl-C too):
//!
//! - a mock prefill worker and a mock decode worker (`--mock`: the real model card, no weights,
//!   every answer at once); the decode worker also serves its OpenAI HTTP face
//!   (`--mock-http-listen`);
//! - our router over both, disaggregated (every prompt handed off: `--local-prefill-max-tokens
//!   0`), and a second one over the decode worker alone (colocated);
//! - SMG (`smg launch --worker-urls`) over the HTTP face, when `smg` is installed
//!   (`scripts/setup-smg.sh`).
//!
//! # Targets and figures
//!
//! Four targets: **direct** (the mock's HTTP face, nothing in front: the baseline), **router PD**,
//! **router colocated** and **SMG**; each with streaming and non-streaming chat completions of
//! `--max-tokens` tokens.
//!
//! - Latency: `--requests` sequential requests per target (one at a time, after a warm-up, the
//!   targets taking turns request by request so that a drift in the machine's state weighs on
//!   all alike); p50/p90/p99 of the end-to-end time (non-streaming) or of the time to the last
//!   byte (streaming). "Added" is the target's percentile minus direct's.
//! - Throughput: a closed loop of `--concurrency` clients for `--seconds`: completed requests per
//!   second. "× SMG" is that over SMG's, same mode.
//! - CPU per request: the CPU time (user + system, all threads, from `/proc/<pid>/stat`) that the
//!   target's front process (the router, SMG, or for direct the mock) spent during the closed
//!   loop, over the requests it answered. Unlike req/s this does not depend on how the cores are
//!   shared, so it compares the routers' cost on a busy machine too.
//!
//! One keep-alive HTTP client (connection pool, `TCP_NODELAY`) measures in-process with
//! `Instant`. The client, the router(s), SMG and the mocks share this machine's cores: on a small
//! machine the client's own cost and the scheduling of the others weigh on every figure, most of
//! all on throughput, where they all compete. The load average at start and end is printed.
//!
//! Targets (the issue's): added p50 ≤ 0.2 ms, added p99 ≤ 1 ms, req/s ≥ 2× SMG's.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bench::{align, load_average, percentile, process_cpu_time};
use clap::Parser;
use serde::Serialize;

const NAME: &str = "pdserve-router-overhead";

/// Added latency and throughput of the router against mock workers, next to SMG.
#[derive(Debug, Parser)]
#[command(name = NAME, version)]
struct Args {
    /// Sequential requests per target and mode for the latency percentiles.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,
    /// Clients in the closed loop of the throughput figure.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,
    /// Seconds of the closed loop, per target and mode.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// `max_tokens` of every request.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..))]
    max_tokens: u32,
    /// Model whose card (tokenizer, chat template) the mocks serve; its weights are not loaded.
    #[arg(long, env = "PDSERVE_MODEL", default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// The `smg` executable; default: `smg` on PATH, else `.cache/smg-venv/bin/smg`
    /// (scripts/setup-smg.sh).
    #[arg(long)]
    smg: Option<PathBuf>,
    /// Leave SMG out.
    #[arg(long)]
    skip_smg: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() {
    let args: Args = cluster::cli::parse(NAME);
    cluster::cli::exit_on_error(NAME, run(args));
}

fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.seconds > 0.0, "--seconds must be positive");
    let mut args = args;
    // The default is relative to the workspace; run from elsewhere, look for it there too.
    let in_workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(&args.model);
    if !args.model.is_file() && args.model.is_relative() && in_workspace.is_file() {
        args.model = in_workspace;
    }
    anyhow::ensure!(args.model.is_file(), "model file {} not found (run scripts/fetch-model.sh)", args.model.display());
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(async {
        // Dropping `measure` on Ctrl-C drops the child guards it holds: the processes die with it.
        tokio::select! {
            report = measure(&args) => report,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// A child process, killed when dropped (panics and Ctrl-C included).
struct Proc {
    name: String,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SIGKILL: SMG drains gracefully on SIGTERM, which takes seconds.
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The URLs a started process announced on stdout, by the text before `http://`.
struct Announced {
    urls: Vec<(String, String)>,
}

impl Announced {
    fn url(&self, marker: &str) -> anyhow::Result<&str> {
        self.urls
            .iter()
            .find(|(m, _)| m.ends_with(marker))
            .map(|(_, url)| url.as_str())
            .ok_or_else(|| anyhow::anyhow!("no {marker:?} line"))
    }
}

/// A binary of this workspace, built next to this one (`cargo build --release -p ...`).
fn workspace_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().map(|d| d.join(name)).ok_or_else(|| anyhow::anyhow!("no directory for {name}"))?;
    anyhow::ensure!(
        path.is_file(),
        "{} is missing: cargo build --release -p router -p prefill-worker -p decode-worker",
        path.display()
    );
    Ok(path)
}

/// Starts one of our binaries and waits for its `listening on http://` line, collecting every
/// `http://` URL it printed before (the decode mock's HTTP face comes first).
fn start_ours(name: &str, args: &[&str]) -> anyhow::Result<(Proc, Announced)> {
    let mut child = Command::new(workspace_bin(name)?)
        .args(args)
        // Per-request log lines would be part of what is measured; warnings still show.
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting {name}: {e}"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let proc = Proc { name: name.to_string(), child };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(pos) = line.find("http://") {
                let url = line[pos..].split_whitespace().next().unwrap_or_default().to_string();
                let _ = tx.send((line[..pos].trim_end().to_string(), url));
            }
        }
    });
    let mut urls = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((marker, url)) => {
                let done = marker.ends_with("listening on");
                urls.push((marker, url));
                if done {
                    return Ok((proc, Announced { urls }));
                }
            }
            Err(_) => anyhow::bail!("{} did not announce its address within 60 s", proc.name),
        }
    }
}

/// A port free now on loopback, for a program that cannot pick its own and say which.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Where `smg` is: `--smg`, PATH, or the venv `scripts/setup-smg.sh` makes.
fn find_smg(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return if path.is_file() { Ok(path.to_path_buf()) } else { Err(format!("{} not found", path.display())) };
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("smg"))
        .find(|p| p.is_file());
    // Where scripts/setup-smg.sh puts it, in this workspace whatever the working directory.
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.cache/smg-venv/bin/smg");
    on_path
        .or_else(|| venv.is_file().then_some(venv))
        .ok_or_else(|| "smg is neither on PATH nor in .cache/smg-venv (run scripts/setup-smg.sh)".to_string())
}

/// Starts SMG over the mock's HTTP face, logging to a file (its INFO lines are many), and waits
/// until it routes a chat completion for `model` (it registers the worker after it listens).
async fn start_smg(
    client: &reqwest::Client,
    smg: &Path,
    worker_url: &str,
    model: &str,
) -> Result<(Proc, String), String> {
    let port = free_port().map_err(|e| e.to_string())?;
    let prometheus = free_port().map_err(|e| e.to_string())?;
    let log_path = std::env::temp_dir().join(format!("{NAME}-smg.log"));
    let log = std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let (port, prometheus) = (port.to_string(), prometheus.to_string());
    let args = [
        "launch",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
        "--worker-urls",
        worker_url,
        // One worker: the policy only has to be cheap.
        "--policy",
        "round_robin",
        "--prometheus-port",
        &prometheus,
        "--log-level",
        "warn",
    ];
    let child = Command::new(smg)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", smg.display()))?;
    let mut proc = Proc { name: "smg".into(), child };
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = proc.child.try_wait() {
            return Err(format!("smg exited ({status}) during start-up; see {}", log_path.display()));
        }
        match client.post(format!("{url}/v1/chat/completions")).json(&body).send().await {
            Ok(r) if r.status().is_success() => return Ok((proc, url)),
            Ok(r) => last = format!("HTTP {}: {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("smg did not answer a chat completion within 60 s ({last}); see {}", log_path.display()))
}

/// One process setup to measure.
struct Target {
    name: &'static str,
    url: String,
    /// The process that answers the client, whose CPU time is measured.
    pid: u32,
}

/// One row of the report: a target in one mode.
#[derive(Debug, Clone, Serialize)]
struct Row {
    target: &'static str,
    stream: bool,
    /// Milliseconds; end-to-end (non-streaming) or to the last byte (streaming).
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    /// This target's percentile minus direct's, same mode.
    added_p50_ms: Option<f64>,
    added_p99_ms: Option<f64>,
    requests_per_sec: f64,
    /// `requests_per_sec` over SMG's, same mode.
    ratio_vs_smg: Option<f64>,
    /// Microseconds of the front process's CPU time per request, during the closed loop.
    cpu_us_per_request: Option<f64>,
    /// `cpu_us_per_request` over SMG's, same mode.
    cpu_vs_smg: Option<f64>,
    /// Requests that did not answer 200 (latency and throughput runs together).
    errors: u64,
}

/// Whether the router met the targets in one mode.
#[derive(Debug, Clone, Serialize)]
struct Verdict {
    target: &'static str,
    stream: bool,
    /// Added p50 ≤ 0.2 ms.
    p50_met: Option<bool>,
    /// Added p99 ≤ 1 ms.
    p99_met: Option<bool>,
    /// ≥ 2× SMG's req/s; `None` without SMG.
    throughput_met: Option<bool>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
struct Report {
    /// The machine's cores, shared by the client and every server process.
    cores: usize,
    /// `/proc/loadavg`'s 1-minute figure at start and at end.
    load_average: [Option<f64>; 2],
    requests: u64,
    concurrency: u64,
    seconds: f64,
    max_tokens: u32,
    /// Why SMG is missing, when it is.
    smg_missing: Option<String>,
    rows: Vec<Row>,
    verdicts: Vec<Verdict>,
}

const P50_TARGET_MS: f64 = 0.2;
const P99_TARGET_MS: f64 = 1.0;
const THROUGHPUT_TARGET: f64 = 2.0;

async fn measure(args: &Args) -> anyhow::Result<Report> {
    let load_at_start = load_average();
    let model = args.model.to_str().ok_or_else(|| anyhow::anyhow!("model path is not UTF-8"))?;
    let any = "127.0.0.1:0";
    let (_prefill, prefill) = start_ours("prefill-worker", &["--mock", "--listen", any, "--model", model])?;
    let (decode_proc, decode) =
        start_ours("decode-worker", &["--mock", "--listen", any, "--mock-http-listen", any, "--model", model])?;
    let (prefill_url, decode_url) = (prefill.url("listening on")?, decode.url("listening on")?);
    let direct = decode.url("HTTP face on")?.to_string();
    let pd_args = [
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--prefill",
        prefill_url,
        "--decode",
        decode_url,
        "--local-prefill-max-tokens",
        "0",
    ];
    let (router_pd_proc, router_pd) = start_ours("router", &pd_args)?;
    let (router_co_proc, router_co) =
        start_ours("router", &["--host", "127.0.0.1", "--port", "0", "--decode", decode_url])?;
    let mut targets = vec![
        Target { name: "direct", url: direct.clone(), pid: decode_proc.child.id() },
        Target { name: "router PD", url: router_pd.url("listening on")?.to_string(), pid: router_pd_proc.child.id() },
        Target {
            name: "router colocated",
            url: router_co.url("listening on")?.to_string(),
            pid: router_co_proc.child.id(),
        },
    ];
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .no_proxy()
        .pool_max_idle_per_host(args.concurrency as usize * 2)
        .build()?;
    let model_name = model_name(&client, &direct).await?;
    let smg = match find_smg(args.smg.as_deref()) {
        _ if args.skip_smg => Err("skipped by --skip-smg".to_string()),
        Ok(path) => start_smg(&client, &path, &direct, &model_name).await,
        Err(why) => Err(why),
    };
    let (_smg, smg_missing) = match smg {
        Ok((proc, url)) => {
            targets.push(Target { name: "SMG", url, pid: proc.child.id() });
            (Some(proc), None)
        }
        Err(why) => (None, Some(why)),
    };
    let mut rows = Vec::new();
    for target in &targets {
        wait_ready(&client, &target.url).await?;
    }
    for stream in [false, true] {
        let body = request_body(&model_name, args.max_tokens, stream);
        let urls: Vec<String> = targets.iter().map(|t| format!("{}/v1/chat/completions", t.url)).collect();
        for (target, url) in targets.iter().zip(&urls) {
            check_answer(&client, url, &body, args.max_tokens, stream)
                .await
                .map_err(|e| anyhow::anyhow!("{} ({}): {e}", target.name, mode(stream)))?;
        }
        let latencies = latency(&client, &urls, &body, args.requests).await;
        for ((target, url), (latencies, latency_errors)) in targets.iter().zip(&urls).zip(latencies) {
            let loop_ = throughput(&client, url, &body, args.concurrency, args.seconds, target.pid).await;
            rows.push(Row {
                target: target.name,
                stream,
                p50_ms: percentile(&latencies, 0.50),
                p90_ms: percentile(&latencies, 0.90),
                p99_ms: percentile(&latencies, 0.99),
                added_p50_ms: None,
                added_p99_ms: None,
                requests_per_sec: loop_.rate,
                ratio_vs_smg: None,
                cpu_us_per_request: loop_.cpu_per_request.map(|t| t.as_secs_f64() * 1e6),
                cpu_vs_smg: None,
                errors: latency_errors + loop_.errors,
            });
            if !args.json {
                eprintln!("{NAME}: {} {} done", target.name, mode(stream));
            }
        }
    }
    let all = rows.clone();
    let find = |name: &str, stream: bool| all.iter().find(|r| r.target == name && r.stream == stream);
    for row in &mut rows {
        if let Some(direct) = find("direct", row.stream) {
            row.added_p50_ms = Some(row.p50_ms - direct.p50_ms);
            row.added_p99_ms = Some(row.p99_ms - direct.p99_ms);
        }
        if let Some(smg) = find("SMG", row.stream) {
            row.ratio_vs_smg = Some(row.requests_per_sec / smg.requests_per_sec);
            row.cpu_vs_smg = row.cpu_us_per_request.zip(smg.cpu_us_per_request).map(|(ours, smg)| ours / smg);
        }
    }
    let verdicts = rows
        .iter()
        .filter(|r| r.target.starts_with("router"))
        .map(|r| Verdict {
            target: r.target,
            stream: r.stream,
            p50_met: r.added_p50_ms.map(|a| a <= P50_TARGET_MS),
            p99_met: r.added_p99_ms.map(|a| a <= P99_TARGET_MS),
            throughput_met: r.ratio_vs_smg.map(|x| x >= THROUGHPUT_TARGET),
        })
        .collect();
    Ok(Report {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_average: [load_at_start, load_average()],
        requests: args.requests,
        concurrency: args.concurrency,
        seconds: args.seconds,
        max_tokens: args.max_tokens,
        smg_missing,
        rows,
        verdicts,
    })
}

fn mode(stream: bool) -> &'static str {
    if stream {
        "stream"
    } else {
        "non-stream"
    }
}

fn request_body(model: &str, max_tokens: u32, stream: bool) -> reqwest::Body {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens,
        "stream": stream,
    });
    // Serialized once: every request sends the same bytes.
    reqwest::Body::from(serde_json::to_vec(&body).expect("JSON"))
}

/// The model every target serves (the mocks' card name).
async fn model_name(client: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let models: serde_json::Value = client.get(format!("{base}/v1/models")).send().await?.json().await?;
    models["data"][0]["id"].as_str().map(str::to_string).ok_or_else(|| anyhow::anyhow!("no model in /v1/models"))
}

/// Waits until `GET /health` answers 200 (the routers load the model card after they listen).
async fn wait_ready(client: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{base}/health")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "{base}/health never answered 200");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One request, checked for what a benchmark must not silently get wrong: the right number of
/// tokens (a short answer would be cheaper).
async fn check_answer(
    client: &reqwest::Client,
    url: &str,
    body: &reqwest::Body,
    max_tokens: u32,
    stream: bool,
) -> anyhow::Result<()> {
    let response = client.post(url).header("content-type", "application/json").body(clone(body)).send().await?;
    let status = response.status();
    let text = response.text().await?;
    anyhow::ensure!(status.is_success(), "HTTP {status}: {text}");
    if stream {
        let contents = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter(|v| v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()))
            .count();
        anyhow::ensure!(contents == max_tokens as usize, "{contents} content chunks, not {max_tokens}");
    } else {
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let tokens = v["usage"]["completion_tokens"].as_u64();
        anyhow::ensure!(tokens == Some(u64::from(max_tokens)), "usage.completion_tokens {tokens:?}, not {max_tokens}");
    }
    Ok(())
}

/// `reqwest::Body` of bytes can be cloned cheaply (it is `Bytes` inside).
fn clone(body: &reqwest::Body) -> reqwest::Body {
    reqwest::Body::from(body.as_bytes().expect("a body of bytes").to_vec())
}

/// One request to its last byte: its time, or `None` for an error.
async fn timed(client: &reqwest::Client, url: &str, body: reqwest::Body) -> Option<Duration> {
    let start = Instant::now();
    let response = client.post(url).header("content-type", "application/json").body(body).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.bytes().await.ok()?;
    Some(start.elapsed())
}

/// `requests` sequential requests after a warm-up: their latencies in ms, and the errors.
/// Sequential requests, `requests` to each of `urls`, the targets taking turns (one request each
/// per round, the order rotating): a change in the machine's state during the run (another
/// process waking, the clock's frequency) weighs on every target alike. Each target's sorted
/// latencies in ms, and its failed requests.
async fn latency(
    client: &reqwest::Client,
    urls: &[String],
    body: &reqwest::Body,
    requests: u64,
) -> Vec<(Vec<f64>, u64)> {
    for url in urls {
        for _ in 0..(requests / 10).clamp(10, 200) {
            timed(client, url, clone(body)).await;
        }
    }
    let mut measured: Vec<(Vec<f64>, u64)> = urls.iter().map(|_| (Vec::with_capacity(requests as usize), 0)).collect();
    for round in 0..requests as usize {
        for turn in 0..urls.len() {
            let target = (round + turn) % urls.len();
            match timed(client, &urls[target], clone(body)).await {
                Some(t) => measured[target].0.push(t.as_secs_f64() * 1e3),
                None => measured[target].1 += 1,
            }
        }
    }
    for (latencies, _) in &mut measured {
        latencies.sort_by(f64::total_cmp);
    }
    measured
}

/// What a closed loop measured.
struct Loop {
    /// Completed requests per second.
    rate: f64,
    errors: u64,
    /// CPU time of the measured process per request it answered (completed or not).
    cpu_per_request: Option<Duration>,
}

/// `concurrency` clients, each sending its next request as soon as the last one ends, for
/// `seconds` (after a short warm-up that opens the connections), while the CPU time of process
/// `pid` is taken before and after.
async fn throughput(
    client: &reqwest::Client,
    url: &str,
    body: &reqwest::Body,
    concurrency: u64,
    seconds: f64,
    pid: u32,
) -> Loop {
    let warm_up = Duration::from_secs_f64((seconds / 5.0).min(1.0));
    closed_loop(client, url, body, concurrency, warm_up).await;
    let cpu_before = process_cpu_time(pid);
    let started = Instant::now();
    let (done, errors) = closed_loop(client, url, body, concurrency, Duration::from_secs_f64(seconds)).await;
    let elapsed = started.elapsed();
    let cpu = process_cpu_time(pid).zip(cpu_before).map(|(after, before)| after.saturating_sub(before));
    let answered = (done + errors).max(1) as u32;
    Loop { rate: done as f64 / elapsed.as_secs_f64(), errors, cpu_per_request: cpu.map(|c| c / answered) }
}

async fn closed_loop(
    client: &reqwest::Client,
    url: &str,
    body: &reqwest::Body,
    concurrency: u64,
    length: Duration,
) -> (u64, u64) {
    let deadline = Instant::now() + length;
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let bytes = body.as_bytes().expect("a body of bytes").to_vec();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, bytes) = (client.clone(), url.to_string(), bytes.clone());
            let (done, errors) = (done.clone(), errors.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    match timed(&client, &url, reqwest::Body::from(bytes.clone())).await {
                        Some(_) => done.fetch_add(1, Ordering::Relaxed),
                        None => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for task in tasks {
        let _ = task.await;
    }
    (done.load(Ordering::Relaxed), errors.load(Ordering::Relaxed))
}

fn ms(v: Option<f64>) -> String {
    v.filter(|v| v.is_finite()).map_or("n/a".to_string(), |v| format!("{v:.3}"))
}

fn yes_no(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "yes",
        Some(false) => "no",
        None => "n/a",
    }
}

impl Report {
    /// The table for a terminal.
    fn table(&self) -> String {
        let load = self.load_average.map(|l| l.map_or("?".to_string(), |l| format!("{l:.2}")));
        let mut out = format!(
            "{NAME}: chat completions of {} tokens; {} sequential requests for latency, {} clients × {} s for req/s\n\
             load average {} at start, {} at end; {} cores shared by the client, the routers, SMG and the mocks\n\n",
            self.max_tokens, self.requests, self.concurrency, self.seconds, load[0], load[1], self.cores
        );
        let header = [
            "target",
            "mode",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "added p50",
            "added p99",
            "req/s",
            "× SMG",
            "CPU µs/req",
            "CPU × SMG",
            "errors",
        ];
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
        for r in &self.rows {
            rows.push(vec![
                r.target.to_string(),
                mode(r.stream).to_string(),
                ms(Some(r.p50_ms)),
                ms(Some(r.p90_ms)),
                ms(Some(r.p99_ms)),
                ms(r.added_p50_ms),
                ms(r.added_p99_ms),
                format!("{:.0}", r.requests_per_sec),
                r.ratio_vs_smg.map_or("n/a".to_string(), |x| format!("{x:.2}×")),
                r.cpu_us_per_request.map_or("n/a".to_string(), |c| format!("{c:.0}")),
                r.cpu_vs_smg.map_or("n/a".to_string(), |x| format!("{x:.2}×")),
                r.errors.to_string(),
            ]);
        }
        out.push_str(&align(&rows, 2));
        out.push_str(&format!(
            "\ntargets: added p50 ≤ {P50_TARGET_MS} ms, added p99 ≤ {P99_TARGET_MS} ms, req/s ≥ {THROUGHPUT_TARGET}× SMG\n"
        ));
        let mut verdicts: Vec<Vec<String>> =
            vec![["target", "mode", "p50 met", "p99 met", "2× SMG met"].iter().map(|s| s.to_string()).collect()];
        for v in &self.verdicts {
            verdicts.push(vec![
                v.target.to_string(),
                mode(v.stream).to_string(),
                yes_no(v.p50_met).to_string(),
                yes_no(v.p99_met).to_string(),
                yes_no(v.throughput_met).to_string(),
            ]);
        }
        out.push_str(&align(&verdicts, 2));
        if let Some(why) = &self.smg_missing {
            out.push_str(&format!("\nSMG: not available ({why})\n"));
        }
        out
    }
}

//! llama.cpp's side: `llama-batched-bench` for throughput, `llama-server` for prefix-cache TTFT,
//! embeddings and chat completions (with and without its speculative decoding).
//!
//! Both are built by `scripts/setup-llama-cpp.sh` from the llama.cpp source vendored in the
//! llama-cpp-python sdist, and run here with the same GGUF and thread count as our engine.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the binaries are, checked up front.
pub struct LlamaCpp {
    dir: PathBuf,
    threads: usize,
    model: PathBuf,
}

/// One result line of `llama-batched-bench --output-format jsonl`.
#[derive(Debug, Clone, Deserialize)]
pub struct BatchedRow {
    pub pp: usize,
    pub tg: usize,
    pub pl: usize,
    pub t_pp: f64,
    /// Prompt tokens/s (`S_PP`): `pl * pp / t_pp`.
    pub speed_pp: f64,
    pub t_tg: f64,
    /// Decode tokens/s (`S_TG`): `pl * tg / t_tg`, `tg` one-token decode steps after the prompt.
    pub speed_tg: f64,
}

/// Cached and uncached time to first token through `llama-server`.
#[derive(Debug, Clone)]
pub struct ServerTtft {
    pub uncached_secs: f64,
    pub cached_secs: f64,
    /// `timings.prompt_n` of the cached requests: the tokens the server actually computed.
    pub cached_prompt_n: Option<u64>,
}

/// The one line that says how to get the binaries.
pub const HOW_TO_GET: &str = "run scripts/setup-llama-cpp.sh (≈ 6 min) to build them into .cache/llama.cpp/bin";

impl LlamaCpp {
    /// `None` with the reason when a binary is missing.
    pub fn find(dir: &Path, threads: usize, model: &Path) -> Result<Self, String> {
        for bin in ["llama-batched-bench", "llama-server"] {
            if !dir.join(bin).is_file() {
                return Err(format!("{} not found", dir.join(bin).display()));
            }
        }
        Ok(Self { dir: dir.to_path_buf(), threads, model: model.to_path_buf() })
    }

    /// [`Self::find`] for a benchmark whose `--skip-llama-cpp` is `skip`: `None` when skipped, an
    /// error that says how to get llama.cpp when it is missing.
    pub fn find_unless(skip: bool, dir: &Path, threads: usize, model: &Path) -> anyhow::Result<Option<Self>> {
        if skip {
            return Ok(None);
        }
        let found = Self::find(dir, threads, model);
        found.map(Some).map_err(|e| anyhow::anyhow!("llama.cpp: {e}: {HOW_TO_GET}, or pass --skip-llama-cpp"))
    }

    /// Runs `llama-batched-bench` with every `npl` and returns its rows. The context holds the
    /// largest batch: `max(npl) * (npp + ntg)` tokens.
    pub fn batched_bench(&self, npp: usize, ntg: usize, npl: &[usize]) -> anyhow::Result<Vec<BatchedRow>> {
        let max_pl = npl.iter().copied().max().unwrap_or(1);
        let ctx = max_pl * (npp + ntg.max(1));
        let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        let output = Command::new(self.dir.join("llama-batched-bench"))
            .arg("-m")
            .arg(&self.model)
            .args(["-t", &self.threads.to_string(), "-tb", &self.threads.to_string()])
            .args(["-c", &ctx.to_string(), "-b", "2048", "-ub", "512"])
            .args(["-npp", &npp.to_string(), "-ntg", &ntg.to_string(), "-npl", &list(npl)])
            .args(["--output-format", "jsonl"])
            .stdin(Stdio::null())
            .output()?;
        let text = format!("{}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        anyhow::ensure!(output.status.success(), "llama-batched-bench failed ({}): {}", output.status, tail(&text));
        let rows: Vec<BatchedRow> = text
            .lines()
            .filter(|l| l.trim_start().starts_with("{\"n_kv_max\""))
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        anyhow::ensure!(
            rows.len() == npl.len(),
            "llama-batched-bench printed {} result rows: {}",
            rows.len(),
            tail(&text)
        );
        Ok(rows)
    }

    /// TTFT of `prefix + suffix` through `llama-server` (one slot, `cache_prompt`), as the median
    /// of `reps` rounds. Each round sends a fresh prefix with one suffix (uncached: nothing of it
    /// is in the cache), then the same prefix with another suffix (cached). TTFT is the wall time
    /// of a request for one token.
    pub async fn server_ttft(&self, rounds: &[(Vec<u32>, Vec<u32>, Vec<u32>)]) -> anyhow::Result<ServerTtft> {
        let ctx = rounds.iter().map(|(p, a, b)| p.len() + a.len().max(b.len()) + 16).max().unwrap_or(2048);
        let mut server = Server::start(self, &ctx.to_string(), "1", &[])?;
        let client = reqwest::Client::new();
        server.wait_ready(&client).await?;
        let mut uncached = Vec::new();
        let mut cached = Vec::new();
        let mut cached_prompt_n = None;
        for (prefix, first, second) in rounds {
            let (secs, _) = server.complete(&client, [prefix.as_slice(), first].concat()).await?;
            uncached.push(secs);
            let (secs, prompt_n) = server.complete(&client, [prefix.as_slice(), second].concat()).await?;
            cached.push(secs);
            cached_prompt_n = prompt_n;
        }
        Ok(ServerTtft { uncached_secs: median(uncached), cached_secs: median(cached), cached_prompt_n })
    }
}

/// A running `llama-server` on a free loopback port, killed on drop. Its log stays in the temp dir
/// for a look after a failure.
pub struct Server {
    child: Child,
    url: String,
    log: PathBuf,
    args: Vec<String>,
}

/// One answer of `llama-server`'s `/v1/chat/completions`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatAnswer {
    /// The assistant message's text.
    pub text: String,
    /// Tokens generated (`usage.completion_tokens`).
    pub completion_tokens: u64,
    /// Draft tokens proposed by speculative decoding (`timings.draft_n`; absent, so 0, without).
    pub draft_n: u64,
    /// Draft tokens the target accepted (`timings.draft_n_accepted`).
    pub draft_n_accepted: u64,
    /// Tokens decoded (`timings.predicted_n`, the first one sampled after the prompt included).
    pub predicted_n: u64,
    /// Milliseconds from the first token to the last (`timings.predicted_ms`).
    pub predicted_ms: f64,
}

impl ChatAnswer {
    /// Reads a `/v1/chat/completions` response; refuses one whose prompt came from the cache
    /// (`timings.cache_n` above 0), as it would not be measured like the others.
    pub fn from_json(json: &serde_json::Value) -> anyhow::Result<Self> {
        let text = json["choices"][0]["message"]["content"].as_str();
        let text = text.ok_or_else(|| anyhow::anyhow!("no choices[0].message.content in {json}"))?;
        let completion_tokens = json["usage"]["completion_tokens"].as_u64();
        let completion_tokens =
            completion_tokens.ok_or_else(|| anyhow::anyhow!("no usage.completion_tokens in {json}"))?;
        let timings = &json["timings"];
        let cached = timings["cache_n"].as_u64().unwrap_or(0);
        anyhow::ensure!(cached == 0, "llama-server took {cached} prompt tokens from its cache");
        Ok(Self {
            text: text.to_string(),
            completion_tokens,
            draft_n: timings["draft_n"].as_u64().unwrap_or(0),
            draft_n_accepted: timings["draft_n_accepted"].as_u64().unwrap_or(0),
            predicted_n: timings["predicted_n"]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("no timings.predicted_n in {json}"))?,
            predicted_ms: timings["predicted_ms"]
                .as_f64()
                .ok_or_else(|| anyhow::anyhow!("no timings.predicted_ms in {json}"))?,
        })
    }
}

impl LlamaCpp {
    /// `llama-server --embeddings --pooling last` with `parallel` slots sharing a `ctx`-token
    /// cache, ready to answer `/v1/embeddings` (L2-normalized, as OpenAI's).
    pub async fn embedding_server(&self, ctx: usize, parallel: usize) -> anyhow::Result<Server> {
        let (ctx, parallel) = (ctx.to_string(), parallel.to_string());
        let extra = ["--embeddings", "--pooling", "last", "--kv-unified", "-b", &ctx, "-ub", &ctx];
        let mut server = Server::start(self, &ctx, &parallel, &extra)?;
        server.wait_ready(&reqwest::Client::new()).await?;
        Ok(server)
    }

    /// `llama-server` for chat completions, one at a time (`-np 1`) in a `ctx`-token context,
    /// with no prompt caching (`--no-cache-prompt --cache-ram 0`: a repeated prompt is computed
    /// again), and `extra` flags (a speculative mode's), ready to answer `/v1/chat/completions`.
    pub async fn chat_server(&self, ctx: usize, extra: &[String]) -> anyhow::Result<Server> {
        let mut flags = vec!["--no-cache-prompt", "--cache-ram", "0"];
        flags.extend(extra.iter().map(String::as_str));
        let mut server = Server::start(self, &ctx.to_string(), "1", &flags)?;
        server.wait_ready(&reqwest::Client::new()).await?;
        Ok(server)
    }
}

impl Server {
    fn start(cpp: &LlamaCpp, ctx: &str, parallel: &str, extra: &[&str]) -> anyhow::Result<Self> {
        // Ask the OS for a free port, then hand it to the server.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = std::env::temp_dir().join(format!("pdserve-bench-llama-server-{}.log", std::process::id()));
        let log_file = std::fs::File::create(&log)?;
        let (threads, port_text) = (cpp.threads.to_string(), port.to_string());
        let mut rest: Vec<String> =
            ["-t", &threads, "-tb", &threads, "-c", ctx, "-np", parallel].map(String::from).to_vec();
        rest.extend(["--host", "127.0.0.1", "--port", &port_text].map(String::from));
        rest.extend(extra.iter().map(|a| a.to_string()));
        let child = Command::new(cpp.dir.join("llama-server"))
            .arg("-m")
            .arg(&cpp.model)
            .args(&rest)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()?;
        let args = ["-m".to_string(), cpp.model.display().to_string()].into_iter().chain(rest).collect();
        Ok(Self { child, url: format!("http://127.0.0.1:{port}"), log, args })
    }

    /// The arguments the server was started with (after the binary's path).
    pub fn args(&self) -> &[String] {
        &self.args
    }

    async fn wait_ready(&mut self, client: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                anyhow::bail!("llama-server exited before it was ready ({status}): {}", tail(&log));
            }
            if let Ok(resp) = client.get(format!("{}/health", self.url)).send().await {
                if resp.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::bail!("llama-server did not become ready in 120 s (log: {})", self.log.display())
    }

    /// Wall time of one `/v1/embeddings` request for `inputs`, checking it answers a vector each.
    pub async fn embed(&self, client: &reqwest::Client, inputs: &[String]) -> anyhow::Result<f64> {
        let started = Instant::now();
        let resp = client
            .post(format!("{}/v1/embeddings", self.url))
            .json(&serde_json::json!({"input": inputs}))
            .send()
            .await?;
        let status = resp.status();
        let json: serde_json::Value = resp.json().await?;
        let secs = started.elapsed().as_secs_f64();
        anyhow::ensure!(status.is_success(), "llama-server answered {status}: {json}");
        let n = json["data"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(n == inputs.len(), "llama-server answered {n} embeddings for {} inputs", inputs.len());
        Ok(secs)
    }

    /// One greedy (temperature 0) chat completion of `prompt` as the user's message, so the
    /// model's chat template applies, of up to `max_tokens` tokens, with `cache_prompt` off.
    pub async fn chat(&self, client: &reqwest::Client, prompt: &str, max_tokens: u32) -> anyhow::Result<ChatAnswer> {
        let body = serde_json::json!({
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "cache_prompt": false,
        });
        let resp = client.post(format!("{}/v1/chat/completions", self.url)).json(&body).send().await?;
        let status = resp.status();
        let json: serde_json::Value = resp.json().await?;
        anyhow::ensure!(status.is_success(), "llama-server answered {status}: {json}");
        ChatAnswer::from_json(&json)
    }

    /// Wall time of a one-token completion, and the prompt tokens the server computed.
    async fn complete(&self, client: &reqwest::Client, prompt: Vec<u32>) -> anyhow::Result<(f64, Option<u64>)> {
        let body = serde_json::json!({
            "prompt": prompt,
            "n_predict": 1,
            "cache_prompt": true,
            "temperature": 0.0,
        });
        let started = Instant::now();
        let resp = client.post(format!("{}/completion", self.url)).json(&body).send().await?;
        let status = resp.status();
        let json: serde_json::Value = resp.json().await?;
        let secs = started.elapsed().as_secs_f64();
        anyhow::ensure!(status.is_success(), "llama-server answered {status}: {json}");
        Ok((secs, json["timings"]["prompt_n"].as_u64()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The middle value (mean of the two middle ones for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The last lines of a tool's output, for an error message.
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batched_bench_jsonl_rows_parse() {
        let line = r#"{"n_kv_max": 4096, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0, "n_gpu_layers": -1, "n_threads": 2, "n_threads_batch": 2, "pp": 128, "tg": 128, "pl": 16, "n_kv": 4096, "t_pp": 7.144000, "speed_pp": 286.700000, "t_tg": 60.672000, "speed_tg": 33.800000, "t": 67.816000, "speed": 60.390000}"#;
        let row: BatchedRow = serde_json::from_str(line).unwrap();
        assert_eq!((row.pp, row.tg, row.pl), (128, 128, 16));
        assert_eq!(row.speed_tg, 33.8);
    }

    #[test]
    fn chat_answers_read_usage_and_draft_timings() {
        let json = serde_json::json!({
            "choices": [{"message": {"role": "assistant", "content": "Hi."}}],
            "usage": {"completion_tokens": 50, "prompt_tokens": 102},
            "timings": {"cache_n": 0, "prompt_n": 102, "predicted_n": 50, "predicted_ms": 250.5, "draft_n": 44,
                        "draft_n_accepted": 36},
        });
        let answer = ChatAnswer::from_json(&json).unwrap();
        let want = ChatAnswer {
            text: "Hi.".into(),
            completion_tokens: 50,
            draft_n: 44,
            draft_n_accepted: 36,
            predicted_n: 50,
            predicted_ms: 250.5,
        };
        assert_eq!(answer, want);
        // Without speculation the server leaves the draft counters out.
        let mut plain = json.clone();
        plain["timings"] = serde_json::json!({"cache_n": 0, "predicted_n": 50, "predicted_ms": 250.5});
        assert_eq!(ChatAnswer::from_json(&plain).unwrap().draft_n, 0);
        // Without the decode timings nothing can be measured.
        let mut untimed = json.clone();
        untimed["timings"] = serde_json::json!({"cache_n": 0, "predicted_n": 50});
        assert!(ChatAnswer::from_json(&untimed).is_err());
        // A prompt served from the cache is refused.
        let mut cached = json;
        cached["timings"]["cache_n"] = 90.into();
        assert!(ChatAnswer::from_json(&cached).is_err());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }
}

//! Cluster tests over the real binaries on real ports.
//!
//! [`Cluster`] starts a prefill worker, a decode worker and two routers on
//! loopback ports the OS picks: one router disaggregated (prefill → decode),
//! one colocated (decode prefills locally), both over the same decode worker.
//! Every process is killed when the [`Cluster`] drops, panics included.

pub mod etcd;
pub mod metrics;
pub mod process;
pub mod python;
pub mod sse;

pub use process::bin;
use process::Process;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The default model, fetched by `scripts/fetch-model.sh`; `PDSERVE_MODEL` overrides.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("PDSERVE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(path.is_file(), "model {} is missing: run scripts/fetch-model.sh", path.display());
    path
}

/// The second real model, Gemma 3 270M Q4_K_M (`scripts/fetch-model.sh gemma3`);
/// `PDSERVE_GEMMA3` overrides.
pub fn gemma3_path() -> PathBuf {
    let path = std::env::var_os("PDSERVE_GEMMA3")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".cache/models/gemma-3-270m-q4_k_m.gguf"));
    assert!(path.is_file(), "model {} is missing: run scripts/fetch-model.sh gemma3", path.display());
    path
}

/// The embedding model, all-MiniLM-L6-v2's Sentence-Transformers folder (a BERT encoder,
/// `scripts/fetch-model.sh minilm`); `PDSERVE_ENCODER` overrides.
pub fn encoder_path() -> PathBuf {
    let path = std::env::var_os("PDSERVE_ENCODER")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".cache/models/all-MiniLM-L6-v2"));
    assert!(
        path.join("config.json").is_file(),
        "model {} is missing: run scripts/fetch-model.sh minilm",
        path.display()
    );
    path
}

/// `tests/data/golden/<name>`.
pub fn golden_file(name: &str) -> serde_json::Value {
    let path = workspace_root().join("tests/data/golden").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("golden file is JSON")
}

/// The llama.cpp reference outputs (`tests/data/golden/`); `PDSERVE_GOLDEN` overrides.
pub fn golden() -> serde_json::Value {
    let path = std::env::var_os("PDSERVE_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("tests/data/golden/smollm2-greedy.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("golden file is JSON")
}

/// Polls `GET /ready` until it answers 200: the router has loaded the model
/// card and has workers. Plain blocking HTTP/1.0, since callers may sit
/// inside an async runtime.
pub fn wait_ready(url: &str) {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://").to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let ok = std::net::TcpStream::connect(&addr)
            .and_then(|mut s| {
                s.write_all(b"GET /ready HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
                let mut answer = String::new();
                s.read_to_string(&mut answer)?;
                Ok(answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"))
            })
            .unwrap_or(false);
        if ok {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{url}/ready never answered 200");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Cluster processes are heavy on a 2-core machine: tests take turns.
static SERIAL: Mutex<()> = Mutex::new(());

/// Knobs of a test cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Milliseconds an unpulled hand-off stays pinned (the prefill worker's lease).
    pub kv_lease_ms: u64,
    /// Extra flags for both routers (e.g. the admission limits).
    pub router_args: Vec<String>,
    /// Extra flags for the decode worker (e.g. `--kv-transport tcp`).
    pub decode_args: Vec<String>,
    /// Extra flags for the prefill worker.
    pub prefill_args: Vec<String>,
    /// The model both workers serve (default: [`model_path`]).
    pub model: Option<PathBuf>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            kv_lease_ms: 10_000,
            router_args: Vec::new(),
            decode_args: Vec::new(),
            prefill_args: Vec::new(),
            model: None,
        }
    }
}

/// A running cluster; dropping it stops every process.
pub struct Cluster {
    pub prefill: Process,
    pub decode: Process,
    /// Router over prefill + decode (the disaggregated path).
    pub router: Process,
    /// Router over the decode worker alone (colocated: decode prefills locally).
    pub colocated_router: Process,
    _serial: MutexGuard<'static, ()>,
}

/// Waits for this test binary's other cluster tests to finish; hold the
/// guard while your processes run.
pub fn take_turn() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts a prefill worker on `listen` (`127.0.0.1:0` for any port).
pub fn start_prefill(listen: &str) -> Process {
    start_prefill_with(listen, &[])
}

/// Starts a prefill worker on `listen` with `extra` flags.
pub fn start_prefill_with(listen: &str, extra: &[&str]) -> Process {
    start_prefill_env(listen, extra, &[])
}

/// [`start_prefill_with`], with `env` set for the worker.
pub fn start_prefill_env(listen: &str, extra: &[&str], env: &[(&str, &str)]) -> Process {
    let model = model_path();
    let mut args = vec!["--listen", listen, "--kv-listen", "127.0.0.1:0", "--model", model.to_str().expect("utf-8")];
    args.extend(extra);
    Process::start_with_env("prefill-worker", &args, env)
}

/// Starts a decode worker on any free port.
pub fn start_decode() -> Process {
    start_decode_with(&[])
}

/// Starts a decode worker on any free port with `extra` flags.
pub fn start_decode_with(extra: &[&str]) -> Process {
    start_decode_env(extra, &[])
}

/// [`start_decode_with`], with `env` set for the worker.
pub fn start_decode_env(extra: &[&str], env: &[(&str, &str)]) -> Process {
    let model = model_path();
    let mut args = vec!["--listen", "127.0.0.1:0", "--model", model.to_str().expect("utf-8 model path")];
    args.extend(extra);
    Process::start_with_env("decode-worker", &args, env)
}

/// A worker's `GetStats` answer (pins, pulls, blocks).
pub async fn worker_stats(url: &str) -> proto::worker::WorkerStats {
    let mut client =
        proto::worker::worker_client::WorkerClient::connect(url.to_string()).await.expect("connect to the worker");
    client.get_stats(proto::worker::GetStatsRequest {}).await.expect("GetStats").into_inner()
}

/// Starts a router over these workers with `extra` flags and waits until it
/// has the model card.
pub fn start_router(prefill: &[&Process], decode: &[&Process], extra: &[&str]) -> Process {
    start_router_env(prefill, decode, extra, &[])
}

/// [`start_router`], with `env` set for the router.
pub fn start_router_env(prefill: &[&Process], decode: &[&Process], extra: &[&str], env: &[(&str, &str)]) -> Process {
    let mut args = vec!["--host", "127.0.0.1", "--port", "0"];
    for p in prefill {
        args.extend(["--prefill", p.url()]);
    }
    for d in decode {
        args.extend(["--decode", d.url()]);
    }
    args.extend(extra);
    let router = Process::start_with_env("router", &args, env);
    wait_ready(router.url());
    router
}

impl Cluster {
    /// Starts all processes and waits until each listens.
    pub fn start(options: ClusterOptions) -> Self {
        let serial = take_turn();
        let model = options.model.clone().unwrap_or_else(model_path);
        let model = model.to_str().expect("utf-8 model path");
        let lease = options.kv_lease_ms.to_string();
        let prefill_args: Vec<&str> =
            ["--listen", "127.0.0.1:0", "--kv-listen", "127.0.0.1:0", "--kv-lease-ms", &lease, "--model", model]
                .into_iter()
                .chain(options.prefill_args.iter().map(String::as_str))
                .collect();
        let prefill = Process::start("prefill-worker", &prefill_args);
        let decode_args: Vec<&str> = ["--listen", "127.0.0.1:0", "--model", model]
            .into_iter()
            .chain(options.decode_args.iter().map(String::as_str))
            .collect();
        let decode = Process::start("decode-worker", &decode_args);
        let extra = options.router_args.iter().map(String::as_str);
        // Hand off every prompt, however short: this router is the disaggregated path.
        let disaggregated = ["--prefill", prefill.url(), "--decode", decode.url(), "--local-prefill-max-tokens", "0"];
        let args: Vec<&str> =
            ["--host", "127.0.0.1", "--port", "0"].into_iter().chain(disaggregated).chain(extra.clone()).collect();
        let router = Process::start("router", &args);
        let args: Vec<&str> =
            ["--host", "127.0.0.1", "--port", "0", "--decode", decode.url()].into_iter().chain(extra).collect();
        let colocated_router = Process::start("router", &args);
        for r in [&router, &colocated_router] {
            wait_ready(r.url());
        }
        Self { prefill, decode, router, colocated_router, _serial: serial }
    }

    /// The model name the routers serve.
    pub async fn model_name(&self) -> String {
        let models: serde_json::Value = reqwest::get(format!("{}/v1/models", self.router.url()))
            .await
            .expect("GET /v1/models")
            .json()
            .await
            .expect("models JSON");
        models["data"][0]["id"].as_str().expect("a model id").to_string()
    }

    /// The prefill worker's stats (pinned blocks and the like).
    pub async fn prefill_stats(&self) -> proto::worker::WorkerStats {
        worker_stats(self.prefill.url()).await
    }
}

/// POSTs `body` as JSON to `url`, expecting 200, and returns the JSON answer.
pub async fn post_ok(url: &str, body: serde_json::Value) -> serde_json::Value {
    let response = reqwest::Client::new().post(url).json(&body).send().await.expect("POST");
    assert_eq!(response.status(), 200, "{body}");
    response.json().await.expect("JSON")
}

/// A JSON list of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().expect("an id list").iter().map(|x| x.as_u64().expect("an id")).collect()
}

/// Teacher-forced greedy agreement over `/v1/completions` at `url`: for each
/// golden record, at every clear decision (llama.cpp's top-2 margin >= 0.5)
/// among its first 16 positions, whether the one greedy token after the
/// reference's own prefix is the reference's. Returns `(agreed, checked)`
/// and prints the misses.
pub async fn teacher_forced_agreement(url: &str, model: &str, golden: &serde_json::Value) -> (usize, usize) {
    let (mut agreed, mut checked) = (0, 0);
    for record in golden["records"].as_array().expect("records") {
        let prompt = ids(&record["prompt_token_ids"]);
        let completion = ids(&record["completion_token_ids"]);
        let margins = record["top2_margins"].as_array().expect("margins");
        for k in 0..completion.len().min(16) {
            if margins[k].as_f64().expect("a margin") < 0.5 {
                continue;
            }
            let forced = [&prompt[..], &completion[..k]].concat();
            let body = serde_json::json!({"model": model, "prompt": forced, "max_tokens": 1, "temperature": 0, "return_token_ids": true});
            let got = ids(&post_ok(url, body).await["choices"][0]["token_ids"]);
            checked += 1;
            if got == [completion[k]] {
                agreed += 1;
            } else {
                eprintln!("{} position {k}: expected {} got {got:?}", record["id"], completion[k]);
            }
        }
    }
    (agreed, checked)
}

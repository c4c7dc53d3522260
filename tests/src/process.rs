//! A child process that is always killed: on drop, panics included.

use rustix::process::{kill_process, Pid, Signal};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// A started binary and the URL it announced.
pub struct Process {
    child: Child,
    url: String,
    /// Every other `... on http://ADDR` line it printed, as (line, URL).
    announced: Arc<Mutex<Vec<(String, String)>>>,
}

/// Model loading on a busy 2-core machine can take a while.
const START_TIMEOUT: Duration = Duration::from_secs(180);

impl Process {
    /// Starts `bin(name)` with `args` and waits for its `listening on http://ADDR` line.
    pub fn start(name: &str, args: &[&str]) -> Self {
        Self::start_with_env(name, args, &[])
    }

    /// [`Process::start`] with `env` set in the child's environment (on top
    /// of the test's own), so tests need not change their own environment.
    pub fn start_with_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(bin(name))
            .args(args)
            .envs(env.iter().copied())
            // Per-request info lines from every process drown test output; RUST_LOG overrides.
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let label = name.to_string();
        let announced = Arc::new(Mutex::new(Vec::new()));
        let record = announced.clone();
        std::thread::spawn(move || {
            let url_after =
                |line: &str, pos: usize| line[pos..].split_whitespace().next().unwrap_or_default().to_string();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(pos) = line.find("listening on http://") {
                    let _ = tx.send(url_after(&line, pos + "listening on ".len()));
                } else if let Some(pos) = line.find("http://") {
                    let url = url_after(&line, pos);
                    record.lock().unwrap_or_else(|e| e.into_inner()).push((line, url));
                } else {
                    eprintln!("[{label}] {line}");
                }
            }
        });
        let mut process = Self { child, url: String::new(), announced };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(url) => process.url = url,
            Err(_) => {
                let status = process.child.try_wait().ok().flatten();
                panic!("{name} did not start listening within {START_TIMEOUT:?} (exit status: {status:?})");
            }
        }
        process
    }

    /// `http://host:port` of the process.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL of the first other address line containing `what` that the
    /// process printed before it listened (e.g. `"health and metrics"`).
    pub fn announced(&self, what: &str) -> Option<String> {
        let lines = self.announced.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().find(|(line, _)| line.contains(what)).map(|(_, url)| url.clone())
    }

    /// The worker's `/health`, `/ready` and `/metrics` server.
    pub fn health_url(&self) -> String {
        self.announced("health and metrics").expect("the process printed its health and metrics address")
    }

    /// Sends SIGTERM, as Kubernetes does to stop a pod, and waits up to
    /// `limit` for the exit; `None` if it is still running then.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        self.send_sigterm();
        self.wait_exit(limit)
    }

    /// Sends SIGTERM and returns at once.
    pub fn send_sigterm(&self) {
        self.signal(Signal::TERM);
    }

    /// Freezes the process (SIGSTOP): it holds its sockets open and answers
    /// nothing, as a stalled peer does.
    pub fn freeze(&self) {
        self.signal(Signal::STOP);
    }

    /// Lets a frozen process run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal(Signal::CONT);
    }

    fn signal(&self, signal: Signal) {
        let sent = kill_process(Pid::from_child(&self.child), signal);
        assert!(sent.is_ok(), "signal {signal:?} to {}: {sent:?}", self.child.id());
    }

    /// Waits up to `limit` for the process to exit; `None` if it still runs.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident memory now, from `/proc` (Linux).
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc/PID/status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kib * 1024
    }

    /// Kills the process now (to test what its peers do).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A binary of this workspace, built by `cargo build --bins` next to the
/// running executable (a test in `target/<profile>/deps/`, or a benchmark
/// binary in `target/<profile>/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let mut dir = exe.parent().expect("target dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let path = dir.join(name);
    assert!(path.is_file(), "{} is missing: run `cargo build --bins` first (scripts/test.sh does)", path.display());
    path
}

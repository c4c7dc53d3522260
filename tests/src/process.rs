//! A child process that is always killed: on drop, panics included.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A started binary and the URL it announced.
pub struct Process {
    child: Child,
    url: String,
}

/// Model loading on a busy 2-core machine can take a while.
const START_TIMEOUT: Duration = Duration::from_secs(180);

impl Process {
    /// Starts `bin(name)` with `args` and waits for its `listening on http://ADDR` line.
    pub fn start(name: &str, args: &[&str]) -> Self {
        let mut child = Command::new(crate::bin(name))
            .args(args)
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
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(pos) = line.find("listening on http://") {
                    let url =
                        line[pos + "listening on ".len()..].split_whitespace().next().unwrap_or_default().to_string();
                    let _ = tx.send(url);
                } else {
                    eprintln!("[{label}] {line}");
                }
            }
        });
        let mut process = Self { child, url: String::new() };
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

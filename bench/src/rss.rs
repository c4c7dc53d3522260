//! Figure 5, peak memory, measured in a child process so nothing else the bench did counts.
//!
//! The parent re-executes itself with the hidden `rss-child` subcommand. The child reads `VmRSS`
//! before and after loading the model (the difference is what the weights take resident, whatever
//! copies the loader makes: f32 prefill weights, requantized matrices), starts an engine whose KV
//! cache holds exactly the sequences it will run, runs them all at once, and prints one JSON line
//! with `VmHWM` (the peak resident set) from `/proc/self/status`.

use crate::ours::{self, Ours};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::process::Command;

/// What the child reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RssReport {
    pub peak_rss_bytes: u64,
    /// `VmRSS` growth across `load_gguf`.
    pub weights_bytes: u64,
    pub kv_budget_bytes: u64,
    pub kv_blocks: usize,
    pub block_bytes: usize,
    pub seqs: usize,
    pub tokens_per_seq: usize,
    pub generated_per_seq: usize,
}

impl RssReport {
    /// The target: weights + KV budget, plus 10%.
    pub fn budget_bytes(&self) -> u64 {
        ((self.weights_bytes + self.kv_budget_bytes) as f64 * 1.10) as u64
    }
}

/// A field of `/proc/self/status` in bytes (the file gives kB).
fn proc_status_bytes(field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|rest| rest.strip_prefix(':')))
        .ok_or_else(|| anyhow::anyhow!("{field} missing from /proc/self/status"))?;
    let kb: u64 = line.trim().trim_end_matches("kB").trim().parse()?;
    Ok(kb * 1024)
}

/// The child's body: `seqs` sequences of `tokens` tokens each (prompt plus `generated`).
pub async fn child(model: &Path, seqs: usize, tokens: usize, generated: usize) -> anyhow::Result<RssReport> {
    anyhow::ensure!(generated >= 1 && tokens > generated, "need 1 <= generated < tokens");
    let before = proc_status_bytes("VmRSS")?;
    let ours = Ours::load(model)?;
    let weights_bytes = proc_status_bytes("VmRSS")?.saturating_sub(before);
    // The last generated token is never fed back, so it needs no KV slot; size for all `tokens`
    // anyway, as a serving budget would.
    let kv_blocks = ours::blocks_for(seqs, tokens);
    let block_bytes = ours.block_bytes();
    let engine = ours.engine(kv_blocks, seqs, false);
    let prompts = ours.prompts()?;
    let batch = prompts.batch(seqs, tokens - generated)?;
    let timelines = ours::run(&engine, batch, generated as u32).await?;
    anyhow::ensure!(timelines.iter().all(|t| t.tokens.len() == generated), "a sequence stopped early");
    Ok(RssReport {
        peak_rss_bytes: proc_status_bytes("VmHWM")?,
        weights_bytes,
        kv_budget_bytes: (kv_blocks * block_bytes) as u64,
        kv_blocks,
        block_bytes,
        seqs,
        tokens_per_seq: tokens,
        generated_per_seq: generated,
    })
}

/// Runs the child and reads its report (its last stdout line).
pub fn measure(
    model: &Path,
    threads: usize,
    seqs: usize,
    tokens: usize,
    generated: usize,
) -> anyhow::Result<RssReport> {
    // `/proc/self/exe` still runs this very binary if a rebuild has replaced the file meanwhile.
    let proc_exe = std::path::PathBuf::from("/proc/self/exe");
    let exe = if proc_exe.exists() { proc_exe } else { std::env::current_exe()? };
    let output = Command::new(&exe)
        .arg("--threads")
        .arg(threads.to_string())
        .arg("--model")
        .arg(model)
        .arg("rss-child")
        .arg("--seqs")
        .arg(seqs.to_string())
        .arg("--tokens")
        .arg(tokens.to_string())
        .arg("--generated")
        .arg(generated.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(output.status.success(), "the RSS child {} failed ({})", exe.display(), output.status);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().ok_or_else(|| anyhow::anyhow!("the RSS child printed nothing"))?;
    Ok(serde_json::from_str(line)?)
}

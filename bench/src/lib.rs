//! What the bench binaries share: the statistics their reports print, the
//! machine load they are read against, the engine driven in-process
//! ([`ours`], over [`prompts`]) and llama.cpp's tools beside it ([`llama_cpp`]).

pub mod llama_cpp;
pub mod ours;
pub mod prompts;

/// Sizes every thread pool our engine uses. Called first thing, before any thread is spawned, so
/// setting the environment is race-free and candle reads these values when it builds its pools.
pub fn set_threads(threads: usize) -> anyhow::Result<()> {
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    let candle = candle_core::utils::get_num_threads();
    anyhow::ensure!(candle == threads, "candle would use {candle} threads, not {threads}");
    Ok(())
}

/// Nearest-rank percentile (`q` in `[0, 1]`) of ascending values; NaN when
/// there are none.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The 1-minute load average, where `/proc/loadavg` exists: figures taken
/// while other work shares the cores are not comparable.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// CPU time a process has used so far, all its threads, user and system (`/proc/<pid>/stat`'s
/// `utime + stime`, in clock ticks of usually 10 ms: measure spans of many requests).
pub fn process_cpu_time(pid: u32) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, field 2, is in parentheses and may hold spaces: count fields after it.
    let mut fields = stat.get(stat.rfind(')')? + 2..)?.split_whitespace();
    // Fields 14 and 15 of the whole line are the 12th and 13th after the name.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let tick = rustix::param::clock_ticks_per_second();
    Some(std::time::Duration::from_secs_f64((utime + stime) as f64 / tick as f64))
}

/// Columns padded to their widest cell: the first `text` left-aligned, the rest right-aligned.
pub fn align(rows: &[Vec<String>], text: usize) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> =
        (0..columns).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| {
                let pad = " ".repeat(w - cell.chars().count());
                if c < text {
                    format!("{cell}{pad}")
                } else {
                    format!("{pad}{cell}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.50), 50.0);
        assert_eq!(percentile(&values, 0.99), 99.0);
        assert_eq!(percentile(&values, 1.0), 100.0);
        assert_eq!(percentile(&values, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 0.5), 7.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}

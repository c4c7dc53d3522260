//! Sizing the KV cache from a share of the machine's memory, the way vLLM's
//! `gpu_memory_utilization` sizes it from a share of the GPU's: the worker
//! may use `fraction × total` in all, and what the loaded model already holds
//! is not available to the cache.

use std::path::Path;

use engine::model::GpuMemory;

/// The memory this process may use: `MemTotal`, or the cgroup v2 limit
/// (`memory.max`) when that is lower.
pub fn total_memory() -> Result<u64, String> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("reading /proc/meminfo: {e}"))?;
    let total = kib_field(&meminfo, "MemTotal").ok_or("/proc/meminfo has no MemTotal line")?;
    Ok(match cgroup_limit() {
        Some(limit) => total.min(limit),
        None => total,
    })
}

/// This process's resident memory (`VmRSS`).
pub fn resident_memory() -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| format!("reading /proc/self/status: {e}"))?;
    kib_field(&status, "VmRSS").ok_or_else(|| "/proc/self/status has no VmRSS line".to_string())
}

/// The cgroup v2 `memory.max` of this process's cgroup (or of the cgroup
/// root a container sees), if one is set.
fn cgroup_limit() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|text| cgroup_v2_path(&text));
    let root = Path::new("/sys/fs/cgroup");
    let candidates = own.map(|p| root.join(p.trim_start_matches('/'))).into_iter().chain([root.to_path_buf()]);
    candidates
        .filter_map(|dir| std::fs::read_to_string(dir.join("memory.max")).ok())
        .find_map(|text| parse_memory_max(&text))
}

/// The unified-hierarchy path in `/proc/self/cgroup` (the `0::/path` line).
fn cgroup_v2_path(text: &str) -> Option<String> {
    text.lines().find_map(|line| line.strip_prefix("0::")).map(str::to_string)
}

/// `memory.max`: a byte count, or `max` for no limit.
fn parse_memory_max(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// A `Key:   1234 kB` line of `/proc/meminfo` or `/proc/self/status`, in bytes.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

/// The KV cache's share of memory: `fraction × total − resident`, or an error
/// naming both figures when that leaves less than one block. `holder` is
/// what holds `resident` (the worker, or a GPU).
pub fn kv_bytes_for_fraction(
    holder: &str,
    fraction: f64,
    total: u64,
    resident: u64,
    block_bytes: u64,
) -> Result<u64, String> {
    let allowed = (fraction * total as f64) as u64;
    match allowed.checked_sub(resident) {
        Some(left) if left >= block_bytes => Ok(left),
        _ => Err(format!(
            "--kv-cache-memory {fraction} allows {} of {} total, but {holder} already uses {} after loading \
             the model: no room for one KV block of {} (raise the fraction or give a byte budget)",
            human(allowed),
            human(total),
            human(resident),
            human(block_bytes)
        )),
    }
}

/// KV blocks for a fraction of every rank's GPU memory, as vLLM's
/// `gpu_memory_utilization`: each GPU gives the cache `fraction × total`
/// minus what it already holds (the weights), in blocks of
/// `rank_block_bytes` (a rank's share of a block); the cache has the blocks
/// of the tightest GPU.
pub fn kv_blocks_on_gpus(fraction: f64, gpus: &[(String, GpuMemory)], rank_block_bytes: u64) -> Result<u64, String> {
    let per_gpu = gpus.iter().map(|(name, m)| {
        let bytes = kv_bytes_for_fraction(name, fraction, m.total, m.total - m.free.min(m.total), rank_block_bytes)?;
        Ok(bytes / rank_block_bytes)
    });
    per_gpu
        .collect::<Result<Vec<_>, String>>()?
        .into_iter()
        .min()
        .ok_or_else(|| "no GPU to size the KV cache on".into())
}

/// Bytes as MiB or GiB for messages.
fn human(bytes: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (MIB * 1024.0))
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_cache_gets_the_fraction_minus_what_the_process_holds() {
        let w = "the worker";
        assert_eq!(kv_bytes_for_fraction(w, 0.5, 16 * GIB, 3 * GIB, 1 << 20), Ok(5 * GIB));
        assert_eq!(kv_bytes_for_fraction(w, 1.0, 8 * GIB, 0, 1 << 20), Ok(8 * GIB));
        // Exactly one block left is enough; less is an error naming both figures.
        assert_eq!(kv_bytes_for_fraction(w, 0.5, 4 * GIB, 2 * GIB - 100, 100), Ok(100));
        let err = kv_bytes_for_fraction(w, 0.25, 8 * GIB, 3 * GIB, 1 << 20).unwrap_err();
        assert!(err.contains("allows 2.00 GiB of 8.00 GiB total"), "{err}");
        assert!(err.contains("the worker already uses 3.00 GiB"), "{err}");
        assert!(kv_bytes_for_fraction(w, 0.5, 4 * GIB, 2 * GIB, 1).is_err());
    }

    #[test]
    fn gpus_give_the_cache_the_fraction_minus_the_weights_and_the_tightest_wins() {
        let gpu = |name: &str, used: u64| (name.to_string(), GpuMemory { free: 80 * GIB - used, total: 80 * GIB });
        let block = 1 << 20;
        // 0.9 × 80 GiB = 72 GiB, minus 8 GiB of weights: 64 GiB of 1 MiB blocks.
        assert_eq!(kv_blocks_on_gpus(0.9, &[gpu("cuda:0", 8 * GIB)], block), Ok(64 << 10));
        // Another process on GPU 1 leaves the group 62 GiB a rank.
        let pair = [gpu("cuda:0", 8 * GIB), gpu("cuda:1", 10 * GIB)];
        assert_eq!(kv_blocks_on_gpus(0.9, &pair, block), Ok(62 << 10));
        let err = kv_blocks_on_gpus(0.1, &pair, block).unwrap_err();
        assert!(err.contains("cuda:0 already uses 8.00 GiB"), "{err}");
        assert!(kv_blocks_on_gpus(0.9, &[], block).is_err());
    }

    #[test]
    fn proc_files_parse() {
        let meminfo = "MemTotal:       16318480 kB\nMemFree:         1234 kB\n";
        assert_eq!(kib_field(meminfo, "MemTotal"), Some(16_318_480 * 1024));
        assert_eq!(kib_field(meminfo, "MemFree"), Some(1234 * 1024));
        assert_eq!(kib_field("VmRSSx: 1 kB\nVmRSS:\t  2048 kB\n", "VmRSS"), Some(2048 * 1024));
        assert_eq!(kib_field(meminfo, "VmRSS"), None);
        assert_eq!(parse_memory_max("max\n"), None);
        assert_eq!(parse_memory_max("4294967296\n"), Some(4 * GIB));
        assert_eq!(cgroup_v2_path("0::/user.slice/session-1.scope\n"), Some("/user.slice/session-1.scope".into()));
        assert_eq!(cgroup_v2_path("12:memory:/docker/abc\n"), None);
    }

    #[test]
    fn this_machine_reports_its_memory() {
        let total = total_memory().unwrap();
        let resident = resident_memory().unwrap();
        assert!(resident > 0 && resident < total, "resident {resident} of total {total}");
    }
}

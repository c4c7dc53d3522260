//! Engine flags shared by prefill and decode workers.

use std::path::PathBuf;

/// How the worker loads its model and sizes its engine.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// GGUF model file.
    #[arg(long, env = "PDSERVE_MODEL", default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Name clients use in `model`; defaults to the model's own name.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub block_size: u32,
    /// Memory for the KV cache, allocated once at start-up and never grown:
    /// bytes, or with a suffix (KiB, MiB, GiB, KB, MB, GB). The cache holds as
    /// many whole blocks as fit.
    #[arg(long, default_value = "768MiB", value_parser = parse_bytes)]
    pub kv_cache_memory: u64,
    /// An exact number of KV blocks instead of a memory budget.
    #[arg(long, conflicts_with = "kv_cache_memory", value_parser = clap::value_parser!(u32).range(1..))]
    pub num_kv_blocks: Option<u32>,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_seqs: u32,
    /// Most tokens in one forward pass; longer prompts are prefilled in chunks
    /// while running sequences keep decoding.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_batched_tokens: u32,
    /// Longest sequence (prompt + completion); defaults to the model's context length.
    #[arg(long)]
    pub max_model_len: Option<u32>,
    /// Seed for requests that bring none.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Turn off prefix caching (on by default): every prompt is computed in
    /// full and no KV events are produced.
    #[arg(long)]
    pub no_prefix_caching: bool,
}

/// Parses `1073741824`, `512MiB`, `2GB` and the like into bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown unit {other:?} (use B, KB, MB, GB, KiB, MiB or GiB)")),
    };
    let value: u64 = digits.parse().map_err(|_| format!("{text:?} is not a byte count"))?;
    value.checked_mul(scale).ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts_parse_with_units() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("768MiB"), Ok(768 << 20));
        assert_eq!(parse_bytes("2 GB"), Ok(2_000_000_000));
        assert!(parse_bytes("12 parsecs").is_err());
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("99999999999999GiB").is_err());
    }
}

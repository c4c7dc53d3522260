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
    /// KV blocks in the cache (each holds `block_size` tokens of every layer).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub num_kv_blocks: u32,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_seqs: u32,
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

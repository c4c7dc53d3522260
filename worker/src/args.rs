//! Engine flags shared by prefill and decode workers.

use std::path::PathBuf;

use engine::model::{ComputeDevice, WeightDtype};
use engine::SpeculativeConfig;

/// How the worker loads its model and sizes its engine.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// A GGUF file, or a Hugging Face model folder (config.json, *.safetensors,
    /// tokenizer.json, tokenizer_config.json).
    #[arg(long, env = "PDSERVE_MODEL", default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// A tokenizer.json file, or a folder with one, instead of the model's own
    /// (Hugging Face folders only).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Precision of the weight matrices: auto (as stored), float32, float16 or
    /// bfloat16 (also f32, float, f16, half, bf16). Hugging Face folders only:
    /// GGUF weights keep their stored quantization.
    #[arg(long, default_value = "auto", value_parser = parse_dtype)]
    pub dtype: WeightDtype,
    /// Name clients use in `model`; defaults to the model's own name.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub block_size: u32,
    /// Memory for the KV cache, allocated once at start-up and never grown:
    /// bytes, or with a suffix (KiB, MiB, GiB, KB, MB, GB); or a fraction in
    /// (0, 1] such as 0.9, the share of the machine's memory (or cgroup limit)
    /// this worker may use in all, as vLLM's gpu_memory_utilization: the cache
    /// gets that share minus what the process holds after loading the model.
    /// With --device cuda a fraction is of each rank's GPU, minus what the GPU
    /// holds after loading (the cache's device copy fills it; its host copy
    /// must fit in host memory too). The cache holds as many whole blocks as
    /// fit.
    #[arg(long, default_value = "768MiB", value_parser = parse_kv_cache_memory)]
    pub kv_cache_memory: KvCacheMemory,
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
    /// Reuse the KV blocks of earlier prompts with the same prefix (the default).
    #[arg(long, conflicts_with = "no_prefix_caching")]
    pub enable_prefix_caching: bool,
    /// Turn off prefix caching: every prompt is computed in full and no KV
    /// events are produced.
    #[arg(long)]
    pub no_prefix_caching: bool,
    /// Tensor-parallel ranks to split each layer's heads and MLP over (CPU
    /// ranks: threads sharing the machine's cores; with --device cuda, GPUs
    /// 0..N over NCCL); the model's attention and KV heads must divide by it.
    /// `--kv-cache-memory` covers all ranks.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub tensor_parallel_size: u32,
    /// Where the model runs: cpu (the engine's own quantized kernels), or
    /// cuda / cuda:N, a GPU through candle (a build with the `cuda` feature;
    /// weights dequantized to bf16 unless --dtype says otherwise). The KV
    /// cache stays in host memory, where KV hand-offs read and land, with a
    /// copy in GPU memory of the same size.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: ComputeDevice,
    /// Speculative decoding, as vLLM's JSON: `{"method": "ngram", "num_speculative_tokens": K}`
    /// (prompt lookup: each decode step also verifies up to K draft tokens copied from where
    /// the sequence's last `prompt_lookup_max`..`prompt_lookup_min` tokens occurred before;
    /// defaults 4 and 2), or `{"method": "draft_model", "model": GGUF, "num_speculative_tokens":
    /// K}` (a smaller model of the same vocabulary and KV heads proposes K tokens; its KV rides in
    /// the same blocks, so a prefill worker handing off to this one needs the same config). The
    /// output is the same as without it, token for token for a seed.
    #[arg(long, value_name = "JSON", value_parser = parse_speculative)]
    pub speculative_config: Option<SpeculativeConfig>,
}

impl EngineArgs {
    /// Whether prefix caching is on (`--no-prefix-caching` turns it off).
    pub fn prefix_caching(&self) -> bool {
        !self.no_prefix_caching
    }
}

/// The KV cache budget: `--kv-cache-memory`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCacheMemory {
    Bytes(u64),
    /// A share in (0, 1] of the machine's memory for the whole worker.
    Fraction(f64),
}

impl std::fmt::Display for KvCacheMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bytes(n) => write!(f, "{n} B"),
            Self::Fraction(x) => write!(f, "{x}"),
        }
    }
}

/// Parses `--kv-cache-memory`: a number in (0, 1] (`0.9`, `1`) is a fraction
/// of memory, anything else a byte count (see [`parse_bytes`]).
pub fn parse_kv_cache_memory(text: &str) -> Result<KvCacheMemory, String> {
    let t = text.trim();
    let is_number = !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.');
    if is_number && (t.contains('.') || t.parse::<u64>().is_ok_and(|n| n <= 1)) {
        let x: f64 = t.parse().map_err(|_| format!("{t:?} is not a number"))?;
        if x > 0.0 && x <= 1.0 {
            return Ok(KvCacheMemory::Fraction(x));
        }
        return Err(format!("{t} is neither a fraction in (0, 1] nor a whole byte count"));
    }
    parse_bytes(t).map(KvCacheMemory::Bytes)
}

/// Parses `--device`.
pub fn parse_device(text: &str) -> Result<ComputeDevice, String> {
    text.parse()
}

/// Parses `--speculative-config` (see [`SpeculativeConfig::from_json`]).
pub fn parse_speculative(text: &str) -> Result<SpeculativeConfig, String> {
    SpeculativeConfig::from_json(text).map_err(|e| e.to_string())
}

/// Parses `--dtype` (vLLM's names).
pub fn parse_dtype(text: &str) -> Result<WeightDtype, String> {
    text.parse()
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
    fn kv_cache_memory_is_a_fraction_or_bytes() {
        use KvCacheMemory::{Bytes, Fraction};
        assert_eq!(parse_kv_cache_memory("0.9"), Ok(Fraction(0.9)));
        assert_eq!(parse_kv_cache_memory("1"), Ok(Fraction(1.0)));
        assert_eq!(parse_kv_cache_memory("1.0"), Ok(Fraction(1.0)));
        assert_eq!(parse_kv_cache_memory(".5"), Ok(Fraction(0.5)));
        assert_eq!(parse_kv_cache_memory("768MiB"), Ok(Bytes(768 << 20)));
        assert_eq!(parse_kv_cache_memory("4096"), Ok(Bytes(4096)));
        for bad in ["0", "0.0", "1.5", "0.5.1", "-0.5", "0.5GiB", ""] {
            assert!(parse_kv_cache_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dtypes_take_vllm_names() {
        for (names, want) in [
            (&["auto", "AUTO"][..], WeightDtype::Auto),
            (&["float32", "float", "f32"][..], WeightDtype::F32),
            (&["float16", "half", "f16"][..], WeightDtype::F16),
            (&["bfloat16", "bf16"][..], WeightDtype::BF16),
        ] {
            for name in names {
                assert_eq!(parse_dtype(name), Ok(want), "{name}");
            }
        }
        let err = parse_dtype("int8").unwrap_err();
        assert!(err.contains("int8") && err.contains("bfloat16"), "{err}");
    }

    /// The flags as the workers parse them.
    #[derive(Debug, clap::Parser)]
    struct Flags {
        #[command(flatten)]
        engine: EngineArgs,
    }

    fn flags(args: &[&str]) -> Result<EngineArgs, clap::Error> {
        use clap::Parser;
        Flags::try_parse_from(std::iter::once("worker").chain(args.iter().copied())).map(|f| f.engine)
    }

    #[test]
    fn engine_flags_parse_with_vllm_defaults() {
        let a = flags(&[]).unwrap();
        assert_eq!(a.kv_cache_memory, KvCacheMemory::Bytes(768 << 20));
        assert_eq!(a.dtype, WeightDtype::Auto);
        assert_eq!(a.tensor_parallel_size, 1);
        assert!(a.prefix_caching());
        assert!(flags(&["--enable-prefix-caching"]).unwrap().prefix_caching());
        assert!(!flags(&["--no-prefix-caching"]).unwrap().prefix_caching());
        assert!(flags(&["--enable-prefix-caching", "--no-prefix-caching"]).is_err());

        let a = flags(&["--model", "m", "--tokenizer", "t", "--dtype", "half", "--kv-cache-memory", "0.8"]).unwrap();
        assert_eq!((a.dtype, a.kv_cache_memory), (WeightDtype::F16, KvCacheMemory::Fraction(0.8)));
        assert_eq!(a.tokenizer.as_deref(), Some(std::path::Path::new("t")));
        assert_eq!(flags(&["--tensor-parallel-size", "2"]).unwrap().tensor_parallel_size, 2);
        assert!(flags(&["--tensor-parallel-size", "0"]).is_err());
        assert!(flags(&["--dtype", "fp8"]).is_err());
        assert_eq!(a.device, ComputeDevice::Cpu);
        assert_eq!(flags(&["--device", "cuda"]).unwrap().device, ComputeDevice::Cuda(0));
        assert_eq!(flags(&["--device", "cuda:3"]).unwrap().device, ComputeDevice::Cuda(3));
        assert!(flags(&["--device", "tpu"]).is_err());
        assert!(flags(&["--device", "cuda:x"]).is_err());
        assert!(flags(&["--kv-cache-memory", "1.5"]).is_err());
    }

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

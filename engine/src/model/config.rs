//! What a model is, whatever its weights: its shape ([`Config`]), its
//! serving metadata ([`ModelInfo`]), the options it is loaded with, and why
//! loading fails. A leaf of `model`: the loaders and forward passes use it.

use std::path::PathBuf;

use candle_core::quantized::gguf_file::{Content, Value};

use crate::tokenizer::TokenizerError;

/// The model families the forward pass implements (GGUF
/// `general.architecture`; Hugging Face folders map onto them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    /// Llama with Q/K/V biases.
    Qwen2,
    /// Llama with per-head RMSNorm of Q and K, and a head size of its own.
    Qwen3,
    /// Per-head Q/K norms, norms after attention and MLP too, GeGLU, a
    /// scaled embedding, and local sliding-window layers between global ones.
    Gemma3,
    /// Llama with Q/K/V and gate/up each stored as one fused matrix.
    Phi3,
}

impl Arch {
    /// The names [`Arch::from_gguf`] accepts, for error messages.
    pub const SUPPORTED: &'static str = "llama, qwen2, qwen3, gemma3, phi3";

    /// From a GGUF `general.architecture`.
    pub fn from_gguf(name: &str) -> Option<Self> {
        Some(match name {
            "llama" => Self::Llama,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "gemma3" => Self::Gemma3,
            "phi3" => Self::Phi3,
            _ => return None,
        })
    }

    /// Whether llama.cpp rotates this family's heads NeoX-style (pairs
    /// `i`, `i + d/2`); its GGUF converter permutes only Llama's Q/K rows to
    /// adjacent pairs, the one convention the forward pass uses.
    pub fn neox_rope(self) -> bool {
        !matches!(self, Self::Llama)
    }

    /// Whether Q and K get a per-head RMSNorm before RoPE.
    pub fn qk_norm(self) -> bool {
        matches!(self, Self::Qwen3 | Self::Gemma3)
    }

    /// Whether attention's and the MLP's outputs are normed before the residual add.
    pub fn post_norms(self) -> bool {
        matches!(self, Self::Gemma3)
    }

    /// The MLP's gate activation.
    pub fn activation(self) -> Activation {
        match self {
            Self::Gemma3 => Activation::GeluTanh,
            _ => Activation::Silu,
        }
    }

    /// What the token embeddings are multiplied by before the first layer, if anything: Gemma
    /// scales them by √hidden.
    pub fn embedding_scale(self, hidden: usize) -> Option<f32> {
        matches!(self, Self::Gemma3).then(|| (hidden as f32).sqrt())
    }
}

/// The activation of the MLP's gate (the product with `up` follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation (GeGLU).
    GeluTanh,
}

/// Local attention layers: which layers, their window and their RoPE base.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlidingWindow {
    /// Keys a query sees, itself included.
    pub size: usize,
    /// Every `pattern`-th layer is global, the others local (Gemma 3: 6).
    pub pattern: usize,
    /// RoPE base of the local layers.
    pub rope_theta: f32,
}

impl SlidingWindow {
    /// Whether layer `l` attends within the window.
    pub fn is_local(&self, l: usize) -> bool {
        l % self.pattern < self.pattern - 1
    }
}

/// The resolved shape of a model: no optional fields left.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub arch: Arch,
    pub num_layers: usize,
    /// Width of the residual stream (`embedding_length`).
    pub hidden: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Inner width of the gated MLP (`feed_forward_length`).
    pub ffn: usize,
    pub vocab_size: usize,
    /// RoPE base frequency (`rope.freq_base`).
    pub rope_theta: f32,
    pub rms_eps: f32,
    /// Longest sequence the model was trained for; longer batches are rejected.
    pub context_length: usize,
    /// Multiplies attention scores (`1 / sqrt(head_dim)` but for Gemma 3 27B).
    pub attention_scale: f32,
    /// Linear RoPE scaling of the global layers: positions times this.
    pub rope_freq_scale: f32,
    /// Local layers, when the model has them.
    pub sliding_window: Option<SlidingWindow>,
}

impl Config {
    /// Width of the query heads together (`hidden` for Llama, not for
    /// Qwen3 or Gemma 3).
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of the key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// What the serving layers need to know about a loaded model besides its weights.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The served model name: [`LoadOptions::model_name`], else the GGUF file
    /// stem or the Hugging Face folder's name.
    pub model_name: String,
    /// `tokenizer.chat_template`, a Jinja template, when the file has one.
    pub chat_template: Option<String>,
    pub context_length: usize,
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation: `eos_token_id`, then `eot_token_id` if it differs.
    pub eos_token_ids: Vec<u32>,
    /// Text of the BOS token (empty when the file has none), for chat templates.
    pub bos_token: String,
    /// Text of the first EOS token, for chat templates.
    pub eos_token: String,
    /// Whether prompts that are not rendered from a chat template should start
    /// with BOS (`tokenizer.ggml.add_bos_token`).
    pub add_bos_token: bool,
    /// An encoder (BERT): it serves embeddings only, and its tokenizer's
    /// post-processor adds its special tokens (`[CLS]` … `[SEP]`) to a text.
    pub encoder: bool,
    /// The pooling the model's Sentence-Transformers config names
    /// (`1_Pooling/config.json`), for embedding requests that name none.
    pub pooling: Option<crate::request::Pooling>,
    /// Values in one embedding: the width of the final hidden states.
    pub embedding_size: usize,
}

/// Choices made at load time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Overrides the served model name (default: the GGUF file stem or the
    /// Hugging Face folder's name).
    pub model_name: Option<String>,
    /// A `tokenizer.json` file, or a folder holding one (with its
    /// `tokenizer_config.json`), instead of the model's own. Hugging Face
    /// folders only: a GGUF file's tokenizer is part of the file.
    pub tokenizer: Option<PathBuf>,
    /// The precision weight matrices are kept in. Hugging Face folders only:
    /// GGUF weights keep their stored quantization.
    pub dtype: WeightDtype,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { model_name: None, tokenizer: None, dtype: WeightDtype::Auto }
    }
}

/// The precision of a checkpoint's weight matrices after loading (vLLM's `--dtype`).
/// Activations are f32 whatever this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// Keep what the checkpoint stores (f32, f16 or bf16).
    #[default]
    Auto,
    F32,
    F16,
    BF16,
}

impl std::str::FromStr for WeightDtype {
    type Err = String;

    /// Accepts vLLM's names: `auto`, `float32`/`float`/`f32`,
    /// `float16`/`half`/`f16`, `bfloat16`/`bf16`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "float32" | "float" | "f32" => Ok(Self::F32),
            "float16" | "half" | "f16" => Ok(Self::F16),
            "bfloat16" | "bf16" => Ok(Self::BF16),
            other => Err(format!("unknown dtype {other:?} (use auto, float32, float16 or bfloat16)")),
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        })
    }
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot open model file {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot read GGUF {path}: {source}")]
    Gguf { path: PathBuf, source: candle_core::Error },
    #[error("GGUF metadata key `{0}` is missing")]
    MissingKey(String),
    #[error("GGUF metadata key `{key}` has the wrong type or value: {reason}")]
    BadValue { key: String, reason: String },
    #[error("unsupported architecture `{0}` (supported: {supported})", supported = Arch::SUPPORTED)]
    UnsupportedArch(String),
    #[error("GGUF tensor `{0}` is missing")]
    MissingTensor(String),
    #[error("GGUF tensor `{name}` has shape {got:?}, expected {expected:?}")]
    BadShape { name: String, got: Vec<usize>, expected: Vec<usize> },
    #[error("tensor operation failed while loading: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },
    #[error("tensor parallelism: {0}")]
    TensorParallel(String),
    /// A draft model that cannot pair with its target.
    #[error("draft model: {0}")]
    Draft(String),
    #[error("model path {0} does not exist")]
    NotFound(PathBuf),
    #[error("{0} is neither a .gguf file nor a Hugging Face model folder (a folder with config.json)")]
    UnknownFormat(PathBuf),
    #[error("--dtype {0} does not apply to GGUF files: GGUF weights keep their stored quantization")]
    DtypeForGguf(WeightDtype),
    #[error("--tokenizer does not apply to GGUF files: the tokenizer is part of the file")]
    TokenizerForGguf,
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not valid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: `{key}` {reason}")]
    ConfigValue { path: PathBuf, key: String, reason: String },
    #[error("{path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },
    #[error("cannot parse safetensors file {path}: {source}")]
    Safetensors { path: PathBuf, source: safetensors::SafeTensorError },
    #[error("tensor `{name}` is missing: {reason}")]
    MissingWeight { name: String, reason: String },
    #[error("tensor `{name}` in {path}: {reason}")]
    BadWeight { name: String, path: PathBuf, reason: String },
    #[error("{0} is an encoder: it serves embeddings, not generation")]
    EncoderOnly(String),
    #[error("cannot load tokenizer {path}: {reason}")]
    TokenizerFile { path: PathBuf, reason: String },
}

/// Typed reads of GGUF metadata whose errors name the key.
pub(crate) struct Metadata<'a>(pub &'a Content);

impl Metadata<'_> {
    fn value(&self, key: &str) -> Result<&Value, ModelError> {
        self.0.metadata.get(key).ok_or_else(|| ModelError::MissingKey(key.to_string()))
    }

    fn bad(key: &str, e: impl std::fmt::Display) -> ModelError {
        ModelError::BadValue { key: key.to_string(), reason: e.to_string() }
    }

    fn has(&self, key: &str) -> bool {
        self.0.metadata.contains_key(key)
    }

    pub fn usize(&self, key: &str) -> Result<usize, ModelError> {
        // Writers disagree on u32 vs u64 for counts.
        let v = self.value(key)?;
        let n = match v {
            Value::U64(n) => *n,
            Value::I64(n) => u64::try_from(*n).map_err(|e| Self::bad(key, e))?,
            other => u64::from(other.to_u32().map_err(|e| Self::bad(key, e))?),
        };
        usize::try_from(n).map_err(|e| Self::bad(key, e))
    }

    pub fn u32(&self, key: &str) -> Result<u32, ModelError> {
        self.value(key)?.to_u32().map_err(|e| Self::bad(key, e))
    }

    pub fn f32(&self, key: &str) -> Result<f32, ModelError> {
        match self.value(key)? {
            Value::F64(x) => Ok(*x as f32),
            v => v.to_f32().map_err(|e| Self::bad(key, e)),
        }
    }

    pub fn string(&self, key: &str) -> Result<&str, ModelError> {
        self.value(key)?.to_string().map(String::as_str).map_err(|e| Self::bad(key, e))
    }

    pub fn bool(&self, key: &str) -> Result<bool, ModelError> {
        self.value(key)?.to_bool().map_err(|e| Self::bad(key, e))
    }

    fn opt<T>(
        &self,
        key: &str,
        get: impl FnOnce(&Self, &str) -> Result<T, ModelError>,
    ) -> Result<Option<T>, ModelError> {
        if self.has(key) {
            get(self, key).map(Some)
        } else {
            Ok(None)
        }
    }
}

impl Config {
    /// Resolves the `<arch>.*` metadata of a GGUF file; optional keys fall
    /// back to llama.cpp's defaults.
    pub fn from_gguf(content: &Content) -> Result<Self, ModelError> {
        let md = Metadata(content);
        let name = md.string("general.architecture")?;
        let arch = Arch::from_gguf(name).ok_or_else(|| ModelError::UnsupportedArch(name.to_string()))?;
        let key = |k: &str| format!("{name}.{k}");
        let hidden = md.usize(&key("embedding_length"))?;
        let num_heads = md.usize(&key("attention.head_count"))?;
        // Qwen3 and Gemma give the head size; the others derive it.
        let head_dim = match md.opt(&key("attention.key_length"), Metadata::usize)? {
            Some(d) => d,
            None if num_heads > 0 && hidden.is_multiple_of(num_heads) => hidden / num_heads,
            None => {
                return Err(Metadata::bad(
                    &key("attention.head_count"),
                    format!("{num_heads} heads do not divide hidden size {hidden}"),
                ))
            }
        };
        if let Some(v) = md.opt(&key("attention.value_length"), Metadata::usize)? {
            if v != head_dim {
                return Err(Metadata::bad(&key("attention.value_length"), format!("{v} != key_length {head_dim}")));
            }
        }
        let num_kv_heads = md.opt(&key("attention.head_count_kv"), Metadata::usize)?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(Metadata::bad(
                &key("attention.head_count_kv"),
                format!("{num_kv_heads} KV heads do not divide {num_heads} heads"),
            ));
        }
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(Metadata::bad(&key("attention.key_length"), format!("head size {head_dim} is not even")));
        }
        if let Some(rope_dim) = md.opt(&key("rope.dimension_count"), Metadata::usize)? {
            // Partial rotary embeddings are not implemented.
            if rope_dim != head_dim {
                return Err(Metadata::bad(&key("rope.dimension_count"), format!("{rope_dim} != head_dim {head_dim}")));
            }
        }
        let scaling = md.opt(&key("rope.scaling.type"), |m, k| m.string(k).map(str::to_string))?;
        let rope_freq_scale = match scaling.as_deref() {
            None | Some("none") => 1.0,
            Some("linear") => 1.0 / md.f32(&key("rope.scaling.factor"))?,
            Some(other) => {
                return Err(Metadata::bad(
                    &key("rope.scaling.type"),
                    format!("`{other}` RoPE scaling is not implemented (none and linear are)"),
                ))
            }
        };
        let vocab_size = match md.opt(&key("vocab_size"), Metadata::usize)? {
            Some(n) => n,
            None => md
                .value("tokenizer.ggml.tokens")?
                .to_vec()
                .map_err(|e| Metadata::bad("tokenizer.ggml.tokens", e))?
                .len(),
        };
        let num_layers = md.usize(&key("block_count"))?;
        let window = md.opt(&key("attention.sliding_window"), Metadata::usize)?;
        let sliding_window = match (arch, window) {
            // llama.cpp's Gemma 3: five local layers, then a global one;
            // local layers rotate with base 10,000.
            (Arch::Gemma3, Some(size)) => Some(SlidingWindow { size, pattern: 6, rope_theta: 10_000.0 }),
            (Arch::Gemma3, None) => return Err(ModelError::MissingKey(key("attention.sliding_window"))),
            // llama.cpp disables Phi-3's window too (full attention).
            _ => None,
        };
        // llama.cpp scales Gemma 3 27B (62 layers) by its hidden size per
        // head rather than the head size.
        let attention_scale = match (arch, num_layers) {
            (Arch::Gemma3, 62) => 1.0 / ((hidden / num_heads) as f32).sqrt(),
            _ => 1.0 / (head_dim as f32).sqrt(),
        };
        Ok(Self {
            arch,
            num_layers,
            hidden,
            num_heads,
            num_kv_heads,
            head_dim,
            ffn: md.usize(&key("feed_forward_length"))?,
            vocab_size,
            rope_theta: md.opt(&key("rope.freq_base"), Metadata::f32)?.unwrap_or(10_000.0),
            rms_eps: md.f32(&key("attention.layer_norm_rms_epsilon"))?,
            context_length: md.usize(&key("context_length"))?,
            attention_scale,
            rope_freq_scale,
            sliding_window,
        })
    }
}

impl ModelInfo {
    pub(super) fn from_gguf(content: &Content, model_name: String, config: &Config) -> Result<Self, ModelError> {
        let md = Metadata(content);
        let tokens =
            md.value("tokenizer.ggml.tokens")?.to_vec().map_err(|e| Metadata::bad("tokenizer.ggml.tokens", e))?;
        let text = |key: &str, id: u32| -> Result<String, ModelError> {
            let t = tokens.get(id as usize).ok_or_else(|| {
                Metadata::bad(key, format!("token id {id} outside the vocabulary of {}", tokens.len()))
            })?;
            t.to_string().cloned().map_err(|e| Metadata::bad(key, e))
        };
        let bos_token_id = md.opt("tokenizer.ggml.bos_token_id", Metadata::u32)?;
        let eos = md.u32("tokenizer.ggml.eos_token_id")?;
        let mut eos_token_ids = vec![eos];
        if let Some(eot) = md.opt("tokenizer.ggml.eot_token_id", Metadata::u32)? {
            if eot != eos {
                text("tokenizer.ggml.eot_token_id", eot)?;
                eos_token_ids.push(eot);
            }
        }
        // Files that name no end-of-turn token still have one (Gemma's
        // `<end_of_turn>`): llama.cpp ends generation at these control
        // tokens by their text, and so does this.
        if let Ok(types) = md
            .value("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().map_err(|e| Metadata::bad("tokenizer.ggml.token_type", e)))
        {
            for (id, (token, ty)) in tokens.iter().zip(types).enumerate() {
                let control = ty.to_i32().is_ok_and(|t| t == TOKEN_TYPE_CONTROL);
                let end_of_turn = token.to_string().is_ok_and(|t| END_OF_TURN.contains(&t.as_str()));
                if control && end_of_turn && !eos_token_ids.contains(&(id as u32)) {
                    eos_token_ids.push(id as u32);
                }
            }
        }
        let chat_template = md.opt("tokenizer.chat_template", |m, k| m.string(k).map(str::to_string))?;
        Ok(Self {
            model_name,
            // A Gemma 3 file without its template gets Gemma 3's (llama.cpp
            // recognises the family by its tokens and does the same).
            chat_template: chat_template.or_else(|| {
                (config.arch == Arch::Gemma3).then(|| include_str!("chat_templates/gemma3.jinja").to_string())
            }),
            context_length: config.context_length,
            bos_token: match bos_token_id {
                Some(id) => text("tokenizer.ggml.bos_token_id", id)?,
                None => String::new(),
            },
            bos_token_id,
            eos_token: text("tokenizer.ggml.eos_token_id", eos)?,
            eos_token_ids,
            add_bos_token: md.opt("tokenizer.ggml.add_bos_token", Metadata::bool)?.unwrap_or(false),
            encoder: false,
            pooling: None,
            embedding_size: config.hidden,
        })
    }
}

/// GGUF `token_type` of control tokens (BOS, EOS, chat markers).
const TOKEN_TYPE_CONTROL: i32 = 3;

/// The control tokens that end a turn, by text, as llama.cpp lists them.
const END_OF_TURN: &[&str] = &["<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<EOT>"];

/// A model's tokenizer and serving metadata without its weights.
pub struct ModelMetadata {
    pub tokenizer: tokenizers::Tokenizer,
    pub info: ModelInfo,
}

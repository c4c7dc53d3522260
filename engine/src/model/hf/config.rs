//! `config.json`: the model's shape, checked against what the forward pass
//! implements, and typed JSON reads whose errors name the file and key.

use std::path::Path;

use serde_json::{Map, Value};

use crate::model::bert::BertConfig;
use crate::model::config::Arch as Family;
use crate::model::{Config, ModelError, SlidingWindow};

/// The Hugging Face architectures whose checkpoints map onto [`crate::model::Llama`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    Llama,
    /// Llama's shape; accepted only without a sliding window.
    Mistral,
    /// Llama's shape plus Q/K/V biases.
    Qwen2,
    /// Per-head Q/K norms and an explicit head size.
    Qwen3,
    /// Fused `qkv_proj` and `gate_up_proj`.
    Phi3,
    /// Gemma 3's text model (see [`Family::Gemma3`]).
    Gemma3,
}

impl Arch {
    /// The forward pass's family for this architecture.
    fn family(self) -> Family {
        match self {
            Self::Llama | Self::Mistral => Family::Llama,
            Self::Qwen2 => Family::Qwen2,
            Self::Qwen3 => Family::Qwen3,
            Self::Phi3 => Family::Phi3,
            Self::Gemma3 => Family::Gemma3,
        }
    }

    const SUPPORTED: &'static str = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, \
                                     Phi3ForCausalLM, Gemma3ForCausalLM, BertModel (embeddings)";

    fn from_architecture(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "MistralForCausalLM" => Some(Self::Mistral),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            "Qwen3ForCausalLM" => Some(Self::Qwen3),
            "Phi3ForCausalLM" => Some(Self::Phi3),
            "Gemma3ForCausalLM" => Some(Self::Gemma3),
            _ => None,
        }
    }

    fn from_model_type(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Self::Llama),
            "mistral" => Some(Self::Mistral),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            "phi3" => Some(Self::Phi3),
            "gemma3_text" => Some(Self::Gemma3),
            _ => None,
        }
    }
}

/// `config.json`, resolved.
#[derive(Debug, Clone)]
pub(super) struct HfConfig {
    pub config: Config,
    /// The LM head is the embedding matrix (`lm_head.weight` is then ignored, as in transformers).
    pub tie_word_embeddings: bool,
    /// `q_proj`, `k_proj` and `v_proj` have biases (Qwen2).
    pub qkv_bias: bool,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id`: one id or a list (empty when absent).
    pub eos_token_ids: Vec<u32>,
}

/// Reads and parses a JSON file.
pub(super) fn read_json(path: &Path) -> Result<Value, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Read { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json { path: path.to_path_buf(), source })
}

/// Typed reads of one JSON object whose errors name the file and key. A
/// `null` value counts as absent, as transformers treats it.
pub(super) struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    pub fn new(path: &'a Path, value: &'a Value) -> Result<Self, ModelError> {
        match value {
            Value::Object(map) => Ok(Self { path, map }),
            _ => Err(ModelError::Unsupported { path: path.to_path_buf(), reason: "is not a JSON object".into() }),
        }
    }

    pub fn bad(&self, key: &str, reason: impl Into<String>) -> ModelError {
        ModelError::ConfigValue { path: self.path.to_path_buf(), key: key.to_string(), reason: reason.into() }
    }

    pub fn unsupported(&self, reason: impl Into<String>) -> ModelError {
        ModelError::Unsupported { path: self.path.to_path_buf(), reason: reason.into() }
    }

    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| self.bad(key, format!("is {v}, expected a non-negative integer")))
            })
            .transpose()
    }

    pub fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.opt_usize(key)?.ok_or_else(|| self.bad(key, "is missing"))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| self.bad(key, format!("is {v}, expected a number")))).transpose()
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.bad(key, format!("is {v}, expected true or false"))))
            .transpose()
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&'a str>, ModelError> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| self.bad(key, format!("is {v}, expected a string")))).transpose()
    }

    /// A token id or a list of them; empty when absent.
    pub fn token_ids(&self, key: &str) -> Result<Vec<u32>, ModelError> {
        let one = |v: &Value| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.bad(key, format!("holds {v}, expected token ids")))
        };
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(ids)) => ids.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }
}

/// What a folder's `config.json` describes, read once.
pub(super) enum FolderConfig {
    /// A decoder the Llama forward pass runs.
    Decoder(HfConfig),
    /// A BERT encoder.
    Encoder(BertConfig),
}

impl FolderConfig {
    /// Reads `config.json` at `path`: a BERT encoder's when it names one (`max_seq_length`
    /// as in [`bert_config`]), else a decoder's ([`HfConfig::read`]).
    pub fn read(
        path: &Path,
        max_seq_length: impl FnOnce() -> Result<Option<usize>, ModelError>,
    ) -> Result<Self, ModelError> {
        let json = read_json(path)?;
        let f = Fields::new(path, &json)?;
        if names_encoder(&f)? {
            Ok(Self::Encoder(bert_config(&f, max_seq_length()?)?))
        } else {
            Ok(Self::Decoder(HfConfig::from_fields(&f)?))
        }
    }
}

/// Whether `config.json` names a BERT encoder (`BertModel`, or `model_type` `bert`), which
/// [`bert_config`] reads instead of [`HfConfig::read`].
fn names_encoder(f: &Fields) -> Result<bool, ModelError> {
    let first = f.get("architectures").and_then(|a| a.as_array()?.first()?.as_str());
    Ok(match first {
        Some(name) => matches!(name, "BertModel" | "BertForMaskedLM" | "BertForPreTraining"),
        None => f.opt_str("model_type")? == Some("bert"),
    })
}

/// Reads a BERT encoder's `config.json`; `max_seq_length` is Sentence-Transformers' limit
/// (`sentence_bert_config.json`), which becomes the context length when shorter.
fn bert_config(f: &Fields, max_seq_length: Option<usize>) -> Result<BertConfig, ModelError> {
    let act = f.opt_str("hidden_act")?.unwrap_or("gelu");
    if act != "gelu" {
        return Err(f.unsupported(format!("unsupported hidden_act `{act}` (only gelu, the erf form, is implemented)")));
    }
    if let Some(kind) = f.opt_str("position_embedding_type")?.filter(|&k| k != "absolute") {
        return Err(
            f.unsupported(format!("unsupported position_embedding_type `{kind}` (only absolute is implemented)"))
        );
    }
    let hidden = f.usize("hidden_size")?;
    let num_heads = f.usize("num_attention_heads")?;
    if num_heads == 0 || !hidden.is_multiple_of(num_heads) {
        return Err(f.bad("num_attention_heads", format!("{num_heads} heads do not divide hidden_size {hidden}")));
    }
    let max_positions = f.usize("max_position_embeddings")?;
    let type_vocab_size = f.opt_usize("type_vocab_size")?.unwrap_or(2);
    if type_vocab_size == 0 {
        return Err(f.bad("type_vocab_size", "is 0: token type 0 needs an embedding"));
    }
    Ok(BertConfig {
        hidden,
        num_layers: f.usize("num_hidden_layers")?,
        num_heads,
        ffn: f.usize("intermediate_size")?,
        vocab_size: f.usize("vocab_size")?,
        max_positions,
        type_vocab_size,
        layer_norm_eps: f.opt_f64("layer_norm_eps")?.unwrap_or(1e-12),
        context_length: max_seq_length.map_or(max_positions, |n| n.min(max_positions)),
    })
}

impl HfConfig {
    /// Reads `config.json`, rejecting what the forward pass does not implement
    /// (other architectures, scaled or partial RoPE, sliding windows, ...).
    pub fn read(path: &Path) -> Result<Self, ModelError> {
        let json = read_json(path)?;
        Self::from_fields(&Fields::new(path, &json)?)
    }

    /// [`HfConfig::read`] of a parsed `config.json`.
    fn from_fields(f: &Fields) -> Result<Self, ModelError> {
        let arch = Self::arch(f)?;

        // Gemma names its activation `hidden_activation`; the forward pass
        // gives each family the one it has.
        let (act_key, act_default, act_wanted) = match arch {
            Arch::Gemma3 => ("hidden_activation", "gelu_pytorch_tanh", "gelu_pytorch_tanh"),
            _ => ("hidden_act", "silu", "silu"),
        };
        let act = f.opt_str(act_key)?.unwrap_or(act_default);
        if act != act_wanted {
            return Err(f.unsupported(format!("unsupported {act_key} `{act}` (only {act_wanted} is implemented here)")));
        }
        for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
            if f.get(key).is_some() {
                return Err(f.unsupported(format!("unsupported {key} (soft-capping is not implemented)")));
            }
        }
        let hidden = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        if num_heads == 0 || !hidden.is_multiple_of(num_heads) {
            return Err(f.bad("num_attention_heads", format!("{num_heads} heads do not divide hidden_size {hidden}")));
        }
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(
                f.bad("num_key_value_heads", format!("{num_kv_heads} KV heads do not divide {num_heads} heads"))
            );
        }
        let derived = hidden / num_heads;
        let head_dim = match (arch, f.opt_usize("head_dim")?) {
            // Qwen3 and Gemma give heads a size of their own.
            (Arch::Qwen3 | Arch::Gemma3, Some(explicit)) => explicit,
            (_, Some(explicit)) if explicit != derived => {
                return Err(f.unsupported(format!(
                    "unsupported head_dim {explicit}: only hidden_size / num_attention_heads = {derived} is implemented"
                )));
            }
            _ => derived,
        };
        if !head_dim.is_multiple_of(2) {
            return Err(f.unsupported(format!("unsupported odd head dimension {head_dim} (RoPE rotates pairs)")));
        }
        if let Some(factor) = f.opt_f64("partial_rotary_factor")? {
            if factor != 1.0 {
                return Err(f.unsupported(format!("unsupported partial_rotary_factor {factor}")));
            }
        }
        if let Some(q) = f.get("quantization_config") {
            let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("unknown");
            return Err(f.unsupported(format!(
                "unsupported quantization_config (quant_method `{method}`): only f32/f16/bf16 checkpoints load"
            )));
        }
        let rope_freq_scale = Self::rope_scaling(f)?;
        let context_length = f.usize("max_position_embeddings")?;
        let num_layers = f.usize("num_hidden_layers")?;
        let sliding_window = Self::sliding_window(f, arch, context_length, num_layers)?;

        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let qkv_bias = match arch {
            // Qwen2 always has Q/K/V biases and never an output bias.
            Arch::Qwen2 => true,
            // Elsewhere attention_bias also puts a bias on o_proj, which the
            // forward pass has no place for.
            _ if attention_bias => {
                return Err(f.unsupported("unsupported attention_bias = true (an o_proj bias is not implemented)"));
            }
            _ => false,
        };
        // Gemma scales scores by its query_pre_attn_scalar (the head size but in 27B).
        let attention_scale = match arch {
            Arch::Gemma3 => 1.0 / f.opt_f64("query_pre_attn_scalar")?.unwrap_or(head_dim as f64).sqrt() as f32,
            _ => 1.0 / (head_dim as f32).sqrt(),
        };
        if f.opt_bool("mlp_bias")?.unwrap_or(false) {
            return Err(f.unsupported("unsupported mlp_bias = true"));
        }

        let config = Config {
            arch: arch.family(),
            attention_scale,
            rope_freq_scale,
            sliding_window,
            num_layers,
            hidden,
            num_heads,
            num_kv_heads,
            head_dim,
            ffn: f.usize("intermediate_size")?,
            vocab_size: f.usize("vocab_size")?,
            rope_theta: f.opt_f64("rope_theta")?.unwrap_or(10_000.0) as f32,
            rms_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            context_length,
        };
        let bos_token_id = f.token_ids("bos_token_id")?.first().copied();
        Ok(Self {
            config,
            // Gemma ties them unless it says otherwise.
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(arch == Arch::Gemma3),
            qkv_bias,
            bos_token_id,
            eos_token_ids: f.token_ids("eos_token_id")?,
        })
    }

    /// `architectures[0]`, else `model_type`.
    fn arch(f: &Fields) -> Result<Arch, ModelError> {
        if let Some(list) = f.get("architectures") {
            let name = list
                .as_array()
                .and_then(|a| a.first())
                .and_then(Value::as_str)
                .ok_or_else(|| f.bad("architectures", format!("is {list}, expected a list of names")))?;
            return Arch::from_architecture(name).ok_or_else(|| {
                f.unsupported(format!("unsupported architecture `{name}` (supported: {})", Arch::SUPPORTED))
            });
        }
        let model_type = f.opt_str("model_type")?.ok_or_else(|| f.bad("architectures", "is missing"))?;
        Arch::from_model_type(model_type).ok_or_else(|| {
            f.unsupported(format!("unsupported model_type `{model_type}` (supported: {})", Arch::SUPPORTED))
        })
    }

    /// The linear RoPE scaling of `rope_scaling` (1 when absent, null or
    /// `default`); other types are not implemented.
    fn rope_scaling(f: &Fields) -> Result<f32, ModelError> {
        let Some(scaling) = f.get("rope_scaling") else { return Ok(1.0) };
        let kind =
            scaling.get("rope_type").or_else(|| scaling.get("type")).and_then(Value::as_str).ok_or_else(|| {
                f.bad("rope_scaling", format!("is {scaling}, expected null or an object with a type"))
            })?;
        match kind {
            "default" => Ok(1.0),
            "linear" => match scaling.get("factor").and_then(Value::as_f64) {
                Some(factor) if factor > 0.0 => Ok((1.0 / factor) as f32),
                _ => Err(f.bad("rope_scaling", format!("is {scaling}, expected a positive factor"))),
            },
            other => Err(f.unsupported(format!(
                "unsupported rope_scaling type `{other}` (unscaled and linear RoPE are implemented)"
            ))),
        }
    }

    /// Gemma 3's local layers; elsewhere attention is full-causal, and a
    /// window shorter than the context would change the model.
    fn sliding_window(
        f: &Fields,
        arch: Arch,
        context_length: usize,
        num_layers: usize,
    ) -> Result<Option<SlidingWindow>, ModelError> {
        if arch == Arch::Gemma3 {
            let size = f.usize("sliding_window")?;
            let pattern = f.opt_usize("sliding_window_pattern")?.unwrap_or(6);
            let window = SlidingWindow {
                size,
                pattern,
                rope_theta: f.opt_f64("rope_local_base_freq")?.unwrap_or(10_000.0) as f32,
            };
            // Newer configs list each layer's kind: it must be the pattern.
            if let Some(Value::Array(kinds)) = f.get("layer_types") {
                let expected =
                    (0..num_layers).map(|l| if window.is_local(l) { "sliding_attention" } else { "full_attention" });
                if kinds.len() != num_layers || !kinds.iter().map(Value::as_str).eq(expected.map(Some)) {
                    return Err(f.unsupported(format!(
                        "unsupported layer_types: only one global layer after every {} local ones is implemented",
                        pattern - 1
                    )));
                }
            }
            return Ok(Some(window));
        }
        let in_use = match arch {
            Arch::Qwen2 | Arch::Qwen3 => f.opt_bool("use_sliding_window")?.unwrap_or(false),
            Arch::Mistral => true,
            // llama.cpp attends over the whole context for Phi-3 too.
            Arch::Llama | Arch::Phi3 | Arch::Gemma3 => false,
        };
        match f.opt_usize("sliding_window")? {
            Some(window) if in_use && window < context_length => Err(f.unsupported(format!(
                "unsupported sliding_window {window} (shorter than max_position_embeddings {context_length}; \
                 only full attention is implemented)"
            ))),
            _ => Ok(None),
        }
    }
}

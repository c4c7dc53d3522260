//! BERT encoders (`BertModel`: all-MiniLM, bge, e5, gte), for embeddings.
//!
//! BERT (Devlin et al., 2019) as transformers runs it: word, absolute position
//! and token-type embeddings summed and layer-normed, then post-norm blocks of
//! bidirectional multi-head attention and a GELU MLP, every projection with a
//! bias. Unlike the decoders, a token attends to the tokens after it too, so
//! a prompt is computed whole in one step and its KV is never cached or
//! reused ([`Forward::encoder`]); there is no LM head, so it only embeds.
//!
//! Candle tensors carry the weights, so the same code runs on the CPU and on
//! a CUDA device. Every token of a step goes through each projection as one
//! matrix; attention runs per sequence.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};

use super::ModelError;
use crate::forward::{Forward, ForwardBatch, ForwardError, Logits};
use crate::kv::cache::{KvCacheShape, KvStorage};

/// The shape of a BERT encoder (`config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct BertConfig {
    pub hidden: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// The MLP's inner width (`intermediate_size`).
    pub ffn: usize,
    pub vocab_size: usize,
    /// Learned positions (`max_position_embeddings`).
    pub max_positions: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    /// Longest prompt served: Sentence-Transformers' `max_seq_length` when
    /// the folder has one (it truncates there), else `max_positions`.
    pub context_length: usize,
}

impl BertConfig {
    fn head_dim(&self) -> usize {
        self.hidden / self.num_heads
    }
}

/// A linear layer: `x · Wᵀ + b`.
struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}

/// Layer normalization with a learned scale and shift.
struct Norm {
    weight: Tensor,
    bias: Tensor,
}

struct Layer {
    /// Q, K and V stacked: `[3 * hidden, hidden]`.
    qkv: Dense,
    attn_output: Dense,
    attn_norm: Norm,
    up: Dense,
    down: Dense,
    ffn_norm: Norm,
}

/// BERT weights and the encoder forward pass. See the module docs.
pub struct Bert {
    config: BertConfig,
    word: Tensor,
    position: Tensor,
    /// The embedding of token type 0, which every token of a single-text input has.
    token_type: Tensor,
    embed_norm: Norm,
    layers: Vec<Layer>,
    device: Device,
}

/// A checkpoint's tensors by name; some checkpoints (`BertForMaskedLM`, ...)
/// prefix the encoder's with `bert.`.
struct Weights {
    tensors: HashMap<String, Tensor>,
    prefix: &'static str,
    path: std::path::PathBuf,
    dtype: DType,
}

impl Weights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let full = format!("{}{name}", self.prefix);
        let t = self.tensors.get(&full).ok_or_else(|| ModelError::MissingWeight {
            name: full.clone(),
            reason: format!("not in {}", self.path.display()),
        })?;
        if t.dims() != shape {
            return Err(ModelError::BadWeight {
                name: full,
                path: self.path.clone(),
                reason: format!("shape {:?}, expected {shape:?}", t.dims()),
            });
        }
        Ok(t.to_dtype(self.dtype)?)
    }

    fn dense(&self, name: &str, out: usize, inp: usize) -> Result<Dense, ModelError> {
        Ok(Dense {
            weight: self.get(&format!("{name}.weight"), &[out, inp])?,
            bias: self.get(&format!("{name}.bias"), &[out])?,
        })
    }

    fn norm(&self, name: &str, width: usize) -> Result<Norm, ModelError> {
        Ok(Norm {
            weight: self.get(&format!("{name}.weight"), &[width])?,
            bias: self.get(&format!("{name}.bias"), &[width])?,
        })
    }
}

impl Bert {
    /// Reads `model.safetensors` from `dir`, its matrices and vectors in `dtype`, onto `device`.
    pub(crate) fn load(dir: &Path, config: BertConfig, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        let path = dir.join("model.safetensors");
        if !path.is_file() {
            return Err(ModelError::Unsupported {
                path: dir.to_path_buf(),
                reason: "a BERT encoder loads from one model.safetensors file, and this folder has none".into(),
            });
        }
        let tensors = candle_core::safetensors::load(&path, device)?;
        let prefix = if tensors.contains_key("bert.embeddings.word_embeddings.weight") { "bert." } else { "" };
        let w = Weights { tensors, prefix, path, dtype };
        let c = &config;
        let h = c.hidden;
        let layers = (0..c.num_layers)
            .map(|i| {
                let name = |t: &str| format!("encoder.layer.{i}.{t}");
                let [q, k, v] = ["query", "key", "value"].map(|p| w.dense(&name(&format!("attention.self.{p}")), h, h));
                let (q, k, v) = (q?, k?, v?);
                Ok(Layer {
                    qkv: Dense {
                        weight: Tensor::cat(&[&q.weight, &k.weight, &v.weight], 0)?,
                        bias: Tensor::cat(&[&q.bias, &k.bias, &v.bias], 0)?,
                    },
                    attn_output: w.dense(&name("attention.output.dense"), h, h)?,
                    attn_norm: w.norm(&name("attention.output.LayerNorm"), h)?,
                    up: w.dense(&name("intermediate.dense"), c.ffn, h)?,
                    down: w.dense(&name("output.dense"), h, c.ffn)?,
                    ffn_norm: w.norm(&name("output.LayerNorm"), h)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Self {
            word: w.get("embeddings.word_embeddings.weight", &[c.vocab_size, h])?,
            position: w.get("embeddings.position_embeddings.weight", &[c.max_positions, h])?,
            token_type: w.get("embeddings.token_type_embeddings.weight", &[c.type_vocab_size, h])?.i(0)?,
            embed_norm: w.norm("embeddings.LayerNorm", h)?,
            layers,
            device: device.clone(),
            config,
        })
    }

    /// A copy of the weights on `device` in `dtype` (the `--device` and `--dtype` flags).
    pub fn to_device(&self, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        let to = |t: &Tensor| t.to_device(device)?.to_dtype(dtype);
        let dense =
            |d: &Dense| -> candle_core::Result<Dense> { Ok(Dense { weight: to(&d.weight)?, bias: to(&d.bias)? }) };
        let norm = |n: &Norm| -> candle_core::Result<Norm> { Ok(Norm { weight: to(&n.weight)?, bias: to(&n.bias)? }) };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    qkv: dense(&l.qkv)?,
                    attn_output: dense(&l.attn_output)?,
                    attn_norm: norm(&l.attn_norm)?,
                    up: dense(&l.up)?,
                    down: dense(&l.down)?,
                    ffn_norm: norm(&l.ffn_norm)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            config: self.config.clone(),
            word: to(&self.word)?,
            position: to(&self.position)?,
            token_type: to(&self.token_type)?,
            embed_norm: norm(&self.embed_norm)?,
            layers,
            device: device.clone(),
        })
    }

    /// The resolved model shape.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The KV cache shape the engine allocates for this model. An encoder
    /// writes no KV: its blocks only count the tokens a step holds, so they are
    /// as small as a block can be (one value per token).
    pub fn kv_shape(&self, block_size: usize, num_blocks: usize) -> KvCacheShape {
        KvCacheShape { num_layers: 1, num_kv_heads: 1, head_dim: 1, block_size, num_blocks }
    }

    fn layer_norm(&self, x: &Tensor, norm: &Norm) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm(x, &norm.weight, &norm.bias, self.config.layer_norm_eps as f32)
    }

    /// Bidirectional attention of one sequence's `n` rows of stacked Q, K, V.
    fn attend(&self, qkv: &Tensor, n: usize) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (heads, hd) = (c.num_heads, c.head_dim());
        let split =
            |i: usize| qkv.narrow(1, i * c.hidden, c.hidden)?.reshape((n, heads, hd))?.transpose(0, 1)?.contiguous();
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs.matmul(&v)?.transpose(0, 1)?.reshape((n, c.hidden))
    }

    /// The final hidden states of every token of `batch`: `[tokens, hidden]`.
    fn encode(&self, batch: &ForwardBatch) -> candle_core::Result<Tensor> {
        let ids = Tensor::new(batch.tokens.as_slice(), &self.device)?;
        let positions: Vec<u32> = batch.seqs.iter().flat_map(|s| 0..s.num_tokens as u32).collect();
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let x = self.word.index_select(&ids, 0)?.add(&self.position.index_select(&positions, 0)?)?;
        let mut x = self.layer_norm(&x.broadcast_add(&self.token_type)?, &self.embed_norm)?;
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x)?;
            let attended = batch
                .seqs
                .iter()
                .map(|s| self.attend(&qkv.narrow(0, s.token_start, s.num_tokens)?, s.num_tokens))
                .collect::<candle_core::Result<Vec<_>>>()?;
            let attended = Tensor::cat(&attended, 0)?;
            x = self.layer_norm(&(layer.attn_output.forward(&attended)? + &x)?, &layer.attn_norm)?;
            let inner = layer.up.forward(&x)?.gelu_erf()?;
            x = self.layer_norm(&(layer.down.forward(&inner)? + &x)?, &layer.ffn_norm)?;
        }
        Ok(x)
    }

    /// Rejects what an encoder cannot compute: a chunk that is not a whole
    /// prompt, logits (it has no LM head), tokens outside the vocabulary.
    fn check(&self, batch: &ForwardBatch) -> Result<(), ForwardError> {
        let bad = |m: String| Err(ForwardError::InvalidBatch(m));
        let mut next = 0;
        for (i, s) in batch.seqs.iter().enumerate() {
            if s.token_start != next || s.num_tokens == 0 {
                return bad(format!("seq {i}: chunks must be non-empty and laid out in order"));
            }
            next += s.num_tokens;
            if s.context_start != 0 || s.num_tokens != s.prompt_len {
                return bad(format!(
                    "seq {i}: an encoder computes whole prompts (got tokens {}..{} of {})",
                    s.context_start,
                    s.context_start + s.num_tokens,
                    s.prompt_len
                ));
            }
            if s.num_tokens > self.config.max_positions {
                return bad(format!("seq {i}: {} tokens exceed {} positions", s.num_tokens, self.config.max_positions));
            }
            if s.need_logits || s.all_logits {
                return bad(format!("seq {i}: an encoder has no LM head to give logits"));
            }
        }
        if next != batch.tokens.len() {
            return bad(format!("{} tokens, but the chunks cover {next}", batch.tokens.len()));
        }
        if let Some(t) = batch.tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return bad(format!("token {t} is outside the vocabulary of {}", self.config.vocab_size));
        }
        Ok(())
    }
}

impl Forward for Bert {
    fn forward(&self, batch: &ForwardBatch, _kv: &mut KvStorage) -> Result<Logits, ForwardError> {
        self.check(batch)?;
        let rows = batch.hidden_rows();
        if rows.is_empty() {
            return Ok(Logits::new(self.config.vocab_size, Vec::new()));
        }
        let x = self.encode(batch)?;
        let rows: Vec<u32> = rows.into_iter().map(|r| r as u32).collect();
        let picked = x.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?;
        let hidden = picked.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(Logits { vocab_size: self.config.vocab_size, data: Vec::new(), hidden })
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn encoder(&self) -> bool {
        true
    }
}

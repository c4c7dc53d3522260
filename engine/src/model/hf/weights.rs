//! Safetensors checkpoints as a [`TensorSource`]: memory-mapped files, Hugging
//! Face tensor names translated to llama.cpp's, and Q/K rows reordered for the
//! forward pass's RoPE.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::config::{read_json, Fields, HfConfig};
use crate::model::config::Arch as Family;
use crate::model::llama::TensorSource;
use crate::model::{ModelError, WeightDtype};

/// One memory-mapped `.safetensors` file and its parsed header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Where tensor data begins: after the 8-byte length and the JSON header.
    data_start: usize,
    metadata: Metadata,
}

impl Shard {
    fn open(path: PathBuf) -> Result<Self, ModelError> {
        let file = File::open(&path).map_err(|source| ModelError::Read { path: path.clone(), source })?;
        // SAFETY: the mapping is read-only and lives as long as the shard; like
        // every mmap-based loader (transformers, vLLM) this assumes nobody
        // truncates or rewrites the checkpoint while the model loads.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Read { path: path.clone(), source })?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
            .map_err(|source| ModelError::Safetensors { path: path.clone(), source })?;
        Ok(Self { path, mmap, data_start: 8 + header_len, metadata })
    }
}

/// What a GGUF-named tensor is in the checkpoint.
struct Wanted {
    /// The Hugging Face name.
    name: String,
    shape: Vec<usize>,
    /// Runs of Q or K rows to reorder from rotate-half to adjacent-pair
    /// RoPE: `(first row, heads)` each (two runs in Phi-3's fused QKV).
    rope_heads: Vec<(usize, usize)>,
    /// Matrices take [`WeightDtype`]; norms and biases are kept in f32.
    matrix: bool,
    /// Gemma's RMSNorm weights are stored as `w` for a scale of `1 + w`
    /// (its GGUF, and so the forward pass, keeps `1 + w`).
    plus_one: bool,
}

/// A Hugging Face checkpoint's weights, served under llama.cpp's names and
/// layout (see [`TensorSource`]).
pub(super) struct SafetensorsSource {
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`.
    index: HashMap<String, usize>,
    /// Says where the index came from, for errors about missing tensors.
    index_file: PathBuf,
    config: HfConfig,
    dtype: WeightDtype,
}

impl SafetensorsSource {
    /// Maps `model.safetensors.index.json`'s shards, else `model.safetensors`.
    pub fn open(dir: &Path, config: HfConfig, dtype: WeightDtype) -> Result<Self, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        if index_path.is_file() {
            let json = read_json(&index_path)?;
            let f = Fields::new(&index_path, &json)?;
            let map = f
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| f.bad("weight_map", "is missing or not an object"))?;
            let mut shard_of_file: HashMap<&str, usize> = HashMap::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| f.bad("weight_map", format!("maps `{tensor}` to {file}")))?;
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(f.bad("weight_map", format!("maps `{tensor}` to {file:?}, outside the model folder")));
                }
                let shard = match shard_of_file.get(file) {
                    Some(&i) => i,
                    None => {
                        shards.push(Shard::open(dir.join(file))?);
                        shard_of_file.insert(file, shards.len() - 1);
                        shards.len() - 1
                    }
                };
                index.insert(tensor.clone(), shard);
            }
            Ok(Self { shards, index, index_file: index_path, config, dtype })
        } else if single.is_file() {
            let shard = Shard::open(single.clone())?;
            index.extend(shard.metadata.tensors().into_keys().map(|name| (name, 0)));
            shards.push(shard);
            Ok(Self { shards, index, index_file: single, config, dtype })
        } else {
            Err(ModelError::Read {
                path: single,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in the model folder",
                ),
            })
        }
    }

    /// The checkpoint tensor behind a llama.cpp tensor name; `None` for
    /// tensors this model does not have (LM head when tied, biases when not
    /// Qwen2), which are then not looked up at all.
    fn wanted(&self, gguf_name: &str) -> Result<Option<Wanted>, ModelError> {
        let c = &self.config.config;
        let (q_dim, kv_dim, hd) = (c.q_dim(), c.kv_dim(), c.head_dim);
        let gemma = c.arch == Family::Gemma3;
        let plain = |name: String, shape: Vec<usize>, matrix: bool| Wanted {
            name,
            shape,
            rope_heads: Vec::new(),
            matrix,
            plus_one: false,
        };
        let unknown = || ModelError::MissingWeight {
            name: gguf_name.to_string(),
            reason: "no Hugging Face counterpart is known".to_string(),
        };
        let mut wanted = match gguf_name {
            "token_embd.weight" => plain("model.embed_tokens.weight".into(), vec![c.vocab_size, c.hidden], true),
            // Tied models may still store lm_head.weight; transformers ignores it then.
            "output.weight" if self.config.tie_word_embeddings => return Ok(None),
            "output.weight" => plain("lm_head.weight".into(), vec![c.vocab_size, c.hidden], true),
            "output_norm.weight" => plain("model.norm.weight".into(), vec![c.hidden], false),
            _ => {
                let rest = gguf_name.strip_prefix("blk.").ok_or_else(unknown)?;
                let (layer, tensor) = rest.split_once('.').ok_or_else(unknown)?;
                let layer: usize = layer.parse().map_err(|_| unknown())?;
                let p = format!("model.layers.{layer}");
                let bias = self.config.qkv_bias;
                // Gemma norms the MLP's input "pre_feedforward" and calls the
                // norm after attention "post_attention", Llama's MLP-input name.
                let ffn_norm = if gemma { "pre_feedforward_layernorm" } else { "post_attention_layernorm" };
                let mut w = match tensor {
                    "attn_norm.weight" => plain(format!("{p}.input_layernorm.weight"), vec![c.hidden], false),
                    "ffn_norm.weight" => plain(format!("{p}.{ffn_norm}.weight"), vec![c.hidden], false),
                    "post_attention_norm.weight" => {
                        plain(format!("{p}.post_attention_layernorm.weight"), vec![c.hidden], false)
                    }
                    "post_ffw_norm.weight" => {
                        plain(format!("{p}.post_feedforward_layernorm.weight"), vec![c.hidden], false)
                    }
                    "attn_q.weight" => plain(format!("{p}.self_attn.q_proj.weight"), vec![q_dim, c.hidden], true),
                    "attn_k.weight" => plain(format!("{p}.self_attn.k_proj.weight"), vec![kv_dim, c.hidden], true),
                    "attn_v.weight" => plain(format!("{p}.self_attn.v_proj.weight"), vec![kv_dim, c.hidden], true),
                    "attn_qkv.weight" => {
                        plain(format!("{p}.self_attn.qkv_proj.weight"), vec![q_dim + 2 * kv_dim, c.hidden], true)
                    }
                    "attn_q_norm.weight" => plain(format!("{p}.self_attn.q_norm.weight"), vec![hd], false),
                    "attn_k_norm.weight" => plain(format!("{p}.self_attn.k_norm.weight"), vec![hd], false),
                    "attn_output.weight" => plain(format!("{p}.self_attn.o_proj.weight"), vec![c.hidden, q_dim], true),
                    "ffn_gate.weight" => plain(format!("{p}.mlp.gate_proj.weight"), vec![c.ffn, c.hidden], true),
                    "ffn_up.weight" if c.arch == Family::Phi3 => {
                        plain(format!("{p}.mlp.gate_up_proj.weight"), vec![2 * c.ffn, c.hidden], true)
                    }
                    "ffn_up.weight" => plain(format!("{p}.mlp.up_proj.weight"), vec![c.ffn, c.hidden], true),
                    "ffn_down.weight" => plain(format!("{p}.mlp.down_proj.weight"), vec![c.hidden, c.ffn], true),
                    "attn_q.bias" | "attn_k.bias" | "attn_v.bias" if !bias => return Ok(None),
                    "attn_q.bias" => plain(format!("{p}.self_attn.q_proj.bias"), vec![q_dim], false),
                    "attn_k.bias" => plain(format!("{p}.self_attn.k_proj.bias"), vec![kv_dim], false),
                    "attn_v.bias" => plain(format!("{p}.self_attn.v_proj.bias"), vec![kv_dim], false),
                    _ => return Err(unknown()),
                };
                w.rope_heads = match tensor {
                    t if t.starts_with("attn_q.") => vec![(0, c.num_heads)],
                    t if t.starts_with("attn_k.") => vec![(0, c.num_kv_heads)],
                    "attn_qkv.weight" => vec![(0, c.num_heads), (q_dim, c.num_kv_heads)],
                    // One head's worth, shared by every head.
                    "attn_q_norm.weight" | "attn_k_norm.weight" => vec![(0, 1)],
                    _ => Vec::new(),
                };
                w
            }
        };
        wanted.plus_one = gemma && gguf_name.ends_with("norm.weight");
        Ok(Some(wanted))
    }

    /// Reads one checkpoint tensor as f32 values, checking dtype and shape.
    fn read(&self, w: &Wanted) -> Result<(Vec<f32>, Dtype), ModelError> {
        let shard = *self.index.get(&w.name).ok_or_else(|| ModelError::MissingWeight {
            name: w.name.clone(),
            reason: format!("{} does not list it", self.index_file.display()),
        })?;
        let shard = &self.shards[shard];
        let bad = |reason: String| ModelError::BadWeight { name: w.name.clone(), path: shard.path.clone(), reason };
        let info = shard.metadata.info(&w.name).ok_or_else(|| ModelError::MissingWeight {
            name: w.name.clone(),
            reason: format!(
                "{} maps it to {}, which does not hold it",
                self.index_file.display(),
                shard.path.display()
            ),
        })?;
        if info.shape != w.shape {
            return Err(bad(format!("has shape {:?}, expected {:?}", info.shape, w.shape)));
        }
        let (start, end) = info.data_offsets;
        // read_metadata checked that the offsets fit the file and the shape.
        let bytes = &shard.mmap[shard.data_start + start..shard.data_start + end];
        let values = match info.dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => return Err(bad(format!("has dtype {other:?} (supported: F32, F16, BF16)"))),
        };
        Ok((values, info.dtype))
    }
}

impl TensorSource for SafetensorsSource {
    fn tensor(&mut self, name: &str) -> Result<Option<QTensor>, ModelError> {
        let Some(w) = self.wanted(name)? else { return Ok(None) };
        let (mut values, stored) = self.read(&w)?;
        let cols = values.len() / w.shape[0];
        let head_dim = self.config.config.head_dim;
        for &(first, heads) in &w.rope_heads {
            let run = &mut values[first * cols..(first + heads * head_dim) * cols];
            let permuted = rotate_half_to_adjacent_pairs(run, heads, head_dim, cols);
            run.copy_from_slice(&permuted);
        }
        if w.plus_one {
            values.iter_mut().for_each(|v| *v += 1.0);
        }
        let ggml = if w.matrix {
            match self.dtype {
                WeightDtype::Auto => match stored {
                    Dtype::F16 => GgmlDType::F16,
                    Dtype::BF16 => GgmlDType::BF16,
                    _ => GgmlDType::F32,
                },
                WeightDtype::F32 => GgmlDType::F32,
                WeightDtype::F16 => GgmlDType::F16,
                WeightDtype::BF16 => GgmlDType::BF16,
            }
        } else {
            // Norms and biases are tiny; f32 holds any stored value exactly.
            GgmlDType::F32
        };
        // The values came from (or round to) `ggml`, so storing them is exact
        // or the one rounding that the requested dtype asks for.
        let tensor = Tensor::from_vec(values, w.shape.as_slice(), &Device::Cpu)?;
        Ok(Some(QTensor::quantize(&tensor, ggml)?))
    }
}

/// Reorders the rows of a Q or K projection (or bias, `cols` = 1) from
/// Hugging Face's rotate-half RoPE layout, where a head's rotated pairs are
/// rows `(i, i + head_dim / 2)`, to llama.cpp's, where they are `(2i, 2i + 1)`.
/// This is the `permute` of llama.cpp's `convert_hf_to_gguf.py`: per head,
/// view the rows as `[2, head_dim / 2]` and transpose.
fn rotate_half_to_adjacent_pairs(values: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    debug_assert_eq!(values.len(), heads * head_dim * cols);
    let half = head_dim / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let dst = h * head_dim + 2 * i + j;
                let src = h * head_dim + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_pairs_become_adjacent_rows() {
        // Two heads of dimension 4, two columns: head rows (0, 2) and (1, 3)
        // are rotated together, and must end up next to each other.
        let rows: Vec<f32> = (0..8).flat_map(|r| [r as f32, 10.0 * r as f32]).collect();
        let out = rotate_half_to_adjacent_pairs(&rows, 2, 4, 2);
        let order: Vec<f32> = out.chunks(2).map(|r| r[0]).collect();
        assert_eq!(order, [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
        assert!(out.chunks(2).all(|r| r[1] == 10.0 * r[0]), "rows move whole");
    }
}

//! The Llama forward pass over a paged KV cache.
//!
//! Llama (Touvron et al., 2023) as llama.cpp runs its `llama` GGUF
//! architecture: pre-norm RMSNorm blocks, grouped-query attention with
//! "normal" (adjacent-pair) RoPE, a SiLU-gated MLP, and an LM head tied to
//! the token embedding when the file has no `output.weight`.
//!
//! Every token of a step, whatever its sequence, goes through each projection
//! as one matrix; only attention runs per token, over its own sequence's
//! blocks. Weights are read-only, so one `Llama` serves many steps via `&self`.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use candle_nn::ops::{rms_norm, silu};

use super::attention::{paged_attention, Dims, Rope, TokenSlot};
use super::{Config, ModelError};
use crate::batch::{Forward, ForwardBatch, ForwardError, Logits};
use crate::kv_cache::{KvCacheShape, KvStorage};

/// How [`Proj::stacked`] stores weights; see [`super::LoadOptions`].
#[derive(Clone, Copy)]
struct ProjOptions {
    dense: bool,
    q4_1_to_q8_0: bool,
}

/// A weight matrix `[out, in]`, multiplied as `x @ w^T`.
struct Proj {
    quantized: QMatMul,
    /// The same weights dequantized, for steps with many rows.
    dense: Option<Tensor>,
}

impl Proj {
    /// Stacks the parts' rows into one matrix, so one call computes them all
    /// (Q, K and V; gate and up).
    fn stacked(parts: Vec<QTensor>, opts: ProjOptions) -> Result<Self, ModelError> {
        let cols = parts[0].shape().dims2()?.1;
        let dtype = parts[0].dtype();
        let same_dtype = parts.iter().all(|p| p.dtype() == dtype);
        let quantized = if parts.len() == 1 {
            QMatMul::from_qtensor(parts.into_iter().next().expect("one part"))?
        } else if same_dtype && dtype != GgmlDType::F32 {
            // Quantized rows are self-contained runs of blocks, so stacking
            // rows is concatenating bytes.
            let rows: usize = parts.iter().map(|p| p.shape().dims2().map(|d| d.0)).sum::<Result<_, _>>()?;
            let mut bytes = Vec::new();
            for p in &parts {
                bytes.extend_from_slice(&p.data()?);
            }
            let storage = QStorage::from_data(bytes.into(), &Device::Cpu, dtype)?;
            QMatMul::from_qtensor(QTensor::new(storage, (rows, cols))?)?
        } else {
            let parts = parts.iter().map(|p| p.dequantize(&Device::Cpu)).collect::<Result<Vec<_>, _>>()?;
            QMatMul::Tensor(Tensor::cat(&parts, 0)?)
        };
        let dense = match (&quantized, opts.dense) {
            (QMatMul::QTensor(q), true) => Some(q.dequantize(&Device::Cpu)?),
            _ => None,
        };
        let quantized = match quantized {
            // candle's Q4_1 dot product is a scalar loop while Q8_0 has AVX
            // kernels; Q8_0 holds every Q4_1 value to within 1/254 of its
            // block's range, far below the Q4_1 rounding already there.
            QMatMul::QTensor(q) if opts.q4_1_to_q8_0 && q.dtype() == GgmlDType::Q4_1 => {
                let w = match &dense {
                    Some(w) => w.clone(),
                    None => q.dequantize(&Device::Cpu)?,
                };
                QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0)?)?
            }
            other => other,
        };
        Ok(Self { quantized, dense })
    }

    /// `x @ w^T`, each run of rows with the weights its [`RowRun`] names.
    fn forward(&self, x: &Tensor, runs: &[RowRun]) -> candle_core::Result<Tensor> {
        let apply = |x: &Tensor, dense: bool| match (&self.dense, dense) {
            (Some(w), true) => x.matmul(&w.t()?),
            _ => self.quantized.forward(x),
        };
        match runs {
            [one] => apply(x, one.dense),
            _ => {
                let parts = runs
                    .iter()
                    .map(|r| apply(&x.narrow(0, r.start, r.len)?, r.dense))
                    .collect::<Result<Vec<_>, _>>()?;
                Tensor::cat(&parts, 0)
            }
        }
    }
}

/// Consecutive rows of a step that share one weight path. Prompt tokens take
/// the f32 weights (measured on the 2-core dev box: about twice the Q8_0
/// kernels' speed at 128 rows, slower at 8), generated tokens the quantized
/// kernels. The choice depends only on the token, never on its neighbours, so
/// a sequence computes the same numbers alone, batched, chunked or recomputed
/// after preemption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RowRun {
    start: usize,
    len: usize,
    dense: bool,
}

impl RowRun {
    fn plan(batch: &ForwardBatch, f32_prefill: bool) -> Vec<RowRun> {
        let mut runs: Vec<RowRun> = Vec::new();
        for s in &batch.seqs {
            // Rows of this chunk below the prompt end are prompt rows.
            let prompt_rows = s.prompt_len.saturating_sub(s.context_start).min(s.num_tokens);
            let parts = [(0, prompt_rows, f32_prefill), (prompt_rows, s.num_tokens - prompt_rows, false)];
            for (offset, len, dense) in parts.into_iter().filter(|p| p.1 > 0) {
                let start = s.token_start + offset;
                match runs.last_mut() {
                    Some(r) if r.dense == dense && r.start + r.len == start => r.len += len,
                    _ => runs.push(RowRun { start, len, dense }),
                }
            }
        }
        runs
    }
}

struct Layer {
    attn_norm: Tensor,
    /// Q, K and V stacked: `[hidden + 2 * kv_dim, hidden]`.
    qkv: Proj,
    attn_output: Proj,
    ffn_norm: Tensor,
    /// Gate and up stacked: `[2 * ffn, hidden]`.
    gate_up: Proj,
    down: Proj,
}

/// Llama weights and the forward pass. See the module docs.
pub struct Llama {
    config: Config,
    token_embd: Arc<QTensor>,
    layers: Vec<Layer>,
    output_norm: Tensor,
    lm_head: QMatMul,
    f32_prefill: bool,
}

/// Reads tensors by name, checking their shapes.
struct Loader<'a, R> {
    content: &'a Content,
    reader: &'a mut R,
}

impl<R: Read + Seek> Loader<'_, R> {
    fn get(&mut self, name: &str, expected: &[usize]) -> Result<QTensor, ModelError> {
        if !self.content.tensor_infos.contains_key(name) {
            return Err(ModelError::MissingTensor(name.to_string()));
        }
        let t = self.content.tensor(self.reader, name, &Device::Cpu)?;
        if t.shape().dims() != expected {
            return Err(ModelError::BadShape {
                name: name.to_string(),
                got: t.shape().dims().to_vec(),
                expected: expected.to_vec(),
            });
        }
        Ok(t)
    }

    fn dense(&mut self, name: &str, expected: &[usize]) -> Result<Tensor, ModelError> {
        Ok(self.get(name, expected)?.dequantize(&Device::Cpu)?)
    }
}

impl Llama {
    /// Reads the weights that `config` describes. `f32_prefill` and
    /// `q4_1_to_q8_0`: see [`super::LoadOptions`].
    pub(crate) fn load<R: Read + Seek>(
        content: &Content,
        reader: &mut R,
        config: Config,
        f32_prefill: bool,
        q4_1_to_q8_0: bool,
    ) -> Result<Self, ModelError> {
        let c = &config;
        let (hidden, kv_dim) = (c.hidden, c.num_kv_heads * c.head_dim);
        let dense = ProjOptions { dense: f32_prefill, q4_1_to_q8_0 };
        let mut ld = Loader { content, reader };
        let token_embd = Arc::new(ld.get("token_embd.weight", &[c.vocab_size, hidden])?);
        // Small Llamas tie the LM head to the embedding and ship no output.weight.
        let lm_head = if content.tensor_infos.contains_key("output.weight") {
            QMatMul::from_qtensor(ld.get("output.weight", &[c.vocab_size, hidden])?)?
        } else {
            QMatMul::from_arc(token_embd.clone())?
        };
        let output_norm = ld.dense("output_norm.weight", &[hidden])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            let q = ld.get(&name("attn_q"), &[hidden, hidden])?;
            let k = ld.get(&name("attn_k"), &[kv_dim, hidden])?;
            let v = ld.get(&name("attn_v"), &[kv_dim, hidden])?;
            let gate = ld.get(&name("ffn_gate"), &[c.ffn, hidden])?;
            let up = ld.get(&name("ffn_up"), &[c.ffn, hidden])?;
            layers.push(Layer {
                attn_norm: ld.dense(&name("attn_norm"), &[hidden])?,
                qkv: Proj::stacked(vec![q, k, v], dense)?,
                attn_output: Proj::stacked(vec![ld.get(&name("attn_output"), &[hidden, hidden])?], dense)?,
                ffn_norm: ld.dense(&name("ffn_norm"), &[hidden])?,
                gate_up: Proj::stacked(vec![gate, up], dense)?,
                down: Proj::stacked(vec![ld.get(&name("ffn_down"), &[hidden, c.ffn])?], dense)?,
            });
        }
        Ok(Self { config, token_embd, layers, output_norm, lm_head, f32_prefill })
    }

    /// The resolved model shape.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The KV cache shape this model needs for the given paging.
    pub fn kv_shape(&self, block_size: usize, num_blocks: usize) -> KvCacheShape {
        KvCacheShape {
            num_layers: self.config.num_layers,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
            block_size,
            num_blocks,
        }
    }

    /// Rejects batches that would index outside the cache or the vocabulary.
    fn check(&self, batch: &ForwardBatch, kv: &KvStorage) -> Result<(), ForwardError> {
        let bad = |m: String| Err(ForwardError::InvalidBatch(m));
        let shape = kv.shape();
        let want = self.kv_shape(shape.block_size, shape.num_blocks);
        if *shape != want || shape.block_size == 0 {
            return bad(format!("KV cache shape {shape:?} does not fit the model (expected {want:?})"));
        }
        let mut next = 0;
        for (i, s) in batch.seqs.iter().enumerate() {
            if s.token_start != next || s.num_tokens == 0 {
                return bad(format!(
                    "seq {i}: chunks must be non-empty and laid out in order (token_start {}, expected {next}, num_tokens {})",
                    s.token_start, s.num_tokens
                ));
            }
            next += s.num_tokens;
            let end = s.context_start + s.num_tokens;
            if end > self.config.context_length {
                return bad(format!("seq {i}: {end} tokens exceed the context length {}", self.config.context_length));
            }
            let blocks = end.div_ceil(shape.block_size);
            if s.block_table.len() < blocks {
                return bad(format!(
                    "seq {i}: block table has {} blocks, {end} tokens need {blocks}",
                    s.block_table.len()
                ));
            }
            if let Some(b) = s.block_table[..blocks].iter().find(|&&b| b as usize >= shape.num_blocks) {
                return bad(format!("seq {i}: block id {b} out of range ({} blocks)", shape.num_blocks));
            }
        }
        if next != batch.tokens.len() {
            return bad(format!("chunks cover {next} tokens, the batch has {}", batch.tokens.len()));
        }
        if let Some(t) = batch.tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return bad(format!("token id {t} outside the vocabulary of {}", self.config.vocab_size));
        }
        Ok(())
    }
}

impl Forward for Llama {
    fn forward(&self, batch: &ForwardBatch, kv: &mut KvStorage) -> Result<Logits, ForwardError> {
        self.check(batch, kv)?;
        let c = &self.config;
        let vocab_size = c.vocab_size;
        let n = batch.tokens.len();
        if n == 0 {
            return Ok(Logits { vocab_size, data: Vec::new() });
        }
        let dev = Device::Cpu;
        let runs = RowRun::plan(batch, self.f32_prefill);
        let (q_dim, kv_dim) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let qkv_dim = q_dim + 2 * kv_dim;
        let dims = Dims {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            block_size: kv.shape().block_size,
        };
        let slots: Vec<TokenSlot> = batch
            .seqs
            .iter()
            .flat_map(|s| {
                (0..s.num_tokens).map(move |i| TokenSlot { block_table: &s.block_table, position: s.context_start + i })
            })
            .collect();
        let positions: Vec<usize> = slots.iter().map(|s| s.position).collect();
        let rope = Rope::new(&positions, c.head_dim, c.rope_theta);

        let ids = Tensor::from_slice(&batch.tokens, n, &dev)?;
        let mut x = self.token_embd.embedding(&ids)?;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let mut qkv = layer.qkv.forward(&h, &runs)?.flatten_all()?.to_vec1::<f32>()?;
            let (k_cache, v_cache) = kv.layer_mut(l);
            // Write the whole step's K/V first: a prefill token attends to the
            // tokens of its own chunk too.
            for (t, row) in qkv.chunks_exact_mut(qkv_dim).enumerate() {
                let (q, kv_row) = row.split_at_mut(q_dim);
                let (k, v) = kv_row.split_at_mut(kv_dim);
                rope.apply(t, q);
                rope.apply(t, k);
                dims.store(k_cache, v_cache, &slots[t], k, v);
            }
            let mut attn = vec![0.0f32; n * q_dim];
            paged_attention(dims, &slots, &qkv, qkv_dim, k_cache, v_cache, &mut attn);
            let attn = Tensor::from_vec(attn, (n, q_dim), &dev)?;
            x = (x + layer.attn_output.forward(&attn, &runs)?)?;

            let h = rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gate_up = layer.gate_up.forward(&h, &runs)?;
            let gate = gate_up.narrow(1, 0, c.ffn)?;
            let up = gate_up.narrow(1, c.ffn, c.ffn)?;
            let act = (silu(&gate)? * up)?;
            x = (x + layer.down.forward(&act, &runs)?)?;
        }

        let last: Vec<u32> =
            batch.seqs.iter().filter(|s| s.need_logits).map(|s| (s.token_start + s.num_tokens - 1) as u32).collect();
        if last.is_empty() {
            return Ok(Logits { vocab_size, data: Vec::new() });
        }
        let rows = last.len();
        let x = x.index_select(&Tensor::from_vec(last, rows, &dev)?, 0)?;
        let x = rms_norm(&x, &self.output_norm, c.rms_eps)?;
        let data = self.lm_head.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(Logits { vocab_size, data })
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_rows_take_f32_and_generated_rows_the_quantized_kernels() {
        let mut batch = ForwardBatch::default();
        batch.push(&[1], 5, 5, vec![0], true); // decode
        batch.push(&[2], 7, 3, vec![1], true); // decode
        batch.push(&[3; 20], 0, 20, vec![2, 3], true); // a whole prompt
        batch.push(&[4; 3], 4, 7, vec![4], true); // a prompt's last chunk
        batch.push(&[5; 6], 0, 4, vec![5], true); // recompute: 4 prompt rows, 2 generated
        let run = |start, len, dense| RowRun { start, len, dense };
        assert_eq!(RowRun::plan(&batch, true), vec![run(0, 2, false), run(2, 27, true), run(29, 2, false)]);
        assert_eq!(RowRun::plan(&batch, false), vec![run(0, 31, false)]);
    }
}

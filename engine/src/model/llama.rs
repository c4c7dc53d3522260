//! The Llama forward pass over a paged KV cache, and the families that are
//! Llama with a few changes ([`super::Arch`]).
//!
//! Llama (Touvron et al., 2023) as llama.cpp runs its `llama` GGUF
//! architecture: pre-norm RMSNorm blocks, grouped-query attention with
//! "normal" (adjacent-pair) RoPE, a SiLU-gated MLP, and an LM head tied to
//! the token embedding when the file has no `output.weight`. Qwen2 adds
//! Q/K/V biases; Qwen3 a per-head RMSNorm of Q and K and a head size of its
//! own; Phi-3 stores Q/K/V and gate/up fused; Gemma 3 adds the Q/K norms,
//! norms after attention and the MLP, GeGLU, an embedding scaled by
//! `sqrt(hidden)` and local sliding-window layers with their own RoPE base.
//! Their GGUF files keep Q/K rows in NeoX order (rotating halves); the
//! loader permutes them to adjacent pairs, so one RoPE serves all.
//!
//! Every token of a step, whatever its sequence, goes through each projection
//! as one matrix (quantized weights through [`super::kernels`], so a decode
//! step reads each weight once however many sequences it carries); only
//! attention runs per token, over its own sequence's blocks. A row's result
//! never depends on what else is in the step. Weights are read-only, so one
//! `Llama` serves many steps via `&self`.

use std::io::{Read, Seek};
use std::sync::Arc;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::QTensor;
use candle_core::Device;
use rayon::prelude::*;

use super::attention::{paged_attention, Dims, Rope, TokenSlot};
use super::config::Activation;
use super::linear::{Dequantized, Linear, Scratch};
use super::vmath::{gelu_tanh_mul, silu_mul};
use super::{Config, ModelError};
use crate::comm::Communicator;
use crate::forward::{Forward, ForwardBatch, ForwardError, Logits};
use crate::kv::cache::{KvCacheShape, KvStorage};

pub(super) struct Layer {
    pub attn_norm: Vec<f32>,
    /// Q, K and V stacked: `[q_dim + 2 * kv_dim, hidden]`.
    pub qkv: Linear,
    /// Q, K and V biases stacked (Qwen2 has them, Llama not).
    pub qkv_bias: Option<Vec<f32>>,
    /// RMSNorm weights of each query and each key head (`head_dim` each;
    /// Qwen3, Gemma 3).
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    pub attn_output: Linear,
    /// Norm of attention's output before the residual add (Gemma 3).
    pub post_attn_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    /// Gate and up stacked: `[2 * ffn, hidden]`.
    pub gate_up: Linear,
    pub down: Linear,
    /// Norm of the MLP's output before the residual add (Gemma 3).
    pub post_ffn_norm: Option<Vec<f32>>,
}

/// Llama weights and the forward pass. See the module docs.
pub struct Llama {
    config: Config,
    pub(super) token_embd: Arc<Linear>,
    pub(super) layers: Vec<Layer>,
    pub(super) output_norm: Vec<f32>,
    /// The embedding itself when the model ties them.
    pub(super) lm_head: Arc<Linear>,
    /// The KV cache layer of its first layer: 0, or a draft model's place after its target's
    /// layers in the blocks they share (see [`Llama::after_kv_layers`]).
    first_kv_layer: usize,
}

/// Where [`Llama::load`] gets its weights: tensors named as in llama.cpp's
/// GGUF files (`token_embd.weight`, `blk.N.attn_q.weight`, ...), laid out as
/// there (Q and K rows ordered for adjacent-pair RoPE). GGUF files are read as
/// they are; other formats translate names and layout to this.
pub(crate) trait TensorSource {
    /// The tensor called `name`, or `None` when the model has none.
    fn tensor(&mut self, name: &str) -> Result<Option<QTensor>, ModelError>;

    /// Whether Q/K rows (and their biases and norms) are in NeoX order,
    /// each head's first half then its second, and need permuting to
    /// adjacent pairs.
    fn neox_rows(&self) -> bool {
        false
    }
}

/// Reads tensors by name, checking their shapes.
struct Loader<'a> {
    source: &'a mut dyn TensorSource,
}

impl Loader<'_> {
    fn opt(&mut self, name: &str, expected: &[usize]) -> Result<Option<QTensor>, ModelError> {
        let Some(t) = self.source.tensor(name)? else { return Ok(None) };
        if t.shape().dims() != expected {
            return Err(ModelError::BadShape {
                name: name.to_string(),
                got: t.shape().dims().to_vec(),
                expected: expected.to_vec(),
            });
        }
        Ok(Some(t))
    }

    fn get(&mut self, name: &str, expected: &[usize]) -> Result<QTensor, ModelError> {
        self.opt(name, expected)?.ok_or_else(|| ModelError::MissingTensor(name.to_string()))
    }

    fn vector(&mut self, name: &str, expected: &[usize]) -> Result<Vec<f32>, ModelError> {
        Ok(self.get(name, expected)?.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// A GGUF file's tensors, read on demand.
pub(crate) struct GgufSource<'a, R> {
    pub content: &'a Content,
    pub reader: &'a mut R,
    /// The file's architecture, which says how its Q/K rows are ordered.
    pub arch: super::Arch,
}

impl<R: Read + Seek> TensorSource for GgufSource<'_, R> {
    fn tensor(&mut self, name: &str) -> Result<Option<QTensor>, ModelError> {
        if !self.content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        Ok(Some(self.content.tensor(self.reader, name, &Device::Cpu)?))
    }

    fn neox_rows(&self) -> bool {
        self.arch.neox_rope()
    }
}

/// For each head of `head_dim` rows in `rows`, its rows in adjacent-pair
/// order: `i` and `i + head_dim / 2` side by side.
fn adjacent_pairs(rows: std::ops::Range<usize>, head_dim: usize) -> Vec<std::ops::Range<usize>> {
    let half = head_dim / 2;
    rows.step_by(head_dim).flat_map(|h| (0..half).flat_map(move |i| [h + i, h + i + half])).map(|r| r..r + 1).collect()
}

/// `values` (whole heads of `head_dim`) in adjacent-pair order.
fn permute_values(values: &[f32], head_dim: usize) -> Vec<f32> {
    adjacent_pairs(0..values.len(), head_dim).into_iter().map(|r| values[r.start]).collect()
}

impl Llama {
    /// Reads the weights that `config` describes.
    pub(crate) fn load(source: &mut dyn TensorSource, config: Config) -> Result<Self, ModelError> {
        let c = &config;
        let (hidden, q_dim, kv_dim, hd) = (c.hidden, c.q_dim(), c.kv_dim(), c.head_dim);
        let neox = source.neox_rows();
        let mut ld = Loader { source };
        let mut dequantized = Dequantized::default();
        let mut linear = |parts: Vec<QTensor>| Linear::stacked(parts, &mut dequantized);
        let token_embd = Arc::new(linear(vec![ld.get("token_embd.weight", &[c.vocab_size, hidden])?])?);
        // Small Llamas tie the LM head to the embedding and ship no output.weight.
        let lm_head = match ld.opt("output.weight", &[c.vocab_size, hidden])? {
            Some(w) => Arc::new(linear(vec![w])?),
            None => token_embd.clone(),
        };
        let output_norm = ld.vector("output_norm.weight", &[hidden])?;
        // Q and K rows, and their biases and norms, in adjacent-pair order.
        let qk_rows = [adjacent_pairs(0..q_dim, hd), adjacent_pairs(q_dim..q_dim + kv_dim, hd)].concat();
        let v_rows = q_dim + kv_dim..q_dim + 2 * kv_dim;
        let qkv_order: Vec<_> = qk_rows.iter().cloned().chain(std::iter::once(v_rows)).collect();
        let reorder = |values: Vec<f32>| if neox { permute_values(&values, hd) } else { values };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let name = |t: &str| format!("blk.{i}.{t}.weight");
            // Phi-3 stores Q/K/V in one matrix, and gate and up (gate first).
            let fused = c.arch == super::Arch::Phi3;
            let mut qkv = match fused {
                true => linear(vec![ld.get(&name("attn_qkv"), &[q_dim + 2 * kv_dim, hidden])?])?,
                false => linear(vec![
                    ld.get(&name("attn_q"), &[q_dim, hidden])?,
                    ld.get(&name("attn_k"), &[kv_dim, hidden])?,
                    ld.get(&name("attn_v"), &[kv_dim, hidden])?,
                ])?,
            };
            let gate_up = match fused {
                true => linear(vec![ld.get(&name("ffn_up"), &[2 * c.ffn, hidden])?])?,
                false => linear(vec![
                    ld.get(&name("ffn_gate"), &[c.ffn, hidden])?,
                    ld.get(&name("ffn_up"), &[c.ffn, hidden])?,
                ])?,
            };
            let bias = |t: &str| format!("blk.{i}.{t}.bias");
            let biases = [
                ld.opt(&bias("attn_q"), &[q_dim])?,
                ld.opt(&bias("attn_k"), &[kv_dim])?,
                ld.opt(&bias("attn_v"), &[kv_dim])?,
            ];
            let mut qkv_bias = match biases {
                [None, None, None] => None,
                [Some(q), Some(k), Some(v)] => {
                    let mut all = Vec::with_capacity(q_dim + 2 * kv_dim);
                    for b in [q, k, v] {
                        all.extend(b.dequantize(&Device::Cpu)?.to_vec1::<f32>()?);
                    }
                    Some(all)
                }
                _ => return Err(ModelError::MissingTensor(format!("blk.{i}.attn_{{q,k,v}}.bias (some but not all)"))),
            };
            if neox {
                qkv = qkv.select_rows(&qkv_order)?;
                qkv_bias = qkv_bias.map(|b| qkv_order.iter().flat_map(|r| &b[r.clone()]).copied().collect());
            }
            let qk_norm = match c.arch.qk_norm() {
                true => Some((
                    reorder(ld.vector(&name("attn_q_norm"), &[hd])?),
                    reorder(ld.vector(&name("attn_k_norm"), &[hd])?),
                )),
                false => None,
            };
            let post_norms = c.arch.post_norms();
            layers.push(Layer {
                qkv_bias,
                qk_norm,
                attn_norm: ld.vector(&name("attn_norm"), &[hidden])?,
                qkv,
                attn_output: linear(vec![ld.get(&name("attn_output"), &[hidden, q_dim])?])?,
                post_attn_norm: post_norms.then(|| ld.vector(&name("post_attention_norm"), &[hidden])).transpose()?,
                ffn_norm: ld.vector(&name("ffn_norm"), &[hidden])?,
                gate_up,
                down: linear(vec![ld.get(&name("ffn_down"), &[hidden, c.ffn])?])?,
                post_ffn_norm: post_norms.then(|| ld.vector(&name("post_ffw_norm"), &[hidden])).transpose()?,
            });
        }
        dequantized.log();
        Ok(Self { config, token_embd, layers, output_norm, lm_head, first_kv_layer: 0 })
    }

    /// Rank `rank`'s shard of `world_size` (Megatron-style tensor
    /// parallelism): its share of the query and KV heads (the rows of Q, K
    /// and V, column-parallel) and of the MLP (the rows of gate and up), and
    /// the matching input columns of the output and down projections
    /// (row-parallel: each rank's product is a partial sum that
    /// [`crate::forward::RankModel::forward_rank`] all-reduces). Norms, the embedding and the LM
    /// head stay whole on every rank: the LM head is 28 M of the model's
    /// 135 M parameters, and replicating it costs no collective per step,
    /// where a vocab-parallel head would gather 49,152 logits per row.
    pub fn shard(&self, rank: usize, world_size: usize) -> Result<Self, ModelError> {
        let c = &self.config;
        let w = world_size;
        let divides =
            w > 0 && c.num_heads.is_multiple_of(w) && c.num_kv_heads.is_multiple_of(w) && c.ffn.is_multiple_of(w);
        if !divides {
            return Err(ModelError::TensorParallel(format!(
                "{} heads / {} KV heads / {} MLP columns do not divide by tensor-parallel size {w}",
                c.num_heads, c.num_kv_heads, c.ffn
            )));
        }
        assert!(rank < w, "rank {rank} of {w}");
        let (hd, heads, kv_heads, ffn) = (c.head_dim, c.num_heads / w, c.num_kv_heads / w, c.ffn / w);
        let (q_dim, kv_dim) = (c.num_heads * hd, c.num_kv_heads * hd);
        let q = rank * heads * hd..(rank + 1) * heads * hd;
        let k = q_dim + rank * kv_heads * hd..q_dim + (rank + 1) * kv_heads * hd;
        let v = k.start + kv_dim..k.end + kv_dim;
        let (gate, up) = (rank * ffn..(rank + 1) * ffn, c.ffn + rank * ffn..c.ffn + (rank + 1) * ffn);
        let split = |e: candle_core::Error| ModelError::TensorParallel(format!("size {w}: {e}"));
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let qkv_rows = [q.clone(), k.clone(), v.clone()];
                Ok(Layer {
                    attn_norm: l.attn_norm.clone(),
                    qkv: l.qkv.select_rows(&qkv_rows).map_err(split)?,
                    qkv_bias: l
                        .qkv_bias
                        .as_ref()
                        .map(|b| qkv_rows.iter().flat_map(|r| &b[r.clone()]).copied().collect()),
                    qk_norm: l.qk_norm.clone(),
                    attn_output: l.attn_output.select_cols(q.clone()).map_err(split)?,
                    post_attn_norm: l.post_attn_norm.clone(),
                    ffn_norm: l.ffn_norm.clone(),
                    gate_up: l.gate_up.select_rows(&[gate.clone(), up.clone()]).map_err(split)?,
                    down: l.down.select_cols(gate.clone()).map_err(split)?,
                    post_ffn_norm: l.post_ffn_norm.clone(),
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let config = Config { num_heads: heads, num_kv_heads: kv_heads, ffn, ..self.config.clone() };
        Ok(Self {
            config,
            token_embd: self.token_embd.clone(),
            layers,
            output_norm: self.output_norm.clone(),
            lm_head: self.lm_head.clone(),
            first_kv_layer: self.first_kv_layer,
        })
    }

    /// The model with its KV in cache layers `layers..`: a draft model's, after the `layers` of
    /// the target whose blocks it shares.
    pub fn after_kv_layers(self, layers: usize) -> Self {
        Self { first_kv_layer: layers, ..self }
    }

    /// The KV cache layers this model reads and writes.
    pub fn kv_layers(&self) -> std::ops::Range<usize> {
        self.first_kv_layer..self.first_kv_layer + self.config.num_layers
    }

    /// The resolved model shape.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The KV cache shape this model needs for the given paging.
    pub fn kv_shape(&self, block_size: usize, num_blocks: usize) -> KvCacheShape {
        kv_shape(&self.config, block_size, num_blocks)
    }

    /// Rejects batches that would index outside the cache or the vocabulary.
    pub(crate) fn check(&self, batch: &ForwardBatch, kv: &KvStorage) -> Result<(), ForwardError> {
        check_batch(&self.config, self.kv_layers(), batch, kv)
    }
}

/// Rejects batches that would index outside the cache or the vocabulary of a
/// model of shape `config` whose KV is in cache layers `kv_layers` (the cache may hold more: a
/// draft model's after its target's).
pub(super) fn check_batch(
    config: &Config,
    kv_layers: std::ops::Range<usize>,
    batch: &ForwardBatch,
    kv: &KvStorage,
) -> Result<(), ForwardError> {
    let bad = |m: String| Err(ForwardError::InvalidBatch(m));
    let shape = kv.shape();
    let want = KvCacheShape { num_layers: shape.num_layers, ..kv_shape(config, shape.block_size, shape.num_blocks) };
    if *shape != want || shape.block_size == 0 || shape.num_layers < kv_layers.end {
        return bad(format!(
            "KV cache shape {shape:?} does not fit the model (expected {want:?} with layers {kv_layers:?})"
        ));
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
        if end > config.context_length {
            return bad(format!("seq {i}: {end} tokens exceed the context length {}", config.context_length));
        }
        let blocks = end.div_ceil(shape.block_size);
        if s.block_table.len() < blocks {
            return bad(format!("seq {i}: block table has {} blocks, {end} tokens need {blocks}", s.block_table.len()));
        }
        if let Some(b) = s.block_table[..blocks].iter().find(|&&b| b as usize >= shape.num_blocks) {
            return bad(format!("seq {i}: block id {b} out of range ({} blocks)", shape.num_blocks));
        }
    }
    if next != batch.tokens.len() {
        return bad(format!("chunks cover {next} tokens, the batch has {}", batch.tokens.len()));
    }
    if let Some(t) = batch.tokens.iter().find(|&&t| t as usize >= config.vocab_size) {
        return bad(format!("token id {t} outside the vocabulary of {}", config.vocab_size));
    }
    Ok(())
}

/// The KV cache shape a model of shape `config` needs for the given paging.
pub(super) fn kv_shape(config: &Config, block_size: usize, num_blocks: usize) -> KvCacheShape {
    KvCacheShape {
        num_layers: config.num_layers,
        num_kv_heads: config.num_kv_heads,
        head_dim: config.head_dim,
        block_size,
        num_blocks,
    }
}

impl crate::forward::RankModel for Llama {
    fn check(&self, batch: &ForwardBatch, kv: &KvStorage) -> Result<(), ForwardError> {
        Llama::check(self, batch, kv)
    }

    /// One step of a [`Llama::shard`] on its rank's thread (not inside the
    /// thread pool: the collectives wait for the other ranks), with its own
    /// KV cache of its heads.
    fn forward_rank(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvStorage,
        comm: &dyn Communicator,
    ) -> Result<Logits, ForwardError> {
        self.step(batch, kv, Some(comm), true)
    }

    fn follow_rank(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvStorage,
        comm: &dyn Communicator,
    ) -> Result<(), ForwardError> {
        self.step(batch, kv, Some(comm), false).map(drop)
    }

    fn kv_shape(&self, block_size: usize, num_blocks: usize) -> KvCacheShape {
        Llama::kv_shape(self, block_size, num_blocks)
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
}

impl Forward for Llama {
    fn forward(&self, batch: &ForwardBatch, kv: &mut KvStorage) -> Result<Logits, ForwardError> {
        // Run the step on a rayon worker, with the others polling for work: each of its
        // ~150 parallel products then forks from inside the pool to workers already awake,
        // instead of waking the pool from outside and sleeping on a latch every time (tens of
        // microseconds each).
        super::awake::with_workers_awake(|| self.step(batch, kv, None, true))
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn waits_for_layers(&self) -> bool {
        true
    }
}

impl Llama {
    /// Writes the KV of the batch's tokens and returns nothing: a draft model keeping up with
    /// its target (see [`super::Drafted`]).
    pub(crate) fn fill_kv(&self, batch: &ForwardBatch, kv: &mut KvStorage) -> Result<(), ForwardError> {
        super::awake::with_workers_awake(|| self.step(batch, kv, None, false)).map(drop)
    }

    /// One step; a shard's partial sums are all-reduced through `comm`.
    /// Without `logits`, the step ends at the last layer (empty logits).
    fn step(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvStorage,
        comm: Option<&dyn Communicator>,
        logits: bool,
    ) -> Result<Logits, ForwardError> {
        self.check(batch, kv)?;
        let c = &self.config;
        let vocab_size = c.vocab_size;
        let n = batch.tokens.len();
        if n == 0 {
            return Ok(Logits::new(vocab_size, Vec::new()));
        }
        let (hidden, ffn, hd) = (c.hidden, c.ffn, c.head_dim);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let qkv_dim = q_dim + 2 * kv_dim;
        let global = Dims {
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: hd,
            block_size: kv.shape().block_size,
            scale: c.attention_scale,
            window: None,
        };
        let slots: Vec<TokenSlot> = batch
            .seqs
            .iter()
            .flat_map(|s| {
                (0..s.num_tokens).map(move |i| TokenSlot { block_table: &s.block_table, position: s.context_start + i })
            })
            .collect();
        let positions: Vec<usize> = slots.iter().map(|s| s.position).collect();
        let rope = Rope::new(&positions, hd, c.rope_theta, c.rope_freq_scale);
        let local = c
            .sliding_window
            .map(|w| (Dims { window: Some(w.size), ..global }, Rope::new(&positions, hd, w.rope_theta, 1.0)));

        let mut x = vec![0.0f32; n * hidden];
        for (row, &t) in x.chunks_exact_mut(hidden).zip(&batch.tokens) {
            self.token_embd.row(t as usize, row)?;
        }
        if let Some(scale) = c.arch.embedding_scale(hidden) {
            x.iter_mut().for_each(|v| *v *= scale);
        }
        let mut scratch = Scratch::default();
        let (mut h, mut qkv, mut attn, mut y) = (vec![0.0; n * hidden], Vec::new(), vec![0.0; n * q_dim], Vec::new());
        let (mut gate_up, mut act) = (Vec::new(), Vec::new());
        for (l, layer) in self.layers.iter().enumerate() {
            let (dims, rope) = match (&local, c.sliding_window) {
                (Some((dims, rope)), Some(w)) if w.is_local(l) => (*dims, rope),
                _ => (global, &rope),
            };
            rms_norm(&x, &layer.attn_norm, c.rms_eps, &mut h);
            layer.qkv.forward(&h, n, &mut qkv, &mut scratch)?;
            // A hand-off streaming in: this layer's KV must be in place first.
            batch.wait_for_layer(self.first_kv_layer + l);
            let (k_cache, v_cache) = kv.layer_mut(self.first_kv_layer + l);
            qkv.par_chunks_exact_mut(qkv_dim).enumerate().with_min_len(ROWS_PER_TASK).for_each(|(t, row)| {
                if let Some(bias) = &layer.qkv_bias {
                    row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                }
                let (q, kv_row) = row.split_at_mut(q_dim);
                let k = &mut kv_row[..kv_dim];
                if let Some((q_norm, k_norm)) = &layer.qk_norm {
                    rms_norm_in_place(q, q_norm, c.rms_eps);
                    rms_norm_in_place(k, k_norm, c.rms_eps);
                }
                rope.apply(t, q);
                rope.apply(t, k);
            });
            // Write the whole step's K/V first: a prefill token attends to the
            // tokens of its own chunk too.
            for (t, row) in qkv.chunks_exact(qkv_dim).enumerate() {
                let (k, v) = row[q_dim..].split_at(kv_dim);
                dims.store(k_cache, v_cache, &slots[t], k, v);
            }
            paged_attention(dims, &slots, &qkv, qkv_dim, k_cache, v_cache, &mut attn);
            layer.attn_output.forward(&attn, n, &mut y, &mut scratch)?;
            if let Some(comm) = comm {
                comm.all_reduce_sum(&mut y)?;
            }
            if let Some(norm) = &layer.post_attn_norm {
                rms_norm_in_place(&mut y, norm, c.rms_eps);
            }
            add(&mut x, &y, hidden);

            rms_norm(&x, &layer.ffn_norm, c.rms_eps, &mut h);
            layer.gate_up.forward(&h, n, &mut gate_up, &mut scratch)?;
            // Gate and up share each row: act(gate) * up, written over the gate half and then
            // into the down projection's input. One buffer for every layer: a prompt's is
            // megabytes, fresh pages each time.
            act.resize(n * ffn, 0.0);
            gate_up
                .par_chunks_exact_mut(2 * ffn)
                .zip(act.par_chunks_exact_mut(ffn))
                .with_min_len(ROWS_PER_TASK)
                .for_each(|(row, out)| {
                    let (gate, up) = row.split_at_mut(ffn);
                    match c.arch.activation() {
                        Activation::Silu => silu_mul(gate, up),
                        Activation::GeluTanh => gelu_tanh_mul(gate, up),
                    }
                    out.copy_from_slice(gate);
                });
            layer.down.forward(&act, n, &mut y, &mut scratch)?;
            if let Some(comm) = comm {
                comm.all_reduce_sum(&mut y)?;
            }
            if let Some(norm) = &layer.post_ffn_norm {
                rms_norm_in_place(&mut y, norm, c.rms_eps);
            }
            add(&mut x, &y, hidden);
        }

        if !logits {
            return Ok(Logits::new(vocab_size, Vec::new()));
        }
        let normed_rows = |tokens: &[usize]| {
            let rows: Vec<f32> = tokens.iter().flat_map(|&t| &x[t * hidden..(t + 1) * hidden]).copied().collect();
            let mut normed = vec![0.0; rows.len()];
            rms_norm(&rows, &self.output_norm, c.rms_eps, &mut normed);
            normed
        };
        let last = batch.logit_rows();
        let mut data = Vec::new();
        if !last.is_empty() {
            self.lm_head.forward(&normed_rows(&last), last.len(), &mut data, &mut scratch)?;
        }
        let pooled = batch.hidden_rows();
        let hidden_states = if pooled.is_empty() {
            Vec::new()
        } else {
            normed_rows(&pooled).chunks_exact(hidden).map(<[f32]>::to_vec).collect()
        };
        Ok(Logits { vocab_size, data, hidden: hidden_states })
    }
}

/// Rows of a step per task of the per-row work between the products: a prompt's rows are
/// split over the pool (a 409-token prompt spent about a tenth of its prefill in them on one
/// thread), a decode's few stay on the calling thread.
const ROWS_PER_TASK: usize = 16;

/// RMSNorm of each row of `x` (rows of `weight.len()` values) into `out`.
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    x.par_chunks_exact(dim).zip(out.par_chunks_exact_mut(dim)).with_min_len(ROWS_PER_TASK).for_each(|(xr, or)| {
        let mean_sq = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let scale = 1.0 / (mean_sq + eps).sqrt();
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * scale * w;
        }
    });
}

/// RMSNorm of each row of `x` (rows of `weight.len()` values: whole rows,
/// or the heads of one token) in place.
fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    x.par_chunks_exact_mut(dim).with_min_len(ROWS_PER_TASK).for_each(|row| {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let scale = 1.0 / (mean_sq + eps).sqrt();
        row.iter_mut().zip(weight).for_each(|(v, &w)| *v = *v * scale * w);
    });
}

/// `x += y`, the residual connection, `x` and `y` rows of `width` values.
fn add(x: &mut [f32], y: &[f32], width: usize) {
    x.par_chunks_mut(width)
        .zip(y.par_chunks(width))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(x, y)| x.iter_mut().zip(y).for_each(|(a, b)| *a += b));
}

//! The Llama forward pass on candle tensors, on any candle [`Device`]: a CUDA
//! GPU with the `cuda` feature, or the CPU, where the tests check it against
//! llama.cpp's outputs without a GPU.
//!
//! The weights of a loaded [`Llama`] are dequantized once into dense matrices
//! of the compute dtype (bf16 on a GPU), so every projection is one GEMM of
//! the whole step. The residual stream, norms, RoPE and attention stay in f32;
//! norms, RoPE and softmax are candle-nn's fused kernels. Attention gathers
//! each sequence's K/V from the paged cache by slot ids: the decodes of a
//! step as one padded batch, each longer chunk on its own.
//!
//! # The KV cache on the device
//!
//! The engine's [`KvStorage`] in host memory stays the cache every peer sees:
//! hand-offs are read from it and land in it. The model keeps a mirror of it
//! in device memory, laid out the same way (one `[num_blocks * block_size,
//! kv_dim]` f32 matrix per layer for K and one for V), and keeps the two equal:
//!
//! - each step's new K/V go into the mirror as they are computed, and into
//!   host memory in one copy at the end of the step;
//! - blocks written from outside the forward pass (a hand-off, a block copy:
//!   [`KvStorage::take_written`]) are uploaded before the step reads them,
//!   layer by layer, each after its layer of a streaming hand-off has landed.

use std::sync::{Mutex, PoisonError};

use candle_core::{DType, Device, Tensor};

use super::attention::Rope;
use super::device::{has_bf16, ComputeDevice};
use super::linear::Linear;
use super::llama::{check_batch, kv_shape, Llama};
use super::{Activation, Config, ModelError, WeightDtype};
use crate::comm::Communicator;
use crate::forward::{Forward, ForwardBatch, ForwardError, Logits, RankModel};
use crate::kv::cache::{KvCacheShape, KvStorage};

/// A [`Llama`] on a candle device. See the module docs.
pub struct DeviceLlama {
    config: Config,
    device: Device,
    /// The dtype of the weight matrices and of the GEMMs' inputs.
    dtype: DType,
    /// `[vocab, hidden]`.
    embed: Tensor,
    layers: Vec<DeviceLayer>,
    /// f32 `[hidden]`.
    output_norm: Tensor,
    /// `[vocab, hidden]`; the embedding itself when the model ties them.
    lm_head: Tensor,
    /// f32 `[context_length, head_dim / 2]`: RoPE's cos and sin by position.
    cos: Tensor,
    sin: Tensor,
    /// The same for the sliding-window layers (their own RoPE base).
    local_rope: Option<(Tensor, Tensor)>,
    /// Built at the first step, when the engine's cache shape is known; only
    /// the step thread locks it.
    mirror: Mutex<Option<Mirror>>,
    /// The most attention scores one batched product may hold (see
    /// [`DeviceLlama::with_max_attention_scores`]).
    max_attention_scores: usize,
}

/// Elements of one attention score matrix by default: 1 GiB of f32, far
/// below the 2^31 that candle's CUDA softmax indexes with an `int`.
const DEFAULT_MAX_ATTENTION_SCORES: usize = 1 << 28;

struct DeviceLayer {
    /// f32 `[hidden]`.
    attn_norm: Tensor,
    /// Q, K and V stacked: `[q_dim + 2 * kv_dim, hidden]`.
    qkv: Tensor,
    /// f32 `[q_dim + 2 * kv_dim]`.
    qkv_bias: Option<Tensor>,
    /// f32 `[head_dim]` each: the per-head norms of Q and K.
    qk_norm: Option<(Tensor, Tensor)>,
    attn_output: Tensor,
    post_attn_norm: Option<Tensor>,
    ffn_norm: Tensor,
    /// Gate and up stacked: `[2 * ffn, hidden]`.
    gate_up: Tensor,
    down: Tensor,
    post_ffn_norm: Option<Tensor>,
}

/// The device copy of the engine's KV cache: per layer, f32 `[num_blocks *
/// block_size, kv_dim]` for K and for V, row `block * block_size + slot`.
struct Mirror {
    /// The id of the host cache it mirrors.
    host: u64,
    shape: KvCacheShape,
    k: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl DeviceLlama {
    /// Copies `model`'s weights to `device`, matrices in `dtype` (f32 on the
    /// CPU, where candle's bf16 GEMM is slow; bf16 or f16 on a GPU).
    pub fn new(model: &Llama, device: &Device, dtype: DType) -> Result<Self, ModelError> {
        let config = model.config().clone();
        let mat = |l: &Linear| l.to_tensor(device, dtype);
        let vector = |v: &[f32]| Tensor::from_slice(v, v.len(), device);
        let embed = mat(&model.token_embd)?;
        let lm_head = if std::sync::Arc::ptr_eq(&model.token_embd, &model.lm_head) {
            embed.clone()
        } else {
            mat(&model.lm_head)?
        };
        let layers = model
            .layers
            .iter()
            .map(|l| {
                Ok(DeviceLayer {
                    attn_norm: vector(&l.attn_norm)?,
                    qkv: mat(&l.qkv)?,
                    qkv_bias: l.qkv_bias.as_deref().map(vector).transpose()?,
                    qk_norm: l
                        .qk_norm
                        .as_ref()
                        .map(|(q, k)| Ok::<_, candle_core::Error>((vector(q)?, vector(k)?)))
                        .transpose()?,
                    attn_output: mat(&l.attn_output)?,
                    post_attn_norm: l.post_attn_norm.as_deref().map(vector).transpose()?,
                    ffn_norm: vector(&l.ffn_norm)?,
                    gate_up: mat(&l.gate_up)?,
                    down: mat(&l.down)?,
                    post_ffn_norm: l.post_ffn_norm.as_deref().map(vector).transpose()?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let (cos, sin) = rope_tables(&config, config.rope_theta, config.rope_freq_scale, device)?;
        let local_rope = config.sliding_window.map(|w| rope_tables(&config, w.rope_theta, 1.0, device)).transpose()?;
        Ok(Self {
            output_norm: vector(&model.output_norm)?,
            config,
            device: device.clone(),
            dtype,
            embed,
            layers,
            lm_head,
            cos,
            sin,
            local_rope,
            mirror: Mutex::new(None),
            max_attention_scores: DEFAULT_MAX_ATTENTION_SCORES,
        })
    }

    /// [`DeviceLlama::new`] on `device` with its weights in `dtype`
    /// (`auto`: bf16 on a GPU that has bf16 kernels, compute capability 8.0
    /// or later, f16 on an older one; f32 on the CPU).
    pub fn on(model: &Llama, device: ComputeDevice, dtype: WeightDtype) -> Result<Self, ModelError> {
        let dtype = match (dtype, device) {
            (WeightDtype::Auto, ComputeDevice::Cpu) | (WeightDtype::F32, _) => DType::F32,
            (WeightDtype::Auto, ComputeDevice::Cuda(n)) if !has_bf16(n) => DType::F16,
            (WeightDtype::Auto, ComputeDevice::Cuda(_)) | (WeightDtype::BF16, _) => DType::BF16,
            (WeightDtype::F16, _) => DType::F16,
        };
        Self::new(model, &device.candle()?, dtype)
    }

    /// Bounds the score matrix of one batched attention product to `scores`
    /// elements: a long prefill attends in tiles of query rows, a large
    /// decode batch in groups of sequences. This bounds attention's scratch
    /// memory, and keeps CUDA kernels that index with 32 bits in range.
    pub fn with_max_attention_scores(mut self, scores: usize) -> Self {
        self.max_attention_scores = scores.max(1);
        self
    }

    /// The resolved model shape.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `x @ w^T` with `x` f32 and `w` in the compute dtype; f32 out.
    fn linear(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        x.to_dtype(self.dtype)?.matmul(&w.t()?)?.to_dtype(DType::F32)
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
        let c = &self.config;
        check_batch(c, 0..c.num_layers, batch, kv)?;
        let vocab_size = c.vocab_size;
        let n = batch.tokens.len();
        if n == 0 {
            return Ok(Logits::new(vocab_size, Vec::new()));
        }
        let mut mirror = self.mirror.lock().unwrap_or_else(PoisonError::into_inner);
        let mirror = match &mut *mirror {
            Some(m) if m.mirrors(kv) => m,
            slot => slot.insert(Mirror::upload(kv, &self.device)?),
        };
        let plan = StepSlots::new(batch, kv.shape().block_size, self.config.sliding_window.map(|w| w.size));
        let stale = kv.take_written(plan.blocks_read.iter().copied());
        let result = self.run(batch, kv, mirror, &plan, &stale, comm, logits);
        if result.is_err() {
            // Some layers may not have been reloaded: leave it to a later step.
            kv.mark_written(&stale);
        }
        result
    }

    /// [`DeviceLlama::step`] once the mirror is in place and the blocks that
    /// need reloading are known.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvStorage,
        mirror: &mut Mirror,
        plan: &StepSlots,
        stale: &[u32],
        comm: Option<&dyn Communicator>,
        logits: bool,
    ) -> Result<Logits, ForwardError> {
        let c = &self.config;
        let (vocab_size, n, dev) = (c.vocab_size, batch.tokens.len(), &self.device);
        let (q_dim, kv_dim, ffn) = (c.q_dim(), c.kv_dim(), c.ffn);
        let scatter = scatter_index(&plan.new_slots, kv_dim, dev)?;
        let stale = StaleBlocks::new(stale, &mirror.shape, dev)?;
        let positions = Tensor::from_slice(&plan.positions, n, dev)?;
        let (cos, sin) = (self.cos.index_select(&positions, 0)?, self.sin.index_select(&positions, 0)?);
        let local = match &self.local_rope {
            Some((cos, sin)) => Some((cos.index_select(&positions, 0)?, sin.index_select(&positions, 0)?)),
            None => None,
        };
        let attend = AttendIndex::new(plan, dev)?;
        let tokens = Tensor::from_slice(&batch.tokens, n, dev)?;

        let mut x = self.embed.index_select(&tokens, 0)?.to_dtype(DType::F32)?;
        if let Some(scale) = c.arch.embedding_scale(c.hidden) {
            x = (x * f64::from(scale))?;
        }
        let (mut new_k, mut new_v) = (Vec::with_capacity(c.num_layers), Vec::with_capacity(c.num_layers));
        for (l, layer) in self.layers.iter().enumerate() {
            let window = c.sliding_window.filter(|w| w.is_local(l)).map(|w| w.size);
            let (cos, sin) = match (&local, window) {
                (Some((cos, sin)), Some(_)) => (cos, sin),
                _ => (&cos, &sin),
            };
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, c.rms_eps)?;
            let mut qkv = self.linear(&h, &layer.qkv)?;
            if let Some(bias) = &layer.qkv_bias {
                qkv = qkv.broadcast_add(bias)?;
            }
            let (mut q, mut k) = (qkv.narrow(1, 0, q_dim)?, qkv.narrow(1, q_dim, kv_dim)?);
            if let Some((q_norm, k_norm)) = &layer.qk_norm {
                let per_head = |t: &Tensor, heads: usize, w: &Tensor| -> candle_core::Result<Tensor> {
                    let normed =
                        candle_nn::ops::rms_norm(&t.contiguous()?.reshape((n, heads, c.head_dim))?, w, c.rms_eps)?;
                    normed.reshape((n, heads * c.head_dim))
                };
                (q, k) = (per_head(&q, c.num_heads, q_norm)?, per_head(&k, c.num_kv_heads, k_norm)?);
            }
            let q = rope(&q, c.num_heads, cos, sin)?;
            let k = rope(&k, c.num_kv_heads, cos, sin)?.reshape((n, kv_dim))?;
            let v = qkv.narrow(1, q_dim + kv_dim, kv_dim)?.contiguous()?;
            // A hand-off streaming in: this layer's KV must be in place first.
            batch.wait_for_layer(l);
            mirror.reload(kv, l, &stale)?;
            mirror.k[l].scatter_set(&scatter, &k, 0)?;
            mirror.v[l].scatter_set(&scatter, &v, 0)?;
            let attn = self.attention(plan, &attend, &q, &mirror.k[l], &mirror.v[l], window)?;
            let mut y = all_reduce(self.linear(&attn, &layer.attn_output)?, comm)?;
            if let Some(norm) = &layer.post_attn_norm {
                y = candle_nn::ops::rms_norm(&y, norm, c.rms_eps)?;
            }
            x = (x + y)?;

            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, c.rms_eps)?;
            let gate_up = self.linear(&h, &layer.gate_up)?;
            let gate = gate_up.narrow(1, 0, ffn)?;
            let gate = match c.arch.activation() {
                Activation::Silu => gate.silu()?,
                Activation::GeluTanh => gate.gelu()?,
            };
            let act = (gate * gate_up.narrow(1, ffn, ffn)?)?;
            let mut y = all_reduce(self.linear(&act, &layer.down)?, comm)?;
            if let Some(norm) = &layer.post_ffn_norm {
                y = candle_nn::ops::rms_norm(&y, norm, c.rms_eps)?;
            }
            x = (x + y)?;
            new_k.push(k);
            new_v.push(v);
        }
        write_back(kv, &plan.new_slots, &new_k, &new_v)?;

        if !logits {
            return Ok(Logits::new(vocab_size, Vec::new()));
        }
        let normed_rows = |tokens: Vec<usize>| -> candle_core::Result<Option<Tensor>> {
            if tokens.is_empty() {
                return Ok(None);
            }
            let ids: Vec<u32> = tokens.into_iter().map(|t| t as u32).collect();
            let rows = x.index_select(&Tensor::from_slice(&ids, ids.len(), dev)?, 0)?;
            candle_nn::ops::rms_norm(&rows, &self.output_norm, c.rms_eps).map(Some)
        };
        let data = match normed_rows(batch.logit_rows())? {
            Some(normed) => self.linear(&normed, &self.lm_head)?.flatten_all()?.to_vec1::<f32>()?,
            None => Vec::new(),
        };
        let hidden = match normed_rows(batch.hidden_rows())? {
            Some(normed) => normed.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?,
            None => Vec::new(),
        };
        Ok(Logits { vocab_size, data, hidden })
    }

    /// Causal attention of the step's queries (`q`: f32 `[n, heads,
    /// head_dim]`) over their contexts in the cache, within `window` positions
    /// on a sliding-window layer; f32 `[n, q_dim]` out.
    ///
    /// The single-token sequences (decodes) attend as one padded batch, so a
    /// decode step launches the same few kernels however many sequences it
    /// holds; a longer chunk (a prefill) attends on its own with a causal mask.
    fn attention(
        &self,
        plan: &StepSlots,
        index: &AttendIndex,
        q: &Tensor,
        k_cache: &Tensor,
        v_cache: &Tensor,
        window: Option<usize>,
    ) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (heads, kv_heads, hd) = (c.num_heads, c.num_kv_heads, c.head_dim);
        // Query head h reads KV head h / group: the group's queries form one
        // matrix against that KV head.
        let group = heads / kv_heads;
        let scale = f64::from(c.attention_scale);
        let mut outs = Vec::with_capacity(plan.chunks.len() + 1);
        if let Some(d) = &index.decode {
            let len = plan.decode.len;
            for (first, b) in tiles(plan.decode.tokens.len(), heads * len, self.max_attention_scores) {
                let ids = d.context.narrow(0, first * len, b * len)?;
                let gather = |cache: &Tensor| -> candle_core::Result<Tensor> {
                    cache.index_select(&ids, 0)?.reshape((b, len, kv_heads, hd))?.transpose(1, 2)?.contiguous()
                };
                let (k, v) = (gather(k_cache)?, gather(v_cache)?);
                let q = q.index_select(&d.tokens.narrow(0, first, b)?, 0)?.reshape((b, kv_heads, group, hd))?;
                let mask = match (window, &d.window_mask) {
                    (Some(_), Some(windowed)) => windowed,
                    _ => &d.mask,
                };
                let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask.narrow(0, first, b)?)?;
                let p = candle_nn::ops::softmax_last_dim(&scores)?;
                outs.push(p.matmul(&v)?.reshape((b, heads * hd))?);
            }
        }
        for chunk in &plan.chunks {
            let context = index.chunk_context.as_ref().expect("a step with chunks has their context");
            let len = chunk.context_start + chunk.num_tokens;
            let ids = context.narrow(0, chunk.context_offset, len)?;
            let gather = |cache: &Tensor| -> candle_core::Result<Tensor> {
                cache.index_select(&ids, 0)?.reshape((len, kv_heads, hd))?.transpose(0, 1)?.contiguous()
            };
            let (k, v) = (gather(k_cache)?, gather(v_cache)?);
            let k_pos = Tensor::arange(0, len as u32, &self.device)?.reshape((1, len))?;
            for (first, m) in tiles(chunk.num_tokens, heads * len, self.max_attention_scores) {
                let q = q.narrow(0, chunk.token_start + first, m)?.transpose(0, 1)?.contiguous()?.reshape((
                    kv_heads,
                    group * m,
                    hd,
                ))?;
                let scores = (q.matmul(&k.t()?)? * scale)?;
                // Query i sits at position context_start + i and sees keys up to it.
                let start = (chunk.context_start + first) as u32;
                let q_pos = Tensor::arange(start, start + m as u32, &self.device)?.reshape((m, 1))?;
                let shape = (kv_heads, group, m, len);
                let mut visible = k_pos.broadcast_le(&q_pos)?;
                if let Some(w) = window {
                    // And within the window: key position > query position - window.
                    let edge = (q_pos.to_dtype(DType::F32)? - w as f64)?;
                    visible = visible.mul(&k_pos.to_dtype(DType::F32)?.broadcast_gt(&edge)?)?;
                }
                let visible = visible.broadcast_as(shape)?;
                let hidden = Tensor::new(f32::NEG_INFINITY, &self.device)?.broadcast_as(shape)?;
                let scores =
                    visible.where_cond(&scores.reshape(shape)?, &hidden)?.reshape((kv_heads, group * m, len))?;
                let p = candle_nn::ops::softmax_last_dim(&scores)?;
                let o =
                    p.matmul(&v)?.reshape((heads, m, hd))?.transpose(0, 1)?.contiguous()?.reshape((m, heads * hd))?;
                outs.push(o);
            }
        }
        let out = Tensor::cat(&outs, 0)?;
        match &index.order {
            Some(order) => out.index_select(order, 0),
            None => Ok(out),
        }
    }
}

impl Forward for DeviceLlama {
    fn forward(&self, batch: &ForwardBatch, kv: &mut KvStorage) -> Result<Logits, ForwardError> {
        self.step(batch, kv, None, true)
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    fn waits_for_layers(&self) -> bool {
        true
    }
}

impl RankModel for DeviceLlama {
    fn check(&self, batch: &ForwardBatch, kv: &KvStorage) -> Result<(), ForwardError> {
        check_batch(&self.config, 0..self.config.num_layers, batch, kv)
    }

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
        kv_shape(&self.config, block_size, num_blocks)
    }

    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
}

/// The sum of every rank's partial product `y` (f32 `[n, hidden]`), reduced
/// where the communicator keeps its buffers (the GPU for NCCL); `y` itself
/// without a group.
fn all_reduce(y: Tensor, comm: Option<&dyn Communicator>) -> Result<Tensor, ForwardError> {
    match comm {
        Some(comm) => comm.all_reduce_sum_tensor(&y),
        None => Ok(y),
    }
}

/// Where a step's tokens sit in the cache, as row ids of a layer's mirror.
struct StepSlots {
    /// Row of each new token, in batch order.
    new_slots: Vec<u32>,
    /// Position of each new token in its sequence.
    positions: Vec<u32>,
    /// The blocks the step reads or writes.
    blocks_read: Vec<u32>,
    /// The single-token sequences, attended as one batch.
    decode: DecodeRows,
    /// The longer chunks, attended one by one.
    chunks: Vec<ChunkRows>,
    /// Each chunk's rows of positions `0..context_start + num_tokens`, one
    /// chunk after another.
    chunk_context: Vec<u32>,
    /// The batch index of each row attention computes (the decodes' rows,
    /// then each chunk's); `None` when that is the batch order already.
    order: Option<Vec<u32>>,
}

/// The step's single-token sequences, padded to the longest context.
#[derive(Default)]
struct DecodeRows {
    /// The batch index of each one's token.
    tokens: Vec<u32>,
    /// The longest context among them.
    len: usize,
    /// `[tokens.len() * len]`: each one's context rows, padded with its last.
    context: Vec<u32>,
    /// `[tokens.len() * len]`: 0 where a key is in the context, -inf where
    /// it is padding.
    mask: Vec<f32>,
    /// [`DecodeRows::mask`] for the sliding-window layers: -inf also before
    /// each one's window.
    window_mask: Option<Vec<f32>>,
}

/// A chunk of more than one token of a sequence.
struct ChunkRows {
    token_start: usize,
    num_tokens: usize,
    context_start: usize,
    /// Where its rows start in [`StepSlots::chunk_context`].
    context_offset: usize,
}

impl StepSlots {
    /// `window`: the sliding-window layers' window, when the model has them.
    fn new(batch: &ForwardBatch, block_size: usize, window: Option<usize>) -> Self {
        let n = batch.tokens.len();
        let mut plan = Self {
            new_slots: Vec::with_capacity(n),
            positions: Vec::with_capacity(n),
            blocks_read: Vec::new(),
            decode: DecodeRows::default(),
            chunks: Vec::new(),
            chunk_context: Vec::new(),
            order: None,
        };
        let mut decode_contexts = Vec::new();
        for s in &batch.seqs {
            let len = s.context_start + s.num_tokens;
            let row = |p: usize| s.block_table[p / block_size] * block_size as u32 + (p % block_size) as u32;
            plan.new_slots.extend((s.context_start..len).map(row));
            plan.positions.extend((s.context_start..len).map(|p| p as u32));
            plan.blocks_read.extend_from_slice(&s.block_table[..len.div_ceil(block_size)]);
            if s.num_tokens == 1 {
                plan.decode.tokens.push(s.token_start as u32);
                decode_contexts.push((0..len).map(row).collect::<Vec<_>>());
            } else if s.num_tokens > 1 {
                plan.chunks.push(ChunkRows {
                    token_start: s.token_start,
                    num_tokens: s.num_tokens,
                    context_start: s.context_start,
                    context_offset: plan.chunk_context.len(),
                });
                plan.chunk_context.extend((0..len).map(row));
            }
        }
        plan.decode.pad(decode_contexts, window);
        let computed =
            plan.decode.tokens.iter().copied().chain(
                plan.chunks.iter().flat_map(|c| (c.token_start..c.token_start + c.num_tokens).map(|t| t as u32)),
            );
        let computed: Vec<u32> = computed.collect();
        if computed.iter().enumerate().any(|(i, &t)| t as usize != i) {
            // The row holding token t is where `computed` names t.
            let mut order = vec![0; n];
            for (row, &t) in computed.iter().enumerate() {
                order[t as usize] = row as u32;
            }
            plan.order = Some(order);
        }
        plan
    }
}

impl DecodeRows {
    fn pad(&mut self, contexts: Vec<Vec<u32>>, window: Option<usize>) {
        self.len = contexts.iter().map(Vec::len).max().unwrap_or(0);
        let hidden = |n| std::iter::repeat_n(f32::NEG_INFINITY, n);
        for ctx in contexts {
            let last = *ctx.last().expect("a sequence's context holds its own token");
            let padding = self.len - ctx.len();
            self.mask.extend(std::iter::repeat_n(0.0, ctx.len()).chain(hidden(padding)));
            if let Some(w) = window {
                // Keys at positions below len - w fell out of the window.
                let before = ctx.len().saturating_sub(w);
                let mask = self.window_mask.get_or_insert_with(Vec::new);
                mask.extend(hidden(before).chain(std::iter::repeat_n(0.0, ctx.len() - before)).chain(hidden(padding)));
            }
            self.context.extend(ctx.into_iter().chain(std::iter::repeat_n(last, padding)));
        }
    }
}

/// A step's [`StepSlots`] on the device, uploaded once for all the layers.
/// What a step does not use is `None`, never an empty tensor: CUDA refuses
/// to allocate zero bytes.
struct AttendIndex {
    decode: Option<DecodeIndex>,
    chunk_context: Option<Tensor>,
    order: Option<Tensor>,
}

struct DecodeIndex {
    tokens: Tensor,
    context: Tensor,
    /// f32 `[b, 1, 1, len]`, against scores `[b, kv_heads, group, len]`.
    mask: Tensor,
    /// The same for the sliding-window layers.
    window_mask: Option<Tensor>,
}

impl AttendIndex {
    fn new(plan: &StepSlots, dev: &Device) -> candle_core::Result<Self> {
        let d = &plan.decode;
        let decode = if d.tokens.is_empty() {
            None
        } else {
            let b = d.tokens.len();
            Some(DecodeIndex {
                tokens: Tensor::from_slice(&d.tokens, b, dev)?,
                context: Tensor::from_slice(&d.context, b * d.len, dev)?,
                mask: Tensor::from_slice(&d.mask, (b, 1, 1, d.len), dev)?,
                window_mask: d
                    .window_mask
                    .as_ref()
                    .map(|m| Tensor::from_slice(m, (b, 1, 1, d.len), dev))
                    .transpose()?,
            })
        };
        let order = plan.order.as_ref().map(|o| Tensor::from_slice(o, o.len(), dev)).transpose()?;
        let chunk_context = if plan.chunks.is_empty() {
            None
        } else {
            Some(Tensor::from_slice(&plan.chunk_context, plan.chunk_context.len(), dev)?)
        };
        Ok(Self { decode, chunk_context, order })
    }
}

impl Mirror {
    /// A device copy of the whole host cache.
    fn upload(kv: &KvStorage, device: &Device) -> candle_core::Result<Self> {
        let shape = *kv.shape();
        let rows = (shape.num_blocks * shape.block_size, shape.num_kv_heads * shape.head_dim);
        let (mut k, mut v) = (Vec::with_capacity(shape.num_layers), Vec::with_capacity(shape.num_layers));
        for l in 0..shape.num_layers {
            let (hk, hv) = kv.layer(l);
            k.push(Tensor::from_slice(hk, rows, device)?);
            v.push(Tensor::from_slice(hv, rows, device)?);
        }
        Ok(Self { host: kv.id(), shape, k, v })
    }

    /// Whether this is the mirror of `kv` (a model stepped on another cache
    /// builds a new one).
    fn mirrors(&self, kv: &KvStorage) -> bool {
        self.host == kv.id() && self.shape == *kv.shape()
    }

    /// Uploads layer `layer` of the stale blocks from the host cache: one
    /// copy for K and one for V, scattered to the blocks' rows.
    fn reload(&mut self, kv: &KvStorage, layer: usize, stale: &StaleBlocks) -> candle_core::Result<()> {
        let Some(rows) = &stale.rows else { return Ok(()) };
        let s = self.shape;
        let elems = s.block_elems();
        let (hk, hv) = kv.layer(layer);
        for (host, mirror) in [(hk, &self.k[layer]), (hv, &self.v[layer])] {
            let mut staged = Vec::with_capacity(stale.blocks.len() * elems);
            for &b in stale.blocks {
                staged.extend_from_slice(&host[b as usize * elems..][..elems]);
            }
            let values = Tensor::from_vec(staged, rows.shape(), mirror.device())?;
            mirror.scatter_set(rows, &values, 0)?;
        }
        Ok(())
    }
}

/// The blocks a step must upload before it reads them (see
/// [`KvStorage::take_written`]), and their rows in a layer's mirror as
/// [`scatter_index`] gives them; `None` when there are none.
struct StaleBlocks<'a> {
    blocks: &'a [u32],
    rows: Option<Tensor>,
}

impl<'a> StaleBlocks<'a> {
    fn new(blocks: &'a [u32], shape: &KvCacheShape, dev: &Device) -> candle_core::Result<Self> {
        if blocks.is_empty() {
            return Ok(Self { blocks, rows: None });
        }
        let bs = shape.block_size as u32;
        let rows: Vec<u32> = blocks.iter().flat_map(|&b| b * bs..(b + 1) * bs).collect();
        Ok(Self { blocks, rows: Some(scatter_index(&rows, shape.num_kv_heads * shape.head_dim, dev)?) })
    }
}

/// The index `scatter_set` takes to write one row of `width` values at each
/// of the mirror rows `rows`: each row id repeated `width` times.
fn scatter_index(rows: &[u32], width: usize, dev: &Device) -> candle_core::Result<Tensor> {
    let n = rows.len();
    Tensor::from_slice(rows, (n, 1), dev)?.broadcast_as((n, width))?.contiguous()
}

/// Copies the step's new K/V (per layer, f32 `[n, kv_dim]`) from the device
/// into the host cache's rows `slots`, in one transfer.
fn write_back(kv: &mut KvStorage, slots: &[u32], k: &[Tensor], v: &[Tensor]) -> candle_core::Result<()> {
    let all = Tensor::stack(&[Tensor::stack(k, 0)?, Tensor::stack(v, 0)?], 0)?.flatten_all()?.to_vec1::<f32>()?;
    let shape = *kv.shape();
    let kv_dim = shape.num_kv_heads * shape.head_dim;
    let per_layer = slots.len() * kv_dim;
    for l in 0..shape.num_layers {
        let (hk, hv) = kv.layer_mut(l);
        for (which, host) in [hk, hv].into_iter().enumerate() {
            let src = &all[(which * shape.num_layers + l) * per_layer..][..per_layer];
            for (&slot, row) in slots.iter().zip(src.chunks_exact(kv_dim)) {
                host[slot as usize * kv_dim..][..kv_dim].copy_from_slice(row);
            }
        }
    }
    Ok(())
}

/// `rows` split into runs of at most `max / per_row` rows (at least one):
/// `(first, count)` each.
fn tiles(rows: usize, per_row: usize, max: usize) -> impl Iterator<Item = (usize, usize)> {
    let tile = (max / per_row.max(1)).max(1);
    (0..rows).step_by(tile).map(move |first| (first, tile.min(rows - first)))
}

/// Adjacent-pair RoPE (see [`Rope`]) of `x`, f32 `[n,
/// heads * head_dim]`, with `cos`/`sin` `[n, head_dim / 2]` of each token's
/// position; `[n, heads, head_dim]` out.
fn rope(x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let n = x.dim(0)?;
    let hd = x.dim(1)? / heads;
    // rope_i wants `[batch, heads, tokens, head_dim]`: one batch of n tokens.
    let x = x.contiguous()?.reshape((n, heads, hd))?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?;
    candle_nn::rotary_emb::rope_i(&x, cos, sin)?.squeeze(0)?.transpose(0, 1)?.contiguous()
}

/// f32 `[context_length, head_dim / 2]` tables of RoPE's cos and sin for
/// every position, with base `theta` and linear scaling `freq_scale`: the
/// very numbers of the CPU path's [`Rope`].
fn rope_tables(c: &Config, theta: f32, freq_scale: f32, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let positions: Vec<usize> = (0..c.context_length).collect();
    let Rope { cos, sin, .. } = Rope::new(&positions, c.head_dim, theta, freq_scale);
    let shape = (c.context_length, c.head_dim / 2);
    Ok((Tensor::from_vec(cos, shape, device)?, Tensor::from_vec(sin, shape, device)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_rows_within_the_bound() {
        assert_eq!(tiles(10, 3, 9).collect::<Vec<_>>(), [(0, 3), (3, 3), (6, 3), (9, 1)]);
        assert_eq!(tiles(4, 100, 10).collect::<Vec<_>>(), [(0, 1), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(tiles(4, 1, 1 << 28).collect::<Vec<_>>(), [(0, 4)]);
    }
}

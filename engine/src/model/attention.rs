//! RoPE and paged causal attention on plain slices.
//!
//! The KV cache is paged (see [`crate::kv::cache`]), so attention gathers K/V
//! by block table instead of through one contiguous tensor per sequence.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod x86;

/// Per-step rotary tables: for each token, `cos` and `sin` of
/// `position * theta^(-2i/head_dim)` for each pair `i`.
pub(crate) struct Rope {
    half: usize,
    pub(super) cos: Vec<f32>,
    pub(super) sin: Vec<f32>,
}

impl Rope {
    /// Tables for the given token positions, with base `theta` and linear
    /// scaling `freq_scale` (1 for none). Angles are computed in f64
    /// because `position * freq` loses bits in f32 at long contexts.
    pub fn new(positions: &[usize], head_dim: usize, theta: f32, freq_scale: f32) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| f64::from(freq_scale) * f64::from(theta).powf(-2.0 * i as f64 / head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for f in &inv_freq {
                let (s, c) = (p as f64 * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        Self { half, cos, sin }
    }

    /// Rotates every head of one token in place.
    ///
    /// Llama GGUF files store Q/K rows permuted for llama.cpp's "normal" RoPE,
    /// which rotates adjacent pairs `(x[2i], x[2i+1])`. The NeoX convention
    /// (pairs `(x[i], x[i + d/2])`) would scramble every head here.
    pub fn apply(&self, token: usize, heads: &mut [f32]) {
        let cos = &self.cos[token * self.half..(token + 1) * self.half];
        let sin = &self.sin[token * self.half..(token + 1) * self.half];
        for head in heads.chunks_exact_mut(2 * self.half) {
            for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0 * c - x1 * s;
                pair[1] = x0 * s + x1 * c;
            }
        }
    }
}

/// Where one token of the step sits: its sequence's block table and position.
pub(crate) struct TokenSlot<'a> {
    pub block_table: &'a [u32],
    pub position: usize,
}

/// Dimensions of the cache and the heads, and which keys a query sees.
#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Multiplies every score (`1 / sqrt(head_dim)` for most models).
    pub scale: f32,
    /// A sliding-window layer's window: a query at position `p` sees the
    /// keys at `p - window + 1 ..= p` (llama.cpp's standard SWA); `None`
    /// sees every earlier key.
    pub window: Option<usize>,
}

impl Dims {
    /// The first position a query at `position` attends to.
    #[inline]
    pub fn first_key(&self, position: usize) -> usize {
        match self.window {
            Some(w) => (position + 1).saturating_sub(w),
            None => 0,
        }
    }

    /// Offset of `(position, kv_head)` in a layer's K or V buffer.
    #[inline]
    fn cache_offset(&self, block_table: &[u32], position: usize, kv_head: usize) -> usize {
        let block = block_table[position / self.block_size] as usize;
        let slot = position % self.block_size;
        ((block * self.block_size + slot) * self.num_kv_heads + kv_head) * self.head_dim
    }

    /// Writes one token's K/V rows (`num_kv_heads * head_dim` each) into its slot.
    pub fn store(&self, k_cache: &mut [f32], v_cache: &mut [f32], slot: &TokenSlot, k: &[f32], v: &[f32]) {
        let start = self.cache_offset(slot.block_table, slot.position, 0);
        let n = self.num_kv_heads * self.head_dim;
        k_cache[start..start + n].copy_from_slice(k);
        v_cache[start..start + n].copy_from_slice(v);
    }
}

/// Causal attention for every token of the step, reading K/V (already
/// written for this step) from the paged cache.
///
/// Token `t`'s query heads (after RoPE, `num_heads * head_dim` values) start
/// at `q[t * q_stride]`, so fused QKV rows can be passed as they are; `out`
/// receives the attention output, `num_heads * head_dim` per token. Query head
/// `h` reads KV head `h / (num_heads / num_kv_heads)` (grouped-query attention).
///
/// One unit of work is a token and a KV head: the query heads sharing that
/// KV head read each cached K and V row together, and the cache is walked
/// block by block, so no position needs a division to find its slot. A step
/// with few such units (a lone decode: 3 for SmolLM2's 3 KV heads, on 2
/// cores one of which would do two) takes each query head as a unit instead.
pub(crate) fn paged_attention(
    dims: Dims,
    slots: &[TokenSlot],
    q: &[f32],
    q_stride: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
) {
    let per_head = slots.len() * dims.num_kv_heads < FEW_UNITS_PER_THREAD * rayon::current_num_threads();
    let heads = if per_head { 1 } else { dims.num_heads / dims.num_kv_heads };
    attention_units(dims, slots, q, q_stride, k_cache, v_cache, out, heads);
}

/// Fewer (token, KV head) units than this per thread are split by query head: measured on
/// SmolLM2 (2 cores, context 300), a one-row step 6.5-7.1 → 4.3-5.7 ms, two rows unchanged.
const FEW_UNITS_PER_THREAD: usize = 4;

/// [`paged_attention`] in units of `heads` query heads of one token, all of one KV head (a
/// divisor of the group). Each head is computed by the same instructions whatever the unit, so a
/// row's attention does not depend on the step's other rows.
#[allow(clippy::too_many_arguments)]
fn attention_units(
    dims: Dims,
    slots: &[TokenSlot],
    q: &[f32],
    q_stride: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
    heads: usize,
) {
    let hd = dims.head_dim;
    let group = dims.num_heads / dims.num_kv_heads;
    debug_assert!(group.is_multiple_of(heads));
    let width = heads * hd;
    // Each unit writes its heads' outputs: adjacent in `out`.
    #[cfg(target_arch = "x86_64")]
    let simd = x86::available(hd);
    let one = |scores: &mut Vec<f32>, (i, o): (usize, &mut [f32])| {
        let (t, h) = (i * width / (dims.num_heads * hd), i * heads % dims.num_heads);
        let start = t * q_stride + h * hd;
        let qh = &q[start..start + width];
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the CPU and head size suit it (checked above); the
            // model checked the block tables against the cache.
            return unsafe { x86::attend(dims, &slots[t], h / group, qh, k_cache, v_cache, scores, o) };
        }
        attend(dims, &slots[t], h / group, qh, k_cache, v_cache, scores, o);
    };
    // Tiny steps run inline. A decode step's few units are worth splitting:
    // the forward pass runs inside the pool (see `Llama::forward`), so a
    // fork costs a microsecond or two, while a single thread doing all of
    // attention leaves the other cores idle for a tenth of the step.
    let work: usize =
        slots.iter().map(|s| s.position + 1 - dims.first_key(s.position)).sum::<usize>() * dims.num_heads * hd;
    if work < PARALLEL_MIN_WORK {
        let mut scores = Vec::new();
        out.chunks_mut(width).enumerate().for_each(|item| one(&mut scores, item));
    } else {
        out.par_chunks_mut(width).enumerate().for_each_init(Vec::new, one);
    }
}

/// Multiply-adds below which [`paged_attention`] stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 14;

/// Query heads `qh` of one token (`head_dim` values each, all of KV head `g`'s
/// group, heads computed one by one) against KV head `g`, over positions
/// `first_key..=slot.position`; writes their outputs to `o`. `scores` is
/// scratch, one value per head and position.
#[allow(clippy::too_many_arguments)]
fn attend(
    dims: Dims,
    slot: &TokenSlot,
    g: usize,
    qh: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    scores: &mut Vec<f32>,
    o: &mut [f32],
) {
    let hd = dims.head_dim;
    let group = qh.len() / hd;
    let scale = dims.scale;
    let first = dims.first_key(slot.position);
    let len = slot.position + 1 - first;
    // Offsets of the KV head's rows, position by position, block by block.
    let rows = || {
        let row_stride = dims.num_kv_heads * hd;
        slot.block_table.iter().flat_map(move |&b| {
            let first = (b as usize * dims.block_size * dims.num_kv_heads + g) * hd;
            (0..dims.block_size).map(move |s| first + s * row_stride)
        })
    };
    scores.clear();
    scores.resize(len * group, 0.0);
    let mut max = vec![f32::NEG_INFINITY; group];
    for (p, off) in rows().skip(first).take(len).enumerate() {
        let k = &k_cache[off..off + hd];
        for (h, qv) in qh.chunks_exact(hd).enumerate() {
            let s = dot(qv, k) * scale;
            max[h] = max[h].max(s);
            scores[p * group + h] = s;
        }
    }
    let mut sum = vec![0.0f32; group];
    for row in scores.chunks_exact_mut(group) {
        for ((s, m), total) in row.iter_mut().zip(&max).zip(sum.iter_mut()) {
            *s = (*s - m).exp();
            *total += *s;
        }
    }
    o.fill(0.0);
    for (p, off) in rows().skip(first).take(len).enumerate() {
        let v = &v_cache[off..off + hd];
        for (h, oh) in o.chunks_exact_mut(hd).enumerate() {
            let w = scores[p * group + h];
            for (acc, &x) in oh.iter_mut().zip(v) {
                *acc += w * x;
            }
        }
    }
    for (oh, total) in o.chunks_exact_mut(hd).zip(sum) {
        let inv = 1.0 / total;
        oh.iter_mut().for_each(|x| *x *= inv);
    }
}

/// Dot product in eight independent lanes so the compiler can vectorise it.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_rotates_adjacent_pairs() {
        // head_dim 4: pair 0 turns at 1 rad per position, pair 1 at 1/theta^(1/2).
        let rope = Rope::new(&[1], 4, 100.0, 1.0);
        let mut x = [1.0, 0.0, 1.0, 0.0];
        rope.apply(0, &mut x);
        let expected = [1f32.cos(), 1f32.sin(), 0.1f32.cos(), 0.1f32.sin()];
        for (a, b) in x.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{x:?} vs {expected:?}");
        }
    }

    #[test]
    fn attention_reads_the_right_blocks_and_heads() {
        // 2 query heads on 1 KV head, head_dim 2, blocks of 2; the sequence
        // lives in blocks [2, 0], so positions 0,1 are block 2 and 2 is block 0.
        let dims = Dims { num_heads: 2, num_kv_heads: 1, head_dim: 2, block_size: 2, scale: 1.0, window: None };
        let mut k = vec![0.0; 3 * 2 * 2];
        let mut v = vec![0.0; 3 * 2 * 2];
        let table = [2u32, 0];
        for p in 0..3 {
            let slot = TokenSlot { block_table: &table, position: p };
            dims.store(&mut k, &mut v, &slot, &[0.0, 0.0], &[p as f32, 10.0 * p as f32]);
        }
        // All scores equal: the output is the mean of V over positions 0..=2.
        let slots = [TokenSlot { block_table: &table, position: 2 }];
        let q = [1.0, 2.0, 3.0, 4.0];
        let mut out = [0.0; 4];
        paged_attention(dims, &slots, &q, 4, &k, &v, &mut out);
        for (a, b) in out.iter().zip([1.0, 10.0, 1.0, 10.0]) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
        // Position 0 attends only to itself.
        let slots = [TokenSlot { block_table: &table, position: 0 }];
        paged_attention(dims, &slots, &q, 4, &k, &v, &mut out);
        assert_eq!(out, [0.0; 4]);
        // A window of two: position 2 sees positions 1 and 2 only.
        let dims = Dims { window: Some(2), ..dims };
        let slots = [TokenSlot { block_table: &table, position: 2 }];
        paged_attention(dims, &slots, &q, 4, &k, &v, &mut out);
        for (a, b) in out.iter().zip([1.5, 15.0, 1.5, 15.0]) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn a_head_gets_the_same_bits_whether_its_unit_is_one_head_or_its_kv_group() {
        // 6 query heads on 2 KV heads, head_dim 16, blocks of 4, three tokens of one sequence.
        let dims = Dims { num_heads: 6, num_kv_heads: 2, head_dim: 16, block_size: 4, scale: 0.25, window: None };
        let row = dims.num_kv_heads * dims.head_dim;
        let table = [3u32, 0, 2, 1];
        let value = |i: usize| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 2.0;
        let k: Vec<f32> = (0..16 * row).map(value).collect();
        let v: Vec<f32> = (0..16 * row).map(|i| value(i + 13)).collect();
        let slots: Vec<TokenSlot> = [9, 12, 15].map(|position| TokenSlot { block_table: &table, position }).into();
        let q: Vec<f32> = (0..slots.len() * dims.num_heads * dims.head_dim).map(|i| value(i + 101)).collect();
        let run = |heads: usize| {
            let mut out = vec![0.0; q.len()];
            attention_units(dims, &slots, &q, dims.num_heads * dims.head_dim, &k, &v, &mut out, heads);
            out
        };
        let (grouped, single) = (run(3), run(1));
        assert!(grouped.iter().any(|&x| x != 0.0));
        assert_eq!(
            grouped.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            single.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        // The portable loop too (the path above is AVX2's where the CPU has it).
        let hd = dims.head_dim;
        for (t, slot) in slots.iter().enumerate() {
            for g in 0..dims.num_kv_heads {
                let heads = &q[(t * dims.num_heads + 3 * g) * hd..][..3 * hd];
                let mut together = vec![0.0; 3 * hd];
                attend(dims, slot, g, heads, &k, &v, &mut Vec::new(), &mut together);
                for (h, (one, want)) in heads.chunks_exact(hd).zip(together.chunks_exact(hd)).enumerate() {
                    let mut alone = vec![0.0; hd];
                    attend(dims, slot, g, one, &k, &v, &mut Vec::new(), &mut alone);
                    assert_eq!(alone, want, "token {t} head {h} of KV head {g}");
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_path_matches_the_portable_one() {
        // Cheap deterministic values in [-1, 1).
        let mut state = 0x2545_f491_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let mut worst = 0.0f32;
        for (head_dim, num_kv_heads, group, block_size) in [(64, 3, 3, 16), (8, 2, 1, 1), (72, 1, 9, 3), (96, 2, 2, 5)]
        {
            if !x86::available(head_dim) {
                return;
            }
            let dims = Dims {
                num_heads: num_kv_heads * group,
                num_kv_heads,
                head_dim,
                block_size,
                scale: 1.0 / (head_dim as f32).sqrt(),
                window: (block_size != 1).then_some(13),
            };
            let num_blocks = 60usize.div_ceil(block_size) + 2;
            let row = num_kv_heads * head_dim;
            let k: Vec<f32> = (0..num_blocks * block_size * row).map(|_| 3.0 * next()).collect();
            let v: Vec<f32> = (0..k.len()).map(|_| next()).collect();
            // Blocks in reverse order, so the table matters.
            let table: Vec<u32> = (0..num_blocks as u32).rev().collect();
            let q: Vec<f32> = (0..group * head_dim).map(|_| next()).collect();
            for position in [0, 1, 7, 8, 9, 16, 17, 59] {
                let slot = TokenSlot { block_table: &table, position };
                for g in 0..num_kv_heads {
                    let (mut want, mut got) = (vec![0.0; q.len()], vec![0.0; q.len()]);
                    attend(dims, &slot, g, &q, &k, &v, &mut Vec::new(), &mut want);
                    // SAFETY: checked `available`; the table covers 60 positions.
                    unsafe { x86::attend(dims, &slot, g, &q, &k, &v, &mut Vec::new(), &mut got) };
                    for (a, b) in want.iter().zip(&got) {
                        worst = worst.max((a - b).abs());
                    }
                }
            }
        }
        assert!(worst < 1e-5, "largest difference {worst:e}");
    }
}

//! [`super::attend`] on AVX2 and FMA, for head sizes that are a multiple of 8.
//!
//! The portable loop keeps a whole head's output in memory and reduces every
//! score on its own; here the scores of eight cached positions come out of
//! one horizontal reduction, and the output of a head stays in registers
//! while the V rows stream past. A 16-sequence decode step spent a fifth of
//! its time in the portable loop.
//!
//! Each score is reduced in the same order whether its position falls in a
//! group of eight or in a block's tail, so a row's attention does not depend
//! on how its cache is paged.

use std::arch::x86_64::*;

use super::{Dims, TokenSlot};
use crate::model::vmath::x86::exp256;

/// Whether [`attend`] can run here for heads of `head_dim` values.
pub fn available(head_dim: usize) -> bool {
    head_dim.is_multiple_of(8) && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Lane `i` of the result is the sum of the lanes of `v[i]`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn sum8(v: [__m256; 8]) -> __m256 {
    let t0 = _mm256_hadd_ps(v[0], v[1]);
    let t1 = _mm256_hadd_ps(v[2], v[3]);
    let t2 = _mm256_hadd_ps(v[4], v[5]);
    let t3 = _mm256_hadd_ps(v[6], v[7]);
    let u0 = _mm256_hadd_ps(t0, t1);
    let u1 = _mm256_hadd_ps(t2, t3);
    _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(u0, u1), _mm256_permute2f128_ps::<0x31>(u0, u1))
}

/// The cached rows a query at the slot sees, block by block: `(index of the
/// run's first row among them, offset of that row of KV head g, rows)`.
fn runs<'a>(dims: &Dims, slot: &'a TokenSlot, g: usize) -> impl Iterator<Item = (usize, usize, usize)> + 'a {
    let (bs, nkv, hd) = (dims.block_size, dims.num_kv_heads, dims.head_dim);
    let (lo, end) = (dims.first_key(slot.position), slot.position + 1);
    (lo / bs..end.div_ceil(bs)).map(move |b| {
        let start = (b * bs).max(lo);
        let offset = (slot.block_table[b] as usize * bs * nkv + g) * hd + (start - b * bs) * nkv * hd;
        (start - lo, offset, ((b + 1) * bs).min(end) - start)
    })
}

/// As [`super::attend`].
///
/// # Safety
/// The CPU must support AVX2 and FMA, `dims.head_dim` must be a multiple of
/// 8, and the slot's block table must cover its positions with blocks inside
/// the caches (as `Llama::check` ensures).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn attend(
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
    let len = slot.position + 1 - dims.first_key(slot.position);
    let stride = dims.num_kv_heads * hd;
    debug_assert!(hd.is_multiple_of(8) && o.len() == qh.len());
    debug_assert!(runs(&dims, slot, g).all(|(_, off, n)| off + (n - 1) * stride + hd <= k_cache.len()));
    debug_assert_eq!(k_cache.len(), v_cache.len());
    // Scores of head h at [h * len, (h + 1) * len).
    scores.clear();
    scores.resize(group * len, 0.0);
    let scale = dims.scale;
    // SAFETY (this block): every row offset is inside the caches (the
    // caller's), every score index below group * len.
    unsafe {
        let (k, s) = (k_cache.as_ptr(), scores.as_mut_ptr());
        for (first, off, n) in runs(&dims, slot, g) {
            let mut i = 0;
            while i < n {
                let rows = (n - i).min(8);
                let row = |r: usize| k.add(off + (i + r.min(rows - 1)) * stride);
                for h in 0..group {
                    let q = qh.as_ptr().add(h * hd);
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for c in (0..hd).step_by(8) {
                        let qv = _mm256_loadu_ps(q.add(c));
                        for (r, a) in acc.iter_mut().enumerate() {
                            *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(row(r).add(c)), *a);
                        }
                    }
                    let mut out = [0.0f32; 8];
                    _mm256_storeu_ps(out.as_mut_ptr(), _mm256_mul_ps(sum8(acc), _mm256_set1_ps(scale)));
                    std::ptr::copy_nonoverlapping(out.as_ptr(), s.add(h * len + first + i), rows);
                }
                i += rows;
            }
        }
    }
    for head in scores.chunks_exact_mut(len) {
        let inv = 1.0 / softmax_numerators(head);
        head.iter_mut().for_each(|x| *x *= inv);
    }
    for (h, oh) in o.chunks_exact_mut(hd).enumerate() {
        let weights = &scores[h * len..(h + 1) * len];
        let mut c = 0;
        // SAFETY (all): as above; `c + 8 * R <= hd`.
        unsafe {
            while c + 64 <= hd {
                weighted_rows::<8>(&dims, slot, g, v_cache, weights, c, oh);
                c += 64;
            }
            while c + 32 <= hd {
                weighted_rows::<4>(&dims, slot, g, v_cache, weights, c, oh);
                c += 32;
            }
            while c + 16 <= hd {
                weighted_rows::<2>(&dims, slot, g, v_cache, weights, c, oh);
                c += 16;
            }
            while c < hd {
                weighted_rows::<1>(&dims, slot, g, v_cache, weights, c, oh);
                c += 8;
            }
        }
    }
}

/// Replaces `scores` by `e^(s - max)` and returns their sum.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn softmax_numerators(scores: &mut [f32]) -> f32 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let m = _mm256_set1_ps(max);
    let mut total = _mm256_setzero_ps();
    let mut chunks = scores.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: 8 values.
        unsafe {
            let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            total = _mm256_add_ps(total, e);
        }
    }
    let tail = chunks.into_remainder();
    if !tail.is_empty() {
        // The tail through the same exponential, padded with -inf (e^-inf = 0).
        let mut pad = [f32::NEG_INFINITY; 8];
        pad[..tail.len()].copy_from_slice(tail);
        let mut out = [0.0f32; 8];
        // SAFETY: 8 values each.
        unsafe {
            let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(pad.as_ptr()), m));
            _mm256_storeu_ps(out.as_mut_ptr(), e);
            total = _mm256_add_ps(total, e);
        }
        tail.copy_from_slice(&out[..tail.len()]);
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: 8 values.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
    lanes.iter().sum()
}

/// `out[c..c + 8R] = Σ_p weights[p] * V[p][c..c + 8R]`, the output
/// columns kept in `R` registers while the rows go past.
///
/// # Safety
/// As [`attend`]; `c + 8 * R <= head_dim`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_rows<const R: usize>(
    dims: &Dims,
    slot: &TokenSlot,
    g: usize,
    v_cache: &[f32],
    weights: &[f32],
    c: usize,
    out: &mut [f32],
) {
    let stride = dims.num_kv_heads * dims.head_dim;
    let mut acc = [_mm256_setzero_ps(); R];
    let v = v_cache.as_ptr();
    for (first, off, n) in runs(dims, slot, g) {
        for i in 0..n {
            // SAFETY: the caller's.
            unsafe {
                let w = _mm256_set1_ps(*weights.get_unchecked(first + i));
                let row = v.add(off + i * stride + c);
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(row.add(8 * r)), *a);
                }
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        // SAFETY: c + 8R <= head_dim = out.len().
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c + 8 * r), *a) };
    }
}

//! AVX2 products of K-quant weight rows with [`SuperRows`], after
//! llama.cpp's `ggml_vec_dot_q{4,5,6}_K_q8_K`.
//!
//! Each super-block is unpacked once per weight row into eight registers of
//! 32 unsigned quants (in value order, as the activations are) and met by
//! up to `R` activation rows: `maddubs` of quants and activations, `madd`
//! with the sub-block scales as 16-bit lanes, summed as integers over the
//! whole block. Per block and row, two float multiply-adds remain: the
//! integer sum times `d_w * d_x`, and the activations' 16-value sums
//! weighted by the minimums (`Q4_K`, `Q5_K`) or by the scales times the
//! offset 32 (`Q6_K`). Every row goes through the same instructions
//! whatever else shares its tile.

use std::arch::x86_64::*;
use std::ops::Range;

use super::super_blocks::{Q4KBlock, Q5KBlock, Q6KBlock, SuperRows, QK_K};
use super::x86::{f16_to_f32, hsum};

/// One super-block ready to multiply: sub-register `s` of quants and its
/// scales, the 16-bit weights of the activation sums, and the float
/// factors of the integer sum and of the weighted sums.
pub(super) trait Unpack {
    /// Quants of values `32 s .. 32 s + 32` as unsigned bytes, and their
    /// scales as 16 lanes of i16 (lanes 0..8 for the first 16 values).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    unsafe fn quants(&self, s: usize) -> (__m256i, __m256i);
    /// Lane `g` weighs the sum of the activations' group `g` of 16 values.
    ///
    /// # Safety
    /// As [`Unpack::quants`].
    unsafe fn sum_weights(&self) -> __m256i;
    /// `(factor of the integer sum, factor of the weighted sums)`.
    ///
    /// # Safety
    /// The CPU must support F16C.
    unsafe fn factors(&self) -> (f32, f32);
}

#[inline]
#[target_feature(enable = "avx2")]
fn low_nibbles(qs: &[u8; QK_K / 2], s: usize) -> __m256i {
    // SAFETY: 32 bytes at 32 (s / 2) < 128.
    let q = unsafe { _mm256_loadu_si256(qs.as_ptr().add(32 * (s / 2)).cast()) };
    let q = if s.is_multiple_of(2) { q } else { _mm256_srli_epi16::<4>(q) };
    _mm256_and_si256(q, _mm256_set1_epi8(0x0F))
}

/// Lane `g` is `m[g / 2]`: each minimum covers two groups of 16.
#[inline]
#[target_feature(enable = "avx2")]
fn mins_per_group(mins: &[u8; 8]) -> __m256i {
    // SAFETY: 8 bytes from an [u8; 8].
    let m = _mm_cvtepu8_epi16(unsafe { _mm_loadl_epi64(mins.as_ptr().cast()) });
    _mm256_set_m128i(_mm_unpackhi_epi16(m, m), _mm_unpacklo_epi16(m, m))
}

impl Unpack for Q4KBlock {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn quants(&self, s: usize) -> (__m256i, __m256i) {
        (low_nibbles(&self.qs, s), _mm256_set1_epi16(i16::from(self.scales[s])))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sum_weights(&self) -> __m256i {
        mins_per_group(&self.mins)
    }

    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn factors(&self) -> (f32, f32) {
        (f16_to_f32(self.d), f16_to_f32(self.dmin))
    }
}

impl Unpack for Q5KBlock {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn quants(&self, s: usize) -> (__m256i, __m256i) {
        // SAFETY: the caller's; 32 bytes from a [u8; 32].
        let (low, scale) = unsafe { self.low.quants(s) };
        let qh = unsafe { _mm256_loadu_si256(self.qh.as_ptr().cast()) };
        let fifth = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(s as i32)), _mm256_set1_epi8(1));
        (_mm256_or_si256(low, _mm256_slli_epi16::<4>(fifth)), scale)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sum_weights(&self) -> __m256i {
        mins_per_group(&self.low.mins)
    }

    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn factors(&self) -> (f32, f32) {
        // SAFETY: the caller's.
        unsafe { self.low.factors() }
    }
}

impl Unpack for Q6KBlock {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn quants(&self, s: usize) -> (__m256i, __m256i) {
        let (half, t) = (s / 4, s % 4);
        // SAFETY: 32 bytes at 64 half + 32 (t % 2) + 32 <= 128 of ql and at
        // 32 half + 32 <= 64 of qh.
        let (ql, qh) = unsafe {
            (
                _mm256_loadu_si256(self.ql.as_ptr().add(64 * half + 32 * (t % 2)).cast()),
                _mm256_loadu_si256(self.qh.as_ptr().add(32 * half).cast()),
            )
        };
        let low = if t < 2 { ql } else { _mm256_srli_epi16::<4>(ql) };
        let low = _mm256_and_si256(low, _mm256_set1_epi8(0x0F));
        let top = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * t as i32)), _mm256_set1_epi8(3));
        let scales = _mm256_set_m128i(
            _mm_set1_epi16(i16::from(self.scales[2 * s + 1])),
            _mm_set1_epi16(i16::from(self.scales[2 * s])),
        );
        (_mm256_or_si256(low, _mm256_slli_epi16::<4>(top)), scales)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sum_weights(&self) -> __m256i {
        // SAFETY: 16 bytes from an [i8; 16].
        _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(self.scales.as_ptr().cast()) })
    }

    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn factors(&self) -> (f32, f32) {
        // The quants are stored plus 32: subtract 32 times the scaled sums.
        let d = f16_to_f32(self.d);
        (d, 32.0 * d)
    }
}

/// `out[r][j] = w[j] · x[i0 + r]` for the weight rows `rows`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` and `x` must have the same
/// blocks per row, `x` at least `i0 + R` rows, and each `out[r]` must be
/// valid for writes at `rows`, which nobody else writes meanwhile.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile<B: Unpack, const R: usize>(
    blocks: &[B],
    k: usize,
    rows: Range<usize>,
    x: &SuperRows,
    i0: usize,
    out: [*mut f32; R],
) {
    for j in rows {
        let mut main = [_mm256_setzero_ps(); R];
        let mut sums = [_mm256_setzero_ps(); R];
        for (b, block) in blocks[j * k..(j + 1) * k].iter().enumerate() {
            let mut dots = [_mm256_setzero_si256(); R];
            for s in 0..8 {
                // SAFETY: the CPU has the features.
                let (q, scales) = unsafe { block.quants(s) };
                for (r, dot) in dots.iter_mut().enumerate() {
                    // SAFETY: row i0 + r < x.rows, block b < k; 32 of 256 bytes.
                    let xq =
                        unsafe { _mm256_loadu_si256(x.qs.get_unchecked((i0 + r) * k + b).as_ptr().add(32 * s).cast()) };
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, xq), scales);
                    *dot = _mm256_add_epi32(*dot, p);
                }
            }
            // SAFETY: the CPU has the features.
            let (weights, (dw, dm)) = unsafe { (block.sum_weights(), block.factors()) };
            for r in 0..R {
                let xb = (i0 + r) * k + b;
                // SAFETY: xb < x.d.len(); 16 i16 from an [i16; 16].
                let (dx, group_sums) =
                    unsafe { (*x.d.get_unchecked(xb), _mm256_loadu_si256(x.bsums.get_unchecked(xb).as_ptr().cast())) };
                let weighted = _mm256_madd_epi16(group_sums, weights);
                main[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dx), _mm256_cvtepi32_ps(dots[r]), main[r]);
                sums[r] = _mm256_fmadd_ps(_mm256_set1_ps(dm * dx), _mm256_cvtepi32_ps(weighted), sums[r]);
            }
        }
        for r in 0..R {
            // SAFETY: out[r] is valid at j (the caller's).
            unsafe { *out[r].add(j) = hsum(main[r]) - hsum(sums[r]) };
        }
    }
}

//! AVX2 products of quantized weight rows with [`QuantizedRows`], after
//! llama.cpp's `ggml_vec_dot_q4_1_q8_1` and `ggml_vec_dot_q8_0_q8_0`.
//!
//! For each weight row, the per-block scale products `d_w * d_x` (and the
//! `Q4_1` minimum term `Σ m_w * s_x`) of every activation row of the tile are
//! computed eight blocks at a time first; then each weight block is loaded
//! and unpacked once and multiplied with up to `R` activation rows, with two
//! accumulators per row (even and odd blocks) so that consecutive blocks do
//! not wait on one another. Every row goes through the same instructions
//! whatever `R` is and whatever rows share its tile, so results never depend
//! on batch composition.
//!
//! Each tile comes twice: with AVX2's two-step byte products, and with
//! AVX-512 VNNI's one-step ones where the CPU has them (20-40% more per core
//! here), chosen at run time. Both give the same integer lanes, so results do
//! not depend on the CPU either.

use std::arch::x86_64::*;
use std::ops::Range;

use super::blocks::{Format, Q5Quants, QMatrix, QuantizedRows, Q8_0, QK};

/// Whether this CPU can run the kernels here (`is_x86_feature_detected`
/// caches its answer, so this is cheap).
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn f16_to_f32(bits: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// `scales[b] = d_w[b] * d_x[b]` and, when `m_w` is given, `Σ_b m_w[b] * s_x[b]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn block_scales(d_w: &[u16], m_w: Option<&[u16]>, d_x: &[f32], s_x: &[f32], scales: &mut [f32]) -> f32 {
    let k = d_w.len();
    let mut offset = _mm256_setzero_ps();
    let mut b = 0;
    while b + 8 <= k {
        // SAFETY: b + 8 <= k, the length of every slice here.
        unsafe {
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(d_w.as_ptr().add(b).cast()));
            _mm256_storeu_ps(scales.as_mut_ptr().add(b), _mm256_mul_ps(dw, _mm256_loadu_ps(d_x.as_ptr().add(b))));
            if let Some(m_w) = m_w {
                let mw = _mm256_cvtph_ps(_mm_loadu_si128(m_w.as_ptr().add(b).cast()));
                offset = _mm256_fmadd_ps(mw, _mm256_loadu_ps(s_x.as_ptr().add(b)), offset);
            }
        }
        b += 8;
    }
    let mut total = hsum(offset);
    for b in b..k {
        scales[b] = f16_to_f32(d_w[b]) * d_x[b];
        if let Some(m_w) = m_w {
            total = f16_to_f32(m_w[b]).mul_add(s_x[b], total);
        }
    }
    total
}

/// Multiplies the blocks of one weight row with `R` activation rows:
/// `out[r][j] = Σ_b scales[r][b] * (w_b · x_rb) + offset[r]`.
/// `$unpack(b)` loads weight block `b` as `(w, sign)` and `$dot(w, sign, x)`
/// gives the eight i32 lanes of one block's integer products. A macro, not a
/// function taking closures: closures would not inline across the
/// `target_feature` boundary, costing a call per block.
macro_rules! row_products {
    ($k:expr, $xq:expr, $scales:expr, $offset:expr, $out:expr, $j:expr, $unpack:expr, $dot:expr) => {{
        let (k, xq, scales, offset, out, j) = ($k, $xq, $scales, $offset, $out, $j);
        let mut even = [_mm256_setzero_ps(); R];
        let mut odd = [_mm256_setzero_ps(); R];
        let step = |b: usize, acc: &mut [__m256; R]| {
            let (w, sign) = $unpack(b);
            for r in 0..R {
                // SAFETY: b < k, the length of every activation row.
                let x = unsafe { _mm256_loadu_si256(xq[r].get_unchecked(b).as_ptr().cast()) };
                let p = _mm256_cvtepi32_ps($dot(w, sign, x));
                let scale = unsafe { *scales.get_unchecked(r * k + b) };
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scale), p, acc[r]);
            }
        };
        let mut b = 0;
        while b + 2 <= k {
            step(b, &mut even);
            step(b + 1, &mut odd);
            b += 2;
        }
        if b < k {
            step(b, &mut even);
        }
        for r in 0..R {
            // SAFETY: out[r] is valid at j (the tile's caller).
            unsafe { *out[r].add(j) = hsum(_mm256_add_ps(even[r], odd[r])) + offset[r] };
        }
    }};
}

/// Quants of 32 values in nibbles, as [`super::Q4_1`] and [`super::Q5`] keep them.
pub(super) trait Nibbles {
    /// The 32 values as unsigned bytes, value `i` in byte `i`.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    unsafe fn unpack(&self) -> __m256i;
}

/// Byte `j` of the quants holds value `j` in its low nibble and `j + 16` in
/// its high one: the 16 bytes in both lanes, the high lane shifted to its
/// high nibbles.
#[inline]
#[target_feature(enable = "avx2")]
fn low_nibbles(qs: &[u8; QK / 2]) -> __m256i {
    // SAFETY: 16 bytes from a [u8; 16].
    let q = unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(qs.as_ptr().cast())) };
    _mm256_and_si256(_mm256_srlv_epi64(q, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0F))
}

impl Nibbles for [u8; QK / 2] {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn unpack(&self) -> __m256i {
        low_nibbles(self)
    }
}

impl Nibbles for Q5Quants {
    /// The nibbles, and value `i`'s fifth bit from bit `i` of `qh`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn unpack(&self) -> __m256i {
        // Byte i of the spread `qh` is byte i / 8 of it; `bit` picks bit i % 8.
        let spread = _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303);
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        let spread = _mm256_shuffle_epi8(_mm256_set1_epi32(self.qh as i32), spread);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_or_si256(low_nibbles(&self.qs), _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
    }
}

/// Stamps out the tiles for one way of taking a block's integer dot product:
/// `$dot!(w, x)` gives the eight i32 lanes of `Σ w[i] * x[i]` over
/// each four bytes, `w` unsigned and `x` signed.
macro_rules! tiles {
    ($features:literal, $nibbles:ident, $q8_0:ident, $dot:ident) => {
        /// `out[r][j] = w[j] · x[i0 + r]` for the weight rows `rows` of a matrix of
        /// unsigned nibble quants with minimums ([`super::Q4_1`], [`super::Q5`]).
        ///
        /// # Safety
        /// The CPU must support the target features ([`available`], and [`vnni`]
        /// for the VNNI tiles); `w` and `x` must have the same blocks per row, `x`
        /// at least `i0 + R` rows, `scales` at least `R * k` values, and each
        /// `out[r]` must be valid for writes at `rows`, which nobody else writes
        /// meanwhile.
        #[target_feature(enable = $features)]
        pub unsafe fn $nibbles<F: Format<Quants: Nibbles>, const R: usize>(
            w: &QMatrix<F>,
            rows: Range<usize>,
            x: &QuantizedRows,
            i0: usize,
            out: [*mut f32; R],
            scales: &mut [f32],
        ) {
            let k = w.k;
            let mask = _mm256_set1_epi8(0x0F);
            let xq: [&[[i8; QK]]; R] = std::array::from_fn(|r| &x.qs[(i0 + r) * k..(i0 + r + 1) * k]);
            for j in rows {
                let row = j * k..(j + 1) * k;
                let (d_w, m_w, q_w) = (&w.d[row.clone()], &w.m[row.clone()], &w.qs[row]);
                let offset: [f32; R] = std::array::from_fn(|r| {
                    let xr = (i0 + r) * k..(i0 + r + 1) * k;
                    block_scales(d_w, Some(m_w), &x.d[xr.clone()], &x.s[xr], &mut scales[r * k..(r + 1) * k])
                });
                row_products!(
                    k,
                    xq,
                    &*scales,
                    offset,
                    out,
                    j,
                    // SAFETY: b < k; the CPU has the features.
                    |b: usize| (unsafe { q_w.get_unchecked(b).unpack() }, mask),
                    |w: __m256i, _: __m256i, x: __m256i| $dot!(w, x)
                );
            }
        }

        /// As the nibble tile of the same features, for a `Q8_0` matrix.
        ///
        /// # Safety
        /// As the nibble tile.
        #[target_feature(enable = $features)]
        pub unsafe fn $q8_0<const R: usize>(
            w: &QMatrix<Q8_0>,
            rows: Range<usize>,
            x: &QuantizedRows,
            i0: usize,
            out: [*mut f32; R],
            scales: &mut [f32],
        ) {
            let k = w.k;
            let xq: [&[[i8; QK]]; R] = std::array::from_fn(|r| &x.qs[(i0 + r) * k..(i0 + r + 1) * k]);
            for j in rows {
                let row = j * k..(j + 1) * k;
                let (d_w, q_w) = (&w.d[row.clone()], &w.qs[row]);
                let offset: [f32; R] = std::array::from_fn(|r| {
                    let xr = (i0 + r) * k..(i0 + r + 1) * k;
                    block_scales(d_w, None, &x.d[xr.clone()], &x.s[xr], &mut scales[r * k..(r + 1) * k])
                });
                row_products!(
                    k,
                    xq,
                    &*scales,
                    offset,
                    out,
                    j,
                    |b: usize| {
                        // SAFETY: b < k; 32 bytes from an [i8; 32].
                        let q = unsafe { _mm256_loadu_si256(q_w.get_unchecked(b).as_ptr().cast()) };
                        // The unsigned-by-signed products take |w| times x with w's sign.
                        (_mm256_sign_epi8(q, q), q)
                    },
                    |aw: __m256i, w: __m256i, x: __m256i| $dot!(aw, _mm256_sign_epi8(x, w))
                );
            }
        }
    };
}

/// AVX2: pairs of byte products to i16 (`maddubs`), then pairs of those to
/// i32. The i16 step cannot saturate here: the weights' magnitudes are at
/// most 128 and the activations' at most 127, so a pair is at most 32,512.
macro_rules! madd_dot {
    ($w:expr, $x:expr) => {
        _mm256_madd_epi16(_mm256_maddubs_epi16($w, $x), _mm256_set1_epi16(1))
    };
}

/// AVX-512 VNNI: four byte products straight to i32, one instruction. With
/// no saturation in [`madd_dot`], both give the same lanes, so a product's
/// bits do not depend on the CPU.
macro_rules! vnni_dot {
    ($w:expr, $x:expr) => {
        _mm256_dpbusd_epi32(_mm256_setzero_si256(), $w, $x)
    };
}

tiles!("avx2,fma,f16c", tile_nibbles, tile_q8_0, madd_dot);
tiles!("avx2,fma,f16c,avx512vnni,avx512vl", tile_nibbles_vnni, tile_q8_0_vnni, vnni_dot);

/// Whether this CPU also has AVX-512 VNNI for 256-bit vectors (cached, as
/// [`available`]).
pub fn vnni() -> bool {
    is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
}

/// Quantizes one row; the same values as [`super::blocks::quantize_row_q8`].
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.len()` must be `32 * d.len()`, and
/// `s` and `qs` as long as `d`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_row_q8(x: &[f32], d: &mut [f32], s: &mut [f32], qs: &mut [[i8; QK]]) {
    let sign_mask = _mm256_set1_ps(-0.0);
    for (((chunk, d), s), q) in x.chunks_exact(QK).zip(d).zip(s).zip(qs) {
        // SAFETY: 32 floats in four loads.
        let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(chunk.as_ptr().add(8 * i)) });
        let mut amax = _mm256_andnot_ps(sign_mask, v[0]);
        for vi in &v[1..] {
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, *vi));
        }
        let amax = {
            let m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
        };
        *d = amax / 127.0;
        let inv = _mm256_set1_ps(if *d == 0.0 { 0.0 } else { 1.0 / *d });
        let mut sum = _mm256_setzero_si256();
        let mut q32 = [_mm256_setzero_si256(); 4];
        for (qi, vi) in q32.iter_mut().zip(v) {
            let scaled = _mm256_mul_ps(vi, inv);
            // Round half away from zero, as f32::round: add 0.5 with x's sign, truncate.
            let half = _mm256_or_ps(_mm256_and_ps(scaled, sign_mask), _mm256_set1_ps(0.5));
            *qi = _mm256_cvttps_epi32(_mm256_add_ps(scaled, half));
            sum = _mm256_add_epi32(sum, *qi);
        }
        // Pack 4 x 8 i32 into 32 i8 in order (packs work per 128-bit lane).
        let p16a = _mm256_packs_epi32(q32[0], q32[1]);
        let p16b = _mm256_packs_epi32(q32[2], q32[3]);
        let p8 = _mm256_packs_epi16(p16a, p16b);
        let p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: 32 bytes into an [i8; 32].
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().cast(), p8) };
        let t = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
        let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01));
        *s = *d * _mm_cvtsi128_si32(t) as f32;
    }
}

//! x86 products of K-quant [`SuperMatrix`] groups with [`SuperRows`].
//!
//! As the 32-value formats' tiles: each sub-block of 32 values of a group's
//! super-block is unpacked once into eight chunk registers (16 rows x 4
//! quants) and met by up to `R` activation rows, the chunk's four activation
//! bytes broadcast to every lane. A sub-block's (or, for `Q6_K`, each 16
//! values') integer sum is multiplied by its lanes' scales as integers; the
//! activations' 16-value sums, weighted by the minimums (or the `Q6_K`
//! scales), are one `madd` per pair of groups. Per super-block two float
//! multiply-adds remain per lane, in [`SuperMatrix::dot`]'s order, so every
//! version gives the portable bits.

use std::arch::x86_64::*;
use std::ops::Range;

use super::blocks::GROUP;
use super::super_blocks::{SuperFormat, SuperGroup, SuperMatrix, SuperRows};
use super::x86::{store16, store8};

/// Activation bytes `4c..4c + 4` from `xq`, as one i32.
#[inline(always)]
unsafe fn bytes4(xq: *const i8, c: usize) -> i32 {
    // SAFETY: the caller's block holds them.
    unsafe { xq.add(4 * c).cast::<i32>().read_unaligned() }
}

/// Eight chunks of sub-block `s` of all 16 rows, as unsigned bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn chunks512<F: SuperFormat>(block: &SuperGroup<F>, s: usize) -> [__m512i; 8] {
    let (mask, planes) = (_mm512_set1_epi8(0x0F), (&raw const block.planes).cast::<u8>());
    std::array::from_fn(|c| {
        // SAFETY: chunk c of sub-block pair s / 2 lies in the 2048 bytes of nibbles.
        let l = unsafe { _mm512_loadu_si512(block.nibbles.as_ptr().add(64 * (8 * (s / 2) + c)).cast()) };
        let mut q = _mm512_and_si512(if s.is_multiple_of(2) { l } else { _mm512_srli_epi16(l, 4) }, mask);
        for h in 0..F::HIGH_BITS {
            // SAFETY: plane h's mask of chunk 8 s + c, within 512 * HIGH_BITS bytes.
            let bits = unsafe { planes.add(512 * h + 8 * (8 * s + c)).cast::<u64>().read_unaligned() };
            q = _mm512_mask_add_epi8(q, bits, q, _mm512_set1_epi8(16 << h));
        }
        q
    })
}

/// `out[r][j] = w[j] · x[i0 + r]` for the weight rows `rows` (whole groups,
/// the last one possibly cut), with 512-bit registers.
///
/// # Safety
/// The CPU must have [`super::x86::avx512`]; `rows.start` must be a
/// multiple of [`GROUP`] and `rows.end` at most `w.rows`; `x` must have
/// `w`'s super-blocks per row and at least `i0 + R` rows; each `out[r]` must
/// be valid for writes at `rows`, which nobody else writes meanwhile.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn tile_avx512<F: SuperFormat, const R: usize>(
    w: &SuperMatrix<F>,
    rows: Range<usize>,
    x: &SuperRows,
    i0: usize,
    out: [*mut f32; R],
) {
    let k = w.k;
    debug_assert!(rows.start.is_multiple_of(GROUP) && rows.end <= w.rows && x.rows >= i0 + R && x.k == k);
    for start in rows.clone().step_by(GROUP) {
        let mut main = [_mm512_setzero_ps(); R];
        let mut sums = [_mm512_setzero_ps(); R];
        for (b, block) in w.blocks[start / GROUP * k..][..k].iter().enumerate() {
            let mut dots = [_mm512_setzero_si512(); R];
            for s in 0..8 {
                // SAFETY: the CPU has the features.
                let q = unsafe { chunks512(block, s) };
                // SAFETY (both): 16 scales of groups 2s and 2s + 1.
                let low = _mm512_cvtepi8_epi32(unsafe { _mm_loadu_si128(block.scales.as_ptr().add(32 * s).cast()) });
                let high =
                    _mm512_cvtepi8_epi32(unsafe { _mm_loadu_si128(block.scales.as_ptr().add(32 * s + 16).cast()) });
                for (r, dot) in dots.iter_mut().enumerate() {
                    // SAFETY: row i0 + r < x.rows, super-block b < k; 32 of its 256 bytes.
                    let xq = unsafe { x.qs.get_unchecked((i0 + r) * k + b).as_ptr().add(32 * s) };
                    let (mut first, mut second) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                    for c in 0..4 {
                        // SAFETY: within the sub-block's 32 bytes.
                        let (a, z) = unsafe { (bytes4(xq, c), bytes4(xq, c + 4)) };
                        first = _mm512_dpbusd_epi32(first, q[c], _mm512_set1_epi32(a));
                        second = _mm512_dpbusd_epi32(second, q[c + 4], _mm512_set1_epi32(z));
                    }
                    *dot = if F::OFFSET_32 {
                        // Q6_K: a scale per 16 values.
                        _mm512_add_epi32(
                            *dot,
                            _mm512_add_epi32(_mm512_mullo_epi32(first, low), _mm512_mullo_epi32(second, high)),
                        )
                    } else {
                        _mm512_add_epi32(*dot, _mm512_mullo_epi32(_mm512_add_epi32(first, second), low))
                    };
                }
            }
            // SAFETY (both): 16 f16 values of a [u16; 16].
            let dw = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(block.d.as_ptr().cast()) });
            let dm = if F::OFFSET_32 {
                _mm512_mul_ps(_mm512_set1_ps(32.0), dw)
            } else {
                _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(block.dmin.as_ptr().cast()) })
            };
            for (r, main) in main.iter_mut().enumerate() {
                // SAFETY: xb < x.d.len().
                let dx = _mm512_set1_ps(unsafe { *x.d.get_unchecked((i0 + r) * k + b) });
                *main = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r]), _mm512_mul_ps(dw, dx), *main);
            }
            let mut weighted = [_mm512_setzero_si512(); R];
            for t in 0..8 {
                // SAFETY: the weights of groups 2t, 2t + 1: 32 of 256 bytes.
                let pair =
                    _mm512_cvtepi8_epi16(unsafe { _mm256_loadu_si256(block.weights.as_ptr().add(32 * t).cast()) });
                for (r, weighted) in weighted.iter_mut().enumerate() {
                    // SAFETY: two of the block's 16 i16 sums.
                    let sums = unsafe { x.bsums.get_unchecked((i0 + r) * k + b).as_ptr().add(2 * t).cast::<i32>() };
                    let sums = _mm512_set1_epi32(unsafe { sums.read_unaligned() });
                    *weighted = _mm512_add_epi32(*weighted, _mm512_madd_epi16(pair, sums));
                }
            }
            for (r, sums) in sums.iter_mut().enumerate() {
                // SAFETY: xb < x.d.len().
                let dx = _mm512_set1_ps(unsafe { *x.d.get_unchecked((i0 + r) * k + b) });
                *sums = _mm512_fmadd_ps(_mm512_cvtepi32_ps(weighted[r]), _mm512_mul_ps(dm, dx), *sums);
            }
        }
        for r in 0..R {
            // SAFETY: out[r] is valid at start..rows.end (the caller's).
            unsafe { store16(_mm512_sub_ps(main[r], sums[r]), out[r], start..rows.end) };
        }
    }
}

/// Eight chunks of sub-block `s` of rows `8 half..8 half + 8`, as unsigned bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn chunks256<F: SuperFormat>(block: &SuperGroup<F>, s: usize, half: usize) -> [__m256i; 8] {
    let (mask, planes) = (_mm256_set1_epi8(0x0F), (&raw const block.planes).cast::<u8>());
    // Byte i of the spread mask is byte i / 8 of it; `bit` picks bit i % 8.
    let spread = _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303);
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    std::array::from_fn(|c| {
        // SAFETY: this half of chunk c of sub-block pair s / 2.
        let l = unsafe { _mm256_loadu_si256(block.nibbles.as_ptr().add(64 * (8 * (s / 2) + c) + 32 * half).cast()) };
        let mut q = _mm256_and_si256(if s.is_multiple_of(2) { l } else { _mm256_srli_epi16(l, 4) }, mask);
        for h in 0..F::HIGH_BITS {
            // SAFETY: this half's four bytes of plane h's mask of chunk 8 s + c.
            let bits = unsafe { planes.add(512 * h + 8 * (8 * s + c) + 4 * half).cast::<i32>().read_unaligned() };
            let set =
                _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(bits), spread), bit), bit);
            q = _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(16 << h)));
        }
        q
    })
}

/// As [`tile_avx512`], with AVX2: each group as two halves of eight rows.
///
/// # Safety
/// As [`tile_avx512`], with [`super::x86::available`] for the CPU.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_avx2<F: SuperFormat, const R: usize>(
    w: &SuperMatrix<F>,
    rows: Range<usize>,
    x: &SuperRows,
    i0: usize,
    out: [*mut f32; R],
) {
    let k = w.k;
    debug_assert!(rows.start.is_multiple_of(GROUP) && rows.end <= w.rows && x.rows >= i0 + R && x.k == k);
    let ones = _mm256_set1_epi16(1);
    for start in rows.clone().step_by(GROUP) {
        for half in 0..2 {
            let first_row = start + 8 * half;
            if first_row >= rows.end {
                break;
            }
            let mut main = [_mm256_setzero_ps(); R];
            let mut sums = [_mm256_setzero_ps(); R];
            for (b, block) in w.blocks[start / GROUP * k..][..k].iter().enumerate() {
                let mut dots = [_mm256_setzero_si256(); R];
                for s in 0..8 {
                    // SAFETY: the CPU has the features; half is 0 or 1.
                    let q = unsafe { chunks256(block, s, half) };
                    // SAFETY (both): this half's 8 scales of groups 2s and 2s + 1.
                    let scales = block.scales.as_ptr();
                    let low = _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(scales.add(32 * s + 8 * half).cast()) });
                    let high =
                        _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(scales.add(32 * s + 16 + 8 * half).cast()) });
                    for (r, dot) in dots.iter_mut().enumerate() {
                        // SAFETY: as in `tile_avx512`.
                        let xq = unsafe { x.qs.get_unchecked((i0 + r) * k + b).as_ptr().add(32 * s) };
                        let (mut first, mut second) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                        for c in 0..4 {
                            // SAFETY: within the sub-block's 32 bytes. No i16 pair saturates:
                            // at most 2 * 63 * 127.
                            let (a, z) = unsafe { (bytes4(xq, c), bytes4(xq, c + 4)) };
                            let pa = _mm256_madd_epi16(_mm256_maddubs_epi16(q[c], _mm256_set1_epi32(a)), ones);
                            let pz = _mm256_madd_epi16(_mm256_maddubs_epi16(q[c + 4], _mm256_set1_epi32(z)), ones);
                            first = _mm256_add_epi32(first, pa);
                            second = _mm256_add_epi32(second, pz);
                        }
                        *dot = if F::OFFSET_32 {
                            _mm256_add_epi32(
                                *dot,
                                _mm256_add_epi32(_mm256_mullo_epi32(first, low), _mm256_mullo_epi32(second, high)),
                            )
                        } else {
                            _mm256_add_epi32(*dot, _mm256_mullo_epi32(_mm256_add_epi32(first, second), low))
                        };
                    }
                }
                // SAFETY (both): 8 f16 values of a [u16; 16] from 8 * half.
                let dw = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(block.d.as_ptr().add(8 * half).cast()) });
                let dm = if F::OFFSET_32 {
                    _mm256_mul_ps(_mm256_set1_ps(32.0), dw)
                } else {
                    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(block.dmin.as_ptr().add(8 * half).cast()) })
                };
                let mut weighted = [_mm256_setzero_si256(); R];
                for t in 0..8 {
                    // SAFETY: this half's weights of groups 2t, 2t + 1: 16 of 256 bytes.
                    let pair = _mm256_cvtepi8_epi16(unsafe {
                        _mm_loadu_si128(block.weights.as_ptr().add(32 * t + 16 * half).cast())
                    });
                    for (r, weighted) in weighted.iter_mut().enumerate() {
                        // SAFETY: two of the block's 16 i16 sums.
                        let sums = unsafe { x.bsums.get_unchecked((i0 + r) * k + b).as_ptr().add(2 * t).cast::<i32>() };
                        let sums = _mm256_set1_epi32(unsafe { sums.read_unaligned() });
                        *weighted = _mm256_add_epi32(*weighted, _mm256_madd_epi16(pair, sums));
                    }
                }
                for r in 0..R {
                    // SAFETY: xb < x.d.len().
                    let dx = _mm256_set1_ps(unsafe { *x.d.get_unchecked((i0 + r) * k + b) });
                    main[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r]), _mm256_mul_ps(dw, dx), main[r]);
                    sums[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(weighted[r]), _mm256_mul_ps(dm, dx), sums[r]);
                }
            }
            for r in 0..R {
                // SAFETY: out[r] is valid at first_row..rows.end (the caller's).
                unsafe { store8(_mm256_sub_ps(main[r], sums[r]), out[r], first_row..rows.end) };
            }
        }
    }
}

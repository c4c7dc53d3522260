//! x86 products of [`QMatrix`] groups with [`QuantizedRows`].
//!
//! A tile computes one weight group's 16 outputs for up to eight activation
//! rows: each block of the group is loaded and unpacked once into its eight
//! chunk registers (16 rows x 4 bytes each), then for each activation row the
//! chunk's four activation bytes are broadcast and multiplied with all 16
//! rows at once. The block's integer sums come out one per lane, so no
//! horizontal sums are needed, and each lane's float steps are the portable
//! [`super::scalar::dot`]'s: a row's result does not depend on the tile, the
//! batch or the CPU.
//!
//! Two versions: AVX-512 VNNI (`vpdpbusd` on 512-bit registers, four byte
//! products to i32 in one instruction) where the CPU has it, and AVX2
//! (`maddubs` + `madd`, the group as two halves of eight lanes) elsewhere.

use std::arch::x86_64::*;
use std::ops::Range;

use super::blocks::{Packing, QMatrix, QuantizedRows, GROUP, Q4_1, Q5, Q8_0, QK};
use super::super_blocks::QK_K;

/// Whether this CPU can run the kernels here (`is_x86_feature_detected`
/// caches its answer, so this is cheap).
pub fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

/// Whether this CPU also has the AVX-512 subsets of [`tile_avx512`].
pub fn avx512() -> bool {
    available()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// How far ahead of the block a tile multiplies it asks for the weights, into L2: 8 KiB, a
/// couple of microseconds of the stream. The hardware prefetchers alone kept a decode step
/// waiting on every block (SmolLM2 Q4_1 on the AVX-512 tile, 2 threads: a step of one row
/// 4.4 → 3.1 ms, of five 10.8 → 6.2 ms, with 4 KiB ahead into L1). Into L2, whose queue keeps
/// more lines in flight than L1's fill buffers, and further ahead, alternating runs of one
/// build: a one-row step 3.3-4.2 → 3.0-3.7 ms, five rows 4.8-5.7 → 4.7-5.4 ms; Gemma 3
/// Q4_K_M (its `Q5_0` and `Q8_0` matrices) 12.3-12.4 → 11.7 ms and 17.6-17.7 → 15.8 ms.
const BLOCK_PREFETCH_AHEAD: usize = 8192;

/// Asks the CPU to bring the cache lines of a `T` at [`BLOCK_PREFETCH_AHEAD`] bytes past
/// `block` into L2: the weights a tile reaches several blocks from now.
///
/// Not in the super-block tiles: measured there (Gemma 3 Q4_K_M), no clear gain.
#[inline(always)]
fn prefetch_ahead<T>(block: &T) {
    let start = std::ptr::from_ref(block).cast::<u8>();
    prefetch_lines::<_MM_HINT_T1>(start.wrapping_add(BLOCK_PREFETCH_AHEAD), size_of::<T>());
}

/// How far ahead of its weight row an f16 tile asks for the next ones, into L1: 4 KiB (8 KiB
/// into L2, as the quantized tiles, was 1-3% slower on SmolLM2 F16).
const ROW_PREFETCH_AHEAD: usize = 4096;

/// The `bytes` bytes at [`ROW_PREFETCH_AHEAD`] past `start`, into L1: an f16 tile's weight row
/// (SmolLM2 F16, 2 threads: a step of five rows 26.4-26.9 → 21.2-22.0 ms, of one or two 2-3%
/// faster).
#[inline(always)]
pub(super) fn prefetch_bytes_ahead(start: *const u8, bytes: usize) {
    prefetch_lines::<_MM_HINT_T0>(start.wrapping_add(ROW_PREFETCH_AHEAD), bytes);
}

/// Prefetches (with hint `HINT`) the cache lines of the `bytes` bytes from `start`.
#[inline(always)]
fn prefetch_lines<const HINT: i32>(start: *const u8, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch is a hint: it never faults, even past the weights' end.
        unsafe { _mm_prefetch::<HINT>(start.wrapping_add(line).cast()) };
    }
}

/// A packed block's eight chunks as byte registers.
pub trait Chunks: Packing {
    /// Whether the quants are stored offset by 128 (`Q8_0`): the AVX-512
    /// sums start at `-128 * Σx`, and the AVX2 chunks are the signed quants.
    const OFFSET: bool;

    /// The chunks of all 16 rows, as unsigned bytes.
    ///
    /// # Safety
    /// The CPU must have the features of [`tile_avx512`].
    unsafe fn zmm(q: &Self::Packed) -> [__m512i; 8];

    /// The chunks of rows `8 * half..8 * half + 8`: unsigned bytes, or the
    /// signed quants when [`Chunks::OFFSET`].
    ///
    /// # Safety
    /// The CPU must support AVX2; `half` is 0 or 1.
    unsafe fn ymm(q: &Self::Packed, half: usize) -> [__m256i; 8];
}

/// Chunk `c` of the nibble formats from loads `l` of their four 64-byte
/// chunks: low nibbles for chunks 0..4, high for 4..8.
macro_rules! nibble_chunks {
    ($l:expr, $and:ident, $srli:ident, $set1:ident) => {{
        let (l, mask) = ($l, $set1(0x0F));
        std::array::from_fn(|c| if c < 4 { $and(l[c], mask) } else { $and($srli(l[c - 4], 4), mask) })
    }};
}

impl Chunks for Q4_1 {
    const OFFSET: bool = false;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn zmm(q: &Self::Packed) -> [__m512i; 8] {
        // SAFETY: four 64-byte chunks of the packed block.
        let l: [__m512i; 4] = std::array::from_fn(|c| unsafe { _mm512_loadu_si512(q.as_ptr().add(64 * c).cast()) });
        nibble_chunks!(l, _mm512_and_si512, _mm512_srli_epi16, _mm512_set1_epi8)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn ymm(q: &Self::Packed, half: usize) -> [__m256i; 8] {
        // SAFETY: the half of each of the four 64-byte chunks.
        let l: [__m256i; 4] =
            std::array::from_fn(|c| unsafe { _mm256_loadu_si256(q.as_ptr().add(64 * c + 32 * half).cast()) });
        nibble_chunks!(l, _mm256_and_si256, _mm256_srli_epi16, _mm256_set1_epi8)
    }
}

impl Chunks for Q5 {
    const OFFSET: bool = false;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn zmm(q: &Self::Packed) -> [__m512i; 8] {
        // SAFETY: the nibbles are Q4_1's layout in the block's first bytes.
        let mut w = unsafe { Q4_1::zmm(&*q.as_ptr().cast::<<Q4_1 as Packing>::Packed>()) };
        let sixteen = _mm512_set1_epi8(16);
        for (c, w) in w.iter_mut().enumerate() {
            // SAFETY: chunk c's mask, eight bytes after the 256 of nibbles.
            let bits = unsafe { q.as_ptr().add(256 + 8 * c).cast::<u64>().read_unaligned() };
            *w = _mm512_mask_add_epi8(*w, bits, *w, sixteen);
        }
        w
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn ymm(q: &Self::Packed, half: usize) -> [__m256i; 8] {
        // SAFETY: as in `zmm`.
        let mut w = unsafe { Q4_1::ymm(&*q.as_ptr().cast::<<Q4_1 as Packing>::Packed>(), half) };
        // Byte i of the spread mask is byte i / 8 of it; `bit` picks bit i % 8.
        let spread = _mm256_setr_epi64x(0, 0x0101_0101_0101_0101, 0x0202_0202_0202_0202, 0x0303_0303_0303_0303);
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        for (c, w) in w.iter_mut().enumerate() {
            // SAFETY: this half's four bytes of chunk c's mask.
            let bits = unsafe { q.as_ptr().add(256 + 8 * c + 4 * half).cast::<i32>().read_unaligned() };
            let set =
                _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(bits), spread), bit), bit);
            *w = _mm256_or_si256(*w, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
        }
        w
    }
}

impl Chunks for Q8_0 {
    const OFFSET: bool = true;

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn zmm(q: &Self::Packed) -> [__m512i; 8] {
        // SAFETY: eight 64-byte chunks of the packed block.
        std::array::from_fn(|c| unsafe { _mm512_loadu_si512(q.as_ptr().add(64 * c).cast()) })
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn ymm(q: &Self::Packed, half: usize) -> [__m256i; 8] {
        let offset = _mm256_set1_epi8(0x80u8 as i8);
        // SAFETY: the half of each of the eight 64-byte chunks.
        std::array::from_fn(|c| unsafe {
            _mm256_xor_si256(_mm256_loadu_si256(q.as_ptr().add(64 * c + 32 * half).cast()), offset)
        })
    }
}

/// Activation bytes `4c..4c + 4` of block `xq`, as one i32.
#[inline(always)]
unsafe fn chunk_of(xq: *const i8, c: usize) -> i32 {
    // SAFETY: the caller's block has 32 bytes.
    unsafe { xq.add(4 * c).cast::<i32>().read_unaligned() }
}

/// `out[r][j] = w[j] · x[i0 + r]` for the weight rows `rows` (whole groups,
/// the last one possibly cut), with 512-bit registers.
///
/// # Safety
/// The CPU must have [`avx512`]; `rows.start` must be a multiple of
/// [`GROUP`] and `rows.end` at most `w.rows`; `x` must have `w`'s blocks per
/// row and at least `i0 + R` rows; each `out[r]` must be valid for writes at
/// `rows`, which nobody else writes meanwhile.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn tile_avx512<F: Chunks, const R: usize>(
    w: &QMatrix<F>,
    rows: Range<usize>,
    x: &QuantizedRows,
    i0: usize,
    out: [*mut f32; R],
) {
    let k = w.k;
    debug_assert!(rows.start.is_multiple_of(GROUP) && rows.end <= w.rows && x.rows >= i0 + R && x.k == k);
    for start in rows.clone().step_by(GROUP) {
        let mut acc = [_mm512_setzero_ps(); R];
        for (b, block) in w.blocks[start / GROUP * k..][..k].iter().enumerate() {
            prefetch_ahead(block);
            // SAFETY: the CPU has the features.
            let q = unsafe { F::zmm(&block.q) };
            // SAFETY (both): 16 f16 values of a [u16; 16].
            let dw = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(block.d.as_ptr().cast()) });
            let mw = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(block.m.as_ptr().cast()) });
            for (r, acc) in acc.iter_mut().enumerate() {
                let xb = (i0 + r) * k + b;
                // SAFETY: xb < x.rows * k, the length of every activation field.
                let (xq, xd, xs, xsum) = unsafe {
                    (
                        x.qs.get_unchecked(xb).as_ptr(),
                        *x.d.get_unchecked(xb),
                        *x.s.get_unchecked(xb),
                        *x.sums.get_unchecked(xb),
                    )
                };
                let mut even = if F::OFFSET { _mm512_set1_epi32(-128 * xsum) } else { _mm512_setzero_si512() };
                let mut odd = _mm512_setzero_si512();
                for c in (0..8).step_by(2) {
                    // SAFETY: a 32-byte block.
                    let (xe, xo) = unsafe { (chunk_of(xq, c), chunk_of(xq, c + 1)) };
                    even = _mm512_dpbusd_epi32(even, q[c], _mm512_set1_epi32(xe));
                    odd = _mm512_dpbusd_epi32(odd, q[c + 1], _mm512_set1_epi32(xo));
                }
                let isum = _mm512_cvtepi32_ps(_mm512_add_epi32(even, odd));
                *acc = _mm512_fmadd_ps(isum, _mm512_mul_ps(dw, _mm512_set1_ps(xd)), *acc);
                if F::HAS_MIN {
                    *acc = _mm512_fmadd_ps(mw, _mm512_set1_ps(xs), *acc);
                }
            }
        }
        for (acc, out) in acc.iter().zip(out) {
            // SAFETY: out is valid at start..rows.end (the caller's).
            unsafe { store16(*acc, out, start..rows.end) };
        }
    }
}

/// Stores the lanes of `v` that fall in `rows` (from its first) at `out[rows.start..]`: a
/// group's outputs, the last group's cut short.
///
/// # Safety
/// The CPU must have AVX-512F; `out` must be valid for writes at `rows` (16 of them at most used).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store16(v: __m512, out: *mut f32, rows: Range<usize>) {
    let lanes = rows.len().min(GROUP);
    let mask: __mmask16 = if lanes == GROUP { !0 } else { (1 << lanes) - 1 };
    // SAFETY: the caller's.
    unsafe { _mm512_mask_storeu_ps(out.add(rows.start), mask, v) };
}

/// As [`store16`] for eight lanes, with AVX.
///
/// # Safety
/// The CPU must have AVX; `out` must be valid for writes at `rows` (8 of them at most used).
#[inline]
#[target_feature(enable = "avx")]
pub(super) unsafe fn store8(v: __m256, out: *mut f32, rows: Range<usize>) {
    let mut lane = [0.0f32; 8];
    // SAFETY: 8 floats into [f32; 8]; then the caller's.
    unsafe {
        _mm256_storeu_ps(lane.as_mut_ptr(), v);
        std::ptr::copy_nonoverlapping(lane.as_ptr(), out.add(rows.start), rows.len().min(8));
    }
}

/// As [`tile_avx512`], with AVX2: each group as two halves of eight rows.
///
/// # Safety
/// As [`tile_avx512`], with [`available`] for the CPU.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_avx2<F: Chunks, const R: usize>(
    w: &QMatrix<F>,
    rows: Range<usize>,
    x: &QuantizedRows,
    i0: usize,
    out: [*mut f32; R],
) {
    let k = w.k;
    debug_assert!(rows.start.is_multiple_of(GROUP) && rows.end <= w.rows && x.rows >= i0 + R && x.k == k);
    let ones = _mm256_set1_epi16(1);
    for start in rows.clone().step_by(GROUP) {
        for half in 0..2 {
            let first = start + 8 * half;
            if first >= rows.end {
                break;
            }
            let mut acc = [_mm256_setzero_ps(); R];
            for (b, block) in w.blocks[start / GROUP * k..][..k].iter().enumerate() {
                // The second half multiplies the blocks the first brought in.
                if half == 0 {
                    prefetch_ahead(block);
                }
                // SAFETY: the CPU has the features; half is 0 or 1.
                let q = unsafe { F::ymm(&block.q, half) };
                let magnitude: [__m256i; 8] =
                    if F::OFFSET { std::array::from_fn(|c| _mm256_sign_epi8(q[c], q[c])) } else { q };
                // SAFETY (both): 8 f16 values of a [u16; 16] from 8 * half.
                let dw = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(block.d.as_ptr().add(8 * half).cast()) });
                let mw = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(block.m.as_ptr().add(8 * half).cast()) });
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xb = (i0 + r) * k + b;
                    // SAFETY: as in `tile_avx512`.
                    let (xq, xd, xs) =
                        unsafe { (x.qs.get_unchecked(xb).as_ptr(), *x.d.get_unchecked(xb), *x.s.get_unchecked(xb)) };
                    let mut sum = _mm256_setzero_si256();
                    for c in 0..8 {
                        // SAFETY: a 32-byte block.
                        let xc = _mm256_set1_epi32(unsafe { chunk_of(xq, c) });
                        // Unsigned times signed bytes; Q8_0 as |w| times x with w's sign. No i16
                        // pair saturates: at most 2 * 128 * 127.
                        let xc = if F::OFFSET { _mm256_sign_epi8(xc, q[c]) } else { xc };
                        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude[c], xc), ones));
                    }
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(dw, _mm256_set1_ps(xd)), *acc);
                    if F::HAS_MIN {
                        *acc = _mm256_fmadd_ps(mw, _mm256_set1_ps(xs), *acc);
                    }
                }
            }
            for (acc, out) in acc.iter().zip(out) {
                // SAFETY: out is valid at first..rows.end (the caller's).
                unsafe { store8(*acc, out, first..rows.end) };
            }
        }
    }
}

/// `round(v * inv)` half away from zero, as `f32::round`, exactly: the
/// truncation plus one step away from zero where the dropped part is at
/// least a half (`v * inv - trunc` is exact in f32).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn round_away(v: __m256, inv: __m256) -> __m256i {
    let scaled = _mm256_mul_ps(v, inv);
    let trunc = _mm256_round_ps(scaled, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    let sign = _mm256_and_ps(scaled, _mm256_set1_ps(-0.0));
    let dropped = _mm256_andnot_ps(_mm256_set1_ps(-0.0), _mm256_sub_ps(scaled, trunc));
    let up =
        _mm256_and_ps(_mm256_cmp_ps(dropped, _mm256_set1_ps(0.5), _CMP_GE_OQ), _mm256_or_ps(sign, _mm256_set1_ps(1.0)));
    _mm256_cvttps_epi32(_mm256_add_ps(trunc, up))
}

/// The largest magnitude of `v`'s lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn abs_max(v: &[__m256]) -> f32 {
    let sign_mask = _mm256_set1_ps(-0.0);
    let amax = v.iter().fold(_mm256_setzero_ps(), |m, vi| _mm256_max_ps(m, _mm256_andnot_ps(sign_mask, *vi)));
    let m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
}

/// Four registers of eight i32 (each within i8) as 32 bytes in order.
#[inline]
#[target_feature(enable = "avx2")]
fn pack_bytes(q: [__m256i; 4]) -> __m256i {
    // packs work per 128-bit lane: put the eight 4-byte groups back in order.
    let p8 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// The sum of eight i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum_i32(v: __m256i) -> i32 {
    let t = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0b01_00_11_10));
    _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0b10_11_00_01)))
}

/// Loads `N` registers of eight floats from `x`.
///
/// # Safety
/// `x` holds at least `8 N` floats.
#[inline]
#[target_feature(enable = "avx")]
unsafe fn load<const N: usize>(x: &[f32]) -> [__m256; N] {
    // SAFETY: the caller's.
    std::array::from_fn(|i| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * i)) })
}

/// The scale `amax / 127` and its inverse (0 for an all-zero block), as the portable quantizers.
#[inline]
fn scale_of(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    (d, if d == 0.0 { 0.0 } else { 1.0 / d })
}

/// Quantizes one row; the same values as [`super::blocks::quantize_row_q8`].
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x.len()` must be `32 * d.len()`, and
/// `s`, `sums` and `qs` as long as `d`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_row_q8(x: &[f32], d: &mut [f32], s: &mut [f32], sums: &mut [i32], qs: &mut [[i8; QK]]) {
    for ((((chunk, d), s), total), q) in x.chunks_exact(QK).zip(d).zip(s).zip(sums).zip(qs) {
        // SAFETY: 32 floats.
        let v = unsafe { load::<4>(chunk) };
        let inv;
        (*d, inv) = scale_of(abs_max(&v));
        let q32 = v.map(|v| round_away(v, _mm256_set1_ps(inv)));
        // SAFETY: 32 bytes into an [i8; 32].
        unsafe { _mm256_storeu_si256(q.as_mut_ptr().cast(), pack_bytes(q32)) };
        *total = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q32[0], q32[1]), _mm256_add_epi32(q32[2], q32[3])));
        *s = *d * *total as f32;
    }
}

/// Quantizes one block of 256 values for the K-quant products; the same
/// values as the portable `super_blocks::quantize_block`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `x` must hold 256 values.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn quantize_block_q8k(x: &[f32], d: &mut f32, q: &mut [i8; QK_K], bsums: &mut [i16; QK_K / 16]) {
    // SAFETY: 256 floats.
    let v = unsafe { load::<32>(x) };
    let inv;
    (*d, inv) = scale_of(abs_max(&v));
    for (c, (out, sums)) in q.chunks_exact_mut(QK).zip(bsums.chunks_exact_mut(2)).enumerate() {
        let q32: [__m256i; 4] = std::array::from_fn(|i| round_away(v[4 * c + i], _mm256_set1_ps(inv)));
        // SAFETY: 32 bytes into 32 of the block's bytes.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), pack_bytes(q32)) };
        sums[0] = hsum_i32(_mm256_add_epi32(q32[0], q32[1])) as i16;
        sums[1] = hsum_i32(_mm256_add_epi32(q32[2], q32[3])) as i16;
    }
}

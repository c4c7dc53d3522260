//! F16 weights (GGUF `F16`) kept at 16 bits: half the bytes of the f32 copy candle's GEMM would
//! multiply, and a decode step reads every weight once, so half the time. Sixteen values are
//! widened to f32 in a register and multiplied with f32 activation rows.
//!
//! Every dot product takes the same steps on every path (AVX-512, AVX2, portable): lane `l` of 16
//! accumulates the products of columns `l, l + 16, l + 32, ...` with fused multiply-adds, in
//! order, and the lanes are summed as a tree (`l + 8`, then `+ 4`, `+ 2`, `+ 1`). A result does
//! not depend on the CPU or on the other rows of the step.

use std::ops::Range;

use half::f16;

use super::pages::HugeVec;
use super::Tiled;

/// Values per lane step: one AVX-512 register of f32.
pub const LANES: usize = 16;

/// A `[rows, cols]` matrix of f16 values, row-major, `cols` a multiple of [`LANES`].
pub struct HalfMatrix {
    rows: usize,
    cols: usize,
    data: HugeVec<u16>,
}

/// A step's activation rows for a [`HalfMatrix`], as f32.
#[derive(Debug, Default)]
pub struct FloatRows {
    data: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl FloatRows {
    /// `rows` rows of `cols` values from `x`, reusing this buffer.
    pub fn fill(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert_eq!(x.len(), rows * cols, "{rows} x {cols} rows from {} values", x.len());
        self.data.clear();
        self.data.extend_from_slice(x);
        (self.rows, self.cols) = (rows, cols);
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

impl HalfMatrix {
    /// The matrix from a GGUF tensor's little-endian f16 bytes; `None` when its rows are not a
    /// whole number of [`LANES`] (the caller keeps f32 then).
    pub fn from_gguf_bytes(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(LANES) || bytes.len() != rows * cols * 2 {
            return None;
        }
        let mut data = HugeVec::filled(rows * cols, 0u16);
        for (v, b) in data.iter_mut().zip(bytes.chunks_exact(2)) {
            *v = u16::from_le_bytes([b[0], b[1]]);
        }
        Some(Self { rows, cols, data })
    }

    fn from_rows(rows: usize, cols: usize, values: impl Iterator<Item = u16>) -> Self {
        let mut data = HugeVec::filled(rows * cols, 0u16);
        for (v, x) in data.iter_mut().zip(values) {
            *v = x;
        }
        Self { rows, cols, data }
    }

    /// Rows of the matrix.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the matrix.
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn row(&self, j: usize) -> &[u16] {
        &self.data[j * self.cols..(j + 1) * self.cols]
    }

    /// Matrices of the same width stacked by rows; `None` if the widths differ.
    pub fn stack(parts: Vec<Self>) -> Option<Self> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        Some(Self::from_rows(rows, cols, parts.iter().flat_map(|p| p.data.iter().copied())))
    }

    /// The rows in `ranges`, in order.
    pub fn select_rows(&self, ranges: &[Range<usize>]) -> Self {
        let rows = ranges.iter().map(Range::len).sum();
        let values = ranges.iter().flat_map(|r| r.clone()).flat_map(|j| self.row(j).iter().copied());
        Self::from_rows(rows, self.cols, values)
    }

    /// Columns `cols` of every row; `None` unless both ends are multiples of [`LANES`].
    pub fn select_cols(&self, cols: Range<usize>) -> Option<Self> {
        if !cols.start.is_multiple_of(LANES) || !cols.end.is_multiple_of(LANES) || cols.end > self.cols {
            return None;
        }
        let values = (0..self.rows).flat_map(|j| self.row(j)[cols.clone()].iter().copied());
        Some(Self::from_rows(self.rows, cols.len(), values))
    }

    /// Row `j` as f32 into `out`.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(self.row(j)) {
            *o = f16::from_bits(v).to_f32();
        }
    }

    /// Row `j` times `x`: the reference every SIMD path matches bit for bit.
    pub fn dot(&self, j: usize, x: &[f32]) -> f32 {
        let mut lanes = [0.0f32; LANES];
        for (w, x) in self.row(j).chunks_exact(LANES).zip(x.chunks_exact(LANES)) {
            for ((lane, &w), &x) in lanes.iter_mut().zip(w).zip(x) {
                *lane = f16::from_bits(w).to_f32().mul_add(x, *lane);
            }
        }
        tree_sum(lanes)
    }
}

/// The lanes summed as the SIMD paths sum them: halves, quarters, pairs.
fn tree_sum(lanes: [f32; LANES]) -> f32 {
    let s8: [f32; 8] = std::array::from_fn(|i| lanes[i] + lanes[i + 8]);
    let s4: [f32; 4] = std::array::from_fn(|i| s8[i] + s8[i + 4]);
    let s2: [f32; 2] = std::array::from_fn(|i| s4[i] + s4[i + 2]);
    s2[0] + s2[1]
}

impl Tiled for HalfMatrix {
    type Rows = FloatRows;
    const SIXTEEN_ROWS: bool = true;

    fn rows(&self) -> usize {
        self.rows
    }

    fn activation_rows(&self, x: &FloatRows) -> usize {
        assert_eq!(x.cols, self.cols, "activation rows have {} values, weights {}", x.cols, self.cols);
        x.rows
    }

    fn blocks(&self) -> usize {
        self.cols / LANES
    }

    unsafe fn tile<const R: usize>(&self, rows: Range<usize>, x: &FloatRows, i0: usize, out: [*mut f32; R]) {
        #[cfg(target_arch = "x86_64")]
        {
            if x86::avx512() {
                // SAFETY: the CPU has it; the rest is the caller's.
                return unsafe { x86::tile_avx512(self, rows, x, i0, out) };
            }
            if x86::avx2() {
                // SAFETY: as above.
                return unsafe { x86::tile_avx2(self, rows, x, i0, out) };
            }
        }
        for j in rows {
            for (r, o) in out.iter().enumerate() {
                // SAFETY: the caller's.
                unsafe { *o.add(j) = self.dot(j, x.row(i0 + r)) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{FloatRows, HalfMatrix, LANES};
    use crate::model::kernels::x86::prefetch_bytes_ahead;

    pub fn avx512() -> bool {
        is_x86_feature_detected!("avx512f")
    }

    pub fn avx2() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }

    /// The tree sum of `super::tree_sum` on eight lanes already halved.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sum8(s8: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
    }

    /// [`HalfMatrix`]'s tile with one 16-lane register per activation row.
    ///
    /// # Safety
    /// The CPU has AVX-512F (and AVX2 and FMA, which it implies here); the rest as
    /// [`super::Tiled::tile`].
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub unsafe fn tile_avx512<const R: usize>(
        w: &HalfMatrix,
        rows: Range<usize>,
        x: &FloatRows,
        i0: usize,
        out: [*mut f32; R],
    ) {
        let xs: [&[f32]; R] = std::array::from_fn(|r| x.row(i0 + r));
        for j in rows {
            let wr = w.row(j);
            prefetch_bytes_ahead(wr.as_ptr().cast(), size_of_val(wr));
            let mut acc = [_mm512_setzero_ps(); R];
            for k in (0..w.cols).step_by(LANES) {
                // SAFETY: `k + 16 <= cols` for the weights and every activation row.
                unsafe {
                    let wv = _mm512_cvtph_ps(_mm256_loadu_si256(wr.as_ptr().add(k).cast()));
                    for (a, xr) in acc.iter_mut().zip(&xs) {
                        *a = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr.as_ptr().add(k)), *a);
                    }
                }
            }
            for (a, o) in acc.iter().zip(&out) {
                let s8 = _mm256_add_ps(
                    _mm512_castps512_ps256(*a),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*a))),
                );
                // SAFETY: the caller's.
                unsafe { *o.add(j) = sum8(s8) };
            }
        }
    }

    /// [`HalfMatrix`]'s tile on 8-lane registers: each activation row's 16 lanes are two
    /// registers, columns `16i..16i+8` and `16i+8..16i+16`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; the rest as [`super::Tiled::tile`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn tile_avx2<const R: usize>(
        w: &HalfMatrix,
        rows: Range<usize>,
        x: &FloatRows,
        i0: usize,
        out: [*mut f32; R],
    ) {
        let xs: [&[f32]; R] = std::array::from_fn(|r| x.row(i0 + r));
        for j in rows {
            let wr = w.row(j);
            prefetch_bytes_ahead(wr.as_ptr().cast(), size_of_val(wr));
            // Lanes 0..8 of every row, then lanes 8..16: each lane still adds its columns in order.
            let mut halves = [[_mm256_setzero_ps(); R]; 2];
            for (half, acc) in halves.iter_mut().enumerate() {
                for k in (half * 8..w.cols).step_by(LANES) {
                    // SAFETY: `k + 8 <= cols` for the weights and every activation row.
                    unsafe {
                        let wv = _mm256_cvtph_ps(_mm_loadu_si128(wr.as_ptr().add(k).cast()));
                        for (a, xr) in acc.iter_mut().zip(&xs) {
                            *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xr.as_ptr().add(k)), *a);
                        }
                    }
                }
            }
            for r in 0..R {
                // SAFETY: the caller's.
                unsafe { *out[r].add(j) = sum8(_mm256_add_ps(halves[0][r], halves[1][r])) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize, seed: u32) -> HalfMatrix {
        let values = (0..rows * cols).map(|i| {
            let v = ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 16) as f32 / 65536.0 - 0.5;
            f16::from_f32(v).to_bits()
        });
        HalfMatrix::from_rows(rows, cols, values)
    }

    fn activations(rows: usize, cols: usize) -> FloatRows {
        let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0).collect();
        let mut a = FloatRows::default();
        a.fill(&x, rows, cols);
        a
    }

    #[test]
    fn every_path_gives_the_reference_bits_and_close_to_the_f64_product() {
        let (n, cols) = (37, 96);
        let w = matrix(n, cols, 3);
        for m in [1, 3, 8, 16, 21] {
            let x = activations(m, cols);
            let mut out = vec![0.0; m * n];
            w.matmul(&x, &mut out);
            for i in 0..m {
                for j in 0..n {
                    let want = w.dot(j, x.row(i));
                    assert_eq!(out[i * n + j].to_bits(), want.to_bits(), "row {i} col {j} with {m} rows");
                    let mut row = vec![0.0; cols];
                    w.dequantize_row(j, &mut row);
                    let exact: f64 = row.iter().zip(x.row(i)).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                    assert!((f64::from(want) - exact).abs() < 1e-4 * (1.0 + exact.abs()), "{want} vs {exact}");
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        if x86::avx2() {
            let x = activations(5, cols);
            let mut out = vec![0.0; 5 * n];
            let ptrs: [*mut f32; 5] = std::array::from_fn(|r| out[r * n..].as_mut_ptr());
            // SAFETY: the CPU has AVX2; 5 rows of `n` outputs.
            unsafe { x86::tile_avx2(&w, 0..n, &x, 0, ptrs) };
            for (i, row) in out.chunks_exact(n).enumerate() {
                for (j, v) in row.iter().enumerate() {
                    assert_eq!(v.to_bits(), w.dot(j, x.row(i)).to_bits(), "AVX2 row {i} col {j}");
                }
            }
        }
    }

    #[test]
    fn stacking_and_selecting_keep_the_values() {
        let (a, b) = (matrix(5, 32, 1), matrix(3, 32, 2));
        let stacked = HalfMatrix::stack(vec![matrix(5, 32, 1), matrix(3, 32, 2)]).unwrap();
        assert_eq!(stacked.row(6), b.row(1));
        let picked = stacked.select_rows(&[4..5, 6..8]);
        assert_eq!((picked.row(0), picked.row(2)), (a.row(4), b.row(2)));
        let right = stacked.select_cols(16..32).unwrap();
        assert_eq!(right.row(6), &b.row(1)[16..]);
        assert!(stacked.select_cols(8..32).is_none(), "columns split inside a lane step");
        assert!(HalfMatrix::stack(vec![matrix(1, 32, 0), matrix(1, 48, 0)]).is_none());
        assert!(HalfMatrix::from_gguf_bytes(&[0; 2 * 20], 1, 20).is_none(), "20 columns");
    }
}

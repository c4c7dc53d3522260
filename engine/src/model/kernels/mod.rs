//! Matrix products of quantized weights with a step's activation rows.
//!
//! candle's CPU path multiplies `Q4_1` weights in a scalar loop, one row of
//! activations at a time. Here a projection quantizes its input rows once
//! into [`QuantizedRows`] and multiplies them with the weights' own GGUF
//! numbers, stored in groups of 16 rows ([`QMatrix`]) for whole-register
//! integer dot products (AVX-512 VNNI or AVX2; a portable fallback
//! elsewhere), splitting the weight rows over the rayon pool and reusing
//! every weight block for a tile of activation rows. Decode steps read each
//! weight once per step, however many sequences they carry; prefill needs
//! no f32 copy of the weights.
//!
//! A row's result is computed by the same instructions whatever else is in
//! the step, so outputs do not depend on batch composition.

mod blocks;
mod half;
mod pages;
mod scalar;
mod super_blocks;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_super;

use std::ops::Range;

use rayon::prelude::*;

pub use blocks::{
    q4_0_as_q4_1, q5_0_as_q5, quantize_row_q8, Packing, QMatrix, QuantizedRows, GROUP, Q4_0_BYTES, Q4_1, Q5,
    Q5_0_BYTES, Q8_0, QK,
};
pub use half::{FloatRows, HalfMatrix};
pub use super_blocks::{SuperFormat, SuperMatrix, SuperRows, Q4K, Q5K, Q6K, QK_K};

impl QuantizedRows {
    /// Quantizes `x`, `rows` rows of `cols` values (a multiple of [`QK`]),
    /// reusing this buffer.
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert!(cols.is_multiple_of(QK) && x.len() == rows * cols, "{rows} x {cols} rows from {} values", x.len());
        let k = cols / QK;
        self.d.resize(rows * k, 0.0);
        self.s.resize(rows * k, 0.0);
        self.sums.resize(rows * k, 0);
        self.qs.resize(rows * k, [0; QK]);
        self.rows = rows;
        self.k = k;
        if rows * cols >= PARALLEL_MIN_VALUES {
            x.par_chunks(cols)
                .zip(self.d.par_chunks_mut(k))
                .zip(self.s.par_chunks_mut(k))
                .zip(self.sums.par_chunks_mut(k))
                .zip(self.qs.par_chunks_mut(k))
                .for_each(|((((x, d), s), sums), q)| quantize_row(x, d, s, sums, q));
        } else {
            for ((((x, d), s), sums), q) in x
                .chunks(cols)
                .zip(self.d.chunks_mut(k))
                .zip(self.s.chunks_mut(k))
                .zip(self.sums.chunks_mut(k))
                .zip(self.qs.chunks_mut(k))
            {
                quantize_row(x, d, s, sums, q);
            }
        }
    }
}

/// Values below which quantizing rows stays on the calling thread.
const PARALLEL_MIN_VALUES: usize = 1 << 16;

fn quantize_row(x: &[f32], d: &mut [f32], s: &mut [f32], sums: &mut [i32], qs: &mut [[i8; QK]]) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU has the features; lengths match by construction.
        return unsafe { x86::quantize_row_q8(x, d, s, sums, qs) };
    }
    quantize_row_q8(x, d, s, sums, qs)
}

impl SuperRows {
    /// Quantizes `x`, `rows` rows of `cols` values (a multiple of [`QK_K`]),
    /// reusing this buffer.
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert!(cols.is_multiple_of(QK_K) && x.len() == rows * cols, "{rows} x {cols} rows from {} values", x.len());
        let n = rows * cols / QK_K;
        self.d.resize(n, 0.0);
        self.qs.resize(n, [0; QK_K]);
        self.bsums.resize(n, [0; QK_K / 16]);
        self.rows = rows;
        self.k = cols / QK_K;
        if x.len() >= PARALLEL_MIN_VALUES {
            x.par_chunks_exact(QK_K)
                .zip(self.d.par_iter_mut())
                .zip(self.qs.par_iter_mut())
                .zip(self.bsums.par_iter_mut())
                .for_each(|(((x, d), q), sums)| quantize_super_block(x, d, q, sums));
        } else {
            let blocks = x.chunks_exact(QK_K).zip(&mut self.d).zip(&mut self.qs).zip(&mut self.bsums);
            blocks.for_each(|(((x, d), q), sums)| quantize_super_block(x, d, q, sums));
        }
    }
}

/// One block of [`SuperRows`], with AVX2 where the CPU has it.
fn quantize_super_block(x: &[f32], d: &mut f32, q: &mut [i8; QK_K], sums: &mut [i16; QK_K / 16]) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU has the features; a block is 256 values.
        return unsafe { x86::quantize_block_q8k(x, d, q, sums) };
    }
    super_blocks::quantize_block(x, d, q, sums)
}

/// A 32-value weight format the product kernels know: its packing, and on
/// x86 its SIMD chunks.
#[cfg(target_arch = "x86_64")]
pub trait Kernel: Packing + x86::Chunks {}
/// A 32-value weight format the product kernels know: its packing.
#[cfg(not(target_arch = "x86_64"))]
pub trait Kernel: Packing {}

impl Kernel for Q4_1 {}
impl Kernel for Q5 {}
impl Kernel for Q8_0 {}

/// Weight rows per tile: one [`GROUP`]; 16 rows of `Q4_1` at 576 columns are
/// 5.6 KiB, so a tile and the few activation rows it meets stay in L1.
const TILE_ROWS: usize = GROUP;

/// A raw output pointer that rayon tasks share; each writes its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint column ranges of the output rows.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// A weight matrix the tiled product runs over: its rows, and the products
/// of a tile of them with up to eight activation rows.
pub trait Tiled: Sync {
    /// The activation rows this matrix multiplies with.
    type Rows: Sync;
    /// Output values per activation row.
    fn rows(&self) -> usize;
    /// Activation rows in `x`, after checking that their blocks match.
    fn activation_rows(&self, x: &Self::Rows) -> usize;
    /// Block products per weight row and activation row, for the
    /// parallel threshold.
    fn blocks(&self) -> usize;
    /// Whether tiles of sixteen activation rows pay, sharing each weight
    /// block's loads with twice as many rows.
    const SIXTEEN_ROWS: bool = false;
    /// `out[r][j] = w[j] · x[i0 + r]` for `j` in `rows` (`R` at most eight, or sixteen if [`Tiled::SIXTEEN_ROWS`];
    /// `rows.start` a multiple of [`TILE_ROWS`]).
    ///
    /// # Safety
    /// `x` has at least `i0 + R` rows, and each `out[r]` is valid for
    /// writes at `rows`, which nobody else writes meanwhile.
    unsafe fn tile<const R: usize>(&self, rows: Range<usize>, x: &Self::Rows, i0: usize, out: [*mut f32; R]);

    /// `out = x @ self^T`: `out` gets one row of [`Tiled::rows`] values per
    /// activation row.
    fn matmul(&self, x: &Self::Rows, out: &mut [f32])
    where
        Self: Sized,
    {
        product(self, x, out)
    }
}

impl<F: Kernel> Tiled for QMatrix<F> {
    type Rows = QuantizedRows;
    const SIXTEEN_ROWS: bool = true;

    fn rows(&self) -> usize {
        self.rows
    }

    fn activation_rows(&self, x: &QuantizedRows) -> usize {
        assert_eq!(x.k, self.k, "activation rows have {} blocks, weights {}", x.k, self.k);
        x.rows
    }

    fn blocks(&self) -> usize {
        self.k
    }

    unsafe fn tile<const R: usize>(&self, rows: Range<usize>, x: &QuantizedRows, i0: usize, out: [*mut f32; R]) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY (both): the CPU has the features; blocks checked in
            // `activation_rows`, tiles start at whole groups; the rest is the caller's.
            if x86::avx512() {
                return unsafe { x86::tile_avx512(self, rows, x, i0, out) };
            }
            if x86::available() {
                if R > 8 {
                    // Sixteen rows' accumulators would not fit AVX2's registers.
                    let (low, high) = (std::array::from_fn(|r| out[r]), std::array::from_fn(|r| out[8 + r]));
                    return unsafe {
                        x86::tile_avx2::<F, 8>(self, rows.clone(), x, i0, low);
                        x86::tile_avx2::<F, 8>(self, rows, x, i0 + 8, high);
                    };
                }
                return unsafe { x86::tile_avx2(self, rows, x, i0, out) };
            }
        }
        for j in rows {
            for (r, o) in out.iter().enumerate() {
                // SAFETY: the caller's.
                unsafe { *o.add(j) = scalar::dot(self, j, x, i0 + r) };
            }
        }
    }
}

impl<F: SuperFormat> Tiled for SuperMatrix<F> {
    type Rows = SuperRows;

    fn rows(&self) -> usize {
        self.rows
    }

    fn activation_rows(&self, x: &SuperRows) -> usize {
        assert_eq!(x.k, self.k, "activation rows have {} super-blocks, weights {}", x.k, self.k);
        x.rows
    }

    fn blocks(&self) -> usize {
        // Each super-block is eight of the 32-value blocks the threshold counts.
        8 * self.k
    }

    unsafe fn tile<const R: usize>(&self, rows: Range<usize>, x: &SuperRows, i0: usize, out: [*mut f32; R]) {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY (both): the CPU has the features; blocks checked in
            // `activation_rows`, tiles start at whole groups; the rest is the caller's.
            if x86::avx512() {
                return unsafe { x86_super::tile_avx512(self, rows, x, i0, out) };
            }
            if x86::available() {
                return unsafe { x86_super::tile_avx2(self, rows, x, i0, out) };
            }
        }
        for j in rows {
            for (r, o) in out.iter().enumerate() {
                // SAFETY: the caller's.
                unsafe { *o.add(j) = self.dot(j, x, i0 + r) };
            }
        }
    }
}

/// [`Tiled::matmul`], split over the rayon pool by weight rows.
fn product<W: Tiled>(w: &W, x: &W::Rows, out: &mut [f32]) {
    let (n, m) = (w.rows(), w.activation_rows(x));
    assert_eq!(out.len(), m * n, "output of {} values for {m} x {n}", out.len());
    if m == 0 || n == 0 {
        return;
    }
    let ptr = OutPtr(out.as_mut_ptr());
    let threads = rayon::current_num_threads();
    // A few tasks per thread balance the cores; tiny products stay inline.
    let tasks = if m * n * w.blocks() < PARALLEL_MIN_BLOCK_DOTS { 1 } else { threads * 4 };
    let chunk = n.div_ceil(tasks).next_multiple_of(TILE_ROWS).min(n);
    let run = |c: usize| {
        let cols = c * chunk..((c + 1) * chunk).min(n);
        // SAFETY: `cols` are this task's own columns of every output row.
        unsafe { columns(w, x, m, cols, ptr) };
    };
    if n.div_ceil(chunk) == 1 {
        run(0);
    } else {
        (0..n.div_ceil(chunk)).into_par_iter().for_each(run);
    }
}

/// Computes columns `cols` of every one of the `m` output rows.
///
/// # Safety
/// `out` points at `m * w.rows()` values and nobody else writes `cols`.
unsafe fn columns<W: Tiled>(w: &W, x: &W::Rows, m: usize, cols: Range<usize>, out: OutPtr) {
    let n = w.rows();
    let row = |i: usize| unsafe { out.0.add(i * n) };
    let mut start = cols.start;
    while start < cols.end {
        let tile = start..(start + TILE_ROWS).min(cols.end);
        let mut i = 0;
        // SAFETY (all): shapes checked in `matmul`; the columns are ours.
        unsafe {
            while W::SIXTEEN_ROWS && i + 16 <= m {
                w.tile::<16>(tile.clone(), x, i, std::array::from_fn(|r| row(i + r)));
                i += 16;
            }
            while i + 8 <= m {
                w.tile::<8>(tile.clone(), x, i, std::array::from_fn(|r| row(i + r)));
                i += 8;
            }
            match m - i {
                7 => w.tile::<7>(tile.clone(), x, i, std::array::from_fn(|r| row(i + r))),
                6 => w.tile::<6>(tile.clone(), x, i, std::array::from_fn(|r| row(i + r))),
                5 => w.tile::<5>(tile.clone(), x, i, std::array::from_fn(|r| row(i + r))),
                4 => w.tile::<4>(tile.clone(), x, i, std::array::from_fn(|r| row(i + r))),
                3 => w.tile::<3>(tile.clone(), x, i, std::array::from_fn(|r| row(i + r))),
                2 => w.tile::<2>(tile.clone(), x, i, std::array::from_fn(|r| row(i + r))),
                1 => w.tile::<1>(tile.clone(), x, i, [row(i)]),
                _ => {}
            }
        }
        start = tile.end;
    }
}

/// Block dot products below which a product stays on the calling thread.
const PARALLEL_MIN_BLOCK_DOTS: usize = 1 << 12;

#[cfg(test)]
mod tests;

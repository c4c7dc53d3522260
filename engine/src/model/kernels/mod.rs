//! Matrix products of quantized weights with a step's activation rows.
//!
//! candle's CPU path multiplies `Q4_1` weights in a scalar loop, one row of
//! activations at a time. Here a projection quantizes its input rows once
//! into [`QuantizedRows`] and multiplies them with the weights' own GGUF
//! blocks with AVX2 integer dot products (a portable fallback elsewhere), splitting
//! the weight rows over the rayon pool and reusing every weight block for a
//! tile of activation rows. Decode steps read each weight once per step,
//! however many sequences they carry; prefill needs no f32 copy of the
//! weights.
//!
//! A row's result is computed by the same instructions whatever else is in
//! the step, so outputs do not depend on batch composition.

mod blocks;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::ops::Range;

use rayon::prelude::*;

pub use blocks::{quantize_row_q8, Format, QMatrix, QuantizedRows, Q4_1, Q8_0, QK};

impl QuantizedRows {
    /// Quantizes `x`, `rows` rows of `cols` values (a multiple of [`QK`]),
    /// reusing this buffer.
    pub fn quantize(&mut self, x: &[f32], rows: usize, cols: usize) {
        assert!(cols.is_multiple_of(QK) && x.len() == rows * cols, "{rows} x {cols} rows from {} values", x.len());
        let k = cols / QK;
        self.d.resize(rows * k, 0.0);
        self.s.resize(rows * k, 0.0);
        self.qs.resize(rows * k, [0; QK]);
        self.rows = rows;
        self.k = k;
        if rows * cols >= PARALLEL_MIN_VALUES {
            x.par_chunks(cols)
                .zip(self.d.par_chunks_mut(k))
                .zip(self.s.par_chunks_mut(k))
                .zip(self.qs.par_chunks_mut(k))
                .for_each(|(((x, d), s), q)| quantize_row(x, d, s, q));
        } else {
            for (((x, d), s), q) in
                x.chunks(cols).zip(self.d.chunks_mut(k)).zip(self.s.chunks_mut(k)).zip(self.qs.chunks_mut(k))
            {
                quantize_row(x, d, s, q);
            }
        }
    }
}

/// Values below which quantizing rows stays on the calling thread.
const PARALLEL_MIN_VALUES: usize = 1 << 16;

fn quantize_row(x: &[f32], d: &mut [f32], s: &mut [f32], qs: &mut [[i8; QK]]) {
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU has the features; lengths match by construction.
        return unsafe { x86::quantize_row_q8(x, d, s, qs) };
    }
    quantize_row_q8(x, d, s, qs)
}

/// A weight format the product kernels know.
pub trait Kernel: Format + Sized {
    /// `w[j] · x[i]`, portably.
    fn dot(w: &QMatrix<Self>, j: usize, x: &QuantizedRows, i: usize) -> f32;

    /// The SIMD tile for this CPU, if there is one (see [`Kernel::tile`]).
    ///
    /// # Safety
    /// As [`Kernel::tile`].
    unsafe fn simd_tile<const R: usize>(
        w: &QMatrix<Self>,
        rows: &Range<usize>,
        x: &QuantizedRows,
        i0: usize,
        out: [*mut f32; R],
        scales: &mut [f32],
    ) -> bool;

    /// `out[r][j] = w[j] · x[i0 + r]` for `j` in `rows`, with `R` activation
    /// rows per tile; `scales` is scratch of at least `R * k` values.
    ///
    /// # Safety
    /// `w` and `x` have the same blocks per row, `x` at least `i0 + R` rows,
    /// and each `out[r]` is valid for writes at `rows`, which nobody else
    /// writes meanwhile.
    unsafe fn tile<const R: usize>(
        w: &QMatrix<Self>,
        rows: Range<usize>,
        x: &QuantizedRows,
        i0: usize,
        out: [*mut f32; R],
        scales: &mut [f32],
    ) {
        // SAFETY: the caller's.
        if unsafe { Self::simd_tile(w, &rows, x, i0, out, scales) } {
            return;
        }
        for j in rows {
            for (r, o) in out.iter().enumerate() {
                // SAFETY: the caller's.
                unsafe { *o.add(j) = Self::dot(w, j, x, i0 + r) };
            }
        }
    }
}

/// Implements [`Kernel`] for a format with its portable dot product and its
/// x86 tile.
macro_rules! kernel {
    ($format:ty, $dot:path, $x86_tile:ident) => {
        impl Kernel for $format {
            fn dot(w: &QMatrix<Self>, j: usize, x: &QuantizedRows, i: usize) -> f32 {
                $dot(w, j, x, i)
            }

            #[allow(unused_variables)]
            unsafe fn simd_tile<const R: usize>(
                w: &QMatrix<Self>,
                rows: &Range<usize>,
                x: &QuantizedRows,
                i0: usize,
                out: [*mut f32; R],
                scales: &mut [f32],
            ) -> bool {
                #[cfg(target_arch = "x86_64")]
                if x86::available() {
                    // SAFETY: the CPU has the features; the rest is the caller's.
                    unsafe { x86::$x86_tile(w, rows.clone(), x, i0, out, scales) };
                    return true;
                }
                false
            }
        }
    };
}

kernel!(Q4_1, scalar::dot_q4_1, tile_q4_1);
kernel!(Q8_0, scalar::dot_q8_0, tile_q8_0);

/// Weight rows per tile: 16 rows of `Q4_1` at 576 columns are 5.6 KiB, so a
/// tile and the few activation rows it meets stay in L1.
const TILE_ROWS: usize = 16;

/// A raw output pointer that rayon tasks share; each writes its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint column ranges of the output rows.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl<F: Kernel> QMatrix<F> {
    /// `out = x @ self^T`: `out` gets `x.rows` rows of [`Self::rows`] values.
    pub fn matmul(&self, x: &QuantizedRows, out: &mut [f32]) {
        assert_eq!(x.k, self.k, "activation rows have {} blocks, weights {}", x.k, self.k);
        let (n, m) = (self.rows, x.rows);
        assert_eq!(out.len(), m * n, "output of {} values for {m} x {n}", out.len());
        if m == 0 || n == 0 {
            return;
        }
        let ptr = OutPtr(out.as_mut_ptr());
        let threads = rayon::current_num_threads();
        // A few tasks per thread balance the cores; tiny products stay inline.
        let tasks = if m * n * self.k < PARALLEL_MIN_BLOCK_DOTS { 1 } else { threads * 4 };
        let chunk = n.div_ceil(tasks).next_multiple_of(TILE_ROWS).min(n);
        let run = |c: usize| {
            let cols = c * chunk..((c + 1) * chunk).min(n);
            // SAFETY: `cols` are this task's own columns of every output row.
            unsafe { self.columns(x, cols, ptr) };
        };
        if n.div_ceil(chunk) == 1 {
            run(0);
        } else {
            (0..n.div_ceil(chunk)).into_par_iter().for_each(run);
        }
    }

    /// Computes columns `cols` of every output row.
    ///
    /// # Safety
    /// `out` points at `x.rows * self.rows` values and nobody else writes `cols`.
    unsafe fn columns(&self, x: &QuantizedRows, cols: Range<usize>, out: OutPtr) {
        let n = self.rows;
        let row = |i: usize| unsafe { out.0.add(i * n) };
        let mut scales = vec![0.0f32; 4 * self.k];
        let mut start = cols.start;
        while start < cols.end {
            let tile = start..(start + TILE_ROWS).min(cols.end);
            let mut i = 0;
            // SAFETY (all four): shapes checked in `matmul`; the columns are ours.
            unsafe {
                while i + 4 <= x.rows {
                    let out = [row(i), row(i + 1), row(i + 2), row(i + 3)];
                    F::tile::<4>(self, tile.clone(), x, i, out, &mut scales);
                    i += 4;
                }
                match x.rows - i {
                    3 => F::tile::<3>(self, tile.clone(), x, i, [row(i), row(i + 1), row(i + 2)], &mut scales),
                    2 => F::tile::<2>(self, tile.clone(), x, i, [row(i), row(i + 1)], &mut scales),
                    1 => F::tile::<1>(self, tile.clone(), x, i, [row(i)], &mut scales),
                    _ => {}
                }
            }
            start = tile.end;
        }
    }
}

/// Block dot products below which a product stays on the calling thread.
const PARALLEL_MIN_BLOCK_DOTS: usize = 1 << 12;

#[cfg(test)]
mod tests;

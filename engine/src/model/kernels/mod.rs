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
mod super_blocks;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_super;

use std::ops::Range;

use rayon::prelude::*;

pub use blocks::{
    q4_0_as_q4_1, q5_0_as_q5, quantize_row_q8, Format, QMatrix, QuantizedRows, Q4_0_BYTES, Q4_1, Q5, Q5_0_BYTES, Q8_0,
    QK,
};
pub use super_blocks::{SuperFormat, SuperMatrix, SuperRows, Q4K, Q5K, Q6K, QK_K};

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
    ($format:ty, $dot:path, $x86_tile:ident, $vnni_tile:ident) => {
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
                    unsafe {
                        if x86::vnni() {
                            x86::$vnni_tile(w, rows.clone(), x, i0, out, scales)
                        } else {
                            x86::$x86_tile(w, rows.clone(), x, i0, out, scales)
                        }
                    };
                    return true;
                }
                false
            }
        }
    };
}

kernel!(Q4_1, scalar::dot_q4_1, tile_nibbles, tile_nibbles_vnni);
kernel!(Q8_0, scalar::dot_q8_0, tile_q8_0, tile_q8_0_vnni);
kernel!(Q5, scalar::dot_q5, tile_nibbles, tile_nibbles_vnni);

/// A K-quant format the product kernels know.
pub trait SuperKernel: SuperFormat + Sized {
    /// The SIMD tile for this CPU, if there is one: as [`Tiled::tile`].
    ///
    /// # Safety
    /// As [`Tiled::tile`].
    unsafe fn simd_tile<const R: usize>(
        w: &SuperMatrix<Self>,
        rows: &Range<usize>,
        x: &SuperRows,
        i0: usize,
        out: [*mut f32; R],
    ) -> bool;
}

/// Implements [`SuperKernel`] with the x86 tile of its blocks.
macro_rules! super_kernel {
    ($format:ty) => {
        impl SuperKernel for $format {
            #[allow(unused_variables)]
            unsafe fn simd_tile<const R: usize>(
                w: &SuperMatrix<Self>,
                rows: &Range<usize>,
                x: &SuperRows,
                i0: usize,
                out: [*mut f32; R],
            ) -> bool {
                #[cfg(target_arch = "x86_64")]
                if x86::available() {
                    // SAFETY: the CPU has the features; the rest is the caller's.
                    unsafe { x86_super::tile(&w.blocks, w.k, rows.clone(), x, i0, out) };
                    return true;
                }
                false
            }
        }
    };
}

super_kernel!(Q4K);
super_kernel!(Q5K);
super_kernel!(Q6K);

/// Weight rows per tile: 16 rows of `Q4_1` at 576 columns are 5.6 KiB, so a
/// tile and the few activation rows it meets stay in L1.
const TILE_ROWS: usize = 16;

/// A raw output pointer that rayon tasks share; each writes its own columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint column ranges of the output rows.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// A weight matrix the tiled product runs over: its rows, and the products
/// of a tile of them with up to four activation rows.
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
    /// Whether tiles of eight activation rows pay: where a row keeps few
    /// registers (the K-quants' integer block sums), sharing each unpacked
    /// weight block with eight rows is faster; the 32-value formats' two
    /// float accumulators per row spill at eight and are faster at four.
    const EIGHT_ROWS: bool = false;
    /// `out[r][j] = w[j] · x[i0 + r]` for `j` in `rows`; `scratch` holds
    /// [`Tiled::blocks`] times four values (`R` is at most four unless
    /// [`Tiled::EIGHT_ROWS`]).
    ///
    /// # Safety
    /// `x` has at least `i0 + R` rows, and each `out[r]` is valid for
    /// writes at `rows`, which nobody else writes meanwhile.
    unsafe fn tile<const R: usize>(
        &self,
        rows: Range<usize>,
        x: &Self::Rows,
        i0: usize,
        out: [*mut f32; R],
        scratch: &mut [f32],
    );

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

    unsafe fn tile<const R: usize>(
        &self,
        rows: Range<usize>,
        x: &QuantizedRows,
        i0: usize,
        out: [*mut f32; R],
        scratch: &mut [f32],
    ) {
        // SAFETY: the caller's; blocks checked in `activation_rows`.
        unsafe { F::tile(self, rows, x, i0, out, scratch) }
    }
}

impl<F: SuperKernel> Tiled for SuperMatrix<F> {
    type Rows = SuperRows;
    const EIGHT_ROWS: bool = true;

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

    unsafe fn tile<const R: usize>(
        &self,
        rows: Range<usize>,
        x: &SuperRows,
        i0: usize,
        out: [*mut f32; R],
        _scratch: &mut [f32],
    ) {
        // SAFETY: the caller's; blocks checked in `activation_rows`.
        if unsafe { F::simd_tile(self, &rows, x, i0, out) } {
            return;
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
    let mut scratch = vec![0.0f32; 4 * w.blocks()];
    let mut start = cols.start;
    while start < cols.end {
        let tile = start..(start + TILE_ROWS).min(cols.end);
        let mut i = 0;
        // SAFETY (all four): shapes checked in `matmul`; the columns are ours.
        unsafe {
            while W::EIGHT_ROWS && i + 8 <= m {
                let out = std::array::from_fn(|r| row(i + r));
                w.tile::<8>(tile.clone(), x, i, out, &mut scratch);
                i += 8;
            }
            while i + 4 <= m {
                let out = [row(i), row(i + 1), row(i + 2), row(i + 3)];
                w.tile::<4>(tile.clone(), x, i, out, &mut scratch);
                i += 4;
            }
            match m - i {
                3 => w.tile::<3>(tile.clone(), x, i, [row(i), row(i + 1), row(i + 2)], &mut scratch),
                2 => w.tile::<2>(tile.clone(), x, i, [row(i), row(i + 1)], &mut scratch),
                1 => w.tile::<1>(tile.clone(), x, i, [row(i)], &mut scratch),
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

//! Weight matrices as the forward pass multiplies them.
//!
//! GGUF weights keep their quantization and run through [`super::kernels`]:
//! `Q4_0`/`Q4_1`, `Q5_0`/`Q5_1` and `Q8_0` in blocks of 32, `Q4_K`, `Q5_K`
//! and `Q6_K` in super-blocks of 256; GGUF `F16` stays at 16 bits
//! ([`HalfMatrix`]). Other float weights (Hugging Face checkpoints, GGUF
//! F32/BF16) are held in f32 and multiplied by candle's GEMM. A GGUF type without a kernel here is dequantized to f32 at
//! load and reported in [`Dequantized`], never requantized: its numbers stay
//! the file's.

use std::collections::BTreeMap;
use std::ops::Range;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::kernels::{
    q4_0_as_q4_1, q5_0_as_q5, FloatRows, HalfMatrix, QMatrix, QuantizedRows, SuperMatrix, SuperRows, Tiled, Q4K,
    Q4_0_BYTES, Q4_1, Q5, Q5K, Q5_0_BYTES, Q6K, Q8_0, QK, QK_K,
};
use super::ModelError;

/// A `[rows, cols]` weight matrix, multiplied as `x @ w^T`.
pub(crate) enum Linear {
    /// `Q4_1`, and `Q4_0` read exactly as `Q4_1`.
    Q4_1(QMatrix<Q4_1>),
    /// `Q5_0` and `Q5_1`.
    Q5(QMatrix<Q5>),
    Q8_0(QMatrix<Q8_0>),
    Q4K(SuperMatrix<Q4K>),
    Q5K(SuperMatrix<Q5K>),
    Q6K(SuperMatrix<Q6K>),
    /// GGUF `F16` whose rows are whole 16-value steps.
    F16(HalfMatrix),
    /// f32 `[rows, cols]`.
    Dense(Tensor),
    /// Matrices of different formats stacked by rows (a `Q4_K_M` file's
    /// Q and K in `Q4_K` beside V in `Q6_K`): one product each, into their
    /// own columns of the output.
    Stack(Vec<Linear>),
}

/// Reusable buffers for [`Linear::forward`]: the step's activations
/// quantized for each kernel family at most once per projection.
#[derive(Default)]
pub(crate) struct Scratch {
    quantized: QuantizedRows,
    quantized_ready: bool,
    super_rows: SuperRows,
    super_ready: bool,
    float_rows: FloatRows,
    float_ready: bool,
    part: Vec<f32>,
}

impl Scratch {
    fn quantized(&mut self, x: &[f32], rows: usize, cols: usize) -> &QuantizedRows {
        if !self.quantized_ready {
            self.quantized.quantize(x, rows, cols);
            self.quantized_ready = true;
        }
        &self.quantized
    }

    fn float_rows(&mut self, x: &[f32], rows: usize, cols: usize) -> &FloatRows {
        if !self.float_ready {
            self.float_rows.fill(x, rows, cols);
            self.float_ready = true;
        }
        &self.float_rows
    }

    fn super_rows(&mut self, x: &[f32], rows: usize, cols: usize) -> &SuperRows {
        if !self.super_ready {
            self.super_rows.quantize(x, rows, cols);
            self.super_ready = true;
        }
        &self.super_rows
    }
}

/// GGUF tensors that had no kernel and were dequantized to f32 at load, by
/// type: what [`Dequantized::log`] reports once per load.
#[derive(Debug, Default)]
pub(crate) struct Dequantized {
    by_type: BTreeMap<String, (usize, usize)>,
}

impl Dequantized {
    fn add(&mut self, dtype: GgmlDType, elements: usize) {
        let entry = self.by_type.entry(format!("{dtype:?}")).or_default();
        entry.0 += 1;
        entry.1 += elements * 4 - elements * dtype.type_size() / dtype.block_size();
    }

    /// One warning per GGUF type that was dequantized, with the memory it costs.
    pub fn log(&self) {
        for (dtype, (tensors, extra)) in &self.by_type {
            tracing::warn!(
                dtype = %dtype,
                tensors,
                extra_mib = extra / (1 << 20),
                "no kernel for this quantization: its tensors are dequantized to f32 at load"
            );
        }
    }
}

impl Linear {
    /// Stacks the parts' rows into one matrix, so one product computes them
    /// all (Q, K and V; gate and up). Types without a kernel are dequantized
    /// to f32 and counted in `dequantized`.
    pub fn stacked(parts: Vec<QTensor>, dequantized: &mut Dequantized) -> Result<Self, ModelError> {
        let leaves = parts.iter().map(|p| Self::from_tensor(p, dequantized)).collect::<Result<Vec<_>, _>>()?;
        Self::join(leaves)
    }

    /// One tensor in the format it is stored in, or f32 when there is no kernel.
    fn from_tensor(t: &QTensor, dequantized: &mut Dequantized) -> Result<Self, ModelError> {
        let (rows, cols) = t.shape().dims2()?;
        let bytes = || t.data();
        let exact = match t.dtype() {
            GgmlDType::Q4_0 => QMatrix::from_blocks(&bytes()?, rows, cols, Q4_0_BYTES, q4_0_as_q4_1).map(Self::Q4_1),
            GgmlDType::Q4_1 => QMatrix::from_gguf_bytes(&bytes()?, rows, cols).map(Self::Q4_1),
            GgmlDType::Q5_0 => QMatrix::from_blocks(&bytes()?, rows, cols, Q5_0_BYTES, q5_0_as_q5).map(Self::Q5),
            GgmlDType::Q5_1 => QMatrix::from_gguf_bytes(&bytes()?, rows, cols).map(Self::Q5),
            GgmlDType::Q8_0 => QMatrix::from_gguf_bytes(&bytes()?, rows, cols).map(Self::Q8_0),
            GgmlDType::Q4K => SuperMatrix::from_gguf_bytes(&bytes()?, rows, cols).map(Self::Q4K),
            GgmlDType::Q5K => SuperMatrix::from_gguf_bytes(&bytes()?, rows, cols).map(Self::Q5K),
            GgmlDType::Q6K => SuperMatrix::from_gguf_bytes(&bytes()?, rows, cols).map(Self::Q6K),
            GgmlDType::F16 => HalfMatrix::from_gguf_bytes(&bytes()?, rows, cols).map(Self::F16),
            GgmlDType::F32 | GgmlDType::BF16 => None,
            other => {
                dequantized.add(other, rows * cols);
                None
            }
        };
        match exact {
            Some(linear) => Ok(linear),
            None => Ok(Self::Dense(t.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?)),
        }
    }

    /// Stacks matrices by rows: one matrix when they share a format, else
    /// a [`Linear::Stack`].
    fn join(mut parts: Vec<Self>) -> Result<Self, ModelError> {
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        let cols = parts[0].cols();
        if parts.iter().any(|p| p.cols() != cols) {
            return Err(candle_core::Error::Msg("stacked matrices differ in width".into()).into());
        }
        macro_rules! same {
            ($variant:ident, $stack:path) => {
                if parts.iter().all(|p| matches!(p, Self::$variant(_))) {
                    let mats = parts.into_iter().map(|p| match p {
                        Self::$variant(m) => m,
                        _ => unreachable!("checked above"),
                    });
                    return Ok(Self::$variant($stack(mats.collect()).expect("same widths")));
                }
            };
        }
        same!(Q4_1, QMatrix::stack);
        same!(Q5, QMatrix::stack);
        same!(Q8_0, QMatrix::stack);
        same!(Q4K, SuperMatrix::stack);
        same!(Q5K, SuperMatrix::stack);
        same!(Q6K, SuperMatrix::stack);
        same!(F16, HalfMatrix::stack);
        if parts.iter().all(|p| matches!(p, Self::Dense(_))) {
            let dense = parts.iter().map(|p| match p {
                Self::Dense(t) => t.clone(),
                _ => unreachable!("checked above"),
            });
            return Ok(Self::Dense(Tensor::cat(&dense.collect::<Vec<_>>(), 0)?));
        }
        Ok(Self::Stack(parts))
    }

    /// The rows in `ranges`, in order (a column-parallel shard).
    pub fn select_rows(&self, ranges: &[Range<usize>]) -> candle_core::Result<Self> {
        Ok(match self {
            Self::Q4_1(m) => Self::Q4_1(m.select_rows(ranges)),
            Self::Q5(m) => Self::Q5(m.select_rows(ranges)),
            Self::Q8_0(m) => Self::Q8_0(m.select_rows(ranges)),
            Self::Q4K(m) => Self::Q4K(m.select_rows(ranges)),
            Self::Q5K(m) => Self::Q5K(m.select_rows(ranges)),
            Self::Q6K(m) => Self::Q6K(m.select_rows(ranges)),
            Self::F16(m) => Self::F16(m.select_rows(ranges)),
            Self::Dense(t) => {
                let parts = ranges.iter().map(|r| t.narrow(0, r.start, r.len())).collect::<Result<Vec<_>, _>>()?;
                Self::Dense(Tensor::cat(&parts, 0)?)
            }
            Self::Stack(parts) => {
                // Each range split at the parts' boundaries, in order.
                let mut pieces: Vec<(usize, Vec<Range<usize>>)> = Vec::new();
                for r in ranges {
                    let mut start = 0;
                    for (i, p) in parts.iter().enumerate() {
                        let (lo, hi) = (r.start.max(start), r.end.min(start + p.rows()));
                        if lo < hi {
                            match pieces.last_mut() {
                                Some((last, rs)) if *last == i => rs.push(lo - start..hi - start),
                                _ => pieces.push((i, std::iter::once(lo - start..hi - start).collect())),
                            }
                        }
                        start += p.rows();
                    }
                }
                let selected =
                    pieces.iter().map(|(i, rs)| parts[*i].select_rows(rs)).collect::<candle_core::Result<Vec<_>>>()?;
                match <[Self; 1]>::try_from(selected) {
                    Ok([one]) => one,
                    Err(many) => Self::Stack(many),
                }
            }
        })
    }

    /// Columns `cols` of every row (a row-parallel shard). Quantized
    /// matrices split only at block boundaries (multiples of [`QK`], or of
    /// [`QK_K`] for the K-quants).
    pub fn select_cols(&self, cols: Range<usize>) -> candle_core::Result<Self> {
        let blocks = |size: usize| {
            if !cols.start.is_multiple_of(size) || !cols.end.is_multiple_of(size) {
                return Err(candle_core::Error::Msg(format!(
                    "columns {cols:?} do not split the quantized blocks of {size}"
                )));
            }
            Ok(cols.start / size..cols.end / size)
        };
        Ok(match self {
            Self::Q4_1(m) => Self::Q4_1(m.select_col_blocks(blocks(QK)?)),
            Self::Q5(m) => Self::Q5(m.select_col_blocks(blocks(QK)?)),
            Self::Q8_0(m) => Self::Q8_0(m.select_col_blocks(blocks(QK)?)),
            Self::Q4K(m) => Self::Q4K(m.select_col_blocks(blocks(QK_K)?)),
            Self::Q5K(m) => Self::Q5K(m.select_col_blocks(blocks(QK_K)?)),
            Self::Q6K(m) => Self::Q6K(m.select_col_blocks(blocks(QK_K)?)),
            Self::F16(m) => Self::F16(m.select_cols(cols.clone()).ok_or_else(|| {
                candle_core::Error::Msg(format!("columns {cols:?} do not split the f16 rows' 16-value steps"))
            })?),
            Self::Dense(t) => Self::Dense(t.narrow(1, cols.start, cols.len())?.contiguous()?),
            Self::Stack(parts) => {
                Self::Stack(parts.iter().map(|p| p.select_cols(cols.clone())).collect::<candle_core::Result<_>>()?)
            }
        })
    }

    pub fn rows(&self) -> usize {
        match self {
            Self::Q4_1(m) => m.rows(),
            Self::Q5(m) => m.rows(),
            Self::Q8_0(m) => m.rows(),
            Self::Q4K(m) => m.rows(),
            Self::Q5K(m) => m.rows(),
            Self::Q6K(m) => m.rows(),
            Self::F16(m) => m.rows(),
            Self::Dense(t) => t.dims()[0],
            Self::Stack(parts) => parts.iter().map(Self::rows).sum(),
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Self::Q4_1(m) => m.cols(),
            Self::Q5(m) => m.cols(),
            Self::Q8_0(m) => m.cols(),
            Self::Q4K(m) => m.cols(),
            Self::Q5K(m) => m.cols(),
            Self::Q6K(m) => m.cols(),
            Self::F16(m) => m.cols(),
            Self::Dense(t) => t.dims()[1],
            Self::Stack(parts) => parts[0].cols(),
        }
    }

    /// `out = x @ self^T` for `x` of `rows` rows; `out` is resized to fit.
    pub fn forward(
        &self,
        x: &[f32],
        rows: usize,
        out: &mut Vec<f32>,
        scratch: &mut Scratch,
    ) -> candle_core::Result<()> {
        scratch.quantized_ready = false;
        scratch.super_ready = false;
        scratch.float_ready = false;
        self.product(x, rows, out, scratch)
    }

    /// [`Linear::forward`] with the activations of this projection possibly
    /// quantized already in `scratch`.
    fn product(&self, x: &[f32], rows: usize, out: &mut Vec<f32>, scratch: &mut Scratch) -> candle_core::Result<()> {
        let (n, cols) = (self.rows(), self.cols());
        out.resize(rows * n, 0.0);
        match self {
            Self::Q4_1(m) => m.matmul(scratch.quantized(x, rows, cols), out),
            Self::Q5(m) => m.matmul(scratch.quantized(x, rows, cols), out),
            Self::Q8_0(m) => m.matmul(scratch.quantized(x, rows, cols), out),
            Self::Q4K(m) => m.matmul(scratch.super_rows(x, rows, cols), out),
            Self::Q5K(m) => m.matmul(scratch.super_rows(x, rows, cols), out),
            Self::Q6K(m) => m.matmul(scratch.super_rows(x, rows, cols), out),
            Self::F16(m) => m.matmul(scratch.float_rows(x, rows, cols), out),
            Self::Dense(w) => {
                let x = Tensor::from_slice(x, (rows, cols), &Device::Cpu)?;
                let y = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
                out.copy_from_slice(&y);
            }
            Self::Stack(parts) => {
                let mut part = std::mem::take(&mut scratch.part);
                let mut first = 0;
                for p in parts {
                    p.product(x, rows, &mut part, scratch)?;
                    let width = p.rows();
                    for (dst, src) in out.chunks_exact_mut(n).zip(part.chunks_exact(width)) {
                        dst[first..first + width].copy_from_slice(src);
                    }
                    first += width;
                }
                scratch.part = part;
            }
        }
        Ok(())
    }

    /// The whole matrix, dequantized, as a `[rows, cols]` tensor of `dtype`
    /// on `device` (for the forward pass on candle devices).
    pub fn to_tensor(&self, device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
        let dense = match self {
            Self::Dense(t) => t.clone(),
            _ => {
                let cols = self.cols();
                let mut data = vec![0.0f32; self.rows() * cols];
                for (j, row) in data.chunks_exact_mut(cols).enumerate() {
                    self.row(j, row)?;
                }
                Tensor::from_vec(data, (self.rows(), cols), &Device::Cpu)?
            }
        };
        dense.to_dtype(dtype)?.to_device(device)
    }

    /// Row `j` as f32 (an embedding lookup) into `out` (`cols` values).
    pub fn row(&self, j: usize, out: &mut [f32]) -> candle_core::Result<()> {
        match self {
            Self::Q4_1(m) => m.dequantize_row(j, out),
            Self::Q5(m) => m.dequantize_row(j, out),
            Self::Q8_0(m) => m.dequantize_row(j, out),
            Self::Q4K(m) => m.dequantize_row(j, out),
            Self::Q5K(m) => m.dequantize_row(j, out),
            Self::Q6K(m) => m.dequantize_row(j, out),
            Self::F16(m) => m.dequantize_row(j, out),
            Self::Dense(t) => out.copy_from_slice(&t.get(j)?.to_vec1::<f32>()?),
            Self::Stack(parts) => {
                let mut first = 0;
                for p in parts {
                    if j < first + p.rows() {
                        return p.row(j - first, out);
                    }
                    first += p.rows();
                }
                return Err(candle_core::Error::Msg(format!("row {j} of {first}")));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    fn tensor(dtype: GgmlDType, rows: usize, cols: usize, seed: u32) -> QTensor {
        let t = Tensor::from_vec(values(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    }

    /// `x @ w^T` in f32 over the weights' own values.
    fn dense(w: &Linear, x: &[f32], rows: usize) -> Vec<f32> {
        let reference = Linear::Dense(w.to_tensor(&Device::Cpu, DType::F32).unwrap());
        let mut out = Vec::new();
        reference.forward(x, rows, &mut out, &mut Scratch::default()).unwrap();
        out
    }

    fn assert_close(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= 0.02 * scale, "[{i}] {a} vs {b} (scale {scale})");
        }
    }

    #[test]
    fn parts_of_different_formats_stack_shard_and_multiply_as_one_matrix() {
        let (cols, rows) = (512, 3);
        let parts = vec![
            tensor(GgmlDType::Q4K, 8, cols, 1),
            tensor(GgmlDType::Q6K, 4, cols, 2),
            tensor(GgmlDType::Q8_0, 2, cols, 3),
            tensor(GgmlDType::F16, 2, cols, 4),
        ];
        let mut dequantized = Dequantized::default();
        let w = Linear::stacked(parts, &mut dequantized).unwrap();
        assert!(matches!(&w, Linear::Stack(p) if p.len() == 4), "four formats stay four matrices");
        assert!(matches!(&w, Linear::Stack(p) if matches!(p[3], Linear::F16(_))), "F16 keeps 16 bits");
        assert!(dequantized.by_type.is_empty(), "nothing dequantized");
        assert_eq!((w.rows(), w.cols()), (16, cols));
        let x = values(rows * cols, 9);
        let mut out = Vec::new();
        w.forward(&x, rows, &mut out, &mut Scratch::default()).unwrap();
        let full = dense(&w, &x, rows);
        assert_close(&out, &full);

        // A column-parallel shard: rows from every part, in order.
        let ranges = [2..6, 8..10, 13..15, 15..16];
        let shard = w.select_rows(&ranges).unwrap();
        let mut got = Vec::new();
        shard.forward(&x, rows, &mut got, &mut Scratch::default()).unwrap();
        let want: Vec<f32> = full.chunks(16).flat_map(|r| ranges.iter().flat_map(|c| r[c.clone()].to_vec())).collect();
        assert_close(&got, &want);

        // A row-parallel shard: the columns of one super-block.
        let half = w.select_cols(256..512).unwrap();
        let xs: Vec<f32> = x.chunks(cols).flat_map(|r| r[256..].to_vec()).collect();
        let mut got = Vec::new();
        half.forward(&xs, rows, &mut got, &mut Scratch::default()).unwrap();
        assert_close(&got, &dense(&half, &xs, rows));
        assert!(w.select_cols(0..128).is_err(), "K-quant blocks do not split");
    }

    #[test]
    fn types_without_a_kernel_are_dequantized_and_counted() {
        let mut dequantized = Dequantized::default();
        let t = tensor(GgmlDType::Q3K, 4, 256, 5);
        let want = t.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = Linear::stacked(vec![t], &mut dequantized).unwrap();
        let Linear::Dense(d) = &w else { panic!("Q3_K has no kernel: dense") };
        assert_eq!(d.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want, "the file's values, not requantized");
        // 1,024 values: 4 bytes each in f32 against 110 bytes per 256 in Q3_K.
        assert_eq!(dequantized.by_type.get("Q3K"), Some(&(1, 4 * 1024 - 4 * 110)));
    }
}

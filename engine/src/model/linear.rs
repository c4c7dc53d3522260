//! Weight matrices as the forward pass multiplies them.
//!
//! `Q4_1` and `Q8_0` weights (the GGUF formats of the default model) keep
//! their blocks and run through [`super::kernels`]; float weights (Hugging
//! Face checkpoints) are held in f32 and multiplied by candle's GEMM; other
//! GGUF quantizations are requantized to `Q8_0` at load.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::kernels::{Format, QMatrix, QuantizedRows, Q4_1, Q8_0, QK};
use super::ModelError;

/// A `[rows, cols]` weight matrix, multiplied as `x @ w^T`.
pub(crate) enum Linear {
    Q4_1(QMatrix<Q4_1>),
    Q8_0(QMatrix<Q8_0>),
    /// f32 `[rows, cols]`.
    Dense(Tensor),
}

/// Reusable buffers for [`Linear::forward`].
#[derive(Default)]
pub(crate) struct Scratch {
    quantized: QuantizedRows,
}

impl Linear {
    /// Stacks the parts' rows into one matrix, so one product computes them
    /// all (Q, K and V; gate and up).
    pub fn stacked(parts: Vec<QTensor>) -> Result<Self, ModelError> {
        let dtype = parts[0].dtype();
        let same = parts.iter().all(|p| p.dtype() == dtype);
        let cols = parts[0].shape().dims2()?.1;
        match dtype {
            GgmlDType::Q4_1 if same => Ok(Self::Q4_1(Self::blocks(&parts, cols)?)),
            GgmlDType::Q8_0 if same => Ok(Self::Q8_0(Self::blocks(&parts, cols)?)),
            _ => {
                let dense = parts.iter().map(|p| p.dequantize(&Device::Cpu)).collect::<Result<Vec<_>, _>>()?;
                let dense = Tensor::cat(&dense, 0)?;
                let float =
                    parts.iter().all(|p| matches!(p.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16));
                if float || cols % QK != 0 {
                    Ok(Self::Dense(dense.to_dtype(DType::F32)?))
                } else {
                    // A quantization without a kernel here: Q8_0 is finer than
                    // all of them, so this only adds a small rounding error.
                    let q = QTensor::quantize(&dense, GgmlDType::Q8_0)?;
                    Ok(Self::Q8_0(Self::blocks(&[q], cols)?))
                }
            }
        }
    }

    fn blocks<F: Format>(parts: &[QTensor], cols: usize) -> Result<QMatrix<F>, ModelError> {
        let mut mats = Vec::with_capacity(parts.len());
        for p in parts {
            let (rows, c) = p.shape().dims2()?;
            let m = QMatrix::from_gguf_bytes(&p.data()?, rows, c).ok_or_else(|| {
                candle_core::Error::Msg(format!("{:?} tensor of {rows} x {c} has a partial block", p.dtype()))
            })?;
            mats.push(m);
        }
        QMatrix::stack(mats)
            .filter(|m| m.cols() == cols)
            .ok_or_else(|| candle_core::Error::Msg("stacked matrices differ in width".into()).into())
    }

    /// The rows in `ranges`, in order (a column-parallel shard).
    pub fn select_rows(&self, ranges: &[std::ops::Range<usize>]) -> candle_core::Result<Self> {
        Ok(match self {
            Self::Q4_1(m) => Self::Q4_1(m.select_rows(ranges)),
            Self::Q8_0(m) => Self::Q8_0(m.select_rows(ranges)),
            Self::Dense(t) => {
                let parts = ranges.iter().map(|r| t.narrow(0, r.start, r.len())).collect::<Result<Vec<_>, _>>()?;
                Self::Dense(Tensor::cat(&parts, 0)?)
            }
        })
    }

    /// Columns `cols` of every row (a row-parallel shard). Quantized
    /// matrices split only at block boundaries (multiples of [`QK`]).
    pub fn select_cols(&self, cols: std::ops::Range<usize>) -> candle_core::Result<Self> {
        let blocks = || {
            if !cols.start.is_multiple_of(QK) || !cols.end.is_multiple_of(QK) {
                return Err(candle_core::Error::Msg(format!(
                    "columns {cols:?} do not split the quantized blocks of {QK}"
                )));
            }
            Ok(cols.start / QK..cols.end / QK)
        };
        Ok(match self {
            Self::Q4_1(m) => Self::Q4_1(m.select_col_blocks(blocks()?)),
            Self::Q8_0(m) => Self::Q8_0(m.select_col_blocks(blocks()?)),
            Self::Dense(t) => Self::Dense(t.narrow(1, cols.start, cols.len())?.contiguous()?),
        })
    }

    pub fn rows(&self) -> usize {
        match self {
            Self::Q4_1(m) => m.rows(),
            Self::Q8_0(m) => m.rows(),
            Self::Dense(t) => t.dims()[0],
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Self::Q4_1(m) => m.cols(),
            Self::Q8_0(m) => m.cols(),
            Self::Dense(t) => t.dims()[1],
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
        let n = self.rows();
        out.resize(rows * n, 0.0);
        match self {
            Self::Q4_1(m) => {
                scratch.quantized.quantize(x, rows, m.cols());
                m.matmul(&scratch.quantized, out);
            }
            Self::Q8_0(m) => {
                scratch.quantized.quantize(x, rows, m.cols());
                m.matmul(&scratch.quantized, out);
            }
            Self::Dense(w) => {
                let x = Tensor::from_slice(x, (rows, self.cols()), &Device::Cpu)?;
                let y = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
                out.copy_from_slice(&y);
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
            Self::Q8_0(m) => m.dequantize_row(j, out),
            Self::Dense(t) => out.copy_from_slice(&t.get(j)?.to_vec1::<f32>()?),
        }
        Ok(())
    }
}

//! Storage formats of quantized weights and activations.
//!
//! Weights are read from llama.cpp's GGUF blocks and stored split by field:
//! the scales (and minimums) of a row in one array and its quants in
//! another, the same bytes as GGUF but in an order SIMD code can load eight
//! scales at a time. Activations are quantized per step into
//! [`QuantizedRows`], which carries what both weight kinds need.

use half::f16;

/// Values per block, for every format here.
pub const QK: usize = 32;

/// A GGUF block format with 32 values per block.
pub trait Format: Send + Sync + 'static {
    /// The quants of one block.
    type Quants: Copy + Send + Sync + 'static;
    /// Bytes per block in a GGUF file.
    const BYTES: usize;
    /// Splits one GGUF block into scale, minimum (0 when the format has
    /// none) and quants.
    fn parse(bytes: &[u8]) -> (u16, u16, Self::Quants);
    /// The block's 32 values.
    fn dequantize(d: u16, m: u16, q: &Self::Quants, out: &mut [f32]);
}

/// GGUF `Q4_1`: `x = d * q + m` with 4-bit `q`. Byte `j` of the quants holds
/// value `j` in its low nibble and value `j + 16` in its high nibble.
pub struct Q4_1;

impl Format for Q4_1 {
    type Quants = [u8; QK / 2];
    const BYTES: usize = 20;

    fn parse(b: &[u8]) -> (u16, u16, Self::Quants) {
        let mut qs = [0u8; QK / 2];
        qs.copy_from_slice(&b[4..20]);
        (u16::from_le_bytes([b[0], b[1]]), u16::from_le_bytes([b[2], b[3]]), qs)
    }

    fn dequantize(d: u16, m: u16, q: &Self::Quants, out: &mut [f32]) {
        let (d, m) = (f16::from_bits(d).to_f32(), f16::from_bits(m).to_f32());
        for (j, &q) in q.iter().enumerate() {
            out[j] = d * f32::from(q & 0x0F) + m;
            out[j + QK / 2] = d * f32::from(q >> 4) + m;
        }
    }
}

/// GGUF `Q4_0` (`x = d * (q - 8)`) read exactly as [`Q4_1`] with the
/// minimum `-8 d`: the same 4-bit quants and the same kernel. `None` when
/// `-8 d` does not fit an f16.
pub fn q4_0_as_q4_1(b: &[u8]) -> Option<(u16, u16, [u8; QK / 2])> {
    let d = u16::from_le_bytes([b[0], b[1]]);
    let mut qs = [0u8; QK / 2];
    qs.copy_from_slice(&b[2..18]);
    Some((d, scaled_min(d, -8.0)?, qs))
}

/// Bytes of a GGUF `Q4_0` block.
pub const Q4_0_BYTES: usize = 18;

/// `factor * d` as f16 bits, when that is exact (a power-of-two factor
/// that neither overflows nor leaves the subnormals).
fn scaled_min(d: u16, factor: f32) -> Option<u16> {
    let m = f16::from_f32(f16::from_bits(d).to_f32() * factor);
    (m.is_finite() && m.to_f32() == f16::from_bits(d).to_f32() * factor).then_some(m.to_bits())
}

/// GGUF `Q5_0` and `Q5_1`: `x = d * q + m` with 5-bit `q`: the low four
/// bits as in [`Q4_1`], bit 4 of value `i` in bit `i` of `qh`. `Q5_0`
/// (`x = d * (q - 16)`) is read with the minimum `-16 d`.
pub struct Q5;

/// The quants of a [`Q5`] block.
#[derive(Clone, Copy)]
pub struct Q5Quants {
    /// Bit 4 of each value, value `i` in bit `i`.
    pub qh: u32,
    /// The low nibbles, as [`Q4_1`]'s.
    pub qs: [u8; QK / 2],
}

impl Format for Q5 {
    type Quants = Q5Quants;
    /// `Q5_1`'s; `Q5_0` blocks are read by [`q5_0_as_q5`].
    const BYTES: usize = 24;

    fn parse(b: &[u8]) -> (u16, u16, Q5Quants) {
        let mut qs = [0u8; QK / 2];
        qs.copy_from_slice(&b[8..24]);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        (u16::from_le_bytes([b[0], b[1]]), u16::from_le_bytes([b[2], b[3]]), Q5Quants { qh, qs })
    }

    fn dequantize(d: u16, m: u16, q: &Q5Quants, out: &mut [f32]) {
        let (d, m) = (f16::from_bits(d).to_f32(), f16::from_bits(m).to_f32());
        for (j, &byte) in q.qs.iter().enumerate() {
            let hi = |i: usize| (((q.qh >> i) & 1) << 4) as u8;
            out[j] = d * f32::from((byte & 0x0F) | hi(j)) + m;
            out[j + QK / 2] = d * f32::from((byte >> 4) | hi(j + QK / 2)) + m;
        }
    }
}

/// Bytes of a GGUF `Q5_0` block.
pub const Q5_0_BYTES: usize = 22;

/// A GGUF `Q5_0` block as a [`Q5`] one; `None` when `-16 d` does not fit an f16.
pub fn q5_0_as_q5(b: &[u8]) -> Option<(u16, u16, Q5Quants)> {
    let d = u16::from_le_bytes([b[0], b[1]]);
    let mut qs = [0u8; QK / 2];
    qs.copy_from_slice(&b[6..22]);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    Some((d, scaled_min(d, -16.0)?, Q5Quants { qh, qs }))
}

/// GGUF `Q8_0`: `x = d * q` with signed 8-bit `q`.
pub struct Q8_0;

impl Format for Q8_0 {
    type Quants = [i8; QK];
    const BYTES: usize = 34;

    fn parse(b: &[u8]) -> (u16, u16, Self::Quants) {
        let mut qs = [0i8; QK];
        for (q, &byte) in qs.iter_mut().zip(&b[2..34]) {
            *q = byte as i8;
        }
        (u16::from_le_bytes([b[0], b[1]]), 0, qs)
    }

    fn dequantize(d: u16, _m: u16, q: &Self::Quants, out: &mut [f32]) {
        let d = f16::from_bits(d).to_f32();
        for (o, &q) in out.iter_mut().zip(q) {
            *o = d * f32::from(q);
        }
    }
}

/// A quantized `[rows, cols]` weight matrix, row-major, split by field.
pub struct QMatrix<F: Format> {
    /// Scale of each block (f16 bits), `rows * k`.
    pub(super) d: Vec<u16>,
    /// Minimum of each block (f16 bits), `rows * k`; all 0 for formats without.
    pub(super) m: Vec<u16>,
    pub(super) qs: Vec<F::Quants>,
    pub(super) rows: usize,
    /// Blocks per row (`cols / QK`).
    pub(super) k: usize,
}

impl<F: Format> QMatrix<F> {
    /// Reads `rows * cols / QK` GGUF blocks. `None` unless `cols` is a
    /// multiple of [`QK`] and `bytes` exactly the matrix.
    pub fn from_gguf_bytes(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        Self::from_blocks(bytes, rows, cols, F::BYTES, |b| Some(F::parse(b)))
    }

    /// Reads `rows * cols / QK` blocks of `block_bytes` each with `parse`
    /// (a GGUF type this format holds exactly). `None` unless `cols` is a
    /// multiple of [`QK`], `bytes` exactly the matrix and every block parsed.
    pub fn from_blocks(
        bytes: &[u8],
        rows: usize,
        cols: usize,
        block_bytes: usize,
        parse: impl Fn(&[u8]) -> Option<(u16, u16, F::Quants)>,
    ) -> Option<Self> {
        if !cols.is_multiple_of(QK) || bytes.len() != rows * cols / QK * block_bytes {
            return None;
        }
        let n = rows * cols / QK;
        let (mut d, mut m, mut qs) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for block in bytes.chunks_exact(block_bytes) {
            let (bd, bm, bq) = parse(block)?;
            d.push(bd);
            m.push(bm);
            qs.push(bq);
        }
        Some(Self { d, m, qs, rows, k: cols / QK })
    }

    /// Stacks matrices with the same number of columns into one.
    pub fn stack(parts: Vec<Self>) -> Option<Self> {
        let k = parts.first()?.k;
        if parts.iter().any(|p| p.k != k) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let (mut d, mut m, mut qs) = (Vec::new(), Vec::new(), Vec::new());
        for p in parts {
            d.extend(p.d);
            m.extend(p.m);
            qs.extend(p.qs);
        }
        Some(Self { d, m, qs, rows, k })
    }

    /// The rows in `ranges`, in order: a column-parallel shard (its
    /// outputs' share of the rows).
    pub fn select_rows(&self, ranges: &[std::ops::Range<usize>]) -> Self {
        let k = self.k;
        let (mut d, mut m, mut qs) = (Vec::new(), Vec::new(), Vec::new());
        for r in ranges {
            d.extend_from_slice(&self.d[r.start * k..r.end * k]);
            m.extend_from_slice(&self.m[r.start * k..r.end * k]);
            qs.extend(self.qs[r.start * k..r.end * k].iter().copied());
        }
        Self { d, m, qs, rows: ranges.iter().map(|r| r.len()).sum(), k }
    }

    /// Blocks `blocks` of every row (columns `blocks × QK`): a row-parallel
    /// shard (its inputs' share of the columns).
    pub fn select_col_blocks(&self, blocks: std::ops::Range<usize>) -> Self {
        let k = self.k;
        let pick = |row: usize| row * k + blocks.start..row * k + blocks.end;
        let d = (0..self.rows).flat_map(|r| self.d[pick(r)].iter().copied()).collect();
        let m = (0..self.rows).flat_map(|r| self.m[pick(r)].iter().copied()).collect();
        let qs = (0..self.rows).flat_map(|r| self.qs[pick(r)].iter().copied()).collect();
        Self { d, m, qs, rows: self.rows, k: blocks.len() }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.k * QK
    }

    /// Row `j` dequantized into `out` (`cols` values): an embedding lookup.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        for (b, chunk) in (j * self.k..(j + 1) * self.k).zip(out.chunks_exact_mut(QK)) {
            F::dequantize(self.d[b], self.m[b], &self.qs[b], chunk);
        }
    }
}

/// Activation rows quantized for [`QMatrix`] products: per block of 32
/// values `x ≈ d * q`, and `s = d * Σq` for the minimum term of `Q4_1`
/// (llama.cpp's `Q8_1`, with f32 scales since activations are never stored).
#[derive(Default)]
pub struct QuantizedRows {
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
    pub(super) qs: Vec<[i8; QK]>,
    pub(super) rows: usize,
    pub(super) k: usize,
}

/// Quantizes one row of `32 * d.len()` values (round half away from zero,
/// `d = amax / 127`, as llama.cpp).
pub fn quantize_row_q8(x: &[f32], d: &mut [f32], s: &mut [f32], qs: &mut [[i8; QK]]) {
    for (((chunk, d), s), q) in x.chunks_exact(QK).zip(d).zip(s).zip(qs) {
        let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        *d = amax / 127.0;
        let inv = if *d == 0.0 { 0.0 } else { 1.0 / *d };
        let mut sum = 0i32;
        for (q, &v) in q.iter_mut().zip(chunk) {
            *q = (v * inv).round() as i8;
            sum += i32::from(*q);
        }
        *s = *d * sum as f32;
    }
}

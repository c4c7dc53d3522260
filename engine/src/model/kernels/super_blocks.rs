//! llama.cpp's K-quants: super-blocks of 256 values in sub-blocks of 32
//! (`Q4_K`, `Q5_K`) or 16 (`Q6_K`), each sub-block with its own small
//! integer scale under the block's f16 scale.
//!
//! Their products take activations quantized per 256 values with the sum of
//! every 16 quants ([`SuperRows`], llama.cpp's `Q8_K`): the sub-block scales
//! then stay integers through the whole block, and the minimum (or the
//! `Q6_K` offset of 32) is one multiply of those sums. Blocks are kept as
//! parsed structs; the 6-bit scales and minimums of `Q4_K` / `Q5_K`, which
//! GGUF packs into 12 bytes, are unpacked once at load.

use half::f16;

/// Values per super-block.
pub const QK_K: usize = 256;

/// Activation rows for K-quant products: per 256 values `x ≈ d * q`, and
/// the sum of each 16 consecutive quants.
#[derive(Default)]
pub struct SuperRows {
    pub(super) d: Vec<f32>,
    pub(super) qs: Vec<[i8; QK_K]>,
    pub(super) bsums: Vec<[i16; QK_K / 16]>,
    pub(super) rows: usize,
    /// Super-blocks per row.
    pub(super) k: usize,
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
        for (((chunk, d), q), sums) in x.chunks_exact(QK_K).zip(&mut self.d).zip(&mut self.qs).zip(&mut self.bsums) {
            quantize_block(chunk, d, q, sums);
        }
    }
}

/// One block of [`SuperRows`] (round half away from zero, `d = amax / 127`).
fn quantize_block(x: &[f32], d: &mut f32, q: &mut [i8; QK_K], sums: &mut [i16; QK_K / 16]) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    *d = amax / 127.0;
    let inv = if *d == 0.0 { 0.0 } else { 1.0 / *d };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * inv).round() as i8;
    }
    for (s, group) in sums.iter_mut().zip(q.chunks_exact(16)) {
        *s = group.iter().map(|&v| i16::from(v)).sum();
    }
}

/// A GGUF K-quant format.
pub trait SuperFormat: Send + Sync + 'static {
    /// One parsed super-block.
    type Block: Copy + Send + Sync + 'static;
    /// Bytes per block in a GGUF file.
    const BYTES: usize;
    fn parse(bytes: &[u8]) -> Self::Block;
    /// The block's 256 values, as llama.cpp computes them.
    fn dequantize(block: &Self::Block, out: &mut [f32]);
    /// `block · x`, portably, for activation block `xb` of `x`.
    fn dot(block: &Self::Block, x: &SuperRows, xb: usize) -> f32;
}

/// `Q4_K` and `Q5_K` blocks: `x = d * sc[s] * q - dmin * m[s]` for the 32
/// values of sub-block `s`.
#[derive(Clone, Copy)]
pub struct Q4KBlock {
    pub(super) d: u16,
    pub(super) dmin: u16,
    pub(super) scales: [u8; 8],
    pub(super) mins: [u8; 8],
    /// Byte `l` of each 32: value `64 j + l` in its low nibble, value
    /// `64 j + 32 + l` in its high one.
    pub(super) qs: [u8; QK_K / 2],
}

impl Q4KBlock {
    /// Reads the 144 bytes of a GGUF `Q4_K` block (or `Q5_K`'s fields but `qh`).
    fn parse(d: &[u8], scales: &[u8], qs: &[u8]) -> Self {
        let mut block = Self {
            d: u16::from_le_bytes([d[0], d[1]]),
            dmin: u16::from_le_bytes([d[2], d[3]]),
            scales: [0; 8],
            mins: [0; 8],
            qs: [0; QK_K / 2],
        };
        // Eight 6-bit scales and minimums in 12 bytes: the low six bits of
        // bytes 0..8 for the first four, nibbles of bytes 8..12 and the top
        // two bits of bytes 0..8 for the rest.
        for s in 0..8 {
            (block.scales[s], block.mins[s]) = if s < 4 {
                (scales[s] & 63, scales[s + 4] & 63)
            } else {
                ((scales[s + 4] & 0x0F) | ((scales[s - 4] >> 6) << 4), (scales[s + 4] >> 4) | ((scales[s] >> 6) << 4))
            };
        }
        block.qs.copy_from_slice(qs);
        block
    }

    /// `(Σ_s sc[s] Σ q x, Σ_s m[s] Σ x)` over the sub-blocks, with `q(v)` the
    /// unsigned quant of value `v`.
    fn integer_dots(&self, x: &[i8; QK_K], sums: &[i16; QK_K / 16], q: impl Fn(usize) -> i32) -> (i32, i32) {
        let mut main = 0;
        let mut min = 0;
        for s in 0..8 {
            let dot: i32 = (32 * s..32 * (s + 1)).map(|v| q(v) * i32::from(x[v])).sum();
            main += i32::from(self.scales[s]) * dot;
            min += i32::from(self.mins[s]) * (i32::from(sums[2 * s]) + i32::from(sums[2 * s + 1]));
        }
        (main, min)
    }

    fn nibble(&self, v: usize) -> u8 {
        let byte = self.qs[v / 64 * 32 + v % 32];
        if v % 64 < 32 {
            byte & 0x0F
        } else {
            byte >> 4
        }
    }

    fn values(&self, out: &mut [f32], q: impl Fn(usize) -> u8) {
        let (d, min) = (f16::from_bits(self.d).to_f32(), f16::from_bits(self.dmin).to_f32());
        for (s, chunk) in out.chunks_exact_mut(32).enumerate() {
            let (d1, m1) = (d * f32::from(self.scales[s]), min * f32::from(self.mins[s]));
            for (l, o) in chunk.iter_mut().enumerate() {
                *o = d1 * f32::from(q(32 * s + l)) - m1;
            }
        }
    }

    fn scaled(&self, x: &SuperRows, xb: usize, (main, min): (i32, i32)) -> f32 {
        let dx = x.d[xb];
        f16::from_bits(self.d).to_f32() * dx * main as f32 - f16::from_bits(self.dmin).to_f32() * dx * min as f32
    }
}

/// GGUF `Q4_K`: 4-bit quants, 4.5 bits per weight.
pub struct Q4K;

impl SuperFormat for Q4K {
    type Block = Q4KBlock;
    const BYTES: usize = 144;

    fn parse(b: &[u8]) -> Q4KBlock {
        Q4KBlock::parse(&b[0..4], &b[4..16], &b[16..144])
    }

    fn dequantize(block: &Q4KBlock, out: &mut [f32]) {
        block.values(out, |v| block.nibble(v));
    }

    fn dot(block: &Q4KBlock, x: &SuperRows, xb: usize) -> f32 {
        let ints = block.integer_dots(&x.qs[xb], &x.bsums[xb], |v| i32::from(block.nibble(v)));
        block.scaled(x, xb, ints)
    }
}

/// A `Q5_K` block: [`Q4KBlock`]'s fields with a fifth bit per value.
#[derive(Clone, Copy)]
pub struct Q5KBlock {
    pub(super) low: Q4KBlock,
    /// Bit `s` of byte `l`: the fifth bit of value `32 s + l`.
    pub(super) qh: [u8; QK_K / 8],
}

impl Q5KBlock {
    fn quant(&self, v: usize) -> u8 {
        self.low.nibble(v) | (((self.qh[v % 32] >> (v / 32)) & 1) << 4)
    }
}

/// GGUF `Q5_K`: 5-bit quants, 5.5 bits per weight.
pub struct Q5K;

impl SuperFormat for Q5K {
    type Block = Q5KBlock;
    const BYTES: usize = 176;

    fn parse(b: &[u8]) -> Q5KBlock {
        let mut qh = [0; QK_K / 8];
        qh.copy_from_slice(&b[16..48]);
        Q5KBlock { low: Q4KBlock::parse(&b[0..4], &b[4..16], &b[48..176]), qh }
    }

    fn dequantize(block: &Q5KBlock, out: &mut [f32]) {
        block.low.values(out, |v| block.quant(v));
    }

    fn dot(block: &Q5KBlock, x: &SuperRows, xb: usize) -> f32 {
        let ints = block.low.integer_dots(&x.qs[xb], &x.bsums[xb], |v| i32::from(block.quant(v)));
        block.low.scaled(x, xb, ints)
    }
}

/// A `Q6_K` block: `x = d * sc[g] * (q - 32)` for the 16 values of group `g`.
#[derive(Clone, Copy)]
pub struct Q6KBlock {
    pub(super) d: u16,
    pub(super) scales: [i8; QK_K / 16],
    /// In each half of 128 values: byte `l` of the first 32 holds value `l`
    /// (low nibble) and `64 + l` (high); of the next 32, `32 + l` and `96 + l`.
    pub(super) ql: [u8; QK_K / 2],
    /// In each half: bits `2t..2t+2` of byte `l` are the top bits of value `32 t + l`.
    pub(super) qh: [u8; QK_K / 4],
}

impl Q6KBlock {
    /// The unsigned quant (0..64) of value `v`.
    fn quant(&self, v: usize) -> u8 {
        let (half, t, l) = (v / 128, v % 128 / 32, v % 32);
        let byte = self.ql[64 * half + 32 * (t % 2) + l];
        let low = if t < 2 { byte & 0x0F } else { byte >> 4 };
        low | (((self.qh[32 * half + l] >> (2 * t)) & 3) << 4)
    }
}

/// GGUF `Q6_K`: 6-bit quants, 6.56 bits per weight.
pub struct Q6K;

impl SuperFormat for Q6K {
    type Block = Q6KBlock;
    const BYTES: usize = 210;

    fn parse(b: &[u8]) -> Q6KBlock {
        let mut block =
            Q6KBlock { d: u16::from_le_bytes([b[208], b[209]]), scales: [0; 16], ql: [0; 128], qh: [0; 64] };
        block.ql.copy_from_slice(&b[0..128]);
        block.qh.copy_from_slice(&b[128..192]);
        for (s, &byte) in block.scales.iter_mut().zip(&b[192..208]) {
            *s = byte as i8;
        }
        block
    }

    fn dequantize(block: &Q6KBlock, out: &mut [f32]) {
        let d = f16::from_bits(block.d).to_f32();
        for (v, o) in out.iter_mut().enumerate() {
            *o = d * f32::from(block.scales[v / 16]) * f32::from(block.quant(v) as i8 - 32);
        }
    }

    fn dot(block: &Q6KBlock, x: &SuperRows, xb: usize) -> f32 {
        let (q, sums) = (&x.qs[xb], &x.bsums[xb]);
        let mut main = 0i32;
        let mut offset = 0i32;
        for (g, &sc) in block.scales.iter().enumerate() {
            let dot: i32 = (16 * g..16 * (g + 1)).map(|v| i32::from(block.quant(v)) * i32::from(q[v])).sum();
            main += i32::from(sc) * dot;
            offset += i32::from(sc) * i32::from(sums[g]);
        }
        f16::from_bits(block.d).to_f32() * x.d[xb] * (main - 32 * offset) as f32
    }
}

/// A K-quant `[rows, cols]` weight matrix, row-major.
pub struct SuperMatrix<F: SuperFormat> {
    pub(super) blocks: Vec<F::Block>,
    pub(super) rows: usize,
    /// Super-blocks per row (`cols / QK_K`).
    pub(super) k: usize,
}

impl<F: SuperFormat> SuperMatrix<F> {
    /// Reads `rows * cols / QK_K` GGUF blocks. `None` unless `cols` is a
    /// multiple of [`QK_K`] and `bytes` exactly the matrix.
    pub fn from_gguf_bytes(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(QK_K) || bytes.len() != rows * cols / QK_K * F::BYTES {
            return None;
        }
        Some(Self { blocks: bytes.chunks_exact(F::BYTES).map(F::parse).collect(), rows, k: cols / QK_K })
    }

    /// Stacks matrices with the same number of columns into one.
    pub fn stack(parts: Vec<Self>) -> Option<Self> {
        let k = parts.first()?.k;
        if parts.iter().any(|p| p.k != k) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        Some(Self { blocks: parts.into_iter().flat_map(|p| p.blocks).collect(), rows, k })
    }

    /// The rows in `ranges`, in order (a column-parallel shard).
    pub fn select_rows(&self, ranges: &[std::ops::Range<usize>]) -> Self {
        let k = self.k;
        let blocks = ranges.iter().flat_map(|r| self.blocks[r.start * k..r.end * k].iter().copied()).collect();
        Self { blocks, rows: ranges.iter().map(|r| r.len()).sum(), k }
    }

    /// Super-blocks `blocks` of every row (a row-parallel shard).
    pub fn select_col_blocks(&self, blocks: std::ops::Range<usize>) -> Self {
        let k = self.k;
        let picked = (0..self.rows)
            .flat_map(|r| self.blocks[r * k + blocks.start..r * k + blocks.end].iter().copied())
            .collect();
        Self { blocks: picked, rows: self.rows, k: blocks.len() }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.k * QK_K
    }

    /// Row `j` dequantized into `out` (`cols` values).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        for (block, chunk) in self.blocks[j * self.k..(j + 1) * self.k].iter().zip(out.chunks_exact_mut(QK_K)) {
            F::dequantize(block, chunk);
        }
    }

    /// `w[j] · x[i]`, portably.
    pub fn dot(&self, j: usize, x: &SuperRows, i: usize) -> f32 {
        let k = self.k;
        (0..k).map(|b| F::dot(&self.blocks[j * k + b], x, i * k + b)).sum()
    }
}

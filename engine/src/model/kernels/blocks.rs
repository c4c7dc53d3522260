//! Storage formats of quantized weights and activations.
//!
//! Weights are read from llama.cpp's GGUF blocks and stored in groups of
//! [`GROUP`] rows, each block of a group holding its rows' quants
//! interleaved four bytes at a time and their scales side by side (the same
//! numbers as the GGUF bytes, in the order whole-register products want).
//! Activations are quantized per step into [`QuantizedRows`], which carries
//! what every weight format needs.

use half::f16;

use super::pages::HugeVec;

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

/// Weight rows stored together: the SIMD products compute one output of
/// each of them per lane of a 512-bit register.
pub const GROUP: usize = 16;

/// One block of [`GROUP`] weight rows: their quants interleaved four bytes
/// at a time (see [`Packing`]), their scales and minimums side by side, so a
/// block's products with one activation row are a few whole-register
/// instructions and its scales convert sixteen at a time. 64-byte aligned,
/// and a multiple of 64 bytes for every format, so no load splits a line.
#[repr(C, align(64))]
pub struct GroupBlock<F: Packing> {
    pub(super) q: F::Packed,
    /// Scales (f16 bits), one per row.
    pub(super) d: [u16; GROUP],
    /// Minimums (f16 bits), one per row; 0 for formats without.
    pub(super) m: [u16; GROUP],
}

// Not derived: a derive would ask the format marker `F` to be `Copy` too.
impl<F: Packing> Clone for GroupBlock<F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F: Packing> Copy for GroupBlock<F> {}

/// How a format's block quants sit in a [`GroupBlock`]. Chunk `c` of a block
/// is its values `4c..4c + 4`; the packed bytes hold chunks lane-major, so
/// the 64 bytes of a chunk are four bytes of each of the 16 rows, one
/// 32-bit lane each, ready for four-byte dot products against the same four
/// activation bytes broadcast to every lane.
pub trait Packing: Format {
    /// The packed quants of one block of [`GROUP`] rows.
    type Packed: Copy + Send + Sync + 'static;
    /// Packed quants of a block of all-zero rows.
    const EMPTY: Self::Packed;
    /// Whether the format has a minimum term (`x = d * q + m`).
    const HAS_MIN: bool;
    /// Writes one row's block quants into lane `lane`.
    fn pack(q: &Self::Quants, lane: usize, into: &mut Self::Packed);
    /// Reads lane `lane`'s block quants back.
    fn unpack(p: &Self::Packed, lane: usize) -> Self::Quants;
    /// `Σ q[i] * x[i]` over the block, exactly, with the stored quants.
    fn isum(q: &Self::Quants, x: &[i8; QK]) -> i32;
}

/// Byte `i` of chunk `c` of `lane`: where value `4c + i` of a byte-per-value
/// format sits, or value `4c + i` and `4c + i + 16` of a nibble format's
/// first 16 bytes.
const fn at(c: usize, lane: usize, i: usize) -> usize {
    c * 4 * GROUP + lane * 4 + i
}

/// `Q4_1`: four 64-byte chunks of nibbles. Byte `i` of chunk `c` keeps the
/// GGUF byte `4c + i`: value `4c + i` low, `4c + i + 16` high, so one load
/// and a mask or a shift give chunk `c` and chunk `c + 4`.
impl Packing for Q4_1 {
    type Packed = [u8; 4 * 4 * GROUP];
    const EMPTY: Self::Packed = [0; 4 * 4 * GROUP];
    const HAS_MIN: bool = true;

    fn pack(q: &[u8; QK / 2], lane: usize, into: &mut Self::Packed) {
        for (t, &byte) in q.iter().enumerate() {
            into[at(t / 4, lane, t % 4)] = byte;
        }
    }

    fn unpack(p: &Self::Packed, lane: usize) -> [u8; QK / 2] {
        std::array::from_fn(|t| p[at(t / 4, lane, t % 4)])
    }

    fn isum(q: &[u8; QK / 2], x: &[i8; QK]) -> i32 {
        let mut sum = 0;
        for (t, &byte) in q.iter().enumerate() {
            sum += i32::from(byte & 0x0F) * i32::from(x[t]) + i32::from(byte >> 4) * i32::from(x[t + QK / 2]);
        }
        sum
    }
}

/// Bytes of [`Q5`]'s packed nibbles, before its fifth bits.
const Q5_NIBBLES: usize = 4 * 4 * GROUP;

/// [`Q5`]: the nibbles as [`Q4_1`]'s, then one 64-bit mask per chunk whose bit
/// `4 * lane + i` is the fifth bit of value `4c + i` of `lane`: the byte
/// lanes of that chunk's register, for a masked add of 16.
impl Packing for Q5 {
    type Packed = [u8; Q5_NIBBLES + 8 * 8];
    const EMPTY: Self::Packed = [0; Q5_NIBBLES + 8 * 8];
    const HAS_MIN: bool = true;

    fn pack(q: &Q5Quants, lane: usize, into: &mut Self::Packed) {
        for (t, &byte) in q.qs.iter().enumerate() {
            into[at(t / 4, lane, t % 4)] = byte;
        }
        for v in 0..QK {
            let (byte, bit) = Self::fifth_bit(v / 4, lane, v % 4);
            into[byte] = (into[byte] & !(1 << bit)) | ((((q.qh >> v) & 1) as u8) << bit);
        }
    }

    fn unpack(p: &Self::Packed, lane: usize) -> Q5Quants {
        let qs = std::array::from_fn(|t| p[at(t / 4, lane, t % 4)]);
        let qh = (0..QK).fold(0u32, |qh, v| {
            let (byte, bit) = Self::fifth_bit(v / 4, lane, v % 4);
            qh | ((u32::from(p[byte] >> bit) & 1) << v)
        });
        Q5Quants { qh, qs }
    }

    fn isum(q: &Q5Quants, x: &[i8; QK]) -> i32 {
        let hi = |v: usize| ((q.qh >> v) & 1) as i32 * 16;
        let mut sum = 0;
        for (t, &byte) in q.qs.iter().enumerate() {
            sum += (i32::from(byte & 0x0F) + hi(t)) * i32::from(x[t])
                + (i32::from(byte >> 4) + hi(t + QK / 2)) * i32::from(x[t + QK / 2]);
        }
        sum
    }
}

impl Q5 {
    /// Byte and bit of the packed block holding the fifth bit of value
    /// `4c + i` of `lane`.
    const fn fifth_bit(c: usize, lane: usize, i: usize) -> (usize, usize) {
        let bit = 4 * lane + i;
        (Q5_NIBBLES + 8 * c + bit / 8, bit % 8)
    }
}

/// `Q8_0`: eight 64-byte chunks, each quant stored offset by 128 as an
/// unsigned byte (`q ^ 0x80`), the unsigned operand of the byte products;
/// the kernels take `128 * Σx` back out in integers.
impl Packing for Q8_0 {
    type Packed = [u8; 8 * 4 * GROUP];
    const EMPTY: Self::Packed = [0x80; 8 * 4 * GROUP];
    const HAS_MIN: bool = false;

    fn pack(q: &[i8; QK], lane: usize, into: &mut Self::Packed) {
        for (v, &q) in q.iter().enumerate() {
            into[at(v / 4, lane, v % 4)] = q as u8 ^ 0x80;
        }
    }

    fn unpack(p: &Self::Packed, lane: usize) -> [i8; QK] {
        std::array::from_fn(|v| (p[at(v / 4, lane, v % 4)] ^ 0x80) as i8)
    }

    fn isum(q: &[i8; QK], x: &[i8; QK]) -> i32 {
        q.iter().zip(x).map(|(&a, &b)| i32::from(a) * i32::from(b)).sum()
    }
}

/// A quantized `[rows, cols]` weight matrix in [`GroupBlock`]s: group `g`'s
/// block `b` at `g * k + b`; the last group padded with zero rows.
pub struct QMatrix<F: Packing> {
    pub(super) blocks: HugeVec<GroupBlock<F>>,
    pub(super) rows: usize,
    /// Blocks per row (`cols / QK`).
    pub(super) k: usize,
}

impl<F: Packing> QMatrix<F> {
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
        let k = cols / QK;
        Self::build(rows, k, |j, b| parse(&bytes[(j * k + b) * block_bytes..][..block_bytes]))
    }

    /// A matrix whose row `j`'s block `b` is `block(j, b)`; `None` when a
    /// block is.
    fn build(rows: usize, k: usize, block: impl Fn(usize, usize) -> Option<(u16, u16, F::Quants)>) -> Option<Self> {
        let empty = GroupBlock { q: F::EMPTY, d: [0; GROUP], m: [0; GROUP] };
        let mut blocks = HugeVec::filled(rows.div_ceil(GROUP) * k, empty);
        for j in 0..rows {
            let lane = j % GROUP;
            for (b, group) in blocks[j / GROUP * k..][..k].iter_mut().enumerate() {
                let (d, m, q) = block(j, b)?;
                group.d[lane] = d;
                group.m[lane] = m;
                F::pack(&q, lane, &mut group.q);
            }
        }
        Some(Self { blocks, rows, k })
    }

    /// Row `j`'s block `b`: scale, minimum and quants.
    pub(super) fn block(&self, j: usize, b: usize) -> (u16, u16, F::Quants) {
        let (group, lane) = (&self.blocks[j / GROUP * self.k + b], j % GROUP);
        (group.d[lane], group.m[lane], F::unpack(&group.q, lane))
    }

    /// Stacks matrices with the same number of columns into one.
    pub fn stack(parts: Vec<Self>) -> Option<Self> {
        let k = parts.first()?.k;
        if parts.iter().any(|p| p.k != k) {
            return None;
        }
        let owner: Vec<(usize, usize)> =
            parts.iter().enumerate().flat_map(|(p, part)| (0..part.rows).map(move |j| (p, j))).collect();
        Self::build(owner.len(), k, |j, b| Some(parts[owner[j].0].block(owner[j].1, b)))
    }

    /// The rows in `ranges`, in order: a column-parallel shard (its
    /// outputs' share of the rows).
    pub fn select_rows(&self, ranges: &[std::ops::Range<usize>]) -> Self {
        let rows: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
        Self::build(rows.len(), self.k, |j, b| Some(self.block(rows[j], b))).expect("every block is there")
    }

    /// Blocks `blocks` of every row (columns `blocks × QK`): a row-parallel
    /// shard (its inputs' share of the columns).
    pub fn select_col_blocks(&self, blocks: std::ops::Range<usize>) -> Self {
        Self::build(self.rows, blocks.len(), |j, b| Some(self.block(j, blocks.start + b)))
            .expect("every block is there")
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.k * QK
    }

    /// Row `j` dequantized into `out` (`cols` values): an embedding lookup.
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        for (b, chunk) in out.chunks_exact_mut(QK).enumerate().take(self.k) {
            let (d, m, q) = self.block(j, b);
            F::dequantize(d, m, &q, chunk);
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
    /// `Σq` of each block, for taking the `Q8_0` weights' offset back out.
    pub(super) sums: Vec<i32>,
    pub(super) qs: Vec<[i8; QK]>,
    pub(super) rows: usize,
    pub(super) k: usize,
}

/// Quantizes one row of `32 * d.len()` values (round half away from zero,
/// `d = amax / 127`, as llama.cpp).
pub fn quantize_row_q8(x: &[f32], d: &mut [f32], s: &mut [f32], sums: &mut [i32], qs: &mut [[i8; QK]]) {
    for ((((chunk, d), s), total), q) in x.chunks_exact(QK).zip(d).zip(s).zip(sums).zip(qs) {
        let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        *d = amax / 127.0;
        let inv = if *d == 0.0 { 0.0 } else { 1.0 / *d };
        let mut sum = 0i32;
        for (q, &v) in q.iter_mut().zip(chunk) {
            *q = (v * inv).round() as i8;
            sum += i32::from(*q);
        }
        *s = *d * sum as f32;
        *total = sum;
    }
}

// A group's block is exactly its quants, scales and minimums: no padding.
const _: () = assert!(std::mem::size_of::<GroupBlock<Q4_1>>() == GROUP * (16 + 2 + 2));
const _: () = assert!(std::mem::size_of::<GroupBlock<Q5>>() == GROUP * (16 + 4 + 2 + 2));
const _: () = assert!(std::mem::size_of::<GroupBlock<Q8_0>>() == GROUP * (32 + 2 + 2));

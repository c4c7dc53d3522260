//! llama.cpp's K-quants: super-blocks of 256 values in sub-blocks of 32
//! (`Q4_K`, `Q5_K`) or 16 (`Q6_K`), each sub-block with its own small
//! integer scale under the block's f16 scale.
//!
//! Their products take activations quantized per 256 values with the sum of
//! every 16 quants ([`SuperRows`], llama.cpp's `Q8_K`): the sub-block scales
//! then stay integers through the whole block, and the minimum (or the
//! `Q6_K` offset of 32) is one multiply of those sums. Every format is read
//! into one form ([`Canon`]: unsigned quants, a scale and a sum weight per
//! 16 values) and stored, as the 32-value formats are, in groups of 16 rows
//! whose quants sit four bytes per row per register lane ([`SuperGroup`]).

use half::f16;

use super::blocks::GROUP;
use super::pages::HugeVec;

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

/// One block of [`SuperRows`] (round half away from zero, `d = amax / 127`).
pub(super) fn quantize_block(x: &[f32], d: &mut f32, q: &mut [i8; QK_K], sums: &mut [i16; QK_K / 16]) {
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

/// One row's super-block in the form every K-quant shares: value `v` is
/// `d * scales[v / 16] * q[v] - dm * weights[v / 16]`, `dm` being `dmin`
/// (`Q4_K`, `Q5_K`) or `32 d` (`Q6_K`, whose quants are stored plus 32).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Canon {
    pub(super) d: u16,
    /// `Q4_K` / `Q5_K`'s minimum scale; 0 for `Q6_K`.
    pub(super) dmin: u16,
    /// Scale of each group of 16 values.
    pub(super) scales: [i8; 16],
    /// Weight of each group's activation sum: the minimum, or `Q6_K`'s scale.
    pub(super) weights: [i8; 16],
    /// Unsigned quants (0..64), in value order.
    pub(super) q: [u8; QK_K],
}

/// A GGUF K-quant format.
pub trait SuperFormat: Send + Sync + 'static {
    /// Bytes per block in a GGUF file.
    const BYTES: usize;
    /// Bits of each quant above its low four (0, 1 or 2): the high-bit planes
    /// a [`SuperGroup`] keeps.
    const HIGH_BITS: usize;
    /// Whether the sum weights are scaled by `32 d` (`Q6_K`) rather than `dmin`.
    const OFFSET_32: bool;
    /// The high-bit planes of a [`SuperGroup`]: `512 * HIGH_BITS` bytes.
    type Planes: Copy + Send + Sync + 'static;
    /// Planes of all-zero quants.
    const NO_PLANES: Self::Planes;
    /// Reads one GGUF block.
    fn parse(bytes: &[u8]) -> Canon;
    /// Value `v` of a block, as llama.cpp computes it.
    fn value(c: &Canon, v: usize) -> f32;
}

/// `Q4_K` / `Q5_K`'s 6-bit scales and minimums, packed in 12 bytes: the low
/// six bits of bytes 0..8 for the first four, nibbles of bytes 8..12 and the
/// top two bits of bytes 0..8 for the rest; each covers two groups of 16.
fn six_bit_scales(c: &mut Canon, d: &[u8], scales: &[u8]) {
    c.d = u16::from_le_bytes([d[0], d[1]]);
    c.dmin = u16::from_le_bytes([d[2], d[3]]);
    for s in 0..8 {
        let (sc, m) = if s < 4 {
            (scales[s] & 63, scales[s + 4] & 63)
        } else {
            ((scales[s + 4] & 0x0F) | ((scales[s - 4] >> 6) << 4), (scales[s + 4] >> 4) | ((scales[s] >> 6) << 4))
        };
        c.scales[2 * s..2 * s + 2].fill(sc as i8);
        c.weights[2 * s..2 * s + 2].fill(m as i8);
    }
}

/// `Q4_K` / `Q5_K`'s nibbles: byte `l` of each 32 holds value `64 j + l` in
/// its low nibble and `64 j + 32 + l` in its high one.
fn k_nibbles(c: &mut Canon, qs: &[u8]) {
    for (v, q) in c.q.iter_mut().enumerate() {
        let byte = qs[v / 64 * 32 + v % 32];
        *q = if v % 64 < 32 { byte & 0x0F } else { byte >> 4 };
    }
}

/// `Q4_K` / `Q5_K`'s value: `d sc q - dmin m`, rounded as llama.cpp does.
fn min_value(c: &Canon, v: usize) -> f32 {
    let g = v / 16;
    let d1 = f16::from_bits(c.d).to_f32() * f32::from(c.scales[g] as u8);
    let m1 = f16::from_bits(c.dmin).to_f32() * f32::from(c.weights[g] as u8);
    d1 * f32::from(c.q[v]) - m1
}

const EMPTY_CANON: Canon = Canon { d: 0, dmin: 0, scales: [0; 16], weights: [0; 16], q: [0; QK_K] };

/// GGUF `Q4_K`: 4-bit quants, 4.5 bits per weight.
pub struct Q4K;

impl SuperFormat for Q4K {
    const BYTES: usize = 144;
    const HIGH_BITS: usize = 0;
    const OFFSET_32: bool = false;
    type Planes = [u8; 0];
    const NO_PLANES: [u8; 0] = [];

    fn parse(b: &[u8]) -> Canon {
        let mut c = EMPTY_CANON;
        six_bit_scales(&mut c, &b[0..4], &b[4..16]);
        k_nibbles(&mut c, &b[16..144]);
        c
    }

    fn value(c: &Canon, v: usize) -> f32 {
        min_value(c, v)
    }
}

/// GGUF `Q5_K`: 5-bit quants, 5.5 bits per weight.
pub struct Q5K;

impl SuperFormat for Q5K {
    const BYTES: usize = 176;
    const HIGH_BITS: usize = 1;
    const OFFSET_32: bool = false;
    type Planes = [u8; 512];
    const NO_PLANES: [u8; 512] = [0; 512];

    fn parse(b: &[u8]) -> Canon {
        let mut c = EMPTY_CANON;
        six_bit_scales(&mut c, &b[0..4], &b[4..16]);
        k_nibbles(&mut c, &b[48..176]);
        // Bit `s` of byte `l` of `qh`: the fifth bit of value `32 s + l`.
        let qh = &b[16..48];
        for (v, q) in c.q.iter_mut().enumerate() {
            *q |= ((qh[v % 32] >> (v / 32)) & 1) << 4;
        }
        c
    }

    fn value(c: &Canon, v: usize) -> f32 {
        min_value(c, v)
    }
}

/// GGUF `Q6_K`: 6-bit quants, 6.56 bits per weight.
pub struct Q6K;

impl SuperFormat for Q6K {
    const BYTES: usize = 210;
    const HIGH_BITS: usize = 2;
    const OFFSET_32: bool = true;
    type Planes = [u8; 1024];
    const NO_PLANES: [u8; 1024] = [0; 1024];

    fn parse(b: &[u8]) -> Canon {
        let mut c = EMPTY_CANON;
        c.d = u16::from_le_bytes([b[208], b[209]]);
        for (g, &byte) in b[192..208].iter().enumerate() {
            c.scales[g] = byte as i8;
            c.weights[g] = byte as i8;
        }
        // In each half of 128 values: byte `l` of the first 32 of `ql` holds value
        // `l` (low nibble) and `64 + l` (high); of the next 32, `32 + l` and `96 + l`;
        // bits `2t..2t+2` of byte `l` of `qh` are the top bits of value `32 t + l`.
        let (ql, qh) = (&b[0..128], &b[128..192]);
        for (v, q) in c.q.iter_mut().enumerate() {
            let (half, t, l) = (v / 128, v % 128 / 32, v % 32);
            let byte = ql[64 * half + 32 * (t % 2) + l];
            let low = if t < 2 { byte & 0x0F } else { byte >> 4 };
            *q = low | (((qh[32 * half + l] >> (2 * t)) & 3) << 4);
        }
        c
    }

    fn value(c: &Canon, v: usize) -> f32 {
        f16::from_bits(c.d).to_f32() * f32::from(c.scales[v / 16]) * f32::from(c.q[v] as i8 - 32)
    }
}

/// One super-block of [`GROUP`] weight rows, laid out for whole-register
/// products as the 32-value formats' [`super::blocks::GroupBlock`]: chunk
/// `c` of sub-block `s` is the four values `32 s + 4 c..+4` of each row, one
/// 32-bit lane per row. 64-byte aligned, a multiple of 64 bytes.
#[repr(C, align(64))]
pub struct SuperGroup<F: SuperFormat> {
    /// Low nibbles: 64-byte chunk `c` of sub-block pair `p` at
    /// `64 (8 p + c)`, sub-block `2p` in the low nibbles, `2p + 1` in the high.
    pub(super) nibbles: [u8; 2048],
    /// High-bit plane `h` (bit `4 + h` of each quant): one 64-bit mask per
    /// chunk, `8 s + c`, bit `4 lane + i` for value `4c + i` of the lane.
    pub(super) planes: F::Planes,
    /// Group `g`'s scale of each lane at `16 g + lane`.
    pub(super) scales: [i8; 256],
    /// The sum weights of groups `2t` and `2t + 1` of each lane at
    /// `32 t + 2 lane`: one i16 pair per 32-bit lane once widened.
    pub(super) weights: [i8; 256],
    pub(super) d: [u16; GROUP],
    pub(super) dmin: [u16; GROUP],
}

// Not derived: a derive would ask the format marker `F` to be `Copy` too.
impl<F: SuperFormat> Clone for SuperGroup<F> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<F: SuperFormat> Copy for SuperGroup<F> {}

impl<F: SuperFormat> SuperGroup<F> {
    const EMPTY: Self = Self {
        nibbles: [0; 2048],
        planes: F::NO_PLANES,
        scales: [0; 256],
        weights: [0; 256],
        d: [0; GROUP],
        dmin: [0; GROUP],
    };

    /// Byte of the nibbles holding value `v` of `lane`, and whether it is the high nibble.
    const fn nibble_at(v: usize, lane: usize) -> (usize, bool) {
        let (s, c, i) = (v / 32, v % 32 / 4, v % 4);
        (64 * (8 * (s / 2) + c) + 4 * lane + i, s % 2 == 1)
    }

    /// Byte and bit of high-bit plane `h` for value `v` of `lane`.
    const fn plane_at(h: usize, v: usize, lane: usize) -> (usize, usize) {
        let bit = 4 * lane + v % 4;
        (512 * h + 8 * (v / 4) + bit / 8, bit % 8)
    }

    fn planes(&mut self) -> &mut [u8] {
        // SAFETY: `Planes` is a byte array of 512 * HIGH_BITS bytes.
        unsafe { std::slice::from_raw_parts_mut((&raw mut self.planes).cast::<u8>(), 512 * F::HIGH_BITS) }
    }

    fn planes_ref(&self) -> &[u8] {
        // SAFETY: as in `planes`.
        unsafe { std::slice::from_raw_parts((&raw const self.planes).cast::<u8>(), 512 * F::HIGH_BITS) }
    }

    fn pack(&mut self, c: &Canon, lane: usize) {
        self.d[lane] = c.d;
        self.dmin[lane] = c.dmin;
        for g in 0..16 {
            self.scales[16 * g + lane] = c.scales[g];
            self.weights[32 * (g / 2) + 2 * lane + g % 2] = c.weights[g];
        }
        for (v, &q) in c.q.iter().enumerate() {
            let (byte, high) = Self::nibble_at(v, lane);
            let (keep, put) = if high { (0x0F, (q & 0x0F) << 4) } else { (0xF0, q & 0x0F) };
            self.nibbles[byte] = (self.nibbles[byte] & keep) | put;
            for h in 0..F::HIGH_BITS {
                let (byte, bit) = Self::plane_at(h, v, lane);
                let planes = self.planes();
                planes[byte] = (planes[byte] & !(1 << bit)) | (((q >> (4 + h)) & 1) << bit);
            }
        }
    }

    fn unpack(&self, lane: usize) -> Canon {
        let mut c = EMPTY_CANON;
        c.d = self.d[lane];
        c.dmin = self.dmin[lane];
        for g in 0..16 {
            c.scales[g] = self.scales[16 * g + lane];
            c.weights[g] = self.weights[32 * (g / 2) + 2 * lane + g % 2];
        }
        for (v, q) in c.q.iter_mut().enumerate() {
            let (byte, high) = Self::nibble_at(v, lane);
            *q = if high { self.nibbles[byte] >> 4 } else { self.nibbles[byte] & 0x0F };
            for h in 0..F::HIGH_BITS {
                let (byte, bit) = Self::plane_at(h, v, lane);
                *q |= ((self.planes_ref()[byte] >> bit) & 1) << (4 + h);
            }
        }
        c
    }
}

/// A K-quant `[rows, cols]` weight matrix in [`SuperGroup`]s: group `g`'s
/// super-block `b` at `g * k + b`; the last group padded with zero rows.
pub struct SuperMatrix<F: SuperFormat> {
    pub(super) blocks: HugeVec<SuperGroup<F>>,
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
        let k = cols / QK_K;
        Some(Self::build(rows, k, |j, b| F::parse(&bytes[(j * k + b) * F::BYTES..][..F::BYTES])))
    }

    /// A matrix whose row `j`'s super-block `b` is `block(j, b)`.
    fn build(rows: usize, k: usize, block: impl Fn(usize, usize) -> Canon) -> Self {
        let mut blocks = HugeVec::filled(rows.div_ceil(GROUP) * k, SuperGroup::EMPTY);
        for j in 0..rows {
            for (b, group) in blocks[j / GROUP * k..][..k].iter_mut().enumerate() {
                group.pack(&block(j, b), j % GROUP);
            }
        }
        Self { blocks, rows, k }
    }

    /// Row `j`'s super-block `b`.
    pub(super) fn block(&self, j: usize, b: usize) -> Canon {
        self.blocks[j / GROUP * self.k + b].unpack(j % GROUP)
    }

    /// Stacks matrices with the same number of columns into one.
    pub fn stack(parts: Vec<Self>) -> Option<Self> {
        let k = parts.first()?.k;
        if parts.iter().any(|p| p.k != k) {
            return None;
        }
        let owner: Vec<(usize, usize)> =
            parts.iter().enumerate().flat_map(|(p, part)| (0..part.rows).map(move |j| (p, j))).collect();
        Some(Self::build(owner.len(), k, |j, b| parts[owner[j].0].block(owner[j].1, b)))
    }

    /// The rows in `ranges`, in order (a column-parallel shard).
    pub fn select_rows(&self, ranges: &[std::ops::Range<usize>]) -> Self {
        let rows: Vec<usize> = ranges.iter().flat_map(|r| r.clone()).collect();
        Self::build(rows.len(), self.k, |j, b| self.block(rows[j], b))
    }

    /// Super-blocks `blocks` of every row (a row-parallel shard).
    pub fn select_col_blocks(&self, blocks: std::ops::Range<usize>) -> Self {
        Self::build(self.rows, blocks.len(), |j, b| self.block(j, blocks.start + b))
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.k * QK_K
    }

    /// Row `j` dequantized into `out` (`cols` values).
    pub fn dequantize_row(&self, j: usize, out: &mut [f32]) {
        for (b, chunk) in out.chunks_exact_mut(QK_K).enumerate().take(self.k) {
            let c = self.block(j, b);
            for (v, o) in chunk.iter_mut().enumerate() {
                *o = F::value(&c, v);
            }
        }
    }

    /// `w[j] · x[i]`, portably: per super-block the exact integer sums
    /// `Σ_g scale_g Σ q x` and `Σ_g weight_g Σ x`, each times its float factor
    /// into its own accumulator, the second subtracted at the end. The SIMD
    /// tiles take these steps in this order, so they give the same bits.
    pub fn dot(&self, j: usize, x: &SuperRows, i: usize) -> f32 {
        let (mut main, mut sums) = (0.0f32, 0.0f32);
        for b in 0..self.k {
            let c = self.block(j, b);
            let xb = i * self.k + b;
            let (xq, bsums) = (&x.qs[xb], &x.bsums[xb]);
            let (mut dot, mut weighted) = (0i32, 0i32);
            for (g, &sum) in bsums.iter().enumerate() {
                let group: i32 = (16 * g..16 * (g + 1)).map(|v| i32::from(c.q[v]) * i32::from(xq[v])).sum();
                dot += i32::from(c.scales[g]) * group;
                weighted += i32::from(c.weights[g]) * i32::from(sum);
            }
            let (dw, dm) = factors::<F>(c.d, c.dmin);
            main = (dot as f32).mul_add(dw * x.d[xb], main);
            sums = (weighted as f32).mul_add(dm * x.d[xb], sums);
        }
        main - sums
    }
}

/// `(d, dm)` of a block in f32: the factors of its integer sum and of its
/// weighted activation sums.
pub(super) fn factors<F: SuperFormat>(d: u16, dmin: u16) -> (f32, f32) {
    let d = f16::from_bits(d).to_f32();
    (d, if F::OFFSET_32 { 32.0 * d } else { f16::from_bits(dmin).to_f32() })
}

// A group's super-block holds 128 bytes of nibbles, 32 per high-bit plane, 16 scales, 16 sum
// weights and two f16 factors per row: no padding.
const _: () = assert!(std::mem::size_of::<SuperGroup<Q4K>>() == GROUP * (128 + 16 + 16 + 4));
const _: () = assert!(std::mem::size_of::<SuperGroup<Q5K>>() == GROUP * (128 + 32 + 16 + 16 + 4));
const _: () = assert!(std::mem::size_of::<SuperGroup<Q6K>>() == GROUP * (128 + 64 + 16 + 16 + 4));

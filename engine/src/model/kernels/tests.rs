use super::blocks::Format;
use super::*;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// Deterministic values in [-1, 1) with a few larger outliers, like activations.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let v = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            if i % 97 == 0 {
                v * 8.0
            } else {
                v
            }
        })
        .collect()
}

/// A matrix quantized by candle (so GGUF's byte layout is what we parse),
/// and its dequantized values.
fn matrix<F: Packing>(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> (QMatrix<F>, Vec<f32>) {
    let w = Tensor::from_vec(values(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    let dense = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (QMatrix::from_gguf_bytes(&q.data().unwrap(), rows, cols).unwrap(), dense)
}

fn dequantized(x: &QuantizedRows) -> Vec<f32> {
    x.qs.iter().zip(&x.d).flat_map(|(q, &d)| q.iter().map(move |&q| d * f32::from(q))).collect()
}

fn reference(w: &[f32], x: &[f32], n: usize, cols: usize) -> Vec<f32> {
    let m = x.len() / cols;
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..cols).map(|c| f64::from(w[j * cols + c]) * f64::from(x[i * cols + c])).sum();
            out[i * n + j] = dot as f32;
        }
    }
    out
}

fn check_product<F: Kernel>(dtype: GgmlDType) {
    // 9 blocks per row: both the 8-wide and the scalar scale paths run.
    let (n, cols) = (70, 288);
    let (w, dense) = matrix::<F>(dtype, n, cols, 1);
    assert_eq!(w.blocks.len(), n.div_ceil(GROUP) * cols / QK);
    let mut dq = vec![0.0; cols];
    w.dequantize_row(3, &mut dq);
    assert_eq!(dq, dense[3 * cols..4 * cols]);
    for m in [1, 2, 3, 5, 9] {
        let x = values(m * cols, 7 + m as u64);
        let mut xq = QuantizedRows::default();
        xq.quantize(&x, m, cols);
        let mut out = vec![0.0; m * n];
        w.matmul(&xq, &mut out);
        let want = reference(&dense, &dequantized(&xq), n, cols);
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{dtype:?} m={m} [{i}]: {a} vs {b}");
        }
    }
}

#[test]
fn q4_1_products_match_the_dequantized_weights() {
    check_product::<Q4_1>(GgmlDType::Q4_1);
}

#[test]
fn q8_0_products_match_the_dequantized_weights() {
    check_product::<Q8_0>(GgmlDType::Q8_0);
}

#[test]
fn q5_1_products_match_the_dequantized_weights() {
    check_product::<Q5>(GgmlDType::Q5_1);
}

/// A matrix of a GGUF type read into the format that holds it exactly.
fn read_as<F: Packing>(
    dtype: GgmlDType,
    block_bytes: usize,
    parse: impl Fn(&[u8]) -> Option<(u16, u16, F::Quants)>,
    rows: usize,
    cols: usize,
    seed: u64,
) -> (QMatrix<F>, Vec<f32>) {
    let w = Tensor::from_vec(values(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    let dense = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (QMatrix::from_blocks(&q.data().unwrap(), rows, cols, block_bytes, parse).unwrap(), dense)
}

#[test]
fn q4_0_and_q5_0_read_exactly_and_multiply_as_their_values() {
    let (n, cols) = (40, 288);
    let (w4, dense4) = read_as::<Q4_1>(GgmlDType::Q4_0, Q4_0_BYTES, q4_0_as_q4_1, n, cols, 21);
    let (w5, dense5) = read_as::<Q5>(GgmlDType::Q5_0, Q5_0_BYTES, q5_0_as_q5, n, cols, 22);
    let mut row = vec![0.0; cols];
    for j in 0..n {
        w4.dequantize_row(j, &mut row);
        assert_eq!(row, dense4[j * cols..(j + 1) * cols], "q4_0 row {j}");
        w5.dequantize_row(j, &mut row);
        assert_eq!(row, dense5[j * cols..(j + 1) * cols], "q5_0 row {j}");
    }
    for m in [1, 4, 7] {
        let mut xq = QuantizedRows::default();
        xq.quantize(&values(m * cols, 30 + m as u64), m, cols);
        for (name, got, dense) in [("q4_0", product(&w4, &xq), &dense4), ("q5_0", product(&w5, &xq), &dense5)] {
            let want = reference(dense, &dequantized(&xq), n, cols);
            assert_close(&got, &want, &format!("{name} m={m}"));
        }
    }
}

fn product<W: Tiled>(w: &W, x: &W::Rows) -> Vec<f32> {
    let m = w.activation_rows(x);
    let mut out = vec![0.0; m * w.rows()];
    w.matmul(x, &mut out);
    out
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{what} [{i}]: {a} vs {b}");
    }
}

/// A K-quant matrix quantized by candle, and its dequantized values.
fn super_matrix<F: SuperFormat>(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> (SuperMatrix<F>, Vec<f32>) {
    let w = Tensor::from_vec(values(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    let dense = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (SuperMatrix::from_gguf_bytes(&q.data().unwrap(), rows, cols).unwrap(), dense)
}

fn super_dequantized(x: &SuperRows) -> Vec<f32> {
    x.qs.iter().zip(&x.d).flat_map(|(q, &d)| q.iter().map(move |&q| d * f32::from(q))).collect()
}

/// Dequantization equals llama.cpp's (through candle) bit for bit; products
/// equal the f64 product of the dequantized weights and activations, for
/// 1..9 activation rows, through the SIMD tiles and the portable dot.
fn check_super<F: SuperFormat>(dtype: GgmlDType) {
    let (n, cols) = (37, 3 * QK_K);
    let (w, dense) = super_matrix::<F>(dtype, n, cols, 41);
    let mut row = vec![0.0; cols];
    for j in 0..n {
        w.dequantize_row(j, &mut row);
        assert_eq!(row, dense[j * cols..(j + 1) * cols], "{dtype:?} row {j}");
    }
    for m in [1, 2, 3, 5, 9] {
        let mut x = SuperRows::default();
        x.quantize(&values(m * cols, 50 + m as u64), m, cols);
        let want = reference(&dense, &super_dequantized(&x), n, cols);
        assert_close(&product(&w, &x), &want, &format!("{dtype:?} m={m}"));
        let portable: Vec<f32> =
            (0..m).flat_map(|i| (0..n).map(move |j| (i, j))).map(|(i, j)| w.dot(j, &x, i)).collect();
        assert_close(&portable, &want, &format!("{dtype:?} portable m={m}"));
    }
}

#[test]
fn q4_k_products_match_the_dequantized_weights() {
    check_super::<Q4K>(GgmlDType::Q4K);
}

#[test]
fn q5_k_products_match_the_dequantized_weights() {
    check_super::<Q5K>(GgmlDType::Q5K);
}

#[test]
fn q6_k_products_match_the_dequantized_weights() {
    check_super::<Q6K>(GgmlDType::Q6K);
}

#[test]
fn super_rows_keep_values_within_half_a_step_and_sum_each_sixteen() {
    let x = values(2 * QK_K, 61);
    let mut q = SuperRows::default();
    q.quantize(&x, 2, QK_K);
    let back = super_dequantized(&q);
    for (b, chunk) in x.chunks(QK_K).enumerate() {
        for (g, sum) in q.bsums[b].iter().enumerate() {
            assert_eq!(i32::from(*sum), q.qs[b][16 * g..16 * (g + 1)].iter().map(|&v| i32::from(v)).sum::<i32>());
        }
        for (j, v) in chunk.iter().enumerate() {
            assert!((v - back[b * QK_K + j]).abs() <= q.d[b] * 0.5 + 1e-6, "block {b} value {j}");
        }
    }
}

/// Odd shapes: any number of weight rows (partial tiles, fewer rows than
/// threads), of activation rows (every remainder of four) and of blocks per
/// row, for every format. Fixed seed: the same cases on every run.
#[test]
fn products_of_odd_shapes_match_the_dequantized_weights() {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]);
    let mut runner = TestRunner::new_with_rng(Config { cases: 48, ..Config::default() }, rng);
    let shapes = (1usize..70, 1usize..11, 1usize..4, 0u64..1000);
    for _ in 0..48 {
        let (n, m, k, seed) = shapes.new_tree(&mut runner).unwrap().current();
        let what = |f: &str| format!("{f} n={n} m={m} k={k} seed={seed}");
        let x = values(m * k * QK_K, seed + 1);
        let mut xq = QuantizedRows::default();
        xq.quantize(&x, m, k * QK_K);
        let mut xs = SuperRows::default();
        xs.quantize(&x, m, k * QK_K);
        let cols = k * QK_K;
        let (x32, x256) = (dequantized(&xq), super_dequantized(&xs));
        let (w, d) = matrix::<Q4_1>(GgmlDType::Q4_1, n, cols, seed);
        assert_close(&product(&w, &xq), &reference(&d, &x32, n, cols), &what("q4_1"));
        let (w, d) = matrix::<Q5>(GgmlDType::Q5_1, n, cols, seed);
        assert_close(&product(&w, &xq), &reference(&d, &x32, n, cols), &what("q5_1"));
        let (w, d) = matrix::<Q8_0>(GgmlDType::Q8_0, n, cols, seed);
        assert_close(&product(&w, &xq), &reference(&d, &x32, n, cols), &what("q8_0"));
        let (w, d) = super_matrix::<Q4K>(GgmlDType::Q4K, n, cols, seed);
        assert_close(&product(&w, &xs), &reference(&d, &x256, n, cols), &what("q4_k"));
        let (w, d) = super_matrix::<Q5K>(GgmlDType::Q5K, n, cols, seed);
        assert_close(&product(&w, &xs), &reference(&d, &x256, n, cols), &what("q5_k"));
        let (w, d) = super_matrix::<Q6K>(GgmlDType::Q6K, n, cols, seed);
        assert_close(&product(&w, &xs), &reference(&d, &x256, n, cols), &what("q6_k"));
    }
}

#[test]
fn a_row_gives_the_same_bits_alone_or_in_any_batch() {
    let (n, cols) = (100, 64);
    let (w, _) = matrix::<Q4_1>(GgmlDType::Q4_1, n, cols, 3);
    // 27 rows: tiles of 16, 8 and 3.
    let x = values(27 * cols, 5);
    let mut all = QuantizedRows::default();
    all.quantize(&x, 27, cols);
    let mut batched = vec![0.0; 27 * n];
    w.matmul(&all, &mut batched);
    for i in 0..27 {
        let mut one = QuantizedRows::default();
        one.quantize(&x[i * cols..(i + 1) * cols], 1, cols);
        let mut alone = vec![0.0; n];
        w.matmul(&one, &mut alone);
        assert_eq!(alone, batched[i * n..(i + 1) * n], "row {i}");
    }
    // The K-quants too, whose tiles take eight rows at a time (11 = 8 + 3).
    let (w, _) = super_matrix::<Q6K>(GgmlDType::Q6K, n, 2 * QK_K, 4);
    let x = values(11 * 2 * QK_K, 6);
    let mut all = SuperRows::default();
    all.quantize(&x, 11, 2 * QK_K);
    let batched = product(&w, &all);
    for i in 0..11 {
        let mut one = SuperRows::default();
        one.quantize(&x[i * 2 * QK_K..(i + 1) * 2 * QK_K], 1, 2 * QK_K);
        assert_eq!(product(&w, &one), batched[i * n..(i + 1) * n], "q6_k row {i}");
    }
}

#[test]
fn quantizing_activations_keeps_them_within_half_a_step() {
    let x = values(4 * 64, 9);
    let mut q = QuantizedRows::default();
    q.quantize(&x, 4, 64);
    let back = dequantized(&q);
    for (b, chunk) in x.chunks(QK).enumerate() {
        let sum: i32 = q.qs[b].iter().map(|&v| i32::from(v)).sum();
        assert_eq!(q.sums[b], sum, "block {b}");
        assert_eq!(q.s[b], q.d[b] * sum as f32, "block {b}");
        for (j, v) in chunk.iter().enumerate() {
            assert!((v - back[b * QK + j]).abs() <= q.d[b] * 0.5 + 1e-6, "block {b} value {j}");
        }
    }
    // The SIMD quantizer agrees with the portable one.
    let n = q.d.len();
    let (mut d, mut s, mut sums, mut qs) = (vec![0.0; n], vec![0.0; n], vec![0; n], vec![[0i8; QK]; n]);
    quantize_row_q8(&x, &mut d, &mut s, &mut sums, &mut qs);
    assert_eq!((d, s, sums, qs), (q.d.clone(), q.s.clone(), q.sums.clone(), q.qs.clone()));
}

/// Runs one tile over `rows` of a matrix, `R` activation rows from `i0`.
fn run_tile<const R: usize>(n: usize, tile: impl FnOnce([*mut f32; R])) -> Vec<f32> {
    let mut out = vec![f32::NAN; R * n];
    let rows: [*mut f32; R] = std::array::from_fn(|r| out[r * n..].as_mut_ptr());
    tile(rows);
    out
}

/// The SIMD tiles (AVX2, and AVX-512 VNNI where the CPU has it) give the
/// portable product's bits, for every format, every tile height, and a last
/// group cut short: an answer does not depend on which CPU computed it.
/// Values that land exactly on halves (and just below) once scaled: the SIMD
/// quantizers round them as `f32::round`, away from zero.
fn halves(n: usize) -> Vec<f32> {
    // 127 first, so the block's scale is 1 and the values are their own scaled values.
    let edges = [127.0, 0.5, -0.5, 2.5, -3.5, 0.49999997, -0.49999997, 126.5, -126.5, 1.5, 0.0, -0.0];
    (0..n).map(|i| if i % 32 == 0 { 127.0 } else { edges[i % edges.len()] }).collect()
}

#[cfg(target_arch = "x86_64")]
#[test]
fn simd_quantizers_round_halves_as_the_portable_ones() {
    if !x86::available() {
        return;
    }
    for x in [halves(2 * QK_K), values(2 * QK_K, 90)] {
        let n = x.len() / QK;
        let (mut d, mut s, mut sums, mut qs) = (vec![0.0; n], vec![0.0; n], vec![0; n], vec![[0i8; QK]; n]);
        quantize_row_q8(&x, &mut d, &mut s, &mut sums, &mut qs);
        let (mut d2, mut s2, mut sums2, mut qs2) = (vec![0.0; n], vec![0.0; n], vec![0; n], vec![[0i8; QK]; n]);
        // SAFETY: checked features; lengths match.
        unsafe { x86::quantize_row_q8(&x, &mut d2, &mut s2, &mut sums2, &mut qs2) };
        assert_eq!((d, s, sums, qs), (d2, s2, sums2, qs2));
        for block in x.chunks_exact(QK_K) {
            let (mut d, mut q, mut bsums) = (0.0, [0i8; QK_K], [0i16; 16]);
            super_blocks::quantize_block(block, &mut d, &mut q, &mut bsums);
            let (mut d2, mut q2, mut bsums2) = (0.0, [0i8; QK_K], [0i16; 16]);
            // SAFETY: checked features; a block of 256.
            unsafe { x86::quantize_block_q8k(block, &mut d2, &mut q2, &mut bsums2) };
            assert_eq!((d, q, bsums), (d2, q2, bsums2));
        }
    }
    assert_eq!(halves(4)[..3], [127.0, 0.5, -0.5]);
}

#[cfg(target_arch = "x86_64")]
fn check_tiles_bit_for_bit<F: Kernel>(w: &QMatrix<F>, x: &QuantizedRows, what: &str) {
    let n = w.rows;
    let portable: Vec<f32> = (0..x.rows).flat_map(|i| (0..n).map(move |j| scalar::dot(w, j, x, i))).collect();
    fn each_height<F: Kernel, const R: usize>(
        w: &QMatrix<F>,
        x: &QuantizedRows,
        portable: &[f32],
        what: &str,
        avx512: bool,
    ) {
        let n = w.rows;
        for i0 in 0..=x.rows - R {
            // SAFETY: checked features; shapes match; tiles start at group 0.
            let got = run_tile::<R>(n, |out| unsafe {
                if avx512 {
                    x86::tile_avx512(w, 0..n, x, i0, out)
                } else {
                    x86::tile_avx2(w, 0..n, x, i0, out)
                }
            });
            let want = &portable[i0 * n..(i0 + R) * n];
            assert!(
                got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what} avx512={avx512} R={R} i0={i0}"
            );
        }
    }
    let mut kinds = vec![false];
    if x86::avx512() {
        kinds.push(true);
    } else {
        eprintln!("no AVX-512 VNNI here: only the AVX2 tiles run");
    }
    for avx512 in kinds {
        each_height::<F, 1>(w, x, &portable, what, avx512);
        each_height::<F, 3>(w, x, &portable, what, avx512);
        each_height::<F, 8>(w, x, &portable, what, avx512);
        if avx512 {
            each_height::<F, 16>(w, x, &portable, what, avx512);
        }
    }
    // Through the dispatch, which splits sixteen rows in two for AVX2.
    let mut all = vec![0.0; x.rows * n];
    w.matmul(x, &mut all);
    assert!(all.iter().zip(&portable).all(|(a, b)| a.to_bits() == b.to_bits()), "{what} matmul");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn simd_tiles_give_the_portable_bits() {
    if !x86::available() {
        return;
    }
    // 21 rows: one whole group and one cut to 5; 11 blocks a row; 18 activation rows, so
    // tiles of 16 run at two offsets.
    let (n, cols, m) = (21, 352, 18);
    let mut x = QuantizedRows::default();
    x.quantize(&values(m * cols, 34), m, cols);
    check_tiles_bit_for_bit(&matrix::<Q4_1>(GgmlDType::Q4_1, n, cols, 31).0, &x, "Q4_1");
    check_tiles_bit_for_bit(&matrix::<Q5>(GgmlDType::Q5_1, n, cols, 32).0, &x, "Q5_1");
    let q5_0 = read_as::<Q5>(GgmlDType::Q5_0, Q5_0_BYTES, q5_0_as_q5, n, cols, 35).0;
    check_tiles_bit_for_bit(&q5_0, &x, "Q5_0");
    // Q8_0 with its extreme weight, -128, whose magnitude is the largest the products see.
    let w = Tensor::from_vec(values(n * cols, 33), (n, cols), &Device::Cpu).unwrap();
    let mut bytes = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap().data().unwrap().into_owned();
    bytes[2] = 0x80;
    let w8 = QMatrix::<Q8_0>::from_gguf_bytes(&bytes, n, cols).unwrap();
    assert_eq!(w8.block(0, 0).2[0], -128);
    check_tiles_bit_for_bit(&w8, &x, "Q8_0");
}

/// The K-quant tiles give the portable product's bits, as the 32-value ones.
#[cfg(target_arch = "x86_64")]
fn check_super_tiles_bit_for_bit<F: SuperFormat>(dtype: GgmlDType) {
    if !x86::available() {
        return;
    }
    let (n, cols, m) = (21, 2 * QK_K, 10);
    let (w, _) = super_matrix::<F>(dtype, n, cols, 71);
    let mut x = SuperRows::default();
    x.quantize(&values(m * cols, 72), m, cols);
    let portable: Vec<f32> = (0..m).flat_map(|i| (0..n).map(move |j| (i, j))).map(|(i, j)| w.dot(j, &x, i)).collect();
    let same = |got: &[f32], want: &[f32]| got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits());
    for i0 in [0, 2] {
        // SAFETY: checked features; shapes match; tiles start at group 0.
        let avx2 = run_tile::<8>(n, |out| unsafe { x86_super::tile_avx2(&w, 0..n, &x, i0, out) });
        assert!(same(&avx2, &portable[i0 * n..(i0 + 8) * n]), "{dtype:?} avx2 i0={i0}");
        if x86::avx512() {
            let wide = run_tile::<8>(n, |out| unsafe { x86_super::tile_avx512(&w, 0..n, &x, i0, out) });
            assert!(same(&wide, &portable[i0 * n..(i0 + 8) * n]), "{dtype:?} avx512 i0={i0}");
        }
    }
    assert!(same(&product(&w, &x), &portable), "{dtype:?} matmul");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn k_quant_simd_tiles_give_the_portable_bits() {
    check_super_tiles_bit_for_bit::<Q4K>(GgmlDType::Q4K);
    check_super_tiles_bit_for_bit::<Q5K>(GgmlDType::Q5K);
    check_super_tiles_bit_for_bit::<Q6K>(GgmlDType::Q6K);
}

/// A K-quant block packed into its group reads back as parsed, in every lane.
#[test]
fn packed_k_quant_blocks_read_back_as_parsed() {
    fn check<F: SuperFormat>(dtype: GgmlDType) {
        let (n, cols) = (19, 2 * QK_K);
        let w = Tensor::from_vec(values(n * cols, 80), (n, cols), &Device::Cpu).unwrap();
        let data = QTensor::quantize(&w, dtype).unwrap().data().unwrap().into_owned();
        let m = SuperMatrix::<F>::from_gguf_bytes(&data, n, cols).unwrap();
        for (i, bytes) in data.chunks_exact(F::BYTES).enumerate() {
            assert_eq!(m.block(i / 2, i % 2), F::parse(bytes), "{dtype:?} block {i}");
        }
    }
    check::<Q4K>(GgmlDType::Q4K);
    check::<Q5K>(GgmlDType::Q5K);
    check::<Q6K>(GgmlDType::Q6K);
}

/// Packing a block into its group and reading it back gives the GGUF block's
/// numbers, in every lane.
#[test]
fn packed_blocks_read_back_as_stored() {
    let (n, cols) = (19, 64);
    let w = Tensor::from_vec(values(n * cols, 40), (n, cols), &Device::Cpu).unwrap();
    for (dtype, bytes) in [(GgmlDType::Q4_1, Q4_1::BYTES), (GgmlDType::Q5_1, Q5::BYTES), (GgmlDType::Q8_0, Q8_0::BYTES)]
    {
        let data = QTensor::quantize(&w, dtype).unwrap().data().unwrap().into_owned();
        let blocks = data.chunks_exact(bytes).enumerate();
        match dtype {
            GgmlDType::Q4_1 => {
                let m = QMatrix::<Q4_1>::from_gguf_bytes(&data, n, cols).unwrap();
                for (i, b) in blocks {
                    assert_eq!(m.block(i / 2, i % 2), Q4_1::parse(b), "Q4_1 block {i}");
                }
            }
            GgmlDType::Q5_1 => {
                let m = QMatrix::<Q5>::from_gguf_bytes(&data, n, cols).unwrap();
                for (i, b) in blocks {
                    let ((d, mm, q), (d2, m2, q2)) = (m.block(i / 2, i % 2), Q5::parse(b));
                    assert_eq!((d, mm, q.qh, q.qs), (d2, m2, q2.qh, q2.qs), "Q5 block {i}");
                }
            }
            _ => {
                let m = QMatrix::<Q8_0>::from_gguf_bytes(&data, n, cols).unwrap();
                for (i, b) in blocks {
                    assert_eq!(m.block(i / 2, i % 2), Q8_0::parse(b), "Q8_0 block {i}");
                }
            }
        }
    }
}

/// CPU seconds this process has used (utime + stime, in 10 ms ticks):
/// unlike wall time, unaffected by other processes on a busy machine.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

/// Kernel throughput per core, in CPU time, for every format at one shape:
/// `RAYON_NUM_THREADS=1 cargo test --release -p engine --lib kernel_speed -- --ignored --nocapture`;
/// `KERNEL_SHAPE=2048x768` picks another weight shape (rows x columns), `KERNEL_M=16` one
/// activation row count.
#[test]
#[ignore = "timing, not a check"]
fn kernel_speed() {
    let (n, cols) = std::env::var("KERNEL_SHAPE")
        .ok()
        .and_then(|s| s.split_once('x').and_then(|(n, c)| Some((n.parse().ok()?, c.parse().ok()?))))
        .unwrap_or((3072, 1536));
    let (q4_1, _) = matrix::<Q4_1>(GgmlDType::Q4_1, n, cols, 1);
    let (q5, _) = matrix::<Q5>(GgmlDType::Q5_1, n, cols, 1);
    let (q8_0, _) = matrix::<Q8_0>(GgmlDType::Q8_0, n, cols, 1);
    // The K-quants need whole super-blocks; at other widths only the 32-value formats run.
    let super_blocks = cols % QK_K == 0;
    let super_cols = if super_blocks { cols } else { QK_K };
    let (q4k, _) = super_matrix::<Q4K>(GgmlDType::Q4K, n, super_cols, 1);
    let (q5k, _) = super_matrix::<Q5K>(GgmlDType::Q5K, n, super_cols, 1);
    let (q6k, _) = super_matrix::<Q6K>(GgmlDType::Q6K, n, super_cols, 1);
    let ms: Vec<usize> = match std::env::var("KERNEL_M") {
        Ok(m) => vec![m.parse().unwrap()],
        Err(_) => vec![1, 4, 16, 128],
    };
    for m in ms {
        let x = values(m * cols, 2);
        let mut xq = QuantizedRows::default();
        xq.quantize(&x, m, cols);
        let mut xs = SuperRows::default();
        xs.quantize(&values(m * super_cols, 2), m, super_cols);
        let mut out = vec![0.0; m * n];
        let reps = (4000 / m).max(10);
        type Product<'a> = (&'a str, &'a dyn Fn(&mut [f32]));
        let products: [Product; 6] = [
            ("q4_1/q4_0", &|o| q4_1.matmul(&xq, o)),
            ("q5_1/q5_0", &|o| q5.matmul(&xq, o)),
            ("q8_0", &|o| q8_0.matmul(&xq, o)),
            ("q4_k", &|o| q4k.matmul(&xs, o)),
            ("q5_k", &|o| q5k.matmul(&xs, o)),
            ("q6_k", &|o| q6k.matmul(&xs, o)),
        ];
        for (name, f) in products.into_iter().take(if super_blocks { 6 } else { 3 }) {
            f(&mut out);
            let (cpu, wall) = (cpu_seconds(), std::time::Instant::now());
            for _ in 0..reps {
                f(&mut out);
            }
            let (cpu, wall) = ((cpu_seconds() - cpu) / reps as f64, wall.elapsed().as_secs_f64() / reps as f64);
            let macs = (m * n * cols) as f64;
            println!("{name} m={m}: {:.1} GMAC per CPU second, {:.1} GMAC/s wall", macs / cpu / 1e9, macs / wall / 1e9);
        }
    }
}

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
fn matrix<F: Format>(dtype: GgmlDType, rows: usize, cols: usize, seed: u64) -> (QMatrix<F>, Vec<f32>) {
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
    assert_eq!(w.qs.len(), n * cols / QK);
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
fn a_row_gives_the_same_bits_alone_or_in_any_batch() {
    let (n, cols) = (100, 64);
    let (w, _) = matrix::<Q4_1>(GgmlDType::Q4_1, n, cols, 3);
    let x = values(11 * cols, 5);
    let mut all = QuantizedRows::default();
    all.quantize(&x, 11, cols);
    let mut batched = vec![0.0; 11 * n];
    w.matmul(&all, &mut batched);
    for i in 0..11 {
        let mut one = QuantizedRows::default();
        one.quantize(&x[i * cols..(i + 1) * cols], 1, cols);
        let mut alone = vec![0.0; n];
        w.matmul(&one, &mut alone);
        assert_eq!(alone, batched[i * n..(i + 1) * n], "row {i}");
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
        assert_eq!(q.s[b], q.d[b] * sum as f32, "block {b}");
        for (j, v) in chunk.iter().enumerate() {
            assert!((v - back[b * QK + j]).abs() <= q.d[b] * 0.5 + 1e-6, "block {b} value {j}");
        }
    }
    // The SIMD quantizer agrees with the portable one.
    let n = q.d.len();
    let (mut d, mut s, mut qs) = (vec![0.0; n], vec![0.0; n], vec![[0i8; QK]; n]);
    quantize_row_q8(&x, &mut d, &mut s, &mut qs);
    assert_eq!((d, s, qs), (q.d.clone(), q.s.clone(), q.qs.clone()));
}

#[cfg(target_arch = "x86_64")]
#[test]
fn simd_and_portable_products_agree() {
    if !x86::available() {
        return;
    }
    let (n, cols) = (8, 352);
    let (w4, _) = matrix::<Q4_1>(GgmlDType::Q4_1, n, cols, 11);
    let (w8, _) = matrix::<Q8_0>(GgmlDType::Q8_0, n, cols, 12);
    let mut x = QuantizedRows::default();
    x.quantize(&values(cols, 13), 1, cols);
    let (mut simd4, mut simd8) = ([0.0f32; 8], [0.0f32; 8]);
    let mut scales = vec![0.0; cols / QK];
    // SAFETY: checked features; shapes match.
    unsafe {
        x86::tile_q4_1::<1>(&w4, 0..n, &x, 0, [simd4.as_mut_ptr()], &mut scales);
        x86::tile_q8_0::<1>(&w8, 0..n, &x, 0, [simd8.as_mut_ptr()], &mut scales);
    }
    for j in 0..n {
        let (a, b) = (scalar::dot_q4_1(&w4, j, &x, 0), scalar::dot_q8_0(&w8, j, &x, 0));
        assert!((simd4[j] - a).abs() <= 1e-4 * (1.0 + a.abs()), "q4_1 row {j}: {} vs {a}", simd4[j]);
        assert!((simd8[j] - b).abs() <= 1e-4 * (1.0 + b.abs()), "q8_0 row {j}: {} vs {b}", simd8[j]);
    }
}

/// CPU seconds this process has used (utime + stime, in 10 ms ticks):
/// unlike wall time, unaffected by other processes on a busy machine.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

/// Kernel throughput per core, in CPU time:
/// `RAYON_NUM_THREADS=1 cargo test --release -p engine --lib kernel_speed -- --ignored --nocapture`.
#[test]
#[ignore = "timing, not a check"]
fn kernel_speed() {
    let (n, cols) = (3072, 576);
    let (w4, _) = matrix::<Q4_1>(GgmlDType::Q4_1, n, cols, 1);
    let (w8, _) = matrix::<Q8_0>(GgmlDType::Q8_0, n, cols, 1);
    for m in [1usize, 4, 16, 128, 512] {
        let x = values(m * cols, 2);
        let mut xq = QuantizedRows::default();
        xq.quantize(&x, m, cols);
        let mut out = vec![0.0; m * n];
        let reps = (20000 / m).max(40);
        for name in ["q4_1", "q8_0"] {
            let f = |o: &mut [f32]| if name == "q4_1" { w4.matmul(&xq, o) } else { w8.matmul(&xq, o) };
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

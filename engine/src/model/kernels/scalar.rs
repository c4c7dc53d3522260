//! Portable products: the fallback without AVX2, and the reference the SIMD
//! kernels are tested against. The SIMD kernels take the same steps in the
//! same order per output (exact integer block sums, then one fused
//! multiply-add per block for the scale and one for the minimum), so all
//! three give the same bits.

use half::f16;

use super::blocks::{Packing, QMatrix, QuantizedRows};

/// `w[j] · x[i]`.
pub fn dot<F: Packing>(w: &QMatrix<F>, j: usize, x: &QuantizedRows, i: usize) -> f32 {
    let mut acc = 0.0f32;
    for b in 0..w.k {
        let (d, m, q) = w.block(j, b);
        let xb = i * w.k + b;
        let scale = f16::from_bits(d).to_f32() * x.d[xb];
        acc = (F::isum(&q, &x.qs[xb]) as f32).mul_add(scale, acc);
        if F::HAS_MIN {
            acc = f16::from_bits(m).to_f32().mul_add(x.s[xb], acc);
        }
    }
    acc
}

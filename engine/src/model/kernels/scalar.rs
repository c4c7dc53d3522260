//! Portable products: the fallback without AVX2, and the reference the SIMD
//! kernels are tested against.

use half::f16;

use super::blocks::{QMatrix, QuantizedRows, Q4_1, Q5, Q8_0};

/// `w[j] · x[i]` for a `Q4_1` matrix.
pub fn dot_q4_1(w: &QMatrix<Q4_1>, j: usize, x: &QuantizedRows, i: usize) -> f32 {
    let k = w.k;
    let mut acc = 0.0f32;
    for b in 0..k {
        let (wb, xb) = (j * k + b, i * k + b);
        let (q, xq) = (&w.qs[wb], &x.qs[xb]);
        let mut isum = 0i32;
        for (t, &byte) in q.iter().enumerate() {
            isum += i32::from(byte & 0x0F) * i32::from(xq[t]) + i32::from(byte >> 4) * i32::from(xq[t + 16]);
        }
        let (d, m) = (f16::from_bits(w.d[wb]).to_f32(), f16::from_bits(w.m[wb]).to_f32());
        acc += d * x.d[xb] * isum as f32 + m * x.s[xb];
    }
    acc
}

/// `w[j] · x[i]` for a `Q8_0` matrix.
pub fn dot_q8_0(w: &QMatrix<Q8_0>, j: usize, x: &QuantizedRows, i: usize) -> f32 {
    let k = w.k;
    let mut acc = 0.0f32;
    for b in 0..k {
        let (wb, xb) = (j * k + b, i * k + b);
        let isum: i32 = w.qs[wb].iter().zip(&x.qs[xb]).map(|(&a, &c)| i32::from(a) * i32::from(c)).sum();
        acc += f16::from_bits(w.d[wb]).to_f32() * x.d[xb] * isum as f32;
    }
    acc
}

/// `w[j] · x[i]` for a [`Q5`] matrix (`Q5_0` or `Q5_1`).
pub fn dot_q5(w: &QMatrix<Q5>, j: usize, x: &QuantizedRows, i: usize) -> f32 {
    let k = w.k;
    let mut acc = 0.0f32;
    for b in 0..k {
        let (wb, xb) = (j * k + b, i * k + b);
        let (q, xq) = (&w.qs[wb], &x.qs[xb]);
        let hi = |v: usize| ((q.qh >> v) & 1) as i32 * 16;
        let mut isum = 0i32;
        for (t, &byte) in q.qs.iter().enumerate() {
            isum += (i32::from(byte & 0x0F) + hi(t)) * i32::from(xq[t])
                + (i32::from(byte >> 4) + hi(t + 16)) * i32::from(xq[t + 16]);
        }
        let (d, m) = (f16::from_bits(w.d[wb]).to_f32(), f16::from_bits(w.m[wb]).to_f32());
        acc += d * x.d[xb] * isum as f32 + m * x.s[xb];
    }
    acc
}

//! Element-wise math of the forward pass: the exponential of softmax and
//! SiLU, eight lanes at a time on AVX2.
//!
//! A 16-sequence decode step of the default model takes about 1.6 million
//! exponentials (half in attention, half in the MLP); a libm call each was a
//! few percent of the step.

/// `gate[i] = silu(gate[i]) * up[i]`, SwiGLU's activation.
pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up halves differ in length");
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU has the features; lengths checked above.
        return unsafe { x86::silu_mul(gate, up) };
    }
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `gate[i] = gelu(gate[i]) * up[i]`, GeGLU's activation, with GELU's tanh
/// approximation (as Gemma and llama.cpp compute it):
/// `0.5 x (1 + tanh(u))` with `u = sqrt(2/π) (x + 0.044715 x³)`, which is
/// `x / (1 + e^(-2u))`, so one exponential as in SiLU.
pub(crate) fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up halves differ in length");
    #[cfg(target_arch = "x86_64")]
    if x86::available() {
        // SAFETY: the CPU has the features; lengths checked above.
        return unsafe { x86::gelu_tanh_mul(gate, up) };
    }
    for (g, u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh(*g) * u;
    }
}

/// `2 sqrt(2/π)` and `2 sqrt(2/π) 0.044715`: the exponent's factors.
const GELU_A: f32 = 1.595_769_2;
const GELU_B: f32 = 0.071_354_82;

fn gelu_tanh(x: f32) -> f32 {
    x / (1.0 + (-x * (GELU_A + GELU_B * x * x)).exp())
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// Whether this CPU can run the functions here.
    pub fn available() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }

    /// `e^x` in each lane, within about 2 ulp over the range of f32 results
    /// (Cephes' `expf`: a degree-6 polynomial after reducing by `ln 2`).
    /// Below about -87.3 (where results turn subnormal) it gives 0; above
    /// 88.3 it gives infinity.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub fn exp256(x: __m256) -> __m256 {
        let lowest = _mm256_set1_ps(-87.336_55);
        let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lowest);
        let x = _mm256_min_ps(_mm256_max_ps(x, lowest), _mm256_set1_ps(88.376_26));
        // n = round(x / ln 2); r = x - n ln 2, with ln 2 split in two so that
        // n * LN2_HI is exact.
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        // 2^n built in the exponent field; n is within [-126, 128) here, and
        // 2^128 (n = 128 only at the clamp) overflows to inf as expf does.
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(pow2)))
    }

    /// [`super::silu_mul`] on AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `up` at least as long as `gate`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let one = _mm256_set1_ps(1.0);
        let sign = _mm256_set1_ps(-0.0);
        let mut g = gate.chunks_exact_mut(8);
        let mut u = up.chunks_exact(8);
        for (g, u) in (&mut g).zip(&mut u) {
            // SAFETY: 8 values each.
            unsafe {
                let x = _mm256_loadu_ps(g.as_ptr());
                let e = exp256(_mm256_xor_ps(x, sign));
                let y = _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u.as_ptr()));
                _mm256_storeu_ps(g.as_mut_ptr(), y);
            }
        }
        for (g, u) in g.into_remainder().iter_mut().zip(u.remainder()) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
    }

    /// [`super::gelu_tanh_mul`], eight lanes at a time.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `up` at least as long as `gate`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
        let one = _mm256_set1_ps(1.0);
        let (a, b) = (_mm256_set1_ps(-crate::model::vmath::GELU_A), _mm256_set1_ps(-crate::model::vmath::GELU_B));
        let mut g = gate.chunks_exact_mut(8);
        let mut u = up.chunks_exact(8);
        for (g, u) in (&mut g).zip(&mut u) {
            // SAFETY: 8 values each.
            unsafe {
                let x = _mm256_loadu_ps(g.as_ptr());
                // -2u = x * (-A - B x²)
                let e = exp256(_mm256_mul_ps(x, _mm256_fmadd_ps(b, _mm256_mul_ps(x, x), a)));
                let y = _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u.as_ptr()));
                _mm256_storeu_ps(g.as_mut_ptr(), y);
            }
        }
        for (g, u) in g.into_remainder().iter_mut().zip(u.remainder()) {
            *g = crate::model::vmath::gelu_tanh(*g) * u;
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn gelu_matches_its_tanh_form() {
            let xs: Vec<f32> = (-800..800).map(|i| i as f32 / 50.0).collect();
            let mut got = xs.clone();
            super::super::gelu_tanh_mul(&mut got, &vec![1.0; xs.len()]);
            for (x, g) in xs.iter().zip(&got) {
                let want = 0.5
                    * f64::from(*x)
                    * (1.0 + (0.797_884_560_8 * f64::from(*x) * (1.0 + 0.044_715 * f64::from(*x).powi(2))).tanh());
                assert!((f64::from(*g) - want).abs() <= 1e-6 * (1.0 + want.abs()), "gelu({x}) = {g}, expected {want}");
            }
        }

        #[test]
        fn exp256_is_within_a_few_ulp_of_libm() {
            if !available() {
                return;
            }
            let mut worst = 0.0f64;
            let mut x = -87.0f32;
            while x < 88.0 {
                let xs: [f32; 8] = std::array::from_fn(|i| x + i as f32 * 0.0013);
                let mut out = [0.0f32; 8];
                // SAFETY: checked `available` above.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp256(_mm256_loadu_ps(xs.as_ptr()))) };
                for (&x, &y) in xs.iter().zip(&out) {
                    let want = (x as f64).exp();
                    worst = worst.max(((y as f64 - want) / want).abs());
                }
                x += 0.0107;
            }
            // 2 ulp of f32 is 2.4e-7 relative.
            assert!(worst < 2.5e-7, "largest relative error {worst:e}");
            let mut out = [0.0f32; 8];
            let xs = [-1000.0, -88.0, 0.0, 1.0, -0.0, 1e-30, 89.0, f32::NEG_INFINITY];
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp256(_mm256_loadu_ps(xs.as_ptr()))) };
            assert_eq!(out[0], 0.0);
            assert!(out[1] < 1e-37 && out[1] >= 0.0, "{}", out[1]);
            assert_eq!(out[2], 1.0);
            assert!((out[3] - std::f32::consts::E).abs() < 1e-6);
            assert_eq!(out[4], 1.0);
            assert_eq!(out[5], 1.0);
            assert!(out[6] > 1e38, "{}", out[6]);
            assert_eq!(out[7], 0.0);
        }

        #[test]
        fn silu_mul_matches_the_scalar_formula() {
            let gate: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.7).collect();
            let up: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 * 0.1).collect();
            let mut got = gate.clone();
            super::super::silu_mul(&mut got, &up);
            for ((g, u), y) in gate.iter().zip(&up).zip(&got) {
                let want = g / (1.0 + (-g).exp()) * u;
                assert!((y - want).abs() <= 1e-6 * want.abs().max(1.0), "silu({g}) * {u}: {y} vs {want}");
            }
        }
    }
}

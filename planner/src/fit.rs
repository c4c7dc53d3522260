//! Least-squares fits of the cost model to timed steps.
//!
//! Each fit minimises the squared *relative* error (rows weighted by
//! `1 / measured`): a profile must predict a 20 ms step as well as a 2 s one,
//! since SLOs are checked on both. Coefficients are kept non-negative (a
//! negative per-token cost would make big steps cheaper than small ones, and
//! the simulator would reward absurd batches): with three features, exact
//! non-negative least squares is cheap by trying every subset of them and
//! keeping the best fit whose coefficients are all >= 0.

use crate::cost::{attention_pairs, DecodeCost, DecodeSample, PrefillCost, PrefillSample};
use crate::error::PlanError;

/// Fits [`PrefillCost`] to timed prefill steps (at least 3 distinct lengths).
pub fn fit_prefill(samples: &[PrefillSample]) -> Result<PrefillCost, PlanError> {
    let rows: Vec<([f64; 3], f64)> =
        samples.iter().map(|s| ([1.0, s.tokens as f64, attention_pairs(s.tokens, s.context)], s.secs)).collect();
    let [base_s, per_token_s, per_attention_pair_s] = nnls3("prefill", &rows)?;
    Ok(PrefillCost { base_s, per_token_s, per_attention_pair_s })
}

/// Fits [`DecodeCost`] to timed decode steps (at least 3 distinct shapes).
pub fn fit_decode(samples: &[DecodeSample]) -> Result<DecodeCost, PlanError> {
    let rows: Vec<([f64; 3], f64)> =
        samples.iter().map(|s| ([1.0, s.batch as f64, s.context as f64], s.secs)).collect();
    let [base_s, per_seq_s, per_context_token_s] = nnls3("decode", &rows)?;
    Ok(DecodeCost { base_s, per_seq_s, per_context_token_s })
}

/// Non-negative, relative least squares over three features.
fn nnls3(what: &'static str, rows: &[([f64; 3], f64)]) -> Result<[f64; 3], PlanError> {
    if rows.len() < 3 {
        return Err(PlanError::Fit { what, reason: format!("{} samples, need at least 3", rows.len()) });
    }
    if let Some((_, y)) = rows.iter().find(|(_, y)| !(y.is_finite() && *y > 0.0)) {
        return Err(PlanError::Fit { what, reason: format!("a sample took {y} s") });
    }
    // Relative error: divide each row by its target. Columns are then scaled
    // to a max of 1 so the normal equations stay well conditioned (attention
    // pairs reach millions while the constant column is 1).
    let weighted: Vec<([f64; 3], f64)> = rows.iter().map(|(x, y)| (x.map(|v| v / y), 1.0)).collect();
    let mut scale = [0.0f64; 3];
    for (x, _) in &weighted {
        for j in 0..3 {
            scale[j] = scale[j].max(x[j].abs());
        }
    }
    let mut best: Option<([f64; 3], f64)> = None;
    for mask in 1u8..8 {
        let cols: Vec<usize> = (0..3).filter(|j| mask & (1 << j) != 0 && scale[*j] > 0.0).collect();
        if cols.len() != (mask.count_ones() as usize) {
            continue;
        }
        let Some(sub) = solve_normal(&weighted, &cols, &scale) else { continue };
        if sub.iter().any(|&c| c < 0.0) {
            continue;
        }
        let mut coef = [0.0; 3];
        for (&j, &c) in cols.iter().zip(&sub) {
            coef[j] = c / scale[j];
        }
        let sse: f64 = weighted
            .iter()
            .map(|(x, y)| {
                let pred: f64 = (0..3).map(|j| x[j] * coef[j]).sum();
                (pred - y).powi(2)
            })
            .sum();
        if best.is_none_or(|(_, b)| sse < b) {
            best = Some((coef, sse));
        }
    }
    best.map(|(coef, _)| coef).ok_or(PlanError::Fit { what, reason: "the samples are degenerate".into() })
}

/// Least squares on the chosen (scaled) columns via the normal equations;
/// `None` when they are singular.
fn solve_normal(rows: &[([f64; 3], f64)], cols: &[usize], scale: &[f64; 3]) -> Option<Vec<f64>> {
    let k = cols.len();
    let mut m = vec![vec![0.0f64; k + 1]; k];
    for (x, y) in rows {
        let xs: Vec<f64> = cols.iter().map(|&j| x[j] / scale[j]).collect();
        for a in 0..k {
            for b in 0..k {
                m[a][b] += xs[a] * xs[b];
            }
            m[a][k] += xs[a] * y;
        }
    }
    // Gaussian elimination with partial pivoting.
    for c in 0..k {
        let pivot = (c..k).max_by(|&a, &b| m[a][c].abs().total_cmp(&m[b][c].abs()))?;
        if m[pivot][c].abs() < 1e-12 {
            return None;
        }
        m.swap(c, pivot);
        let pivot_row = m[c].clone();
        for (r, row) in m.iter_mut().enumerate() {
            if r != c {
                let f = row[c] / pivot_row[c];
                for (x, p) in row.iter_mut().zip(&pivot_row).skip(c) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..k).map(|r| m[r][k] / m[r][r]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 + 1e-6 * b.abs()
    }

    #[test]
    fn recovers_exact_prefill_coefficients() {
        let truth = PrefillCost { base_s: 0.004, per_token_s: 2e-4, per_attention_pair_s: 3e-8 };
        let samples: Vec<PrefillSample> = [16u64, 64, 256, 512, 1024, 2048]
            .iter()
            .map(|&t| PrefillSample { tokens: t, context: 0, secs: truth.step_secs(t, attention_pairs(t, 0)) })
            .collect();
        let fit = fit_prefill(&samples).unwrap();
        assert!(close(fit.base_s, truth.base_s), "{fit:?}");
        assert!(close(fit.per_token_s, truth.per_token_s), "{fit:?}");
        assert!(close(fit.per_attention_pair_s, truth.per_attention_pair_s), "{fit:?}");
    }

    #[test]
    fn recovers_exact_decode_coefficients() {
        let truth = DecodeCost { base_s: 0.015, per_seq_s: 5e-4, per_context_token_s: 2e-7 };
        let mut samples = Vec::new();
        for batch in [1u64, 4, 16, 64] {
            for ctx in [128u64, 1024] {
                let context = batch * ctx;
                samples.push(DecodeSample { batch, context, secs: truth.step_secs(batch, context) });
            }
        }
        let fit = fit_decode(&samples).unwrap();
        assert!(close(fit.base_s, truth.base_s), "{fit:?}");
        assert!(close(fit.per_seq_s, truth.per_seq_s), "{fit:?}");
        assert!(close(fit.per_context_token_s, truth.per_context_token_s), "{fit:?}");
    }

    #[test]
    fn never_fits_a_negative_cost() {
        // Time falls with batch size: unconstrained least squares would give
        // a negative per-sequence cost; the fit must clamp it to zero instead.
        let samples = [
            DecodeSample { batch: 1, context: 100, secs: 0.030 },
            DecodeSample { batch: 2, context: 100, secs: 0.029 },
            DecodeSample { batch: 4, context: 100, secs: 0.028 },
            DecodeSample { batch: 8, context: 100, secs: 0.027 },
        ];
        let fit = fit_decode(&samples).unwrap();
        assert!(fit.base_s >= 0.0 && fit.per_context_token_s >= 0.0, "{fit:?}");
        assert_eq!(fit.per_seq_s, 0.0, "{fit:?}");
        let predicted = fit.step_secs(1, 100);
        assert!((0.027..=0.030).contains(&predicted), "{predicted}");
    }

    #[test]
    fn too_few_samples_is_an_error() {
        let samples = [PrefillSample { tokens: 16, context: 0, secs: 0.01 }];
        assert!(matches!(fit_prefill(&samples), Err(PlanError::Fit { what: "prefill", .. })));
        let bad = [PrefillSample { tokens: 16, context: 0, secs: 0.0 }; 3];
        assert!(fit_prefill(&bad).is_err());
    }
}

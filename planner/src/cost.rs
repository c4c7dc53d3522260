//! The cost model: how long one engine step and one KV hand-off take.
//!
//! # Why these forms
//!
//! The engine runs one forward pass per step over every token the step feeds:
//! decodes (one token per running sequence) and prefill chunks (up to
//! `max_num_batched_tokens` in all). A step's time has three parts:
//!
//! - a fixed part: the weights are read once per step whatever the batch
//!   (on a CPU that is most of a decode step: it is memory-bound), plus
//!   thread fork/join and sampling;
//! - a part linear in the tokens fed: the matrix products;
//! - attention, linear in the KV each fed token looks at.
//!
//! Prefill: `t = base + per_token·T + per_attention_pair·A`, with `T` the
//! prompt tokens in the step and `A = Σ n·(k + (n+1)/2)` over its chunks (a
//! chunk of `n` new tokens after `k` already computed ones: causal attention
//! scores that many query-key pairs). The `A` term makes a long prompt
//! quadratic, and it is why a later chunk of a chunked prompt costs more
//! than the first: it attends over the earlier chunks too, which a
//! `c·tokens²` term of the step alone would miss.
//!
//! Decode: `t = base + per_seq·B + per_context_token·C`, with `B` sequences
//! and `C` tokens of KV they attend over in all. Fitted apart from prefill
//! because a batch of single rows uses the hardware differently from one
//! long prompt (matrix-vector rather than matrix-matrix products).
//!
//! A step that mixes both (colocated serving with chunked prefill) pays the
//! larger fixed part once plus both variable parts.
//!
//! Hand-off: `latency + bytes_per_token·tokens / bandwidth`.

use crate::error::{parse_json, read, PlanError};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Prefill step cost (seconds): `base + per_token·T + per_attention_pair·A`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrefillCost {
    pub base_s: f64,
    pub per_token_s: f64,
    pub per_attention_pair_s: f64,
}

/// Decode step cost (seconds): `base + per_seq·B + per_context_token·C`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DecodeCost {
    pub base_s: f64,
    pub per_seq_s: f64,
    pub per_context_token_s: f64,
}

/// KV hand-off from a prefill worker to a decode worker.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HandoffCost {
    /// Fixed cost per hand-off: the decode RPC, pin and release, admission.
    pub latency_s: f64,
    /// KV bytes of one prompt token (all layers, K and V).
    pub bytes_per_token: f64,
    /// Copy or wire throughput, bytes per second.
    pub bandwidth_bytes_per_s: f64,
}

/// One timed prefill step: `tokens` new prompt tokens after `context` computed ones.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrefillSample {
    pub tokens: u64,
    #[serde(default)]
    pub context: u64,
    pub secs: f64,
}

/// One timed decode step: `batch` sequences over `context` KV tokens in all.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DecodeSample {
    pub batch: u64,
    pub context: u64,
    pub secs: f64,
}

/// A measured profile: what `pdserve-plan-measure` writes and the simulator reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostProfile {
    /// What was measured (model file, machine); informational.
    #[serde(default)]
    pub description: String,
    pub prefill: PrefillCost,
    pub decode: DecodeCost,
    pub handoff: HandoffCost,
    /// The timings the fit came from, kept so a profile can be refitted or checked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefill_samples: Vec<PrefillSample>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decode_samples: Vec<DecodeSample>,
}

/// What one step feeds the model, summed over its sequences.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepLoad {
    /// Prompt tokens fed as prefill chunks.
    pub prefill_tokens: u64,
    /// Query-key pairs of those chunks ([`attention_pairs`], summed).
    pub attention_pairs: f64,
    /// Sequences fed one decode token each.
    pub decode_seqs: u64,
    /// KV tokens those decodes attend over, summed.
    pub decode_context: u64,
}

impl StepLoad {
    /// Nothing to run.
    pub fn is_empty(&self) -> bool {
        self.prefill_tokens == 0 && self.decode_seqs == 0
    }
}

/// Query-key pairs that causal attention computes for a chunk of `new` tokens
/// after `context` tokens already in the cache.
pub fn attention_pairs(new: u64, context: u64) -> f64 {
    let n = new as f64;
    n * context as f64 + n * (n + 1.0) / 2.0
}

impl PrefillCost {
    /// Seconds for a step of `tokens` prompt tokens and `pairs` attention pairs.
    pub fn step_secs(&self, tokens: u64, pairs: f64) -> f64 {
        self.base_s + self.per_token_s * tokens as f64 + self.per_attention_pair_s * pairs
    }
}

impl DecodeCost {
    /// Seconds for a step of `batch` decodes over `context` KV tokens.
    pub fn step_secs(&self, batch: u64, context: u64) -> f64 {
        self.base_s + self.per_seq_s * batch as f64 + self.per_context_token_s * context as f64
    }
}

impl HandoffCost {
    /// Seconds to hand off the KV of a `tokens`-token prompt.
    pub fn secs(&self, tokens: u64) -> f64 {
        self.latency_s + self.bytes_per_token * tokens as f64 / self.bandwidth_bytes_per_s
    }
}

impl CostProfile {
    /// Reads and checks a profile written by `pdserve-plan-measure` (or by hand).
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let profile: Self = parse_json(path, &read(path)?)?;
        profile.validate()?;
        Ok(profile)
    }

    /// Every coefficient finite and non-negative, the bandwidth positive, and
    /// a step never free (a zero-cost step would let the simulator loop forever).
    pub fn validate(&self) -> Result<(), PlanError> {
        let fields = [
            ("prefill.base_s", self.prefill.base_s),
            ("prefill.per_token_s", self.prefill.per_token_s),
            ("prefill.per_attention_pair_s", self.prefill.per_attention_pair_s),
            ("decode.base_s", self.decode.base_s),
            ("decode.per_seq_s", self.decode.per_seq_s),
            ("decode.per_context_token_s", self.decode.per_context_token_s),
            ("handoff.latency_s", self.handoff.latency_s),
            ("handoff.bytes_per_token", self.handoff.bytes_per_token),
        ];
        for (field, value) in fields {
            if !(value.is_finite() && value >= 0.0) {
                return Err(PlanError::invalid(field, "finite and >= 0", value));
            }
        }
        let bandwidth = self.handoff.bandwidth_bytes_per_s;
        if !(bandwidth.is_finite() && bandwidth > 0.0) {
            return Err(PlanError::invalid("handoff.bandwidth_bytes_per_s", "finite and > 0", bandwidth));
        }
        if self.prefill.base_s + self.prefill.per_token_s <= 0.0 {
            return Err(PlanError::invalid("prefill.base_s + prefill.per_token_s", "> 0", 0));
        }
        if self.decode.base_s + self.decode.per_seq_s <= 0.0 {
            return Err(PlanError::invalid("decode.base_s + decode.per_seq_s", "> 0", 0));
        }
        Ok(())
    }

    /// Seconds one engine step takes.
    pub fn step_secs(&self, load: &StepLoad) -> f64 {
        let (p, d) = (&self.prefill, &self.decode);
        let prefill_var = p.per_token_s * load.prefill_tokens as f64 + p.per_attention_pair_s * load.attention_pairs;
        let decode_var = d.per_seq_s * load.decode_seqs as f64 + d.per_context_token_s * load.decode_context as f64;
        match (load.prefill_tokens > 0, load.decode_seqs > 0) {
            (false, false) => 0.0,
            (true, false) => p.base_s + prefill_var,
            (false, true) => d.base_s + decode_var,
            // One forward pass: the weights are read once.
            (true, true) => p.base_s.max(d.base_s) + prefill_var + decode_var,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Round numbers, so simulator tests can compute times by hand.
    pub(crate) fn profile() -> CostProfile {
        CostProfile {
            description: "test".into(),
            prefill: PrefillCost { base_s: 0.010, per_token_s: 0.001, per_attention_pair_s: 0.0 },
            decode: DecodeCost { base_s: 0.020, per_seq_s: 0.001, per_context_token_s: 0.0 },
            handoff: HandoffCost { latency_s: 0.005, bytes_per_token: 1000.0, bandwidth_bytes_per_s: 1e6 },
            prefill_samples: Vec::new(),
            decode_samples: Vec::new(),
        }
    }

    #[test]
    fn attention_pairs_count_the_causal_triangle_and_the_context() {
        // 3 new tokens alone: 1 + 2 + 3 pairs.
        assert_eq!(attention_pairs(3, 0), 6.0);
        // After 10 cached tokens each of the 3 also sees those 10.
        assert_eq!(attention_pairs(3, 10), 36.0);
        // A prompt cut in two chunks scores the same pairs as in one.
        assert_eq!(attention_pairs(4, 0) + attention_pairs(4, 4), attention_pairs(8, 0));
    }

    #[test]
    fn step_cost_by_kind() {
        let p = profile();
        let prefill = StepLoad { prefill_tokens: 100, attention_pairs: 5050.0, ..StepLoad::default() };
        assert!((p.step_secs(&prefill) - 0.110).abs() < 1e-12);
        let decode = StepLoad { decode_seqs: 4, decode_context: 400, ..StepLoad::default() };
        assert!((p.step_secs(&decode) - 0.024).abs() < 1e-12);
        // Mixed: the larger fixed part (decode's 20 ms) once, both variable parts.
        let mixed = StepLoad { prefill_tokens: 100, attention_pairs: 0.0, decode_seqs: 4, decode_context: 400 };
        assert!((p.step_secs(&mixed) - (0.020 + 0.100 + 0.004)).abs() < 1e-12);
        assert_eq!(p.step_secs(&StepLoad::default()), 0.0);
        // 1000 tokens × 1000 bytes at 1 MB/s, plus 5 ms.
        assert!((p.handoff.secs(1000) - 1.005).abs() < 1e-12);
    }

    #[test]
    fn validation_names_the_bad_field() {
        let mut p = profile();
        p.decode.per_seq_s = -1.0;
        let err = p.validate().unwrap_err().to_string();
        assert!(err.contains("decode.per_seq_s"), "{err}");
        let mut p = profile();
        p.handoff.bandwidth_bytes_per_s = 0.0;
        assert!(p.validate().unwrap_err().to_string().contains("bandwidth"));
        assert!(profile().validate().is_ok());
    }

    #[test]
    fn profile_round_trips_through_json() {
        let mut p = profile();
        p.prefill_samples.push(PrefillSample { tokens: 64, context: 0, secs: 0.07 });
        let text = serde_json::to_string(&p).unwrap();
        let back: CostProfile = serde_json::from_str(&text).unwrap();
        assert_eq!(back, p);
    }
}

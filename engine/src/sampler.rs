//! Turning one row of logits into one token.
//!
//! Sampling is data ([`SamplingParams`]) plus a seeded RNG per sequence: the
//! same seed gives the same tokens whatever else shares the batch, and a
//! sequence preempted and recomputed keeps drawing from where it stopped.
//!
//! Order of operations, as in vLLM: temperature, then top-k, then top-p
//! (nucleus) over the remaining tokens sorted by probability, then one draw.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Ordering;

/// How a request's tokens are chosen, and when its generation ends.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0` means greedy (argmax, ties to the lowest id).
    /// Must be finite and `>= 0`.
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add
    /// up to at least `top_p`. `1` turns it off. Must be in `(0, 1]`.
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens; `0` turns it off.
    pub top_k: u32,
    /// RNG seed. `None`: the engine derives one from its `default_seed` and
    /// the request's arrival order.
    pub seed: Option<u64>,
    /// Most tokens to generate (at least 1).
    pub max_tokens: u32,
    /// Tokens that end generation (reason `Stop`); the stop token is emitted.
    pub stop_token_ids: Vec<u32>,
}

impl Default for SamplingParams {
    /// The OpenAI / vLLM defaults: temperature 1, no top-k / top-p, 16 tokens.
    fn default() -> Self {
        Self { temperature: 1.0, top_p: 1.0, top_k: 0, seed: None, max_tokens: 16, stop_token_ids: Vec::new() }
    }
}

impl SamplingParams {
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: u32) -> Self {
        Self { temperature: 0.0, max_tokens, ..Self::default() }
    }
}

/// The sampler of one sequence: its parameters and its RNG.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    rng: ChaCha8Rng,
}

/// A candidate token and its (temperature-scaled) logit.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: u32,
    logit: f32,
}

/// Most likely first; equal logits put the lower id first, so every order
/// (and with it top-k and top-p) is deterministic.
fn by_likelihood(a: &Candidate, b: &Candidate) -> Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

impl Sampler {
    /// A sampler for `params`, drawing from an RNG seeded with `seed`.
    pub fn new(params: &SamplingParams, seed: u64) -> Self {
        Self {
            temperature: params.temperature,
            top_k: params.top_k as usize,
            top_p: params.top_p,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Chooses the next token from one row of logits.
    ///
    /// NaN logits never win. A temperature draw takes exactly one value from
    /// the RNG, so a sequence's stream position is its number of draws.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let u: f64 = self.rng.random();
        let filtered = self.top_k > 0 && self.top_k < logits.len() || self.top_p < 1.0;
        if filtered {
            self.sample_filtered(logits, u)
        } else {
            sample_full(logits, self.temperature, u)
        }
    }

    /// Top-k and/or top-p: the candidates are collected, cut, then drawn from.
    fn sample_filtered(&self, logits: &[f32], u: f64) -> u32 {
        let mut cands: Vec<Candidate> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan())
            .map(|(i, &logit)| Candidate { id: i as u32, logit })
            .collect();
        if cands.is_empty() {
            return 0;
        }
        if self.top_k > 0 && self.top_k < cands.len() {
            // Partition instead of a full sort: O(vocab) for the usual small k.
            cands.select_nth_unstable_by(self.top_k - 1, by_likelihood);
            cands.truncate(self.top_k);
        }
        let max = cands.iter().map(|c| c.logit).fold(f32::NEG_INFINITY, f32::max);
        let t = f64::from(self.temperature);
        let mut weights: Vec<f64> = Vec::with_capacity(cands.len());
        if self.top_p < 1.0 {
            cands.sort_unstable_by(by_likelihood);
            weights.extend(cands.iter().map(|c| (f64::from(c.logit - max) / t).exp()));
            let total: f64 = weights.iter().sum();
            let target = f64::from(self.top_p) * total;
            // Smallest prefix reaching `top_p`; never empty.
            let mut cum = 0.0;
            let keep = weights.iter().position(|w| {
                cum += w;
                cum >= target
            });
            let keep = keep.map_or(weights.len(), |i| i + 1);
            weights.truncate(keep);
            cands.truncate(keep);
        } else {
            weights.extend(cands.iter().map(|c| (f64::from(c.logit - max) / t).exp()));
        }
        let total: f64 = weights.iter().sum();
        pick(u * total, cands.iter().map(|c| c.id).zip(weights.iter().copied())).unwrap_or(cands[0].id)
    }
}

/// Plain temperature sampling over the whole row, without allocating: one pass
/// for the normaliser, one to find where `u` lands.
fn sample_full(logits: &[f32], temperature: f32, u: f64) -> u32 {
    let max = logits.iter().copied().filter(|l| !l.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return argmax(logits);
    }
    let t = f64::from(temperature);
    let weight = |l: f32| {
        if l.is_nan() {
            0.0
        } else {
            (f64::from(l - max) / t).exp()
        }
    };
    let total: f64 = logits.iter().map(|&l| weight(l)).sum();
    let weighted = logits.iter().enumerate().map(|(i, &l)| (i as u32, weight(l)));
    pick(u * total, weighted).unwrap_or_else(|| argmax(logits))
}

/// The first token whose cumulative weight passes `target`, or the last token
/// with weight when rounding leaves `target` just past the end.
fn pick(target: f64, weighted: impl Iterator<Item = (u32, f64)>) -> Option<u32> {
    let mut cum = 0.0;
    let mut last = None;
    for (id, w) in weighted {
        if w <= 0.0 {
            continue;
        }
        cum += w;
        last = Some(id);
        if cum > target {
            return last;
        }
    }
    last
}

/// Index of the largest logit; ties go to the lowest id, NaN never wins, and
/// a row with no number at all gives 0.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_logit = f32::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        if l > best_logit {
            best = i;
            best_logit = l;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: u32, top_p: f32) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, ..SamplingParams::default() }
    }

    const ROW: [f32; 5] = [0.5, 2.0, 1.9, -1.0, 2.0];

    #[test]
    fn greedy_picks_the_argmax_and_ties_go_to_the_lowest_id() {
        let mut s = Sampler::new(&params(0.0, 0, 1.0), 1);
        assert_eq!(s.sample(&ROW), 1);
        assert_eq!(s.sample(&[0.0, 3.0, f32::NAN, 1.0]), 1);
        assert_eq!(s.sample(&[f32::NAN, -1.0]), 1);
        assert_eq!(s.sample(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    #[test]
    fn top_k_one_is_greedy() {
        for seed in 0..50 {
            let mut s = Sampler::new(&params(1.5, 1, 1.0), seed);
            assert_eq!(s.sample(&ROW), 1, "seed {seed}");
        }
    }

    #[test]
    fn a_tiny_top_p_is_greedy() {
        for seed in 0..50 {
            let mut s = Sampler::new(&params(1.5, 0, 1e-6), seed);
            assert_eq!(s.sample(&ROW), 1, "seed {seed}");
        }
    }

    #[test]
    fn top_k_two_never_picks_a_third_token() {
        let mut s = Sampler::new(&params(5.0, 2, 1.0), 3);
        for _ in 0..500 {
            let t = s.sample(&ROW);
            assert!(t == 1 || t == 4, "picked {t}");
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_it() {
        // Probabilities 0.5, 0.3, 0.2: top_p 0.7 keeps the first two.
        let row = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln()];
        let mut s = Sampler::new(&params(1.0, 0, 0.7), 9);
        let mut seen = [0usize; 3];
        for _ in 0..2000 {
            seen[s.sample(&row) as usize] += 1;
        }
        assert_eq!(seen[2], 0);
        assert!(seen[1] > 500, "{seen:?}");
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let draw = |seed| {
            let mut s = Sampler::new(&params(1.0, 0, 1.0), seed);
            (0..64).map(|_| s.sample(&ROW)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        let draw_filtered = |seed| {
            let mut s = Sampler::new(&params(0.8, 3, 0.9), seed);
            (0..64).map(|_| s.sample(&ROW)).collect::<Vec<_>>()
        };
        assert_eq!(draw_filtered(7), draw_filtered(7));
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        // Logits ln(0.7), ln(0.3): token 1 should come up about 30% of the time.
        let row = [0.7f32.ln(), 0.3f32.ln()];
        let mut s = Sampler::new(&params(1.0, 0, 1.0), 1234);
        let n = 10_000;
        let ones = (0..n).filter(|_| s.sample(&row) == 1).count();
        assert!((2700..3300).contains(&ones), "token 1 drawn {ones} times of {n}");
    }

    #[test]
    fn a_low_temperature_sharpens_and_a_high_one_flattens() {
        let row = [1.0, 0.0];
        let count = |t: f32| {
            let mut s = Sampler::new(&params(t, 0, 1.0), 5);
            (0..4000).filter(|_| s.sample(&row) == 1).count()
        };
        let (cold, warm, hot) = (count(0.1), count(1.0), count(100.0));
        assert!(cold < 10, "{cold}");
        assert!((900..1250).contains(&warm), "{warm}"); // p = 1 / (1 + e) = 0.269
        assert!((1800..2200).contains(&hot), "{hot}");
    }
}

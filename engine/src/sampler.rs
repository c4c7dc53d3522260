//! Turning one row of logits into one token.
//!
//! Sampling is data ([`SamplingParams`]) plus a seeded RNG per sequence: the
//! same seed gives the same tokens whatever else shares the batch, and a
//! sequence preempted and recomputed keeps drawing from where it stopped.
//!
//! # Order of operations
//!
//! As in vLLM, the raw logits are first processed in place:
//!
//! 0. a structured output's grammar sets every token it forbids next to
//!    `-inf` (nothing after can bring one back), and so do `allowed_token_ids`
//!    (every token not listed) and `bad_words` (a word's last token, when the
//!    output ends with the rest of it);
//! 1. `logit_bias` is added;
//! 2. while fewer than `min_tokens` tokens were generated, the stop tokens
//!    (`stop_token_ids`, plus the model's eos unless `ignore_eos`) are set to
//!    `-inf`;
//! 3. `repetition_penalty` for tokens of the prompt or the output, then
//!    `presence_penalty` and `frequency_penalty` for tokens of the output.
//!
//! Then the token is chosen: greedy (argmax of the processed logits) at
//! temperature 0, else temperature, top-k, top-p (nucleus) over the remaining
//! tokens sorted by probability, min-p, and one draw.
//!
//! With the default parameters none of that allocates: the per-sequence state
//! the penalties need (the set of tokens seen, the count of each output
//! token) is kept only when a penalty is on, and updated one token at a time.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

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
    /// Min-p: drop tokens whose probability (after temperature) is below
    /// `min_p` times the most likely token's. `0` turns it off. In `[0, 1]`.
    pub min_p: f32,
    /// Subtracted once from the logit of every token already in the output.
    /// `0` turns it off. In `[-2, 2]`.
    pub presence_penalty: f32,
    /// Subtracted from the logit of every output token, times its count so
    /// far. `0` turns it off. In `[-2, 2]`.
    pub frequency_penalty: f32,
    /// For every token of the prompt or the output: positive logits are
    /// divided by it, negative ones multiplied. `1` turns it off; above 1
    /// discourages repetition. In `(0, 2]` (vLLM takes any value above 0;
    /// we cap it where it already all but forbids repetition).
    pub repetition_penalty: f32,
    /// Added to the logits of these token ids before anything else; each id
    /// must be in the vocabulary and each bias in `[-100, 100]`.
    pub logit_bias: Vec<(u32, f32)>,
    /// Do not stop at the model's eos tokens (`stop_token_ids` still stop).
    pub ignore_eos: bool,
    /// Until this many tokens were generated (a provided first token counts),
    /// the stop tokens (eos unless `ignore_eos`, and `stop_token_ids`) cannot
    /// be sampled and do not stop. `0` turns it off.
    pub min_tokens: u32,
    /// `None`: no logprobs. `Some(k)`: each generated token carries its own
    /// logprob and the `k` most likely tokens' (`k` in `0..=`[`MAX_TOP_LOGPROBS`]),
    /// taken from the raw logits (see [`TokenLogprobs`]).
    pub logprobs: Option<u32>,
    /// `None`: none. `Some(k)`: vLLM's prompt logprobs, each prompt token's logprob given the
    /// tokens before it (the first has none) and the `k` most likely tokens' there, reported
    /// in [`EngineEvent::PromptLogprobs`](crate::EngineEvent::PromptLogprobs). The prompt is
    /// then computed whole, never taken from the prefix cache.
    pub prompt_logprobs: Option<u32>,
    /// vLLM's `allowed_token_ids`: when set, every other token is masked (its logprob, which
    /// describes the raw logits, is unchanged). Must not be empty.
    pub allowed_token_ids: Option<Vec<u32>>,
    /// vLLM's `bad_words`, as token sequences: a one-token word is never sampled; a longer one's
    /// last token is masked whenever the output ends with the rest of it.
    pub bad_words: Vec<Vec<u32>>,
}

/// Most `top` entries a request may ask for per token (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// Log-probabilities of one generated token, vLLM's "raw" logprobs: the
/// log-softmax of the model's logits row before logit bias, penalties and
/// temperature, so they describe the model, not the sampling settings.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    /// The chosen token's logprob.
    pub logprob: f32,
    /// The chosen token's rank in the row, 1 for the most likely (vLLM's `rank`: one more than
    /// the tokens with a strictly larger logit).
    pub rank: u32,
    /// The most likely tokens and their logprobs, most likely first, equal
    /// logprobs by lower id. NaN logits never appear.
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// The logprobs of `chosen` and the `k` most likely tokens of a raw
    /// logits row. NaN logits count as impossible (`-inf`).
    pub fn from_logits(raw: &[f32], chosen: u32, k: usize) -> Self {
        let lse = log_sum_exp(raw);
        let logprob = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l - lse };
        let chosen_logit = raw.get(chosen as usize).copied().unwrap_or(f32::NEG_INFINITY);
        let above = raw.iter().filter(|&&l| l > chosen_logit).count();
        Self {
            logprob: logprob(chosen_logit),
            rank: u32::try_from(above).unwrap_or(u32::MAX).saturating_add(1),
            top: top_k(raw, k).into_iter().map(|(id, l)| (id, logprob(l))).collect(),
        }
    }
}

/// `ln(sum(exp(l)))` over the row's numbers, shifted by the max so it never
/// overflows; NaN logits are left out.
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().filter(|l| !l.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    if max.is_infinite() {
        return max;
    }
    let sum: f64 = row.iter().filter(|l| !l.is_nan()).map(|&l| f64::from(l - max).exp()).sum();
    max + sum.ln() as f32
}

/// The `k` largest logits with their ids, largest first, ties by lower id,
/// NaN left out. One pass with a sorted buffer of `k`: no vocab-sized
/// allocation, and `k` is small (at most [`MAX_TOP_LOGPROBS`]).
fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return top;
    }
    for (i, &l) in row.iter().enumerate() {
        if l.is_nan() || (top.len() == k && l <= top[k - 1].1) {
            continue;
        }
        // Ids grow along the row, so an equal logit already kept wins the tie.
        let at = top.partition_point(|&(_, t)| t >= l);
        top.insert(at, (i as u32, l));
        top.truncate(k);
    }
    top
}

impl Default for SamplingParams {
    /// The OpenAI / vLLM defaults: temperature 1, no top-k / top-p / min-p,
    /// no penalties or bias, 16 tokens.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            max_tokens: 16,
            stop_token_ids: Vec::new(),
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            ignore_eos: false,
            min_tokens: 0,
            logprobs: None,
            prompt_logprobs: None,
            allowed_token_ids: None,
            bad_words: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: u32) -> Self {
        Self { temperature: 0.0, max_tokens, ..Self::default() }
    }
}

/// The sampler of one sequence: its parameters, its RNG, and what the
/// penalties and `min_tokens` need to know of the sequence so far.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    rng: ChaCha8Rng,
    logit_bias: Vec<(u32, f32)>,
    min_tokens: usize,
    /// Masked while fewer than `min_tokens` tokens were generated.
    stop_ids: Vec<u32>,
    ignore_eos: bool,
    /// Generated tokens so far, a provided first token included.
    num_generated: usize,
    penalties: Penalties,
    /// `SamplingParams::logprobs`.
    logprobs: Option<u32>,
    /// The structured output this sequence is held to, if any.
    grammar: Option<constraint::Grammar>,
    /// `SamplingParams::allowed_token_ids`, sorted and deduplicated.
    allowed: Option<Vec<u32>>,
    /// `SamplingParams::bad_words`.
    bad_words: Vec<Vec<u32>>,
    /// The output so far, kept only for multi-token bad words.
    output: Vec<u32>,
}

/// Repetition, presence and frequency penalties, and the token history they
/// read. The history is only kept for the penalties that are on.
#[derive(Debug, Clone)]
struct Penalties {
    repetition: f32,
    presence: f32,
    frequency: f32,
    /// Distinct tokens of the prompt and the output (repetition penalty).
    seen: HashSet<u32>,
    /// How often each token occurs in the output (presence and frequency).
    output_counts: HashMap<u32, u32>,
}

impl Penalties {
    fn repetition_on(&self) -> bool {
        self.repetition != 1.0
    }

    fn output_on(&self) -> bool {
        self.presence != 0.0 || self.frequency != 0.0
    }

    fn observe_prompt(&mut self, prompt: &[u32]) {
        if self.repetition_on() {
            self.seen.extend(prompt.iter().copied());
        }
    }

    fn observe_output(&mut self, token: u32) {
        if self.repetition_on() {
            self.seen.insert(token);
        }
        if self.output_on() {
            *self.output_counts.entry(token).or_insert(0) += 1;
        }
    }

    /// Applies the penalties in place, touching only the tokens seen.
    fn apply(&self, logits: &mut [f32]) {
        let r = self.repetition;
        for &t in &self.seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / r } else { *l * r };
            }
        }
        for (&t, &count) in &self.output_counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= self.presence + self.frequency * count as f32;
            }
        }
    }
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
    /// A sampler for `params`, drawing from an RNG seeded with `seed`. It
    /// knows no prompt and no eos tokens: see [`Sampler::with_eos`] and
    /// [`Sampler::with_prompt`].
    pub fn new(params: &SamplingParams, seed: u64) -> Self {
        let penalties = Penalties {
            repetition: params.repetition_penalty,
            presence: params.presence_penalty,
            frequency: params.frequency_penalty,
            seen: HashSet::new(),
            output_counts: HashMap::new(),
        };
        Self {
            temperature: params.temperature,
            top_k: params.top_k as usize,
            top_p: params.top_p,
            min_p: params.min_p,
            rng: ChaCha8Rng::seed_from_u64(seed),
            logit_bias: params.logit_bias.clone(),
            min_tokens: params.min_tokens as usize,
            stop_ids: if params.min_tokens > 0 { params.stop_token_ids.clone() } else { Vec::new() },
            ignore_eos: params.ignore_eos,
            num_generated: 0,
            penalties,
            logprobs: params.logprobs,
            grammar: None,
            allowed: params.allowed_token_ids.clone().map(|mut ids| {
                ids.sort_unstable();
                ids.dedup();
                ids
            }),
            bad_words: params.bad_words.iter().filter(|w| !w.is_empty()).cloned().collect(),
            output: Vec::new(),
        }
    }

    /// Holds the sequence to a compiled structured output: every token the
    /// grammar forbids is masked before anything else processes the logits.
    pub fn with_grammar(mut self, grammar: Option<constraint::Grammar>) -> Self {
        self.grammar = grammar;
        self
    }

    /// Draws from stream `stream` of the seeded generator instead of stream 0:
    /// the choices of one request share a seed and differ by stream.
    pub fn with_stream(mut self, stream: u64) -> Self {
        self.rng.set_stream(stream);
        self
    }

    /// The model's eos tokens, masked under `min_tokens` unless `ignore_eos`.
    pub fn with_eos(mut self, eos_token_ids: &[u32]) -> Self {
        if self.min_tokens > 0 && !self.ignore_eos {
            for &t in eos_token_ids {
                if !self.stop_ids.contains(&t) {
                    self.stop_ids.push(t);
                }
            }
        }
        self
    }

    /// The prompt, for the repetition penalty.
    pub fn with_prompt(mut self, prompt: &[u32]) -> Self {
        self.penalties.observe_prompt(prompt);
        self
    }

    /// Counts a token generated elsewhere (a prefill worker's first token) as
    /// this sequence's output. Sampling it there took one draw from the same
    /// seeded stream (unless greedy), so the RNG skips that draw: the next
    /// token is drawn where a sampler that made the first one would draw it,
    /// and a seeded request gives the same tokens disaggregated or not.
    pub fn record(&mut self, token: u32) {
        if self.temperature != 0.0 {
            let _skipped: f64 = self.rng.random();
        }
        self.observe(token);
    }

    /// Counts a generated token for the penalties and `min_tokens`, and
    /// moves the grammar past it.
    fn observe(&mut self, token: u32) {
        self.num_generated += 1;
        self.penalties.observe_output(token);
        if self.bad_words.iter().any(|w| w.len() > 1) {
            self.output.push(token);
        }
        if let Some(grammar) = &mut self.grammar {
            grammar.accept(token);
        }
    }

    /// Chooses the next token from one row of logits, which it processes in
    /// place (bias, `min_tokens` mask, penalties), and records it as output.
    ///
    /// NaN logits never win. A temperature draw takes exactly one value from
    /// the RNG, so a sequence's stream position is its number of draws.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        if let Some(grammar) = &mut self.grammar {
            grammar.mask(logits);
        }
        self.mask_disallowed(logits);
        self.process(logits);
        let token = self.choose(logits);
        self.observe(token);
        token
    }

    /// [`Sampler::sample`], plus the token's logprobs when the request asked
    /// for them. Only then is the raw row copied (sampling processes it in
    /// place, the logprobs describe it unprocessed).
    pub fn sample_with_logprobs(&mut self, logits: &mut [f32]) -> (u32, Option<TokenLogprobs>) {
        let Some(k) = self.logprobs else {
            return (self.sample(logits), None);
        };
        let raw = logits.to_vec();
        let token = self.sample(logits);
        (token, Some(TokenLogprobs::from_logits(&raw, token, k as usize)))
    }

    /// `allowed_token_ids` and `bad_words`: what the request forbids, masked like a grammar's.
    fn mask_disallowed(&self, logits: &mut [f32]) {
        if let Some(allowed) = &self.allowed {
            let mut next = allowed.iter().copied().peekable();
            for (id, logit) in (0u32..).zip(logits.iter_mut()) {
                if next.peek() == Some(&id) {
                    next.next();
                } else {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        for word in &self.bad_words {
            let (last, before) = word.split_last().expect("empty bad words are dropped");
            if self.output.ends_with(before) {
                if let Some(logit) = logits.get_mut(*last as usize) {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
    }

    /// Steps 1 to 3 of the module docs.
    fn process(&self, logits: &mut [f32]) {
        for &(t, bias) in &self.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        // A complete structured answer can only end: its end outranks `min_tokens` (the
        // scheduler still does not stop before them, so the eos tokens pad the rest).
        let complete = self.grammar.as_ref().is_some_and(constraint::Grammar::is_complete);
        if self.num_generated < self.min_tokens && !complete {
            for &t in &self.stop_ids {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        self.penalties.apply(logits);
    }

    fn choose(&mut self, logits: &[f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let u: f64 = self.rng.random();
        let filtered = self.top_k > 0 && self.top_k < logits.len() || self.top_p < 1.0;
        if filtered {
            self.sample_filtered(logits, u)
        } else {
            sample_full(logits, self.temperature, self.min_p, u)
        }
    }

    /// Top-k and/or top-p, then min-p: the candidates are collected, cut,
    /// then drawn from.
    fn sample_filtered(&self, logits: &[f32], u: f64) -> u32 {
        // NaN and masked (-inf) tokens are never candidates.
        let mut cands: Vec<Candidate> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_nan() && **l != f32::NEG_INFINITY)
            .map(|(i, &logit)| Candidate { id: i as u32, logit })
            .collect();
        if cands.is_empty() {
            return argmax(logits);
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
        // Each weight is the token's probability over the top one's, and the
        // top token is always still here: min-p is a cut on the weights.
        let min_p = f64::from(self.min_p);
        if min_p > 0.0 {
            weights.iter_mut().filter(|w| **w < min_p).for_each(|w| *w = 0.0);
        }
        let total: f64 = weights.iter().sum();
        pick(u * total, cands.iter().map(|c| c.id).zip(weights.iter().copied())).unwrap_or(cands[0].id)
    }
}

/// Plain temperature (and min-p) sampling over the whole row, without
/// allocating: one pass for the normaliser, one to find where `u` lands.
/// A token's weight is its probability over the top token's, so min-p zeroes
/// the weights below `min_p`.
fn sample_full(logits: &[f32], temperature: f32, min_p: f32, u: f64) -> u32 {
    let max = logits.iter().copied().filter(|l| !l.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return argmax(logits);
    }
    let t = f64::from(temperature);
    let min_p = f64::from(min_p);
    let weight = |l: f32| {
        if l.is_nan() {
            return 0.0;
        }
        let w = (f64::from(l - max) / t).exp();
        if w < min_p {
            0.0
        } else {
            w
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
    // Two passes that compile to vector compares (a 262k vocabulary per row per step): the
    // maximum in sixteen lanes, then the first position holding it.
    const LANES: usize = 16;
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for chunk in chunks.clone() {
        for (best, &l) in lanes.iter_mut().zip(chunk) {
            // NaN compares false, so it never wins.
            *best = if l > *best { l } else { *best };
        }
    }
    let max = lanes.iter().chain(tail).fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m });
    if max == f32::NEG_INFINITY {
        return 0;
    }
    let found = |chunk: &[f32]| chunk.iter().position(|&l| l == max);
    for (c, chunk) in chunks.enumerate() {
        if chunk.iter().fold(false, |hit, &l| hit | (l == max)) {
            return (c * LANES + found(chunk).expect("the chunk holds it")) as u32;
        }
    }
    (logits.len() - tail.len() + found(tail).expect("the maximum is in the tail")) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: u32, top_p: f32) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, ..SamplingParams::default() }
    }

    /// Samples from a copy of `row` (sampling processes the logits in place).
    fn sample_copy(s: &mut Sampler, row: &[f32]) -> u32 {
        s.sample(&mut row.to_vec())
    }

    const ROW: [f32; 5] = [0.5, 2.0, 1.9, -1.0, 2.0];

    /// The lane-parallel argmax against the plain first-maximum scan, over rows
    /// with ties, NaN, infinities and lengths around the lane count.
    #[test]
    fn argmax_is_the_first_maximum_of_a_plain_scan() {
        fn plain(row: &[f32]) -> u32 {
            let (mut best, mut at) = (f32::NEG_INFINITY, 0);
            for (i, &l) in row.iter().enumerate() {
                if l > best {
                    (best, at) = (l, i as u32);
                }
            }
            at
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let specials = [f32::NAN, f32::NEG_INFINITY, f32::INFINITY, 3.0, -0.0];
        for case in 0..2000 {
            let len = (next() % 70) as usize;
            let row: Vec<f32> = (0..len)
                .map(|_| match next() % 10 {
                    0 => specials[(next() % 5) as usize],
                    1..=3 => (next() % 4) as f32,
                    _ => (next() % 1000) as f32 / 100.0 - 5.0,
                })
                .collect();
            assert_eq!(argmax(&row), plain(&row), "case {case}: {row:?}");
        }
        assert_eq!(argmax(&[f32::NAN; 40]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 17]), 0);
    }

    #[test]
    fn greedy_picks_the_argmax_and_ties_go_to_the_lowest_id() {
        let mut s = Sampler::new(&params(0.0, 0, 1.0), 1);
        assert_eq!(sample_copy(&mut s, &ROW), 1);
        assert_eq!(sample_copy(&mut s, &[0.0, 3.0, f32::NAN, 1.0]), 1);
        assert_eq!(sample_copy(&mut s, &[f32::NAN, -1.0]), 1);
        assert_eq!(sample_copy(&mut s, &[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    #[test]
    fn top_k_one_is_greedy() {
        for seed in 0..50 {
            let mut s = Sampler::new(&params(1.5, 1, 1.0), seed);
            assert_eq!(sample_copy(&mut s, &ROW), 1, "seed {seed}");
        }
    }

    #[test]
    fn a_tiny_top_p_is_greedy() {
        for seed in 0..50 {
            let mut s = Sampler::new(&params(1.5, 0, 1e-6), seed);
            assert_eq!(sample_copy(&mut s, &ROW), 1, "seed {seed}");
        }
    }

    #[test]
    fn top_k_two_never_picks_a_third_token() {
        let mut s = Sampler::new(&params(5.0, 2, 1.0), 3);
        for _ in 0..500 {
            let t = sample_copy(&mut s, &ROW);
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
            seen[sample_copy(&mut s, &row) as usize] += 1;
        }
        assert_eq!(seen[2], 0);
        assert!(seen[1] > 500, "{seen:?}");
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let draw = |seed| {
            let mut s = Sampler::new(&params(1.0, 0, 1.0), seed);
            (0..64).map(|_| sample_copy(&mut s, &ROW)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        let draw_filtered = |seed| {
            let mut s = Sampler::new(&params(0.8, 3, 0.9), seed);
            (0..64).map(|_| sample_copy(&mut s, &ROW)).collect::<Vec<_>>()
        };
        assert_eq!(draw_filtered(7), draw_filtered(7));
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        // Logits ln(0.7), ln(0.3): token 1 should come up about 30% of the time.
        let row = [0.7f32.ln(), 0.3f32.ln()];
        let mut s = Sampler::new(&params(1.0, 0, 1.0), 1234);
        let n = 10_000;
        let ones = (0..n).filter(|_| sample_copy(&mut s, &row) == 1).count();
        assert!((2700..3300).contains(&ones), "token 1 drawn {ones} times of {n}");
    }

    #[test]
    fn a_low_temperature_sharpens_and_a_high_one_flattens() {
        let row = [1.0, 0.0];
        let count = |t: f32| {
            let mut s = Sampler::new(&params(t, 0, 1.0), 5);
            (0..4000).filter(|_| sample_copy(&mut s, &row) == 1).count()
        };
        let (cold, warm, hot) = (count(0.1), count(1.0), count(100.0));
        assert!(cold < 10, "{cold}");
        assert!((900..1250).contains(&warm), "{warm}"); // p = 1 / (1 + e) = 0.269
        assert!((1800..2200).contains(&hot), "{hot}");
    }

    fn greedy_with(p: SamplingParams) -> Sampler {
        Sampler::new(&SamplingParams { temperature: 0.0, ..p }, 1)
    }

    #[test]
    fn default_params_leave_the_logits_untouched() {
        let mut s = Sampler::new(&SamplingParams::default(), 1);
        let mut row = ROW;
        s.sample(&mut row);
        s.sample(&mut row);
        assert_eq!(row, ROW);
        assert!(s.penalties.seen.is_empty() && s.penalties.output_counts.is_empty());
    }

    #[test]
    fn presence_penalty_moves_the_argmax_off_a_repeated_token() {
        let row = [1.0, 1.5, 0.0];
        let mut plain = greedy_with(SamplingParams::default());
        assert_eq!([sample_copy(&mut plain, &row), sample_copy(&mut plain, &row)], [1, 1]);
        let mut s = greedy_with(SamplingParams { presence_penalty: 1.0, ..SamplingParams::default() });
        assert_eq!(sample_copy(&mut s, &row), 1);
        // Token 1 is in the output now: 1.5 - 1 = 0.5 < 1.0.
        let mut processed = row;
        assert_eq!(s.sample(&mut processed), 0);
        assert_eq!(processed, [1.0, 0.5, 0.0]);
        // Presence counts once, whatever the count: both are now down by 1.
        let mut processed = row;
        assert_eq!(s.sample(&mut processed), 1);
        assert_eq!(processed, [0.0, 0.5, 0.0]);
    }

    #[test]
    fn frequency_penalty_scales_with_the_count() {
        let row = [1.0, 2.0];
        let mut s = greedy_with(SamplingParams { frequency_penalty: 0.4, ..SamplingParams::default() });
        // Token 1's logit: 2.0, 1.6, 1.2, then 0.8 < 1.0.
        let picks: Vec<u32> = (0..4).map(|_| sample_copy(&mut s, &row)).collect();
        assert_eq!(picks, [1, 1, 1, 0]);
        let mut processed = row;
        s.sample(&mut processed);
        assert!((processed[1] - (2.0 - 3.0 * 0.4)).abs() < 1e-6, "{processed:?}");
        assert!((processed[0] - (1.0 - 0.4)).abs() < 1e-6, "{processed:?}");
        // A negative penalty encourages repetition instead.
        let mut s = greedy_with(SamplingParams { frequency_penalty: -2.0, ..SamplingParams::default() });
        let picks: Vec<u32> = (0..3).map(|_| sample_copy(&mut s, &[0.0, 1.0, 0.5])).collect();
        assert_eq!(picks, [1, 1, 1]);
    }

    #[test]
    fn repetition_penalty_covers_prompt_tokens_and_both_signs() {
        let row = [2.0, 1.5, -1.0, -1.2];
        let p = SamplingParams { repetition_penalty: 2.0, ..SamplingParams::default() };
        let mut s = greedy_with(p.clone()).with_prompt(&[0, 2, 0]);
        let mut processed = row;
        // Token 0 (prompt): 2.0 / 2 = 1.0 loses to token 1.
        assert_eq!(s.sample(&mut processed), 1);
        assert_eq!(processed, [1.0, 1.5, -2.0, -1.2]);
        // Token 1 is output now: 1.5 / 2 = 0.75 < 1.0.
        let mut processed = row;
        assert_eq!(s.sample(&mut processed), 0);
        assert_eq!(processed, [1.0, 0.75, -2.0, -1.2]);
        // Without the prompt, token 0 wins at once.
        assert_eq!(sample_copy(&mut greedy_with(p), &row), 0);
    }

    #[test]
    fn logit_bias_forces_and_bans_tokens() {
        let row = [5.0, 0.0, 0.0];
        let force = SamplingParams { logit_bias: vec![(2, 100.0)], ..SamplingParams::default() };
        assert_eq!(sample_copy(&mut greedy_with(force.clone()), &row), 2);
        for seed in 0..20 {
            let mut s = Sampler::new(&force, seed);
            assert_eq!(sample_copy(&mut s, &row), 2, "seed {seed}");
        }
        let ban = SamplingParams { logit_bias: vec![(0, -100.0)], ..SamplingParams::default() };
        assert_eq!(sample_copy(&mut greedy_with(ban), &row), 1);
        // Ids past the row are ignored rather than a panic.
        let outside = SamplingParams { logit_bias: vec![(7, 1.0)], ..SamplingParams::default() };
        assert_eq!(sample_copy(&mut greedy_with(outside), &row), 0);
    }

    #[test]
    fn min_p_removes_the_tail() {
        // Probabilities 0.6, 0.3, 0.1: min_p 0.2 cuts below 0.12, so token 2.
        let row = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln()];
        for top_p in [1.0, 0.999] {
            let p = SamplingParams { min_p: 0.2, top_p, ..SamplingParams::default() };
            let mut s = Sampler::new(&p, 11);
            let mut seen = [0usize; 3];
            for _ in 0..3000 {
                seen[sample_copy(&mut s, &row) as usize] += 1;
            }
            assert_eq!(seen[2], 0, "top_p {top_p}: {seen:?}");
            // Token 1 keeps 0.3 / 0.9 of the mass.
            assert!((850..1150).contains(&seen[1]), "top_p {top_p}: {seen:?}");
        }
        // min_p is relative to the temperature-scaled distribution: at t = 0.5
        // token 1 has (0.3 / 0.6)^2 = 0.25 of the top one, below 0.3.
        let p = SamplingParams { min_p: 0.3, temperature: 0.5, ..SamplingParams::default() };
        let mut s = Sampler::new(&p, 3);
        assert!((0..500).all(|_| sample_copy(&mut s, &row) == 0));
    }

    #[test]
    fn min_tokens_masks_eos_and_stop_tokens_until_reached() {
        // Eos 0 is the most likely, then stop token 1, then 2.
        let row = [3.0, 2.0, 1.0];
        let p = SamplingParams { min_tokens: 2, stop_token_ids: vec![1], ..SamplingParams::default() };
        let mut s = greedy_with(p.clone()).with_eos(&[0]);
        let picks: Vec<u32> = (0..3).map(|_| sample_copy(&mut s, &row)).collect();
        assert_eq!(picks, [2, 2, 0]);
        // At temperature the masked tokens are never drawn either.
        for seed in 0..20 {
            let mut s = Sampler::new(&SamplingParams { temperature: 1.0, ..p.clone() }, seed).with_eos(&[0]);
            assert_eq!([sample_copy(&mut s, &row), sample_copy(&mut s, &row)], [2, 2], "seed {seed}");
        }
        // With ignore_eos, eos is an ordinary token: only the stop token is masked.
        let mut s = greedy_with(SamplingParams { ignore_eos: true, ..p.clone() }).with_eos(&[0]);
        assert_eq!(sample_copy(&mut s, &row), 0);
        // A first token made elsewhere counts toward min_tokens.
        let mut s = greedy_with(p).with_eos(&[0]);
        s.record(2);
        assert_eq!([sample_copy(&mut s, &row), sample_copy(&mut s, &row)], [2, 0]);
    }

    #[test]
    fn allowed_token_ids_restrict_the_draw_and_leave_the_logprobs_raw() {
        let row = [4.0, 3.0, 2.0, 1.0];
        let p =
            SamplingParams { allowed_token_ids: Some(vec![3, 2, 3]), logprobs: Some(1), ..SamplingParams::default() };
        let mut s = greedy_with(p.clone());
        let (token, logprobs) = s.sample_with_logprobs(&mut row.to_vec());
        assert_eq!(token, 2);
        // The logprobs describe the model: token 0 is still the most likely.
        let logprobs = logprobs.unwrap();
        assert_eq!((logprobs.rank, logprobs.top[0].0), (3, 0));
        for seed in 0..50 {
            let mut s = Sampler::new(&SamplingParams { temperature: 1.0, ..p.clone() }, seed);
            assert!([2, 3].contains(&sample_copy(&mut s, &row)), "seed {seed}");
        }
    }

    #[test]
    fn bad_words_mask_a_word_alone_and_a_word_s_last_token_after_its_start() {
        let row = [1.0, 4.0, 3.0, 2.0];
        // Token 1 alone, and the pair (2, 3).
        let p = SamplingParams { bad_words: vec![vec![1], vec![2, 3]], ..SamplingParams::default() };
        let mut s = greedy_with(p);
        // 1 is banned: 2 is next best; after 2, its pair's 3 is banned too: 0... unless 2 again.
        assert_eq!(sample_copy(&mut s, &row), 2);
        assert_eq!(sample_copy(&mut s, &row), 2);
        let mut s = greedy_with(SamplingParams { bad_words: vec![vec![2, 3]], ..SamplingParams::default() });
        s.record(2);
        assert_eq!(sample_copy(&mut s, &[0.0, 0.0, 1.0, 2.0]), 2, "3 may not follow 2");
        assert_eq!(sample_copy(&mut s, &[0.0, 0.0, 1.0, 2.0]), 2);
        s.record(0);
        assert_eq!(sample_copy(&mut s, &[0.0, 0.0, 1.0, 2.0]), 3, "3 may follow anything else");
    }

    #[test]
    fn a_recorded_first_token_counts_for_the_penalties() {
        let row = [1.0, 1.5];
        let mut s = greedy_with(SamplingParams { presence_penalty: 1.0, ..SamplingParams::default() });
        s.record(1);
        assert_eq!(sample_copy(&mut s, &row), 0);
    }

    /// Log-softmax computed the slow, obvious way, in f64.
    fn log_softmax(row: &[f32]) -> Vec<f64> {
        let z: f64 = row.iter().map(|&l| f64::from(l).exp()).sum();
        row.iter().map(|&l| f64::from(l) - z.ln()).collect()
    }

    #[test]
    fn logprobs_are_the_log_softmax_of_the_raw_row() {
        let row = [0.5, 2.0, 1.9, -1.0, 2.0, 0.0, 1.0];
        let want = log_softmax(&row);
        // Bias, penalties and temperature change the draw, not the logprobs.
        let p = SamplingParams {
            temperature: 0.7,
            logit_bias: vec![(3, 5.0)],
            presence_penalty: 1.0,
            logprobs: Some(3),
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(&p, 4);
        for _ in 0..20 {
            let (token, logprobs) = s.sample_with_logprobs(&mut row.to_vec());
            let logprobs = logprobs.expect("asked for");
            assert!((f64::from(logprobs.logprob) - want[token as usize]).abs() < 1e-5, "{token} {logprobs:?}");
            // Sorted most likely first, ties (1 and 4) by the lower id.
            let ids: Vec<u32> = logprobs.top.iter().map(|&(id, _)| id).collect();
            assert_eq!(ids, [1, 4, 2]);
            for &(id, lp) in &logprobs.top {
                assert!((f64::from(lp) - want[id as usize]).abs() < 1e-5, "{id}: {lp}");
            }
            let mass: f32 = logprobs.top.iter().map(|&(_, lp)| lp.exp()).sum();
            assert!(mass <= 1.0 + 1e-6, "{mass}");
        }
    }

    #[test]
    fn greedy_picks_the_top_logprob_and_k_zero_gives_only_the_chosen() {
        let row = [0.1, -3.0, 4.0, 3.9, f32::NAN, f32::NEG_INFINITY];
        let mut s = Sampler::new(&SamplingParams { logprobs: Some(20), ..SamplingParams::greedy(4) }, 1);
        let (token, logprobs) = s.sample_with_logprobs(&mut row.to_vec());
        let logprobs = logprobs.unwrap();
        assert_eq!(token, 2);
        assert_eq!(logprobs.top[0], (token, logprobs.logprob));
        // NaN never appears; a -inf logit is a -inf logprob; k past the row is the row.
        assert_eq!(logprobs.top.iter().map(|&(id, _)| id).collect::<Vec<_>>(), [2, 3, 0, 1, 5]);
        assert_eq!(logprobs.top[4].1, f32::NEG_INFINITY);
        let mass: f32 = logprobs.top.iter().map(|&(_, lp)| lp.exp()).sum();
        assert!((mass - 1.0).abs() < 1e-5, "{mass}");

        let mut s = Sampler::new(&SamplingParams { logprobs: Some(0), ..SamplingParams::greedy(4) }, 1);
        let (_, logprobs) = s.sample_with_logprobs(&mut row.to_vec());
        let logprobs = logprobs.unwrap();
        assert!(logprobs.top.is_empty());
        assert!(
            (f64::from(logprobs.logprob) - (4.0 - (0.1f64.exp() + (-3f64).exp() + 4f64.exp() + 3.9f64.exp()).ln()))
                .abs()
                < 1e-5
        );
    }

    #[test]
    fn a_recorded_token_takes_the_draw_that_sampled_it() {
        let p = params(1.0, 0, 1.0);
        let mut here = Sampler::new(&p, 9);
        let first = sample_copy(&mut here, &ROW);
        let rest: Vec<u32> = (0..16).map(|_| sample_copy(&mut here, &ROW)).collect();
        let mut elsewhere = Sampler::new(&p, 9);
        elsewhere.record(first);
        assert_eq!((0..16).map(|_| sample_copy(&mut elsewhere, &ROW)).collect::<Vec<_>>(), rest);
    }

    #[test]
    fn streams_of_one_seed_differ_and_stream_0_is_the_plain_sampler() {
        let p = params(1.0, 0, 1.0);
        let draw = |s: &mut Sampler| (0..32).map(|_| sample_copy(s, &ROW)).collect::<Vec<_>>();
        let plain = draw(&mut Sampler::new(&p, 5));
        assert_eq!(draw(&mut Sampler::new(&p, 5).with_stream(0)), plain);
        assert_ne!(draw(&mut Sampler::new(&p, 5).with_stream(1)), plain);
        assert_eq!(draw(&mut Sampler::new(&p, 5).with_stream(1)), draw(&mut Sampler::new(&p, 5).with_stream(1)));
    }

    #[test]
    fn no_logprobs_unless_asked() {
        let mut s = Sampler::new(&SamplingParams::default(), 1);
        assert_eq!(s.sample_with_logprobs(&mut ROW.to_vec()).1, None);
    }

    #[test]
    fn penalised_sampling_repeats_with_the_seed() {
        let p = SamplingParams {
            temperature: 0.9,
            top_k: 4,
            min_p: 0.05,
            presence_penalty: 0.5,
            frequency_penalty: 0.3,
            repetition_penalty: 1.3,
            logit_bias: vec![(3, 1.0)],
            ..SamplingParams::default()
        };
        let draw = |seed| {
            let mut s = Sampler::new(&p, seed).with_prompt(&[1, 2]);
            (0..64).map(|_| sample_copy(&mut s, &ROW)).collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }
}

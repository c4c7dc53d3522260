//! vLLM's beam search as a state machine, shared by the router (over its workers) and the offline
//! library (over its engine), which each ask the model: every step, each live beam's `2 × width`
//! most likely next tokens with their raw logprobs. [`Beams`] keeps the `width` best continuations
//! by score and sets aside those that end; at the end the `width` best of all are the answer.
//!
//! A beam's score is vLLM's: its cumulative logprob over its length (prompt included, a final eos
//! left out) raised to `length_penalty`.

/// One beam: its generated tokens, their cumulative logprob, and whether an end token closed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Beam {
    pub tokens: Vec<u32>,
    pub logprob: f32,
    pub ended: bool,
}

/// A beam search under way.
#[derive(Debug, Clone)]
pub struct Beams {
    width: usize,
    length_penalty: f32,
    prompt_len: usize,
    /// Tokens that end a beam (eos unless ignored, stop tokens).
    ends: Vec<u32>,
    /// The model's eos tokens, which a beam's length does not count at its end.
    eos: Vec<u32>,
    live: Vec<Beam>,
    ended: Vec<Beam>,
}

impl Beams {
    /// A search for `width` beams after a prompt of `prompt_len` tokens: `ends` close a beam,
    /// `eos` are the model's end tokens (for the length a score divides by).
    pub fn new(width: usize, length_penalty: f32, prompt_len: usize, ends: Vec<u32>, eos: Vec<u32>) -> Self {
        let start = Beam { tokens: Vec::new(), logprob: 0.0, ended: false };
        let width = width.max(1);
        Self { width, length_penalty, prompt_len, ends, eos, live: vec![start], ended: Vec::new() }
    }

    /// The beams to ask about next; none once every beam ended.
    pub fn live(&self) -> &[Beam] {
        &self.live
    }

    /// How many alternatives to ask per live beam.
    pub fn alternatives(&self) -> usize {
        2 * self.width
    }

    /// Takes each live beam's alternatives (in [`Self::live`]'s order) and keeps the best.
    pub fn step(&mut self, alternatives: Vec<Vec<(u32, f32)>>) {
        let mut candidates = Vec::new();
        for (beam, alternatives) in self.live.iter().zip(alternatives) {
            for (token, logprob) in alternatives {
                let tokens = beam.tokens.iter().copied().chain([token]).collect();
                let next = Beam { tokens, logprob: beam.logprob + logprob, ended: self.ends.contains(&token) };
                if next.ended {
                    self.ended.push(next);
                } else {
                    candidates.push(next);
                }
            }
        }
        self.best_first(&mut candidates);
        candidates.truncate(self.width);
        self.live = candidates;
    }

    /// The `width` best beams, ended or not, best first.
    pub fn finish(mut self) -> Vec<Beam> {
        let mut all = std::mem::take(&mut self.ended);
        all.append(&mut self.live);
        self.best_first(&mut all);
        all.truncate(self.width);
        all
    }

    /// vLLM's score of `beam`.
    pub fn score(&self, beam: &Beam) -> f32 {
        let mut len = self.prompt_len + beam.tokens.len();
        if beam.tokens.last().is_some_and(|t| self.eos.contains(t)) {
            len -= 1;
        }
        beam.logprob / (len.max(1) as f32).powf(self.length_penalty)
    }

    /// Stable: equal scores keep the order they were asked in, so beams are deterministic.
    fn best_first(&self, beams: &mut [Beam]) {
        beams.sort_by(|a, b| self.score(b).total_cmp(&self.score(a)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EOS: u32 = 9;

    /// Next-token logprobs that depend on the last token only.
    fn next(last: u32) -> Vec<(u32, f32)> {
        match last {
            0 => vec![(1, -0.5), (2, -0.9)],
            1 => vec![(3, -2.0), (4, -2.1)],
            2 => vec![(5, -0.1), (6, -3.0)],
            _ => vec![(EOS, -0.01), (7, -5.0)],
        }
    }

    fn search(width: usize, length_penalty: f32, steps: usize, ends: Vec<u32>) -> Vec<(Vec<u32>, bool)> {
        let mut beams = Beams::new(width, length_penalty, 1, ends, vec![EOS]);
        for _ in 0..steps {
            let asks = beams.live().iter().map(|b| next(b.tokens.last().copied().unwrap_or(0))).collect();
            beams.step(asks);
        }
        beams.finish().into_iter().map(|b| (b.tokens, b.ended)).collect()
    }

    #[test]
    fn the_best_beams_win_where_greedy_would_not() {
        // Greedy takes 1 first (-0.5); the beam through 2 (-0.9) then 5 (-0.1) ends better.
        assert_eq!(search(2, 0.0, 3, vec![EOS]), [(vec![2, 5, EOS], true), (vec![1, 3, EOS], true)]);
    }

    #[test]
    fn unended_beams_compete_by_length_penalised_score_and_stop_tokens_end_beams() {
        assert_eq!(search(2, 1.0, 2, vec![EOS]), [(vec![2, 5], false), (vec![1, 3], false)]);
        assert_eq!(search(1, 1.0, 2, vec![EOS, 3]), [(vec![1, 3], true)]);
    }
}

//! One sequence's matcher: which tokens may come next, and the token that came.
//!
//! For a model whose vocabulary has `<think>` and `</think>` tokens, the constraint holds the
//! answer after the reasoning, as vLLM holds it with a reasoning parser: the reasoning itself is
//! free, and the matcher sees only the tokens after `</think>`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llguidance::Matcher;
use toktrie::SimpleVob;

/// Told how long each mask took (a worker feeds a histogram with it).
pub type MaskObserver = Arc<dyn Fn(Duration) + Send + Sync>;

/// A compiled constraint at one point of one sequence. Cloning gives an independent matcher at
/// the same point (each choice of a request gets one).
#[derive(Clone)]
pub struct Grammar {
    matcher: Matcher,
    /// Every token that ends generation: each is allowed exactly where the grammar may end.
    eos: Arc<[u32]>,
    /// Whether a failure already forced the end (logged once).
    failed: bool,
    vocab_size: usize,
    observer: Option<MaskObserver>,
    reasoning: Reasoning,
}

/// The ids of a model's `<think>` and `</think>` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinkTokens {
    /// `<think>`.
    pub open: u32,
    /// `</think>`.
    pub close: u32,
}

/// Where an answer stands against the model's reasoning block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reasoning {
    /// The model has no think tokens: the constraint holds from the first token.
    Absent,
    /// The answer may open with `<think>`, or start the constrained text at once.
    MayOpen(ThinkTokens),
    /// Inside the reasoning: any token, until `</think>`.
    Thinking(ThinkTokens),
    /// After the reasoning (or after a prompt that closed it): the constraint holds.
    Answer,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar").field("stopped", &self.matcher.is_stopped()).field("failed", &self.failed).finish()
    }
}

impl Grammar {
    pub(crate) fn new(
        matcher: Matcher,
        eos: Arc<[u32]>,
        vocab_size: usize,
        observer: Option<MaskObserver>,
        think: Option<ThinkTokens>,
    ) -> Self {
        let reasoning = think.map_or(Reasoning::Absent, Reasoning::MayOpen);
        Self { matcher, eos, failed: false, vocab_size, observer, reasoning }
    }

    /// Places the answer after `prompt`, before any token of it is accepted: a prompt whose last
    /// think tag is an open `<think>` (a template that starts the reasoning) leaves the answer
    /// reasoning until `</think>`; one whose last tag is `</think>` (Qwen3 with
    /// `enable_thinking: false`) starts the constrained text at once, with no second block, as
    /// vLLM's reasoning parsers decide from the prompt.
    pub fn follow_prompt(&mut self, prompt: &[u32]) {
        let Reasoning::MayOpen(think) = self.reasoning else { return };
        let last_tag = prompt.iter().rev().find(|&&t| t == think.open || t == think.close);
        self.reasoning = match last_tag {
            Some(&t) if t == think.open => Reasoning::Thinking(think),
            Some(_) => Reasoning::Answer,
            None => Reasoning::MayOpen(think),
        };
    }

    /// Sets to `-inf` the logit of every token the constraint forbids next. An end-of-sequence
    /// token stays only where the answer may end; once the answer is complete, only they stay.
    ///
    /// Should the matcher fail (it cannot on tokens it allowed), only the end-of-sequence tokens
    /// stay, so the answer ends where it stands rather than leaving the constraint.
    pub fn mask(&mut self, logits: &mut [f32]) {
        let started = self.observer.as_ref().map(|_| Instant::now());
        self.apply_mask(logits);
        if let (Some(observe), Some(started)) = (&self.observer, started) {
            observe(started.elapsed());
        }
    }

    fn apply_mask(&mut self, logits: &mut [f32]) {
        let open = match self.reasoning {
            Reasoning::Thinking(_) => return,
            Reasoning::MayOpen(think) => logits.get(think.open as usize).map(|&l| (think.open as usize, l)),
            Reasoning::Absent | Reasoning::Answer => None,
        };
        let allowed =
            if self.failed { None } else { self.matcher.compute_mask_or_eos().map_err(|e| self.fail(&e)).ok() };
        let eos_allowed = allowed.as_ref().is_none_or(|mask| self.eos.first().is_some_and(|&t| mask.is_allowed(t)));
        let kept: Vec<(usize, f32)> = if eos_allowed {
            self.eos.iter().filter_map(|&t| logits.get(t as usize).map(|&l| (t as usize, l))).collect()
        } else {
            Vec::new()
        };
        match &allowed {
            Some(mask) => forbid_unset(mask, logits),
            None => logits.fill(f32::NEG_INFINITY),
        }
        for (t, logit) in kept.into_iter().chain(open) {
            logits[t] = logit;
        }
    }

    /// Advances past `token`, sampled under [`Grammar::mask`] (or by a prefill worker under
    /// the same constraint).
    pub fn accept(&mut self, token: u32) {
        match self.reasoning {
            Reasoning::MayOpen(think) if token == think.open => {
                self.reasoning = Reasoning::Thinking(think);
                return;
            }
            Reasoning::MayOpen(_) => self.reasoning = Reasoning::Answer,
            Reasoning::Thinking(think) => {
                if token == think.close {
                    self.reasoning = Reasoning::Answer;
                }
                return;
            }
            Reasoning::Absent | Reasoning::Answer => {}
        }
        if self.failed {
            return;
        }
        let token = if self.eos.contains(&token) {
            // A complete answer takes no more tokens, its end included.
            if self.matcher.is_stopped() {
                return;
            }
            // The trie knows one end-of-sequence token; the model may have several.
            self.eos[0]
        } else {
            token
        };
        if let Err(e) = self.matcher.consume_token(token) {
            self.fail(&e);
        }
    }

    /// Width of the masks: the vocabulary this grammar was compiled for.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Whether the answer is complete: only an end-of-sequence token may follow.
    pub fn is_complete(&self) -> bool {
        matches!(self.reasoning, Reasoning::Absent | Reasoning::Answer) && self.matcher.is_stopped()
    }

    fn fail(&mut self, error: &dyn std::fmt::Display) {
        tracing::warn!(%error, "structured output matcher failed; ending the answer");
        self.failed = true;
    }
}

/// `-inf` for every id the mask leaves unset, ids past its end included.
fn forbid_unset(mask: &SimpleVob, logits: &mut [f32]) {
    let words = mask.as_slice();
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let word = words.get(w).copied().unwrap_or(0);
        if word == u32::MAX {
            continue;
        }
        for (bit, logit) in chunk.iter_mut().enumerate() {
            if word & (1 << bit) == 0 {
                *logit = f32::NEG_INFINITY;
            }
        }
    }
}

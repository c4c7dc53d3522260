//! One worker's engine as the simulator sees it: the scheduling of
//! `engine::scheduler` (decodes first, then prefill chunks under the token
//! budget, FCFS admission up to `max_num_seqs`) without the model.

use crate::cost::{attention_pairs, StepLoad};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// The engine limits every worker runs with (the worker flags of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineLimits {
    /// Most sequences in one batch (workers' default 64).
    pub max_num_seqs: usize,
    /// Most tokens in one step (workers' default 2048).
    pub max_num_batched_tokens: usize,
}

impl Default for EngineLimits {
    fn default() -> Self {
        Self { max_num_seqs: 64, max_num_batched_tokens: 2048 }
    }
}

/// A sequence on a worker.
#[derive(Debug, Clone)]
pub(crate) struct Seq {
    pub req: usize,
    pub prompt: u32,
    /// Prompt tokens with KV (all of them when a prefill worker computed it).
    pub computed: u32,
    /// Tokens generated so far, the prefill's first token included.
    pub generated: u32,
    /// Finish once this many tokens are generated.
    pub target: u32,
    /// Tokens fed in the step in flight (0: not in it).
    chunk: u32,
}

impl Seq {
    /// A prompt to compute here, then generate up to `target` tokens.
    pub fn fresh(req: usize, prompt: u32, target: u32) -> Self {
        Self { req, prompt, computed: 0, generated: 0, target, chunk: 0 }
    }

    /// A sequence whose prompt KV and first token came from a prefill worker.
    pub fn handed_off(req: usize, prompt: u32, target: u32) -> Self {
        Self { req, prompt, computed: prompt, generated: 1, target, chunk: 0 }
    }
}

/// What a step did to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// The prompt's last chunk ran and sampled the first token.
    FirstToken(usize),
    /// The request generated its last token here.
    Finished(usize),
}

/// A worker's queues. Not busy means no step in flight.
#[derive(Debug)]
pub(crate) struct Worker {
    limits: EngineLimits,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// Hand-offs on their way here: the router has counted them already.
    pub incoming: usize,
    pub busy: bool,
}

impl Worker {
    pub fn new(limits: EngineLimits) -> Self {
        Self { limits, waiting: VecDeque::new(), running: Vec::new(), incoming: 0, busy: false }
    }

    /// Requests the router sees on this worker: queued, running or on their way.
    pub fn load(&self) -> usize {
        self.waiting.len() + self.running.len() + self.incoming
    }

    /// Sequences running (in the batch).
    #[cfg(test)]
    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn enqueue(&mut self, seq: Seq) {
        self.waiting.push_back(seq);
    }

    /// Plans the next step; an empty load means there is nothing to run.
    pub fn schedule(&mut self) -> StepLoad {
        let mut budget = self.limits.max_num_batched_tokens as u64;
        let mut load = StepLoad::default();
        // Decodes first, so a long prompt never stalls running sequences.
        for seq in self.running.iter_mut().filter(|s| s.computed == s.prompt) {
            if budget == 0 {
                break;
            }
            seq.chunk = 1;
            budget -= 1;
            load.decode_seqs += 1;
            load.decode_context += u64::from(seq.prompt + seq.generated);
        }
        // Then prompts already partly prefilled, then new ones, cut to what is left.
        for seq in self.running.iter_mut().filter(|s| s.computed < s.prompt) {
            budget = feed_prefill(seq, budget, &mut load);
        }
        while budget > 0 && self.running.len() < self.limits.max_num_seqs {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            if seq.computed == seq.prompt {
                // Handed-off KV: its first step feeds the first token (a decode).
                seq.chunk = 1;
                budget -= 1;
                load.decode_seqs += 1;
                load.decode_context += u64::from(seq.prompt + seq.generated);
            } else {
                budget = feed_prefill(&mut seq, budget, &mut load);
            }
            self.running.push(seq);
        }
        load
    }

    /// Applies the step in flight: advances every sequence it fed, and
    /// reports first tokens and finished requests into `out`.
    pub fn finish_step(&mut self, out: &mut Vec<Output>) {
        for seq in &mut self.running {
            if seq.chunk == 0 {
                continue;
            }
            if seq.computed < seq.prompt {
                seq.computed += seq.chunk;
                if seq.computed == seq.prompt {
                    seq.generated += 1;
                    out.push(Output::FirstToken(seq.req));
                }
            } else {
                seq.generated += 1;
            }
            seq.chunk = 0;
            if seq.generated >= seq.target {
                out.push(Output::Finished(seq.req));
            }
        }
        self.running.retain(|s| s.generated < s.target);
    }
}

/// Feeds as much of `seq`'s prompt as `budget` allows; returns what is left.
fn feed_prefill(seq: &mut Seq, budget: u64, load: &mut StepLoad) -> u64 {
    let chunk = u64::from(seq.prompt - seq.computed).min(budget);
    seq.chunk = chunk as u32;
    load.prefill_tokens += chunk;
    load.attention_pairs += attention_pairs(chunk, u64::from(seq.computed));
    budget - chunk
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(max_num_seqs: usize, max_num_batched_tokens: usize) -> Worker {
        Worker::new(EngineLimits { max_num_seqs, max_num_batched_tokens })
    }

    #[test]
    fn chunks_a_long_prompt_and_decodes_first() {
        let mut w = worker(8, 100);
        w.enqueue(Seq::fresh(0, 250, 3));
        let mut out = Vec::new();
        // 250 tokens at 100 a step: 100, 100, 50, the last one samples.
        let step = w.schedule();
        assert_eq!((step.prefill_tokens, step.attention_pairs), (100, attention_pairs(100, 0)));
        w.finish_step(&mut out);
        let step = w.schedule();
        assert_eq!((step.prefill_tokens, step.attention_pairs), (100, attention_pairs(100, 100)));
        w.finish_step(&mut out);
        assert!(out.is_empty());
        // A second prompt arrives: it gets what the first one's last chunk leaves.
        w.enqueue(Seq::fresh(1, 80, 1));
        let step = w.schedule();
        assert_eq!(step.prefill_tokens, 50 + 50);
        w.finish_step(&mut out);
        assert_eq!(out, [Output::FirstToken(0)]);
        out.clear();
        // Now request 0 decodes (1 token, over 250 + 1 of KV) ahead of request 1's last 30.
        let step = w.schedule();
        assert_eq!((step.decode_seqs, step.decode_context, step.prefill_tokens), (1, 251, 30));
        w.finish_step(&mut out);
        assert_eq!(out, [Output::FirstToken(1), Output::Finished(1)]);
        assert_eq!(w.running(), 1);
    }

    #[test]
    fn admits_at_most_max_num_seqs() {
        let mut w = worker(2, 1000);
        for req in 0..3 {
            w.enqueue(Seq::handed_off(req, 10, 3));
        }
        let step = w.schedule();
        assert_eq!(step.decode_seqs, 2);
        assert_eq!(w.load(), 3);
        let mut out = Vec::new();
        w.finish_step(&mut out);
        w.finish_step(&mut out);
        assert!(out.is_empty(), "a step not scheduled changes nothing: {out:?}");
        w.schedule();
        w.finish_step(&mut out);
        // Generated 1 (from prefill) + 2 steps = 3: both finish, the third is admitted after.
        assert_eq!(out, [Output::Finished(0), Output::Finished(1)]);
        assert_eq!(w.schedule().decode_seqs, 1);
    }
}

//! The discrete-event simulation of one cluster under one arrival sequence.
//!
//! Disaggregated (`P` prefill and `D` decode workers): a request arrives at
//! the router, which places its prefill on the prefill worker with the
//! fewest requests queued or running (ties: the lowest index). That worker's
//! engine batches waiting prompts FCFS under its token budget; the step that
//! computes a prompt's last token samples the first token, which the router
//! streams at once (TTFT ends there). The router then sends the decode to
//! the decode worker with the fewest sequences (running, queued or on their
//! way); the KV arrives after the hand-off time, and the sequence joins that
//! worker's continuous batch. The hand-off delays the second token, so it
//! shows in TPOT, not TTFT, as on the real cluster.
//!
//! Colocated (`P = 0`): the router places each request on the decode worker
//! with the fewest sequences, and that worker's engine prefills it in chunks
//! mixed into its decode steps, as `engine::scheduler` does.
//!
//! Every worker runs one step at a time; a step's time comes from the
//! [`CostProfile`]. Requests that arrive during a step wait for the next.

mod events;
mod worker;

use crate::cost::CostProfile;
use crate::workload::{Slo, TraceRequest};
use events::{Event, Events};
use serde::{Deserialize, Serialize};
pub use worker::EngineLimits;
use worker::{Output, Seq, Worker};

/// How many workers of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Topology {
    Disaggregated {
        prefill: usize,
        decode: usize,
    },
    /// Every worker prefills and decodes its own requests.
    Colocated {
        workers: usize,
    },
}

impl Topology {
    /// `prefill` = 0 is colocated serving over the `decode` workers.
    pub fn new(prefill: usize, decode: usize) -> Self {
        if prefill == 0 {
            Self::Colocated { workers: decode }
        } else {
            Self::Disaggregated { prefill, decode }
        }
    }

    /// `(prefill, decode)` worker counts (colocated: `(0, workers)`).
    pub fn counts(&self) -> (usize, usize) {
        match *self {
            Self::Disaggregated { prefill, decode } => (prefill, decode),
            Self::Colocated { workers } => (0, workers),
        }
    }

    /// Workers in all.
    pub fn workers(&self) -> usize {
        let (p, d) = self.counts();
        p + d
    }

    /// `2P:2D` or `colocated×4`.
    pub fn label(&self) -> String {
        match *self {
            Self::Disaggregated { prefill, decode } => format!("{prefill}P:{decode}D"),
            Self::Colocated { workers } => format!("colocated x{workers}"),
        }
    }
}

/// When one request's milestones happened (seconds from the start).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    pub arrival: f64,
    pub first_token: f64,
    pub finish: f64,
    pub output: u32,
}

impl Outcome {
    /// Time to first token.
    pub fn ttft(&self) -> f64 {
        self.first_token - self.arrival
    }

    /// Mean time per output token after the first (0 for a single token).
    pub fn tpot(&self) -> f64 {
        if self.output <= 1 {
            0.0
        } else {
            (self.finish - self.first_token) / f64::from(self.output - 1)
        }
    }

    /// Meets both objectives.
    pub fn meets(&self, slo: &Slo) -> bool {
        self.ttft() * 1e3 <= slo.ttft_ms && self.tpot() * 1e3 <= slo.tpot_ms
    }
}

/// Runs `requests` (arriving at `arrivals`, non-decreasing) through the
/// cluster until every one has finished; outcomes in request order.
///
/// # Panics
/// If the topology has no worker to place a request on, or the two slices differ in length.
pub fn simulate(
    cost: &CostProfile,
    topology: Topology,
    limits: EngineLimits,
    requests: &[TraceRequest],
    arrivals: &[f64],
) -> Vec<Outcome> {
    assert_eq!(requests.len(), arrivals.len(), "one arrival per request");
    let (prefill, decode) = topology.counts();
    assert!(decode > 0, "a cluster needs a decode (or colocated) worker");
    let mut sim = Sim {
        cost,
        prefill,
        requests,
        workers: (0..prefill + decode).map(|_| Worker::new(limits)).collect(),
        outcomes: arrivals
            .iter()
            .zip(requests)
            .map(|(&arrival, r)| Outcome { arrival, first_token: f64::NAN, finish: f64::NAN, output: r.output })
            .collect(),
        events: Events::default(),
        outputs: Vec::new(),
    };
    for (req, &at) in arrivals.iter().enumerate() {
        sim.events.push(at, Event::Arrival { req });
    }
    while let Some((now, event)) = sim.events.pop() {
        match event {
            Event::Arrival { req } => sim.arrive(now, req),
            Event::StepDone { worker } => sim.step_done(now, worker),
            Event::HandoffDone { req, worker } => {
                let r = requests[req];
                sim.workers[worker].incoming -= 1;
                sim.workers[worker].enqueue(Seq::handed_off(req, r.input, r.output));
                sim.kick(now, worker);
            }
        }
    }
    sim.outcomes
}

/// The state of one run. Workers `0..prefill` are prefill workers, the rest
/// decode (or colocated) workers.
struct Sim<'a> {
    cost: &'a CostProfile,
    prefill: usize,
    requests: &'a [TraceRequest],
    workers: Vec<Worker>,
    outcomes: Vec<Outcome>,
    events: Events,
    /// Reused across steps.
    outputs: Vec<Output>,
}

impl Sim<'_> {
    fn arrive(&mut self, now: f64, req: usize) {
        let r = self.requests[req];
        let (worker, seq) = if self.prefill > 0 {
            // The prefill worker generates the first token only.
            (least_loaded(&self.workers[..self.prefill]), Seq::fresh(req, r.input, 1))
        } else {
            (least_loaded(&self.workers), Seq::fresh(req, r.input, r.output))
        };
        self.workers[worker].enqueue(seq);
        self.kick(now, worker);
    }

    fn step_done(&mut self, now: f64, worker: usize) {
        self.workers[worker].busy = false;
        let mut outputs = std::mem::take(&mut self.outputs);
        self.workers[worker].finish_step(&mut outputs);
        let on_prefill = worker < self.prefill;
        for &out in &outputs {
            match out {
                Output::FirstToken(req) => {
                    self.outcomes[req].first_token = now;
                    let r = self.requests[req];
                    if on_prefill && r.output > 1 {
                        let to = self.prefill + least_loaded(&self.workers[self.prefill..]);
                        self.workers[to].incoming += 1;
                        let at = now + self.cost.handoff.secs(u64::from(r.input));
                        self.events.push(at, Event::HandoffDone { req, worker: to });
                    }
                }
                Output::Finished(req) => {
                    // A prefill worker's sequence "finishes" at the first token;
                    // the request is done there only if that was its last.
                    if !on_prefill || self.requests[req].output <= 1 {
                        self.outcomes[req].finish = now;
                    }
                }
            }
        }
        outputs.clear();
        self.outputs = outputs;
        self.kick(now, worker);
    }

    /// Starts a step on `worker` if it is idle and has work.
    fn kick(&mut self, now: f64, worker: usize) {
        let w = &mut self.workers[worker];
        if w.busy {
            return;
        }
        let load = w.schedule();
        if load.is_empty() {
            return;
        }
        w.busy = true;
        self.events.push(now + self.cost.step_secs(&load), Event::StepDone { worker });
    }
}

/// Index (within `workers`) of the one with the least load; ties go to the first.
fn least_loaded(workers: &[Worker]) -> usize {
    workers.iter().enumerate().min_by_key(|(i, w)| (w.load(), *i)).map(|(i, _)| i).expect("at least one worker")
}

#[cfg(test)]
mod tests;

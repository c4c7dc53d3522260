//! The recommendation: for a budget of N workers, the goodput of every
//! prefill:decode split (and of colocated serving), and the best of them.

use crate::goodput::{Goodput, Scenario};
use crate::sim::Topology;
use serde::Serialize;
use std::fmt;

/// Goodput of every split of `workers`, best first in [`Plan::best`].
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub workers: usize,
    /// Colocated first, then 1P:(N-1)D up to (N-1)P:1D.
    pub splits: Vec<Goodput>,
    /// Index into `splits` of the highest goodput (the first on a tie);
    /// `None` when no split meets the SLOs at any rate.
    pub best: Option<usize>,
    /// `P:D` of the best split (`"0:N"` for colocated), for scripts.
    pub best_ratio: Option<String>,
}

/// The topologies a budget of `workers` allows: colocated, then every P:D.
pub fn candidates(workers: usize) -> Vec<Topology> {
    let mut all = vec![Topology::new(0, workers)];
    all.extend((1..workers).map(|p| Topology::new(p, workers - p)));
    all
}

/// Searches the goodput of every candidate, one thread each: the searches
/// share nothing but the read-only scenario.
pub fn plan(scenario: &Scenario<'_>, workers: usize) -> Plan {
    let splits: Vec<Goodput> = std::thread::scope(|s| {
        let handles: Vec<_> = candidates(workers).into_iter().map(|t| s.spawn(move || scenario.goodput(t))).collect();
        handles.into_iter().map(|h| h.join().expect("a goodput search panicked")).collect()
    });
    let best = splits
        .iter()
        .enumerate()
        .filter(|(_, g)| g.rate > 0.0)
        .fold(None::<(usize, f64)>, |best, (i, g)| match best {
            Some((_, rate)) if rate >= g.rate => best,
            _ => Some((i, g.rate)),
        })
        .map(|(i, _)| i);
    let best_ratio = best.map(|i| {
        let (p, d) = splits[i].topology.counts();
        format!("{p}:{d}")
    });
    Plan { workers, splits, best, best_ratio }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<14} {:>3} {:>3} {:>11} {:>10} {:>7} {:>7} {:>9} {:>9}",
            "split", "P", "D", "goodput/s", "per worker", "TTFT ok", "TPOT ok", "TTFT p90", "TPOT p90"
        )?;
        for (i, g) in self.splits.iter().enumerate() {
            let (p, d) = g.topology.counts();
            let mark = if Some(i) == self.best { "  <- best" } else { "" };
            writeln!(
                f,
                "{:<14} {:>3} {:>3} {:>11.3} {:>10.3} {:>6.1}% {:>6.1}% {:>7.0}ms {:>7.1}ms{mark}",
                g.topology.label(),
                p,
                d,
                g.rate,
                g.per_worker,
                g.at.ttft_attainment * 100.0,
                g.at.tpot_attainment * 100.0,
                g.at.ttft_p90_ms,
                g.at.tpot_p90_ms,
            )?;
        }
        match self.best {
            Some(i) => {
                let g = &self.splits[i];
                write!(
                    f,
                    "best of {} workers: {} (P:D = {}), goodput {:.3} req/s, {:.3} req/s per worker",
                    self.workers,
                    g.topology.label(),
                    self.best_ratio.as_deref().unwrap_or("?"),
                    g.rate,
                    g.per_worker
                )
            }
            None => write!(f, "no split of {} workers meets the SLOs even when idle", self.workers),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::tests::profile;
    use crate::sim::EngineLimits;
    use crate::workload::tests::workload;
    use crate::workload::{LengthDist, Workload};

    fn best_prefill(w: &Workload, workers: usize) -> (usize, Plan) {
        // A hand-off at 100 MB/s: 10 µs per token, not the hand-timed tests' 1 ms.
        let mut cost = profile();
        cost.handoff.bandwidth_bytes_per_s = 1e8;
        let trace = w.trace();
        let scenario = Scenario { cost: &cost, limits: EngineLimits::default(), workload: w, trace: &trace };
        let plan = plan(&scenario, workers);
        let best = plan.best.expect("some split meets the SLOs");
        (plan.splits[best].topology.counts().0, plan)
    }

    #[test]
    fn lists_colocated_then_every_split() {
        let labels: Vec<String> = candidates(3).iter().map(Topology::label).collect();
        assert_eq!(labels, ["colocated x3", "1P:2D", "2P:1D"]);
    }

    #[test]
    fn prefill_heavy_wants_more_prefill_workers_than_decode_heavy() {
        // Long prompts, short answers: prefill is the bottleneck, and a TPOT
        // objective that a decode step sharing its batch with a prefill misses.
        let prefill_heavy =
            workload(LengthDist::Uniform { min: 400, max: 600 }, LengthDist::Fixed { tokens: 8 }, 1500.0, 100.0);
        // Short prompts, long answers under a tight TPOT: decode batches must stay small.
        let decode_heavy =
            workload(LengthDist::Uniform { min: 20, max: 40 }, LengthDist::Uniform { min: 100, max: 200 }, 500.0, 30.0);
        let (p_heavy, plan_p) = best_prefill(&prefill_heavy, 5);
        let (p_light, plan_d) = best_prefill(&decode_heavy, 5);
        assert!(p_heavy > p_light, "prefill-heavy best P {p_heavy}, decode-heavy best P {p_light}\n{plan_p}\n{plan_d}");
        assert!(p_heavy >= 3, "{plan_p}");
        assert!(p_light <= 1, "{plan_d}");
    }

    #[test]
    fn table_and_json_name_the_best() {
        let w = workload(LengthDist::Fixed { tokens: 200 }, LengthDist::Fixed { tokens: 20 }, 800.0, 80.0);
        let (_, plan) = best_prefill(&w, 2);
        let text = plan.to_string();
        assert_eq!(text.lines().count(), 1 + 2 + 1, "{text}");
        assert!(text.contains("<- best") && text.contains("best of 2 workers"), "{text}");
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(json["splits"].as_array().unwrap().len(), 2);
        assert_eq!(json["best_ratio"].as_str(), plan.best_ratio.as_deref());
    }
}

//! SLO attainment at one rate, and goodput: DistServe's highest request rate
//! at which at least the target share (90%) of requests meets both SLOs.

use crate::cost::CostProfile;
use crate::sim::{simulate, EngineLimits, Topology};
use crate::workload::{Trace, Workload};
use serde::Serialize;

/// Rates beyond this are not searched (requests per second).
const MAX_RATE: f64 = 1e7;
/// A rate low enough that requests never meet: the cluster's latency unloaded.
const IDLE_RATE: f64 = 1e-6;
/// The bisection stops when the bracket is this narrow, relative to its top.
const REL_TOLERANCE: f64 = 0.005;

/// What happened at one arrival rate, over the measured requests.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RatePoint {
    /// Requests per second.
    pub rate: f64,
    /// Share of measured requests that met both SLOs.
    pub attainment: f64,
    /// Shares that met each SLO on its own (which one binds).
    pub ttft_attainment: f64,
    pub tpot_attainment: f64,
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    pub tpot_p50_ms: f64,
    pub tpot_p90_ms: f64,
}

/// The inputs every simulation of one search shares.
#[derive(Clone, Copy)]
pub struct Scenario<'a> {
    pub cost: &'a CostProfile,
    pub limits: EngineLimits,
    pub workload: &'a Workload,
    pub trace: &'a Trace,
}

/// The goodput of one topology.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Goodput {
    pub topology: Topology,
    /// Requests per second; 0 when even an idle cluster misses the target.
    pub rate: f64,
    /// `rate` over the number of workers.
    pub per_worker: f64,
    /// The cluster at `rate` (or nearly idle, when `rate` is 0).
    pub at: RatePoint,
}

impl Scenario<'_> {
    /// Simulates the trace at `rate` on `topology`.
    pub fn evaluate(&self, topology: Topology, rate: f64) -> RatePoint {
        let outcomes = simulate(self.cost, topology, self.limits, &self.trace.requests, &self.trace.arrivals(rate));
        let measured = &outcomes[self.workload.measured()];
        let slo = &self.workload.slo;
        let n = measured.len().max(1) as f64;
        let share = |ok: &dyn Fn(&crate::sim::Outcome) -> bool| measured.iter().filter(|o| ok(o)).count() as f64 / n;
        let mut ttft: Vec<f64> = measured.iter().map(|o| o.ttft() * 1e3).collect();
        let mut tpot: Vec<f64> = measured.iter().map(|o| o.tpot() * 1e3).collect();
        RatePoint {
            rate,
            attainment: share(&|o| o.meets(slo)),
            ttft_attainment: share(&|o| o.ttft() * 1e3 <= slo.ttft_ms),
            tpot_attainment: share(&|o| o.tpot() * 1e3 <= slo.tpot_ms),
            ttft_p50_ms: percentile(&mut ttft, 0.5),
            ttft_p90_ms: percentile(&mut ttft, 0.9),
            tpot_p50_ms: percentile(&mut tpot, 0.5),
            tpot_p90_ms: percentile(&mut tpot, 0.9),
        }
    }

    /// Binary-searches the highest rate whose attainment reaches the
    /// workload's target. The same trace at every rate keeps the search
    /// stable (see [`crate::workload`]).
    pub fn goodput(&self, topology: Topology) -> Goodput {
        let target = self.workload.attainment;
        let passes = |p: &RatePoint| p.attainment >= target;
        let workers = topology.workers() as f64;
        let idle = self.evaluate(topology, IDLE_RATE);
        if !passes(&idle) {
            return Goodput { topology, rate: 0.0, per_worker: 0.0, at: idle };
        }
        // Bracket [lo passes, hi fails], from 1 req/s per worker by doubling or halving.
        let mut lo = idle;
        let mut hi = None;
        let mut probe = workers;
        loop {
            let point = self.evaluate(topology, probe);
            if passes(&point) {
                lo = point;
                if hi.is_some() || probe >= MAX_RATE {
                    break;
                }
                probe *= 2.0;
            } else {
                hi = Some(point.rate);
                if lo.rate > IDLE_RATE || probe / 2.0 <= IDLE_RATE {
                    break;
                }
                probe /= 2.0;
            }
        }
        if let Some(mut hi) = hi {
            while hi - lo.rate > REL_TOLERANCE * hi {
                let mid = (lo.rate + hi) / 2.0;
                let point = self.evaluate(topology, mid);
                if passes(&point) {
                    lo = point;
                } else {
                    hi = mid;
                }
            }
        }
        Goodput { topology, rate: lo.rate, per_worker: lo.rate / workers, at: lo }
    }
}

/// Nearest-rank percentile (`q` in (0, 1]); NaN for no values.
fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::tests::profile;
    use crate::workload::tests::workload;
    use crate::workload::LengthDist;

    fn scenario_parts() -> (CostProfile, Workload) {
        // Alone: TTFT 10 + 200 ms, TPOT (5 + 200 + 31·21) / 31 ≈ 27.6 ms.
        let w =
            workload(LengthDist::Uniform { min: 100, max: 300 }, LengthDist::Uniform { min: 16, max: 48 }, 500.0, 60.0);
        (profile(), w)
    }

    #[test]
    fn attainment_is_full_when_idle_and_nil_when_swamped() {
        let (cost, w) = scenario_parts();
        let trace = w.trace();
        let s = Scenario { cost: &cost, limits: EngineLimits::default(), workload: &w, trace: &trace };
        let idle = s.evaluate(Topology::new(1, 1), 1e-4);
        assert_eq!(idle.attainment, 1.0, "{idle:?}");
        // 10,000 req/s against a prefill worker that does ~5 a second.
        let swamped = s.evaluate(Topology::new(1, 1), 1e4);
        assert!(swamped.attainment < 0.02, "{swamped:?}");
        assert!(swamped.ttft_attainment < 0.02, "TTFT is what breaks: {swamped:?}");
    }

    #[test]
    fn attainment_falls_with_rate_and_goodput_sits_on_the_edge() {
        let (cost, w) = scenario_parts();
        let trace = w.trace();
        let s = Scenario { cost: &cost, limits: EngineLimits::default(), workload: &w, trace: &trace };
        let topology = Topology::new(1, 1);
        let g = s.goodput(topology);
        assert!(g.rate > 0.5 && g.rate < 20.0, "{g:?}");
        assert!(g.at.attainment >= 0.9, "{g:?}");
        // Just above the goodput the target is missed.
        assert!(s.evaluate(topology, g.rate * (1.0 + 2.0 * REL_TOLERANCE)).attainment < 0.9);
        let mut last = 1.0;
        for k in 1..=12 {
            let a = s.evaluate(topology, g.rate * 0.25 * f64::from(k)).attainment;
            assert!(a <= last + 0.01, "attainment rose from {last} to {a} at step {k}");
            last = a;
        }
        assert!(last < 0.9);
    }

    #[test]
    fn more_workers_or_looser_slos_never_lower_goodput() {
        let (cost, w) = scenario_parts();
        let trace = w.trace();
        let s = Scenario { cost: &cost, limits: EngineLimits::default(), workload: &w, trace: &trace };
        let base = s.goodput(Topology::new(1, 1)).rate;
        let more_prefill = s.goodput(Topology::new(2, 1)).rate;
        let more_both = s.goodput(Topology::new(2, 2)).rate;
        assert!(more_prefill > base * 1.2, "{base} -> {more_prefill}");
        assert!(more_both >= more_prefill, "{more_prefill} -> {more_both}");
        let mut loose = w.clone();
        loose.slo.ttft_ms *= 2.0;
        let s = Scenario { workload: &loose, ..s };
        let looser = s.goodput(Topology::new(1, 1)).rate;
        assert!(looser > base, "{base} -> {looser}");
    }

    #[test]
    fn unreachable_slo_is_zero_goodput() {
        let (cost, mut w) = scenario_parts();
        // Every prompt takes at least 110 ms to prefill.
        w.slo.ttft_ms = 100.0;
        let trace = w.trace();
        let s = Scenario { cost: &cost, limits: EngineLimits::default(), workload: &w, trace: &trace };
        let g = s.goodput(Topology::new(3, 1));
        assert_eq!((g.rate, g.per_worker), (0.0, 0.0));
        assert_eq!(g.at.ttft_attainment, 0.0);
    }

    #[test]
    fn same_seed_same_goodput() {
        let (cost, w) = scenario_parts();
        let run = |w: &Workload| {
            let trace = w.trace();
            Scenario { cost: &cost, limits: EngineLimits::default(), workload: w, trace: &trace }
                .goodput(Topology::new(1, 2))
        };
        let a = run(&w);
        assert_eq!(a, run(&w));
        let other = Workload { seed: w.seed + 1, ..w.clone() };
        assert_ne!(a.at, run(&other).at);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let mut v = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(percentile(&mut v, 0.5), 3.0);
        assert_eq!(percentile(&mut v, 0.9), 5.0);
        assert_eq!(percentile(&mut v, 0.2), 1.0);
        assert!(percentile(&mut [], 0.5).is_nan());
    }
}

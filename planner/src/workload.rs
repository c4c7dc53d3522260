//! What the cluster is asked to serve: arrivals, prompt and answer lengths,
//! and the SLOs each request is judged by.
//!
//! A [`Workload`] draws one [`Trace`] from its seed: the lengths, and the
//! arrival gaps at rate 1. [`Trace::arrivals`] scales the gaps to any rate, so
//! every rate the goodput search tries sees the same requests in the same
//! order (common random numbers): attainment then falls smoothly with rate
//! instead of jumping with each new draw, and a binary search over it is
//! meaningful.

use crate::error::{parse_json, read, PlanError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How requests arrive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrival {
    /// Exponential gaps with mean `1 / rate` (a Poisson process).
    #[default]
    Poisson,
    /// Exactly `1 / rate` apart.
    Fixed,
}

/// A distribution of token counts (prompt or answer length).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LengthDist {
    Fixed {
        tokens: u32,
    },
    /// Uniform over `min..=max`.
    Uniform {
        min: u32,
        max: u32,
    },
    /// Normal, rounded and clipped to `min..=max`.
    Normal {
        mean: f64,
        std: f64,
        min: u32,
        max: u32,
    },
    /// Drawn uniformly from these values (a measured length histogram).
    Empirical {
        values: Vec<u32>,
    },
    /// Like `Empirical`, the values read from a file (numbers separated by
    /// whitespace or commas, or a JSON array); resolved by [`Workload::load`].
    File {
        path: PathBuf,
    },
}

/// The two latency objectives a request must both meet to count as good.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    /// Arrival to first token, milliseconds.
    pub ttft_ms: f64,
    /// Mean time per output token after the first, milliseconds.
    pub tpot_ms: f64,
}

/// A workload description (`--workload FILE`, JSON; flags override fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    #[serde(default)]
    pub arrival: Arrival,
    pub input: LengthDist,
    pub output: LengthDist,
    pub slo: Slo,
    /// Requests simulated per rate tried.
    #[serde(default = "default_requests")]
    pub requests: usize,
    /// Share of requests left out of attainment at each end of the run: the
    /// head while the cluster fills up, the tail while it drains.
    #[serde(default = "default_warmup")]
    pub warmup_fraction: f64,
    /// Share of requests that must meet both SLOs (DistServe: 0.9).
    #[serde(default = "default_attainment")]
    pub attainment: f64,
    #[serde(default)]
    pub seed: u64,
}

fn default_requests() -> usize {
    2000
}
fn default_warmup() -> f64 {
    0.1
}
fn default_attainment() -> f64 {
    0.9
}

/// One request of a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceRequest {
    pub input: u32,
    /// Tokens generated, the first included (at least 1).
    pub output: u32,
}

/// The requests of one seed, arrival times still at rate 1.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub requests: Vec<TraceRequest>,
    /// Arrival times at rate 1 req/s, non-decreasing.
    unit_arrivals: Vec<f64>,
}

impl Trace {
    /// Arrival times (seconds) at `rate` requests per second.
    pub fn arrivals(&self, rate: f64) -> Vec<f64> {
        self.unit_arrivals.iter().map(|t| t / rate).collect()
    }
}

impl LengthDist {
    /// Parses a command-line spec: `fixed:N`, `uniform:MIN,MAX`,
    /// `normal:MEAN,STD[,MIN,MAX]` or `file:PATH`.
    pub fn parse(spec: &str) -> Result<Self, PlanError> {
        let bad = |reason: &str| PlanError::BadSpec { spec: spec.to_string(), reason: reason.to_string() };
        let (kind, rest) = spec.split_once(':').ok_or_else(|| bad("no ':'"))?;
        if kind == "file" {
            return Ok(Self::File { path: PathBuf::from(rest) });
        }
        let nums: Vec<f64> = rest
            .split(',')
            .map(|s| s.trim().parse::<f64>().map_err(|e| bad(&format!("{s:?}: {e}"))))
            .collect::<Result<_, _>>()?;
        let dist = match (kind, nums.as_slice()) {
            ("fixed", [n]) => Self::Fixed { tokens: *n as u32 },
            ("uniform", [a, b]) => Self::Uniform { min: *a as u32, max: *b as u32 },
            ("normal", [mean, std]) => {
                // Clip at 1 and mean + 4σ unless told: covers all but ~1 in 30,000.
                Self::Normal { mean: *mean, std: *std, min: 1, max: (mean + 4.0 * std).max(1.0) as u32 }
            }
            ("normal", [mean, std, a, b]) => Self::Normal { mean: *mean, std: *std, min: *a as u32, max: *b as u32 },
            _ => return Err(bad("unknown kind or wrong number of values")),
        };
        dist.validate("length")?;
        Ok(dist)
    }

    /// Reads a `File` into `Empirical` (relative paths from `base`).
    fn resolve(&mut self, base: &Path) -> Result<(), PlanError> {
        if let Self::File { path } = self {
            let path = base.join(path);
            let text = read(&path)?;
            let values: Vec<u32> = if text.trim_start().starts_with('[') {
                parse_json(&path, &text)?
            } else {
                text.split(|c: char| c.is_whitespace() || c == ',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse::<u32>().map_err(|_| PlanError::invalid(path.display().to_string(), "numbers", s)))
                    .collect::<Result<_, _>>()?
            };
            *self = Self::Empirical { values };
        }
        Ok(())
    }

    fn validate(&self, field: &str) -> Result<(), PlanError> {
        match self {
            Self::Fixed { tokens } if *tokens == 0 => Err(PlanError::invalid(field, "at least 1 token", 0)),
            Self::Uniform { min, max } | Self::Normal { min, max, .. } if *min == 0 || min > max => {
                Err(PlanError::invalid(field, "a range 1 <= min <= max", format!("{min}..={max}")))
            }
            Self::Normal { mean, std, .. } if !(mean.is_finite() && std.is_finite() && *std >= 0.0) => {
                Err(PlanError::invalid(field, "a finite mean and std >= 0", format!("{mean}, {std}")))
            }
            Self::Empirical { values } if values.is_empty() || values.contains(&0) => {
                Err(PlanError::invalid(field, "a non-empty list of lengths >= 1", format!("{values:?}")))
            }
            _ => Ok(()),
        }
    }

    /// One draw.
    fn sample(&self, rng: &mut ChaCha8Rng) -> u32 {
        match self {
            Self::Fixed { tokens } => *tokens,
            Self::Uniform { min, max } => rng.random_range(*min..=*max),
            Self::Normal { mean, std, min, max } => {
                // Box–Muller: rand_distr is not worth a dependency for one formula.
                let u1: f64 = 1.0 - rng.random::<f64>();
                let u2: f64 = rng.random();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                (mean + std * z).round().clamp(*min as f64, *max as f64) as u32
            }
            Self::Empirical { values } => values[rng.random_range(0..values.len())],
            Self::File { .. } => unreachable!("files are resolved when the workload is loaded"),
        }
    }

    /// The mean of the distribution (exact, or of the clipped normal's centre).
    pub fn mean(&self) -> f64 {
        match self {
            Self::Fixed { tokens } => *tokens as f64,
            Self::Uniform { min, max } => (*min as f64 + *max as f64) / 2.0,
            Self::Normal { mean, min, max, .. } => mean.clamp(*min as f64, *max as f64),
            Self::Empirical { values } => values.iter().map(|&v| v as f64).sum::<f64>() / values.len().max(1) as f64,
            Self::File { .. } => f64::NAN,
        }
    }
}

impl Workload {
    /// Reads a JSON workload and resolves its length files relative to it.
    pub fn load(path: &Path) -> Result<Self, PlanError> {
        let mut workload: Self = parse_json(path, &read(path)?)?;
        workload.resolve_files(path.parent().unwrap_or(Path::new(".")))?;
        workload.validate()?;
        Ok(workload)
    }

    /// Turns `File` lengths into `Empirical` ones (relative paths from `base`).
    pub fn resolve_files(&mut self, base: &Path) -> Result<(), PlanError> {
        self.input.resolve(base)?;
        self.output.resolve(base)
    }

    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), PlanError> {
        self.input.validate("input")?;
        self.output.validate("output")?;
        for (field, v) in [("slo.ttft_ms", self.slo.ttft_ms), ("slo.tpot_ms", self.slo.tpot_ms)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(PlanError::invalid(field, "finite and > 0", v));
            }
        }
        if self.requests < 10 {
            return Err(PlanError::invalid("requests", "at least 10", self.requests));
        }
        if !(0.0..0.5).contains(&self.warmup_fraction) {
            return Err(PlanError::invalid("warmup_fraction", "in [0, 0.5)", self.warmup_fraction));
        }
        if !(self.attainment > 0.0 && self.attainment <= 1.0) {
            return Err(PlanError::invalid("attainment", "in (0, 1]", self.attainment));
        }
        Ok(())
    }

    /// Draws the trace of this seed.
    pub fn trace(&self) -> Trace {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        let mut requests = Vec::with_capacity(self.requests);
        let mut unit_arrivals = Vec::with_capacity(self.requests);
        let mut t = 0.0;
        for _ in 0..self.requests {
            // Each request draws its gap and lengths in a fixed order, so a
            // change of distribution does not shift the arrival times.
            let gap = match self.arrival {
                Arrival::Poisson => -(1.0 - rng.random::<f64>()).ln(),
                Arrival::Fixed => 1.0,
            };
            t += gap;
            unit_arrivals.push(t);
            let input = self.input.sample(&mut rng);
            let output = self.output.sample(&mut rng);
            requests.push(TraceRequest { input, output });
        }
        Trace { requests, unit_arrivals }
    }

    /// Indices of the requests that count: the warm-up head and the
    /// drain tail left out.
    pub fn measured(&self) -> std::ops::Range<usize> {
        let skip = (self.requests as f64 * self.warmup_fraction).floor() as usize;
        skip..self.requests - skip
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn workload(input: LengthDist, output: LengthDist, ttft_ms: f64, tpot_ms: f64) -> Workload {
        Workload {
            arrival: Arrival::Poisson,
            input,
            output,
            slo: Slo { ttft_ms, tpot_ms },
            requests: 600,
            warmup_fraction: 0.1,
            attainment: 0.9,
            seed: 7,
        }
    }

    #[test]
    fn same_seed_same_trace_other_seed_other_trace() {
        let mut w = workload(LengthDist::Uniform { min: 10, max: 500 }, LengthDist::Fixed { tokens: 8 }, 1.0, 1.0);
        let a = w.trace();
        assert_eq!(a, w.trace());
        w.seed = 8;
        assert_ne!(a, w.trace());
    }

    #[test]
    fn arrivals_scale_with_rate() {
        let mut w = workload(LengthDist::Fixed { tokens: 4 }, LengthDist::Fixed { tokens: 4 }, 1.0, 1.0);
        w.requests = 20_000;
        let trace = w.trace();
        let at2 = trace.arrivals(2.0);
        // Poisson at 2 req/s: mean gap 0.5 s (20,000 draws: within 3%).
        let mean_gap = at2.last().unwrap() / at2.len() as f64;
        assert!((mean_gap - 0.5).abs() < 0.015, "{mean_gap}");
        // Exponential gaps: the standard deviation equals the mean.
        let gaps: Vec<f64> = at2.windows(2).map(|w| w[1] - w[0]).collect();
        let var = gaps.iter().map(|g| (g - mean_gap).powi(2)).sum::<f64>() / gaps.len() as f64;
        assert!((var.sqrt() - 0.5).abs() < 0.025, "std {}", var.sqrt());
        let at4 = trace.arrivals(4.0);
        assert!((at4[100] * 2.0 - at2[100]).abs() < 1e-12);
        w.arrival = Arrival::Fixed;
        assert_eq!(w.trace().arrivals(4.0)[..3], [0.25, 0.5, 0.75]);
    }

    #[test]
    fn lengths_stay_in_their_ranges() {
        let mut w = workload(
            LengthDist::Normal { mean: 100.0, std: 80.0, min: 20, max: 150 },
            LengthDist::Empirical { values: vec![3, 9] },
            1.0,
            1.0,
        );
        w.requests = 5000;
        let trace = w.trace();
        assert!(trace.requests.iter().all(|r| (20..=150).contains(&r.input)));
        assert!(trace.requests.iter().all(|r| r.output == 3 || r.output == 9));
        // Clipping piles draws up at both ends.
        assert!(trace.requests.iter().any(|r| r.input == 20) && trace.requests.iter().any(|r| r.input == 150));
        let mean = trace.requests.iter().map(|r| r.input as f64).sum::<f64>() / 5000.0;
        assert!((80.0..100.0).contains(&mean), "{mean}");
    }

    #[test]
    fn parses_specs_and_rejects_bad_ones() {
        assert_eq!(LengthDist::parse("fixed:128").unwrap(), LengthDist::Fixed { tokens: 128 });
        assert_eq!(LengthDist::parse("uniform:1,9").unwrap(), LengthDist::Uniform { min: 1, max: 9 });
        assert_eq!(
            LengthDist::parse("normal:100,10").unwrap(),
            LengthDist::Normal { mean: 100.0, std: 10.0, min: 1, max: 140 }
        );
        assert!(LengthDist::parse("uniform:9,1").is_err());
        assert!(LengthDist::parse("fixed:0").is_err());
        assert!(LengthDist::parse("zipf:1").is_err());
        assert!(LengthDist::parse("128").is_err());
    }

    #[test]
    fn loads_json_with_a_length_file() {
        let dir = std::env::temp_dir().join(format!("planner-wl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("lens.txt"), "5 7,9\n").unwrap();
        let json = r#"{"input": {"kind": "file", "path": "lens.txt"}, "output": {"kind": "fixed", "tokens": 4},
                       "slo": {"ttft_ms": 100, "tpot_ms": 50}, "requests": 100}"#;
        std::fs::write(dir.join("w.json"), json).unwrap();
        let w = Workload::load(&dir.join("w.json")).unwrap();
        assert_eq!(w.input, LengthDist::Empirical { values: vec![5, 7, 9] });
        assert_eq!((w.requests, w.attainment, w.arrival), (100, 0.9, Arrival::Poisson));
        assert_eq!(w.measured(), 10..90);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

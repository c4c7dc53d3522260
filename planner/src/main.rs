//! `pdserve-plan`: recommends the prefill:decode worker split with the
//! highest goodput for a workload, from a measured cost profile.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use planner::{Arrival, CostProfile, EngineLimits, LengthDist, Scenario, Slo, Topology, Workload};
use std::path::{Path, PathBuf};

#[derive(Debug, Parser)]
#[command(name = "pdserve-plan", about = "Capacity planner: simulate the cluster and pick the prefill:decode split")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Goodput of every split of --workers (and colocated), and the best.
    Plan {
        #[command(flatten)]
        common: Common,
        /// Workers in all (prefill + decode).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
        workers: u32,
    },
    /// Attainment and latencies of one split at one rate (or its goodput).
    Simulate {
        #[command(flatten)]
        common: Common,
        /// Prefill workers; 0 is colocated serving over the decode workers.
        #[arg(long, default_value_t = 1)]
        prefill: u32,
        /// Decode workers (or colocated workers with --prefill 0).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        decode: u32,
        /// Requests per second; without it, search the goodput.
        #[arg(long)]
        rate: Option<f64>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ArrivalArg {
    Poisson,
    Fixed,
}

#[derive(Debug, Args)]
struct Common {
    /// Cost profile JSON (from `pdserve-plan-measure`).
    #[arg(long)]
    profile: PathBuf,
    /// Workload JSON; the flags below override its fields.
    #[arg(long)]
    workload: Option<PathBuf>,
    /// Prompt lengths: fixed:N, uniform:MIN,MAX, normal:MEAN,STD[,MIN,MAX] or file:PATH.
    #[arg(long)]
    input: Option<String>,
    /// Generated lengths (the first token included), same forms as --input.
    #[arg(long)]
    output: Option<String>,
    /// TTFT objective, milliseconds.
    #[arg(long)]
    ttft_slo_ms: Option<f64>,
    /// TPOT objective (mean time per output token after the first), milliseconds.
    #[arg(long)]
    tpot_slo_ms: Option<f64>,
    #[arg(long, value_enum)]
    arrival: Option<ArrivalArg>,
    /// Requests simulated per rate tried (default 2000).
    #[arg(long)]
    requests: Option<usize>,
    /// Share of requests that must meet both SLOs (default 0.9).
    #[arg(long)]
    attainment: Option<f64>,
    /// Share left out of attainment at each end of a run (default 0.1).
    #[arg(long)]
    warmup_fraction: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Each worker's --max-num-seqs.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Each worker's --max-num-batched-tokens.
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl Common {
    fn workload(&self) -> anyhow::Result<Workload> {
        let mut w = match &self.workload {
            Some(path) => Workload::load(path)?,
            None => {
                let (Some(_), Some(_), Some(ttft_ms), Some(tpot_ms)) =
                    (&self.input, &self.output, self.ttft_slo_ms, self.tpot_slo_ms)
                else {
                    bail!("without --workload, give --input, --output, --ttft-slo-ms and --tpot-slo-ms");
                };
                Workload {
                    arrival: Arrival::Poisson,
                    input: LengthDist::Fixed { tokens: 1 },
                    output: LengthDist::Fixed { tokens: 1 },
                    slo: Slo { ttft_ms, tpot_ms },
                    requests: 2000,
                    warmup_fraction: 0.1,
                    attainment: 0.9,
                    seed: 0,
                }
            }
        };
        if let Some(spec) = &self.input {
            w.input = LengthDist::parse(spec)?;
        }
        if let Some(spec) = &self.output {
            w.output = LengthDist::parse(spec)?;
        }
        w.slo.ttft_ms = self.ttft_slo_ms.unwrap_or(w.slo.ttft_ms);
        w.slo.tpot_ms = self.tpot_slo_ms.unwrap_or(w.slo.tpot_ms);
        if let Some(a) = self.arrival {
            w.arrival = match a {
                ArrivalArg::Poisson => Arrival::Poisson,
                ArrivalArg::Fixed => Arrival::Fixed,
            };
        }
        w.requests = self.requests.unwrap_or(w.requests);
        w.attainment = self.attainment.unwrap_or(w.attainment);
        w.warmup_fraction = self.warmup_fraction.unwrap_or(w.warmup_fraction);
        w.seed = self.seed.unwrap_or(w.seed);
        // Spec files on the command line are relative to the working directory.
        w.resolve_files(Path::new("."))?;
        w.validate()?;
        Ok(w)
    }

    fn limits(&self) -> anyhow::Result<EngineLimits> {
        if self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 {
            bail!("--max-num-seqs and --max-num-batched-tokens must be at least 1");
        }
        Ok(EngineLimits { max_num_seqs: self.max_num_seqs, max_num_batched_tokens: self.max_num_batched_tokens })
    }
}

/// One line on what is being planned, above the table.
fn describe(w: &Workload, limits: &EngineLimits) -> String {
    format!(
        "workload: {:?} arrivals, input {}, output {}; SLO TTFT {} ms, TPOT {} ms at {:.0}% attainment; \
         {} requests (seed {}); engine max_num_seqs {}, max_num_batched_tokens {}",
        w.arrival,
        dist(&w.input),
        dist(&w.output),
        w.slo.ttft_ms,
        w.slo.tpot_ms,
        w.attainment * 100.0,
        w.requests,
        w.seed,
        limits.max_num_seqs,
        limits.max_num_batched_tokens
    )
}

fn dist(d: &LengthDist) -> String {
    match d {
        LengthDist::Fixed { tokens } => format!("{tokens}"),
        LengthDist::Uniform { min, max } => format!("uniform {min}..={max}"),
        LengthDist::Normal { mean, std, min, max } => format!("normal({mean}, {std}) in {min}..={max}"),
        LengthDist::Empirical { values } => format!("empirical ({} values, mean {:.0})", values.len(), d.mean()),
        LengthDist::File { path } => path.display().to_string(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let common = match &cli.command {
        Command::Plan { common, .. } | Command::Simulate { common, .. } => common,
    };
    let cost = CostProfile::load(&common.profile)
        .with_context(|| format!("loading the cost profile {}", common.profile.display()))?;
    let workload = common.workload()?;
    let limits = common.limits()?;
    let trace = workload.trace();
    let scenario = Scenario { cost: &cost, limits, workload: &workload, trace: &trace };
    match cli.command {
        Command::Plan { workers, .. } => {
            let plan = planner::plan(&scenario, workers as usize);
            if common.json {
                let out = serde_json::json!({ "workload": workload, "limits": limits, "plan": plan });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("{}", describe(&workload, &limits));
                println!("{plan}");
            }
        }
        Command::Simulate { prefill, decode, rate, .. } => {
            let topology = Topology::new(prefill as usize, decode as usize);
            let (point, goodput) = match rate {
                Some(rate) if rate.is_finite() && rate > 0.0 => (scenario.evaluate(topology, rate), None),
                Some(rate) => bail!("--rate must be > 0, got {rate}"),
                None => {
                    let g = scenario.goodput(topology);
                    (g.at, Some(g.rate))
                }
            };
            if common.json {
                let out = serde_json::json!({ "topology": topology, "goodput": goodput, "at": point });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("{}", describe(&workload, &limits));
                if let Some(g) = goodput {
                    println!("{}: goodput {g:.3} req/s", topology.label());
                }
                println!(
                    "{} at {:.3} req/s: {:.1}% met both SLOs (TTFT {:.1}%, TPOT {:.1}%); \
                     TTFT p50 {:.0} ms p90 {:.0} ms; TPOT p50 {:.1} ms p90 {:.1} ms",
                    topology.label(),
                    point.rate,
                    point.attainment * 100.0,
                    point.ttft_attainment * 100.0,
                    point.tpot_attainment * 100.0,
                    point.ttft_p50_ms,
                    point.ttft_p90_ms,
                    point.tpot_p50_ms,
                    point.tpot_p90_ms
                );
            }
        }
    }
    Ok(())
}

//! `pdserve-plan`: a capacity planner for the disaggregated cluster.
//!
//! From a measured cost profile and a workload, it simulates the cluster
//! event by event and recommends the prefill:decode worker split with the
//! highest goodput: DistServe's highest request rate at which at least 90%
//! of requests meet both the TTFT and the TPOT SLO.
//!
//! # Layout
//!
//! - [`cost`]: the cost profile (step times of prefill and decode, the KV
//!   hand-off) and [`fit`], its least-squares fit to timed steps.
//! - [`workload`]: arrivals, length distributions, SLOs, and the seeded trace.
//! - [`sim`]: the discrete-event simulation of routers and workers.
//! - [`goodput`]: attainment at one rate and the goodput search.
//! - [`plan`]: every split of a worker budget, and the best.
//!
//! The crate does no timing itself and has no engine dependency: the
//! profile comes from `pdserve-plan-measure` in `bench`.

pub mod cost;
pub mod error;
pub mod fit;
pub mod goodput;
pub mod plan;
pub mod sim;
pub mod workload;

pub use cost::CostProfile;
pub use error::PlanError;
pub use goodput::{Goodput, RatePoint, Scenario};
pub use plan::{plan, Plan};
pub use sim::{simulate, EngineLimits, Outcome, Topology};
pub use workload::{Arrival, LengthDist, Slo, Trace, Workload};

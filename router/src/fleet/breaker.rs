//! A circuit breaker per worker slot: closed, open, half-open.
//!
//! ```text
//! closed --(unreachable once, or 3 errors in a row)--> open
//! open --(cool-down passed)--> half-open: one request goes through as a probe
//! half-open --(probe succeeds)--> closed
//! half-open --(probe fails)--> open, cool-down doubled (1 s .. 30 s)
//! ```
//!
//! Placement avoids a worker whose breaker does not let requests through
//! while any other worker's does, so a dead or failing worker stops getting
//! traffic at once and gets it back one probe at a time. The gRPC edge
//! (`workers.rs`) reports each call's result; a worker joining a slot starts
//! closed.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Errors in a row that open a closed breaker.
pub const FAILURE_THRESHOLD: u32 = 3;
/// The first cool-down; each failed probe doubles it up to [`MAX_COOLDOWN`].
pub const MIN_COOLDOWN: Duration = Duration::from_secs(1);
/// The longest cool-down.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(30);
/// How long a probe may stay unanswered (a cancelled request never reports)
/// before another request may probe.
const PROBE_PATIENCE: Duration = Duration::from_secs(10);

/// What a breaker lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    /// Everything.
    Closed,
    /// Nothing, until the cool-down passes.
    Open,
    /// One probe request.
    HalfOpen,
}

impl Circuit {
    /// The value of the `worker_circuit_state` gauge.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

/// How a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The worker could not be reached: open at once.
    Unreachable,
    /// The worker answered with an internal error or broke off a stream.
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant, cooldown: Duration },
    HalfOpen { probe_since: Option<Instant>, cooldown: Duration },
}

/// One worker slot's breaker.
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
}

impl Default for Breaker {
    fn default() -> Self {
        Self { state: Mutex::new(State::Closed { failures: 0 }) }
    }
}

impl Breaker {
    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // Each transition writes the whole state: a poisoned one is consistent.
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// What the breaker lets through now.
    pub fn circuit(&self) -> Circuit {
        self.circuit_at(Instant::now())
    }

    fn circuit_at(&self, now: Instant) -> Circuit {
        match self.with_state(|s| *s) {
            State::Closed { .. } => Circuit::Closed,
            State::Open { until, .. } if now < until => Circuit::Open,
            State::Open { .. } | State::HalfOpen { .. } => Circuit::HalfOpen,
        }
    }

    /// Whether a request may be sent now: closed, or half-open with no probe
    /// under way.
    pub fn available(&self) -> bool {
        self.available_at(Instant::now())
    }

    fn available_at(&self, now: Instant) -> bool {
        self.with_state(|s| match *s {
            State::Closed { .. } => true,
            State::Open { until, .. } => now >= until,
            State::HalfOpen { probe_since, .. } => probe_since.is_none_or(|since| now >= since + PROBE_PATIENCE),
        })
    }

    /// A request is sent now: past an open breaker's cool-down it is the probe.
    pub fn dispatched(&self) {
        self.dispatched_at(Instant::now());
    }

    fn dispatched_at(&self, now: Instant) {
        self.with_state(|s| match *s {
            State::Open { until, cooldown } if now >= until => {
                *s = State::HalfOpen { probe_since: Some(now), cooldown };
            }
            State::HalfOpen { cooldown, .. } => *s = State::HalfOpen { probe_since: Some(now), cooldown },
            _ => {}
        });
    }

    /// A call succeeded: closed again, cool-down back to the shortest.
    pub fn succeeded(&self) {
        self.with_state(|s| *s = State::Closed { failures: 0 });
    }

    /// A call failed.
    pub fn failed(&self, failure: Failure) {
        self.failed_at(failure, Instant::now());
    }

    fn failed_at(&self, failure: Failure, now: Instant) {
        self.with_state(|s| match *s {
            State::Closed { failures } => {
                let failures = failures + 1;
                *s = if failure == Failure::Unreachable || failures >= FAILURE_THRESHOLD {
                    State::Open { until: now + MIN_COOLDOWN, cooldown: MIN_COOLDOWN }
                } else {
                    State::Closed { failures }
                };
            }
            State::HalfOpen { cooldown, .. } => {
                let cooldown = (cooldown * 2).min(MAX_COOLDOWN);
                *s = State::Open { until: now + cooldown, cooldown };
            }
            // Calls placed before it opened report late; the cool-down stands.
            State::Open { .. } => {}
        });
    }

    /// Back to closed: a new worker took the slot.
    pub fn reset(&self) {
        self.succeeded();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_worker_opens_at_once_and_is_probed_back() {
        let b = Breaker::default();
        let t0 = Instant::now();
        b.failed_at(Failure::Unreachable, t0);
        assert_eq!(b.circuit_at(t0), Circuit::Open);
        assert!(!b.available_at(t0 + MIN_COOLDOWN / 2));
        // Cool-down over: one probe may go, and only one.
        let t1 = t0 + MIN_COOLDOWN;
        assert_eq!(b.circuit_at(t1), Circuit::HalfOpen);
        assert!(b.available_at(t1));
        b.dispatched_at(t1);
        assert!(!b.available_at(t1), "a probe is under way");
        b.succeeded();
        assert_eq!(b.circuit_at(t1), Circuit::Closed);
        assert!(b.available_at(t1));
    }

    #[test]
    fn errors_open_it_only_in_a_row() {
        let b = Breaker::default();
        let t = Instant::now();
        b.failed_at(Failure::Error, t);
        b.failed_at(Failure::Error, t);
        b.succeeded();
        b.failed_at(Failure::Error, t);
        b.failed_at(Failure::Error, t);
        assert_eq!(b.circuit_at(t), Circuit::Closed, "a success in between starts the count again");
        b.failed_at(Failure::Error, t);
        assert_eq!(b.circuit_at(t), Circuit::Open);
    }

    #[test]
    fn each_failed_probe_doubles_the_cool_down_up_to_the_cap() {
        let b = Breaker::default();
        let mut t = Instant::now();
        b.failed_at(Failure::Unreachable, t);
        let mut cooldown = MIN_COOLDOWN;
        for _ in 0..8 {
            t += cooldown;
            assert!(b.available_at(t));
            b.dispatched_at(t);
            b.failed_at(Failure::Unreachable, t);
            cooldown = (cooldown * 2).min(MAX_COOLDOWN);
            assert!(!b.available_at(t + cooldown - Duration::from_millis(1)), "{cooldown:?}");
        }
        assert_eq!(cooldown, MAX_COOLDOWN);
        assert!(b.available_at(t + MAX_COOLDOWN));
    }

    #[test]
    fn a_probe_that_never_reports_lets_another_through_later() {
        let b = Breaker::default();
        let t0 = Instant::now();
        b.failed_at(Failure::Unreachable, t0);
        let t1 = t0 + MIN_COOLDOWN;
        b.dispatched_at(t1);
        assert!(!b.available_at(t1 + PROBE_PATIENCE / 2));
        assert!(b.available_at(t1 + PROBE_PATIENCE));
    }

    #[test]
    fn late_failures_leave_an_open_breaker_as_it_is_and_reset_closes_it() {
        let b = Breaker::default();
        let t0 = Instant::now();
        b.failed_at(Failure::Unreachable, t0);
        b.failed_at(Failure::Unreachable, t0 + MIN_COOLDOWN / 2);
        assert!(b.available_at(t0 + MIN_COOLDOWN), "the cool-down was not pushed back");
        b.reset();
        assert_eq!(b.circuit_at(t0), Circuit::Closed);
    }
}

//! Per-key limits: requests and tokens per minute (GCRA buckets from
//! `governor`, so a minute's budget may be spent in a burst and refills
//! evenly), requests running at once, and prompt length.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What one key may do; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Requests accepted per minute.
    pub requests_per_minute: Option<NonZeroU32>,
    /// Tokens per minute, each request charged its prompt plus the most it
    /// may generate (`max_tokens` × `n`), as OpenAI counts them.
    pub tokens_per_minute: Option<NonZeroU32>,
    /// Requests running (or queued) at once.
    pub max_concurrent_requests: Option<NonZeroU32>,
    /// Prompt tokens of one request.
    pub max_prompt_tokens: Option<NonZeroU32>,
}

impl Limits {
    /// Each limit of `self`, else `fallback`'s.
    pub fn or(self, fallback: &Limits) -> Limits {
        Limits {
            requests_per_minute: self.requests_per_minute.or(fallback.requests_per_minute),
            tokens_per_minute: self.tokens_per_minute.or(fallback.tokens_per_minute),
            max_concurrent_requests: self.max_concurrent_requests.or(fallback.max_concurrent_requests),
            max_prompt_tokens: self.max_prompt_tokens.or(fallback.max_prompt_tokens),
        }
    }
}

/// A request a key's limits refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Out of requests for now (429).
    #[error("Rate limit reached for requests per minute (limit {limit}). Please try again in {}s.", retry_secs(*.retry_after))]
    Requests { limit: u32, retry_after: Duration },
    /// Out of tokens for now (429).
    #[error("Rate limit reached for tokens per minute (limit {limit}, requested {requested}). Please try again in {}s.", retry_secs(*.retry_after))]
    Tokens { limit: u32, requested: u64, retry_after: Duration },
    /// The request alone needs more tokens than a minute's budget: it can
    /// never run with this key (400; lower `max_tokens`).
    #[error("Request too large for tokens per minute (limit {limit}, requested {requested}); lower max_tokens or the prompt.")]
    TooLarge { limit: u32, requested: u64 },
    /// As many requests as allowed are already running (429).
    #[error("Too many concurrent requests for this API key (limit {limit}).")]
    Concurrency { limit: u32 },
    /// The prompt is longer than the key may send (400).
    #[error("The prompt has {prompt_tokens} tokens; this API key may send at most {limit}.")]
    PromptTooLong { prompt_tokens: usize, limit: u32 },
}

impl LimitError {
    /// When to try again, for `Retry-After`; `None` when retrying the same
    /// request cannot help.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Requests { retry_after, .. } | Self::Tokens { retry_after, .. } => Some(*retry_after),
            // A running request ends in about a second or two.
            Self::Concurrency { .. } => Some(Duration::from_secs(1)),
            Self::TooLarge { .. } | Self::PromptTooLong { .. } => None,
        }
    }

    /// Whether this is a rate limit (429) rather than a request the key can
    /// never send (400).
    pub fn is_rate_limit(&self) -> bool {
        self.retry_after().is_some()
    }

    /// Which limit it is, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Requests { .. } => "requests_per_minute",
            Self::Tokens { .. } | Self::TooLarge { .. } => "tokens_per_minute",
            Self::Concurrency { .. } => "max_concurrent_requests",
            Self::PromptTooLong { .. } => "max_prompt_tokens",
        }
    }
}

fn retry_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// One key's live limits.
#[derive(Debug)]
pub struct KeyLimiter {
    limits: Limits,
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<DefaultDirectRateLimiter>,
    running: Option<Arc<Semaphore>>,
}

/// A request's place among its key's running requests; it frees the place
/// when dropped, at the end of the request however it ends.
#[derive(Debug)]
pub struct Running {
    _permit: Option<OwnedSemaphorePermit>,
}

impl Running {
    /// A place no limit counts.
    pub fn unlimited() -> Self {
        Self { _permit: None }
    }
}

impl KeyLimiter {
    /// Fresh buckets for `limits`.
    pub fn new(limits: Limits) -> Self {
        let bucket = |per_minute: Option<NonZeroU32>| per_minute.map(|n| RateLimiter::direct(Quota::per_minute(n)));
        Self {
            limits,
            requests: bucket(limits.requests_per_minute),
            tokens: bucket(limits.tokens_per_minute),
            running: limits.max_concurrent_requests.map(|n| Arc::new(Semaphore::new(n.get() as usize))),
        }
    }

    /// The limits this limiter enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Takes one request from the requests-per-minute bucket.
    pub fn check_request(&self) -> Result<(), LimitError> {
        let (Some(bucket), Some(limit)) = (&self.requests, self.limits.requests_per_minute) else { return Ok(()) };
        bucket.check().map_err(|not_until| LimitError::Requests {
            limit: limit.get(),
            retry_after: not_until.wait_time_from(DefaultClock::default().now()),
        })
    }

    /// Checks the prompt's length, takes `prompt_tokens + max_new_tokens`
    /// from the tokens bucket, then a running place; in that order, so a
    /// refusal by an earlier check costs nothing of the later ones.
    pub fn admit(&self, prompt_tokens: usize, max_new_tokens: u64) -> Result<Running, LimitError> {
        if let Some(limit) = self.limits.max_prompt_tokens.filter(|l| prompt_tokens > l.get() as usize) {
            return Err(LimitError::PromptTooLong { prompt_tokens, limit: limit.get() });
        }
        if let (Some(bucket), Some(limit)) = (&self.tokens, self.limits.tokens_per_minute) {
            let requested = prompt_tokens as u64 + max_new_tokens;
            let too_large = || LimitError::TooLarge { limit: limit.get(), requested };
            let n = u32::try_from(requested).ok().and_then(NonZeroU32::new).ok_or_else(too_large)?;
            match bucket.check_n(n) {
                Err(_insufficient) => return Err(too_large()),
                Ok(Err(not_until)) => {
                    let retry_after = not_until.wait_time_from(DefaultClock::default().now());
                    return Err(LimitError::Tokens { limit: limit.get(), requested, retry_after });
                }
                Ok(Ok(())) => {}
            }
        }
        let permit = match (&self.running, self.limits.max_concurrent_requests) {
            (Some(running), Some(limit)) => {
                Some(running.clone().try_acquire_owned().map_err(|_| LimitError::Concurrency { limit: limit.get() })?)
            }
            _ => None,
        };
        Ok(Running { _permit: permit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: u32) -> Option<NonZeroU32> {
        NonZeroU32::new(v)
    }

    #[test]
    fn requests_per_minute_allow_a_burst_then_say_when_to_retry() {
        let limiter = KeyLimiter::new(Limits { requests_per_minute: n(3), ..Limits::default() });
        for _ in 0..3 {
            limiter.check_request().unwrap();
        }
        let refused = limiter.check_request().unwrap_err();
        let retry = refused.retry_after().unwrap();
        // One request comes back every 20 s.
        assert!(retry > Duration::from_secs(15) && retry <= Duration::from_secs(20), "{retry:?}");
        assert!(refused.to_string().contains("limit 3"), "{refused}");
    }

    #[test]
    fn tokens_per_minute_charge_prompt_and_max_tokens() {
        let limiter = KeyLimiter::new(Limits { tokens_per_minute: n(1000), ..Limits::default() });
        let _first = limiter.admit(300, 300).unwrap();
        let _second = limiter.admit(200, 200).unwrap();
        let refused = limiter.admit(1, 1).unwrap_err();
        assert!(matches!(refused, LimitError::Tokens { requested: 2, .. }), "{refused:?}");
        assert!(refused.is_rate_limit());
        let never = KeyLimiter::new(Limits { tokens_per_minute: n(1000), ..Limits::default() }).admit(10, 991);
        assert_eq!(never.unwrap_err(), LimitError::TooLarge { limit: 1000, requested: 1001 });
    }

    #[test]
    fn concurrent_requests_free_their_place_when_they_end() {
        let limiter = KeyLimiter::new(Limits { max_concurrent_requests: n(2), ..Limits::default() });
        let a = limiter.admit(1, 1).unwrap();
        let _b = limiter.admit(1, 1).unwrap();
        assert_eq!(limiter.admit(1, 1).unwrap_err(), LimitError::Concurrency { limit: 2 });
        drop(a);
        limiter.admit(1, 1).unwrap();
    }

    #[test]
    fn a_long_prompt_is_refused_before_it_costs_tokens() {
        let limits = Limits { max_prompt_tokens: n(100), tokens_per_minute: n(150), ..Limits::default() };
        let limiter = KeyLimiter::new(limits);
        let refused = limiter.admit(101, 1).unwrap_err();
        assert_eq!(refused, LimitError::PromptTooLong { prompt_tokens: 101, limit: 100 });
        assert!(!refused.is_rate_limit());
        // The refused request took nothing from the bucket.
        limiter.admit(100, 50).unwrap();
    }

    #[test]
    fn no_limits_admit_everything() {
        let limiter = KeyLimiter::new(Limits::default());
        for _ in 0..1000 {
            limiter.check_request().unwrap();
            limiter.admit(1_000_000, u64::MAX / 2).unwrap();
        }
    }
}

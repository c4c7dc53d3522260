//! Per-layer streaming of a KV hand-off: the prompt's KV lands in its
//! reserved blocks layer by layer while the sequence's first step already
//! runs, each layer of the forward pass waiting for its own KV.
//!
//! The puller reports each layer as it lands ([`KvLanding::landed`]); the
//! model calls [`crate::ForwardBatch::wait_for_layer`] before it touches a
//! layer's cache. A layer reported landed is never written again by the
//! puller, so the forward pass reads it while later layers are still being
//! written into other bytes of the same blocks.

use std::sync::{Arc, Condvar, Mutex, PoisonError};

/// How far a hand-off's KV has landed; shared by the puller and the engine.
#[derive(Debug)]
pub struct KvLanding {
    num_layers: u32,
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    landed: u32,
    failure: Option<String>,
}

impl KvLanding {
    /// Nothing landed yet, of `num_layers` layers.
    pub fn new(num_layers: usize) -> Arc<Self> {
        Arc::new(Self { num_layers: num_layers as u32, state: Mutex::default(), changed: Condvar::new() })
    }

    /// Layers `0..layers` are in place; counts only grow.
    pub fn landed(&self, layers: u32) {
        let mut state = self.state();
        if layers > state.landed {
            state.landed = layers.min(self.num_layers);
            self.changed.notify_all();
        }
    }

    /// The pull failed: every waiter wakes with `reason`. Layers that landed
    /// before stay landed, but the sequence must not be decoded from.
    pub fn fail(&self, reason: impl Into<String>) {
        let mut state = self.state();
        if state.failure.is_none() && state.landed < self.num_layers {
            state.failure = Some(reason.into());
            self.changed.notify_all();
        }
    }

    /// Blocks until layer `layer` has landed, or says why it never will.
    pub fn wait_for(&self, layer: usize) -> Result<(), String> {
        let mut state = self.state();
        loop {
            if state.landed as usize > layer.min(self.num_layers.saturating_sub(1) as usize) {
                return Ok(());
            }
            if let Some(reason) = &state.failure {
                return Err(reason.clone());
            }
            state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Whether every layer has landed.
    pub fn is_complete(&self) -> bool {
        self.state().landed == self.num_layers
    }

    /// Why the pull failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.state().failure.clone()
    }

    /// Whether the landing is over: complete or failed.
    pub fn is_settled(&self) -> bool {
        let state = self.state();
        state.landed == self.num_layers || state.failure.is_some()
    }

    /// A guard for the puller's side: dropped before every layer landed (a
    /// pull that panicked or was abandoned), it fails the landing, so no
    /// forward pass waits forever.
    pub fn reporter(self: &Arc<Self>) -> LandingReporter {
        LandingReporter(self.clone())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Each critical section leaves the state consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// See [`KvLanding::reporter`].
#[derive(Debug)]
pub struct LandingReporter(Arc<KvLanding>);

impl LandingReporter {
    /// The landing this guard reports to.
    pub fn landing(&self) -> &Arc<KvLanding> {
        &self.0
    }
}

impl Drop for LandingReporter {
    fn drop(&mut self) {
        self.0.fail("the KV pull ended before every layer landed");
    }
}

/// The hand-offs still landing in a step's blocks, compared by identity.
#[derive(Clone, Default)]
pub struct Landings(pub Vec<Arc<KvLanding>>);

impl PartialEq for Landings {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len() && self.0.iter().zip(&other.0).all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

impl Eq for Landings {}

impl std::fmt::Debug for Landings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Landings({})", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_waiter_wakes_when_its_layer_lands_or_the_pull_fails() {
        let landing = KvLanding::new(3);
        let waiter = {
            let landing = landing.clone();
            std::thread::spawn(move || landing.wait_for(1))
        };
        std::thread::sleep(Duration::from_millis(20));
        landing.landed(1);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished(), "layer 1 has not landed yet");
        landing.landed(2);
        assert_eq!(waiter.join().unwrap(), Ok(()));
        assert!(!landing.is_complete());

        let waiter = {
            let landing = landing.clone();
            std::thread::spawn(move || landing.wait_for(2))
        };
        drop(landing.reporter());
        assert_eq!(waiter.join().unwrap(), Err("the KV pull ended before every layer landed".into()));
        assert!(landing.is_settled());
    }

    #[test]
    fn a_complete_landing_cannot_fail_and_counts_only_grow() {
        let landing = KvLanding::new(2);
        landing.landed(2);
        landing.landed(1);
        drop(landing.reporter());
        assert!(landing.is_complete());
        assert_eq!(landing.failure(), None);
        assert_eq!(landing.wait_for(1), Ok(()));
    }
}

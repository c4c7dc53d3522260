//! How a forward step fails ([`ForwardError`]), a broken collective ([`CommError`]) among the
//! ways. Both live in this leaf because each side needs the other's: a forward step carries a
//! collective's [`CommError`], and the collectives' tensor all-reduce returns [`ForwardError`]; in
//! [`crate::forward`] or [`crate::comm`] they would make the two depend on each other.

/// A forward step that could not run.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    #[error(transparent)]
    Comm(#[from] CommError),
}

/// Why a collective did not complete. Any of them takes the whole group
/// down: a tensor-parallel step cannot finish without every rank.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CommError {
    /// A rank left the group (it panicked, or its worker is shutting down).
    #[error("tensor-parallel group broken: {0}")]
    Broken(String),
    /// A peer did not reach the collective in time.
    #[error("tensor-parallel rank {rank} waited {secs} s for its peers; the group is broken")]
    Timeout { rank: usize, secs: f64 },
    /// The ranks disagree on a collective's size.
    #[error("rank {rank} passed {got} values to a collective of {expected}")]
    SizeMismatch { rank: usize, expected: usize, got: usize },
}

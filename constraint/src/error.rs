//! Why a constraint cannot be enforced.

/// A constraint refused before any token is generated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    /// The schema, regex or grammar does not compile (llguidance's message).
    #[error("{0}")]
    Invalid(String),
    /// The model's vocabulary cannot carry grammars.
    #[error("structured outputs are not supported for this model: {0}")]
    Vocabulary(String),
}

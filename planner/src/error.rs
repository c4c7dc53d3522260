//! The planner's one error type.

use std::path::PathBuf;

/// What can go wrong reading inputs or checking them. Every variant names
/// the field or file it is about, so the CLI can print it as is.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("reading {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("parsing {path}: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    /// A value outside its range: `field` must be `limit`, and was `value`.
    #[error("{field} must be {limit}, got {value}")]
    Invalid { field: String, limit: &'static str, value: String },
    /// A length distribution spec on the command line that does not parse.
    #[error("bad length distribution {spec:?}: {reason} (expected fixed:N, uniform:MIN,MAX, normal:MEAN,STD[,MIN,MAX] or file:PATH)")]
    BadSpec { spec: String, reason: String },
    /// Too few or degenerate samples to fit a cost model.
    #[error("cannot fit the {what} cost: {reason}")]
    Fit { what: &'static str, reason: String },
}

impl PlanError {
    /// An out-of-range value.
    pub(crate) fn invalid(field: impl Into<String>, limit: &'static str, value: impl ToString) -> Self {
        Self::Invalid { field: field.into(), limit, value: value.to_string() }
    }
}

/// Reads a whole file, naming it in the error.
pub(crate) fn read(path: &std::path::Path) -> Result<String, PlanError> {
    std::fs::read_to_string(path).map_err(|source| PlanError::Io { path: path.to_path_buf(), source })
}

/// Parses JSON read from `path`, naming it in the error.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(path: &std::path::Path, text: &str) -> Result<T, PlanError> {
    serde_json::from_str(text).map_err(|source| PlanError::Json { path: path.to_path_buf(), source })
}

//! `Authorization: Bearer <key>` -> [`Caller`].

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::Caller;
use crate::error::ApiError;
use crate::server::AppState;

/// Why a request was not let in (401).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("You didn't provide an API key. Provide it in an Authorization header: `Authorization: Bearer <key>`.")]
    Missing,
    /// A key that is not configured.
    #[error("Incorrect API key provided.")]
    Invalid,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let ring = state.keys.current();
        if ring.is_open() {
            return Ok(Self::Anonymous);
        }
        let header = parts.headers.get(AUTHORIZATION).ok_or(AuthError::Missing)?;
        let secret = header
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, secret)| secret.trim())
            .filter(|secret| !secret.is_empty())
            .ok_or(AuthError::Missing)?;
        let key = ring.find(secret).ok_or(AuthError::Invalid)?;
        Ok(Self::Key(key))
    }
}

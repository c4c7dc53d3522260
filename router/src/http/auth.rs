//! `Authorization: Bearer <key>` -> [`Caller`].

use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use crate::http::error::ApiError;
use crate::tenancy::{AuthError, Caller, Keys};

impl<S> FromRequestParts<S> for Caller
where
    Arc<Keys>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let ring = Arc::<Keys>::from_ref(state).current();
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

//! One error type for every HTTP answer, and the `AppJson` extractor that
//! gives malformed bodies the same OpenAI shape.
//!
//! JSON bodies and SSE error events share [`ApiError::body`], so a client sees
//! the same `{"error":{"message","type","param","code"}}` either way.

use axum::extract::rejection::JsonRejection;
use axum::extract::FromRequest;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::admission::AdmissionError;
use crate::pd::BackendError;
use crate::validation::ValidationError;

/// Everything a request can fail with, mapped to a status in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A parameter is missing or out of range (400).
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// `model` names a model this router does not serve (404).
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    /// The body is not the JSON we expect (400).
    #[error("{0}")]
    InvalidJson(String),
    /// The model card has not been loaded yet (503).
    #[error("the model is still loading")]
    NotReady,
    /// The router is shutting down (503 from `/ready`).
    #[error("the router is shutting down")]
    ShuttingDown,
    /// A pool a request needs has no worker now (503 from `/ready`).
    #[error("no {0} worker is available")]
    NoWorkers(&'static str),
    /// A worker failed or is unreachable (502 / 503).
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The admission queue is full (429 with `Retry-After`), or its pool
    /// has no worker (503).
    #[error(transparent)]
    Admission(#[from] AdmissionError),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Validation(_) | Self::InvalidJson(_) => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) => StatusCode::NOT_FOUND,
            Self::NotReady | Self::ShuttingDown | Self::NoWorkers(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Backend(BackendError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Backend(_) => StatusCode::BAD_GATEWAY,
            Self::Admission(AdmissionError::QueueFull { .. }) => StatusCode::TOO_MANY_REQUESTS,
            Self::Admission(AdmissionError::NoWorker) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The OpenAI `type` label, as the OpenAI SDK names its exceptions.
    fn error_type(&self) -> &'static str {
        match self.status() {
            StatusCode::BAD_REQUEST => "BadRequestError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            StatusCode::TOO_MANY_REQUESTS => "RateLimitError",
            _ => "InternalServerError",
        }
    }

    /// A stable machine-readable code.
    fn code(&self) -> &'static str {
        match self {
            Self::Validation(e) => e.code(),
            Self::ModelNotFound(_) => "model_not_found",
            Self::InvalidJson(_) => "invalid_json",
            Self::NotReady => "model_loading",
            Self::ShuttingDown => "shutting_down",
            Self::NoWorkers(_) => "no_worker",
            Self::Backend(e) => e.code(),
            Self::Admission(AdmissionError::QueueFull { .. }) => "queue_full",
            Self::Admission(AdmissionError::NoWorker) => "no_worker",
        }
    }

    /// The request field at fault, when there is one.
    fn param(&self) -> Option<&'static str> {
        match self {
            Self::Validation(e) => e.param(),
            Self::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    /// The OpenAI error body.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.to_string(),
                "type": self.error_type(),
                "param": self.param(),
                "code": self.code(),
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Not-ready answers are expected while the model card loads (probes poll them).
        if self.status().is_server_error() && !matches!(self, Self::NotReady | Self::ShuttingDown | Self::NoWorkers(_))
        {
            tracing::warn!(error = %self, "request failed");
        }
        let mut response = (self.status(), Json(self.body())).into_response();
        if let Self::Admission(AdmissionError::QueueFull { retry_after, .. }) = &self {
            // Whole seconds, at least 1: clients read `Retry-After` as delay-seconds.
            let secs = retry_after.as_secs().max(1);
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self::InvalidJson(rejection.body_text())
    }
}

/// `Json` whose rejection is an [`ApiError`], so bad bodies get the OpenAI shape.
#[derive(Debug)]
pub struct AppJson<T>(pub T);

impl<T, S> FromRequest<S> for AppJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let Json(value) = Json::<T>::from_request(req, state).await?;
        Ok(Self(value))
    }
}

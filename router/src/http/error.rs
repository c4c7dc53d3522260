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
use serde::Serialize;
use serde_json::json;
use std::borrow::Cow;
use utoipa::ToSchema;

use crate::admission::AdmissionError;
use crate::backend::BackendError;
use crate::fleet::served::Unservable;
use crate::prepare::validate::ValidationError;
use crate::tenancy::limits::LimitError;
use crate::tenancy::{AuthError, ModelNotAllowed};

/// Everything a request can fail with, mapped to a status in one place.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A parameter is missing or out of range (400).
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// `model` names a model this router does not serve (404).
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    /// No route at this path (404).
    #[error("`{method} {path}` is not served by this router; /openapi.json lists the routes it serves")]
    RouteNotFound { method: String, path: String },
    /// The path is served, with other methods (405).
    #[error("`{path}` does not take {method}; /openapi.json lists the methods it takes")]
    MethodNotAllowed { method: String, path: String },
    /// The body is not the JSON we expect (400).
    #[error("{0}")]
    InvalidJson(String),
    /// The body is longer than `--max-request-body-bytes` (413).
    #[error("The request body is larger than this server accepts.")]
    BodyTooLarge,
    /// No valid API key (401).
    #[error(transparent)]
    Unauthorized(#[from] AuthError),
    /// The key's tenant may not use this model (403).
    #[error("This API key may not use the model `{0}`.")]
    ModelNotAllowed(String),
    /// The key's limits refuse the request (429 with `Retry-After`, or 400
    /// for a request the key can never send).
    #[error(transparent)]
    Limit(#[from] LimitError),
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
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::Limit(e) if e.is_rate_limit() => StatusCode::TOO_MANY_REQUESTS,
            Self::Limit(_) => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) | Self::RouteNotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
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
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "BadRequestError",
            StatusCode::UNAUTHORIZED => "AuthenticationError",
            StatusCode::FORBIDDEN => "PermissionDeniedError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowedError",
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
            Self::RouteNotFound { .. } => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::InvalidJson(_) => "invalid_json",
            Self::BodyTooLarge => "request_too_large",
            Self::Unauthorized(_) => "invalid_api_key",
            Self::ModelNotAllowed(_) => "model_not_allowed",
            Self::Limit(LimitError::PromptTooLong { .. }) => "prompt_too_long",
            Self::Limit(LimitError::TooLarge { .. }) => "request_too_large",
            Self::Limit(_) => "rate_limit_exceeded",
            Self::NotReady => "model_loading",
            Self::ShuttingDown => "shutting_down",
            Self::NoWorkers(_) => "no_worker",
            Self::Backend(e) => e.code(),
            Self::Admission(AdmissionError::QueueFull { .. }) => "queue_full",
            Self::Admission(AdmissionError::NoWorker) => "no_worker",
        }
    }

    /// The request field at fault, when there is one.
    fn param(&self) -> Option<Cow<'static, str>> {
        match self {
            Self::Validation(e) => e.param(),
            Self::ModelNotFound(_) | Self::ModelNotAllowed(_) => Some(Cow::Borrowed("model")),
            Self::Limit(LimitError::TooLarge { .. }) => Some(Cow::Borrowed("max_tokens")),
            _ => None,
        }
    }

    /// When the client may try again, for `Retry-After`.
    fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Self::Admission(AdmissionError::QueueFull { retry_after, .. }) => Some(*retry_after),
            Self::Limit(e) => e.retry_after(),
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
        if let Some(retry_after) = self.retry_after() {
            // Whole seconds, rounded up and at least 1: clients read
            // `Retry-After` as delay-seconds and must not come back too early.
            let secs = (retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0)).max(1);
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, Self::Unauthorized(_)) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<ModelNotAllowed> for ApiError {
    fn from(ModelNotAllowed(name): ModelNotAllowed) -> Self {
        Self::ModelNotAllowed(name)
    }
}

impl From<Unservable> for ApiError {
    fn from(why: Unservable) -> Self {
        match why {
            Unservable::Unnamed => Self::Validation(ValidationError::Missing { field: "model" }),
            Unservable::NotFound(name) => Self::ModelNotFound(name),
            Unservable::NotReady => Self::NotReady,
            Unservable::NoWorkers(pool) => Self::NoWorkers(pool),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return Self::BodyTooLarge;
        }
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

/// The OpenAI error body every 4xx and 5xx answer carries.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorResponse {
    /// What went wrong.
    pub error: ErrorObject,
}

/// The inside of an [`ErrorResponse`].
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorObject {
    /// A human-readable message naming the field and the limit.
    pub message: String,
    /// The OpenAI SDK's exception name, e.g. `BadRequestError`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    /// A stable machine-readable code, e.g. `invalid_value`.
    pub code: Option<String>,
}

//! The one place where errors become HTTP statuses and JSON bodies:
//! `{"error": {"code": "...", "message": "..."}}` with stable codes.
//!
//! Conversions only map; they neither log nor count. A response made from an error
//! carries an [`ErrorReport`] extension, and the `report_errors` middleware logs and
//! counts from it, once per response.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::EngineError;
use crate::image_io::ImageError;
use crate::storage::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the request body is empty: send an image")]
    EmptyBody,
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    CorruptImage(String),
    #[error("{0}")]
    TooManyPixels(String),
    #[error("the request body is larger than {0} bytes ({mib:.1} MiB)", mib = *.0 as f64 / 1048576.0)]
    BodyTooLarge(usize),
    #[error("the request body stopped arriving before it was complete")]
    BodyTimeout,
    #[error("{0}")]
    BadRequest(String),
    #[error("no model named {0:?}")]
    UnknownModel(String),
    #[error("no model is named \"default\" and several are served ({0}): use POST /v1/models/{{model}}/inspect")]
    NoDefaultModel(String),
    #[error("no inspection with id {0:?}")]
    UnknownInspection(String),
    #[error("{0}")]
    NotStored(String),
    #[error("{0}")]
    ModelChanged(String),
    #[error("{0}")]
    IdempotencyKeyReused(String),
    #[error("the model {0:?} is busy: retry shortly")]
    Overloaded(String),
    #[error("the inspection did not finish within the request timeout")]
    Timeout,
    #[error("the server is shutting down: send this to another replica, or retry after it restarts")]
    ShuttingDown,
    /// The detail goes to the log, not to the client.
    #[error("the database is unavailable")]
    DatabaseUnavailable(String),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("this API key may not do that")]
    Forbidden,
    #[error("refused: a browser sent this from another site (open the operator's page on this server, or send it from a script)")]
    CrossOrigin,
    #[error("no such route")]
    NoRoute,
    #[error("this route does not take that method (see the Allow header)")]
    MethodNotAllowed,
    #[error("{0}")]
    ModelLoadFailed(String),
    /// The detail goes to the log, not to the client.
    #[error("the image store is unavailable")]
    ImageStoreUnavailable(String),
    #[error("{0}")]
    ModelExists(String),
    #[error("{0}")]
    BadTrainingData(String),
    #[error("no training job with id {0:?}")]
    UnknownJob(String),
    #[error("{0}")]
    JobFinished(String),
    #[error("{0}")]
    JobElsewhere(String),
    #[error("internal error")]
    Internal(String),
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable code.
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use ApiError::*;
        match self {
            EmptyBody => (StatusCode::BAD_REQUEST, "empty_body"),
            UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            CorruptImage(_) => (StatusCode::UNPROCESSABLE_ENTITY, "corrupt_image"),
            TooManyPixels(_) => (StatusCode::PAYLOAD_TOO_LARGE, "image_too_large"),
            BodyTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            UnknownModel(_) | NoDefaultModel(_) => (StatusCode::NOT_FOUND, "unknown_model"),
            UnknownInspection(_) => (StatusCode::NOT_FOUND, "unknown_inspection"),
            NotStored(_) => (StatusCode::NOT_FOUND, "image_not_stored"),
            ModelChanged(_) => (StatusCode::CONFLICT, "model_changed"),
            IdempotencyKeyReused(_) => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
            Overloaded(_) => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            Timeout => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            DatabaseUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
            Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
            CrossOrigin => (StatusCode::FORBIDDEN, "cross_origin_request"),
            NoRoute => (StatusCode::NOT_FOUND, "not_found"),
            MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ModelLoadFailed(_) => (StatusCode::UNPROCESSABLE_ENTITY, "model_load_failed"),
            ImageStoreUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "image_store_unavailable"),
            ModelExists(_) => (StatusCode::CONFLICT, "model_exists"),
            BadTrainingData(_) => (StatusCode::UNPROCESSABLE_ENTITY, "bad_training_data"),
            UnknownJob(_) => (StatusCode::NOT_FOUND, "unknown_job"),
            JobFinished(_) => (StatusCode::CONFLICT, "job_finished"),
            JobElsewhere(_) => (StatusCode::CONFLICT, "job_elsewhere"),
            Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

/// What went wrong in a response made from an [`ApiError`], for the middleware that logs
/// and counts: the stable code, and the detail that the client does not see.
#[derive(Debug, Clone)]
pub struct ErrorReport {
    pub code: &'static str,
    pub detail: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let detail = match &self {
            ApiError::Internal(d) | ApiError::DatabaseUnavailable(d) | ApiError::ImageStoreUnavailable(d) => {
                Some(d.clone())
            }
            _ => None,
        };
        // Internals go to the log, never to the client.
        let message = match &self {
            ApiError::Internal(_) => "internal error".to_string(),
            other => other.to_string(),
        };
        let mut resp = (
            status,
            axum::Json(ErrorBody {
                error: ErrorDetail { code, message },
            }),
        )
            .into_response();
        if matches!(
            self,
            ApiError::Overloaded(_)
                | ApiError::Timeout
                | ApiError::DatabaseUnavailable(_)
                | ApiError::ImageStoreUnavailable(_)
        ) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        // These can be answered with the request body unread (a full queue refuses before
        // reading it; a declared or streamed length over the limit stops reading). hyper
        // then closes the connection, and a keep-alive client whose next request meets
        // that close sees a reset (measured: one reset per two early 429s). Saying so lets
        // the client reconnect instead.
        if matches!(
            self,
            ApiError::Overloaded(_)
                | ApiError::BodyTooLarge(_)
                | ApiError::BodyTimeout
                | ApiError::UnsupportedMediaType(_)
        ) {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if matches!(self, ApiError::Unauthorized) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp.extensions_mut().insert(ErrorReport { code, detail });
        resp
    }
}

/// Logs internal and storage failures with their detail and counts storage failures,
/// from the [`ErrorReport`] a response carries.
pub async fn report_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut resp = next.run(req).await;
    // The router answers a known route with a wrong method itself, with an empty body;
    // give it the JSON shape every other error has, keeping its Allow header.
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED && resp.extensions().get::<ErrorReport>().is_none() {
        let allow = resp.headers().get(header::ALLOW).cloned();
        resp = ApiError::MethodNotAllowed.into_response();
        if let Some(allow) = allow {
            resp.headers_mut().insert(header::ALLOW, allow);
        }
    }
    if let Some(report) = resp.extensions().get::<ErrorReport>() {
        let detail = report.detail.as_deref().unwrap_or("");
        match report.code {
            "internal" => tracing::error!(detail, "internal error"),
            code if crate::metrics::STORAGE_ERROR_CODES.contains(&code) => {
                metrics::counter!(crate::metrics::DATABASE_ERRORS, "code" => report.code).increment(1);
                tracing::error!(code = report.code, detail, "storage error");
            }
            _ => {}
        }
    }
    resp
}

impl From<ImageError> for ApiError {
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::Empty => ApiError::EmptyBody,
            ImageError::UnsupportedFormat | ImageError::UnsupportedKind(_) => {
                ApiError::UnsupportedMediaType(e.to_string())
            }
            ImageError::TooManyPixels { .. } | ImageError::OverDecoderLimit(_) => {
                ApiError::TooManyPixels(e.to_string())
            }
            ImageError::Corrupt(_) => ApiError::CorruptImage(e.to_string()),
            ImageError::Io { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Overloaded => ApiError::Overloaded(String::new()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            // A row that does not parse is a bug, not an outage: 500, not 503.
            StoreError::Malformed(m) => ApiError::Internal(format!("malformed record: {m}")),
            StoreError::Conflict(m) => ApiError::ModelExists(m),
            StoreError::KeyTaken(_) => ApiError::IdempotencyKeyReused(e.to_string()),
            // PostgreSQL's "data exception" class (a value it will not store: a NUL in
            // text, a number out of range): the request's doing, not an outage to retry.
            StoreError::Database(sqlx::Error::Database(ref d))
                if d.code().is_some_and(|c| c.len() == 5 && c.starts_with("22")) =>
            {
                ApiError::BadRequest(format!("the database refused a value of this request: {}", d.message()))
            }
            other => ApiError::DatabaseUnavailable(other.to_string()),
        }
    }
}

//! Reading an uploaded image out of a request: a raw body or the multipart field `image`,
//! within a byte limit. Public so the fuzz targets can drive it with arbitrary bodies.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::header;

use crate::api::error::ApiError;

/// Reads the image from a raw body or a multipart field `image`, within `limit` bytes.
pub async fn read_image_body(req: Request, limit: usize) -> Result<Vec<u8>, ApiError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ApiError::BodyTooLarge(limit));
    }
    let mime = content_type.split(';').next().unwrap_or("").trim().to_string();
    let bytes = if mime == "multipart/form-data" {
        let (parts, body) = req.into_parts();
        let limited = Body::new(http_body_util::Limited::new(body, limit));
        let mut mp = axum::extract::Multipart::from_request(Request::from_parts(parts, limited), &())
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        let mut found = None;
        while let Some(field) = mp.next_field().await.map_err(|e| multipart_error(e, limit))? {
            if field.name() == Some("image") {
                if found.is_some() {
                    // Judging one of them would answer for an image the client cannot tell.
                    return Err(ApiError::BadRequest(
                        "more than one field named `image`: send one image per request".into(),
                    ));
                }
                found = Some(field.bytes().await.map_err(|e| multipart_error(e, limit))?.to_vec());
            }
        }
        found.ok_or_else(|| ApiError::BadRequest("multipart body has no field named `image`".into()))?
    } else {
        let accepted = [
            "",
            "image/png",
            "image/jpeg",
            "image/jpg",
            "image/bmp",
            "image/x-ms-bmp",
            "image/tiff",
            "application/octet-stream",
        ];
        if !accepted.contains(&mime.as_str()) {
            return Err(ApiError::UnsupportedMediaType(format!(
                "{mime}: send image/png, image/jpeg, image/bmp, image/tiff, application/octet-stream or multipart/form-data"
            )));
        }
        axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|e| body_error(&e, limit))?
            .to_vec()
    };
    if bytes.is_empty() {
        return Err(ApiError::EmptyBody);
    }
    Ok(bytes)
}

/// 413 when the body outgrew the limit; 408 when it stopped arriving; 400 when reading
/// it failed otherwise.
pub(super) fn body_error(e: &axum::Error, limit: usize) -> ApiError {
    if has_source::<http_body_util::LengthLimitError>(e) {
        return ApiError::BodyTooLarge(limit);
    }
    if has_source::<tower_http::timeout::TimeoutError>(e) {
        return ApiError::BodyTimeout;
    }
    ApiError::BadRequest(format!("reading the request body failed: {e}"))
}

pub(super) fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::BodyTooLarge(limit)
    } else if has_source::<tower_http::timeout::TimeoutError>(&e) {
        ApiError::BodyTimeout
    } else {
        ApiError::BadRequest(e.body_text())
    }
}

/// Whether `E` is `e` or among its causes.
pub(super) fn has_source<E: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.is::<E>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// Content types the `upload_body` fuzz target chooses between (see [`fuzz_request`]).
const FUZZ_CONTENT_TYPES: &[&str] = &[
    "image/png",
    "application/octet-stream",
    "",
    "multipart/form-data; boundary=b0undary",
    "multipart/form-data",
    "multipart/form-data; boundary=\"b0undary\"",
    "text/plain",
    "IMAGE/JPEG; charset=x",
];

/// The request the `upload_body` fuzz target makes of an input: the first byte picks the
/// declared content type (low bits) and whether the length is declared (high bit, so both
/// the early 413 and the streaming limit are reached); the rest is the body. Here so that
/// a regression test replays a found input exactly as the fuzzer framed it. `None` for an
/// empty input.
pub fn fuzz_request(data: &[u8]) -> Option<Request> {
    let (&pick, body) = data.split_first()?;
    let content_type = FUZZ_CONTENT_TYPES[pick as usize % FUZZ_CONTENT_TYPES.len()];
    let mut req = Request::post("/v1/inspect");
    if !content_type.is_empty() {
        req = req.header(header::CONTENT_TYPE, content_type);
    }
    if pick & 0x80 != 0 {
        req = req.header(header::CONTENT_LENGTH, body.len());
    }
    req.body(Body::from(body.to_vec())).ok()
}

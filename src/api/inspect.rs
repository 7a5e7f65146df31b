//! POST /v1/inspect and /v1/models/{model}/inspect.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderMap};
use axum::Json;
use sha2::{Digest, Sha256};

use super::judge::{blocking, judge};
use super::types::{InspectQuery, InspectionResponse, Links, Timings};
use super::{now_us, rfc3339, AppState};
use crate::api::error::ApiError;
use crate::storage::Record;

/// Inspect an image with the default model.
#[utoipa::path(post, path = "/v1/inspect", params(InspectQuery),
    request_body(content = Vec<u8>, description = "The image (PNG, JPEG, BMP, TIFF), raw or as multipart field `image`", content_type = "image/png"),
    responses((status = 200, body = InspectionResponse), (status = 400, body = crate::api::error::ErrorBody), (status = 413, body = crate::api::error::ErrorBody),
        (status = 415, body = crate::api::error::ErrorBody), (status = 422, body = crate::api::error::ErrorBody), (status = 429, body = crate::api::error::ErrorBody),
        (status = 503, body = crate::api::error::ErrorBody)))]
pub async fn inspect_default(
    State(state): State<Arc<AppState>>,
    q: Result<Query<InspectQuery>, QueryRejection>,
    req: Request,
) -> Result<Json<InspectionResponse>, ApiError> {
    let model = state.default_model.clone();
    inspect(state, model, query(q)?, req).await
}

/// Inspect an image with a named model.
#[utoipa::path(post, path = "/v1/models/{model}/inspect", params(("model" = String, Path), InspectQuery),
    request_body(content = Vec<u8>, description = "The image (PNG, JPEG, BMP, TIFF), raw or as multipart field `image`", content_type = "image/png"),
    responses((status = 200, body = InspectionResponse), (status = 404, body = crate::api::error::ErrorBody)))]
pub async fn inspect_model(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    q: Result<Query<InspectQuery>, QueryRejection>,
    req: Request,
) -> Result<Json<InspectionResponse>, ApiError> {
    inspect(state, model, query(q)?, req).await
}

/// Query-string errors in our JSON shape.
pub fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v).map_err(|e| ApiError::BadRequest(e.body_text()))
}

async fn inspect(
    state: Arc<AppState>,
    model: String,
    q: InspectQuery,
    req: Request,
) -> Result<Json<InspectionResponse>, ApiError> {
    let started = Instant::now();
    state.model(&model)?;
    let header_str = |h: &HeaderMap, k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    let request_id = header_str(req.headers(), "x-request-id");
    let part_id = header_str(req.headers(), "x-part-id");
    if let Some(t) = q.threshold {
        if !t.is_finite() {
            return Err(ApiError::BadRequest("threshold must be a finite number".into()));
        }
    }
    let bytes = Bytes::from(read_image_body(req, state.limits.max_body_bytes).await?);
    let b = bytes.clone();
    let (digest, ext) = blocking(move || (hex::encode(Sha256::digest(&b)), extension(&b))).await?;
    let kept = q
        .store_image
        .unwrap_or(state.limits.store_images)
        .then(|| bytes.clone());
    let judged = judge(&state, &model, None, bytes, q.threshold).await?;
    let (inspection, version) = (judged.inspection, judged.version);

    let id = uuid::Uuid::now_v7().to_string();
    let created_at = now_us();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let timings = Timings {
        decode: ms(judged.decode),
        queue: ms(judged.queue),
        inference: ms(judged.inference),
        scoring: ms(judged.scoring),
        total: ms(started.elapsed()),
    };
    let mut record = Record {
        id: id.clone(),
        model: model.clone(),
        model_version: version.clone(),
        created_at,
        score: inspection.score as f64,
        threshold: inspection.threshold as f64,
        is_anomalous: inspection.is_anomalous,
        width: inspection.width as i64,
        height: inspection.height as i64,
        regions: serde_json::to_value(&inspection.regions).expect("regions serialise"),
        timings: serde_json::to_value(&timings).expect("timings serialise"),
        image_sha256: digest,
        image_path: None,
        request_id: request_id.clone(),
        part_id: part_id.clone(),
    };
    // The image write and the row run as one detached task: a client that hangs up
    // cannot leave a stored image without its row. A 200 means the row is committed.
    let st = state.clone();
    let record = tokio::spawn(async move {
        if let Some(bytes) = kept {
            let blobs = st.blobs.clone();
            let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
            let id = record.id.clone();
            let put = blocking(move || blobs.put(&day, &id, ext, &bytes)).await?;
            record.image_path = Some(put.map_err(|e| ApiError::ImageStoreUnavailable(e.to_string()))?);
        }
        if let Err(e) = st.store.insert(&record).await {
            if let Some(p) = &record.image_path {
                let _ = st.blobs.remove(p);
            }
            return Err(ApiError::from(e));
        }
        Ok(record)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let image_path = record.image_path.clone();

    let verdict = if inspection.is_anomalous { "anomalous" } else { "normal" };
    metrics::counter!(crate::metrics::VERDICTS, "model" => model.clone(), "verdict" => verdict).increment(1);
    metrics::histogram!(crate::metrics::SCORES, "model" => model.clone()).record(inspection.score as f64);
    metrics::histogram!(crate::metrics::INSPECTION_SECONDS, "model" => model.clone())
        .record(started.elapsed().as_secs_f64());
    Ok(Json(InspectionResponse {
        links: Links::for_id(&id),
        id,
        model,
        model_version: version,
        score: record.score,
        threshold: record.threshold,
        is_anomalous: inspection.is_anomalous,
        regions: inspection.regions,
        width: record.width,
        height: record.height,
        timings_ms: timings,
        created_at: rfc3339(created_at),
        request_id,
        part_id,
        image_stored: image_path.is_some(),
        feedback: None,
    }))
}

/// The file extension for a stored image, from its content.
fn extension(bytes: &[u8]) -> &'static str {
    image::guess_format(bytes)
        .ok()
        .and_then(|f| f.extensions_str().first().copied())
        .unwrap_or("bin")
}

/// Reads the image from a raw body or a multipart field `image`, within `limit` bytes.
async fn read_image_body(req: Request, limit: usize) -> Result<Vec<u8>, ApiError> {
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
                found = Some(field.bytes().await.map_err(|e| multipart_error(e, limit))?.to_vec());
                break;
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

/// 413 when the body outgrew the limit; 400 when reading it failed otherwise.
fn body_error(e: &axum::Error, limit: usize) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return ApiError::BodyTooLarge(limit);
        }
        source = s.source();
    }
    ApiError::BadRequest(format!("reading the request body failed: {e}"))
}

fn multipart_error(e: axum::extract::multipart::MultipartError, limit: usize) -> ApiError {
    if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::BodyTooLarge(limit)
    } else {
        ApiError::BadRequest(e.body_text())
    }
}

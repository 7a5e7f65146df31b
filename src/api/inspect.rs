//! POST /v1/inspect and /v1/models/{model}/inspect.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use sha2::{Digest, Sha256};

use super::judge::{blocking, judge};
use super::types::{InspectQuery, InspectionResponse, Links, Timings};
use super::upload::read_image_body;
use super::{now_us, rfc3339, AppState};
use crate::api::error::ApiError;
use crate::detector::Overrides;
use crate::storage::{Record, StoreError};

/// Longest `X-Part-Id` stored with a record (a serial number or a barcode's text).
pub const MAX_PART_ID: usize = 256;

/// Longest `Idempotency-Key` (a UUID is 36 characters).
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Inspect an image with the default model.
#[utoipa::path(post, path = "/v1/inspect", params(InspectQuery),
    request_body(content = Vec<u8>, description = "The image (PNG, JPEG, BMP, TIFF), raw or as multipart field `image`", content_type = "image/png"),
    responses((status = 200, body = InspectionResponse), (status = 400, body = crate::api::error::ErrorBody), (status = 404, body = crate::api::error::ErrorBody),
        (status = 408, body = crate::api::error::ErrorBody), (status = 413, body = crate::api::error::ErrorBody),
        (status = 415, body = crate::api::error::ErrorBody), (status = 422, body = crate::api::error::ErrorBody), (status = 429, body = crate::api::error::ErrorBody),
        (status = 503, body = crate::api::error::ErrorBody)))]
pub async fn inspect_default(
    State(state): State<Arc<AppState>>,
    q: Result<Query<InspectQuery>, QueryRejection>,
    req: Request,
) -> Result<Response, ApiError> {
    let Some(model) = state.default_model_name() else {
        let names: Vec<String> = state.models.read().expect("models lock").keys().cloned().collect();
        return Err(ApiError::NoDefaultModel(names.join(", ")));
    };
    inspect(state, model, query(q)?, req).await
}

/// Inspect an image with a named model.
#[utoipa::path(post, path = "/v1/models/{model}/inspect", params(("model" = String, Path), InspectQuery),
    request_body(content = Vec<u8>, description = "The image (PNG, JPEG, BMP, TIFF), raw or as multipart field `image`", content_type = "image/png"),
    responses((status = 200, body = InspectionResponse), (status = 400, body = crate::api::error::ErrorBody), (status = 404, body = crate::api::error::ErrorBody),
        (status = 408, body = crate::api::error::ErrorBody), (status = 413, body = crate::api::error::ErrorBody),
        (status = 415, body = crate::api::error::ErrorBody), (status = 422, body = crate::api::error::ErrorBody), (status = 429, body = crate::api::error::ErrorBody),
        (status = 503, body = crate::api::error::ErrorBody)))]
pub async fn inspect_model(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
    q: Result<Query<InspectQuery>, QueryRejection>,
    req: Request,
) -> Result<Response, ApiError> {
    inspect(state, model, query(q)?, req).await
}

/// Query-string errors in our JSON shape.
pub fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v).map_err(|e| ApiError::BadRequest(e.body_text()))
}

/// The part id a request names: UTF-8 text (a serial with an umlaut is kept, not dropped),
/// one header at most.
fn part_id(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all("x-part-id").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::BadRequest("send one X-Part-Id header, not several".into()));
    }
    let text = std::str::from_utf8(value.as_bytes())
        .map_err(|_| ApiError::BadRequest("X-Part-Id must be UTF-8 text".into()))?;
    // Control characters and direction overrides would make a stored id display as
    // another (on the page, in exports).
    if text
        .chars()
        .any(|c| c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'))
    {
        return Err(ApiError::BadRequest(
            "X-Part-Id may not hold control or text-direction characters".into(),
        ));
    }
    Ok((!text.is_empty()).then(|| text.to_string()))
}

/// The `Idempotency-Key` a request names (after the IETF draft of that header: a
/// structured-field string, so quotes around it are allowed and not part of the key).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut values = headers.get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::BadRequest(
            "send one Idempotency-Key header, not several".into(),
        ));
    }
    let bytes = value.as_bytes();
    let key = match bytes {
        [b'"', inner @ .., b'"'] => inner,
        _ => bytes,
    };
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY
        || !key
            .iter()
            .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        return Err(ApiError::BadRequest(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters without quotes or backslashes inside, e.g. a UUID"
        )));
    }
    Ok(Some(String::from_utf8_lossy(key).into_owned()))
}

/// What a retry must share with the request that first used its key: the model named, the
/// image, the part and the overrides. Another request under a used key is refused rather
/// than answered with a verdict about something else.
fn fingerprint(model: &str, image_sha256: &str, part_id: Option<&str>, q: &InspectQuery) -> String {
    let canonical = serde_json::json!([model, image_sha256, part_id, q.threshold, q.alpha]).to_string();
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

/// The answer recorded for `key`, again, if the request matches the one that first used it.
async fn replay(state: &AppState, key: &str, fingerprint: &str) -> Result<Option<Response>, ApiError> {
    let Some(record) = state.store.by_idempotency_key(key).await? else {
        return Ok(None);
    };
    if record.request_fingerprint.as_deref() != Some(fingerprint) {
        return Err(ApiError::IdempotencyKeyReused(format!(
            "Idempotency-Key {key:?} was sent before with another image, model, part id or override \
             (inspection {}): use a new key for a new request",
            record.id
        )));
    }
    metrics::counter!(crate::metrics::REPLAYS, "model" => record.model.clone()).increment(1);
    let feedback = state
        .store
        .labels_of(std::slice::from_ref(&record.id))
        .await?
        .remove(&record.id);
    let mut resp = Json(super::records::to_response(record, feedback)).into_response();
    resp.headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(Some(resp))
}

async fn inspect(state: Arc<AppState>, model: String, q: InspectQuery, req: Request) -> Result<Response, ApiError> {
    let started = Instant::now();
    // A full queue refuses before the body is read: an overloaded server answers 429 in
    // the time it takes to parse the headers, not to receive and hash an image. (Not a
    // reservation: `judge` admits for real, and may still refuse, once the body is in.)
    if state.model(&model)?.engine.is_full() {
        return Err(ApiError::Overloaded(model));
    }
    let header_str = |h: &HeaderMap, k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    let request_id = header_str(req.headers(), "x-request-id");
    let part_id = part_id(req.headers())?;
    let key = idempotency_key(req.headers())?;
    if part_id.as_ref().is_some_and(|p| p.len() > MAX_PART_ID) {
        return Err(ApiError::BadRequest(format!(
            "X-Part-Id is at most {MAX_PART_ID} bytes"
        )));
    }
    if let Some(t) = q.threshold {
        if !(t.is_finite() && t >= 0.0) {
            return Err(ApiError::BadRequest(
                "threshold must be a finite number of 0 or more".into(),
            ));
        }
    }
    if let Some(a) = q.alpha {
        let detector = state.model(&model)?.engine.detector();
        detector
            .card
            .architecture
            .check_alpha(a)
            .map_err(ApiError::BadRequest)?;
    }
    let overrides = Overrides {
        threshold: q.threshold,
        alpha: q.alpha,
    };
    let bytes = Bytes::from(read_image_body(req, state.limits.max_body_bytes).await?);
    let b = bytes.clone();
    let (digest, ext) = blocking(move || (hex::encode(Sha256::digest(&b)), extension(&b))).await?;
    // A retry of a recorded request is answered from its record, without the model.
    let request_fingerprint = fingerprint(&model, &digest, part_id.as_deref(), &q);
    if let Some(key) = &key {
        if let Some(resp) = replay(&state, key, &request_fingerprint).await? {
            return Ok(resp);
        }
    }
    let kept = q
        .store_image
        .unwrap_or(state.limits.store_images)
        .then(|| bytes.clone());
    let judged = judge(&state, &model, None, bytes, overrides).await?;
    let (inspection, version, detector) = (judged.inspection, judged.version, judged.detector);

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
        alpha: inspection.alpha.map(f64::from),
        pixel_threshold: Some(inspection.pixel_threshold as f64),
        idempotency_key: key.clone(),
        request_fingerprint: key.is_some().then_some(request_fingerprint.clone()),
        warnings: inspection.warnings.clone(),
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
            return match e {
                StoreError::KeyTaken(_) => Ok(None),
                e => Err(ApiError::from(e)),
            };
        }
        Ok(Some(record))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let Some(record) = record else {
        // A request with the same key was recorded while this one was judged (a retry
        // sent before the first answer, here or on another replica): both get its answer.
        let key = key.as_deref().unwrap_or_default();
        return replay(&state, key, &request_fingerprint)
            .await?
            .ok_or_else(|| ApiError::Internal(format!("the record holding idempotency key {key:?} vanished")));
    };
    let image_path = record.image_path.clone();

    let verdict = if inspection.is_anomalous { "anomalous" } else { "normal" };
    metrics::counter!(crate::metrics::VERDICTS, "model" => model.clone(), "verdict" => verdict).increment(1);
    metrics::histogram!(crate::metrics::SCORES, "model" => model.clone()).record(inspection.score as f64);
    metrics::histogram!(crate::metrics::INSPECTION_SECONDS, "model" => model.clone())
        .record(started.elapsed().as_secs_f64());
    state.live.record(&model, timings.total, inspection.is_anomalous);
    // Drift compares scores with the calibration's, made at the model's own map mix.
    // The judging detector's, not a second lookup: the record is durable by now, so
    // nothing here may fail, and a model swapped meanwhile has other calibration scores.
    if !inspection.is_anomalous && q.alpha.is_none() {
        state
            .live
            .record_good(&model, &id, inspection.score, &detector.card.validation_scores.values);
    }
    Ok(Json(InspectionResponse {
        links: Links::for_id(&id, image_path.is_some()),
        id,
        model,
        model_version: version,
        score: record.score,
        threshold: record.threshold,
        pixel_threshold: record.pixel_threshold,
        is_anomalous: inspection.is_anomalous,
        regions: inspection.regions,
        width: record.width,
        height: record.height,
        timings_ms: timings,
        alpha: record.alpha,
        warnings: inspection.warnings,
        created_at: rfc3339(created_at),
        request_id,
        part_id,
        image_stored: image_path.is_some(),
        feedback: None,
        feedback_note: None,
    })
    .into_response())
}

/// The file extension for a stored image, from its content.
fn extension(bytes: &[u8]) -> &'static str {
    image::guess_format(bytes)
        .ok()
        .and_then(|f| f.extensions_str().first().copied())
        .unwrap_or("bin")
}

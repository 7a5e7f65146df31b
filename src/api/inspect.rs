//! POST /v1/inspect and /v1/models/{model}/inspect.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use sha2::{Digest, Sha256};

use super::judge::{blocking, judge};
use super::types::{InspectQuery, InspectionResponse, Timings};
use super::upload::read_image_body;
use super::{discovery, idempotency, now_us, AppState};
use crate::api::error::ApiError;
use crate::detector::Overrides;
use crate::storage::{Record, StoreError};

/// Longest `X-Part-Id` stored with a record (a serial number or a barcode's text).
pub const MAX_PART_ID: usize = 256;

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

async fn inspect(state: Arc<AppState>, model: String, q: InspectQuery, req: Request) -> Result<Response, ApiError> {
    let started = Instant::now();
    let header_str = |h: &HeaderMap, k: &str| h.get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
    let request_id = header_str(req.headers(), "x-request-id");
    let part_id = part_id(req.headers())?;
    let key = idempotency::key(req.headers())?;
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
    let served = discovery::find_model(&state, &model).await?;
    // Before a replay: a fingerprint writes NaN as null, so `alpha=NaN` with a recorded
    // key would otherwise be answered from the record of a request without alpha.
    if let Some(a) = q.alpha {
        served
            .engine
            .detector()
            .card
            .architecture
            .check_alpha(a)
            .map_err(ApiError::BadRequest)?;
    }
    // A full queue refuses before the body is read: an overloaded server answers 429 in
    // the time it takes to parse the headers, not to receive and hash an image. (Not a
    // reservation: `judge` admits for real, and may still refuse, once the body is in.)
    // A retry whose key is recorded needs no slot: it is answered from its record.
    if served.engine.is_full() {
        let recorded = match &key {
            Some(key) => state.store.by_idempotency_key(&model, key).await?.is_some(),
            None => false,
        };
        if !recorded {
            return Err(ApiError::Overloaded(model));
        }
    }
    let bytes = Bytes::from(read_image_body(req, state.limits.max_body_bytes).await?);
    let b = bytes.clone();
    let (digest, ext) = blocking(move || (hex::encode(Sha256::digest(&b)), extension(&b))).await?;
    let mut in_flight = None;
    let mut request_fingerprint = None;
    if let Some(key) = &key {
        let fingerprint = idempotency::fingerprint(&digest, part_id.as_deref(), q.threshold, q.alpha);
        in_flight = Some(
            state
                .idempotency
                .hold(&model, key, state.limits.request_timeout)
                .await?,
        );
        if let Some(resp) = idempotency::replay(&state, &model, key, &fingerprint).await? {
            return Ok(resp);
        }
        request_fingerprint = Some(fingerprint);
    }
    let overrides = Overrides {
        threshold: q.threshold,
        alpha: q.alpha,
    };
    let kept = q
        .store_image
        .unwrap_or(state.limits.store_images)
        .then(|| bytes.clone());
    let judged = judge(&state, &model, None, bytes, overrides).await?;
    let (inspection, version, detector) = (judged.inspection, judged.version, judged.detector);

    let id = uuid::Uuid::now_v7().to_string();
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
        model_version: version,
        created_at: now_us(),
        score: inspection.score as f64,
        threshold: inspection.threshold as f64,
        is_anomalous: inspection.is_anomalous,
        width: inspection.width as i64,
        height: inspection.height as i64,
        regions: serde_json::to_value(&inspection.regions).expect("regions serialise"),
        timings: serde_json::to_value(&timings).expect("timings serialise"),
        image_sha256: digest,
        image_path: None,
        request_id,
        part_id,
        alpha: inspection.alpha.map(f64::from),
        pixel_threshold: Some(inspection.pixel_threshold as f64),
        idempotency_key: key,
        request_fingerprint: request_fingerprint.clone(),
        warnings: inspection.warnings,
        maps_version: detector.card.maps_version(),
    };
    // The image write and the row run as one detached task: a client that hangs up
    // cannot leave a stored image without its row. A 200 means the row is committed.
    let st = state.clone();
    let stored = tokio::spawn(async move {
        // Until the row is committed (or refused), whether or not the client waits.
        let _in_flight = in_flight;
        if let Some(bytes) = kept {
            let blobs = st.blobs.clone();
            // The record's own day (UTC), so that retention, which removes whole day folders
            // once their records are pruned, never meets a kept record's image in one.
            let day = chrono::DateTime::from_timestamp_micros(record.created_at)
                .unwrap_or_else(chrono::Utc::now)
                .format("%Y-%m-%d")
                .to_string();
            let id = record.id.clone();
            let put = blocking(move || blobs.put(&day, &id, ext, &bytes)).await?;
            record.image_path = Some(put.map_err(|e| ApiError::ImageStoreUnavailable(e.to_string()))?);
        }
        let remove_image = |path: Option<String>| {
            let blobs = st.blobs.clone();
            async move {
                if let Some(p) = path {
                    let _ = blocking(move || blobs.remove(&p)).await;
                }
            }
        };
        match st.store.insert(&record).await {
            Ok(()) => Ok(Ok(record)),
            Err(StoreError::KeyTaken(key)) => {
                remove_image(record.image_path.clone()).await;
                Ok(Err(key))
            }
            // A failed insert may still have committed (the connection lost during
            // COMMIT): then the row stands, and so must its image. Only a row known absent
            // lets the image go; when the database cannot say, the image stays (an orphan
            // file, never a record without its image).
            Err(e) => match st.store.get(&record.id).await {
                Ok(Some(_)) => {
                    tracing::warn!(id = %record.id, "the insert reported {e}, but the record is committed");
                    Ok(Ok(record))
                }
                Ok(None) => {
                    remove_image(record.image_path.clone()).await;
                    Err(ApiError::from(e))
                }
                Err(_) => Err(ApiError::from(e)),
            },
        }
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let record = match stored {
        Ok(record) => record,
        Err(key) => {
            // Another replica sharing the database recorded a request with this key while
            // this one was judged: both answer with its record.
            let fingerprint = request_fingerprint.unwrap_or_default();
            return idempotency::replay(&state, &model, &key, &fingerprint)
                .await?
                .ok_or_else(|| ApiError::Internal(format!("the record holding idempotency key {key:?} vanished")));
        }
    };

    let [normal, anomalous] = crate::metrics::VERDICT_LABELS;
    let verdict = if record.is_anomalous { anomalous } else { normal };
    metrics::counter!(crate::metrics::VERDICTS, "model" => model.clone(), "verdict" => verdict).increment(1);
    metrics::histogram!(crate::metrics::SCORES, "model" => model.clone()).record(record.score);
    metrics::histogram!(crate::metrics::INSPECTION_SECONDS, "model" => model.clone())
        .record(started.elapsed().as_secs_f64());
    state.live.record(&model, timings.total, record.is_anomalous);
    // Drift compares scores with the calibration's, made at the model's own map mix.
    // The judging detector's, not a second lookup: the record is durable by now, so
    // nothing here may fail, and a model swapped meanwhile has other calibration scores.
    if !record.is_anomalous && q.alpha.is_none() {
        state.live.record_good(
            &model,
            &record.model_version,
            &id,
            inspection.score,
            &detector.card.validation_scores.values,
        );
    }
    Ok(Json(super::records::to_response(record, None)).into_response())
}

/// The file extension for a stored image, from its content.
fn extension(bytes: &[u8]) -> &'static str {
    image::guess_format(bytes)
        .ok()
        .and_then(|f| f.extensions_str().first().copied())
        .unwrap_or("bin")
}

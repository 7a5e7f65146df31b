//! Stored inspections: listing, one record, feedback, and images rendered on demand.
//!
//! Heatmap, anomaly map and reconstruction are rendered on demand from the stored image
//! with the model version that made the verdict (the pipeline is deterministic), so the
//! hot path writes only the image and the row. Records without a stored image, or whose
//! model has since changed, answer 404 / 409 with a stable code.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

use super::judge::{blocking, current_version, judge, Judgement, MadeBy};
use super::types::{
    FeedbackRequest, HeatmapQuery, ImageQuery, InspectionPage, InspectionResponse, Links, ListParams, Timings,
};
use super::{now_us, rfc3339, AppState};
use crate::api::error::ApiError;
use crate::detector::Overrides;
use crate::storage::{Feedback, FeedbackFilter, ListQuery, Record};

pub fn to_response(r: Record, feedback: Option<Feedback>) -> InspectionResponse {
    let timings: Timings = serde_json::from_value(r.timings).unwrap_or(Timings {
        decode: 0.0,
        queue: 0.0,
        inference: 0.0,
        scoring: 0.0,
        total: 0.0,
    });
    InspectionResponse {
        links: Links::for_id(&r.id, r.image_path.is_some()),
        id: r.id,
        model: r.model,
        model_version: r.model_version,
        score: r.score,
        threshold: r.threshold,
        pixel_threshold: r.pixel_threshold,
        is_anomalous: r.is_anomalous,
        regions: serde_json::from_value(r.regions).unwrap_or_default(),
        width: r.width,
        height: r.height,
        timings_ms: timings,
        alpha: r.alpha,
        warnings: r.warnings,
        created_at: rfc3339(r.created_at),
        request_id: r.request_id,
        part_id: r.part_id,
        idempotency_key: r.idempotency_key,
        image_stored: r.image_path.is_some(),
        feedback_note: feedback.as_ref().and_then(|f| f.note.clone()),
        feedback: feedback.map(|f| f.label),
    }
}

/// List inspections, newest first, with cursor pagination.
#[utoipa::path(get, path = "/v1/inspections", params(ListParams), responses((status = 200, body = InspectionPage), (status = 400, body = crate::api::error::ErrorBody)))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    p: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<InspectionPage>, ApiError> {
    let p = super::inspect::query(p)?;
    let parse_time = |s: &Option<String>, name: &str| -> Result<Option<i64>, ApiError> {
        s.as_ref()
            .map(|t| {
                chrono::DateTime::parse_from_rfc3339(t)
                    .map(|d| d.timestamp_micros())
                    .map_err(|_| {
                        ApiError::BadRequest(format!("{name} must be an RFC 3339 time, e.g. 2026-11-27T12:00:00Z"))
                    })
            })
            .transpose()
    };
    let anomalous = match p.verdict.as_deref() {
        None => None,
        Some("anomalous") => Some(true),
        Some("normal") => Some(false),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "verdict must be `anomalous` or `normal`, not {other:?}"
            )))
        }
    };
    let feedback = match p.feedback.as_deref() {
        None => None,
        Some("good") => Some(FeedbackFilter::Good),
        Some("defective") => Some(FeedbackFilter::Defective),
        Some("none") => Some(FeedbackFilter::Unlabelled),
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "feedback must be `good`, `defective` or `none`, not {other:?}"
            )))
        }
    };
    // No record has an empty model, part id or request id: an empty filter is a mistake
    // (a form field left blank), refused as an empty verdict or feedback is, not an
    // empty page.
    for (name, value) in [
        ("model", &p.model),
        ("part_id", &p.part_id),
        ("request_id", &p.request_id),
        ("part_prefix", &p.part_prefix),
    ] {
        if value.as_deref() == Some("") {
            return Err(ApiError::BadRequest(format!(
                "{name} must not be empty (leave it out to list every one)"
            )));
        }
        super::refuse_nul(name, value.as_deref())?;
    }
    let limit = p.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be between 1 and 500".into()));
    }
    // Ids are stored in lowercase hyphenated form; compare cursors in the same form.
    let cursor = p
        .cursor
        .as_deref()
        .map(|c| uuid::Uuid::parse_str(c).map(|u| u.to_string()))
        .transpose()
        .map_err(|_| ApiError::BadRequest("cursor is not one this server gave out".into()))?;
    let q = ListQuery {
        model: p.model.clone(),
        anomalous,
        part_id: p.part_id.clone(),
        request_id: p.request_id.clone(),
        part_prefix: p.part_prefix.clone(),
        feedback,
        since_us: parse_time(&p.since, "since")?,
        until_us: parse_time(&p.until, "until")?,
        before_id: cursor,
        limit: limit + 1,
    };
    let mut rows = state.store.list(&q).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if more { rows.last().map(|r| r.id.clone()) } else { None };
    let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    let mut labels = state.store.labels_of(&ids).await?;
    Ok(Json(InspectionPage {
        items: rows
            .into_iter()
            .map(|r| {
                let label = labels.remove(&r.id);
                to_response(r, label)
            })
            .collect(),
        next_cursor,
    }))
}

/// An inspection id from the path, in the form ids are stored in (lowercase, hyphenated),
/// so `01A2…`, braced or `urn:uuid:` forms find the same record; anything else is kept
/// as given and answers 404.
pub struct InspectionId(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for InspectionId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        // No id holds a NUL (PostgreSQL refuses one in text, which is not an outage).
        if id.contains('\0') {
            return Err(ApiError::UnknownInspection(id));
        }
        Ok(Self(uuid::Uuid::parse_str(&id).map_or(id, |u| u.to_string())))
    }
}

async fn load(state: &AppState, id: &str) -> Result<Record, ApiError> {
    state
        .store
        .get(id)
        .await?
        .ok_or_else(|| ApiError::UnknownInspection(id.to_string()))
}

/// One inspection.
#[utoipa::path(get, path = "/v1/inspections/{id}", params(("id" = String, Path)), responses((status = 200, body = InspectionResponse), (status = 404, body = crate::api::error::ErrorBody)))]
pub async fn get_one(
    State(state): State<Arc<AppState>>,
    InspectionId(id): InspectionId,
) -> Result<Json<InspectionResponse>, ApiError> {
    let r = load(&state, &id).await?;
    let fb = state.store.feedback_of(&id).await?;
    Ok(Json(to_response(r, fb)))
}

/// Label an inspection `good` or `defective`.
#[utoipa::path(post, path = "/v1/inspections/{id}/feedback", params(("id" = String, Path)), request_body = FeedbackRequest,
    responses((status = 200, body = InspectionResponse), (status = 400, body = crate::api::error::ErrorBody), (status = 404, body = crate::api::error::ErrorBody),
        (status = 413, body = crate::api::error::ErrorBody), (status = 415, body = crate::api::error::ErrorBody)))]
pub async fn feedback(
    State(state): State<Arc<AppState>>,
    InspectionId(id): InspectionId,
    body: Result<Json<FeedbackRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<InspectionResponse>, ApiError> {
    let Json(body) = body.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::BodyTooLarge(64 * 1024)
        } else if e.status() == axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE {
            ApiError::UnsupportedMediaType(e.body_text())
        } else if super::upload::has_source::<tower_http::timeout::TimeoutError>(&e) {
            ApiError::BodyTimeout
        } else {
            ApiError::BadRequest(e.body_text())
        }
    })?;
    super::refuse_nul("note", body.note.as_deref())?;
    let defective = match body.label.as_str() {
        "good" => false,
        "defective" => true,
        other => {
            return Err(ApiError::BadRequest(format!(
                "label must be `good` or `defective`, not {other:?}"
            )))
        }
    };
    let before = state.store.feedback_of(&id).await?.map(|f| f.label);
    if !state
        .store
        .set_feedback(&id, defective, body.note.as_deref(), now_us())
        .await?
    {
        return Err(ApiError::UnknownInspection(id));
    }
    let r = load(&state, &id).await?;
    // A false alarm is a good part too: its score counts towards drift (parts judged
    // normal count when they are judged); a part labelled defective leaves the window.
    // (A normal verdict labelled defective and then good again comes back into it.)
    let served = state.model(&r.model).ok().map(|m| m.engine.current());
    if defective {
        let reference = served
            .as_ref()
            .map_or(&[][..], |(d, _)| &d.card.validation_scores.values[..]);
        state.live.forget_good(&r.model, &id, reference);
    } else if before.as_deref() != Some("good") && (r.is_anomalous || before.as_deref() == Some("defective")) {
        if let Some((detector, version)) = &served {
            if *version == r.model_version {
                state.live.record_good(
                    &r.model,
                    version,
                    &id,
                    r.score as f32,
                    &detector.card.validation_scores.values,
                );
            }
        }
    }
    // The record with the label just stored, as `GET` reads it back.
    let feedback = Feedback {
        label: body.label,
        note: body.note,
    };
    Ok(Json(to_response(r, Some(feedback))))
}

/// Judges the stored image again with the model version that made the verdict.
async fn rerun(state: &AppState, id: &str) -> Result<(Record, Judgement), ApiError> {
    let r = load(state, id).await?;
    let in_context = |e| match e {
        ApiError::ModelChanged(why) => ApiError::ModelChanged(format!("inspection {id} was {why}")),
        other => other,
    };
    // A changed model answers 409 before any I/O; `judge` checks again together with the work.
    let served = super::discovery::find_model(state, &r.model).await?;
    let made_by = MadeBy {
        version: &r.model_version,
        maps_version: r.maps_version.as_deref(),
    };
    current_version(&served, Some(made_by)).map_err(in_context)?;
    let path = r
        .image_path
        .clone()
        .ok_or_else(|| ApiError::NotStored(format!("the image of inspection {id} was not stored")))?;
    let blobs = state.blobs.clone();
    let bytes = blocking(move || blobs.get(&path))
        .await?
        .map_err(|_| ApiError::NotStored(format!("the stored image of inspection {id} is gone (retention?)")))?;
    let overrides = Overrides {
        threshold: Some(r.threshold as f32),
        alpha: r.alpha.map(|a| a as f32),
    };
    let judged = judge(state, &r.model, Some(made_by), bytes.into(), overrides)
        .await
        .map_err(in_context)?;
    Ok((r, judged))
}

fn png(img: image::RgbImage) -> Result<axum::response::Response, ApiError> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "image/png")], out.into_inner()).into_response())
}

/// The heatmap overlay (PNG), rendered on demand.
#[utoipa::path(get, path = "/v1/inspections/{id}/heatmap.png", params(("id" = String, Path), HeatmapQuery), responses((status = 200, content_type = "image/png", body = Vec<u8>),
    (status = 400, body = crate::api::error::ErrorBody), (status = 404, body = crate::api::error::ErrorBody), (status = 409, body = crate::api::error::ErrorBody), (status = 422, body = crate::api::error::ErrorBody), (status = 503, body = crate::api::error::ErrorBody)))]
pub async fn heatmap(
    State(state): State<Arc<AppState>>,
    InspectionId(id): InspectionId,
    q: Result<Query<HeatmapQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let opacity = super::inspect::query(q)?.opacity.unwrap_or(0.5);
    if !(0.0..=1.0).contains(&opacity) {
        return Err(ApiError::BadRequest("opacity must be between 0 and 1".into()));
    }
    let (record, judged) = rerun(&state, &id).await?;
    let channels = judged.detector.card.input.channels;
    // Outlined where the verdict's regions were cut, even if the model was recalibrated.
    let pixel_threshold = record
        .pixel_threshold
        .map_or(judged.inspection.pixel_threshold, |t| t as f32);
    let out = blocking(move || {
        let (img, insp) = (judged.image, judged.inspection);
        let base = crate::image_io::Planar::from_image(&img, channels).to_rgb8();
        crate::scoring::heatmap::render_heatmap(&base, &insp.map(), pixel_threshold, opacity)
    })
    .await?;
    png(out)
}

/// The stored image, as it was uploaded (any model version: it is what was sent), or
/// with `?format=png` as PNG.
#[utoipa::path(get, path = "/v1/inspections/{id}/image", params(("id" = String, Path), ImageQuery), responses((status = 200, description = "The image as uploaded, in its own format (PNG with `?format=png`)",
    content((Vec<u8> = "image/png"), (Vec<u8> = "image/jpeg"), (Vec<u8> = "image/bmp"), (Vec<u8> = "image/tiff"))),
    (status = 400, body = crate::api::error::ErrorBody), (status = 404, body = crate::api::error::ErrorBody)))]
pub async fn image(
    State(state): State<Arc<AppState>>,
    InspectionId(id): InspectionId,
    q: Result<Query<ImageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    let as_png = match super::inspect::query(q)?.format.as_deref() {
        None => false,
        Some("png") => true,
        Some(other) => return Err(ApiError::BadRequest(format!("format must be `png`, not {other:?}"))),
    };
    let r = load(&state, &id).await?;
    let path = r
        .image_path
        .ok_or_else(|| ApiError::NotStored(format!("the image of inspection {id} was not stored")))?;
    let blobs = state.blobs.clone();
    let bytes = blocking(move || blobs.get(&path))
        .await?
        .map_err(|_| ApiError::NotStored(format!("the stored image of inspection {id} is gone (retention?)")))?;
    if as_png {
        let max_pixels = state.limits.max_pixels;
        let img = blocking(move || crate::image_io::decode(&bytes, max_pixels)).await??;
        return png(img.to_rgb8());
    }
    let mime = image::guess_format(&bytes).map_or("application/octet-stream", |f| f.to_mime_type());
    Ok((
        [
            (header::CONTENT_TYPE, mime),
            // Inspections never change: the browser may keep it.
            (header::CACHE_CONTROL, "private, max-age=86400, immutable"),
        ],
        bytes,
    )
        .into_response())
}

/// The anomaly map: float32 .npy, height × width (as `vigil inspect --maps-dir` writes).
#[utoipa::path(get, path = "/v1/inspections/{id}/anomaly_map.npy", params(("id" = String, Path)), responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>),
    (status = 404, body = crate::api::error::ErrorBody), (status = 409, body = crate::api::error::ErrorBody), (status = 422, body = crate::api::error::ErrorBody), (status = 503, body = crate::api::error::ErrorBody)))]
pub async fn anomaly_map(
    State(state): State<Arc<AppState>>,
    InspectionId(id): InspectionId,
) -> Result<axum::response::Response, ApiError> {
    let insp = rerun(&state, &id).await?.1.inspection;
    let bytes = blocking(move || crate::npy::encode_f32_2d(&insp.map(), insp.height, insp.width)).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

/// The model's reconstruction at working resolution (PNG).
#[utoipa::path(get, path = "/v1/inspections/{id}/reconstruction.png", params(("id" = String, Path)), responses((status = 200, content_type = "image/png", body = Vec<u8>),
    (status = 404, body = crate::api::error::ErrorBody), (status = 409, body = crate::api::error::ErrorBody), (status = 422, body = crate::api::error::ErrorBody), (status = 503, body = crate::api::error::ErrorBody)))]
pub async fn reconstruction(
    State(state): State<Arc<AppState>>,
    InspectionId(id): InspectionId,
) -> Result<axum::response::Response, ApiError> {
    let recon = rerun(&state, &id).await?.1.reconstruction;
    png(recon.image.to_rgb8())
}

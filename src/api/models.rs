//! Models: list, card with feedback counts, reload.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::Json;

use super::judge::{blocking, MadeBy};
use super::types::{FeedbackSummary, ModelDetail, ModelSummary};
use super::{AppState, ServedModel};
use crate::api::error::ApiError;
use crate::eval::metrics::Confusion;

/// The models this server serves.
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = Vec<ModelSummary>)))]
pub async fn list(State(state): State<Arc<AppState>>) -> Json<Vec<ModelSummary>> {
    // Models another replica trained into a shared folder are listed as soon as they exist.
    super::discovery::sync_models(&state).await;
    let default = state.default_model_name();
    Json(
        state
            .model_list()
            .into_iter()
            .map(|(name, m)| summary(name, &m, default.as_deref()))
            .collect(),
    )
}

/// What the list says of one model.
fn summary(name: String, served: &ServedModel, default: Option<&str>) -> ModelSummary {
    // Read together, so the version is the one of this detector.
    let (d, version) = served.engine.current();
    ModelSummary {
        is_default: default == Some(name.as_str()),
        name,
        version,
        architecture: d.card.architecture.name().to_string(),
        image_threshold: d.card.thresholds.image as f64,
    }
}

/// A model's card and what operator feedback says about its threshold.
#[utoipa::path(get, path = "/v1/models/{model}", params(("model" = String, Path)), responses((status = 200, body = ModelDetail), (status = 404, body = crate::api::error::ErrorBody), (status = 422, description = "The model's folder does not load (`model_load_failed`)", body = crate::api::error::ErrorBody)))]
pub async fn card(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Json<ModelDetail>, ApiError> {
    let served = super::discovery::find_model(&state, &model).await?;
    let (d, version) = served.engine.current();
    let stats = state.store.feedback_stats(&model).await?;
    // Only scores on this version's scale: another version's weights score otherwise.
    let maps_version = d.card.maps_version();
    let comparable: Vec<_> = stats
        .labelled_scores
        .iter()
        .filter(|l| {
            let made_by = MadeBy {
                version: &l.model_version,
                maps_version: l.maps_version.as_deref(),
            };
            made_by.drawn_alike(&version, maps_version.as_deref())
        })
        .collect();
    let both = comparable.iter().any(|l| l.defective) && comparable.iter().any(|l| !l.defective);
    let suggested_threshold = both.then(|| {
        let (s, l): (Vec<f32>, Vec<bool>) = comparable.iter().map(|l| (l.score as f32, l.defective)).unzip();
        Confusion::best_f1(&s, &l).threshold as f64
    });
    Ok(Json(ModelDetail {
        name: model,
        version,
        device: crate::model::device::name(d.device()).into(),
        card: serde_json::to_value(&d.card).map_err(|e| ApiError::Internal(e.to_string()))?,
        feedback: FeedbackSummary {
            labelled: stats.labelled,
            false_positives: stats.false_positives,
            false_negatives: stats.false_negatives,
            suggested_threshold,
            suggestion_labels: comparable.len() as i64,
        },
    }))
}

/// Reload a model's artifact from disk (admin). Requests in flight finish with the old one.
#[utoipa::path(post, path = "/v1/models/{model}/reload", params(("model" = String, Path)), responses((status = 200, body = ModelSummary), (status = 404, body = crate::api::error::ErrorBody), (status = 422, body = crate::api::error::ErrorBody)))]
pub async fn reload(
    State(state): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> Result<Json<ModelSummary>, ApiError> {
    let was_served = state.model(&model).is_ok();
    let served = super::discovery::find_model(&state, &model).await?;
    if !was_served {
        // Its folder had just appeared: loaded from disk this moment, once is enough.
        return Ok(Json(summary(model, &served, state.default_model_name().as_deref())));
    }
    let _one_at_a_time = served.reload.lock().await;
    let dir = served.dir.clone();
    let device = state.device.clone();
    let (detector, version) = blocking(move || crate::registry::load_warm(&dir, &device))
        .await?
        .map_err(|e| {
            ApiError::ModelLoadFailed(format!(
                "the model on disk does not load; the one loaded before keeps serving: {e:#}"
            ))
        })?;
    state.replace_model(&model, &served, detector, version.clone());
    tracing::info!(model, version, "model reloaded");
    // Under the reload lock: what it serves now is what was just loaded.
    Ok(Json(summary(model, &served, state.default_model_name().as_deref())))
}

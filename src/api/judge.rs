//! The model work every image route shares: admit → decode → run → score.
//!
//! `POST …/inspect` judges an uploaded image; the re-render routes judge a stored one
//! again with the version that made the verdict. Both go through [`judge`], so admission,
//! the request timeout, the blocking-pool hops and the stage metrics are the same.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use image::DynamicImage;

use super::error::ApiError;
use super::{AppState, ServedModel};
use crate::detector::{Detector, Inspection, Overrides, Reconstruction};

/// One image judged by one model version.
pub struct Judgement {
    pub image: DynamicImage,
    /// The detector that judged (a model swapped meanwhile does not change it).
    pub detector: Arc<Detector>,
    pub version: String,
    pub reconstruction: Reconstruction,
    pub inspection: Inspection,
    pub decode: Duration,
    pub queue: Duration,
    pub inference: Duration,
    pub scoring: Duration,
    /// This image's share of the pixel budget, given back when the judgement is dropped.
    pub pixels: tokio::sync::OwnedSemaphorePermit,
}

/// What made a stored verdict, for judging its image again: the model version and, when
/// known, what its maps depend on (`ModelCard::maps_version`).
#[derive(Debug, Clone, Copy)]
pub struct MadeBy<'a> {
    pub version: &'a str,
    pub maps_version: Option<&'a str>,
}

impl MadeBy<'_> {
    /// Whether the model at `version` (maps version `maps_version`) draws this verdict's
    /// maps and scores alike: the same version, or the same known maps version.
    pub fn drawn_alike(&self, version: &str, maps_version: Option<&str>) -> bool {
        self.version == version || (self.maps_version.is_some() && self.maps_version == maps_version)
    }
}

/// Judges `bytes` with `model`. With `made_by`, the model must still draw that verdict's
/// maps: the same version, or one with the same maps version (a recalibration changes
/// only thresholds); 409 `model_changed` otherwise. The detector and its version are read
/// together, so the check holds for the model that does the work. `overrides` change the
/// threshold or the mix of learned maps for this image only.
pub async fn judge(
    state: &AppState,
    model: &str,
    made_by: Option<MadeBy<'_>>,
    bytes: Bytes,
    overrides: Overrides,
) -> Result<Judgement, ApiError> {
    let served = super::discovery::find_model(state, model).await?;
    let (detector, current) = current_version(&served, made_by)?;
    // Admission before any heavy work: a full queue answers 429 at once.
    let permit = served
        .engine
        .admit()
        .map_err(|_| ApiError::Overloaded(model.to_string()))?;
    metrics::gauge!(crate::metrics::QUEUE_DEPTH, "model" => model.to_string()).set(served.engine.in_flight() as f64);

    let decode_started = Instant::now();
    let max_pixels = state.limits.max_pixels;
    // Held until the answer is built: the decoded image (and, for an anomalous verdict,
    // its map at full size while regions are found) is the memory a request takes, and its
    // size is known from the header before decoding.
    let (width, height) = crate::image_io::dimensions(&bytes, max_pixels)?;
    // One deadline for both waits (for room and for the model), as the timeout promises.
    let deadline = tokio::time::Instant::now() + state.limits.request_timeout;
    let pixels = tokio::time::timeout_at(deadline, state.limits.pixel_budget.hold(width as u64 * height as u64))
        .await
        .map_err(|_| ApiError::Timeout)?;
    let d = detector.clone();
    let (image, prepared) = blocking(move || {
        let img = crate::image_io::decode(&bytes, max_pixels)?;
        let prepared = d.prepare(&img);
        Ok::<_, ApiError>((img, prepared))
    })
    .await??;
    let decode = decode_started.elapsed();
    metrics::histogram!(crate::metrics::DECODE_SECONDS, "model" => model.to_string()).record(decode.as_secs_f64());

    let prepared = Arc::new(prepared);
    let reply = tokio::time::timeout_at(deadline, served.engine.run(permit, prepared.clone(), detector.clone()))
        .await
        .map_err(|_| ApiError::Timeout)??;
    metrics::histogram!(crate::metrics::QUEUE_SECONDS, "model" => model.to_string())
        .record(reply.queue_time.as_secs_f64());

    let scoring_started = Instant::now();
    let output = reply.output;
    let d = detector.clone();
    let (inspection, reconstruction) = blocking(move || {
        let recon = d.assemble(&prepared.working, output);
        (d.score(&prepared, &recon, overrides), recon)
    })
    .await?;
    let scoring = scoring_started.elapsed();
    metrics::histogram!(crate::metrics::SCORING_SECONDS, "model" => model.to_string()).record(scoring.as_secs_f64());
    Ok(Judgement {
        image,
        detector,
        version: current,
        reconstruction,
        inspection,
        decode,
        queue: reply.queue_time,
        inference: reply.inference_time,
        scoring,
        pixels,
    })
}

/// The model's detector and its version, read together. With `made_by`, the model must
/// still draw that verdict's maps (see [`judge`]): 409 `model_changed` otherwise.
pub fn current_version(served: &ServedModel, made_by: Option<MadeBy<'_>>) -> Result<(Arc<Detector>, String), ApiError> {
    let (detector, current) = served.engine.current();
    let Some(made_by) = made_by else {
        return Ok((detector, current));
    };
    if made_by.drawn_alike(&current, detector.card.maps_version().as_deref()) {
        return Ok((detector, current));
    }
    Err(ApiError::ModelChanged(format!(
        "made by model version {}, the server now runs {current} (other weights or scoring)",
        made_by.version
    )))
}

/// Runs CPU-bound work on the blocking pool, off the async workers.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))
}

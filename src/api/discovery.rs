//! Models that appear in `--models-dir` while the server runs: trained through the API by
//! another replica that shares the folder, or copied in by hand. Each is loaded and
//! served under its folder's name, as the models found at start are.
//!
//! A scan runs periodically, and at once when a request names a model this server does
//! not serve yet but whose folder exists, or lists the models: a model one replica has
//! just trained is then served by the replica the next request reaches. Models already
//! served are left alone (a changed artifact is taken up by `POST …/reload`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use super::{AppState, ServedModel};
use crate::api::error::ApiError;

/// Folders that failed to load, by name, with the newest modification time of their files
/// then: a folder is tried again only once its files change (an artifact still being
/// copied in fails until the copy ends), so a broken one is not reloaded on every request.
#[derive(Default)]
pub struct Discovery {
    failed: tokio::sync::Mutex<HashMap<String, Option<SystemTime>>>,
}

/// The newest modification time of the files in `dir` (None when it cannot be read).
fn newest_change(dir: &Path) -> Option<SystemTime> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok()?.metadata().ok()?.modified().ok())
        .max()
}

/// Loads and serves every model folder not yet served; returns the names added. Scans
/// run one at a time (the lock on the failures), so a model is loaded once.
pub async fn serve_new_models(state: &AppState) -> Vec<String> {
    let mut failed = state.discovery.failed.lock().await;
    let dir = state.models_dir.clone();
    let folders = match tokio::task::spawn_blocking(move || crate::registry::model_folders(&dir)).await {
        Ok(Ok(folders)) => folders,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, dir = %state.models_dir.display(), "reading the models folder failed");
            return Vec::new();
        }
        Err(e) => {
            tracing::error!(error = %e, "the models folder scan failed");
            return Vec::new();
        }
    };
    let mut added = Vec::new();
    for folder in folders {
        let name = folder.file_name().expect("folder name").to_string_lossy().to_string();
        // A job of this server serves its own model when it has moved it into place.
        if !crate::jobs::valid_model_name(&name) || state.model(&name).is_ok() || state.training.is_training(&name) {
            continue;
        }
        let stamp = newest_change(&folder);
        if failed.get(&name) == Some(&stamp) {
            continue;
        }
        let device = state.device.clone();
        let path = folder.clone();
        let loaded = tokio::task::spawn_blocking(move || crate::registry::load_warm(&path, &device)).await;
        let (detector, version) = match loaded {
            Ok(Ok(loaded)) => loaded,
            Ok(Err(e)) => {
                tracing::warn!(
                    model = name,
                    error = format!("{e:#}"),
                    "a model folder that appeared does not load; tried again when its files change"
                );
                failed.insert(name, stamp);
                continue;
            }
            Err(e) => {
                tracing::error!(model = name, error = %e, "loading a model folder that appeared failed");
                continue;
            }
        };
        failed.remove(&name);
        let engine = crate::engine::Engine::start(
            &name,
            detector,
            &version,
            state.limits.max_batch,
            state.limits.queue_capacity,
        );
        let served = ServedModel {
            engine,
            dir: folder,
            reload: Default::default(),
        };
        // A training job of this server may have added it meanwhile: then that one stays.
        if state.add_model(&name, served) {
            crate::metrics::model_served(&name, &version, None, crate::model::device::name(&state.device));
            tracing::info!(
                model = name,
                version,
                "a model that appeared in the models folder is served"
            );
            added.push(name);
        }
    }
    added
}

/// The served model `name`, looking in the models folder first when it is not served yet.
pub async fn find_model(state: &AppState, name: &str) -> Result<Arc<ServedModel>, ApiError> {
    if let Ok(served) = state.model(name) {
        return Ok(served);
    }
    if crate::jobs::valid_model_name(name)
        && state
            .models_dir
            .join(name)
            .join(crate::model::artifact::CARD_FILE)
            .is_file()
    {
        serve_new_models(state).await;
    }
    state.model(name)
}

/// Scans every `every` (not at all when zero).
pub fn spawn(state: Arc<AppState>, every: std::time::Duration) {
    if every.is_zero() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; start-up has just loaded them
        loop {
            tick.tick().await;
            serve_new_models(&state).await;
        }
    });
}

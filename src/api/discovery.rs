//! Models that appear in `--models-dir` while the server runs: trained through the API by
//! another replica that shares the folder, or copied in by hand. Each is loaded and
//! served under its folder's name, as the models found at start are.
//!
//! A scan runs periodically and when the models are listed; a request naming a model this
//! server does not serve yet, but whose folder exists, loads that one folder at once. So a
//! model one replica has just trained is served by whichever replica the next request
//! reaches. Models already served are left alone (a changed artifact is taken up by
//! `POST …/reload`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::{AppState, ServedModel};
use crate::api::error::ApiError;

/// A folder that failed to load is tried again when its files change, or after this long
/// (a copy that keeps the source's times can change a folder without a newer time).
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(600);

/// Folders that failed to load, by name: a broken one is not loaded again on every
/// request or scan. The lock also makes loads one at a time, so a model loads once.
#[derive(Default)]
pub struct Discovery {
    failed: tokio::sync::Mutex<HashMap<String, Failure>>,
}

struct Failure {
    files: Vec<FileStamp>,
    at: Instant,
}

/// What a folder's file looked like: name, size, modification time.
type FileStamp = (String, u64, Option<SystemTime>);

/// The files of `dir`, sorted (empty when it cannot be read).
fn stamp(dir: &Path) -> Vec<FileStamp> {
    let mut files: Vec<FileStamp> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let meta = e.metadata().ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                meta.len(),
                meta.modified().ok(),
            ))
        })
        .collect();
    files.sort();
    files
}

impl Discovery {
    /// True while `name` is recorded as failing to load (for tests and the log).
    pub async fn failed(&self, name: &str) -> bool {
        self.failed.lock().await.contains_key(name)
    }
}

/// Loads and serves every model folder not yet served; returns the names added.
pub async fn serve_new_models(state: &AppState) -> Vec<String> {
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
        if serve_folder(state, &name, folder).await {
            added.push(name);
        }
    }
    added
}

/// Loads the model in `folder` and serves it as `name`, unless it is served already,
/// being trained by a job of this server (which serves it itself), or failed to load
/// and has not changed since. True when it was added.
async fn serve_folder(state: &AppState, name: &str, folder: PathBuf) -> bool {
    if !crate::jobs::valid_model_name(name) || state.model(name).is_ok() || state.training.is_training(name) {
        return false;
    }
    let mut failed = state.discovery.failed.lock().await;
    if state.model(name).is_ok() {
        return false; // loaded while this one waited for the lock
    }
    let path = folder.clone();
    let Ok(files) = tokio::task::spawn_blocking(move || stamp(&path)).await else {
        return false;
    };
    if let Some(f) = failed.get(name) {
        if f.files == files && f.at.elapsed() < RETRY_FAILED_AFTER {
            return false;
        }
    }
    let device = state.device.clone();
    let path = folder.clone();
    let loaded = tokio::task::spawn_blocking(move || crate::registry::load_warm(&path, &device))
        .await
        .map_err(|e| anyhow::anyhow!("the load panicked: {e}"))
        .and_then(|loaded| loaded);
    let (detector, version) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::warn!(
                model = name,
                error = format!("{e:#}"),
                "a model folder that appeared does not load; tried again when its files change"
            );
            failed.insert(
                name.to_string(),
                Failure {
                    files,
                    at: Instant::now(),
                },
            );
            return false;
        }
    };
    failed.remove(name);
    // A job of this server that finished meanwhile may have added it: then that one stays.
    let added = state.serve_model(name, folder, detector, &version);
    if added {
        tracing::info!(
            model = name,
            version,
            "a model that appeared in the models folder is served"
        );
        if name == "default" {
            tracing::warn!("a model named `default` appeared: POST /v1/inspect now uses it");
        }
    }
    added
}

/// The served model `name`; when it is not served yet but its folder exists, that folder
/// is loaded first (404 `unknown_model` when it does not load).
pub async fn find_model(state: &AppState, name: &str) -> Result<std::sync::Arc<ServedModel>, ApiError> {
    if let Ok(served) = state.model(name) {
        return Ok(served);
    }
    if crate::jobs::valid_model_name(name) {
        let folder = state.models_dir.join(name);
        let card = folder.join(crate::model::artifact::CARD_FILE);
        if tokio::task::spawn_blocking(move || card.is_file())
            .await
            .unwrap_or(false)
        {
            serve_folder(state, name, folder).await;
        }
    }
    state.model(name)
}

/// Scans every `every` (not at all when zero).
pub fn spawn(state: std::sync::Arc<AppState>, every: Duration) {
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

//! The models folder as the registry the replicas sharing it follow: a model folder that
//! appears in `--models-dir` while the server runs (trained through the API by another
//! replica, or copied in) is served under its folder's name; a served model whose files
//! change is reloaded; one whose folder is gone is no longer served.
//!
//! A full pass runs every `--models-scan-interval` and when the models are listed; a
//! request naming a model this server does not serve yet, but whose folder exists, loads
//! that one folder at once. So a model one replica has just trained is served by whichever
//! replica the next request reaches, and replicas that share the folder converge on the
//! same versions within one interval. Only models whose folder is `<models-dir>/<name>`
//! are followed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::judge::blocking;
use super::{AppState, ServedModel};
use crate::api::error::ApiError;

/// A folder that failed to load is tried again when its files change, or after this long
/// (a copy that keeps the source's times can change a folder without a newer time).
const RETRY_FAILED_AFTER: Duration = Duration::from_secs(600);

/// What the last pass saw of each model folder, by name, so that an unchanged folder is
/// neither hashed nor loaded again. The lock also makes loads one at a time.
#[derive(Default)]
pub struct Discovery {
    seen: tokio::sync::Mutex<HashMap<String, Seen>>,
    /// Served models whose folder the last pass did not find: removed only when the next
    /// pass does not find it either (a folder moved aside and back, a share remounting).
    missing: tokio::sync::Mutex<std::collections::HashSet<String>>,
}

struct Seen {
    files: Vec<FileStamp>,
    at: Instant,
    /// Its files did not load (the reason is in the log and in answers naming it).
    failure: Option<String>,
}

impl Seen {
    /// Seen now, with these files, having loaded (`failure` None) or not.
    fn new(files: Vec<FileStamp>, failure: Option<String>) -> Self {
        Self {
            files,
            at: Instant::now(),
            failure,
        }
    }

    /// Worth looking at again: its files changed, or it failed long enough ago.
    fn stale(&self, files: &[FileStamp]) -> bool {
        self.files != files || (self.failure.is_some() && self.at.elapsed() >= RETRY_FAILED_AFTER)
    }
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
            // Through links: a model file that is a link changes when its target does.
            let meta = std::fs::metadata(e.path()).ok()?;
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
    /// Why the folder of `name` did not load, if it did not.
    pub async fn failure(&self, name: &str) -> Option<String> {
        self.seen.lock().await.get(name).and_then(|s| s.failure.clone())
    }
}

/// What a pass did, by model name.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    pub added: Vec<String>,
    pub reloaded: Vec<String>,
    pub removed: Vec<String>,
}

/// One full pass over the models folder (see the module's comment).
pub async fn sync_models(state: &AppState) -> Changes {
    let mut changes = Changes::default();
    let dir = state.models_dir.clone();
    let folders = match blocking(move || crate::registry::model_folders(&dir)).await.ok() {
        Some(Ok(folders)) => folders,
        Some(Err(e)) => {
            tracing::warn!(error = %e, dir = %state.models_dir.display(), "reading the models folder failed");
            return changes;
        }
        None => return changes,
    };
    // A folder with no model at all is more likely a share not mounted than a wish to
    // serve nothing: then nothing is removed.
    let none_there = folders.is_empty();
    if none_there {
        tracing::warn!(dir = %state.models_dir.display(), "the models folder holds no model: served models are kept");
    }
    for (name, served) in state.model_list() {
        if served.dir != state.models_dir.join(&name) || state.training.is_training(&name) || none_there {
            continue;
        }
        let card = served.dir.join(crate::model::artifact::CARD_FILE);
        if folders.contains(&served.dir) || blocking(move || card.is_file()).await.ok().unwrap_or(true) {
            state.discovery.missing.lock().await.remove(&name);
            if reload_if_changed(state, &name, &served).await {
                changes.reloaded.push(name);
            }
        } else if remove_if_still_missing(state, &name, &served).await {
            changes.removed.push(name);
        }
    }
    for folder in folders {
        let name = folder.file_name().expect("folder name").to_string_lossy().to_string();
        if serve_folder(state, &name, folder).await {
            changes.added.push(name);
        }
    }
    changes
}

/// Stops serving `served` when its folder was missing at the pass before this one too, and
/// it is not the only model served (a server with none would answer nothing but 404s).
async fn remove_if_still_missing(state: &AppState, name: &str, served: &Arc<ServedModel>) -> bool {
    let mut missing = state.discovery.missing.lock().await;
    if missing.insert(name.to_string()) {
        tracing::warn!(
            model = name,
            "its folder is missing from the models folder; no longer served if still missing at the next pass"
        );
        return false;
    }
    if state.model_list().len() == 1 {
        tracing::warn!(
            model = name,
            "its folder is gone from the models folder, but it is the only model served: kept"
        );
        return false;
    }
    if !state.remove_model(name, served) {
        return false;
    }
    missing.remove(name);
    state.discovery.seen.lock().await.remove(name);
    tracing::warn!(
        model = name,
        "its folder is gone from the models folder: no longer served"
    );
    true
}

/// Reloads `served` when its folder's files changed to another version. True when it did.
async fn reload_if_changed(state: &AppState, name: &str, served: &Arc<ServedModel>) -> bool {
    let mut seen = state.discovery.seen.lock().await;
    let dir = served.dir.clone();
    let Some(files) = blocking(move || stamp(&dir)).await.ok() else {
        return false;
    };
    if seen.get(name).is_some_and(|s| !s.stale(&files)) {
        return false;
    }
    let _one_at_a_time = served.reload.lock().await;
    let dir = served.dir.clone();
    let on_disk = blocking(move || crate::registry::artifact_version(&dir)).await.ok();
    let (_, current) = served.engine.current();
    let mut record = |failure: Option<String>| {
        seen.insert(name.to_string(), Seen::new(files.clone(), failure));
    };
    match on_disk {
        Some(Ok(version)) if version == current => {
            record(None);
            return false;
        }
        Some(Ok(_)) => {}
        _ => return false, // mid-copy, say: looked at again on the next pass
    }
    let device = state.device.clone();
    let dir = served.dir.clone();
    match load(dir, device).await {
        Ok((detector, version)) => {
            state.replace_model(name, served, detector, version.clone());
            tracing::info!(
                model = name,
                version,
                replaced = current,
                "its files changed in the models folder: reloaded"
            );
            record(None);
            true
        }
        Err(e) => {
            tracing::warn!(
                model = name,
                error = e,
                "its files changed in the models folder and do not load: the version loaded before keeps serving"
            );
            record(Some(e));
            false
        }
    }
}

/// Loads and warms the model in `dir`; the error as one line.
async fn load(dir: PathBuf, device: candle_core::Device) -> Result<(crate::detector::Detector, String), String> {
    match blocking(move || crate::registry::load_warm(&dir, &device)).await.ok() {
        Some(Ok(loaded)) => Ok(loaded),
        Some(Err(e)) => Err(format!("{e:#}")),
        None => Err("loading it panicked".into()),
    }
}

/// Loads the model in `folder` and serves it as `name`, unless it is served already,
/// being trained by a job of this server (which serves it itself), or failed to load
/// and has not changed since. True when it was added.
async fn serve_folder(state: &AppState, name: &str, folder: PathBuf) -> bool {
    if state.model(name).is_ok() || state.training.is_training(name) {
        return false;
    }
    let mut seen = state.discovery.seen.lock().await;
    if state.model(name).is_ok() {
        return false; // loaded while this one waited for the lock
    }
    let path = folder.clone();
    let Some(files) = blocking(move || stamp(&path)).await.ok() else {
        return false;
    };
    if seen.get(name).is_some_and(|s| !s.stale(&files)) {
        return false;
    }
    if !crate::jobs::valid_model_name(name) {
        let failure = "its name cannot be a model's (1–64 letters, digits, `-`, `_` or `.`): not served".to_string();
        tracing::warn!(model = name, "a folder in the models folder {failure}");
        seen.insert(name.to_string(), Seen::new(files, Some(failure)));
        return false;
    }
    let (detector, version) = match load(folder.clone(), state.device.clone()).await {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::warn!(
                model = name,
                error = e,
                "a model folder that appeared does not load; tried again when its files change"
            );
            seen.insert(name.to_string(), Seen::new(files, Some(e)));
            return false;
        }
    };
    seen.insert(name.to_string(), Seen::new(files, None));
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
/// is loaded first. A folder that does not load answers `422 model_load_failed` with the
/// reason; no folder, `404 unknown_model`.
pub async fn find_model(state: &AppState, name: &str) -> Result<Arc<ServedModel>, ApiError> {
    if let Ok(served) = state.model(name) {
        return Ok(served);
    }
    if crate::jobs::valid_model_name(name) {
        let folder = state.models_dir.join(name);
        let card = folder.join(crate::model::artifact::CARD_FILE);
        if blocking(move || card.is_file()).await.ok().unwrap_or(false) {
            serve_folder(state, name, folder).await;
            if let Some(why) = state.discovery.failure(name).await {
                return Err(ApiError::ModelLoadFailed(format!(
                    "the model folder {name:?} does not load: {why}"
                )));
            }
        }
    }
    state.model(name)
}

/// A full pass every `every` (none when zero).
pub fn spawn(state: Arc<AppState>, every: Duration) {
    if every.is_zero() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is immediate; start-up has just loaded them
        loop {
            tick.tick().await;
            sync_models(&state).await;
        }
    });
}

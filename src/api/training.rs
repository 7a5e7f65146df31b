//! Training jobs through the server: `POST /v1/training-jobs` queues one (a folder on the
//! server, or images uploaded with the request), one job trains at a time on
//! `--training-threads` threads, progress streams as server-sent events, `DELETE` cancels,
//! and a trained model is moved into `--models-dir` and served at once, without a restart.
//! Rows in the database say what was asked and how it ended; a restart marks unfinished
//! jobs `failed` (interrupted), as they cannot resume.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::{Multipart, Path, Request, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use utoipa::ToSchema;

use super::{now_us, rfc3339, AppState};
use crate::api::error::ApiError;
use crate::jobs::{self, JobStatus, JobView};
use crate::storage::jobs::JobRow;

/// Largest upload of training images in one request.
pub const MAX_UPLOAD_BYTES: usize = 512 * 1024 * 1024;

/// Most images in one upload: each is a file on disk, and a zip of empty entries fits
/// millions under the byte limit. Far more than a training set needs.
pub const MAX_UPLOAD_IMAGES: usize = 100_000;

struct LiveJob {
    view: watch::Sender<JobView>,
    cancel: Arc<AtomicBool>,
    /// Cancelled by a `DELETE` (not by the server stopping): ends as `cancelled`.
    by_request: Arc<AtomicBool>,
}

/// The jobs of this process and the queue in front of the one trainer.
pub struct JobBoard {
    live: Mutex<HashMap<String, LiveJob>>,
    /// Model names of requests being checked, not yet in `live`.
    reserved: Mutex<HashSet<String>>,
    queue: mpsc::UnboundedSender<String>,
    /// The queue's receiving end until the trainer starts (on the first job) and takes it.
    waiting: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    /// Threads a training takes (the rest stay with inspection).
    pub threads: usize,
    /// Set by [`JobBoard::stop_all`] (under the `live` lock): no job starts after it.
    stopping: AtomicBool,
}

impl JobBoard {
    pub fn new(threads: usize) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        Self {
            live: Mutex::new(HashMap::new()),
            reserved: Mutex::new(HashSet::new()),
            queue,
            waiting: Mutex::new(Some(rx)),
            threads: threads.max(1),
            stopping: AtomicBool::new(false),
        }
    }

    fn view(&self, id: &str) -> Option<JobView> {
        self.live
            .lock()
            .expect("jobs lock")
            .get(id)
            .map(|j| j.view.borrow().clone())
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut JobView)) {
        if let Some(j) = self.live.lock().expect("jobs lock").get(id) {
            j.view.send_modify(f);
        }
    }

    /// True while a job of this process is queued or running for `model` (its model
    /// folder may appear before the job serves it).
    pub fn is_training(&self, model: &str) -> bool {
        self.live.lock().expect("jobs lock").values().any(|j| {
            let v = j.view.borrow();
            v.model == model && !v.status.finished()
        })
    }

    /// Claims `model` for a request being checked: 409 when a job of this process is
    /// queued or running for it, or another request holds it. Released on drop.
    fn reserve(&self, model: &str) -> Result<NameReservation<'_>, ApiError> {
        let live = self.live.lock().expect("jobs lock");
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ApiError::ShuttingDown);
        }
        let mut reserved = self.reserved.lock().expect("jobs lock");
        let training = live.values().any(|j| {
            let v = j.view.borrow();
            v.model == model && !v.status.finished()
        });
        if training || !reserved.insert(model.to_string()) {
            return Err(ApiError::ModelExists(format!("a job is already training {model:?}")));
        }
        Ok(NameReservation {
            board: self,
            model: model.to_string(),
        })
    }

    /// The server is stopping: every queued or running job is cancelled (a running one
    /// after its current step) and ends as interrupted, leaving no model behind.
    pub fn stop_all(&self) {
        let live = self.live.lock().expect("jobs lock");
        // A request that got past its checks before this adds its job cancelled (see
        // `enqueue`): the server keeps answering during --shutdown-delay.
        self.stopping.store(true, Ordering::SeqCst);
        for job in live.values() {
            job.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// After [`JobBoard::stop_all`]: waits up to `limit` for every job to end with its end on
    /// record; any still going then is recorded as interrupted here (it was cancelled, so
    /// it can no longer move a model into place).
    pub async fn finish_stopping(&self, store: &crate::storage::Store, limit: std::time::Duration) {
        if tokio::time::timeout(limit, self.wait_finished()).await.is_ok() {
            return;
        }
        let left = self.unfinished();
        tracing::warn!(jobs = ?left, "training jobs did not stop in time; recorded as interrupted");
        for id in left {
            let recorded = store
                .set_job_status(&id, JobStatus::Failed.as_str(), Some(INTERRUPTED), Some(now_us()))
                .await;
            if let Err(e) = recorded {
                tracing::warn!(job = id, error = %e, "could not record the job as interrupted");
            }
        }
    }

    /// This process's jobs still queued or running.
    fn unfinished(&self) -> Vec<String> {
        self.live
            .lock()
            .expect("jobs lock")
            .iter()
            .filter(|(_, j)| !j.view.borrow().status.finished())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Waits until every job of this process has ended and its end is on record.
    pub async fn wait_finished(&self) {
        let watching: Vec<watch::Receiver<JobView>> = self
            .live
            .lock()
            .expect("jobs lock")
            .values()
            .map(|j| j.view.subscribe())
            .collect();
        for mut rx in watching {
            let _ = rx.wait_for(|v| v.status.finished()).await;
        }
    }
}

/// How a job that the server's stop ended is recorded.
const INTERRUPTED: &str = "interrupted: the server stopped before the job finished; nothing was written";

/// How often a server says its queued and running jobs are alive, and looks for jobs of
/// servers that went quiet.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);

/// A job whose server has not said it is alive for this long (µs) was abandoned: that
/// server stopped without recording how its jobs ended (killed, crashed, lost power).
pub const JOB_QUIET_US: i64 = 60_000_000;

/// Every [`HEARTBEAT`]: records that this process's unfinished jobs are alive, and marks
/// interrupted the unfinished jobs of servers that have gone quiet (replicas sharing a
/// database; or this server's own previous run, restarted within a minute). Holds the
/// state weakly, so it ends with the server.
pub fn spawn_heartbeat(state: &Arc<AppState>) {
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT);
        // Since when every heartbeat of this server has been recorded. After the database
        // was out of reach, every server's jobs look quiet: the others are judged only
        // once this one has been heard for the quiet time again, as they have then too if
        // they are alive (else a short outage marked live jobs of other replicas failed).
        let mut heard_since: Option<i64> = None;
        loop {
            tick.tick().await;
            let Some(state) = weak.upgrade() else { break };
            let ours = state.training.unfinished();
            let now = now_us();
            let swept = async {
                state.store.heartbeat_jobs(&ours, now).await?;
                // With no jobs of its own the heartbeat wrote nothing: ask the database.
                if ours.is_empty() {
                    state.store.check().await?;
                }
                let since = *heard_since.get_or_insert(now);
                if !sweep_due(since, now) {
                    return Ok(0);
                }
                state
                    .store
                    .interrupt_abandoned_jobs(now, Some(now - JOB_QUIET_US))
                    .await
            }
            .await;
            if swept.is_err() {
                heard_since = None;
            }
            match swept {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(
                        jobs = n,
                        "training jobs of a server that went quiet were interrupted; marked failed"
                    );
                    remove_stale_uploads(&state).await;
                }
                Err(e) => tracing::warn!(error = %e, "could not record that this server's training jobs are alive"),
            }
        }
    });
}

/// Whether a server heard without a break since `since` (µs) may judge other servers'
/// jobs at `now`: after a full quiet time, in which every live server has heartbeated.
fn sweep_due(since: i64, now: i64) -> bool {
    now - since >= JOB_QUIET_US
}

/// A model name held by [`JobBoard::reserve`].
struct NameReservation<'a> {
    board: &'a JobBoard,
    model: String,
}

impl Drop for NameReservation<'_> {
    fn drop(&mut self) {
        self.board.reserved.lock().expect("jobs lock").remove(&self.model);
    }
}

/// A job read from the database (one a previous process ran, or one not yet in memory).
fn from_row(r: JobRow) -> JobView {
    JobView {
        status: JobStatus::parse(&r.status).unwrap_or(JobStatus::Failed),
        options: serde_json::from_str(&r.options).unwrap_or_default(),
        created_at: rfc3339(r.created_at),
        finished_at: r.finished_at.map(rfc3339),
        id: r.id,
        model: r.model,
        message: r.message,
        data: r.data,
        step: 0,
        steps: 0,
        loss: None,
        elapsed_s: 0.0,
        eta_s: None,
    }
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct JobRequest {
    /// The name to serve the model under (letters, digits, `-`, `_`, `.`).
    pub model: String,
    /// A folder of good images on the server (or an MVTec AD category folder).
    pub folder: Option<String>,
    /// `vigil train` options by flag name with `_` for `-`, e.g. `{"steps": 300}`; the
    /// command's defaults apply to the rest.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub options: BTreeMap<String, serde_json::Value>,
}

/// Start a training job (admin): JSON naming a folder on the server, or multipart with
/// fields `model`, `options` (JSON) and one or more `images` files (images, or zip
/// archives of images).
#[utoipa::path(post, path = "/v1/training-jobs", request_body = JobRequest,
    responses((status = 202, body = JobView), (status = 400, body = crate::api::error::ErrorBody), (status = 408, body = crate::api::error::ErrorBody),
        (status = 409, body = crate::api::error::ErrorBody), (status = 413, body = crate::api::error::ErrorBody), (status = 415, body = crate::api::error::ErrorBody), (status = 422, body = crate::api::error::ErrorBody)))]
pub async fn create(State(state): State<Arc<AppState>>, req: Request) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let id = uuid::Uuid::now_v7().to_string();
    let content_type = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let is_multipart = content_type.starts_with("multipart/form-data");
    // As the feedback route: a body in another type (a form, text) is refused rather than
    // read as JSON; a request without a type is read as JSON.
    if !is_multipart && !content_type.is_empty() && !content_type.starts_with("application/json") {
        return Err(ApiError::UnsupportedMediaType(format!(
            "send JSON (Content-Type: application/json) or multipart/form-data, not {content_type:?}"
        )));
    }
    let (request, uploaded) = if is_multipart {
        let upload_dir = upload_dir_of(&state, &id);
        let multipart = <Multipart as axum::extract::FromRequest<()>>::from_request(req, &())
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        let folder = UploadFolder(Some(upload_dir.clone()));
        (receive_upload(multipart, &upload_dir).await?, Some(folder))
    } else {
        let body = axum::body::to_bytes(req.into_body(), 1024 * 1024)
            .await
            .map_err(|e| super::upload::body_error(&e, 1024 * 1024))?;
        let r: JobRequest = serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("expected JSON {{\"model\", \"folder\", \"options\"}}: {e}")))?;
        (r, None)
    };
    let queued = enqueue(&state, id, request).await?;
    // The job owns its uploads now: they go when it ends.
    if let Some(folder) = uploaded {
        folder.keep();
    }
    Ok((StatusCode::ACCEPTED, Json(queued)))
}

/// A request's folder of uploaded images, removed when dropped unless a job took it. Not
/// only on an error: a request is also dropped midway when its client goes away while
/// the images are checked, or when the server stops, and its folder then has no job to
/// remove it (the start-up sweep takes only folders an hour old).
struct UploadFolder(Option<PathBuf>);

impl UploadFolder {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for UploadFolder {
    fn drop(&mut self) {
        let Some(dir) = self.0.take() else { return };
        // Up to 512 MiB of files: off the async threads where there are some.
        let remove = move || {
            let _ = std::fs::remove_dir_all(dir);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }
}

/// Where uploaded training images wait, one folder per job, until their job ends.
fn uploads_dir(state: &AppState) -> PathBuf {
    state.blobs.root().join("training-uploads")
}

/// The server's own folders whose images are not a job's good images: the stored
/// inspection images (defective parts among them), every job's uploads and the models
/// (whose sample images show defects), each with what to call it.
fn server_folders(state: &AppState) -> [(PathBuf, &'static str); 3] {
    [
        (state.blobs.root().join("images"), "stored inspection images"),
        (uploads_dir(state), "uploaded training images"),
        (state.models_dir.clone(), "models folder"),
    ]
}

/// The folder job `id`'s uploaded images are kept in (a job's own uploads are the only
/// ones it may remove).
fn upload_dir_of(state: &AppState, id: &str) -> PathBuf {
    uploads_dir(state).join(id)
}

/// Removes the uploaded images of jobs that have ended: a server stopped during a job (or
/// before its turn) leaves them behind. A folder whose job is not on record yet may be a
/// request another replica is receiving, so it goes only once an hour old. Returns how
/// many folders were removed.
pub async fn remove_stale_uploads(state: &AppState) -> usize {
    let Ok(mut entries) = tokio::fs::read_dir(uploads_dir(state)).await else {
        return 0;
    };
    let mut removed = 0;
    while let Ok(Some(entry)) = entries.next_entry().await {
        let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let ended = match state.store.job(&id).await {
            Ok(Some(row)) => JobStatus::parse(&row.status).is_none_or(JobStatus::finished),
            Ok(None) => entry
                .metadata()
                .await
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > std::time::Duration::from_secs(3600))),
            Err(e) => {
                tracing::warn!(error = %e, "could not look up uploaded images' jobs; kept");
                return removed;
            }
        };
        if ended && tokio::fs::remove_dir_all(entry.path()).await.is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Longest `model` or `options` field of an upload: the images have their own limit, and
/// these were read whole before being judged (a 150 MB model name was).
const MAX_TEXT_FIELD: usize = 64 * 1024;

/// A multipart text field, refused past [`MAX_TEXT_FIELD`] as soon as it gets there.
async fn text_field(field: &mut axum::extract::multipart::Field<'_>, name: &str) -> Result<String, ApiError> {
    let mut bytes = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| super::upload::multipart_error(e, MAX_UPLOAD_BYTES))?
    {
        if bytes.len() + chunk.len() > MAX_TEXT_FIELD {
            return Err(ApiError::BadRequest(format!(
                "the {name} field is at most {} KiB",
                MAX_TEXT_FIELD / 1024
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    String::from_utf8(bytes).map_err(|_| ApiError::BadRequest(format!("the {name} field must be UTF-8 text")))
}

/// Saves the `images` parts under `dir`; returns the request they belong to.
async fn receive_upload(mut multipart: Multipart, dir: &std::path::Path) -> Result<JobRequest, ApiError> {
    let (mut model, mut options, mut files, mut total) = (None, BTreeMap::new(), 0usize, 0usize);
    // Bytes written to disk: images as sent, and what zip archives unpack to. One limit
    // for the whole request, so that many small archives cannot each unpack to it.
    let mut stored = 0u64;
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| ApiError::Internal(format!("creating {}: {e}", dir.display())))?;
    let failed = |e| super::upload::multipart_error(e, MAX_UPLOAD_BYTES);
    while let Some(mut field) = multipart.next_field().await.map_err(failed)? {
        match field.name().unwrap_or("") {
            "model" => model = Some(text_field(&mut field, "model").await?),
            "options" => {
                let text = text_field(&mut field, "options").await?;
                if !text.trim().is_empty() {
                    options = serde_json::from_str(&text)
                        .map_err(|e| ApiError::BadRequest(format!("options must be a JSON object: {e}")))?;
                }
            }
            "images" => {
                let is_zip = field
                    .file_name()
                    .is_some_and(|n| n.to_ascii_lowercase().ends_with(".zip"))
                    || matches!(
                        field.content_type(),
                        Some("application/zip" | "application/x-zip-compressed")
                    );
                let client_name = field.file_name().map(str::to_owned);
                let mut bytes = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(failed)? {
                    total += chunk.len();
                    if total > MAX_UPLOAD_BYTES {
                        return Err(ApiError::BodyTooLarge(MAX_UPLOAD_BYTES));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                if is_zip {
                    let (dir, first) = (dir.to_path_buf(), files);
                    let left = (MAX_UPLOAD_BYTES as u64).saturating_sub(stored);
                    let images_left = MAX_UPLOAD_IMAGES - files;
                    let (n, unpacked) = tokio::task::spawn_blocking(move || {
                        jobs::extract_zip_images(&bytes, &dir, first, left, images_left)
                    })
                    .await
                    .map_err(|e| ApiError::Internal(e.to_string()))?
                    .map_err(ApiError::BadTrainingData)?;
                    files += n;
                    stored += unpacked;
                    continue;
                }
                // The format is read from the bytes, not the name: a file sent as `x.bin`
                // was dropped by the folder walk, leaving "too few images" to explain it.
                let ext = match image::guess_format(&bytes) {
                    Ok(image::ImageFormat::Png) => "png",
                    Ok(image::ImageFormat::Jpeg) => "jpg",
                    Ok(image::ImageFormat::Bmp) => "bmp",
                    Ok(image::ImageFormat::Tiff) => "tif",
                    _ => {
                        return Err(ApiError::BadTrainingData(format!(
                            "{}: not a PNG, JPEG, BMP or TIFF image",
                            client_name
                                .as_deref()
                                .map_or(format!("image {}", files + 1), |n| format!("{n:?}"))
                        )))
                    }
                };
                stored += bytes.len() as u64;
                if stored > MAX_UPLOAD_BYTES as u64 {
                    return Err(ApiError::BodyTooLarge(MAX_UPLOAD_BYTES));
                }
                if files == MAX_UPLOAD_IMAGES {
                    return Err(ApiError::BadTrainingData(format!(
                        "more than {MAX_UPLOAD_IMAGES} images in one upload; name a folder on the server instead"
                    )));
                }
                let path = dir.join(jobs::upload_file_name(files, client_name.as_deref(), ext));
                tokio::fs::write(&path, bytes)
                    .await
                    .map_err(|e| ApiError::Internal(format!("writing {}: {e}", path.display())))?;
                files += 1;
            }
            other => return Err(ApiError::BadRequest(format!("unexpected field {other:?}"))),
        }
    }
    if files == 0 {
        return Err(ApiError::BadTrainingData(
            "no images: send one or more `images` files".into(),
        ));
    }
    Ok(JobRequest {
        model: model.ok_or_else(|| ApiError::BadRequest("missing field `model`".into()))?,
        folder: Some(dir.display().to_string()),
        options,
    })
}

/// `given` inside `root` (canonical): a relative folder is taken inside it. Refused, with
/// one message whether or not the folder exists, when it lies elsewhere (`..`, an absolute
/// path outside, a link out), so the API does not tell which folders exist outside.
fn within_root(root: &std::path::Path, given: &std::path::Path) -> Result<PathBuf, ApiError> {
    let outside = || {
        ApiError::BadTrainingData(format!(
            "{}: the folder must lie inside the server's training root (--training-root)",
            given.display()
        ))
    };
    if given.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(outside());
    }
    let joined = root.join(given);
    if !joined.starts_with(root) {
        return Err(outside());
    }
    match joined.canonicalize() {
        Ok(real) if real.starts_with(root) => Ok(real),
        Ok(_) => Err(outside()),
        Err(_) => {
            // Missing: say so only when its nearest existing folder lies inside the root
            // (through a link out, "missing" would tell what exists elsewhere).
            let nearest = joined.ancestors().find_map(|a| a.canonicalize().ok());
            if nearest.is_some_and(|n| n.starts_with(root)) {
                Err(ApiError::BadTrainingData(format!(
                    "{}: no such folder in the training root",
                    given.display()
                )))
            } else {
                Err(outside())
            }
        }
    }
}

/// Checks and records the job and puts it in the queue. Uploaded images are removed by the
/// worker when the job ends (by the caller if this fails).
async fn enqueue(state: &Arc<AppState>, id: String, r: JobRequest) -> Result<JobView, ApiError> {
    if !jobs::valid_model_name(&r.model) {
        return Err(ApiError::BadRequest(format!(
            "model name {:?}: use 1–64 letters, digits, `-`, `_` or `.`, not starting with `.`",
            r.model
        )));
    }
    // The options first, so that a bad one is named however the rest of the request
    // fares (a taken model name answered 409 before any option was looked at). Checked
    // now, so a bad option is a 400 here rather than a failed job later.
    let flags = jobs::flags(&r.options).map_err(ApiError::BadRequest)?;
    let args = jobs::train_args(std::path::Path::new("."), &state.models_dir.join(&r.model), &flags)
        .map_err(ApiError::BadRequest)?;
    crate::commands::train::config(&args, state.training.threads)
        .map_err(|e| ApiError::BadRequest(format!("{e:#}")))?
        .check()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    // Held until the job is in the board (or refused): a second request for the same name
    // meanwhile is a 409, not a second job that would fail at the end. (Other servers
    // sharing the database meet at its one-unfinished-job-per-model rule instead.)
    let _name = state.training.reserve(&r.model)?;
    if state.model(&r.model).is_ok() || state.models_dir.join(&r.model).exists() {
        return Err(ApiError::ModelExists(format!(
            "a model named {:?} already exists",
            r.model
        )));
    }
    super::refuse_nul("folder", r.folder.as_deref())?;
    let folder = PathBuf::from(r.folder.clone().ok_or_else(|| {
        ApiError::BadRequest("name a `folder` of good images on the server, or upload `images`".into())
    })?);
    // Uploads live in a folder of the server's own; errors name it as the upload. Another
    // job's uploads are not a folder to name: they go when that job ends.
    let uploaded = folder == upload_dir_of(state, &id);
    let training_root = state.limits.training_root.clone();
    let owned = server_folders(state);
    let max_pixels = state.limits.max_pixels;
    // Everything that touches the filesystem runs off the async threads (a slow or
    // network filesystem would stall every request on them).
    let (folder, shown, images) = tokio::task::spawn_blocking(move || {
        let folder = match &training_root {
            Some(root) if !uploaded => within_root(root, &folder)?,
            _ => folder,
        };
        let shown = if uploaded {
            "the uploaded images".to_string()
        } else {
            folder.display().to_string()
        };
        // Where the server's folders are, whether or not they exist yet: images are
        // stored (and uploads kept) from the first one on, perhaps while this job waits.
        let owned: Vec<(PathBuf, &str)> = owned
            .iter()
            .map(|(dir, what)| (crate::train::dataset::resolved(dir), *what))
            .collect();
        // The walk takes every image below the folder: one that holds (or lies in) the
        // server's stored inspections or its models would train on defective parts,
        // and another job's uploads go when that job ends.
        if !uploaded {
            if let Ok(f) = folder.canonicalize() {
                for (dir, what) in &owned {
                    if f.starts_with(dir) {
                        return Err(ApiError::BadTrainingData(format!(
                            "{shown}: lies inside the server's {what}; name a folder of good images only"
                        )));
                    }
                    if dir.starts_with(&f) {
                        return Err(ApiError::BadTrainingData(format!(
                            "{shown}: holds the server's {what}, which training would take for good images; name a \
                             folder of good images only"
                        )));
                    }
                }
            }
        }
        let root = training_root.filter(|_| !uploaded);
        let images = crate::train::dataset::training_files(&folder)
            .map_err(|e| ApiError::BadTrainingData(e.to_string().replace(&folder.display().to_string(), &shown)))?;
        // The walk follows links: each image is judged by where it really is, once.
        let real: Vec<Option<PathBuf>> = images.iter().map(|p| p.canonicalize().ok()).collect();
        let named = |path: &PathBuf| path.strip_prefix(&folder).unwrap_or(path).display().to_string();
        // Inside the root, if there is one.
        if let Some(root) = &root {
            if let Some((out, _)) = images
                .iter()
                .zip(&real)
                .find(|(_, real)| !real.as_ref().is_some_and(|real| real.starts_with(root)))
            {
                return Err(ApiError::BadTrainingData(format!(
                    "{} in {shown} links out of the server's training root (--training-root)",
                    named(out)
                )));
            }
        }
        // Outside the server's own folders.
        if !uploaded {
            for (path, real) in images.iter().zip(&real) {
                let Some(real) = real else { continue };
                if let Some((_, what)) = owned.iter().find(|(dir, _)| real.starts_with(dir)) {
                    return Err(ApiError::BadTrainingData(format!(
                        "{} in {shown} links into the server's {what}; name a folder of good images only",
                        named(path)
                    )));
                }
            }
        }
        // Every file must be an image the trainer can read (from its header), so a
        // mislabelled upload is refused now, not after the job was queued.
        for path in &images {
            crate::image_io::probe(path, max_pixels)
                .map_err(|e| ApiError::BadTrainingData(format!("{} in {shown}: {e}", named(path))))?;
        }
        Ok::<_, ApiError>((folder, shown, images))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    if images.len() < 2 {
        return Err(ApiError::BadTrainingData(format!(
            "{shown}: {} image(s); training needs at least 2 good images (some are held out to calibrate)",
            images.len()
        )));
    }
    let created_at = now_us();
    let row = JobRow {
        id: id.clone(),
        model: r.model.clone(),
        status: JobStatus::Queued.as_str().into(),
        message: None,
        options: serde_json::to_string(&flags).expect("flags serialise"),
        data: folder.display().to_string(),
        created_at,
        finished_at: None,
    };
    // Committed before the answer: a 202 means the job is on record.
    state.store.insert_job(&row).await?;
    let view = from_row(row);
    let (tx, _) = watch::channel(view.clone());
    {
        let mut live = state.training.live.lock().expect("jobs lock");
        // Stopping already: on record and answered like a job queued just before the
        // signal (it ends interrupted), so its client sees why.
        let stopping = state.training.stopping.load(Ordering::SeqCst);
        live.insert(
            id.clone(),
            LiveJob {
                view: tx,
                cancel: Arc::new(AtomicBool::new(stopping)),
                by_request: Arc::new(AtomicBool::new(false)),
            },
        );
    }
    start_worker(state);
    state
        .training
        .queue
        .send(id)
        .map_err(|_| ApiError::Internal("the training queue is closed".into()))?;
    tracing::info!(
        job = view.id,
        model = view.model,
        images = images.len(),
        "training job queued"
    );
    Ok(view)
}

/// The trainer: one job at a time, in queue order. Holds the state weakly, so it ends
/// with the server.
fn start_worker(state: &Arc<AppState>) {
    let Some(mut rx) = state.training.waiting.lock().expect("jobs lock").take() else {
        return; // already running
    };
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        while let Some(id) = rx.recv().await {
            let Some(state) = weak.upgrade() else { break };
            run_job(&state, &id).await;
        }
    });
}

async fn run_job(state: &Arc<AppState>, id: &str) {
    let Some(view) = state.training.view(id) else { return };
    // Whether it starts is decided under the board's lock, where a `DELETE` decides
    // whether it was still queued: a job is cancelled before it starts or while running,
    // never both.
    let (cancel, by_request, started) = {
        let live = state.training.live.lock().expect("jobs lock");
        let Some(j) = live.get(id) else { return };
        let started = !j.cancel.load(Ordering::SeqCst);
        if started {
            j.view.send_modify(|v| v.status = JobStatus::Running);
        }
        (j.cancel.clone(), j.by_request.clone(), started)
    };
    let data = PathBuf::from(&view.data);
    let uploaded = data == upload_dir_of(state, id);
    let outcome = if started {
        if let Err(e) = state.store.set_job_status(id, "running", None, None).await {
            tracing::warn!(job = id, error = %e, "could not record the job as running");
        }
        train_and_serve(state, &view, cancel).await
    } else if by_request.load(Ordering::SeqCst) {
        return; // cancelled while queued: recorded by the cancel
    } else {
        Err("cancelled".to_string()) // the server is stopping
    };
    let by_request = by_request.load(Ordering::SeqCst);
    let (status, message) = match outcome {
        Ok(msg) => (JobStatus::Succeeded, msg),
        Err(e) if e == "cancelled" && by_request => (JobStatus::Cancelled, "cancelled; nothing was written".into()),
        // Stopped by the server: recorded as a restart records what a stopped process left.
        Err(e) if e == "cancelled" => (JobStatus::Failed, INTERRUPTED.into()),
        // Not the server's folder of uploads: "uploaded 00002-part_17.png: …".
        Err(e) if uploaded => {
            let folder = data.display().to_string();
            let e = e.replace(&format!("{folder}/"), "uploaded ");
            (JobStatus::Failed, e.replace(&folder, "the uploaded images"))
        }
        Err(e) => (JobStatus::Failed, e),
    };
    // Before the final status: whoever sees the job end sees its uploads gone.
    if uploaded {
        let _ = tokio::fs::remove_dir_all(&data).await;
    }
    // On record before anyone watching sees the job end.
    let finished = now_us();
    record_end(&state.store, id, status, &message, finished).await;
    state.training.update(id, |v| {
        v.status = status;
        v.message = Some(message.clone());
        v.finished_at = Some(rfc3339(finished));
        v.eta_s = None;
    });
    if status == JobStatus::Failed {
        tracing::warn!(
            job = id,
            model = view.model,
            status = status.as_str(),
            message,
            "training job ended"
        );
    } else {
        tracing::info!(
            job = id,
            model = view.model,
            status = status.as_str(),
            message,
            "training job ended"
        );
    }
}

/// Records how a job ended, trying again until the database takes it. One failed write
/// (a PostgreSQL failover, a pool timeout) must not leave the row `running`, to be swept
/// a minute later as interrupted while its model is served. Until the write lands the job
/// stays running in memory, so this server's heartbeat keeps the row from being judged
/// abandoned, and nobody watching sees an end that is not on record. If the server stops
/// first, `finish_stopping` records it as interrupted, as for any job it did not finish.
async fn record_end(store: &crate::storage::Store, id: &str, status: JobStatus, message: &str, finished: i64) {
    let mut wait = Duration::from_millis(250);
    loop {
        match store
            .set_job_status(id, status.as_str(), Some(message), Some(finished))
            .await
        {
            Ok(()) => return,
            Err(e) => tracing::warn!(
                job = id,
                error = %e,
                retry_in_s = wait.as_secs_f32(),
                "could not record how the job ended; trying again"
            ),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}

/// Trains, then loads, warms and serves the model. Ok: what happened, for the job's message.
async fn train_and_serve(state: &Arc<AppState>, view: &JobView, cancel: Arc<AtomicBool>) -> Result<String, String> {
    let mut args = jobs::train_args(
        std::path::Path::new(&view.data),
        &state.models_dir.join(&view.model),
        &view.options,
    )?;
    // Training images are held to the server's limit, as inspected ones are.
    args.limit.max_pixels = state.limits.max_pixels;
    let (models_dir, model, id, threads) = (
        state.models_dir.clone(),
        view.model.clone(),
        view.id.clone(),
        state.training.threads,
    );
    let weak: Weak<AppState> = Arc::downgrade(state);
    let progress_id = id.clone();
    let on_step = move |r| {
        if let Some(s) = weak.upgrade() {
            s.training.update(&progress_id, |v| v.progress(r));
        }
    };
    let device = state.device.clone();
    let (detector, version, dir) = tokio::task::spawn_blocking(move || {
        let dir = jobs::run(&models_dir, &model, &id, &args, threads, &cancel, on_step)?;
        match crate::registry::load_warm(&dir, &device) {
            Ok((d, v)) => Ok::<_, String>((d, v, dir)),
            // A transient failure (warming up out of memory) leaves it where it is.
            Err(e) if e.downcast_ref::<crate::model::ArtifactError>().is_none() => {
                Err(format!("the trained model could not be served: {e:#}"))
            }
            // Out of the models folder again, under a hidden name: left there, a model that
            // does not load would stop every replica's next start and hold its name.
            Err(e) => {
                let aside = models_dir.join(format!(".{model}.{id}.failed"));
                let _ = crate::durable::publish(&dir, &aside);
                let moved = if aside.is_dir() && !dir.exists() {
                    format!("; set aside as {}", aside.display())
                } else {
                    format!("; it could not be moved aside from {}", dir.display())
                };
                Err(format!("the trained model does not load: {e:#}{moved}"))
            }
        }
    })
    .await
    .map_err(|e| format!("the training task failed: {e}"))??;
    let threshold = detector.card.thresholds.image;
    // What the CLI prints as warnings, the job's message carries: its caller sees no log.
    let notes: String = [
        crate::train::calibrate::threshold_warning(&detector.card),
        crate::train::calibrate::few_images_note(detector.card.thresholds.validation_images),
    ]
    .into_iter()
    .flatten()
    .map(|n| format!("; {n}"))
    .collect();
    if !state.serve_model(&view.model, dir.clone(), detector, &version) {
        return Err(format!("a model named {:?} is already served", view.model));
    }
    Ok(format!(
        "written to {} and served as {:?} (version {version}, image threshold {threshold:.4}){notes}",
        dir.display(),
        view.model,
    ))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
// A misspelt parameter is refused, not ignored: `?thresh=0.1` was judged at the model's
// threshold, and a filter the route does not take listed every record.
#[serde(deny_unknown_fields)]
pub struct JobListQuery {
    /// How many of the newest jobs: 1–500, default 50.
    pub limit: Option<i64>,
}

/// Training jobs, newest first: this process's with live progress, earlier ones from the database.
#[utoipa::path(get, path = "/v1/training-jobs", params(JobListQuery),
    responses((status = 200, body = Vec<JobView>), (status = 400, body = crate::api::error::ErrorBody)))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    q: Result<axum::extract::Query<JobListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<JobView>>, ApiError> {
    let limit = super::inspect::query(q)?.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be between 1 and 500".into()));
    }
    let rows = state.store.jobs(limit).await?;
    Ok(Json(
        rows.into_iter()
            .map(|r| state.training.view(&r.id).unwrap_or_else(|| from_row(r)))
            .collect(),
    ))
}

async fn find(state: &AppState, id: &str) -> Result<JobView, ApiError> {
    // No id holds a NUL (PostgreSQL refuses one in text, which is not an outage).
    if id.contains('\0') {
        return Err(ApiError::UnknownJob(id.to_string()));
    }
    if let Some(v) = state.training.view(id) {
        return Ok(v);
    }
    let row = state.store.job(id).await?;
    row.map(from_row).ok_or_else(|| ApiError::UnknownJob(id.to_string()))
}

/// One training job.
#[utoipa::path(get, path = "/v1/training-jobs/{id}", params(("id" = String, Path)), responses((status = 200, body = JobView), (status = 404, body = crate::api::error::ErrorBody)))]
pub async fn get_one(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<JobView>, ApiError> {
    Ok(Json(find(&state, &id).await?))
}

/// The job as server-sent events: a `job` event with the whole job at once and on every
/// change (step, loss, ETA, status); the stream ends after the job does.
#[utoipa::path(get, path = "/v1/training-jobs/{id}/events", params(("id" = String, Path)), responses((status = 200, content_type = "text/event-stream", body = String), (status = 404, body = crate::api::error::ErrorBody)))]
pub async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    let rx = state
        .training
        .live
        .lock()
        .expect("jobs lock")
        .get(&id)
        .map(|j| j.view.subscribe());
    let first = find(&state, &id).await?;
    let event = |v: &JobView| Event::default().event("job").json_data(v).expect("job serialises");
    // (receiver, the view to send next, done)
    let start = (rx, Some(first), false);
    let stream = futures_util::stream::unfold(start, move |(mut rx, pending, done)| async move {
        if done {
            return None;
        }
        if let Some(v) = pending {
            let finished = v.status.finished() || rx.is_none();
            return Some((Ok::<_, Infallible>(event(&v)), (rx, None, finished)));
        }
        let r = rx.as_mut()?;
        r.changed().await.ok()?;
        let v = r.borrow_and_update().clone();
        let finished = v.status.finished();
        Some((Ok::<_, Infallible>(event(&v)), (rx, None, finished)))
    });
    // Tells a proxy (nginx reads this header) to pass each event on as it comes rather
    // than hold it in a buffer.
    Ok((
        [("x-accel-buffering", "no")],
        Sse::new(stream).keep_alive(KeepAlive::default()),
    ))
}

/// Cancel a job (admin): a queued job never starts; a running one stops after its current
/// step and writes nothing.
#[utoipa::path(delete, path = "/v1/training-jobs/{id}", params(("id" = String, Path)), responses((status = 202, body = JobView), (status = 404, body = crate::api::error::ErrorBody), (status = 409, body = crate::api::error::ErrorBody)))]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let view = find(&state, &id).await?;
    if view.status.finished() {
        return Err(ApiError::JobFinished(format!(
            "job {id} has already {}",
            view.status.as_str()
        )));
    }
    let finished = now_us();
    let message = "cancelled before it started";
    // Under the board's lock, where the trainer decides whether to start it (see run_job).
    let was_queued = {
        let live = state.training.live.lock().expect("jobs lock");
        live.get(&id).map(|j| {
            j.cancel.store(true, Ordering::SeqCst);
            j.by_request.store(true, Ordering::SeqCst);
            let queued = j.view.borrow().status == JobStatus::Queued;
            if queued {
                j.view.send_modify(|v| {
                    v.status = JobStatus::Cancelled;
                    v.message = Some(message.into());
                    v.finished_at = Some(rfc3339(finished));
                });
            }
            queued
        })
    };
    let Some(was_queued) = was_queued else {
        // On record and unfinished, but not this process's: another replica's, or this
        // server's run before a restart (marked interrupted once quiet for a minute).
        return Err(ApiError::JobElsewhere(format!(
            "job {id} is {} on another server sharing this database (cancel it there), or was left by this \
             server's run before a restart (it is marked interrupted about a minute after this server is ready)",
            view.status.as_str()
        )));
    };
    if was_queued {
        // It will never read its uploads (the trainer decides under the same lock): gone
        // whether or not the database takes the new status.
        if std::path::Path::new(&view.data) == upload_dir_of(&state, &id) {
            let _ = tokio::fs::remove_dir_all(&view.data).await;
        }
        state
            .store
            .set_job_status(&id, "cancelled", Some(message), Some(finished))
            .await?;
    }
    tracing::info!(job = id, "training job cancelled");
    Ok((StatusCode::ACCEPTED, Json(find(&state, &id).await?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_servers_jobs_are_judged_only_after_a_full_quiet_time_heard() {
        let start = 1_000_000_000;
        assert!(!sweep_due(start, start));
        assert!(!sweep_due(start, start + JOB_QUIET_US - 1));
        assert!(sweep_due(start, start + JOB_QUIET_US));
    }

    #[cfg(unix)]
    #[test]
    fn a_training_root_confines_folders_and_says_nothing_of_those_outside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("line-3/good")).unwrap();
        std::fs::create_dir_all(dir.path().join("secret")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("out")).unwrap();
        let root = root.canonicalize().unwrap();
        let inside = root.join("line-3/good");
        assert_eq!(within_root(&root, std::path::Path::new("line-3/good")).unwrap(), inside);
        assert_eq!(within_root(&root, &inside).unwrap(), inside);
        let message = |given: &std::path::Path| match within_root(&root, given) {
            Err(ApiError::BadTrainingData(m)) => m,
            other => panic!("{given:?}: {other:?}"),
        };
        // Outside, existing or not, by `..`, by an absolute path or by a link: one answer.
        let secret = dir.path().join("secret");
        for given in [
            std::path::Path::new("../secret"),
            std::path::Path::new("line-3/../../secret"),
            secret.as_path(),
            std::path::Path::new("/no/such/folder"),
            std::path::Path::new("out"),
            std::path::Path::new("out/missing"),
        ] {
            assert!(
                message(given).contains("must lie inside the server's training root"),
                "{given:?}"
            );
        }
        assert!(message(std::path::Path::new("line-4")).contains("no such folder in the training root"));
    }

    #[test]
    fn a_model_name_is_held_by_one_request_at_a_time() {
        let board = JobBoard::new(1);
        let first = board.reserve("line-1").unwrap();
        assert!(matches!(board.reserve("line-1"), Err(ApiError::ModelExists(_))));
        assert!(board.reserve("line-2").is_ok(), "other names stay free");
        drop(first);
        assert!(board.reserve("line-1").is_ok(), "released when the request is done");
    }
}

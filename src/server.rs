//! `vigil serve`: load and warm every model, open the database, then bind and serve
//! until SIGTERM/Ctrl-C, draining requests in flight.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::{self, AppState, Limits, ServedModel};
use crate::cli::ServeArgs;
use crate::engine::Engine;
use crate::model::device;
use crate::registry::load_models;
use crate::storage::blobs::BlobStore;
use crate::storage::Store;

/// Builds the state: models and engines, database, blobs, keys.
pub async fn build_state(
    args: &ServeArgs,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> anyhow::Result<Arc<AppState>> {
    // Before the database is opened (and, for SQLite, created): a mistyped models folder
    // should leave nothing behind.
    anyhow::ensure!(
        args.models_dir.is_dir(),
        "the models folder {} does not exist (--models-dir)",
        args.models_dir.display()
    );
    let device = device::select(args.device)?;
    let keys = match &args.api_keys_file {
        Some(p) => Some(api::auth::ApiKeys::load(p).map_err(|e| anyhow::anyhow!("API keys file {e}"))?),
        None => None,
    };
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("creating {}", args.data_dir.display()))?;
    let url = match &args.database_url {
        Some(u) => u.clone(),
        None => format!("sqlite://{}", args.data_dir.join("vigil.db").display()),
    };
    let store = open_database(&url, Duration::from_secs_f64(args.database_wait))
        .await
        .with_context(|| "opening the database".to_string())?;
    tracing::info!(backend = store.backend, "database ready");
    // Unfinished jobs of a stopped server are not judged here but by the heartbeat, once
    // this server has itself been heard for the quiet time: the database may hold jobs
    // another live server is training (a replica, or a second process on the same SQLite
    // file), and just after the database was out of reach every server's jobs look quiet.
    let dir = args.models_dir.clone();
    let dev = device.clone();
    let loaded = tokio::task::spawn_blocking(move || load_models(&dir, &dev)).await??;
    let mut models = BTreeMap::new();
    for (name, dir, detector, version) in loaded {
        crate::metrics::model_served(&name, &version, None, device::name(&device));
        let engine = Engine::start(&name, detector, &version, args.max_batch, args.queue_capacity);
        models.insert(
            name,
            Arc::new(ServedModel {
                engine,
                dir,
                reload: Default::default(),
            }),
        );
    }
    let default_model = crate::api::fallback_default_model(&models);
    if default_model.is_none() && !models.contains_key("default") {
        tracing::warn!(
            models = models.keys().cloned().collect::<Vec<_>>().join(", "),
            "no model is named `default`: POST /v1/inspect answers 404; use /v1/models/{{model}}/inspect"
        );
    }
    let training_root = match &args.training_root {
        Some(root) => Some(
            root.canonicalize()
                .with_context(|| format!("--training-root {}", root.display()))?,
        ),
        None => None,
    };
    let state = Arc::new(AppState {
        models: std::sync::RwLock::new(models),
        default_model,
        store,
        blobs: BlobStore::new(&args.data_dir),
        limits: Limits {
            max_body_bytes: args.max_body_bytes,
            max_pixels: args.max_pixels,
            request_timeout: Duration::from_secs_f64(args.request_timeout.max(0.001)),
            body_timeout: Duration::from_secs_f64(args.body_timeout),
            header_timeout: Duration::from_secs_f64(args.header_timeout),
            shutdown_delay: Duration::from_secs_f64(args.shutdown_delay),
            drain_timeout: Duration::from_secs_f64(args.drain_timeout),
            // Never below one image of the largest size accepted, which would wait for good.
            pixel_budget: crate::api::budget::PixelBudget::new(args.max_inflight_pixels.max(args.max_pixels)),
            store_images: args.store_images,
            training_root,
            max_batch: args.max_batch,
            queue_capacity: args.queue_capacity,
        },
        keys,
        metrics,
        device,
        stopping: AtomicBool::new(false),
        live: Default::default(),
        models_dir: args.models_dir.clone(),
        training: api::training::JobBoard::new(
            args.training_threads
                .unwrap_or((candle_core::utils::get_num_threads() / 2).max(1)),
        ),
        discovery: Default::default(),
        idempotency: Default::default(),
    });
    let removed = api::training::remove_stale_uploads(&state).await;
    if removed > 0 {
        tracing::info!(
            jobs = removed,
            "removed uploaded images of training jobs that had ended"
        );
    }
    Ok(state)
}

/// Opens the database at `url`. A PostgreSQL server that does not answer yet (still
/// starting, its name not yet resolvable, its port not yet open) is tried again, a second
/// after each failed try (a try itself may wait up to 10 s), until `wait` has passed; SQLite is opened once (its errors are a wrong
/// path or permissions, which waiting does not mend).
async fn open_database(url: &str, wait: Duration) -> Result<Store, crate::storage::StoreError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut attempt = 1;
    loop {
        match Store::connect(url).await {
            Err(e) if !url.starts_with("sqlite:") && e.is_unreachable() && tokio::time::Instant::now() < deadline => {
                tracing::warn!(attempt, error = %e, "the database does not answer yet; trying again");
                // A pause between attempts, not a synchronisation: the database is
                // another process, and nothing here can be told when it is up.
                tokio::time::sleep_until((tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline)).await;
                attempt += 1;
            }
            opened => return opened,
        }
    }
}

/// Serves `state` on `listener` until `shutdown` resolves, then stops: readiness turns
/// 503 at once, the listener keeps accepting for `limits.shutdown_delay` (so that a load
/// balancer still routing here while it notices is answered, not refused), then closes,
/// and the requests in flight get `limits.drain_timeout` to finish before their
/// connections are dropped.
///
/// An accept loop of its own rather than `axum::serve`, which sets hyper no timer, so no
/// header read timeout applies under it: a client sending its headers a byte at a time (or
/// nothing at all) held a connection for good. Here each connection must deliver a
/// request's headers within `limits.header_timeout` of starting to wait for them, which
/// also closes keep-alive connections left idle that long.
pub async fn run(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let server = Connections::new(&state);
    server.accept_until(&listener, shutdown).await;
    state.stopping.store(true, Ordering::SeqCst);
    // Before the drain: a client watching a job's events keeps its connection open
    // until the job ends, so the jobs must end first. A running one stops after its
    // step and writes nothing; it would otherwise run to its end (the runtime waits
    // for blocking work) and leave a model its record calls unfinished.
    state.training.stop_all();
    let delay = state.limits.shutdown_delay;
    if !delay.is_zero() {
        tracing::info!(
            seconds = delay.as_secs_f64(),
            "shutting down: not ready, still accepting connections for a while"
        );
        server.accept_until(&listener, tokio::time::sleep(delay)).await;
    }
    drop(listener);
    tracing::info!("shutting down: draining requests in flight");
    let drain = state.limits.drain_timeout;
    let Connections { graceful, abort, .. } = server;
    let mut drained = std::pin::pin!(graceful.shutdown());
    if tokio::time::timeout(drain, &mut drained).await.is_err() {
        tracing::warn!(
            seconds = drain.as_secs_f64(),
            "requests still in flight after the drain timeout; closing their connections"
        );
        abort.send_replace(true);
        drained.await;
    }
    Ok(())
}

/// The connections the server has accepted, each served by hyper with vigil's settings.
struct Connections {
    app: axum::Router,
    http: hyper::server::conn::http1::Builder,
    graceful: hyper_util::server::graceful::GracefulShutdown,
    /// Set when the drain times out: every connection still open is dropped.
    abort: tokio::sync::watch::Sender<bool>,
}

impl Connections {
    fn new(state: &Arc<AppState>) -> Self {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(state.limits.header_timeout);
        Self {
            app: api::app(state.clone()),
            http,
            graceful: hyper_util::server::graceful::GracefulShutdown::new(),
            abort: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Accepts and serves connections until `stop` resolves.
    async fn accept_until(&self, listener: &TcpListener, stop: impl Future<Output = ()>) {
        use tower::ServiceExt;
        let mut stop = std::pin::pin!(stop);
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        accept_failed(e).await;
                        continue;
                    }
                },
                () = &mut stop => return,
            };
            let service = hyper_util::service::TowerToHyperService::new(
                self.app
                    .clone()
                    .map_request(|r: axum::extract::Request<hyper::body::Incoming>| r.map(axum::body::Body::new)),
            );
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection = self.graceful.watch(self.http.serve_connection(io, service));
            let mut abort = self.abort.subscribe();
            tokio::spawn(async move {
                tokio::select! {
                    ended = connection => if let Err(e) = ended {
                        tracing::debug!(error = %e, "connection ended with an error");
                    },
                    // Dropping the connection closes it, with whatever request it held.
                    _ = abort.wait_for(|abort| *abort) => {}
                }
            });
        }
    }
}

/// A failed accept: a connection reset before it was taken is the client's business; any
/// other error (out of file descriptors, most often) is logged and the loop waits a second
/// rather than spinning on it.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Runs [`retention_pass`] hourly.
fn spawn_retention(state: Arc<AppState>, days: u64) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tick.tick().await;
            match retention_pass(&state, api::now_us(), days).await {
                Ok(p) => {
                    tracing::info!(
                        records = p.records,
                        images = p.images,
                        orphans = p.orphans,
                        days,
                        "retention pass"
                    )
                }
                Err(e) => tracing::error!(error = %e, "retention pass failed"),
            }
        }
    });
}

/// Records deleted per transaction by a retention pass.
const PRUNE_BATCH: i64 = 500;

/// What a retention pass deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Retained {
    pub records: usize,
    /// Stored images that went with them.
    pub images: usize,
    /// Files no record named, in day folders older than every record kept (an image whose
    /// row the database never took, a temporary file a crash left), removed with their
    /// folders.
    pub orphans: usize,
}

/// Deletes the records made more than `days` before `now_us`, and their stored images,
/// a batch at a time. Rows go first: an image whose row is gone is unreachable, the
/// reverse would be a record pointing at nothing. Each batch's images are removed before
/// the next batch, so a pass that fails part-way leaves no image without its row behind.
/// Returns how many of each it deleted (counts: a long backlog's paths are not kept).
pub async fn retention_pass(state: &AppState, now_us: i64, days: u64) -> Result<Retained, crate::storage::StoreError> {
    let days = i64::try_from(days).unwrap_or(i64::MAX);
    let cutoff = now_us.saturating_sub(days.saturating_mul(86_400_000_000));
    let mut total = Retained::default();
    loop {
        let pruned = state.store.prune_batch(cutoff, PRUNE_BATCH).await?;
        let (records, images) = (pruned.records, pruned.images.len());
        let blobs = state.blobs.clone();
        let removed =
            tokio::task::spawn_blocking(move || pruned.images.iter().filter(|p| blobs.remove(p).is_ok()).count()).await;
        if removed.is_ok_and(|r| r < images) {
            tracing::warn!(images, "some pruned images could not be removed");
        }
        total.records += records;
        total.images += images;
        if (records as i64) < PRUNE_BATCH {
            break;
        }
    }
    let root = state.blobs.root().join("images");
    total.orphans = tokio::task::spawn_blocking(move || remove_days_before(&root, cutoff))
        .await
        .unwrap_or(0);
    Ok(total)
}

/// Removes the day folders under `images` (`yyyy-mm-dd`, the UTC day of the records whose
/// images they hold) that end more than a day before `cutoff_us`: every record whose image
/// one holds was made before the cutoff and has been pruned, so what is left there no
/// record names (the spare day covers folders named by an earlier version, from the time
/// the image was written rather than the record's). Links are left alone. Returns how many
/// files went.
fn remove_days_before(images: &std::path::Path, cutoff_us: i64) -> usize {
    let Some(cutoff) = chrono::DateTime::from_timestamp_micros(cutoff_us) else {
        return 0;
    };
    let Some(last_removable) = cutoff.date_naive().checked_sub_days(chrono::Days::new(2)) else {
        return 0;
    };
    let Ok(days) = std::fs::read_dir(images) else {
        return 0;
    };
    let mut removed = 0;
    for day in days.flatten() {
        let name = day.file_name().to_string_lossy().into_owned();
        let old = chrono::NaiveDate::parse_from_str(&name, "%Y-%m-%d").is_ok_and(|d| d <= last_removable);
        if !old || !day.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let files = std::fs::read_dir(day.path()).map_or(0, |f| f.count());
        match std::fs::remove_dir_all(day.path()) {
            Ok(()) => removed += files,
            Err(e) => tracing::warn!(folder = %day.path().display(), "could not remove an old day's images: {e}"),
        }
    }
    removed
}

/// Listens for SIGINT and SIGTERM from the moment it is called, not from the first poll.
/// `serve` calls it before binding: a SIGTERM that comes right after "listening" (a
/// rolling deploy, a quick restart) must drain the requests in flight; with the handler
/// not yet installed its default action would kill the process and reset them.
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! { _ = term.recv() => {}, _ = interrupt.recv() => {} }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// The `serve` subcommand.
pub fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let served = rt.block_on(async {
        let handle = crate::metrics::install();
        let state = build_state(args, handle).await?;
        api::discovery::spawn(state.clone(), Duration::from_secs_f64(args.models_scan_interval));
        if args.retention_days > 0 {
            spawn_retention(state.clone(), args.retention_days);
        }
        api::training::spawn_heartbeat(&state);
        let shutdown = shutdown_signal().context("installing the SIGTERM and SIGINT handlers")?;
        // Bound only now: every model is loaded and warm.
        let listener = TcpListener::bind(&args.listen).await.with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        if state.keys.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "listening beyond loopback without API keys: anyone who can reach this port can use the API (give --api-keys-file)");
        }
        tracing::info!(models = ?state.model_list().into_iter().map(|m| m.0).collect::<Vec<_>>(), "listening on http://{addr}");
        run(listener, state.clone(), shutdown).await?;
        state.training.finish_stopping(&state.store, Duration::from_secs(60)).await;
        // Closing the pool ends SQLite's write-ahead log: the database file alone then
        // holds everything (a copy of it is a backup).
        state.store.close().await;
        Ok(())
    });
    // Not the default wait for blocking work: a training job that did not stop in time
    // must not hold the process (it was cancelled, so it would never move its model in).
    rt.shutdown_timeout(Duration::from_secs(1));
    served
}

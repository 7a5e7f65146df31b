//! Metric names (prefix `vigil_`, unit suffixes, `_total` on counters) and their buckets.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS: &str = "vigil_http_requests_total";
pub const REQUEST_SECONDS: &str = "vigil_http_request_duration_seconds";
pub const DECODE_SECONDS: &str = "vigil_decode_duration_seconds";
pub const QUEUE_SECONDS: &str = "vigil_queue_duration_seconds";
pub const INFERENCE_SECONDS: &str = "vigil_inference_duration_seconds";
pub const SCORING_SECONDS: &str = "vigil_scoring_duration_seconds";
pub const INSPECTION_SECONDS: &str = "vigil_inspection_duration_seconds";
pub const BATCH_SIZE: &str = "vigil_batch_size";
pub const QUEUE_DEPTH: &str = "vigil_queue_depth";
pub const VERDICTS: &str = "vigil_verdicts_total";
pub const REPLAYS: &str = "vigil_inspections_replayed_total";
pub const SCORES: &str = "vigil_anomaly_score";
pub const MODEL_INFO: &str = "vigil_model_info";
pub const DATABASE_ERRORS: &str = "vigil_database_errors_total";
pub const SCORE_DRIFT: &str = "vigil_score_drift";
pub const SCORE_DRIFT_CRITICAL: &str = "vigil_score_drift_critical";
pub const BUILD_INFO: &str = "vigil_build_info";

/// `code` labels of [`DATABASE_ERRORS`].
pub const STORAGE_ERROR_CODES: [&str; 2] = ["database_unavailable", "image_store_unavailable"];
/// `verdict` labels of [`VERDICTS`].
pub const VERDICT_LABELS: [&str; 2] = ["normal", "anomalous"];

/// Installs the global recorder (once per process) and returns its handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Up to the longest a request may wait (--request-timeout, 30 s by default).
            let latency = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .expect("buckets")
                .set_buckets_for_metric(
                    Matcher::Full(BATCH_SIZE.into()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
                )
                .expect("buckets")
                .set_buckets_for_metric(
                    Matcher::Full(SCORES.into()),
                    // Scores differ in scale between families: draem's lie in 0–1 (a
                    // probability), the reconstruction families' in units of the good
                    // images' mean error (thresholds of 1.5–20). Fine steps below 1, then
                    // roughly doubling.
                    &[
                        0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0,
                        100.0,
                    ],
                )
                .expect("buckets");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests in one process): keep ours for rendering.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            // Counters appear at 0 before their first event, so that `increase()` and
            // alerts on them see that event (a series that starts at 1 shows no increase).
            for code in STORAGE_ERROR_CODES {
                metrics::counter!(DATABASE_ERRORS, "code" => code).increment(0);
            }
            handle
        })
        .clone()
}

/// Marks `version` of `model` as the one served (1) and, after a reload, the version it
/// replaced as no longer served (0): a query joining on the served version must find one.
pub fn model_served(model: &str, version: &str, replaced: Option<&str>, device: &str) {
    if let Some(old) = replaced.filter(|old| *old != version) {
        metrics::gauge!(MODEL_INFO, "model" => model.to_string(), "version" => old.to_string(), "device" => device.to_string()).set(0.0);
    }
    metrics::gauge!(MODEL_INFO, "model" => model.to_string(), "version" => version.to_string(), "device" => device.to_string()).set(1.0);
    // The model's counters at 0 before its first inspection (see `install`).
    for verdict in VERDICT_LABELS {
        metrics::counter!(VERDICTS, "model" => model.to_string(), "verdict" => verdict).increment(0);
    }
    metrics::counter!(REPLAYS, "model" => model.to_string()).increment(0);
}

/// Help text for every metric (Prometheus lints metrics without it).
fn describe() {
    describe_counter!(REQUESTS, "HTTP requests by matched route, method and status");
    describe_histogram!(REQUEST_SECONDS, Unit::Seconds, "HTTP request latency by matched route");
    describe_histogram!(DECODE_SECONDS, Unit::Seconds, "Image decoding and preparation time");
    describe_histogram!(
        QUEUE_SECONDS,
        Unit::Seconds,
        "Time an inspection waited for the model thread"
    );
    describe_histogram!(INFERENCE_SECONDS, Unit::Seconds, "Model time per batch");
    describe_histogram!(SCORING_SECONDS, Unit::Seconds, "Anomaly map, score and region time");
    describe_histogram!(
        INSPECTION_SECONDS,
        Unit::Seconds,
        "End-to-end time of a successful inspection"
    );
    describe_histogram!(BATCH_SIZE, "Images per model batch");
    describe_gauge!(QUEUE_DEPTH, "Inspections admitted and not yet answered, per model");
    describe_counter!(VERDICTS, "Verdicts by model and verdict");
    describe_counter!(
        REPLAYS,
        "Inspections answered from the record of an earlier request with the same Idempotency-Key"
    );
    describe_histogram!(SCORES, "Anomaly scores by model");
    describe_gauge!(BUILD_INFO, "Always 1; the version label is vigil's");
    describe_gauge!(
        MODEL_INFO,
        "Served models: 1 for the version served, 0 for one a reload replaced"
    );
    describe_counter!(DATABASE_ERRORS, "Failed database or image-store writes and reads");
    describe_gauge!(
        SCORE_DRIFT,
        "Kolmogorov-Smirnov distance between recent good parts' scores and the calibration scores"
    );
    describe_gauge!(
        SCORE_DRIFT_CRITICAL,
        "The score drift above which the difference is significant at 1%"
    );
}

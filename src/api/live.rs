//! Live numbers for the operator's page (`GET /v1/stats`): inspections per second,
//! latency percentiles and anomaly rate per model over a recent window, from the
//! server's own memory, so the page needs no Prometheus. Per process: each replica
//! reports what it served.
//!
//! Also score drift per model: the scores of recent good parts (judged normal, or judged
//! anomalous and then labelled good) against the held-out good images' scores the
//! threshold was calibrated on. When lighting, camera or product change, good parts' scores
//! move before the false alarms pile up.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How far back the server remembers (the longest window a caller can ask for).
pub const MAX_WINDOW: Duration = Duration::from_secs(15 * 60);
/// At most this many inspections are remembered, so memory stays bounded at any rate.
const MAX_SAMPLES: usize = 200_000;

struct Sample {
    at: Instant,
    model: String,
    latency_ms: f64,
    anomalous: bool,
}

/// Recent good parts' scores compared per model.
pub const DRIFT_WINDOW: usize = 200;
/// Fewer recent scores than this say nothing yet.
pub const DRIFT_MIN_SAMPLES: usize = 30;
/// Significance of the drift flag.
pub const DRIFT_ALPHA: f64 = 0.01;

/// Recent successful inspections, oldest first; recent good scores per model.
#[derive(Default)]
pub struct LiveStats {
    samples: Mutex<VecDeque<Sample>>,
    good_scores: Mutex<HashMap<String, DriftState>>,
}

#[derive(Default)]
struct DriftState {
    /// The model version whose scores these are: a request judged by the version a reload
    /// replaced may finish after it, and its score is on the old calibration's scale.
    version: String,
    /// (inspection id, score), oldest first: a part relabelled good twice counts once.
    recent: VecDeque<(String, f32)>,
    last: Option<Drift>,
}

/// How far recent good parts' scores are from the calibration scores.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Drift {
    /// Two-sample Kolmogorov–Smirnov distance, 0 (same distribution) to 1.
    pub statistic: f64,
    /// The distance above which the difference is significant at 1%.
    pub critical: f64,
    /// Recent good scores compared (at most 200).
    pub recent: usize,
    /// Calibration scores (the model's held-out good images).
    pub reference: usize,
    pub drifted: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ModelStats {
    pub inspections: u64,
    pub anomalous: u64,
    /// anomalous / inspections; absent when there were none.
    pub anomaly_rate: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Stats {
    /// The window the figures cover, in seconds.
    pub window_s: f64,
    pub inspections: u64,
    pub inspections_per_s: f64,
    /// Server-side time of answered inspections (decode to stored record); absent when none.
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub models: BTreeMap<String, ModelStats>,
    /// Per model with enough recent good parts and calibration scores in its artifact.
    pub drift: BTreeMap<String, Drift>,
}

impl LiveStats {
    pub fn record(&self, model: &str, latency_ms: f64, anomalous: bool) {
        self.record_at(Instant::now(), model, latency_ms, anomalous);
    }

    fn record_at(&self, at: Instant, model: &str, latency_ms: f64, anomalous: bool) {
        let mut s = self.samples.lock().expect("live stats lock");
        while s.len() >= MAX_SAMPLES || s.front().is_some_and(|f| at.duration_since(f.at) > MAX_WINDOW) {
            s.pop_front();
        }
        s.push_back(Sample {
            at,
            model: model.to_string(),
            latency_ms,
            anomalous,
        });
    }

    /// Adds the score of good part `id` judged by `model`, whose calibration scores are
    /// `reference` (ascending), and returns the drift now, once there are enough scores.
    /// A part already in the window is not added again. Logs when the drift flag changes.
    pub fn record_good(&self, model: &str, version: &str, id: &str, score: f32, reference: &[f32]) -> Option<Drift> {
        let mut all = self.good_scores.lock().expect("drift lock");
        let st = all.entry(model.to_string()).or_insert_with(|| DriftState {
            version: version.to_string(),
            ..Default::default()
        });
        if st.version != version {
            return None; // judged by a version since replaced
        }
        if st.recent.iter().any(|(seen, _)| seen == id) {
            return st.last.clone();
        }
        if st.recent.len() == DRIFT_WINDOW {
            st.recent.pop_front();
        }
        st.recent.push_back((id.to_string(), score));
        Self::judge_drift(st, model, reference)
    }

    /// The drift of `st`'s recent good scores from `reference`, stored as its last and
    /// published; None (and none stored) while there are too few scores.
    fn judge_drift(st: &mut DriftState, model: &str, reference: &[f32]) -> Option<Drift> {
        if st.recent.len() < DRIFT_MIN_SAMPLES || reference.is_empty() {
            if st.last.take().is_some() {
                Self::unpublish(model);
            }
            return None;
        }
        let mut recent: Vec<f32> = st.recent.iter().map(|(_, s)| *s).collect();
        recent.sort_by(f32::total_cmp);
        let statistic = crate::scoring::drift::ks_statistic(&recent, reference)?;
        let critical = crate::scoring::drift::ks_critical(recent.len(), reference.len(), DRIFT_ALPHA);
        let drift = Drift {
            statistic,
            critical,
            recent: recent.len(),
            reference: reference.len(),
            drifted: statistic > critical,
        };
        let was = st.last.as_ref().is_some_and(|d| d.drifted);
        if drift.drifted && !was {
            tracing::warn!(model, statistic, critical, "good parts' scores have drifted from the calibration scores: check lighting, camera and product, then recalibrate (vigil calibrate)");
        } else if was && !drift.drifted {
            tracing::info!(
                model,
                statistic,
                critical,
                "good parts' scores are back in line with the calibration scores"
            );
        }
        metrics::gauge!(crate::metrics::SCORE_DRIFT, "model" => model.to_string()).set(statistic);
        metrics::gauge!(crate::metrics::SCORE_DRIFT_CRITICAL, "model" => model.to_string()).set(critical);
        st.last = Some(drift.clone());
        Some(drift)
    }

    /// Takes part `id` out of `model`'s recent good scores (an operator labelled it
    /// defective after all).
    /// The drift is judged again at once, so that a flag raised by a part that was no
    /// good part after all goes down without waiting for the next good one.
    pub fn forget_good(&self, model: &str, id: &str, reference: &[f32]) {
        if let Some(st) = self.good_scores.lock().expect("drift lock").get_mut(model) {
            let before = st.recent.len();
            st.recent.retain(|(seen, _)| seen != id);
            if st.recent.len() != before {
                Self::judge_drift(st, model, reference);
            }
        }
    }

    /// Forgets a model's recent good scores (its artifact changed: new calibration) and,
    /// with a version, takes only that version's from now on.
    pub fn reset_drift(&self, model: &str, version: Option<&str>) {
        let mut all = self.good_scores.lock().expect("drift lock");
        let removed = match version {
            Some(v) => all.insert(
                model.to_string(),
                DriftState {
                    version: v.to_string(),
                    ..Default::default()
                },
            ),
            None => all.remove(model),
        };
        if removed.is_some() {
            Self::unpublish(model);
        }
    }

    /// Sets a model's drift gauge to 0 once its drift is no longer judged (a reload, a
    /// removed model, too few parts left): a gauge left at its last value would keep the
    /// alert `vigil_score_drift > vigil_score_drift_critical` firing after the fix.
    fn unpublish(model: &str) {
        metrics::gauge!(crate::metrics::SCORE_DRIFT, "model" => model.to_string()).set(0.0);
    }

    /// Figures over the last `window` (at most [`MAX_WINDOW`]).
    pub fn summary(&self, window: Duration) -> Stats {
        self.summary_at(Instant::now(), window)
    }

    fn summary_at(&self, now: Instant, window: Duration) -> Stats {
        let window = window.min(MAX_WINDOW);
        let drift = self
            .good_scores
            .lock()
            .expect("drift lock")
            .iter()
            .filter_map(|(m, st)| st.last.clone().map(|d| (m.clone(), d)))
            .collect();
        let s = self.samples.lock().expect("live stats lock");
        let recent: Vec<&Sample> = s
            .iter()
            .rev()
            .take_while(|x| now.saturating_duration_since(x.at) <= window)
            .collect();
        let mut latencies: Vec<f64> = recent.iter().map(|x| x.latency_ms).collect();
        latencies.sort_by(f64::total_cmp);
        let mut models: BTreeMap<String, ModelStats> = BTreeMap::new();
        for x in &recent {
            let m = models.entry(x.model.clone()).or_insert(ModelStats {
                inspections: 0,
                anomalous: 0,
                anomaly_rate: None,
            });
            m.inspections += 1;
            m.anomalous += x.anomalous as u64;
        }
        for m in models.values_mut() {
            m.anomaly_rate = Some(m.anomalous as f64 / m.inspections as f64);
        }
        Stats {
            window_s: window.as_secs_f64(),
            inspections: recent.len() as u64,
            inspections_per_s: recent.len() as f64 / window.as_secs_f64().max(1e-9),
            latency_p50_ms: nearest_rank(&latencies, 0.50),
            latency_p99_ms: nearest_rank(&latencies, 0.99),
            models,
            drift,
        }
    }
}

/// The nearest-rank percentile of sorted values: the smallest value with at least
/// `q` of the values at or below it.
fn nearest_rank(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
// A misspelt parameter is refused, not ignored: `?thresh=0.1` was judged at the model's
// threshold, and a filter the route does not take listed every record.
#[serde(deny_unknown_fields)]
pub struct StatsQuery {
    /// Seconds to look back: 1–900, default 60.
    pub window_s: Option<f64>,
}

/// Live figures of this server process over a recent window.
#[utoipa::path(get, path = "/v1/stats", params(StatsQuery), responses((status = 200, body = Stats), (status = 400, body = crate::api::error::ErrorBody)))]
pub async fn stats(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<super::AppState>>,
    q: Result<axum::extract::Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Stats>, super::error::ApiError> {
    let window = super::inspect::query(q)?.window_s.unwrap_or(60.0);
    if !(1.0..=MAX_WINDOW.as_secs_f64()).contains(&window) {
        return Err(super::error::ApiError::BadRequest(format!(
            "window_s must be between 1 and {}",
            MAX_WINDOW.as_secs()
        )));
    }
    Ok(axum::Json(state.live.summary(Duration::from_secs_f64(window))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_needs_enough_scores_flags_a_shift_and_forgets_on_reset() {
        let live = LiveStats::default();
        // Calibration scores 0.10, 0.11, … 0.29.
        let reference: Vec<f32> = (0..20).map(|i| 0.1 + 0.01 * i as f32).collect();
        for i in 0..DRIFT_MIN_SAMPLES - 1 {
            assert_eq!(
                live.record_good("m", "v1", &format!("a{i}"), reference[i % 20], &reference),
                None
            );
        }
        // The same part again (relabelled good twice) is not a new sample; one labelled
        // defective leaves the window.
        assert_eq!(live.record_good("m", "v1", "a0", reference[0], &reference), None);
        live.forget_good("m", "a0", &reference);
        assert_eq!(live.record_good("m", "v1", "a0", reference[0], &reference), None);
        // Same distribution: small distance, no flag.
        let d = live.record_good("m", "v1", "b", 0.2, &reference).unwrap();
        assert!(!d.drifted && d.statistic < d.critical, "{d:?}");
        assert_eq!((d.recent, d.reference), (DRIFT_MIN_SAMPLES, 20));
        assert_eq!(live.record_good("m", "v1", "b", 0.2, &reference), Some(d));
        // Good parts now score far above every calibration score: the window fills with
        // them, the distance reaches 1 and the flag rises.
        let mut last = None;
        for i in 0..DRIFT_WINDOW {
            last = live.record_good("m", "v1", &format!("c{i}"), 0.5, &reference);
        }
        let d = last.unwrap();
        assert_eq!((d.recent, d.statistic, d.drifted), (DRIFT_WINDOW, 1.0, true));
        assert_eq!(live.summary(Duration::from_secs(60)).drift["m"], d);
        // A part of the window labelled defective leaves it, and the drift is judged again
        // at once: one score fewer.
        live.forget_good("m", "c5", &reference);
        assert_eq!(
            live.summary(Duration::from_secs(60)).drift["m"].recent,
            DRIFT_WINDOW - 1
        );
        // Without calibration scores (an older artifact) there is nothing to compare.
        for i in 0..DRIFT_MIN_SAMPLES {
            assert_eq!(live.record_good("old", "v1", &format!("d{i}"), 0.5, &[]), None);
        }
        // A reload to v2: the window starts afresh, and a request judged by v1 that
        // finishes after it does not count (its score is on v1's scale).
        live.reset_drift("m", Some("v2"));
        assert!(live.summary(Duration::from_secs(60)).drift.is_empty());
        for i in 0..DRIFT_MIN_SAMPLES {
            assert_eq!(live.record_good("m", "v1", &format!("e{i}"), 0.5, &reference), None);
        }
        for i in 0..DRIFT_MIN_SAMPLES - 1 {
            assert_eq!(live.record_good("m", "v2", &format!("f{i}"), 0.2, &reference), None);
        }
        let d = live.record_good("m", "v2", "f-last", 0.2, &reference).unwrap();
        assert_eq!(d.recent, DRIFT_MIN_SAMPLES);
        live.reset_drift("m", None);
        assert!(live.summary(Duration::from_secs(60)).drift.is_empty());
    }

    #[test]
    fn nearest_rank_percentiles_by_hand() {
        // 1..=100: p50 is the 50th value, p99 the 99th.
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(nearest_rank(&v, 0.5), Some(50.0));
        assert_eq!(nearest_rank(&v, 0.99), Some(99.0));
        // Three values: p50 → rank ⌈1.5⌉ = 2; p99 → rank 3.
        assert_eq!(nearest_rank(&[1.0, 2.0, 10.0], 0.5), Some(2.0));
        assert_eq!(nearest_rank(&[1.0, 2.0, 10.0], 0.99), Some(10.0));
        assert_eq!(nearest_rank(&[], 0.5), None);
    }

    #[test]
    fn counts_only_the_window_and_forgets_what_is_older_than_the_longest() {
        let live = LiveStats::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        live.record_at(at(0), "a", 5.0, true); // old: outside a 60 s window at t=100
        live.record_at(at(50), "a", 1.0, false);
        live.record_at(at(90), "a", 3.0, true);
        live.record_at(at(95), "b", 2.0, false);
        let s = live.summary_at(at(100), Duration::from_secs(60));
        assert_eq!(s.inspections, 3);
        assert!((s.inspections_per_s - 3.0 / 60.0).abs() < 1e-12);
        assert_eq!(s.latency_p50_ms, Some(2.0));
        assert_eq!(s.latency_p99_ms, Some(3.0));
        assert_eq!(
            s.models["a"],
            ModelStats {
                inspections: 2,
                anomalous: 1,
                anomaly_rate: Some(0.5)
            }
        );
        assert_eq!(s.models["b"].anomaly_rate, Some(0.0));
        // A sample past the longest window drops the first one for good.
        live.record_at(at(0) + MAX_WINDOW + Duration::from_secs(1), "b", 1.0, false);
        assert_eq!(live.samples.lock().unwrap().len(), 4);
        assert_eq!(live.samples.lock().unwrap().front().unwrap().latency_ms, 1.0);
        // Empty window: no percentiles, no rate.
        let empty = LiveStats::default().summary_at(at(0), Duration::from_secs(60));
        assert_eq!((empty.inspections, empty.latency_p50_ms), (0, None));
    }
}

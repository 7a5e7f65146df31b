//! Live numbers for the operator's page (`GET /v1/stats`): inspections per second,
//! latency percentiles and anomaly rate per model over a recent window, from the
//! server's own memory, so the page needs no Prometheus. Per process: each replica
//! reports what it served.

use std::collections::{BTreeMap, VecDeque};
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

/// Recent successful inspections, oldest first.
#[derive(Default)]
pub struct LiveStats {
    samples: Mutex<VecDeque<Sample>>,
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

    /// Figures over the last `window` (at most [`MAX_WINDOW`]).
    pub fn summary(&self, window: Duration) -> Stats {
        self.summary_at(Instant::now(), window)
    }

    fn summary_at(&self, now: Instant, window: Duration) -> Stats {
        let window = window.min(MAX_WINDOW);
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

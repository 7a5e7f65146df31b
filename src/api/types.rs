//! Request and response bodies (the OpenAPI document is generated from these).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::scoring::Region;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ImageQuery {
    /// `png`: the image decoded (upright, by its EXIF orientation) and sent as PNG, for
    /// what a browser cannot show (TIFF). Default: the bytes as they were uploaded.
    pub format: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Timings {
    pub decode: f64,
    pub queue: f64,
    pub inference: f64,
    pub scoring: f64,
    pub total: f64,
}

/// Where an inspection's images are. The image and the maps rendered from it exist only
/// when the image was stored (`image_stored`); without it, only `self`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Links {
    #[serde(rename = "self")]
    pub self_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heatmap: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly_map: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconstruction: Option<String>,
    /// The stored image as it was uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl Links {
    pub fn for_id(id: &str, image_stored: bool) -> Self {
        let base = format!("/v1/inspections/{id}");
        let link = |tail: &str| image_stored.then(|| format!("{base}/{tail}"));
        Self {
            heatmap: link("heatmap.png"),
            anomaly_map: link("anomaly_map.npy"),
            reconstruction: link("reconstruction.png"),
            image: link("image"),
            self_: base,
        }
    }
}

/// One inspection: the verdict and where to find its images.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InspectionResponse {
    /// Time-ordered UUID (v7).
    pub id: String,
    pub model: String,
    /// Hash of the model artifact that made this verdict.
    pub model_version: String,
    #[serde(serialize_with = "as_scored")]
    pub score: f64,
    #[serde(serialize_with = "as_scored")]
    pub threshold: f64,
    /// The map value the regions were cut at: the model's pixel threshold, or the
    /// request's image threshold when that is lower. Absent in records made before it
    /// was stored.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "as_scored_option")]
    pub pixel_threshold: Option<f64>,
    pub is_anomalous: bool,
    /// Defect regions of an anomalous verdict (none for a normal one), highest peak first,
    /// in the image's own pixels. `peak` and `mean` are values of the returned anomaly map,
    /// on `pixel_threshold`'s scale; `score` may be read off another smoothing of the map
    /// (draem's), so compare verdicts by `is_anomalous`, not by a region's peak.
    pub regions: Vec<Region>,
    pub width: i64,
    pub height: i64,
    pub timings_ms: Timings,
    /// The weight of the first of two learned maps this verdict used (usad models only).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "as_scored_option")]
    pub alpha: Option<f64>,
    /// Why this verdict may not mean what it says, e.g. an image of another size than the
    /// model's training images. Stored with the record (not in records made before that).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub links: Links,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub part_id: Option<String>,
    /// The `Idempotency-Key` the request was sent with, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub image_stored: bool,
    /// The operator's label, when one was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback: Option<String>,
    /// The note given with that label, if any (a new label replaces it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub feedback_note: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
// A misspelt parameter is refused, not ignored: `?thresh=0.1` was judged at the model's
// threshold, and a filter the route does not take listed every record.
#[serde(deny_unknown_fields)]
pub struct InspectQuery {
    /// Image threshold for this request only.
    pub threshold: Option<f32>,
    /// For models that mix two learned maps (usad): the weight of the first, 0 to 1, for
    /// this request only (default: the model's). More weight on the second decoder's error
    /// raises sensitivity and false alarms; the threshold was calibrated at the model's own.
    pub alpha: Option<f32>,
    /// Keep the image (default: the server's --store-images).
    pub store_image: Option<bool>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
// A misspelt parameter is refused, not ignored: `?thresh=0.1` was judged at the model's
// threshold, and a filter the route does not take listed every record.
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub model: Option<String>,
    /// `anomalous` or `normal`.
    pub verdict: Option<String>,
    /// Only this part (the `X-Part-Id` the image was sent with).
    pub part_id: Option<String>,
    /// The record of the request sent with this `X-Request-Id` (after a timeout: was it
    /// judged before retrying?).
    pub request_id: Option<String>,
    /// Only parts whose id starts with this (case-sensitive), e.g. a lot number.
    pub part_prefix: Option<String>,
    /// `good` or `defective` (records labelled so), or `none` (not labelled yet).
    pub feedback: Option<String>,
    /// RFC 3339 time; records at or after it.
    pub since: Option<String>,
    /// RFC 3339 time; records before it.
    pub until: Option<String>,
    /// 1–500, default 50.
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
// A misspelt parameter is refused, not ignored: `?thresh=0.1` was judged at the model's
// threshold, and a filter the route does not take listed every record.
#[serde(deny_unknown_fields)]
pub struct HeatmapQuery {
    /// How much the colour covers the image: 0 (image only) to 1 (colour only, as the
    /// operator's page lays it over the image itself); default 0.5.
    pub opacity: Option<f32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InspectionPage {
    pub items: Vec<InspectionResponse>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FeedbackRequest {
    /// `good` or `defective`.
    pub label: String,
    pub note: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelSummary {
    pub name: String,
    pub version: String,
    pub architecture: String,
    #[serde(serialize_with = "as_scored")]
    pub image_threshold: f64,
    pub is_default: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FeedbackSummary {
    pub labelled: i64,
    pub false_positives: i64,
    pub false_negatives: i64,
    /// The threshold with the best F1 on the labelled inspections whose scores this
    /// version gives alike (made by it, or by one drawing the same maps: a recalibration);
    /// both labels needed among them.
    pub suggested_threshold: Option<f64>,
    /// How many labelled inspections that suggestion rests on.
    pub suggestion_labels: i64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelDetail {
    pub name: String,
    pub version: String,
    pub device: String,
    /// The model card (model.json).
    #[schema(value_type = Object)]
    pub card: serde_json::Value,
    pub feedback: FeedbackSummary,
}

/// A value the model computed in f32 and the database keeps as f64, written as the f32's
/// shortest decimal (`0.61035`, as `model.json` and the command line show it, rather than
/// `0.6103500127792358`). The map is monotone, so verdicts read from the JSON agree with
/// the model's; a value no f32 holds exactly is written as it is.
fn as_scored<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(scored(*v))
}

fn as_scored_option<S: serde::Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_some(&scored(*v)),
        None => s.serialize_none(),
    }
}

fn scored(v: f64) -> f64 {
    let narrow = v as f32;
    if f64::from(narrow) == v {
        narrow.to_string().parse().unwrap_or(v)
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_from_f32_are_written_as_the_f32_shows_them() {
        let widened = f64::from(0.61035f32);
        assert_eq!(widened.to_string(), "0.6103500127792358");
        assert_eq!(serde_json::to_string(&super::scored(widened)).unwrap(), "0.61035");
        // Order kept between neighbouring f32s, so verdicts read from the JSON agree.
        let (a, b) = (0.61035f32, f32::from_bits(0.61035f32.to_bits() + 1));
        assert!(super::scored(f64::from(a)) < super::scored(f64::from(b)));
        // A value no f32 holds is left alone.
        assert_eq!(super::scored(0.1), 0.1);
    }
}

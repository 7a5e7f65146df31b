//! Scoring: from an input and its reconstruction to an anomaly map, a score and regions.
//! Pure maths over `Vec<f32>` planes; no candle, no I/O.

pub mod drift;
pub mod filter;
pub mod heatmap;
pub mod regions;
pub mod ssim;

use serde::{Deserialize, Serialize};

use crate::image_io::Planar;
pub use regions::Region;

/// How the anomaly map is made from the reconstruction error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MapMethod {
    /// 1 − SSIM.
    Ssim,
    /// Squared error.
    L2,
    /// (1 − SSIM) / s + L2 / l, each divided by its mean `s`, `l` on good validation
    /// images, so both count equally whatever their natural scales.
    #[value(name = "ssim+l2")]
    #[serde(rename = "ssim+l2")]
    SsimL2,
    /// The map the model computes itself (a discriminative family's segmentation
    /// probability); the reconstruction maps stay available beside it.
    Learned,
}

/// How an image's score is read off its smoothed map.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reduction {
    Max,
    /// Mean of the `k` highest pixels.
    TopKMean {
        k: usize,
    },
    /// Maximum of the map after a `size × size` mean filter: a defect must cover an area,
    /// not a pixel, to score high (DRAEM's image score, 21×21 at 256², except at the
    /// borders: DRAEM pads with zeros, which dilutes a defect at the edge; this filter
    /// reflects the map, which counts an edge pixel up to twice, a corner one up to 4×).
    MeanFilterMax {
        size: usize,
    },
}

/// Views of an image the model is run on, their maps turned back and averaged
/// (test-time augmentation): each view is one more pass of the network. Meant for models
/// trained with flips, to which a mirrored good surface is a good surface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TestTimeFlips {
    /// The image alone.
    #[default]
    None,
    /// The image and its mirror image, left to right (2 passes).
    Horizontal,
    /// The image and its three flips: left-right, top-bottom, both (4 passes).
    All,
}

impl TestTimeFlips {
    /// Each view as (mirrored left to right, mirrored top to bottom), the image itself first.
    pub fn views(self) -> &'static [(bool, bool)] {
        match self {
            Self::None => &[(false, false)],
            Self::Horizontal => &[(false, false), (true, false)],
            Self::All => &[(false, false), (true, false), (false, true), (true, true)],
        }
    }

    pub fn is_none(&self) -> bool {
        *self == Self::None
    }
}

/// Everything needed to turn raw error maps into the anomaly map; stored in `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MapSpec {
    pub method: MapMethod,
    /// Divisor of 1 − SSIM (mean on validation images; 1 until calibrated).
    pub ssim_scale: f32,
    /// Divisor of the squared error (mean on validation images; 1 until calibrated).
    pub l2_scale: f32,
    /// σ of the Gaussian smoothing of the returned map, in working-resolution pixels.
    pub smoothing_sigma: f32,
    pub reduction: Reduction,
    /// σ of the smoothing of the map the score is read from, when it differs from the
    /// returned map's (0: the unsmoothed map). Absent in cards written before it existed:
    /// the score then reads the returned map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_smoothing_sigma: Option<f32>,
    pub ssim_window: usize,
    pub ssim_sigma: f32,
    /// Views averaged into the maps (absent: the image alone, as cards before it scored).
    #[serde(default, skip_serializing_if = "TestTimeFlips::is_none")]
    pub test_time_flips: TestTimeFlips,
}

impl Default for MapSpec {
    fn default() -> Self {
        Self {
            method: MapMethod::SsimL2,
            ssim_scale: 1.0,
            l2_scale: 1.0,
            smoothing_sigma: 4.0,
            reduction: Reduction::Max,
            score_smoothing_sigma: None,
            ssim_window: 11,
            ssim_sigma: 1.5,
            test_time_flips: TestTimeFlips::None,
        }
    }
}

impl MapSpec {
    /// Checks that every size fits a `working_size²` map, as training requires: a
    /// smoothing σ or filter far larger than the map only blurs it flat, and an unbounded
    /// one allocates its kernel (σ 10⁹ asked for 32 GB and aborted the server that scored
    /// with it).
    pub fn check(&self, working_size: usize) -> Result<(), String> {
        self.check_within(working_size, working_size, "the working size")
    }

    /// The bound a card must meet to load: sizes up to 16 × the working size, so that a
    /// card trained before [`MapSpec::check`] existed with a large filter still loads,
    /// while one that would allocate without bound does not.
    pub fn check_loadable(&self, working_size: usize) -> Result<(), String> {
        self.check_within(working_size, 16 * working_size, "16 × the working size")
    }

    fn check_within(&self, working_size: usize, limit: usize, limit_name: &str) -> Result<(), String> {
        let side = limit as f32;
        for (name, sigma) in [
            ("smoothing σ", Some(self.smoothing_sigma)),
            ("score smoothing σ", self.score_smoothing_sigma),
        ] {
            if let Some(sigma) = sigma.filter(|s| !(s.is_finite() && (0.0..=side).contains(s))) {
                return Err(format!(
                    "{name} {sigma} is not between 0 and {limit_name} ({limit}; working size {working_size})"
                ));
            }
        }
        if let Reduction::MeanFilterMax { size } = self.reduction {
            if size > limit {
                return Err(format!(
                    "the score's mean filter ({size} px) is larger than {limit_name} ({limit})"
                ));
            }
        }
        if !(self.ssim_window >= 1 && self.ssim_window <= limit) {
            return Err(format!(
                "SSIM window {} is not between 1 and {limit_name} ({limit})",
                self.ssim_window
            ));
        }
        if !(self.ssim_sigma.is_finite() && self.ssim_sigma > 0.0 && self.ssim_sigma <= side) {
            return Err(format!(
                "SSIM σ {} is not above 0 and at most {limit_name} ({limit})",
                self.ssim_sigma
            ));
        }
        if !([self.ssim_scale, self.l2_scale]
            .iter()
            .all(|s| s.is_finite() && *s > 0.0))
        {
            return Err(format!(
                "error-map scales must be finite and above 0, not {} and {}",
                self.ssim_scale, self.l2_scale
            ));
        }
        Ok(())
    }
}

/// Unscaled per-pixel error maps: 1 − SSIM and squared error, averaged over channels.
#[derive(Debug, Clone, PartialEq)]
pub struct RawMaps {
    pub width: usize,
    pub height: usize,
    pub dssim: Vec<f32>,
    pub l2: Vec<f32>,
    /// The model's own map, for families that have one.
    pub learned: Option<Vec<f32>>,
    /// A second map of the model's, mixed with `learned` by [`RawMaps::mixed`].
    pub second: Option<Vec<f32>>,
}

impl RawMaps {
    pub fn compute(input: &Planar, recon: &Planar, spec: &MapSpec) -> Self {
        assert_eq!(
            (input.channels, input.width, input.height),
            (recon.channels, recon.width, recon.height),
            "input and reconstruction differ in shape"
        );
        let params = ssim::SsimParams {
            sigma: spec.ssim_sigma,
            radius: spec.ssim_window / 2,
            ..Default::default()
        };
        let (c, w, h) = (input.channels, input.width, input.height);
        let mut dssim = ssim::ssim_map_multichannel(&input.data, &recon.data, c, w, h, &params);
        dssim.iter_mut().for_each(|v| *v = 1.0 - *v);
        let l2 = ssim::l2_map(&input.data, &recon.data, c, w, h);
        Self {
            width: w,
            height: h,
            dssim,
            l2,
            learned: None,
            second: None,
        }
    }

    /// Zeroed maps to accumulate tiles into (see [`RawMaps::add_tile`]): the error maps
    /// when `error_maps` (else `dssim` and `l2` stay empty: skipped where only a learned
    /// map is scored), `learned` and `second` when the tiles will carry those maps.
    pub fn zeros(width: usize, height: usize, error_maps: bool, learned: bool, second: bool) -> Self {
        let plane = |on: bool| if on { vec![0.0; width * height] } else { Vec::new() };
        Self {
            width,
            height,
            dssim: plane(error_maps),
            l2: plane(error_maps),
            learned: learned.then(|| vec![0.0; width * height]),
            second: second.then(|| vec![0.0; width * height]),
        }
    }

    /// The maps with `second` folded into `learned`: α·learned + (1 − α)·second. Unchanged
    /// when there is no second map.
    pub fn mixed(&self, alpha: f32) -> std::borrow::Cow<'_, RawMaps> {
        let (Some(first), Some(second)) = (&self.learned, &self.second) else {
            return std::borrow::Cow::Borrowed(self);
        };
        let learned = first
            .iter()
            .zip(second)
            .map(|(a, b)| alpha * a + (1.0 - alpha) * b)
            .collect();
        std::borrow::Cow::Owned(RawMaps {
            learned: Some(learned),
            second: None,
            ..self.clone()
        })
    }

    /// Adds a tile's maps at (x, y) and counts the coverage in `counts`.
    pub fn add_tile(&mut self, tile: &RawMaps, x: usize, y: usize, counts: &mut [u32]) {
        for r in 0..tile.height {
            for col in 0..tile.width {
                let i = (y + r) * self.width + x + col;
                let t = r * tile.width + col;
                if !self.dssim.is_empty() {
                    self.dssim[i] += tile.dssim[t];
                    self.l2[i] += tile.l2[t];
                }
                if let (Some(acc), Some(v)) = (self.learned.as_mut(), tile.learned.as_ref()) {
                    acc[i] += v[t];
                }
                if let (Some(acc), Some(v)) = (self.second.as_mut(), tile.second.as_ref()) {
                    acc[i] += v[t];
                }
                counts[i] += 1;
            }
        }
    }

    /// Every map it holds (empty error maps and absent learned ones left out), in one order.
    pub fn planes(&self) -> Vec<&Vec<f32>> {
        let maps = [
            Some(&self.dssim),
            Some(&self.l2),
            self.learned.as_ref(),
            self.second.as_ref(),
        ];
        maps.into_iter().flatten().filter(|p| !p.is_empty()).collect()
    }

    /// [`RawMaps::planes`], to change in place.
    pub fn planes_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let maps = [
            Some(&mut self.dssim),
            Some(&mut self.l2),
            self.learned.as_mut(),
            self.second.as_mut(),
        ];
        maps.into_iter().flatten().filter(|p| !p.is_empty()).collect()
    }

    /// Divides by the tile coverage after accumulation.
    pub fn normalise(&mut self, counts: &[u32]) {
        for (i, &n) in counts.iter().enumerate() {
            let n = n.max(1) as f32;
            if !self.dssim.is_empty() {
                self.dssim[i] /= n;
                self.l2[i] /= n;
            }
            for acc in [self.learned.as_mut(), self.second.as_mut()].into_iter().flatten() {
                acc[i] /= n;
            }
        }
    }
}

/// The anomaly map at working resolution (raw maps combined by `spec.method`, smoothed)
/// and the image score: the score is read off the map smoothed by
/// `score_smoothing_sigma` where the card sets one, else off the anomaly map itself.
pub fn map_and_score(raw: &RawMaps, spec: &MapSpec) -> (Vec<f32>, f32) {
    let (w, h) = (raw.width, raw.height);
    let combined = combined_map(raw, spec);
    let map = filter::gaussian_smooth(&combined, w, h, spec.smoothing_sigma);
    let score = match spec.score_smoothing_sigma {
        // σ 0 (draem's): the combined map itself, not a copy of it.
        Some(sigma) if sigma <= 0.0 => image_score(&combined, w, h, spec.reduction),
        Some(sigma) if sigma != spec.smoothing_sigma => {
            image_score(&filter::gaussian_smooth(&combined, w, h, sigma), w, h, spec.reduction)
        }
        _ => image_score(&map, w, h, spec.reduction),
    };
    (map, score)
}

/// Raw maps combined by `spec.method`, unsmoothed (a learned map is borrowed as it is).
/// `Learned` on maps without a learned part falls back to `ssim+l2` (a card that names it
/// is only written for families that have one).
fn combined_map<'a>(raw: &'a RawMaps, spec: &MapSpec) -> std::borrow::Cow<'a, [f32]> {
    match spec.method {
        MapMethod::Ssim => raw.dssim.iter().map(|v| v / spec.ssim_scale).collect(),
        MapMethod::L2 => raw.l2.iter().map(|v| v / spec.l2_scale).collect(),
        MapMethod::SsimL2 => raw
            .dssim
            .iter()
            .zip(&raw.l2)
            .map(|(d, l)| d / spec.ssim_scale + l / spec.l2_scale)
            .collect(),
        MapMethod::Learned => match &raw.learned {
            Some(m) => std::borrow::Cow::Borrowed(m),
            None => {
                let fallback = MapSpec {
                    method: MapMethod::SsimL2,
                    ..spec.clone()
                };
                combined_map(raw, &fallback)
            }
        },
    }
}

/// The image score of a `width × height` map.
pub fn image_score(map: &[f32], width: usize, height: usize, reduction: Reduction) -> f32 {
    match reduction {
        Reduction::Max => map.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        Reduction::TopKMean { k } => {
            // NaN pixels are passed over, as `Max` passes over them (`total_cmp` would
            // rank them above every number and make the score NaN: never anomalous).
            let mut v: Vec<f32> = map.iter().copied().filter(|x| !x.is_nan()).collect();
            if v.is_empty() {
                return f32::NEG_INFINITY;
            }
            let n = v.len();
            let k = k.clamp(1, n);
            let (_, _, _) = v.select_nth_unstable_by(n - k, |a, b| a.total_cmp(b));
            v[n - k..].iter().sum::<f32>() / k as f32
        }
        Reduction::MeanFilterMax { size } => {
            let size = size.max(1) | 1; // odd, so the window is centred
            let kernel = vec![1.0 / size as f32; size];
            let filtered = filter::filter_separable(map, width, height, &kernel);
            filtered.into_iter().fold(f32::NEG_INFINITY, f32::max)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_images_have_zero_raw_error() {
        let mut p = Planar::new(3, 16, 12);
        p.data
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = (i % 7) as f32 / 7.0);
        let raw = RawMaps::compute(&p, &p, &MapSpec::default());
        assert!(raw.dssim.iter().all(|v| v.abs() < 1e-5));
        assert!(raw.l2.iter().all(|v| *v == 0.0));
    }

    #[test]
    fn map_settings_must_fit_the_working_size() {
        let ok = MapSpec::default();
        assert!(ok.check(256).is_ok());
        let with = |f: &dyn Fn(&mut MapSpec)| {
            let mut m = ok.clone();
            f(&mut m);
            m.check(256)
        };
        assert!(with(&|m| m.smoothing_sigma = 256.0).is_ok());
        assert!(with(&|m| m.smoothing_sigma = 1e9).unwrap_err().contains("smoothing σ"));
        assert!(with(&|m| m.smoothing_sigma = f32::NAN).is_err());
        assert!(with(&|m| m.score_smoothing_sigma = Some(257.0)).is_err());
        assert!(with(&|m| m.score_smoothing_sigma = Some(0.0)).is_ok());
        assert!(with(&|m| m.reduction = Reduction::MeanFilterMax { size: 256 }).is_ok());
        assert!(with(&|m| m.reduction = Reduction::MeanFilterMax { size: 4_000_000_000 }).is_err());
        assert!(with(&|m| m.ssim_window = 1_000_000).is_err());
        assert!(with(&|m| m.ssim_sigma = 0.0).is_err());
        assert!(with(&|m| m.l2_scale = 0.0).is_err());
        // Loading is looser: a card trained with a filter past the working size still
        // loads, one that would allocate without bound does not.
        let mut wide = ok.clone();
        wide.reduction = Reduction::MeanFilterMax { size: 300 };
        wide.smoothing_sigma = 300.0;
        assert!(wide.check(256).is_err() && wide.check_loadable(256).is_ok());
        wide.smoothing_sigma = 1e9;
        assert!(wide.check_loadable(256).is_err());
    }

    #[test]
    fn top_k_mean_and_max() {
        let m = [1.0, 5.0, 3.0, 4.0];
        assert_eq!(image_score(&m, 4, 1, Reduction::Max), 5.0);
        assert_eq!(image_score(&m, 4, 1, Reduction::TopKMean { k: 2 }), 4.5);
        assert_eq!(image_score(&m, 4, 1, Reduction::TopKMean { k: 99 }), 3.25);
        // NaN pixels are passed over by both reductions.
        let with_nan = [f32::NAN, 1.0, 2.0, 3.0];
        assert_eq!(image_score(&with_nan, 4, 1, Reduction::Max), 3.0);
        assert_eq!(image_score(&with_nan, 4, 1, Reduction::TopKMean { k: 2 }), 2.5);
        assert_eq!(image_score(&with_nan, 4, 1, Reduction::TopKMean { k: 4 }), 2.0);
        assert_eq!(
            image_score(&[f32::NAN; 2], 2, 1, Reduction::TopKMean { k: 1 }),
            f32::NEG_INFINITY
        );
    }

    #[test]
    fn mean_filter_max_by_hand() {
        // A 5×5 map, zero but for a 2×2 block of 9 at rows 1–2, columns 1–2 and a lone 20
        // at (4, 4). A 3×3 mean at (1, 1) or (2, 2) covers all four 9s: 36/9 = 4. The lone
        // spike in the corner: reflect boundary doubles it along each axis, so its window
        // holds 20 four times: 80/9 = 8.89, the maximum; plain max would say 20.
        let mut m = vec![0f32; 25];
        for (r, c) in [(1, 1), (1, 2), (2, 1), (2, 2)] {
            m[r * 5 + c] = 9.0;
        }
        m[24] = 20.0;
        let s = image_score(&m, 5, 5, Reduction::MeanFilterMax { size: 3 });
        assert!((s - 80.0 / 9.0).abs() < 1e-5, "{s}");
        let kernel = vec![1.0 / 3.0; 3];
        let f = filter::filter_separable(&m, 5, 5, &kernel);
        assert!((f[6] - 4.0).abs() < 1e-5 && (f[12] - 4.0).abs() < 1e-5);
        // Even sizes round up to the next odd one.
        assert_eq!(image_score(&m, 5, 5, Reduction::MeanFilterMax { size: 2 }), s);
    }

    #[test]
    fn the_score_reads_its_own_smoothing_of_the_map() {
        // A thin line: 40 pixels of 1 in row 32 of a 64² map of zeros. Smoothed with σ 4
        // across the line, its middle keeps about 1/(√(2π)·4) ≈ 0.0997 of its height; the
        // mean of the 20 highest unsmoothed pixels is exactly 1.
        let (w, h) = (64, 64);
        let mut learned = vec![0f32; w * h];
        learned[32 * w + 12..32 * w + 52].fill(1.0);
        let raw = RawMaps {
            width: w,
            height: h,
            dssim: Vec::new(),
            l2: Vec::new(),
            learned: Some(learned),
            second: None,
        };
        let spec = MapSpec {
            method: MapMethod::Learned,
            smoothing_sigma: 4.0,
            reduction: Reduction::TopKMean { k: 20 },
            score_smoothing_sigma: Some(0.0),
            ..Default::default()
        };
        let (map, score) = map_and_score(&raw, &spec);
        assert_eq!(score, 1.0);
        let peak = map.iter().copied().fold(0f32, f32::max);
        assert!((peak - 0.0997).abs() < 0.003, "smoothed peak {peak}");
        // Without a score smoothing of its own (older cards), or with the map's own σ, the
        // score reads the returned map.
        for own in [None, Some(4.0)] {
            let spec = MapSpec {
                score_smoothing_sigma: own,
                ..spec.clone()
            };
            let (same_map, s) = map_and_score(&raw, &spec);
            assert_eq!(same_map, map);
            assert_eq!(s, image_score(&map, w, h, Reduction::TopKMean { k: 20 }));
            assert!(s < 0.11, "{s}");
        }
    }

    #[test]
    fn a_second_map_mixes_in_by_alpha() {
        // learned (0.125, 1), second (0.5, 0): α 0.25 gives 0.25·0.125 + 0.75·0.5 = 0.40625
        // and 0.25·1 + 0 = 0.25; α 1 gives the first map back.
        let raw = RawMaps {
            width: 2,
            height: 1,
            dssim: vec![0.0; 2],
            l2: vec![0.0; 2],
            learned: Some(vec![0.125, 1.0]),
            second: Some(vec![0.5, 0.0]),
        };
        let quarter = raw.mixed(0.25);
        assert_eq!(quarter.learned.as_deref(), Some(&[0.40625f32, 0.25][..]));
        assert!(quarter.second.is_none());
        assert_eq!(raw.mixed(1.0).learned.as_deref(), Some(&[0.125f32, 1.0][..]));
        // Without a second map nothing changes.
        let single = RawMaps {
            second: None,
            ..raw.clone()
        };
        assert_eq!(*single.mixed(0.25), single);
    }

    #[test]
    fn tiles_average_where_they_overlap() {
        let mut acc = RawMaps::zeros(3, 1, true, false, false);
        let mut counts = vec![0u32; 3];
        let a = RawMaps {
            width: 2,
            height: 1,
            dssim: vec![1.0, 1.0],
            l2: vec![2.0, 2.0],
            learned: None,
            second: None,
        };
        let b = RawMaps {
            width: 2,
            height: 1,
            dssim: vec![3.0, 3.0],
            l2: vec![0.0, 0.0],
            learned: None,
            second: None,
        };
        acc.add_tile(&a, 0, 0, &mut counts);
        acc.add_tile(&b, 1, 0, &mut counts);
        acc.normalise(&counts);
        assert_eq!(acc.dssim, vec![1.0, 2.0, 3.0]);
        assert_eq!(acc.l2, vec![2.0, 1.0, 0.0]);
    }

    #[test]
    fn mixed_map_divides_each_part_by_its_scale() {
        let raw = RawMaps {
            width: 1,
            height: 1,
            dssim: vec![0.2],
            l2: vec![0.01],
            learned: None,
            second: None,
        };
        let spec = MapSpec {
            ssim_scale: 0.1,
            l2_scale: 0.005,
            smoothing_sigma: 0.0,
            ..Default::default()
        };
        assert!((map_and_score(&raw, &spec).0[0] - 4.0).abs() < 1e-5);
    }
}

//! The inspection pipeline around a model: fit an image to the network, reconstruct,
//! score, threshold and locate regions. Used alike by `inspect`, `eval`, `calibrate`,
//! training's calibration step and the server.

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use image::DynamicImage;
use serde::{Deserialize, Serialize};

use crate::image_io::{flip_planes, resize_plane, Planar};
use crate::model::artifact::{Fit, ModelCard};
use crate::model::{AnomalyModel, ArtifactError, Network};
use crate::scoring::{self, regions, MapMethod, RawMaps, Region};

/// Most tiles or images sent through the network at once.
pub const MAX_CHUNK: usize = 16;

/// An image made ready for the network.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub original_width: usize,
    pub original_height: usize,
    /// Whether the image carries colour (judged on a sample of its pixels).
    pub original_colour: bool,
    /// The image at working resolution, in the model's channels.
    pub working: Planar,
}

/// What the model made of one prepared image.
#[derive(Debug, Clone)]
pub struct Reconstruction {
    /// The reconstruction at working resolution (tiles averaged where they overlap).
    pub image: Planar,
    /// Raw maps at working resolution: the error maps, and the model's own map where it has
    /// one (tile maps averaged where they overlap).
    pub raw: RawMaps,
}

/// What the network made of one input, before its maps are assembled: each tile's
/// reconstruction (C × t × t, tiles in [`Detector::tile_origins`] order) and learned maps,
/// for each of the scoring's views of the input in turn (one, unless the card averages
/// flips).
#[derive(Debug, Clone)]
pub struct NetworkOutput {
    pub reconstruction: Vec<f32>,
    pub learned: Option<Vec<f32>>,
    pub second: Option<Vec<f32>>,
}

/// The verdict on one image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inspection {
    pub score: f32,
    pub threshold: f32,
    pub pixel_threshold: f32,
    pub is_anomalous: bool,
    pub regions: Vec<Region>,
    pub width: usize,
    pub height: usize,
    /// The weight of the first of two learned maps this verdict used (usad models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f32>,
    /// Why this verdict may not mean what it says: the image differs from those the model
    /// was trained on (another size, so another scale or shape once resized).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The smoothed anomaly map at working resolution (`working_size²`), row-major;
    /// [`Inspection::map`] resizes it to the image's own.
    #[serde(skip)]
    pub working_map: Vec<f32>,
    #[serde(skip)]
    pub working_size: usize,
}

impl Inspection {
    /// The smoothed anomaly map at the image's own resolution, row-major. Built on demand
    /// (heatmaps, `.npy` maps, pixel metrics): a verdict does not need it, and at a
    /// camera's 12 MP it is 48 MB and most of the time spent scoring.
    pub fn map(&self) -> Vec<f32> {
        let s = self.working_size;
        if s == 0 || self.working_map.len() != s * s {
            // Read back from JSON (the map is not serialised): there is none to resize.
            return Vec::new();
        }
        resize_plane(&self.working_map, s, s, self.width, self.height)
    }
}

/// Regions are labelled on the map resized to at most this many times the working size
/// a side, then scaled to the image. The working map holds only `working_size²` values, so
/// a finer grid adds interpolation, not detail; labelling a 16 MP image's map at its own
/// resolution took about half a second an anomalous verdict (`.ci/large-image`).
const LABEL_OVERSAMPLING: usize = 4;

/// The grid regions are labelled on for a `w × h` image scored at `s²`: each side the
/// image's own, or 4·s where that is fewer (the working map is square whatever the
/// image's shape, so each side is capped alone: a line-scan image keeps its short side).
fn label_grid(w: usize, h: usize, s: usize) -> (usize, usize) {
    let cap = LABEL_OVERSAMPLING * s;
    (w.min(cap), h.min(cap))
}

/// The regions of an anomalous verdict in a `w × h` image's pixels, from its `s²` working
/// map: components over `pixel_threshold` that reach `image_threshold` (or the map's peak,
/// if lower) and cover `min_defect_area` working pixels; if none does, the one around the
/// peak, so that the verdict points somewhere.
fn locate_regions(
    working_map: &[f32],
    s: usize,
    (w, h): (usize, usize),
    pixel_threshold: f32,
    image_threshold: f32,
    min_defect_area: u32,
) -> Vec<Region> {
    let (lw, lh) = label_grid(w, h, s);
    let map = resize_plane(working_map, s, s, lw, lh);
    // Rounded up, so that a region kept covers at least the minimum in working pixels.
    let min_area = (min_defect_area as f64 * (lw * lh) as f64 / (s * s) as f64 - 1e-9).ceil() as u32;
    let seed = image_threshold.min(map.iter().copied().fold(f32::NEG_INFINITY, f32::max));
    let mut found = regions::find_regions(&map, lw, lh, pixel_threshold, seed, min_area);
    if found.is_empty() {
        // Nothing over the pixel threshold reached the minimum area (the peak may sit below
        // that threshold when the image threshold was overridden, or the area be set high).
        found = regions::peak_region(&map, lw, lh, pixel_threshold)
            .into_iter()
            .collect();
    }
    found.iter().map(|r| r.scaled((lw, lh), (w, h))).collect()
}

/// What one request may change about how its image is judged.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Overrides {
    /// The image threshold instead of the card's (the pixel threshold follows it down
    /// when it is lower).
    pub threshold: Option<f32>,
    /// The weight of the first of two learned maps instead of the architecture's (usad).
    pub alpha: Option<f32>,
}

/// A model and its card.
#[derive(Clone)]
pub struct Detector {
    pub card: ModelCard,
    model: Arc<dyn AnomalyModel>,
}

impl Detector {
    pub fn new(card: ModelCard, model: Arc<dyn AnomalyModel>) -> Self {
        Self { card, model }
    }

    /// Loads the artifact in `dir` onto `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ArtifactError> {
        let card = ModelCard::load(dir)?;
        let net = Network::load(dir, &card, device)?;
        Ok(Self::new(card, Arc::new(net)))
    }

    pub fn device(&self) -> &Device {
        self.model.device()
    }

    /// Converts to the model's channels and resizes to the working size.
    pub fn prepare(&self, img: &DynamicImage) -> Prepared {
        let s = self.card.input.working_size;
        Prepared {
            original_width: img.width() as usize,
            original_height: img.height() as usize,
            original_colour: crate::image_io::has_colour_sampled(img),
            working: Planar::resized_from(img, self.card.input.channels, s, s),
        }
    }

    /// Top-left corners of the tiles covering the working image.
    pub fn tile_origins(&self) -> Vec<(usize, usize)> {
        let i = &self.card.input;
        match i.fit {
            Fit::Whole => vec![(0, 0)],
            Fit::Tiles { stride } => {
                let axis = tile_axis(i.working_size, i.patch_size, stride);
                axis.iter().flat_map(|&y| axis.iter().map(move |&x| (x, y))).collect()
            }
        }
    }

    fn tile_size(&self) -> usize {
        match self.card.input.fit {
            Fit::Whole => self.card.input.working_size,
            Fit::Tiles { .. } => self.card.input.patch_size,
        }
    }

    /// Runs the network over every tile of every input and assembles each input's
    /// reconstruction and maps ([`Detector::network`] then [`Detector::assemble`]).
    pub fn reconstruct(&self, inputs: &[&Planar]) -> candle_core::Result<Vec<Reconstruction>> {
        let outputs = self.network(inputs)?;
        Ok(inputs.iter().zip(outputs).map(|(i, o)| self.assemble(i, o)).collect())
    }

    /// [`Detector::reconstruct`] with the error maps always computed (calibration sets
    /// their scales whatever the card scores).
    pub fn reconstruct_with_error_maps(&self, inputs: &[&Planar]) -> candle_core::Result<Vec<Reconstruction>> {
        let outputs = self.network(inputs)?;
        Ok(inputs
            .iter()
            .zip(outputs)
            .map(|(i, o)| self.assemble_with(i, o, true))
            .collect())
    }

    /// The network's part alone: every tile of every input through the model, cut into
    /// chunks of at most 16 network inputs so memory stays bounded whatever the caller
    /// sends. The server's model thread runs only this; the maps are assembled on the
    /// request's own thread, so one image's SSIM map overlaps the next batch's inference.
    pub fn network(&self, inputs: &[&Planar]) -> candle_core::Result<Vec<NetworkOutput>> {
        let origins = self.tile_origins();
        let t = self.tile_size();
        let c = self.card.input.channels;
        let views = self.card.scoring.test_time_flips.views();
        let tiles: Vec<Planar> = inputs
            .iter()
            .flat_map(|p| views.iter().map(move |&flips| flipped(p, flips)))
            .flat_map(|p| {
                origins
                    .iter()
                    .map(move |&(x, y)| p.crop(x, y, t, t))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut outputs: Vec<f32> = Vec::with_capacity(tiles.len() * c * t * t);
        let mut learned: Vec<f32> = Vec::new();
        let mut second: Vec<f32> = Vec::new();
        for chunk in tiles.chunks(MAX_CHUNK) {
            let flat: Vec<f32> = chunk.iter().flat_map(|p| p.data.iter().copied()).collect();
            let x = Tensor::from_vec(flat, (chunk.len(), c, t, t), self.model.device())?;
            let out = self.model.infer(&x)?;
            outputs.extend(out.reconstruction.flatten_all()?.to_vec1::<f32>()?);
            if let Some(map) = out.learned_map {
                learned.extend(map.flatten_all()?.to_vec1::<f32>()?);
            }
            if let Some(map) = out.second_map {
                second.extend(map.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        // Each input's share: its tiles' outputs, in tile order.
        let (per_input, per_map) = (
            views.len() * origins.len() * c * t * t,
            views.len() * origins.len() * t * t,
        );
        let share = |v: &[f32], n: usize, len: usize| (!v.is_empty()).then(|| v[n * len..(n + 1) * len].to_vec());
        Ok((0..inputs.len())
            .map(|n| NetworkOutput {
                reconstruction: outputs[n * per_input..(n + 1) * per_input].to_vec(),
                learned: share(&learned, n, per_map),
                second: share(&second, n, per_map),
            })
            .collect())
    }

    /// One input's reconstruction and raw maps from its network output: tiles placed and
    /// averaged where they overlap. The SSIM and L2 error maps are left empty when the
    /// card scores the model's own map and the model has one: nothing reads them then,
    /// and the SSIM map is the costliest part of scoring.
    pub fn assemble(&self, input: &Planar, output: NetworkOutput) -> Reconstruction {
        let error_maps = self.card.scoring.method != MapMethod::Learned;
        self.assemble_with(input, output, error_maps)
    }

    /// Each view assembled against the input seen the same way, turned back, and the
    /// views averaged.
    fn assemble_with(&self, input: &Planar, output: NetworkOutput, error_maps: bool) -> Reconstruction {
        let views = self.card.scoring.test_time_flips.views();
        if views.len() == 1 {
            return self.assemble_view(input, &output, 0, error_maps);
        }
        let mut sum: Option<Reconstruction> = None;
        for (v, &flips) in views.iter().enumerate() {
            let mut view = self.assemble_view(&flipped(input, flips), &output, v, error_maps);
            view.flip(flips);
            match sum.as_mut() {
                None => sum = Some(view),
                Some(sum) => sum.add(&view),
            }
        }
        let mut mean = sum.expect("at least one view");
        mean.scale(1.0 / views.len() as f32);
        mean
    }

    /// View `v` of one input (the input as that view sees it) from the network's output.
    fn assemble_view(&self, input: &Planar, output: &NetworkOutput, v: usize, error_maps: bool) -> Reconstruction {
        let origins = self.tile_origins();
        let t = self.tile_size();
        let c = self.card.input.channels;
        let s = self.card.input.working_size;
        debug_assert_eq!(input.width, s);
        let error_maps = error_maps || output.learned.is_none();
        let spec = &self.card.scoring;
        let (per_tile, per_map) = (c * t * t, t * t);
        let mut raw = RawMaps::zeros(s, s, error_maps, output.learned.is_some(), output.second.is_some());
        let mut image = Planar::new(c, s, s);
        let mut counts = vec![0u32; s * s];
        for (tile, &(x, y)) in origins.iter().enumerate() {
            let k = v * origins.len() + tile;
            let recon = Planar {
                channels: c,
                width: t,
                height: t,
                data: output.reconstruction[k * per_tile..(k + 1) * per_tile].to_vec(),
            };
            let mut tile_raw = if error_maps {
                RawMaps::compute(&input.crop(x, y, t, t), &recon, spec)
            } else {
                RawMaps::zeros(t, t, false, false, false)
            };
            let tile_of = |v: &Option<Vec<f32>>| v.as_ref().map(|v| v[k * per_map..(k + 1) * per_map].to_vec());
            tile_raw.learned = tile_of(&output.learned);
            tile_raw.second = tile_of(&output.second);
            raw.add_tile(&tile_raw, x, y, &mut counts);
            add_tile_image(&mut image, &recon, x, y);
        }
        raw.normalise(&counts);
        for ch in 0..c {
            for (i, v) in image.data[ch * s * s..(ch + 1) * s * s].iter_mut().enumerate() {
                *v /= counts[i].max(1) as f32;
            }
        }
        Reconstruction { image, raw }
    }

    /// The weight of the first of two learned maps: `alpha` when given, else the
    /// architecture's; `None` for families with one map.
    pub fn alpha(&self, alpha: Option<f32>) -> Option<f32> {
        self.card.architecture.map_alpha().map(|own| alpha.unwrap_or(own))
    }

    /// The smoothed anomaly map at working resolution and the image score; `alpha`
    /// overrides the architecture's mix of two learned maps. Under the min-area threshold
    /// rule the score is the highest level at which the map has a region of the minimum
    /// area, so that it compares with that rule's threshold.
    pub fn working_map(&self, raw: &RawMaps, alpha: Option<f32>) -> (Vec<f32>, f32) {
        let (map, score) = self.reduced_map(raw, alpha);
        let t = &self.card.thresholds;
        if !t.scores_are_levels() {
            return (map, score);
        }
        let s = self.card.input.working_size;
        let level = regions::min_area_threshold(&map, s, s, t.min_defect_area);
        (map, judged(level))
    }

    /// [`Detector::working_map`] with the score the scoring's reduction reads off the map,
    /// whatever the threshold rule.
    pub fn reduced_map(&self, raw: &RawMaps, alpha: Option<f32>) -> (Vec<f32>, f32) {
        let raw = match self.alpha(alpha) {
            Some(a) => raw.mixed(a),
            None => std::borrow::Cow::Borrowed(raw),
        };
        let (map, score) = scoring::map_and_score(&raw, &self.card.scoring);
        (map, judged(score))
    }

    /// What differs between an image of `width × height` and the model's training images.
    /// Every image is resized to the working size, so another size means the surface at
    /// another scale (a camera moved, a region of interest changed) or stretched: a good
    /// part may then score as a defect, or a defect as good, and the verdict should be
    /// read with that in mind.
    /// Colour too, against the training images: a grayscale model judges a colour image's
    /// brightness only (a defect of colour alone goes unseen), and a model trained on colour
    /// was never shown a grey surface.
    pub fn input_warnings(&self, width: usize, height: usize, colour: bool) -> Vec<String> {
        let mut warnings = Vec::new();
        if let Some([w, h]) = self.card.training.image_size {
            if (w as usize, h as usize) != (width, height) {
                warnings.push(format!(
                    "the image is {width}×{height} pixels; this model was trained on {w}×{h} images: a part seen at \
                     another scale or shape can score as a defect, or a defect as good"
                ));
            }
        }
        // Against what the training images were (a mixed set, or a card that does not say,
        // warns of nothing).
        match (self.card.training.colour.as_deref(), colour) {
            (Some("grey"), true) if self.card.input.channels == 1 => warnings.push(
                "the image has colour; this model was trained on grey images and judges its brightness only: \
                 a defect of colour alone is not seen"
                    .into(),
            ),
            (Some("grey"), true) => {
                warnings.push("the image has colour; this model's training images were grey".into())
            }
            (Some("colour"), false) => warnings.push(
                "the image is grey; this model was trained on colour images: what it learned of good colour \
                 does not apply"
                    .into(),
            ),
            _ => {}
        }
        warnings
    }

    /// Scores a reconstruction: verdict and regions (in the original image's pixels).
    pub fn score(&self, prepared: &Prepared, recon: &Reconstruction, overrides: Overrides) -> Inspection {
        let t = &self.card.thresholds;
        let image_threshold = overrides.threshold.unwrap_or(t.image);
        let pixel_threshold = t.pixel.min(image_threshold);
        let (working_map, score) = self.working_map(&recon.raw, overrides.alpha);
        let s = self.card.input.working_size;
        let (w, h) = (prepared.original_width, prepared.original_height);
        // Regions reach the image threshold, and an anomalous image always has the one
        // around its map's peak: the score may be read off another smoothing than the map
        // returned (draem's), and resizing lowers sharp peaks. A normal image has none, so
        // its map is never resized to full resolution here.
        let is_anomalous = score > image_threshold;
        let regions = if is_anomalous {
            locate_regions(
                &working_map,
                s,
                (w, h),
                pixel_threshold,
                image_threshold,
                t.min_defect_area,
            )
        } else {
            Vec::new()
        };
        Inspection {
            score,
            threshold: image_threshold,
            pixel_threshold,
            is_anomalous,
            regions,
            width: w,
            height: h,
            alpha: self.alpha(overrides.alpha),
            warnings: self.input_warnings(w, h, prepared.original_colour),
            working_map,
            working_size: s,
        }
    }

    /// Prepare, reconstruct and score images in one call.
    pub fn inspect_batch(
        &self,
        images: &[&DynamicImage],
        overrides: Overrides,
    ) -> candle_core::Result<Vec<Inspection>> {
        Ok(self
            .inspect_and_reconstruct(images, overrides)?
            .into_iter()
            .map(|(inspection, _)| inspection)
            .collect())
    }

    /// [`Detector::inspect_batch`] with each image's reconstruction beside its verdict.
    pub fn inspect_and_reconstruct(
        &self,
        images: &[&DynamicImage],
        overrides: Overrides,
    ) -> candle_core::Result<Vec<(Inspection, Reconstruction)>> {
        let prepared: Vec<Prepared> = images.iter().map(|i| self.prepare(i)).collect();
        let inputs: Vec<&Planar> = prepared.iter().map(|p| &p.working).collect();
        let recons = self.reconstruct(&inputs)?;
        Ok(prepared
            .iter()
            .zip(recons)
            .map(|(p, r)| (self.score(p, &r, overrides), r))
            .collect())
    }
}

/// A score as verdicts, evaluation and calibration read it: one that is not a finite number
/// becomes +∞. The reductions pass NaN pixels over, so a map of NaN (from an input the
/// network could not take) scored −∞ and passed as normal; the model could not judge such
/// an image, which is no sign that it is good. Fails closed, and ranks it above every part.
fn judged(score: f32) -> f32 {
    if score.is_finite() {
        score
    } else {
        f32::INFINITY
    }
}

/// `p` mirrored as a view `(left to right, top to bottom)` sees it (borrowed as it is for
/// the image itself).
fn flipped(p: &Planar, (horizontal, vertical): (bool, bool)) -> Cow<'_, Planar> {
    if !(horizontal || vertical) {
        return Cow::Borrowed(p);
    }
    let mut p = p.clone();
    flip_planes(&mut p.data, p.width, p.height, horizontal, vertical);
    Cow::Owned(p)
}

impl Reconstruction {
    /// Mirrors the image and every map (a view's output turned back to the image's frame).
    fn flip(&mut self, (horizontal, vertical): (bool, bool)) {
        let (w, h) = (self.image.width, self.image.height);
        flip_planes(&mut self.image.data, w, h, horizontal, vertical);
        for plane in self.raw.planes_mut() {
            flip_planes(plane, w, h, horizontal, vertical);
        }
    }

    fn add(&mut self, other: &Reconstruction) {
        let pairs = self.raw.planes_mut().into_iter().zip(other.raw.planes());
        for (a, b) in std::iter::once((&mut self.image.data, &other.image.data)).chain(pairs) {
            a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
    }

    fn scale(&mut self, factor: f32) {
        for plane in std::iter::once(&mut self.image.data).chain(self.raw.planes_mut()) {
            plane.iter_mut().for_each(|a| *a *= factor);
        }
    }
}

/// Tile starts along one axis: every `stride`, plus one flush with the far edge.
pub fn tile_axis(size: usize, patch: usize, stride: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..=size - patch).step_by(stride.max(1)).collect();
    if *v.last().expect("patch fits") != size - patch {
        v.push(size - patch);
    }
    v
}

fn add_tile_image(dst: &mut Planar, tile: &Planar, x: usize, y: usize) {
    for c in 0..dst.channels {
        for r in 0..tile.height {
            for col in 0..tile.width {
                let d = c * dst.width * dst.height + (y + r) * dst.width + x + col;
                dst.data[d] += tile.data[c * tile.width * tile.height + r * tile.width + col];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_axis_and_end_flush() {
        assert_eq!(tile_axis(256, 128, 30), vec![0, 30, 60, 90, 120, 128]);
        assert_eq!(tile_axis(256, 128, 64), vec![0, 64, 128]);
        assert_eq!(tile_axis(128, 128, 30), vec![0]);
    }

    #[test]
    fn large_images_are_labelled_on_a_coarser_grid_with_the_same_regions() {
        assert_eq!(label_grid(800, 600, 256), (800, 600));
        assert_eq!(label_grid(1024, 1024, 256), (1024, 1024));
        assert_eq!(label_grid(4096, 4096, 256), (1024, 1024));
        assert_eq!(label_grid(4000, 1000, 256), (1024, 1000));
        assert_eq!(label_grid(8192, 256, 256), (1024, 256));
        // A 64² working map with a bright 6×4 block and a faint speck, for a 2000 × 1500
        // image (labelled on 256 × 256): the same regions as labelling at full size, boxes
        // within one coarse pixel (7.8 × 5.9 px), areas within 10%.
        let s = 64;
        let mut map = vec![0.1f32; s * s];
        for y in 20..24 {
            for x in 30..36 {
                map[y * s + x] = 0.9;
            }
        }
        map[50 * s + 10] = 0.5;
        let (w, h) = (2000, 1500);
        let got = locate_regions(&map, s, (w, h), 0.3, 0.6, 2);
        let full = resize_plane(&map, s, s, w, h);
        let min_area = (2.0 * (w * h) as f32 / (s * s) as f32).ceil() as u32;
        let want = regions::find_regions(&full, w, h, 0.3, 0.6, min_area);
        assert_eq!((got.len(), want.len()), (1, 1), "{got:?} {want:?}");
        let (g, e) = (&got[0], &want[0]);
        let near = |a: u32, b: u32| (a as i64 - b as i64).abs() <= 8;
        assert!(
            near(g.x, e.x)
                && near(g.y, e.y)
                && near(g.x + g.width, e.x + e.width)
                && near(g.y + g.height, e.y + e.height),
            "{g:?} {e:?}"
        );
        assert!((g.area_px as f32 / e.area_px as f32 - 1.0).abs() < 0.1, "{g:?} {e:?}");
        assert!((g.peak - e.peak).abs() < 0.02 && (g.mean - e.mean).abs() < 0.02);
        // Nothing over the pixel threshold: the region around the peak, in image pixels.
        let got = locate_regions(&map, s, (w, h), 0.95, 0.6, 2);
        assert_eq!(got.len(), 1);
        assert!(got[0].x > 900 && got[0].x + got[0].width < 1150, "{:?}", got[0]);
    }
}

//! Connected defect regions of an anomaly map.

use serde::{Deserialize, Serialize};

/// One connected region of pixels over the pixel threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Region {
    /// Bounding box: left column, top row, width and height in pixels of the original image.
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub area_px: u32,
    /// `area_px` divided by the image's pixel count.
    pub area_fraction: f32,
    /// Highest anomaly-map value inside the region.
    pub peak: f32,
    /// Mean anomaly-map value inside the region.
    pub mean: f32,
}

impl Region {
    /// This region, found on a `from` (width, height) grid, in the pixels of a `to` grid
    /// covering the same image: the box grows outwards to whole pixels, the area scales
    /// with the pixel counts; peak, mean and area fraction stay as they are.
    pub fn scaled(&self, from: (usize, usize), to: (usize, usize)) -> Region {
        if from == to {
            return self.clone();
        }
        // Edges [start, end) on the `from` grid, mapped to `to` and rounded outwards.
        let axis = |start: u32, len: u32, f: usize, t: usize| {
            let lo = (start as u64 * t as u64) / f as u64;
            let hi = ((start + len) as u64 * t as u64).div_ceil(f as u64).min(t as u64);
            (lo as u32, (hi - lo).max(1) as u32)
        };
        let (x, width) = axis(self.x, self.width, from.0, to.0);
        let (y, height) = axis(self.y, self.height, from.1, to.1);
        let per_pixel = (to.0 * to.1) as f64 / (from.0 * from.1) as f64;
        let area_px = ((self.area_px as f64 * per_pixel).round() as u32).clamp(1, width * height);
        Region {
            x,
            y,
            width,
            height,
            area_px,
            ..self.clone()
        }
    }
}

/// Labels 8-connected components of `mask` (row-major). Returns one label per pixel
/// (0 = background, 1.. = component) and the number of components.
///
/// 8-connectivity as the MVTec AD evaluation uses for ground-truth regions: with
/// 4-connectivity a thin diagonal scratch falls apart into single pixels.
pub fn label_components(mask: &[bool], width: usize, height: usize) -> (Vec<u32>, u32) {
    assert_eq!(mask.len(), width * height);
    let mut labels = vec![0u32; mask.len()];
    let mut next = 0u32;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || labels[start] != 0 {
            continue;
        }
        next += 1;
        labels[start] = next;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = ((i % width) as isize, (i / width) as isize);
            for dy in -1..=1isize {
                for dx in -1..=1isize {
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= width as isize || ny >= height as isize {
                        continue;
                    }
                    let j = ny as usize * width + nx as usize;
                    if mask[j] && labels[j] == 0 {
                        labels[j] = next;
                        stack.push(j);
                    }
                }
            }
        }
    }
    (labels, next)
}

/// Defect regions of `map` by hysteresis: components of pixels above `pixel_threshold`
/// whose peak reaches `seed_threshold` (≥, so a seed at the map's maximum keeps the
/// region around it). Regions smaller than `min_area` pixels are dropped. Sorted by peak,
/// highest first.
pub fn find_regions(
    map: &[f32],
    width: usize,
    height: usize,
    pixel_threshold: f32,
    seed_threshold: f32,
    min_area: u32,
) -> Vec<Region> {
    let mask: Vec<bool> = map.iter().map(|&v| v > pixel_threshold).collect();
    let (labels, count) = label_components(&mask, width, height);
    let mut stats: Vec<RegionStats> = vec![RegionStats::default(); count as usize];
    for (i, &l) in labels.iter().enumerate() {
        if l > 0 {
            stats[l as usize - 1].add(i % width, i / width, map[i]);
        }
    }
    let total = (width * height) as f32;
    let mut regions: Vec<Region> = stats
        .into_iter()
        .filter(|s| s.area >= min_area.max(1) && s.peak >= seed_threshold)
        .map(|s| Region {
            x: s.x0 as u32,
            y: s.y0 as u32,
            width: (s.x1 - s.x0 + 1) as u32,
            height: (s.y1 - s.y0 + 1) as u32,
            area_px: s.area,
            area_fraction: s.area as f32 / total,
            peak: s.peak,
            mean: (s.sum / s.area as f64) as f32,
        })
        .collect();
    regions.sort_by(|a, b| b.peak.total_cmp(&a.peak));
    regions
}

/// The region around the map's peak, for a verdict that must point somewhere when no
/// region passed [`find_regions`]: the connected pixels above the pixel threshold or, if
/// lower, above half-way from the map's median to its peak (half the peak's height over
/// the background, so a map whose background is high does not flood the image). When
/// half the map or more sits at its peak (a flat or saturated map), the pixels at the
/// peak. None for an empty or all-NaN map.
pub fn peak_region(map: &[f32], width: usize, height: usize, pixel_threshold: f32) -> Option<Region> {
    let mut finite: Vec<f32> = map.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return None;
    }
    let peak = finite.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mid = finite.len() / 2;
    let median = *finite.select_nth_unstable_by(mid, f32::total_cmp).1;
    let cut = if peak > median {
        pixel_threshold.min(median + 0.5 * (peak - median))
    } else {
        just_below(peak)
    };
    find_regions(map, width, height, cut, peak, 1).into_iter().next()
}

/// The largest f32 below finite `x` (`f32::next_down`, stable only since Rust 1.86, after
/// this crate's minimum version).
fn just_below(x: f32) -> f32 {
    if x > 0.0 {
        f32::from_bits(x.to_bits() - 1)
    } else if x == 0.0 {
        -f32::from_bits(1)
    } else {
        f32::from_bits(x.to_bits() + 1)
    }
}

/// Area of the largest 8-connected component of `map > threshold`.
pub fn largest_component_area(map: &[f32], width: usize, height: usize, threshold: f32) -> u32 {
    let mask: Vec<bool> = map.iter().map(|&v| v > threshold).collect();
    let (labels, count) = label_components(&mask, width, height);
    let mut areas = vec![0u32; count as usize];
    for &l in &labels {
        if l > 0 {
            areas[l as usize - 1] += 1;
        }
    }
    areas.into_iter().max().unwrap_or(0)
}

/// The lowest threshold (to 1e-4 relative) at which `map` has no 8-connected region of
/// `min_area` pixels or more. Bisection: region sizes only shrink as the threshold rises.
pub fn min_area_threshold(map: &[f32], width: usize, height: usize, min_area: u32) -> f32 {
    // Over finite values: an infinite end would never close the bisection, and a map with
    // none (all NaN) has no region at any level.
    let finite = || map.iter().copied().filter(|v| v.is_finite());
    let max = finite().fold(f32::NEG_INFINITY, f32::max);
    let min = finite().fold(f32::INFINITY, f32::min);
    if min > max {
        return f32::NEG_INFINITY;
    }
    let ok = |t: f32| largest_component_area(map, width, height, t) < min_area.max(1);
    if ok(min) {
        return min;
    }
    let (mut lo, mut hi) = (min, max);
    while hi - lo > 1e-4 * hi.abs().max(1e-6) {
        let mid = 0.5 * (lo + hi);
        if ok(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    hi
}

#[derive(Clone)]
struct RegionStats {
    x0: usize,
    y0: usize,
    x1: usize,
    y1: usize,
    area: u32,
    peak: f32,
    sum: f64,
}

impl Default for RegionStats {
    fn default() -> Self {
        Self {
            x0: usize::MAX,
            y0: usize::MAX,
            x1: 0,
            y1: 0,
            area: 0,
            peak: f32::NEG_INFINITY,
            sum: 0.0,
        }
    }
}

impl RegionStats {
    fn add(&mut self, x: usize, y: usize, v: f32) {
        self.x0 = self.x0.min(x);
        self.y0 = self.y0.min(y);
        self.x1 = self.x1.max(x);
        self.y1 = self.y1.max(y);
        self.area += 1;
        self.peak = self.peak.max(v);
        self.sum += v as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(rows: &[&str]) -> (Vec<f32>, usize, usize) {
        let h = rows.len();
        let w = rows[0].len();
        let v = rows
            .iter()
            .flat_map(|r| r.chars().map(|c| c.to_digit(10).unwrap() as f32))
            .collect();
        (v, w, h)
    }

    #[test]
    fn the_peak_region_reaches_half_way_from_the_background_to_the_peak() {
        // Background 2 (the median), a bump peaking at 8 under a pixel threshold of 9:
        // the cut is min(9, 2 + 0.5·(8 − 2)) = 5, so the 6 and 8 pixels, not the 4 or 3.
        let (m, w, h) = grid(&[
            "22222", //
            "24682", //
            "22322", //
            "22222",
        ]);
        let r = peak_region(&m, w, h, 9.0).unwrap();
        assert_eq!((r.x, r.y, r.width, r.height, r.area_px), (2, 1, 2, 1, 2));
        assert_eq!(r.peak, 8.0);
        // A pixel threshold below that cut is used as it is.
        let r = peak_region(&m, w, h, 3.5).unwrap();
        assert_eq!(r.area_px, 3);
        // A flat map: all of it; a map saturated over more than half: the saturated part
        // around the peak; all NaN: none.
        let flat = peak_region(&[2.0; 6], 3, 2, 3.0).unwrap();
        assert_eq!((flat.x, flat.y, flat.width, flat.height, flat.area_px), (0, 0, 3, 2, 6));
        let (m, w, h) = grid(&["9990", "9900"]);
        let r = peak_region(&m, w, h, 9.5).unwrap();
        assert_eq!((r.x, r.y, r.width, r.height, r.area_px), (0, 0, 3, 2, 5));
        assert!(peak_region(&[f32::NAN; 6], 3, 2, 1.0).is_none());
    }

    #[test]
    fn a_region_scales_to_another_grid_with_its_box_rounded_outwards() {
        let r = Region {
            x: 1,
            y: 2,
            width: 2,
            height: 1,
            area_px: 2,
            area_fraction: 0.1,
            peak: 0.9,
            mean: 0.5,
        };
        // 4×5 → 10×15 (2.5× across, 3× down): columns [1, 3) → [2.5, 7.5) → 2..8;
        // rows [2, 3) → [6, 9); 2 pixels of 2.5 × 3 each → 15.
        let s = r.scaled((4, 5), (10, 15));
        assert_eq!((s.x, s.y, s.width, s.height, s.area_px), (2, 6, 6, 3, 15));
        assert_eq!((s.area_fraction, s.peak, s.mean), (0.1, 0.9, 0.5));
        // The same grid: unchanged. A box at the far edge stays inside the image.
        assert_eq!(r.scaled((4, 5), (4, 5)), r);
        let edge = Region {
            x: 3,
            y: 4,
            width: 1,
            height: 1,
            area_px: 1,
            ..r
        };
        let s = edge.scaled((4, 5), (7, 7));
        assert_eq!((s.x, s.y, s.x + s.width, s.y + s.height), (5, 5, 7, 7));
        assert_eq!(s.area_px, 2); // 49 / 20 = 2.45 pixels
    }

    #[test]
    fn min_area_threshold_sits_just_below_the_kth_largest_blob_value() {
        // A 3-pixel blob at value 5 with a 1-pixel spike of 9 elsewhere.
        let mut m = vec![0f32; 25];
        m[6] = 5.0;
        m[7] = 5.0;
        m[8] = 5.0;
        m[20] = 9.0;
        // min_area 2: the blob (3 px) must go, so the threshold reaches 5; the spike stays.
        let t = min_area_threshold(&m, 5, 5, 2);
        assert!((t - 5.0).abs() < 1e-3, "{t}");
        // min_area 4: nothing is that large even at the bottom.
        assert_eq!(min_area_threshold(&m, 5, 5, 4), 0.0);
        // Non-finite values do not stall it: −∞ in the background, and no number at all.
        m[0] = f32::NEG_INFINITY;
        assert!((min_area_threshold(&m, 5, 5, 2) - 5.0).abs() < 1e-3);
        assert_eq!(min_area_threshold(&[f32::NAN; 4], 2, 2, 1), f32::NEG_INFINITY);
    }

    #[test]
    fn just_below_is_the_next_float_down() {
        for x in [1.0f32, 0.3, -2.5, 1e-30, -1e-30] {
            let b = just_below(x);
            assert!(b < x && f32::from_bits(b.to_bits()) == b, "{x}");
            // Nothing lies between: the midpoint rounds to one of the two.
            let mid = ((b as f64 + x as f64) / 2.0) as f32;
            assert!(mid == b || mid == x, "{x}");
        }
        assert!(just_below(0.0) < 0.0 && just_below(0.0) > -1e-44);
    }

    #[test]
    fn diagonal_pixels_form_one_component() {
        let (m, w, h) = grid(&["1000", "0100", "0010", "0001"]);
        let mask: Vec<bool> = m.iter().map(|&v| v > 0.0).collect();
        let (_, n) = label_components(&mask, w, h);
        assert_eq!(n, 1);
    }

    #[test]
    fn regions_have_hand_computed_boxes_and_stats() {
        let (m, w, h) = grid(&[
            "0000000", //
            "0220000", //
            "0290005", //
            "0000005", //
            "1000000",
        ]);
        // Pixel threshold 1.5, seeds above 4: the left blob and the right bar; the 1 is below.
        let r = find_regions(&m, w, h, 1.5, 4.0, 1);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].x, r[0].y, r[0].width, r[0].height), (1, 1, 2, 2));
        assert_eq!(r[0].area_px, 4);
        assert_eq!(r[0].peak, 9.0);
        assert!((r[0].mean - 15.0 / 4.0).abs() < 1e-6);
        assert!((r[0].area_fraction - 4.0 / 35.0).abs() < 1e-6);
        assert_eq!((r[1].x, r[1].y, r[1].width, r[1].height), (6, 2, 1, 2));
        // A seed of 5 is reached by the bar's peak; above 5 only the blob is kept, and a
        // seed at the map's maximum (9) keeps the region around it. A min area of 3 drops
        // the bar.
        assert_eq!(find_regions(&m, w, h, 1.5, 5.0, 1).len(), 2);
        assert_eq!(find_regions(&m, w, h, 1.5, 5.01, 1).len(), 1);
        assert_eq!(find_regions(&m, w, h, 1.5, 9.0, 1)[0].peak, 9.0);
        assert_eq!(find_regions(&m, w, h, 1.5, 4.0, 3).len(), 1);
        assert_eq!(largest_component_area(&m, w, h, 1.5), 4);
        assert_eq!(largest_component_area(&m, w, h, 0.5), 4);
        assert_eq!(largest_component_area(&m, w, h, 9.0), 0);
    }
}

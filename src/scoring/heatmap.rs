//! Heatmap rendering: the anomaly map in the turbo colour map, blended over the input,
//! with region outlines.

use image::{Rgb, RgbImage};

use super::regions::label_components;

/// Renders `map` (row-major, same size as `base`) over `base`.
///
/// Colour scale: 0 at the bottom of turbo, `pixel_threshold` at its middle and twice it at
/// its top, so the same colour means the same thing on every image of a model, and the
/// white outline around each connected region of pixels above `pixel_threshold` sits where
/// the colours turn warm. (The image threshold is in the score's units, which need not be
/// the map's: draem's score is read off the unsmoothed map.)
pub fn render_heatmap(base: &RgbImage, map: &[f32], pixel_threshold: f32, alpha: f32) -> RgbImage {
    let (w, h) = base.dimensions();
    let (wu, hu) = (w as usize, h as usize);
    assert_eq!(map.len(), wu * hu, "map and image sizes differ");
    let scale = if pixel_threshold > 0.0 {
        0.5 / pixel_threshold
    } else {
        1.0
    };
    let mut out = RgbImage::new(w, h);
    for (i, px) in out.pixels_mut().enumerate() {
        let t = (map[i] * scale).clamp(0.0, 1.0) as f64;
        let c = colorous::TURBO.eval_continuous(t);
        let b = base.as_raw();
        let blend = |a: u8, k: usize| -> u8 { (alpha * a as f32 + (1.0 - alpha) * b[3 * i + k] as f32).round() as u8 };
        *px = Rgb([blend(c.r, 0), blend(c.g, 1), blend(c.b, 2)]);
    }
    // Outline: pixels of a region with a 4-neighbour outside it.
    let mask: Vec<bool> = map.iter().map(|&v| v > pixel_threshold).collect();
    let (labels, _) = label_components(&mask, wu, hu);
    for y in 0..hu {
        for x in 0..wu {
            let l = labels[y * wu + x];
            if l == 0 {
                continue;
            }
            let edge = x == 0
                || y == 0
                || x + 1 == wu
                || y + 1 == hu
                || labels[y * wu + x - 1] != l
                || labels[y * wu + x + 1] != l
                || labels[(y - 1) * wu + x] != l
                || labels[(y + 1) * wu + x] != l;
            if edge {
                out.put_pixel(x as u32, y as u32, Rgb([255, 255, 255]));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_map_is_blue_high_map_is_red_and_regions_are_outlined() {
        let base = RgbImage::from_pixel(8, 8, Rgb([128, 128, 128]));
        // 0.4 with threshold 1 sits at 20% of the scale: blue in turbo.
        let mut map = vec![0.4f32; 64];
        for y in 2..6 {
            for x in 2..6 {
                map[y * 8 + x] = 10.0;
            }
        }
        let out = render_heatmap(&base, &map, 1.0, 1.0);
        let cold = out.get_pixel(0, 0);
        assert!(cold[2] > cold[0], "cold should be bluish: {cold:?}");
        let hot = out.get_pixel(3, 3);
        assert!(hot[0] > hot[2], "hot should be reddish: {hot:?}");
        assert_eq!(*out.get_pixel(2, 2), Rgb([255, 255, 255]));
        assert_ne!(*out.get_pixel(3, 3), Rgb([255, 255, 255]));
    }
}

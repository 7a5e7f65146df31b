//! Synthetic anomalies with known masks, for training a discriminative stage on good
//! images only (after DRAEM, Zavrtanik et al. 2021). vigil's own synthesis: no external
//! texture set, nothing downloaded.
//!
//! A sample is a clean crop, a binary mask and a foreign content blended into the crop
//! under the mask: `out = x·(1 − β·m) + content·β·m`, β drawn from faint to opaque.
//! Pixels outside the mask are left exactly as they were.
//!
//! - Masks: thresholded Perlin noise (random period and rotation), blobs (ellipses with a
//!   noisy edge) and strokes (thick polylines).
//! - Content: another training image or another place of one (flipped, or turned by any
//!   angle and rescaled; colour-jittered), the crop itself darkened or brightened, grey or
//!   tinted (a stain), the crop blurred (a smear), and procedural textures (Perlin noise of
//!   another scale, stripes at any angle, flat colour).

use rand::Rng;

use crate::image_io::Planar;
use crate::scoring::filter;

/// 2-D Perlin gradient noise over a `width × height` grid with lattice period `period`
/// pixels, rotated by `angle` radians; values lie in [−√½, √½] and are exactly 0 on the
/// (rotated) lattice points. Hand-written: it is a few lines and needs a seeded generator.
pub fn perlin<R: Rng>(width: usize, height: usize, period: f32, angle: f32, rng: &mut R) -> Vec<f32> {
    let (s, c) = angle.sin_cos();
    let to_lattice = |x: f32, y: f32| ((c * x - s * y) / period, (s * x + c * y) / period);
    // The rotated image covers this range of lattice coordinates.
    let corners = [
        (0.0, 0.0),
        (width as f32, 0.0),
        (0.0, height as f32),
        (width as f32, height as f32),
    ];
    let (mut u0, mut v0, mut u1, mut v1) = (f32::MAX, f32::MAX, f32::MIN, f32::MIN);
    for (x, y) in corners {
        let (u, v) = to_lattice(x, y);
        (u0, v0, u1, v1) = (u0.min(u), v0.min(v), u1.max(u), v1.max(v));
    }
    let (gu0, gv0) = (u0.floor() as i64, v0.floor() as i64);
    let gw = (u1.floor() as i64 - gu0 + 2) as usize;
    let gh = (v1.floor() as i64 - gv0 + 2) as usize;
    let gradients: Vec<(f32, f32)> = (0..gw * gh)
        .map(|_| {
            let a = rng.random_range(0.0..std::f32::consts::TAU);
            (a.cos(), a.sin())
        })
        .collect();
    let fade = |t: f32| t * t * t * (t * (t * 6.0 - 15.0) + 10.0);
    let mut out = Vec::with_capacity(width * height);
    for y in 0..height {
        for x in 0..width {
            let (u, v) = to_lattice(x as f32, y as f32);
            let (iu, iv) = ((u.floor() as i64 - gu0) as usize, (v.floor() as i64 - gv0) as usize);
            let (fu, fv) = (u - u.floor(), v - v.floor());
            let dot = |di: usize, dj: usize| {
                let (gx, gy) = gradients[(iv + dj) * gw + iu + di];
                gx * (fu - di as f32) + gy * (fv - dj as f32)
            };
            let (a, b) = (fade(fu), fade(fv));
            let top = dot(0, 0) + a * (dot(1, 0) - dot(0, 0));
            let bottom = dot(0, 1) + a * (dot(1, 1) - dot(0, 1));
            out.push(top + b * (bottom - top));
        }
    }
    out
}

/// What a synthetic anomaly did to a crop.
#[derive(Debug, Clone)]
pub struct Anomaly {
    /// The crop with the anomaly blended in.
    pub image: Planar,
    /// 1 where content was blended in, 0 elsewhere (`width × height`).
    pub mask: Vec<f32>,
}

/// Blends a synthetic anomaly into `clean`. `others` supplies foreign content (other
/// training images at any size ≥ the crop). The mask is never empty.
pub fn synthesise<R: Rng>(clean: &Planar, others: &[Planar], rng: &mut R) -> Anomaly {
    let (w, h) = (clean.width, clean.height);
    let mask = loop {
        let m = match rng.random_range(0..3) {
            0 => perlin_mask(w, h, rng),
            1 => blob_mask(w, h, rng),
            _ => stroke_mask(w, h, rng),
        };
        if m.iter().any(|&v| v > 0.0) {
            break m;
        }
    };
    let content = content(clean, others, rng);
    let beta: f32 = rng.random_range(0.2..=1.0);
    let mut image = clean.clone();
    let n = w * h;
    for ch in 0..clean.channels {
        for (i, &m) in mask.iter().enumerate() {
            if m > 0.0 {
                let k = ch * n + i;
                image.data[k] = (clean.data[k] * (1.0 - beta) + content.data[k] * beta).clamp(0.0, 1.0);
            }
        }
    }
    Anomaly { image, mask }
}

/// Perlin noise of a random period (4–64 px, scaled to the crop) and rotation, thresholded.
fn perlin_mask<R: Rng>(w: usize, h: usize, rng: &mut R) -> Vec<f32> {
    let scale = w.min(h) as f32 / 128.0;
    let period = 2f32.powf(rng.random_range(2.0..6.0)) * scale;
    let angle = rng.random_range(0.0..std::f32::consts::PI);
    let noise = perlin(w, h, period.max(2.0), angle, rng);
    let t = rng.random_range(0.2..0.45);
    noise.iter().map(|&v| if v > t { 1.0 } else { 0.0 }).collect()
}

/// An ellipse (radii 3–32 px, scaled) whose edge is roughened by Perlin noise.
fn blob_mask<R: Rng>(w: usize, h: usize, rng: &mut R) -> Vec<f32> {
    let scale = w.min(h) as f32 / 128.0;
    let (cx, cy) = (rng.random_range(0.0..w as f32), rng.random_range(0.0..h as f32));
    let rx = rng.random_range(3.0..32.0) * scale;
    let ry = rx * rng.random_range(0.4..1.0);
    let (s, c) = rng.random_range(0.0..std::f32::consts::PI).sin_cos();
    let rough = perlin(w, h, rx.max(4.0), 0.0, rng);
    (0..w * h)
        .map(|i| {
            let (dx, dy) = ((i % w) as f32 - cx, (i / w) as f32 - cy);
            let (u, v) = ((c * dx - s * dy) / rx, (s * dx + c * dy) / ry);
            if (u * u + v * v).sqrt() < 1.0 + 0.6 * rough[i] {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

/// A polyline of 1–4 segments, 1–5 px thick (scaled), like a scratch or a crack.
fn stroke_mask<R: Rng>(w: usize, h: usize, rng: &mut R) -> Vec<f32> {
    let scale = w.min(h) as f32 / 128.0;
    let radius = rng.random_range(0.5..2.5) * scale;
    let mut mask = vec![0f32; w * h];
    let (mut x, mut y) = (rng.random_range(0.0..w as f32), rng.random_range(0.0..h as f32));
    let mut heading = rng.random_range(0.0..std::f32::consts::TAU);
    for _ in 0..rng.random_range(1..=4) {
        heading += rng.random_range(-0.8..0.8);
        let len = rng.random_range(8.0..48.0) * scale;
        let (nx, ny) = (x + heading.cos() * len, y + heading.sin() * len);
        let steps = (len * 2.0).ceil() as usize;
        for k in 0..=steps {
            let t = k as f32 / steps as f32;
            let (px, py) = (x + (nx - x) * t, y + (ny - y) * t);
            let r = radius.ceil() as isize;
            for dy in -r..=r {
                for dx in -r..=r {
                    let (qx, qy) = (px as isize + dx, py as isize + dy);
                    let inside = (dx * dx + dy * dy) as f32 <= radius * radius + 0.5;
                    if inside && qx >= 0 && qy >= 0 && (qx as usize) < w && (qy as usize) < h {
                        mask[qy as usize * w + qx as usize] = 1.0;
                    }
                }
            }
        }
        (x, y) = (nx, ny);
    }
    mask
}

/// Foreign content the size of `clean`.
fn content<R: Rng>(clean: &Planar, others: &[Planar], rng: &mut R) -> Planar {
    let (c, w, h) = (clean.channels, clean.width, clean.height);
    let n = w * h;
    let mut out = match rng.random_range(0..6) {
        // Another image, or another place of one, flipped or turned and rescaled, and
        // colour-jittered; half the time barely jittered, so only the seam and the
        // misplaced or misoriented structure give it away (CutPaste, Li et al. 2021).
        0 | 1 => {
            let src = &others[rng.random_range(0..others.len())];
            let mut p = if rng.random_bool(0.5) {
                let (x, y) = (
                    rng.random_range(0..=src.width - w),
                    rng.random_range(0..=src.height - h),
                );
                let mut p = src.crop(x, y, w, h);
                if rng.random_bool(0.5) {
                    for row in p.data.chunks_exact_mut(w) {
                        row.reverse();
                    }
                }
                p
            } else {
                let angle = rng.random_range(0.0..std::f32::consts::TAU);
                let scale = 2f32.powf(rng.random_range(-1.0..1.0));
                let centre = (
                    rng.random_range(0.0..src.width as f32),
                    rng.random_range(0.0..src.height as f32),
                );
                turned(src, w, h, centre, angle, scale)
            };
            let strength = if rng.random_bool(0.5) { 0.05 } else { 0.4 };
            for ch in 0..c {
                let gain = 1.0 + rng.random_range(-strength..strength);
                let offset = rng.random_range(-strength..strength) / 2.0;
                p.data[ch * n..(ch + 1) * n]
                    .iter_mut()
                    .for_each(|v| *v = *v * gain + offset);
            }
            p
        }
        // A stain: the crop darker or brighter (`stain`).
        2 => stain(clean, rng),
        // A smear: the crop blurred.
        3 => {
            let radius = rng.random_range(2..6);
            let kernel = vec![1.0 / (2 * radius + 1) as f32; 2 * radius + 1];
            let mut p = clean.clone();
            for ch in 0..c {
                let blurred = filter::filter_separable(clean.plane(ch), w, h, &kernel);
                p.data[ch * n..(ch + 1) * n].copy_from_slice(&blurred);
            }
            p
        }
        // Procedural texture: Perlin noise or stripes around a random colour, both turned
        // by the same random angle (stripes of one orientation only would teach the
        // segmenter that stripes across it are normal).
        4 => {
            let period = rng.random_range(2.0..24.0);
            let angle = rng.random_range(0.0..std::f32::consts::PI);
            let noise = perlin(w, h, period, angle, rng);
            let pattern = if rng.random_bool(0.3) {
                stripes(w, h, period, angle)
            } else {
                noise
            };
            let mut p = Planar::new(c, w, h);
            for ch in 0..c {
                let (base, amp) = (rng.random_range(0.0..1.0), rng.random_range(0.1..0.6));
                for (out, &t) in p.data[ch * n..(ch + 1) * n].iter_mut().zip(&pattern) {
                    *out = base + amp * t;
                }
            }
            p
        }
        // Flat colour.
        _ => {
            let mut p = Planar::new(c, w, h);
            for ch in 0..c {
                let v = rng.random_range(0.0..1.0);
                p.data[ch * n..(ch + 1) * n].iter_mut().for_each(|x| *x = v);
            }
            p
        }
    };
    out.data.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    out
}

/// The crop itself darker or brighter: half the time grey (every channel shifted alike),
/// half the time with a hue of its own (each channel shifted independently). Grime, oil
/// and shadows are grey; a synthesis in which every stain on a colour image has a colour
/// cast never asks the segmenter to find a darkening by its brightness alone.
fn stain<R: Rng>(clean: &Planar, rng: &mut R) -> Planar {
    let (c, n) = (clean.channels, clean.width * clean.height);
    let mut p = clean.clone();
    let sign = if rng.random_bool(0.5) { -1.0 } else { 1.0 };
    let shift = sign * rng.random_range(0.1..0.5);
    let hued = rng.random_bool(0.5);
    let mut grey = None;
    for ch in 0..c {
        let s = if hued {
            rng.random_range(-0.4..0.4)
        } else {
            // Drawn for every channel and the first kept, so that the random stream is
            // that of the stains before (when each channel took its own): a seed trains
            // on the same crops, masks and blends as it did then.
            let factor = rng.random_range(0.7..1.3);
            *grey.get_or_insert(shift * factor)
        };
        p.data[ch * n..(ch + 1) * n].iter_mut().for_each(|v| *v += s);
    }
    p
}

/// Stripes at `angle` (radians; 0 gives vertical stripes, π/2 horizontal ones), a full
/// cycle every `2 · period` px across them, as values in [−1, 1].
fn stripes(w: usize, h: usize, period: f32, angle: f32) -> Vec<f32> {
    let (sin, cos) = angle.sin_cos();
    (0..w * h)
        .map(|i| {
            let across = (i % w) as f32 * cos + (i / w) as f32 * sin;
            (across / period * std::f32::consts::PI).sin()
        })
        .collect()
}

/// A `w × h` view of `src` around `centre`, turned by `angle` and magnified by `scale`,
/// sampled bilinearly; the source edge is extended outward. Hand-written: the `image`
/// crate turns only by quarter turns.
fn turned(src: &Planar, w: usize, h: usize, centre: (f32, f32), angle: f32, scale: f32) -> Planar {
    let (sin, cos) = angle.sin_cos();
    let (sw, sh) = (src.width, src.height);
    let n = sw * sh;
    let mut out = Planar::new(src.channels, w, h);
    for j in 0..h {
        for i in 0..w {
            let (dx, dy) = ((i as f32 - w as f32 / 2.0) / scale, (j as f32 - h as f32 / 2.0) / scale);
            let x = (centre.0 + cos * dx - sin * dy).clamp(0.0, (sw - 1) as f32);
            let y = (centre.1 + sin * dx + cos * dy).clamp(0.0, (sh - 1) as f32);
            let (x0, y0) = (x.floor() as usize, y.floor() as usize);
            let (x1, y1) = ((x0 + 1).min(sw - 1), (y0 + 1).min(sh - 1));
            let (fx, fy) = (x - x0 as f32, y - y0 as f32);
            for ch in 0..src.channels {
                let p = &src.data[ch * n..(ch + 1) * n];
                let top = p[y0 * sw + x0] * (1.0 - fx) + p[y0 * sw + x1] * fx;
                let bottom = p[y1 * sw + x0] * (1.0 - fx) + p[y1 * sw + x1] * fx;
                out.data[ch * w * h + j * w + i] = top * (1.0 - fy) + bottom * fy;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(seed)
    }

    #[test]
    fn perlin_is_zero_on_the_lattice_and_bounded() {
        let mut r = rng(1);
        // Unrotated, period 8: every 8th pixel in both axes is a lattice point.
        let n = perlin(64, 48, 8.0, 0.0, &mut r);
        for y in (0..48).step_by(8) {
            for x in (0..64).step_by(8) {
                assert!(n[y * 64 + x].abs() < 1e-6, "({x}, {y}) = {}", n[y * 64 + x]);
            }
        }
        for seed in 0..5 {
            let n = perlin(96, 96, 5.5, 0.7, &mut rng(seed));
            let max = n.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(max <= std::f32::consts::FRAC_1_SQRT_2 + 1e-5, "{max}");
            assert!(max > 0.2, "noise has some amplitude: {max}");
        }
    }

    #[test]
    fn perlin_period_sets_the_scale_of_variation() {
        // Neighbouring pixels differ about 1/period as much: period 32 varies ≥ 2.5× more
        // slowly than period 4.
        let step = |period: f32| {
            let mut total = 0.0;
            for seed in 0..4 {
                let n = perlin(128, 128, period, 0.3, &mut rng(seed));
                total += n.windows(2).map(|w| (w[1] - w[0]).abs()).sum::<f32>() / n.len() as f32;
            }
            total
        };
        let (fine, coarse) = (step(4.0), step(32.0));
        assert!(fine > 2.5 * coarse, "fine {fine}, coarse {coarse}");
    }

    fn texture(seed: u64, c: usize, size: usize) -> Planar {
        let mut p = Planar::new(c, size, size);
        let n = perlin(size, size, 6.0, 0.0, &mut rng(seed));
        for ch in 0..c {
            for (i, v) in n.iter().enumerate() {
                p.data[ch * size * size + i] = 0.5 + 0.5 * v;
            }
        }
        p
    }

    #[test]
    fn only_masked_pixels_change_and_the_mask_is_never_empty() {
        let others = vec![texture(10, 3, 80), texture(11, 3, 96)];
        let mut r = rng(5);
        let mut changed_somewhere = 0;
        for k in 0..60 {
            let clean = texture(k, 3, 64);
            let a = synthesise(&clean, &others, &mut r);
            assert_eq!(a.mask.len(), 64 * 64);
            assert!(a.mask.iter().all(|&m| m == 0.0 || m == 1.0));
            assert!(a.mask.contains(&1.0), "sample {k}: empty mask");
            for ch in 0..3 {
                for (i, &m) in a.mask.iter().enumerate() {
                    let j = ch * 64 * 64 + i;
                    if m == 0.0 {
                        assert_eq!(
                            a.image.data[j], clean.data[j],
                            "sample {k}: pixel {i} outside the mask changed"
                        );
                    }
                }
            }
            if a.image.data != clean.data {
                changed_somewhere += 1;
            }
            assert!(a.image.data.iter().all(|v| (0.0..=1.0).contains(v)));
        }
        assert!(
            changed_somewhere >= 55,
            "anomalies visible in {changed_somewhere} of 60"
        );
    }

    #[test]
    fn half_the_stains_on_colour_are_grey_and_the_rest_carry_a_hue() {
        let clean = texture(3, 3, 16);
        let n = 16 * 16;
        let (mut grey, mut hued) = (0, 0);
        for seed in 0..200 {
            let stained = stain(&clean, &mut rng(seed));
            // A stain shifts each channel by one amount over the whole crop.
            let shifts: Vec<f32> = (0..3)
                .map(|ch| {
                    let d: Vec<f32> = (0..n)
                        .map(|i| stained.data[ch * n + i] - clean.data[ch * n + i])
                        .collect();
                    assert!(d.iter().all(|v| (v - d[0]).abs() < 1e-5), "one shift per channel");
                    d[0]
                })
                .collect();
            let spread =
                shifts.iter().cloned().fold(f32::MIN, f32::max) - shifts.iter().cloned().fold(f32::MAX, f32::min);
            if spread < 1e-6 {
                // Grey: every channel alike, and visibly (the shift is at least 0.1 × 0.7).
                assert!(shifts[0].abs() >= 0.07 - 1e-6, "{shifts:?}");
                grey += 1;
            } else {
                hued += 1;
            }
        }
        assert!((70..=130).contains(&grey), "{grey} grey stains of 200");
        assert!(hued >= 70, "{hued} hued stains of 200");
    }

    #[test]
    fn stripes_run_at_their_angle_with_their_period() {
        use std::f32::consts::{FRAC_PI_2, FRAC_PI_4};
        let (w, h) = (32, 24);
        let at = |v: &[f32], x: usize, y: usize| v[y * w + x];
        // Angle 0: vertical stripes, each column one value; π/2: horizontal, each row.
        let vertical = stripes(w, h, 4.0, 0.0);
        let horizontal = stripes(w, h, 4.0, FRAC_PI_2);
        for y in 0..h {
            for x in 0..w {
                assert!((at(&vertical, x, y) - at(&vertical, x, 0)).abs() < 1e-5);
                assert!((at(&horizontal, x, y) - at(&horizontal, 0, y)).abs() < 1e-4);
            }
        }
        // Both vary across: sin(π·x/4) is 1 at x = 2 and −1 at x = 6.
        assert!((at(&vertical, 2, 0) - 1.0).abs() < 1e-5 && (at(&vertical, 6, 0) + 1.0).abs() < 1e-5);
        assert!((at(&horizontal, 0, 2) - 1.0).abs() < 1e-4 && (at(&horizontal, 0, 6) + 1.0).abs() < 1e-4);
        // π/4: constant along the other diagonal.
        let diagonal = stripes(w, h, 4.0, FRAC_PI_4);
        for y in 1..h {
            for x in 0..w - 1 {
                assert!((at(&diagonal, x + 1, y - 1) - at(&diagonal, x, y)).abs() < 1e-4);
            }
        }
        // A full cycle every 2·period px across: 6 px for a period of 3, opposite values 3 px apart.
        let cycle = stripes(w, h, 3.0, 0.0);
        for x in 0..w - 6 {
            assert!((at(&cycle, x + 6, 0) - at(&cycle, x, 0)).abs() < 1e-4);
        }
        assert!(
            (at(&cycle, 4, 0) + at(&cycle, 1, 0)).abs() < 1e-4,
            "half a cycle apart: opposite"
        );
        assert!(cycle.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn an_unturned_view_is_a_crop_and_a_quarter_turn_turns_stripes() {
        let src = texture(3, 2, 64);
        let view = turned(&src, 16, 16, (18.0, 20.0), 0.0, 1.0);
        let crop = src.crop(10, 12, 16, 16);
        let worst = view
            .data
            .iter()
            .zip(&crop.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(worst < 1e-6, "unturned view differs from the crop by {worst}");

        // Vertical stripes (a ramp along x) turned a quarter become horizontal ones.
        let mut ramp = Planar::new(1, 64, 64);
        ramp.data
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = (i % 64) as f32 / 63.0);
        let t = turned(&ramp, 16, 16, (32.0, 32.0), std::f32::consts::FRAC_PI_2, 1.0);
        for row in t.data.chunks_exact(16) {
            assert!(
                row.iter().all(|v| (v - row[0]).abs() < 1e-4),
                "row not constant: {row:?}"
            );
        }
        let (first, last) = (t.data[0], t.data[15 * 16]);
        assert!(
            (first - last).abs() > 0.2,
            "no variation down the columns: {first} vs {last}"
        );

        // Magnified twice, the view spans half as much of the ramp.
        let zoomed = turned(&ramp, 16, 16, (32.0, 32.0), 0.0, 2.0);
        let span = |p: &Planar| p.data[15] - p.data[0];
        assert!((span(&zoomed) - span(&ramp.crop(24, 24, 16, 16)) / 2.0).abs() < 1e-4);
    }
}

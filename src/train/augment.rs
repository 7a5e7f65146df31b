//! Training samples: random crops with flips, 90° rotations, brightness jitter, and
//! corruption with a known mask: inpainting (rectangles replaced) or synthetic anomalies
//! (`super::anomalies`). The clean crop is the target.

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::image_io::Planar;

/// Which augmentations are allowed. Flips and rotations suit textures and rotation-free
/// objects; switch them off for parts with a fixed orientation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Augment {
    pub flips: bool,
    pub rotations: bool,
    /// Maximum absolute brightness offset, in [0, 1] units.
    pub brightness: f32,
    /// Fraction of samples with 1–3 corrupted rectangles (denoising/inpainting).
    pub inpaint_fraction: f32,
    /// Fraction of samples with a synthetic anomaly blended in (the rest stay clean, or
    /// are inpainted per `inpaint_fraction`).
    #[serde(default)]
    pub anomaly_fraction: f32,
}

impl Augment {
    pub fn names(&self) -> Vec<String> {
        let mut v = vec!["random-crop".to_string()];
        if self.flips {
            v.push("flips".into());
        }
        if self.rotations {
            v.push("rot90".into());
        }
        if self.brightness > 0.0 {
            v.push(format!("brightness±{}", self.brightness));
        }
        if self.inpaint_fraction > 0.0 {
            v.push(format!("inpaint {}", self.inpaint_fraction));
        }
        if self.anomaly_fraction > 0.0 {
            v.push(format!("anomalies {}", self.anomaly_fraction));
        }
        v
    }
}

/// One training sample.
pub struct Sample {
    /// What the network sees (possibly corrupted).
    pub input: Planar,
    /// The clean crop.
    pub target: Planar,
    /// 1 where `input` was corrupted, 0 elsewhere (`patch × patch`).
    pub mask: Vec<f32>,
}

/// Draws one sample of `patch × patch` from `images`.
pub fn sample<R: Rng>(images: &[Planar], patch: usize, aug: &Augment, rng: &mut R) -> Sample {
    let src = &images[rng.random_range(0..images.len())];
    let x = rng.random_range(0..=src.width - patch);
    let y = rng.random_range(0..=src.height - patch);
    let mut clean = src.crop(x, y, patch, patch);
    if aug.flips && rng.random_bool(0.5) {
        clean.flip_horizontal();
    }
    if aug.flips && rng.random_bool(0.5) {
        clean.flip_vertical();
    }
    if aug.rotations {
        for _ in 0..rng.random_range(0..4) {
            clean = rotate90(&clean);
        }
    }
    if aug.brightness > 0.0 {
        let d = rng.random_range(-aug.brightness..=aug.brightness);
        clean.data.iter_mut().for_each(|v| *v = (*v + d).clamp(0.0, 1.0));
    }
    let draw: f32 = rng.random();
    if draw < aug.anomaly_fraction {
        let a = super::anomalies::synthesise(&clean, images, rng);
        return Sample {
            input: a.image,
            target: clean,
            mask: a.mask,
        };
    }
    let mut input = clean.clone();
    let mut mask = vec![0f32; patch * patch];
    if draw - aug.anomaly_fraction < aug.inpaint_fraction * (1.0 - aug.anomaly_fraction) {
        corrupt(&mut input, &mut mask, images, rng);
    }
    Sample {
        input,
        target: clean,
        mask,
    }
}

/// Replaces 1–3 rectangles (6–40 px a side, scaled to the patch) with noise, flat grey
/// or a patch of another image.
fn corrupt<R: Rng>(p: &mut Planar, mask: &mut [f32], images: &[Planar], rng: &mut R) {
    let scale = p.width as f32 / 128.0;
    let lo = ((6.0 * scale) as usize).max(2);
    let hi = ((40.0 * scale) as usize).clamp(lo + 1, p.width.min(p.height));
    for _ in 0..rng.random_range(1..=3) {
        let w = rng.random_range(lo..hi);
        let h = rng.random_range(lo..hi);
        let x0 = rng.random_range(0..=p.width - w);
        let y0 = rng.random_range(0..=p.height - h);
        let kind = rng.random_range(0..3);
        let other = &images[rng.random_range(0..images.len())];
        let (ox, oy) = (
            rng.random_range(0..=other.width - w),
            rng.random_range(0..=other.height - h),
        );
        let grey: f32 = rng.random();
        for r in 0..h {
            mask[(y0 + r) * p.width + x0..(y0 + r) * p.width + x0 + w].fill(1.0);
        }
        for c in 0..p.channels {
            for r in 0..h {
                for col in 0..w {
                    let i = c * p.width * p.height + (y0 + r) * p.width + x0 + col;
                    p.data[i] = match kind {
                        0 => rng.random(),
                        1 => grey,
                        _ => other.data[c * other.width * other.height + (oy + r) * other.width + ox + col],
                    };
                }
            }
        }
    }
}

/// Rotates a square planar image by 90° clockwise.
fn rotate90(p: &Planar) -> Planar {
    let (w, h) = (p.width, p.height);
    let mut out = Planar::new(p.channels, h, w);
    for c in 0..p.channels {
        for y in 0..h {
            for x in 0..w {
                // (x, y) → (h - 1 - y, x)
                out.data[c * w * h + x * h + (h - 1 - y)] = p.data[c * w * h + y * w + x];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ramp(w: usize, h: usize) -> Planar {
        let mut p = Planar::new(1, w, h);
        p.data.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
        p
    }

    #[test]
    fn flips_and_rotation_move_pixels_where_expected() {
        let mut p = ramp(3, 2); // [0 1 2; 3 4 5]
        p.flip_horizontal();
        assert_eq!(p.data, vec![2., 1., 0., 5., 4., 3.]);
        let mut p = ramp(3, 2);
        p.flip_vertical();
        assert_eq!(p.data, vec![3., 4., 5., 0., 1., 2.]);
        // Two channels of 2 × 3, both flips: each plane turned half round, on its own.
        let mut p = Planar::new(2, 2, 3);
        p.data.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32);
        p.flip_horizontal();
        p.flip_vertical();
        assert_eq!(p.data, vec![5., 4., 3., 2., 1., 0., 11., 10., 9., 8., 7., 6.]);
        let r = rotate90(&ramp(2, 2)); // [0 1; 2 3] → [2 0; 3 1]
        assert_eq!(r.data, vec![2., 0., 3., 1.]);
        let four = rotate90(&rotate90(&rotate90(&rotate90(&ramp(4, 4)))));
        assert_eq!(four, ramp(4, 4));
    }

    #[test]
    fn samples_are_patches_and_targets_stay_clean() {
        let images = vec![ramp(20, 20)];
        let aug = Augment {
            flips: false,
            rotations: false,
            brightness: 0.0,
            inpaint_fraction: 1.0,
            anomaly_fraction: 0.0,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let Sample { input, target, mask } = sample(&images, 8, &aug, &mut rng);
        assert_eq!((target.width, target.height), (8, 8));
        // The target is a crop of the ramp: consecutive values along rows.
        assert!(target.data.windows(2).take(7).all(|w| w[1] - w[0] == 1.0));
        assert_ne!(input, target, "inpainting changed the input");
        // The mask marks every changed pixel (and inpainting may rewrite a pixel with its
        // own value, so marked pixels need not all change).
        for (i, (a, b)) in input.data.iter().zip(&target.data).enumerate() {
            if a != b {
                assert_eq!(mask[i], 1.0, "pixel {i} changed outside the mask");
            }
        }
        assert!(mask.contains(&1.0));
    }
}

//! A synthetic surface-inspection data set in the MVTec AD layout, generated from a seed:
//! a woven texture with grain and uneven lighting, and four defect kinds with masks.
//! vigil's bundled model, sample images and tests are made from it, so everything the
//! project ships can be reproduced without downloading anything.

use std::path::Path;

use image::{GrayImage, Luma};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Defect kinds the generator draws.
pub const DEFECTS: &[&str] = &["scratch", "stain", "hole", "contamination"];

#[derive(Debug, Clone)]
pub struct SynthConfig {
    pub size: usize,
    pub train_good: usize,
    pub test_good: usize,
    /// Test images per defect kind.
    pub test_defective: usize,
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            size: 256,
            train_good: 80,
            test_good: 20,
            test_defective: 10,
            seed: 7,
        }
    }
}

/// Writes the data set under `root` (train/good, test/good, test/<defect>,
/// ground_truth/<defect>/<name>_mask.png).
pub fn generate(root: &Path, cfg: &SynthConfig) -> std::io::Result<()> {
    // Writing over another set would leave a mix of the two (the other's extra images,
    // of another size, among these).
    for part in ["train", "test", "ground_truth"] {
        if root.join(part).exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} already holds a data set ({part}/): choose a new folder",
                    root.display()
                ),
            ));
        }
    }
    if cfg.train_good + cfg.test_good + cfg.test_defective == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no images asked for: set --train-good, --test-good or --test-defective above 0",
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let save = |img: &GrayImage, path: &Path| -> std::io::Result<()> {
        std::fs::create_dir_all(path.parent().expect("has parent"))?;
        img.save(path).map_err(std::io::Error::other)
    };
    for i in 0..cfg.train_good {
        save(
            &texture(cfg.size, &mut rng),
            &root.join(format!("train/good/{i:03}.png")),
        )?;
    }
    for i in 0..cfg.test_good {
        save(
            &texture(cfg.size, &mut rng),
            &root.join(format!("test/good/{i:03}.png")),
        )?;
    }
    for defect in DEFECTS {
        for i in 0..cfg.test_defective {
            let mut img = texture(cfg.size, &mut rng);
            let mask = add_defect(&mut img, defect, &mut rng);
            save(&img, &root.join(format!("test/{defect}/{i:03}.png")))?;
            save(&mask, &root.join(format!("ground_truth/{defect}/{i:03}_mask.png")))?;
        }
    }
    Ok(())
}

/// Smooth value noise: a random lattice of `cells × cells`, bilinearly interpolated.
fn value_noise(size: usize, cells: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let g = cells + 2;
    let lattice: Vec<f32> = (0..g * g).map(|_| rng.random::<f32>()).collect();
    let mut out = vec![0f32; size * size];
    let step = size as f32 / cells as f32;
    for y in 0..size {
        for x in 0..size {
            let (fx, fy) = (x as f32 / step, y as f32 / step);
            let (ix, iy) = (fx as usize, fy as usize);
            let (tx, ty) = (fx - ix as f32, fy - iy as f32);
            let l = |a: usize, b: usize| lattice[b * g + a];
            let top = l(ix, iy) * (1.0 - tx) + l(ix + 1, iy) * tx;
            let bottom = l(ix, iy + 1) * (1.0 - tx) + l(ix + 1, iy + 1) * tx;
            out[y * size + x] = top * (1.0 - ty) + bottom * ty;
        }
    }
    out
}

/// A woven texture: two crossing thread families with jittered phase, fibre grain,
/// and slow illumination changes.
fn texture(size: usize, rng: &mut ChaCha8Rng) -> GrayImage {
    let period = 9.0 + rng.random::<f32>() * 0.6;
    let (px, py) = (rng.random::<f32>() * period, rng.random::<f32>() * period);
    let light = value_noise(size, 3, rng);
    let wobble = value_noise(size, 8, rng);
    let grain = value_noise(size, size / 3, rng);
    let tau = std::f32::consts::TAU;
    let mut img = GrayImage::new(size as u32, size as u32);
    for y in 0..size {
        for x in 0..size {
            let i = y * size + x;
            let w = (wobble[i] - 0.5) * 2.0;
            let u = ((x as f32 + px + w) / period * tau).sin();
            let v = ((y as f32 + py - w) / period * tau).sin();
            // Over-under weave: horizontal threads where the checker of the two phases says so.
            let weave = if (u > 0.0) ^ (v > 0.0) { u.abs() } else { v.abs() };
            let val = 0.30
                + 0.28 * weave
                + 0.12 * (grain[i] - 0.5)
                + 0.16 * (light[i] - 0.5)
                + 0.03 * (rng.random::<f32>() - 0.5);
            img.put_pixel(x as u32, y as u32, Luma([(val.clamp(0.0, 1.0) * 255.0) as u8]));
        }
    }
    img
}

/// Draws one defect into `img`; returns its mask (255 inside).
fn add_defect(img: &mut GrayImage, kind: &str, rng: &mut ChaCha8Rng) -> GrayImage {
    let size = img.width() as f32;
    let mut mask = GrayImage::new(img.width(), img.height());
    let (cx, cy) = (rng.random_range(0.2..0.8) * size, rng.random_range(0.2..0.8) * size);
    let mut paint = |img: &mut GrayImage, x: i64, y: i64, f: &dyn Fn(f32) -> f32| {
        if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
            let p = img.get_pixel_mut(x as u32, y as u32);
            p[0] = (f(p[0] as f32 / 255.0).clamp(0.0, 1.0) * 255.0) as u8;
            mask.put_pixel(x as u32, y as u32, Luma([255]));
        }
    };
    match kind {
        "scratch" => {
            let angle = rng.random::<f32>() * std::f32::consts::PI;
            let len = rng.random_range(0.15..0.35) * size;
            let bright = rng.random_bool(0.5);
            let (dx, dy) = (angle.cos(), angle.sin());
            let steps = (len * 2.0) as i64;
            for s in -steps / 2..steps / 2 {
                let t = s as f32 * 0.5;
                let (x, y) = (cx + dx * t, cy + dy * t);
                for o in -1..=1i64 {
                    let (xx, yy) = ((x - dy * o as f32).round() as i64, (y + dx * o as f32).round() as i64);
                    paint(img, xx, yy, &|v| if bright { v * 0.3 + 0.7 } else { v * 0.25 });
                }
            }
        }
        "stain" | "hole" => {
            let r = if kind == "stain" {
                rng.random_range(0.05..0.1) * size
            } else {
                rng.random_range(0.02..0.04) * size
            };
            let shift = if kind == "stain" {
                rng.random_range(-0.25..-0.12f32)
            } else {
                0.0
            };
            let ri = r.ceil() as i64 + 1;
            for y in -ri..=ri {
                for x in -ri..=ri {
                    let d = ((x * x + y * y) as f32).sqrt();
                    if d <= r {
                        let px = (cx as i64 + x, cy as i64 + y);
                        if kind == "stain" {
                            // A smooth stain darkens without hiding the weave.
                            let k = 1.0 - (d / r).powi(2);
                            paint(img, px.0, px.1, &|v| v + shift * (0.5 + 0.5 * k));
                        } else {
                            paint(img, px.0, px.1, &|_| 0.04);
                        }
                    }
                }
            }
        }
        _ => {
            // Contamination: a patch of fine, high-contrast speckle.
            let (w, h) = (rng.random_range(0.06..0.12) * size, rng.random_range(0.06..0.12) * size);
            let speckle: Vec<f32> = (0..(w as usize + 1) * (h as usize + 1)).map(|_| rng.random()).collect();
            for y in 0..h as i64 {
                for x in 0..w as i64 {
                    let s = speckle[y as usize * (w as usize + 1) + x as usize];
                    paint(img, cx as i64 + x, cy as i64 + y, &|_| s);
                }
            }
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_holding_a_set_is_not_written_over_and_an_empty_set_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SynthConfig {
            size: 16,
            train_good: 2,
            test_good: 1,
            test_defective: 1,
            seed: 1,
        };
        generate(dir.path(), &cfg).unwrap();
        let again = generate(
            dir.path(),
            &SynthConfig {
                size: 24,
                ..cfg.clone()
            },
        )
        .unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
        let none = SynthConfig {
            train_good: 0,
            test_good: 0,
            test_defective: 0,
            ..cfg
        };
        let empty = generate(&dir.path().join("new"), &none).unwrap_err();
        assert_eq!(empty.kind(), std::io::ErrorKind::InvalidInput);
    }
}

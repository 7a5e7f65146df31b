//! Model families and their sizes, chosen by name in the model artifact (`model.json`).

use serde::{Deserialize, Serialize};

/// An architecture and its sizes, as written in `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "kebab-case")]
pub enum Architecture {
    /// Bergmann et al. 2019: 4×4 stride-2 and 3×3 convolutions (32, 32, 32, 64, 64, 128,
    /// 64, 32 channels at 128²), a valid 8×8 convolution to a latent vector, a mirrored
    /// decoder, sigmoid output. One more stride-2 stage per doubling of the input size.
    Bergmann { latent: usize },
    /// A fully convolutional autoencoder with a spatial bottleneck (input/8 × input/8 ×
    /// `bottleneck` channels), BatchNorm and widths `width`, 2·`width`, 4·`width`.
    /// Unlike the vector-latent model it does not collapse to a flat image on CPU budgets
    /// (a classic vector-latent recipe trained 9 minutes on real textures collapsed to a
    /// flat patch every time) and runs on any input whose sides are multiples of 8.
    Spatial { width: usize, bottleneck: usize },
    /// Reconstruction plus a learned discriminator (after DRAEM, Zavrtanik et al. 2021): a
    /// spatial autoencoder (`width`, `bottleneck`) rebuilds the clean image and a small
    /// U-Net (`segmenter_width`, 2·, 4·; `segmenter_depth` stride-2 stages) reads the
    /// image beside its reconstruction and predicts per-pixel anomaly probability. Trained
    /// on synthetic anomalies.
    Draem {
        width: usize,
        bottleneck: usize,
        segmenter_width: usize,
        /// Artifacts written before the depth was a setting had 3 stages.
        #[serde(default = "three")]
        segmenter_depth: usize,
        /// The segmenter also reads two error maps of the image against its reconstruction
        /// (see `draem::error_maps`). Artifacts written before this was a setting did not.
        #[serde(default)]
        error_maps: bool,
        /// The segmenter's loss also trains the reconstructor, as in DRAEM's own training;
        /// otherwise the reconstruction is a constant to the segmenter. Only training
        /// differs. Artifacts written before this was a setting did not.
        #[serde(default)]
        joint_training: bool,
    },
    /// The variational form of the spatial autoencoder (Kingma & Welling 2014): the encoder
    /// emits a mean and a log-variance per bottleneck value, training decodes a sample
    /// z = μ + σ·ε and adds β·KL(q(z|x) ‖ N(0, 1)) to the reconstruction loss (β ramped up
    /// linearly over `kl_warmup_steps`); inference decodes μ, so scores are deterministic.
    Vae {
        width: usize,
        bottleneck: usize,
        beta: f32,
        kl_warmup_steps: usize,
    },
    /// One encoder, two decoders trained adversarially (after USAD, Audibert et al. 2020),
    /// each autoencoder the spatial one (`width`, `bottleneck`); the map weighs the first
    /// decoder's error by `alpha` and the second's, on the first's rebuild, by 1 − `alpha`.
    Usad {
        width: usize,
        bottleneck: usize,
        alpha: f32,
    },
    /// The spatial autoencoder (`width`, `bottleneck`) trained with an adversarial loss
    /// (weight `adversarial_weight`) from a spectrally normalised patch critic
    /// (`critic_width`, 2·, 4·); its learned map is the critic's feature distance between
    /// an image and its reconstruction.
    Adversarial {
        width: usize,
        bottleneck: usize,
        critic_width: usize,
        adversarial_weight: f32,
    },
}

fn three() -> usize {
    3
}

impl Architecture {
    /// The family's name, as `--arch` and `model.json` spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Bergmann { .. } => "bergmann",
            Architecture::Spatial { .. } => "spatial",
            Architecture::Draem { .. } => "draem",
            Architecture::Vae { .. } => "vae",
            Architecture::Usad { .. } => "usad",
            Architecture::Adversarial { .. } => "adversarial",
        }
    }

    /// The weight of the first of two learned maps when the family returns two (usad: the
    /// first decoder's error against the second's); `None` for the others.
    pub fn map_alpha(&self) -> Option<f32> {
        match self {
            Architecture::Usad { alpha, .. } => Some(*alpha),
            _ => None,
        }
    }

    /// Checks a request's `alpha` (the weight of the first of two learned maps): within
    /// [0, 1], and for a family that has two maps.
    pub fn check_alpha(&self, alpha: f32) -> std::result::Result<(), String> {
        if !(0.0..=1.0).contains(&alpha) {
            return Err(format!("alpha must be a number from 0 to 1, not {alpha}"));
        }
        if self.map_alpha().is_none() {
            return Err(format!(
                "alpha weighs two learned maps (usad models); this model is {} and has one",
                self.name()
            ));
        }
        Ok(())
    }

    /// True when the network accepts any input size (a multiple of 8), not only its patch size.
    pub fn fully_convolutional(&self) -> bool {
        !matches!(self, Architecture::Bergmann { .. })
    }

    /// Checks that the architecture can take `channels × size × size` inputs.
    pub fn validate(&self, channels: usize, size: usize) -> std::result::Result<(), String> {
        if channels != 1 && channels != 3 {
            return Err(format!("channels must be 1 or 3, not {channels}"));
        }
        match self {
            Architecture::Bergmann { latent } => {
                if *latent == 0 {
                    return Err("latent size must be positive".into());
                }
                if size < 128 || !size.is_power_of_two() {
                    return Err(format!(
                        "the bergmann architecture takes 128, 256, 512… pixels, not {size}"
                    ));
                }
            }
            Architecture::Spatial { width, bottleneck }
            | Architecture::Draem { width, bottleneck, .. }
            | Architecture::Vae { width, bottleneck, .. }
            | Architecture::Usad { width, bottleneck, .. }
            | Architecture::Adversarial { width, bottleneck, .. } => {
                if *width == 0 || *bottleneck == 0 {
                    return Err("width and bottleneck must be positive".into());
                }
                let mut multiple = 8;
                if let Architecture::Draem {
                    segmenter_width,
                    segmenter_depth,
                    ..
                } = self
                {
                    if *segmenter_width == 0 {
                        return Err("segmenter width must be positive".into());
                    }
                    if !(1..=6).contains(segmenter_depth) {
                        return Err(format!("segmenter depth must be 1 to 6, not {segmenter_depth}"));
                    }
                    multiple = multiple.max(1 << segmenter_depth);
                }
                if let Architecture::Usad { alpha, .. } = self {
                    if !(0.0..=1.0).contains(alpha) {
                        return Err(format!("alpha must be between 0 and 1, not {alpha}"));
                    }
                }
                if let Architecture::Adversarial {
                    critic_width,
                    adversarial_weight,
                    ..
                } = self
                {
                    if *critic_width == 0 {
                        return Err("critic width must be positive".into());
                    }
                    if !(adversarial_weight.is_finite() && *adversarial_weight >= 0.0) {
                        return Err(format!(
                            "the adversarial weight must be a finite number ≥ 0, not {adversarial_weight}"
                        ));
                    }
                }
                if let Architecture::Vae { beta, .. } = self {
                    if !(beta.is_finite() && *beta >= 0.0) {
                        return Err(format!("beta must be a finite number ≥ 0, not {beta}"));
                    }
                }
                if size < 2 * multiple || size % multiple != 0 {
                    return Err(format!(
                        "this architecture takes sides that are multiples of {multiple} (≥ {}), not {size}",
                        2 * multiple
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draem_cards_from_before_depth_error_maps_and_joint_training_were_settings_load_as_trained() {
        let old = r#"{"name": "draem", "width": 16, "bottleneck": 8, "segmenter_width": 8}"#;
        let arch: Architecture = serde_json::from_str(old).unwrap();
        assert_eq!(
            arch,
            Architecture::Draem {
                width: 16,
                bottleneck: 8,
                segmenter_width: 8,
                segmenter_depth: 3,
                error_maps: false,
                joint_training: false,
            }
        );
    }
}

//! Fitting the default number of training steps to a time budget.
//!
//! The same training runs twice as fast on a quiet day of a shared machine as on a busy
//! one, so a fixed step count either wastes a quick machine's budget or overruns a slow
//! one's. Before training, a few steps of a throwaway copy of the network are timed and
//! the step count is cut, if need be, to what fits. The decision is made once, before the
//! first real step, and recorded in `model.json`: training with `--steps N` for the
//! recorded N gives the same weights bit for bit.

use std::time::{Duration, Instant};

use rand::SeedableRng;

use crate::image_io::Planar;
use crate::model::{Architecture, Network};
use crate::train::{sample_batch, step_settings, TrainConfig};

/// Step counts are cut to a multiple of this, so that the numbers read as chosen.
pub const STEP_QUANTUM: usize = 50;

/// Time kept back for what follows the steps (the collapse check, calibration and
/// writing the model: a few seconds for 70 images of 256²) and for the estimate's error.
pub fn reserve(budget: Duration) -> Duration {
    Duration::from_secs(20) + budget / 20
}

/// The steps to run: `planned` when they fit in `remaining` at `step` seconds each, else
/// as many as fit, rounded down to a multiple of [`STEP_QUANTUM`], and never fewer than
/// one quantum (fewer would hardly train at all; the warning names the count).
pub fn steps_within(planned: usize, step: Duration, remaining: Duration) -> usize {
    let step = step.as_secs_f64().max(1e-9);
    let fit = (remaining.as_secs_f64() / step).floor() as usize;
    if fit >= planned {
        return planned;
    }
    (fit / STEP_QUANTUM * STEP_QUANTUM).max(STEP_QUANTUM.min(planned))
}

/// Seconds per training step of `cfg` on this machine: three steps of a throwaway network
/// of the same architecture on crops of the training images, the first untimed (it
/// allocates). Its own network and random stream, so the real training is untouched.
pub fn probe_step(
    cfg: &TrainConfig,
    architecture: &Architecture,
    channels: usize,
    training: &[Planar],
) -> candle_core::Result<Duration> {
    let settings = step_settings(cfg);
    let mut net = Network::new_seeded(
        architecture,
        channels,
        cfg.patch_size,
        &cfg.device,
        settings.seed ^ 0x9e37_79b9,
    )?;
    net.set_kernels(settings.kernels);
    let mut trainer = net.trainer(settings)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed);
    let mut timed = Duration::ZERO;
    for i in 0..3 {
        let started = Instant::now();
        // Sampling is part of a step's cost, so it is timed too.
        let batch = sample_batch(
            training,
            cfg.patch_size,
            cfg.batch_size,
            &cfg.augment,
            &mut rng,
            &cfg.device,
        )?;
        trainer.step(&batch, cfg.learning_rate)?;
        if i > 0 {
            timed += started.elapsed();
        }
    }
    Ok(timed / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planned_steps_stay_when_they_fit() {
        let s = Duration::from_millis(300);
        // 2400 steps of 0.3 s are 720 s.
        assert_eq!(steps_within(2400, s, Duration::from_secs(720)), 2400);
        assert_eq!(steps_within(2400, s, Duration::from_secs(10_000)), 2400);
    }

    #[test]
    fn steps_are_cut_to_a_multiple_of_the_quantum_that_fits() {
        let s = Duration::from_millis(600);
        // 700 s / 0.6 s = 1166.7 steps: 1150 fit.
        assert_eq!(steps_within(2400, s, Duration::from_secs(700)), 1150);
        // 719 s / 0.3 s = 2396.7: one step short of 2400, so 2350.
        assert_eq!(
            steps_within(2400, Duration::from_millis(300), Duration::from_secs(719)),
            2350
        );
    }

    #[test]
    fn never_fewer_than_one_quantum() {
        let s = Duration::from_secs(1);
        assert_eq!(steps_within(2400, s, Duration::ZERO), STEP_QUANTUM);
        assert_eq!(steps_within(2400, s, Duration::from_secs(49)), STEP_QUANTUM);
        // A plan shorter than a quantum is kept as it is.
        assert_eq!(steps_within(20, s, Duration::ZERO), 20);
    }

    #[test]
    fn reserve_grows_with_the_budget() {
        assert_eq!(
            reserve(Duration::from_secs(810)),
            Duration::from_secs(20) + Duration::from_millis(40_500)
        );
    }
}

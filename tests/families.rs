//! The model seam: every family trains through its own step, saves and loads by name, and
//! serves through the same detector. Tiny networks, a few steps.

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::{dataset, run, stderr, stdout};
use image::DynamicImage;
use serde_json::Value;
use vigil::detector::{Detector, Overrides};
use vigil::kernels::Kernels;
use vigil::model::artifact::Fit;
use vigil::model::{AnomalyModel, Architecture, Network, StepSettings, TrainBatch};
use vigil::train::LossKind;

fn draem() -> Architecture {
    draem_with(false, false)
}

/// A tiny draem whose segmenter does or does not also read the error maps, and whose
/// segmenter's loss does or does not also train its reconstructor.
fn draem_with(error_maps: bool, joint_training: bool) -> Architecture {
    Architecture::Draem {
        width: 4,
        bottleneck: 2,
        segmenter_width: 4,
        segmenter_depth: 3,
        error_maps,
        joint_training,
    }
}

fn vae() -> Architecture {
    Architecture::Vae {
        width: 4,
        bottleneck: 2,
        beta: 0.01,
        kl_warmup_steps: 10,
    }
}

fn usad() -> Architecture {
    Architecture::Usad {
        width: 4,
        bottleneck: 2,
        alpha: 0.5,
    }
}

fn adversarial() -> Architecture {
    Architecture::Adversarial {
        width: 4,
        bottleneck: 2,
        critic_width: 4,
        adversarial_weight: 0.05,
    }
}

/// The names of the loss parts a training recorded in its model card.
fn loss_parts(card: &Value) -> Vec<&str> {
    card["training"]["final_loss_parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap())
        .collect()
}

/// Trains a tiny model of a family with `extra` options into the scratch folder `name`;
/// returns its folder and its model card.
fn train_tiny(name: &str, extra: &[&str]) -> (std::path::PathBuf, Value) {
    let data = dataset().to_str().unwrap().to_string();
    let out = common::scratch().join(name);
    let mut args = common::tiny_train_args(&data, out.to_str().unwrap());
    args.extend(extra);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let card = serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).unwrap()).unwrap();
    (out, card)
}

fn families() -> Vec<Architecture> {
    vec![
        usad(),
        Architecture::Spatial {
            width: 4,
            bottleneck: 2,
        },
        draem(),
        draem_with(true, false),
        draem_with(false, true),
        vae(),
        adversarial(),
    ]
}

/// A fixed batch: smooth inputs with a bright square in the first two (the mask).
fn batch(dev: &Device) -> TrainBatch {
    let (n, s) = (4, 32);
    let mut x = vec![0f32; n * s * s];
    let mut m = vec![0f32; n * s * s];
    for b in 0..n {
        for i in 0..s * s {
            let (r, c) = (i / s, i % s);
            x[b * s * s + i] = 0.4 + 0.2 * ((r + 2 * c + 5 * b) as f32 * 0.3).sin();
            if b < 2 && (8..16).contains(&r) && (10..18).contains(&c) {
                x[b * s * s + i] = 0.95;
                m[b * s * s + i] = 1.0;
            }
        }
    }
    let input = Tensor::from_vec(x, (n, 1, s, s), dev).unwrap();
    TrainBatch {
        target: input.clone(),
        input,
        mask: Tensor::from_vec(m, (n, 1, s, s), dev).unwrap(),
    }
}

#[test]
fn each_familys_step_lowers_its_loss_on_a_fixed_batch() {
    let dev = Device::Cpu;
    let b = batch(&dev);
    for arch in families() {
        let net = Network::new_seeded(&arch, 1, 32, &dev, 5).unwrap();
        let mut step = net
            .trainer(StepSettings {
                loss: LossKind::SsimL2,
                learning_rate: 3e-3,
                weight_decay: 0.0,
                kernels: Kernels::Fast,
                seed: 0,
            })
            .unwrap();
        let first = step.step(&b, 3e-3).unwrap();
        let mut last = first.clone();
        for _ in 0..40 {
            last = step.step(&b, 3e-3).unwrap();
        }
        assert!(
            last.total < 0.7 * first.total,
            "{arch:?}: loss {} → {}",
            first.total,
            last.total
        );
        // Each part it minimises falls too (the segmenter learns the mask, not only the
        // reconstructor). A VAE's KL starts near 0 at initialisation, and its weight is
        // ramped up from 0, so it may rise first: that part is checked elsewhere. USAD's
        // second decoder is trained to make AE2(AE1(x)) worse, so that part may rise; the
        // adversarial family's reconstructor and critic play a game whose parts need not
        // both fall (its critic is checked elsewhere).
        for ((name, a), (_, z)) in first.parts.iter().zip(&last.parts) {
            if !["kl", "ae2_of_ae1", "adversarial", "critic"].contains(name) {
                assert!(z < a, "{arch:?}: {name} {a} → {z}");
            }
        }
    }
}

#[test]
fn steps_on_fast_kernels_match_candle_ops() {
    // Every family: each one's step runs its own losses through the fast kernels'
    // hand-written backward passes.
    for arch in families() {
        step_on_fast_kernels_matches_candle_ops(&arch);
    }
}

fn step_on_fast_kernels_matches_candle_ops(arch: &Architecture) {
    // The same seeded network stepped once on vigil's CPU kernels and once on candle's:
    // the losses agree, and the step moves the map (the reconstruction, for families
    // without a map of their own) alike. (AdamW's first step is about
    // lr·sign(gradient), so weights whose gradient is ~0 may move either way: the maps
    // after the step are compared against how far the step moved them.)
    let dev = Device::Cpu;
    let b = batch(&dev);
    let x = b.input.clone();
    let map_of = |net: &Network| -> Vec<f32> {
        let out = net.infer(&x).unwrap();
        let map = out.learned_map.unwrap_or(out.reconstruction);
        map.flatten_all().unwrap().to_vec1().unwrap()
    };
    let mut results = vec![];
    for kernels in [Kernels::Fast, Kernels::Candle] {
        let mut net = Network::new_seeded(arch, 1, 32, &dev, 9).unwrap();
        net.set_kernels(kernels);
        let before = map_of(&net);
        let loss = {
            let mut step = net
                .trainer(StepSettings {
                    loss: LossKind::SsimL2,
                    learning_rate: 1e-3,
                    weight_decay: 0.0,
                    kernels,
                    seed: 0,
                })
                .unwrap();
            step.step(&b, 1e-3).unwrap()
        };
        results.push((loss, before, map_of(&net)));
    }
    let ((fast_loss, fast_before, fast_after), (ref_loss, ref_before, ref_after)) = (&results[0], &results[1]);
    for ((name, f), (_, r)) in fast_loss.parts.iter().zip(&ref_loss.parts) {
        assert!((f - r).abs() < 1e-4 * r.abs().max(1.0), "{arch:?} {name}: {f} vs {r}");
    }
    let max_diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
    assert!(max_diff(fast_before, ref_before) < 1e-4);
    let moved = max_diff(ref_before, ref_after);
    let apart = max_diff(fast_after, ref_after);
    assert!(moved > 1e-6, "{arch:?}: the step moved the map: {moved}");
    assert!(
        apart < 0.1 * moved,
        "{arch:?}: after one step the maps differ by {apart}; the step moved them {moved}"
    );
}

#[test]
fn weights_are_named_by_network_and_stage_and_round_trip() {
    let dev = Device::Cpu;
    let net = Network::new_seeded(&draem(), 3, 32, &dev, 2).unwrap();
    let names: Vec<String> = net.varmap.data().lock().unwrap().keys().cloned().collect();
    assert!(names.iter().any(|n| n.starts_with("segmenter.down1.")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("segmenter.head.")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("reconstructor.enc.")), "{names:?}");

    let dir = tempfile::tempdir().unwrap();
    net.save_weights(dir.path()).unwrap();
    let mut card = common::test_card(Fit::Whole, 32, 32);
    card.architecture = draem();
    card.input.channels = 3;
    let loaded = Network::load(dir.path(), &card, &dev).unwrap();
    let x = Tensor::rand(0f32, 1f32, (2, 3, 32, 32), &dev).unwrap();
    let (a, b) = (net.infer(&x).unwrap(), loaded.infer(&x).unwrap());
    let diff = (a.learned_map.unwrap() - b.learned_map.unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
}

#[test]
fn a_learned_map_scores_batches_exactly_as_one_by_one() {
    let dev = Device::Cpu;
    let net = Network::new_seeded(&draem(), 1, 32, &dev, 4).unwrap();
    let mut card = common::test_card(Fit::Whole, 64, 32);
    card.architecture = draem();
    card.scoring.method = vigil::scoring::MapMethod::Learned;
    card.scoring.reduction = vigil::scoring::Reduction::MeanFilterMax { size: 5 };
    let d = Detector::new(card, Arc::new(net));
    let imgs: Vec<DynamicImage> = (0..3)
        .map(|i| {
            let mut g = image::GrayImage::from_pixel(64, 64, image::Luma([90 + 20 * i as u8]));
            g.put_pixel(10 + i, 20, image::Luma([250]));
            DynamicImage::ImageLuma8(g)
        })
        .collect();
    let refs: Vec<&DynamicImage> = imgs.iter().collect();
    let batch = d.inspect_batch(&refs, Overrides::default()).unwrap();
    for (img, b) in imgs.iter().zip(&batch) {
        let one = &d.inspect_batch(&[img], Overrides::default()).unwrap()[0];
        assert!((one.score - b.score).abs() <= 1e-5, "{} vs {}", one.score, b.score);
        // The map is the segmenter's probability, smoothed: within [0, 1].
        assert!(b.map().iter().all(|v| (0.0..=1.0).contains(v)));
    }
    // Scoring the learned map needs no SSIM/L2 maps: they are skipped, and the score is
    // the same as with them (calibration still computes them, for their scales).
    let prepared = d.prepare(&imgs[0]);
    let lean = d.reconstruct(&[&prepared.working]).unwrap();
    let full = d.reconstruct_with_error_maps(&[&prepared.working]).unwrap();
    assert!(lean[0].raw.dssim.is_empty() && lean[0].raw.l2.is_empty());
    assert_eq!(full[0].raw.dssim.len(), 64 * 64);
    assert_eq!(d.working_map(&lean[0].raw, None), d.working_map(&full[0].raw, None));
}

#[test]
fn flipped_views_average_the_maps_turned_back() {
    use image::imageops::{flip_horizontal, flip_vertical};
    use vigil::scoring::{MapMethod, RawMaps, TestTimeFlips};
    // A learned map (draem), two learned maps (usad) and the error maps of a
    // reconstruction (spatial, SSIM and L2, computed against each view's own input).
    let spatial = Architecture::Spatial {
        width: 4,
        bottleneck: 2,
    };
    for (arch, method) in [
        (draem(), MapMethod::Learned),
        (usad(), MapMethod::Learned),
        (spatial, MapMethod::SsimL2),
    ] {
        let net = Arc::new(Network::new_seeded(&arch, 1, 32, &Device::Cpu, 5).unwrap());
        // Tiles at 0, 24 and 32: a grid its mirror image does not match, so each view is
        // cut into tiles of its own and put back together.
        let mut card = common::test_card(Fit::Tiles { stride: 24 }, 64, 32);
        card.architecture = arch.clone();
        card.scoring.method = method;
        let single = Detector::new(card.clone(), net.clone());
        card.scoring.test_time_flips = TestTimeFlips::All;
        let averaged = Detector::new(card, net);
        // Nothing in it is symmetric: a ramp with a bright pixel off the diagonals.
        let g = image::GrayImage::from_fn(64, 64, |x, y| {
            image::Luma([if (x, y) == (9, 40) { 255 } else { (x + 2 * y) as u8 }])
        });
        let mut want: Option<(RawMaps, Vec<f32>)> = None;
        for (h, v) in [(false, false), (true, false), (false, true), (true, true)] {
            let mut img = g.clone();
            if h {
                img = flip_horizontal(&img);
            }
            if v {
                img = flip_vertical(&img);
            }
            let prepared = single.prepare(&DynamicImage::ImageLuma8(img));
            let mut r = single
                .reconstruct_with_error_maps(&[&prepared.working])
                .unwrap()
                .remove(0);
            for plane in r.raw.planes_mut().into_iter().chain([&mut r.image.data]) {
                vigil::image_io::flip_planes(plane, 64, 64, h, v);
                plane.iter_mut().for_each(|x| *x /= 4.0);
            }
            match want.as_mut() {
                None => want = Some((r.raw, r.image.data)),
                Some((raw, image)) => {
                    for (a, b) in raw
                        .planes_mut()
                        .into_iter()
                        .chain([image])
                        .zip(r.raw.planes().into_iter().chain([&r.image.data]))
                    {
                        a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    }
                }
            }
        }
        let (want, recon) = want.unwrap();
        let prepared = averaged.prepare(&DynamicImage::ImageLuma8(g.clone()));
        let got = averaged
            .reconstruct_with_error_maps(&[&prepared.working])
            .unwrap()
            .remove(0);
        let off = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let name = arch.name();
        assert_eq!(got.raw.planes().len(), want.planes().len(), "{name}");
        assert!(want.planes().len() >= 2, "{name}: the error maps, and the learned ones");
        for (a, b) in got.raw.planes().into_iter().zip(want.planes()) {
            assert!(off(a, b) < 1e-5, "{name}: {}", off(a, b));
        }
        assert!(off(&got.image.data, &recon) < 1e-5, "{name}");
        // The image alone differs from the average (the untrained network is not symmetric).
        let alone = single
            .reconstruct_with_error_maps(&[&prepared.working])
            .unwrap()
            .remove(0);
        assert!(off(&alone.raw.l2, &want.l2) > 1e-6, "{name}");
        // In a batch with another image, each image's views stay its own.
        let other = single.prepare(&DynamicImage::ImageLuma8(flip_vertical(&g)));
        let batch = averaged
            .reconstruct_with_error_maps(&[&other.working, &prepared.working])
            .unwrap();
        assert_eq!(batch[1].raw, got.raw, "{name}");
    }
}

#[test]
fn draem_trains_inspects_and_evaluates_end_to_end() {
    // The tiny model of the other CLI tests is trained with the default family.
    let out = common::tiny_model();
    let data = dataset().to_str().unwrap().to_string();
    let card: Value = serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).unwrap()).unwrap();
    assert_eq!(card["architecture"]["name"], "draem");
    assert_eq!(card["scoring"]["method"], "learned");
    // The map is smoothed with σ 4; the score is the mean of the 100 highest unsmoothed
    // pixels per 256² (64² here: ⌈6.25⌉ = 7).
    assert_eq!(card["input"]["working_size"], 64);
    assert_eq!(card["scoring"]["reduction"]["kind"], "top-k-mean");
    assert_eq!(card["scoring"]["reduction"]["k"], 7);
    assert_eq!(card["scoring"]["smoothing_sigma"], 4.0);
    assert_eq!(card["scoring"]["score_smoothing_sigma"], 0.0);
    assert!(card["training"]["augment"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a.as_str().unwrap().starts_with("anomalies")));
    let img = dataset().join("test/hole/000.png");
    let o = run(&["inspect", "--model", out.to_str().unwrap(), img.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let score = r["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score), "a probability: {score}");
    let o = run(&["eval", "--model", out.to_str().unwrap(), "--data", &data]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Without synthetic anomalies the discriminator has nothing to learn: a clear error.
    let elsewhere = common::scratch().join("never-written");
    let o = run(&[
        "train",
        "--data",
        &data,
        "--out",
        elsewhere.to_str().unwrap(),
        "--arch",
        "draem",
        "--augment",
        "flips",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("anomalies"), "{}", stderr(&o));
}

#[test]
fn draems_segmenter_reads_error_maps_by_default_on_colour_images_only() {
    let error_maps = |card: &Value| card["architecture"]["error_maps"].as_bool().unwrap_or(false);
    // The tiny model of the CLI tests: default options on the gray synthetic images.
    let gray: Value =
        serde_json::from_str(&std::fs::read_to_string(common::tiny_model().join("model.json")).unwrap()).unwrap();
    assert_eq!(gray["input"]["channels"], 1);
    assert!(!error_maps(&gray), "gray images: no error maps by default");
    let (_, colour) = train_tiny("tiny-draem-colour", &["--channels", "rgb"]);
    assert_eq!(colour["input"]["channels"], 3);
    assert!(error_maps(&colour), "colour images: error maps by default");
    // What the caller says wins, either way.
    let (_, off) = train_tiny(
        "tiny-draem-colour-off",
        &["--channels", "rgb", "--segmenter-error-maps", "false"],
    );
    assert!(!error_maps(&off));
    let (_, on) = train_tiny("tiny-draem-gray-on", &["--segmenter-error-maps"]);
    assert!(error_maps(&on));
}

#[test]
fn every_family_round_trips_through_its_saved_weights() {
    let dev = Device::Cpu;
    for arch in families() {
        let net = Network::new_seeded(&arch, 1, 32, &dev, 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        net.save_weights(dir.path()).unwrap();
        let mut card = common::test_card(Fit::Whole, 32, 32);
        card.architecture = arch.clone();
        let loaded = Network::load(dir.path(), &card, &dev).unwrap();
        let x = Tensor::rand(0f32, 1f32, (2, 1, 32, 32), &dev).unwrap();
        let (a, b) = (net.infer(&x).unwrap(), loaded.infer(&x).unwrap());
        let diff = (a.reconstruction - b.reconstruction).unwrap().abs().unwrap();
        assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0, "{arch:?}");
        // A learned map too: for the adversarial family it depends on the critic's saved
        // power-iteration state as well as its weights.
        if let (Some(p), Some(q)) = (a.learned_map, b.learned_map) {
            let diff = (p - q).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{arch:?}");
        }
    }
}

#[test]
fn a_vae_scores_deterministically_and_its_step_pulls_the_code_towards_the_prior() {
    let dev = Device::Cpu;
    let b = batch(&dev);
    // Inference decodes the mean: the same image gets the same reconstruction every time.
    let net = Network::new_seeded(&vae(), 1, 32, &dev, 6).unwrap();
    let once = net.infer(&b.input).unwrap().reconstruction;
    let again = net.infer(&b.input).unwrap().reconstruction;
    let same = (once - again).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0);
    // With a large β and no warm-up the KL part is what the step minimises most: it falls.
    let heavy = Architecture::Vae {
        width: 4,
        bottleneck: 2,
        beta: 10.0,
        kl_warmup_steps: 0,
    };
    let net = Network::new_seeded(&heavy, 1, 32, &dev, 6).unwrap();
    let settings = StepSettings {
        loss: LossKind::SsimL2,
        learning_rate: 3e-3,
        weight_decay: 0.0,
        kernels: Kernels::Fast,
        seed: 1,
    };
    let mut step = net.trainer(settings).unwrap();
    let kl = |l: &vigil::model::StepLoss| l.parts.iter().find(|(n, _)| *n == "kl").unwrap().1;
    let first = step.step(&b, 3e-3).unwrap();
    let mut last = first.clone();
    for _ in 0..30 {
        last = step.step(&b, 3e-3).unwrap();
    }
    assert!(kl(&last) < 0.5 * kl(&first), "KL {} → {}", kl(&first), kl(&last));
    // The same seed gives the same samples: training is reproducible.
    let replay = |seed| {
        let net = Network::new_seeded(&heavy, 1, 32, &dev, 6).unwrap();
        let mut step = net.trainer(StepSettings { seed, ..settings }).unwrap();
        (0..3).map(|_| step.step(&b, 3e-3).unwrap().total).collect::<Vec<f32>>()
    };
    assert_eq!(replay(1), replay(1));
    assert_ne!(replay(1), replay(2));
}

#[test]
fn a_vae_trains_inspects_and_evaluates_end_to_end() {
    let data = dataset().to_str().unwrap().to_string();
    let (out, card) = train_tiny("tiny-vae", &["--arch", "vae", "--beta", "0.05", "--kl-warmup", "3"]);
    assert_eq!(card["architecture"]["name"], "vae");
    assert_eq!(card["architecture"]["kl_warmup_steps"], 3);
    assert!((card["architecture"]["beta"].as_f64().unwrap() - 0.05).abs() < 1e-6);
    assert_eq!(
        card["scoring"]["method"], "l2",
        "a reconstruction family scores the squared error"
    );
    let parts = loss_parts(&card);
    assert_eq!(parts, ["reconstruction", "kl"]);
    let img = dataset().join("test/hole/000.png");
    let scores: Vec<f64> = (0..2)
        .map(|_| {
            let o = run(&["inspect", "--model", out.to_str().unwrap(), img.to_str().unwrap()]);
            assert!(o.status.success(), "{}", stderr(&o));
            serde_json::from_str::<Value>(stdout(&o).trim()).unwrap()["score"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(scores[0], scores[1], "inference decodes the mean: one image, one score");
    let o = run(&["eval", "--model", out.to_str().unwrap(), "--data", &data]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_usad_trains_inspects_and_evaluates_end_to_end() {
    let data = dataset().to_str().unwrap().to_string();
    let (out, card) = train_tiny("tiny-usad", &["--arch", "usad", "--alpha", "0.25"]);
    assert_eq!(card["architecture"]["name"], "usad");
    assert!((card["architecture"]["alpha"].as_f64().unwrap() - 0.25).abs() < 1e-6);
    assert_eq!(card["scoring"]["method"], "learned");
    let parts = loss_parts(&card);
    assert_eq!(parts, ["ae1", "ae2", "ae2_of_ae1"]);
    let img = dataset().join("test/hole/000.png");
    let o = run(&["inspect", "--model", out.to_str().unwrap(), img.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let score = serde_json::from_str::<Value>(stdout(&o).trim()).unwrap()["score"]
        .as_f64()
        .unwrap();
    assert!(score.is_finite() && score >= 0.0);
    // The map's mix can change per run (`--alpha`): the verdict says which it used, and the
    // first decoder's error alone scores differently from the second's alone.
    let at = |alpha: &str| -> Value {
        let o = run(&[
            "inspect",
            "--model",
            out.to_str().unwrap(),
            "--alpha",
            alpha,
            img.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str(stdout(&o).trim()).unwrap()
    };
    let (first, second) = (at("1"), at("0"));
    assert_eq!(first["alpha"], 1.0);
    assert_eq!(second["alpha"], 0.0);
    assert_ne!(first["score"], second["score"]);
    let o = run(&[
        "inspect",
        "--model",
        common::tiny_model().to_str().unwrap(),
        "--alpha",
        "0.5",
        img.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("usad"), "{}", stderr(&o));
    let o = run(&["eval", "--model", out.to_str().unwrap(), "--data", &data]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn the_adversarial_critic_learns_to_tell_images_from_reconstructions() {
    // The hinge loss of a critic that cannot tell is 2 (logits near 0). With no weight on
    // its verdict (the reconstructor learns to rebuild, not to fool it), the critic's
    // loss falls well below that on a fixed batch (1.98 → 1.26 in 40 steps when this
    // was written).
    let dev = Device::Cpu;
    let b = batch(&dev);
    let arch = Architecture::Adversarial {
        width: 4,
        bottleneck: 2,
        critic_width: 8,
        adversarial_weight: 0.0,
    };
    let net = Network::new_seeded(&arch, 1, 32, &dev, 11).unwrap();
    let mut step = net
        .trainer(StepSettings {
            loss: LossKind::SsimL2,
            learning_rate: 2e-3,
            weight_decay: 0.0,
            kernels: Kernels::Fast,
            seed: 0,
        })
        .unwrap();
    let critic = |l: &vigil::model::StepLoss| l.parts.iter().find(|(n, _)| *n == "critic").unwrap().1;
    let first = critic(&step.step(&b, 2e-3).unwrap());
    let mut last = first;
    for _ in 0..40 {
        last = critic(&step.step(&b, 2e-3).unwrap());
    }
    assert!((first - 2.0).abs() < 0.5, "an untrained critic is near chance: {first}");
    assert!(last < 0.75 * first, "critic loss {first} → {last}");
}

#[test]
fn an_adversarial_model_trains_inspects_and_evaluates_end_to_end() {
    let data = dataset().to_str().unwrap().to_string();
    let (out, card) = train_tiny(
        "tiny-adversarial",
        &[
            "--arch",
            "adversarial",
            "--critic-width",
            "4",
            "--adversarial-weight",
            "0.1",
        ],
    );
    assert_eq!(card["architecture"]["name"], "adversarial");
    assert_eq!(card["architecture"]["critic_width"], 4);
    assert!((card["architecture"]["adversarial_weight"].as_f64().unwrap() - 0.1).abs() < 1e-6);
    // Scored by the critic's feature distance (measured ahead of the SSIM+L2 error).
    assert_eq!(card["scoring"]["method"], "learned");
    assert_eq!(loss_parts(&card), ["reconstruction", "adversarial", "critic"]);
    let img = dataset().join("test/hole/000.png");
    let o = run(&["inspect", "--model", out.to_str().unwrap(), img.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let score = serde_json::from_str::<Value>(stdout(&o).trim()).unwrap()["score"]
        .as_f64()
        .unwrap();
    assert!(score.is_finite() && score >= 0.0);
    let o = run(&["eval", "--model", out.to_str().unwrap(), "--data", &data]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_time_budget_cuts_the_default_steps_and_the_recorded_count_trains_the_same_model() {
    let data = dataset().to_str().unwrap().to_string();
    let out = common::scratch().join("tiny-budget");
    let out_s = out.to_str().unwrap().to_string();
    // The tiny model's options without its --steps: the family's default step count,
    // under a budget far too short for it.
    let mut args: Vec<&str> = common::tiny_train_args(&data, &out_s);
    let at = args.iter().position(|a| *a == "--steps").unwrap();
    args.drain(at..at + 2);
    args.extend(["--time-budget", "0.001"]);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let card: Value = serde_json::from_str(&std::fs::read_to_string(out.join("model.json")).unwrap()).unwrap();
    let t = &card["training"];
    let quantum = vigil::train::budget::STEP_QUANTUM as u64;
    assert_eq!(t["steps"].as_u64(), Some(quantum), "cut to the smallest count");
    assert_eq!(t["planned_steps"].as_u64(), Some(quantum));
    assert!(t["time_budget"]["default_steps"].as_u64().unwrap() > quantum);
    assert!(t["time_budget"]["probe_step_seconds"].as_f64().unwrap() > 0.0);
    assert!((t["time_budget"]["minutes"].as_f64().unwrap() - 0.001).abs() < 1e-9);
    assert!(stderr(&o).contains(&format!("--steps {quantum}")), "{}", stderr(&o));

    // The recorded count, given explicitly, trains the same weights: the probe touched
    // neither the network nor the random stream of the real training.
    let again = common::scratch().join("tiny-budget-again");
    let again_s = again.to_str().unwrap().to_string();
    let q = quantum.to_string();
    let mut args = common::tiny_train_args(&data, &again_s);
    let at = args.iter().position(|a| *a == "--steps").unwrap();
    args[at + 1] = &q;
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let weights = |dir: &std::path::Path| std::fs::read(dir.join("weights.safetensors")).unwrap();
    assert!(weights(&out) == weights(&again), "same steps and seed, same weights");
    let card: Value = serde_json::from_str(&std::fs::read_to_string(again.join("model.json")).unwrap()).unwrap();
    assert!(
        card["training"].get("time_budget").is_none(),
        "explicit steps: no budget"
    );

    // A budget must be a number of minutes.
    let mut args = common::tiny_train_args(&data, &again_s);
    args.extend(["--time-budget", "-1"]);
    let o = run(&args);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("minutes"), "{}", stderr(&o));
}

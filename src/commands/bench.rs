//! `vigil bench`: speeds of the building blocks, each next to the machine's matmul peak
//! measured in the same run, so figures read as a fraction of what the CPU can do.

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use serde::Serialize;

use crate::cli::BenchArgs;
use crate::kernels::{ops, Activation, Kernels};
use crate::model::{device, AnomalyModel, Architecture, Network, StepSettings, TrainBatch};
use crate::scoring::ssim::{ssim_map, SsimParams};
use crate::scoring::{map_and_score, MapMethod, MapSpec, RawMaps, Reduction};
use crate::train::LossKind;

#[derive(Debug, Serialize)]
pub struct Forward {
    pub arch: String,
    pub size: usize,
    pub batch: usize,
    /// With the default kernels (vigil's on the CPU).
    pub images_per_s: f64,
    pub gflops: f64,
    pub share_of_peak: f64,
    /// With candle's own operations, measured in the same run (absent with --no-compare).
    pub candle_images_per_s: Option<f64>,
    /// images_per_s / candle_images_per_s.
    pub speedup: Option<f64>,
}

/// One optimisation step (forward, loss, backward, AdamW) at batch 16 on 128² crops.
#[derive(Debug, Serialize)]
pub struct TrainStep {
    pub arch: String,
    pub channels: usize,
    pub loss: String,
    pub seconds: f64,
    pub candle_seconds: Option<f64>,
    pub speedup: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Choice {
    pub what: String,
    pub chosen_ms: f64,
    pub alternative_ms: f64,
    /// alternative / chosen: above 1 means the chosen path is faster.
    pub speedup: f64,
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub device: String,
    pub threads: usize,
    pub matmul_gflops: f64,
    /// Bergmann (242.5 MFLOP at 128², the cross-framework reference), the spatial
    /// architecture, then draem (its reconstructor and segmenter) at default sizes; 128²
    /// and 256², batch 1 and 16, one channel.
    pub forward: Vec<Forward>,
    /// Batch 16, 128², Bergmann architecture, SSIM loss, AdamW, default kernels: the
    /// figure to compare with other frameworks.
    pub train_step_s: f64,
    pub train_steps: Vec<TrainStep>,
    /// Mean-SSIM loss forward + backward, batch 16, 128², default kernels.
    pub ssim_loss_ms: f64,
    pub ssim_loss_candle_ms: Option<f64>,
    pub ssim_map_256_ms: f64,
    pub choices: Vec<Choice>,
}

/// Median seconds of `repeat` runs after one warm-up.
fn time<F: FnMut() -> candle_core::Result<()>>(repeat: usize, mut f: F) -> candle_core::Result<f64> {
    f()?;
    let mut v = Vec::with_capacity(repeat);
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let dev = device::select(args.device)?;
    let report = measure(&dev, args.repeat, !args.no_compare)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// Times `f` with the default kernels and, when `compare`, with candle's.
fn both<F>(repeat: usize, compare: bool, mut f: F) -> candle_core::Result<(f64, Option<f64>)>
where
    F: FnMut(Kernels) -> candle_core::Result<()>,
{
    let fast = time(repeat, || f(Kernels::Fast))?;
    let candle = if compare {
        Some(time(repeat, || f(Kernels::Candle))?)
    } else {
        None
    };
    Ok((fast, candle))
}

pub fn measure(dev: &Device, repeat: usize, compare: bool) -> anyhow::Result<BenchReport> {
    let n = 1024;
    let a = Tensor::rand(0f32, 1f32, (n, n), dev)?;
    let b = Tensor::rand(0f32, 1f32, (n, n), dev)?;
    // The peak is the best of the repeats (the median elsewhere): a share of a peak that
    // noise has lowered would flatter the kernels.
    let mut mm = f64::INFINITY;
    for _ in 0..repeat.max(3) {
        mm = mm.min(time(1, || {
            a.matmul(&b)?.sum_all()?.to_scalar::<f32>()?;
            Ok(())
        })?);
    }
    let peak = 2.0 * (n * n * n) as f64 / mm / 1e9;

    let bergmann = Architecture::Bergmann { latent: 100 };
    let spatial = Architecture::Spatial {
        width: 16,
        bottleneck: 8,
    };
    let draem_with = |error_maps, joint_training| Architecture::Draem {
        width: 16,
        bottleneck: 8,
        segmenter_width: 8,
        segmenter_depth: 3,
        error_maps,
        joint_training,
    };
    let draem = draem_with(false, false);
    let (draem_error_maps, draem_joint) = (draem_with(true, false), draem_with(false, true));
    let mut forward = Vec::new();
    for arch in [&bergmann, &spatial, &draem] {
        for size in [128usize, 256] {
            let mut net = Network::new_seeded(arch, 1, size, dev, 0)?;
            let flops = net.flops(size, size) as f64;
            for batch in [1usize, 16] {
                let x = Tensor::rand(0f32, 1f32, (batch, 1, size, size), dev)?;
                let (fast, candle) = both(repeat, compare, |k| {
                    net.set_kernels(k);
                    net.infer(&x)?.reconstruction.sum_all()?.to_scalar::<f32>()?;
                    Ok(())
                })?;
                let ips = batch as f64 / fast;
                forward.push(Forward {
                    arch: arch.name().to_string(),
                    size,
                    batch,
                    images_per_s: ips,
                    gflops: ips * flops / 1e9,
                    share_of_peak: ips * flops / 1e9 / peak,
                    candle_images_per_s: candle.map(|c| batch as f64 / c),
                    speedup: candle.map(|c| c / fast),
                });
            }
        }
    }

    let mut train_steps = Vec::new();
    for (arch, loss, channels) in [
        (&bergmann, LossKind::Ssim, 1),
        (&bergmann, LossKind::L2, 1),
        (&spatial, LossKind::SsimL2, 1),
        (&draem, LossKind::SsimL2, 1),
        (&draem, LossKind::SsimL2, 3),
        (&draem_error_maps, LossKind::SsimL2, 3),
        (&draem_joint, LossKind::SsimL2, 3),
    ] {
        let mut net = Network::new_seeded(arch, channels, 128, dev, 0)?;
        let shape = (16, channels, 128, 128);
        let batch = TrainBatch {
            input: Tensor::rand(0f32, 1f32, shape, dev)?,
            target: Tensor::rand(0f32, 1f32, shape, dev)?,
            mask: Tensor::rand(0f32, 1f32, (16, 1, 128, 128), dev)?
                .ge(0.9)?
                .to_dtype(candle_core::DType::F32)?,
        };
        // Each family's own step (its losses and optimizer), as `vigil train` runs it.
        let (fast, candle) = both(repeat, compare, |k| {
            net.set_kernels(k);
            let settings = StepSettings {
                loss,
                learning_rate: 1e-3,
                weight_decay: 1e-5,
                kernels: k,
                seed: 0,
            };
            net.trainer(settings)?.step(&batch, 1e-3)?;
            Ok(())
        })?;
        train_steps.push(TrainStep {
            arch: match arch {
                Architecture::Draem { error_maps: true, .. } => "draem, error maps".into(),
                Architecture::Draem {
                    joint_training: true, ..
                } => "draem, joint".into(),
                _ => arch.name().into(),
            },
            channels,
            loss: loss.name().into(),
            seconds: fast,
            candle_seconds: candle,
            speedup: candle.map(|c| c / fast),
        });
    }

    let x = Var::from_tensor(&Tensor::rand(0f32, 1f32, (16, 1, 128, 128), dev)?)?;
    let y = Tensor::rand(0f32, 1f32, (16, 1, 128, 128), dev)?;
    let (ssim_loss, ssim_loss_candle) = both(repeat, compare, |k| {
        let l = LossKind::Ssim.compute(x.as_tensor(), &y, k)?;
        let grads = l.backward()?;
        grads.get(&x).expect("gradient of x").sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })?;

    let plane: Vec<f32> = (0..256 * 256).map(|i| ((i * 7919) % 256) as f32 / 255.0).collect();
    let other: Vec<f32> = plane.iter().map(|v| (v * 0.9 + 0.05).min(1.0)).collect();
    let ssim = time(repeat, || {
        std::hint::black_box(ssim_map(&plane, &other, 256, 256, &SsimParams::default()));
        Ok(())
    })?;

    let choices = measure_choices(dev, repeat)?;
    Ok(BenchReport {
        device: device::name(dev).into(),
        threads: candle_core::utils::get_num_threads(),
        matmul_gflops: peak,
        forward,
        train_step_s: train_steps[0].seconds,
        train_steps,
        ssim_loss_ms: ssim_loss * 1e3,
        ssim_loss_candle_ms: ssim_loss_candle.map(|s| s * 1e3),
        ssim_map_256_ms: ssim * 1e3,
        choices,
    })
}

/// The measured design choices of the model module.
fn measure_choices(dev: &Device, repeat: usize) -> candle_core::Result<Vec<Choice>> {
    let mut out = Vec::new();
    let mut push = |what: &str, chosen: f64, alt: f64| {
        out.push(Choice {
            what: what.into(),
            chosen_ms: chosen * 1e3,
            alternative_ms: alt * 1e3,
            speedup: alt / chosen,
        })
    };
    let x = Tensor::randn(0f32, 1f32, (16, 32, 64, 64), dev)?;
    let mine = time(repeat, || {
        x.maximum(&(&x * 0.2)?)?.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })?;
    let theirs = time(repeat, || {
        candle_nn::ops::leaky_relu(&x, 0.2)?.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })?;
    push(
        "LeakyReLU on 16×32×64×64: max(x, 0.2x) vs candle_nn::ops::leaky_relu",
        mine,
        theirs,
    );

    // Up-sampling 16×32×64×64 → 128×128 with 32 output channels, on the kernels the
    // network itself runs on this device.
    let wt = Tensor::randn(0f32, 0.1, (32, 32, 4, 4), dev)?;
    let wc = Tensor::randn(0f32, 0.1, (32, 32, 3, 3), dev)?;
    let bias = Tensor::zeros(32, candle_core::DType::F32, dev)?;
    let fast = Kernels::Fast.fast_on(dev);
    let convt = time(repeat, || {
        let y = if fast {
            ops::conv_transpose2d(&x, &wt, &bias, 2, 1, Activation::Identity)?
        } else {
            x.conv_transpose2d(&wt, 1, 0, 2, 1)?
        };
        y.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })?;
    let upconv = time(repeat, || {
        let up = x.upsample_nearest2d(128, 128)?;
        let y = if fast {
            ops::conv2d(&up, &wc, &bias, 1, 1, Activation::Identity)?
        } else {
            up.conv2d(&wc, 1, 1, 1, 1)?
        };
        y.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })?;
    push(
        "2× up-sampling 32→32 ch at 64→128, batch 16: 4×4 stride-2 transposed conv vs nearest + 3×3 conv",
        convt,
        upconv,
    );

    // Latent expansion 100 → 32×8×8, batch 16.
    let z = Tensor::randn(0f32, 1f32, (16, 100), dev)?;
    let wl = Tensor::randn(0f32, 0.1, (2048, 100), dev)?;
    let wk = Tensor::randn(0f32, 0.1, (100, 32, 8, 8), dev)?;
    let linear = time(repeat, || {
        z.matmul(&wl.t()?)?
            .reshape((16, 32, 8, 8))?
            .sum_all()?
            .to_scalar::<f32>()?;
        Ok(())
    })?;
    let z4 = z.reshape((16, 100, 1, 1))?;
    let convt8 = time(repeat, || {
        z4.conv_transpose2d(&wk, 0, 0, 1, 1)?.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })?;
    push(
        "latent 100 → 32×8×8, batch 16: Linear vs 8×8 transposed conv",
        linear,
        convt8,
    );

    // draem's map and score from a 256² learned map: chosen for detection, not speed; the
    // ratio says what it costs per image against the scoring it replaced.
    let learned: Vec<f32> = (0..256 * 256).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
    let raw = RawMaps {
        learned: Some(learned),
        ..RawMaps::zeros(256, 256, false, false, false)
    };
    let now = MapSpec {
        method: MapMethod::Learned,
        reduction: Reduction::TopKMean { k: 100 },
        score_smoothing_sigma: Some(0.0),
        ..MapSpec::default()
    };
    let before = MapSpec {
        smoothing_sigma: 2.0,
        reduction: Reduction::Max,
        score_smoothing_sigma: None,
        ..now.clone()
    };
    let score = |spec: &MapSpec| {
        time(repeat, || {
            std::hint::black_box(map_and_score(&raw, spec));
            Ok(())
        })
    };
    push(
        "draem map and score, 256²: σ 4 map, top 100 unsmoothed vs σ 2 map, its maximum",
        score(&now)?,
        score(&before)?,
    );
    Ok(out)
}

fn ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.1}×"))
}

fn print_table(r: &BenchReport) {
    println!(
        "device {} with {} threads; matmul (1024³, f32): {:.1} GFLOP/s",
        r.device, r.threads, r.matmul_gflops
    );
    println!(
        "\n{:<10} {:>5} {:>6} {:>10} {:>8} {:>7} {:>12} {:>8}",
        "forward", "size", "batch", "images/s", "GFLOP/s", "% peak", "candle img/s", "speedup"
    );
    for f in &r.forward {
        println!(
            "{:<10} {:>5} {:>6} {:>10.1} {:>8.1} {:>6.1}% {:>12} {:>8}",
            f.arch,
            f.size,
            f.batch,
            f.images_per_s,
            f.gflops,
            f.share_of_peak * 100.0,
            f.candle_images_per_s.map_or_else(|| "-".into(), |c| format!("{c:.1}")),
            ratio(f.speedup)
        );
    }
    println!("\ntraining step, batch 16, 128², AdamW:");
    for t in &r.train_steps {
        println!(
            "  {:<9} {}ch {:<8} {:.3} s   candle {}   speedup {}",
            t.arch,
            t.channels,
            t.loss,
            t.seconds,
            t.candle_seconds.map_or_else(|| "-".into(), |c| format!("{c:.3} s")),
            ratio(t.speedup)
        );
    }
    println!(
        "SSIM loss forward+backward, batch 16, 128²: {:.1} ms   candle {}   speedup {}",
        r.ssim_loss_ms,
        r.ssim_loss_candle_ms
            .map_or_else(|| "-".into(), |c| format!("{c:.1} ms")),
        ratio(r.ssim_loss_candle_ms.map(|c| c / r.ssim_loss_ms))
    );
    println!("SSIM map 256² (scoring, 1 thread): {:.2} ms", r.ssim_map_256_ms);
    println!("\nchoices:");
    for c in &r.choices {
        println!(
            "  {}: {:.2} ms vs {:.2} ms ({:.1}×)",
            c.what, c.chosen_ms, c.alternative_ms, c.speedup
        );
    }
}

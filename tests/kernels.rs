//! The CPU kernels against candle's own operations: values and gradients within 1e-4
//! relative (to the largest magnitude of the reference, so near-zero entries do not
//! dominate), over odd shapes, batch 1 and 7, 1 and 3 channels; then whole networks, and a
//! short training run that must follow the same loss curve.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use vigil::kernels::{ops, Activation, Kernels};
use vigil::model::{Architecture, Network};
use vigil::train::LossKind;

const TOLERANCE: f32 = 1e-4;

fn close(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes");
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(
        worst <= TOLERANCE * scale,
        "{what}: max error {worst} against scale {scale}"
    );
}

/// Deterministic values in [-1, 1) of a given shape.
fn values(shape: &[usize], seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 2000) as f32) / 1000.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn reference_activation(y: Tensor, act: Activation) -> Tensor {
    match act {
        Activation::Identity => y,
        Activation::LeakyRelu(s) => y.maximum(&(&y * s as f64).unwrap()).unwrap(),
    }
}

struct Case {
    batch: usize,
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    act: Activation,
}

const LEAKY: Activation = Activation::LeakyRelu(0.2);

fn cases() -> Vec<Case> {
    let c = |batch, cin, cout, h, w, k, stride, pad, act| Case {
        batch,
        cin,
        cout,
        h,
        w,
        k,
        stride,
        pad,
        act,
    };
    vec![
        c(1, 1, 3, 13, 11, 4, 2, 1, LEAKY),
        c(7, 3, 5, 9, 17, 3, 1, 1, Activation::Identity),
        c(7, 1, 1, 15, 15, 4, 2, 1, LEAKY),
        c(1, 3, 1, 10, 7, 3, 1, 1, LEAKY),
        c(7, 3, 4, 8, 8, 1, 1, 0, Activation::Identity),
        c(2, 3, 6, 8, 8, 8, 1, 0, LEAKY),
        // Sides where the stride leaves a remainder (15 + 2 − 4 = 13) are in the cases
        // above; here both sides divide, because candle's own conv2d backward sizes the
        // input gradient without output padding and fails otherwise (src/kernels/conv.rs
        // tests the remainder cases against the definition instead).
        c(3, 5, 3, 19, 7, 3, 2, 0, LEAKY),
    ]
}

/// Forward values and the gradients of Σ out·r for input, weight and bias.
fn run_both(
    case: &Case,
    weight_shape: &[usize],
    fast: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    reference: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
) {
    let x = Var::from_tensor(&values(&[case.batch, case.cin, case.h, case.w], 1)).unwrap();
    let w = Var::from_tensor(&(values(weight_shape, 2) * 0.3).unwrap()).unwrap();
    let bias_len = if weight_shape[0] == case.cin {
        weight_shape[1]
    } else {
        weight_shape[0]
    };
    let b = Var::from_tensor(&(values(&[bias_len], 3) * 0.1).unwrap()).unwrap();
    let want = reference(x.as_tensor(), w.as_tensor(), &b);
    let got = fast(x.as_tensor(), w.as_tensor(), &b);
    let what = format!(
        "b{} {}→{} {}×{} k{} s{} p{} {:?}",
        case.batch, case.cin, case.cout, case.h, case.w, case.k, case.stride, case.pad, case.act
    );
    close(&format!("{what} output"), &got, &want);
    let r = values(want.dims(), 4);
    let grads_want = (&want * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let grads_got = (&got * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, var) in [("input", &x), ("weight", &w), ("bias", &b)] {
        close(
            &format!("{what} {name} gradient"),
            grads_got.get(var).unwrap(),
            grads_want.get(var).unwrap(),
        );
    }
}

#[test]
fn conv2d_matches_candle_in_values_and_gradients() {
    for case in cases() {
        let (s, p, act) = (case.stride, case.pad, case.act);
        run_both(
            &case,
            &[case.cout, case.cin, case.k, case.k],
            |x, w, b| ops::conv2d(x, w, b, s, p, act).unwrap(),
            |x, w, b| {
                let y = x.conv2d(w, p, s, 1, 1).unwrap();
                let y = y.broadcast_add(&b.reshape((1, (), 1, 1)).unwrap()).unwrap();
                reference_activation(y, act)
            },
        );
    }
}

#[test]
fn conv_transpose2d_matches_candle_in_values_and_gradients() {
    for case in cases() {
        let (s, p, act) = (case.stride, case.pad, case.act);
        run_both(
            &case,
            &[case.cin, case.cout, case.k, case.k],
            |x, w, b| ops::conv_transpose2d(x, w, b, s, p, act).unwrap(),
            |x, w, b| {
                let y = x.conv_transpose2d(w, p, 0, s, 1).unwrap();
                let y = y.broadcast_add(&b.reshape((1, (), 1, 1)).unwrap()).unwrap();
                reference_activation(y, act)
            },
        );
    }
}

#[test]
fn ssim_loss_matches_the_candle_expression_in_value_and_gradient() {
    for (n, c, h, w) in [(1, 1, 11, 11), (7, 1, 23, 17), (2, 3, 16, 29)] {
        let target = ((values(&[n, c, h, w], 5) + 1.0).unwrap() * 0.5).unwrap();
        // A reconstruction near the target, as in training, and one far from it.
        for blend in [0.9, 0.2] {
            let noise = ((values(&[n, c, h, w], 6) + 1.0).unwrap() * 0.5).unwrap();
            let recon = ((&target * blend).unwrap() + (noise * (1.0 - blend)).unwrap()).unwrap();
            let x = Var::from_tensor(&recon).unwrap();
            let fast = vigil::kernels::ssim_loss::ssim_mean(x.as_tensor(), &target).unwrap();
            let reference = vigil::train::loss::ssim_mean(x.as_tensor(), &target).unwrap();
            let what = format!("{n}×{c}×{h}×{w} blend {blend}");
            close(&format!("{what} value"), &fast, &reference);
            let g_fast = fast.backward().unwrap();
            let g_ref = reference.backward().unwrap();
            close(
                &format!("{what} gradient"),
                g_fast.get(&x).unwrap(),
                g_ref.get(&x).unwrap(),
            );
        }
    }
}

/// Both architectures, grayscale and RGB: outputs and every parameter's gradient through
/// the loss with BatchNorm in training mode, the running statistics it updates, and the
/// inference-mode output with BatchNorm folded into the convolutions.
#[test]
fn whole_networks_agree_with_candle_forward_and_backward() {
    for (arch, c, size, batch) in [
        (Architecture::Bergmann { latent: 10 }, 1, 128, 2),
        (
            Architecture::Spatial {
                width: 4,
                bottleneck: 3,
            },
            3,
            40,
            7,
        ),
    ] {
        let mut net = Network::new_seeded(&arch, c, size, &Device::Cpu, 3).unwrap();
        let x = ((values(&[batch, c, size, size], 7) + 1.0).unwrap() * 0.5).unwrap();
        let run = |net: &mut Network, k: Kernels| {
            net.set_kernels(k);
            let y = net.autoencoder().unwrap().forward_t(&x, true).unwrap();
            let loss = LossKind::SsimL2.compute(&y, &x, k).unwrap();
            let grads = loss.backward().unwrap();
            let mut named: Vec<(String, Tensor)> = net
                .varmap
                .data()
                .lock()
                .unwrap()
                .iter()
                .filter_map(|(name, v)| grads.get(v).map(|g| (name.clone(), g.clone())))
                .collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            (y, loss, named)
        };
        let running = |net: &Network| -> Vec<(String, Vec<f32>)> {
            let mut v: Vec<(String, Vec<f32>)> = net
                .varmap
                .data()
                .lock()
                .unwrap()
                .iter()
                .filter(|(name, _)| name.contains("running_"))
                .map(|(name, var)| (name.clone(), var.as_tensor().to_vec1().unwrap()))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        let before = running(&net);
        let (y_fast, loss_fast, g_fast) = run(&mut net, Kernels::Fast);
        let after_fast = running(&net);
        let (y_ref, loss_ref, g_ref) = run(&mut net, Kernels::Candle);
        let after_ref = running(&net);
        // Each training forward moves a running statistic by momentum 0.1 towards the same
        // batch statistic b: r₁ = 0.9·r₀ + 0.1·b (fast), r₂ = 0.9·r₁ + 0.1·b (candle).
        for ((name, r0), ((_, r1), (_, r2))) in before.iter().zip(after_fast.iter().zip(&after_ref)) {
            for ((r0, r1), r2) in r0.iter().zip(r1).zip(r2) {
                let (fast_step, ref_step) = (r1 - 0.9 * r0, r2 - 0.9 * r1);
                assert!(
                    (fast_step - ref_step).abs() <= 1e-4 * ref_step.abs().max(1e-2),
                    "{arch:?} {name}: {fast_step} vs {ref_step}"
                );
            }
        }
        if matches!(arch, Architecture::Spatial { .. }) {
            assert!(!before.is_empty(), "the spatial network has BatchNorm layers");
        }
        // Inference mode: BatchNorm folded into the convolutions against candle's layers.
        net.set_kernels(Kernels::Fast);
        let eval_fast = net.autoencoder().unwrap().forward_t(&x, false).unwrap();
        net.set_kernels(Kernels::Candle);
        let eval_ref = net.autoencoder().unwrap().forward_t(&x, false).unwrap();
        close(&format!("{arch:?} inference output"), &eval_fast, &eval_ref);
        close(&format!("{arch:?} output"), &y_fast, &y_ref);
        close(&format!("{arch:?} loss"), &loss_fast, &loss_ref);
        assert_eq!(g_fast.len(), g_ref.len());
        assert!(g_fast.len() > 10, "every layer has gradients");
        let max_abs = |t: &Tensor| -> f32 {
            let t = t.to_dtype(DType::F32).unwrap();
            t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
        };
        let overall = g_ref.iter().map(|(_, g)| max_abs(g)).fold(0f32, f32::max);
        for ((name, a), (_, b)) in g_fast.iter().zip(&g_ref) {
            // Gradients pass through up to 18 layers, so each layer's rounding adds up:
            // 1e-3 relative. A bias followed by BatchNorm has a true gradient of zero (the
            // normalisation removes it), so both sides hold rounding noise; the floor at
            // 1e-5 of the largest gradient in the network covers that.
            let worst = max_abs(&(a - b).unwrap());
            let scale = max_abs(b);
            assert!(
                worst <= 1e-3 * scale + 1e-5 * overall,
                "{arch:?} {name}: {worst} against {scale}"
            );
        }
    }
}

/// Trains the same tiny model twice from the same seed, once on each kernel set: the
/// loss curves written to model.json must coincide.
#[test]
fn training_follows_the_same_loss_curve_with_either_kernels() {
    let data = common::dataset().to_str().unwrap().to_string();
    let curve = |kernels: &str| -> Vec<(usize, f32)> {
        let out = common::scratch().join(format!("curve-{kernels}"));
        let out = out.to_str().unwrap().to_string();
        let mut args = common::tiny_train_args(&data, &out);
        let steps = args.iter().position(|a| *a == "--steps").unwrap() + 1;
        args[steps] = "25";
        args.extend(["--kernels", kernels]);
        let o = common::run(&args);
        assert!(o.status.success(), "{}", common::stderr(&o));
        let card: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(format!("{out}/model.json")).unwrap()).unwrap();
        serde_json::from_value(card["training"]["loss_curve"].clone()).unwrap()
    };
    let fast = curve("fast");
    let reference = curve("candle");
    assert_eq!(fast.len(), 25);
    assert_eq!(fast.len(), reference.len());
    assert!(
        reference.last().unwrap().1 < reference[0].1,
        "the loss falls: {reference:?}"
    );
    for ((step, a), (_, b)) in fast.iter().zip(&reference) {
        assert!((a - b).abs() <= 1e-3 * b.abs(), "step {step}: {a} vs {b}");
    }
}

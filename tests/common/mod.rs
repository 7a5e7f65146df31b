//! Helpers shared by the integration tests: a tiny synthetic data set and a tiny model,
//! made once per test binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn vigil() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vigil"));
    c.env("RUST_LOG", "warn");
    c
}

/// Sends `signal` (as `kill` spells it: "-INT", "-TERM") to `child`.
pub fn send_signal(child: &std::process::Child, signal: &str) {
    let pid = child.id().to_string();
    assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success());
}

/// The PostgreSQL server of `VIGIL_TEST_POSTGRES_URL` (`.ci/run` starts one), or `None`
/// after saying that `test` is skipped.
pub fn postgres_url(test: &str) -> Option<String> {
    env_or_skip(test, "VIGIL_TEST_POSTGRES_URL", "PostgreSQL", "")
}

/// The TLS-only role of `VIGIL_TEST_POSTGRES_TLS_URL` (`.ci/run` makes one, with a CA of
/// its own named last as `sslrootcert`), or `None` after saying that `test` is skipped.
pub fn postgres_tls_url(test: &str) -> Option<String> {
    env_or_skip(
        test,
        "VIGIL_TEST_POSTGRES_TLS_URL",
        "PostgreSQL with TLS",
        "?sslmode=verify-full&sslrootcert=…",
    )
}

/// The role of `VIGIL_TEST_POSTGRES_CERT_URL` that the server lets in by its client
/// certificate alone (`.ci/run` makes one: `sslcert`, `sslkey`, then the CA as `sslrootcert`),
/// or `None` after saying that `test` is skipped.
pub fn postgres_cert_url(test: &str) -> Option<String> {
    env_or_skip(
        test,
        "VIGIL_TEST_POSTGRES_CERT_URL",
        "PostgreSQL with client certificates",
        "?sslmode=verify-full&sslcert=…&sslkey=…&sslrootcert=…",
    )
}

/// A TLS URL of [`postgres_tls_url`] without its `sslrootcert`: the server's certificate is
/// then signed by no root vigil trusts.
pub fn without_ca(tls_url: &str) -> &str {
    tls_url
        .split_once("&sslrootcert=")
        .expect("the URL names its CA last")
        .0
}

fn env_or_skip(test: &str, var: &str, what: &str, query: &str) -> Option<String> {
    let url = std::env::var(var).ok();
    if url.is_none() {
        // Written straight to the stream so the test harness's capture does not hide it.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: no {what} configured (set {var}=postgres://…{query}; .ci/run does)"
        );
    }
    url
}

pub fn run(args: &[&str]) -> Output {
    vigil().args(args).output().expect("vigil runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// `vigil inspect --model models/<model> models/default/samples`: one record per bundled
/// sample, as the command line writes them.
pub fn inspect_bundled_samples(model: &str) -> Vec<serde_json::Value> {
    let root = env!("CARGO_MANIFEST_DIR");
    let o = run(&[
        "inspect",
        "--model",
        &format!("{root}/models/{model}"),
        &format!("{root}/models/default/samples"),
    ]);
    assert!(o.status.success(), "{model}: {}", stderr(&o));
    stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The record of the image whose path ends with `name`.
pub fn record_for<'a>(records: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    records
        .iter()
        .find(|r| r["path"].as_str().unwrap().ends_with(name))
        .unwrap_or_else(|| panic!("{name} missing from the records"))
}

/// A directory that lives for the whole test binary.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir")).path()
}

/// A small synthetic MVTec-layout data set (64×64 images).
pub fn dataset() -> &'static Path {
    static DONE: OnceLock<PathBuf> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = scratch().join("data");
        vigil::synth::generate(
            &dir,
            &vigil::synth::SynthConfig {
                size: 64,
                train_good: 12,
                test_good: 4,
                test_defective: 2,
                seed: 1,
            },
        )
        .expect("synthetic data");
        dir
    })
}

/// Arguments that train a tiny model in about a second.
pub fn tiny_train_args<'a>(data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        data,
        "--out",
        out,
        "--size",
        "64",
        "--patch",
        "32",
        "--width",
        "4",
        "--bottleneck",
        "2",
        "--steps",
        "6",
        "--batch-size",
        "4",
        "--threads",
        "1",
    ]
}

/// A tiny trained model.
pub fn tiny_model() -> &'static Path {
    static DONE: OnceLock<PathBuf> = OnceLock::new();
    DONE.get_or_init(|| {
        let out = scratch().join("tiny-model");
        let data = dataset().to_str().unwrap().to_string();
        let o = run(&tiny_train_args(&data, out.to_str().unwrap()));
        assert!(o.status.success(), "training failed: {}", stderr(&o));
        out
    })
}

/// Copies a model artifact (`model.json` and `weights.safetensors`) into `dst`, created.
/// A model folder's `model.json`, as JSON.
pub fn read_card(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("model.json")).unwrap()).unwrap()
}

pub fn copy_model(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["model.json", "weights.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
}

/// Reconstructs every image as flat mid-grey: the error map then shows the input's structure.
pub struct Flat(pub candle_core::Device);
impl vigil::model::AnomalyModel for Flat {
    fn infer(&self, batch: &candle_core::Tensor) -> candle_core::Result<vigil::model::ModelOutput> {
        Ok(vigil::model::ModelOutput {
            reconstruction: (batch.ones_like()? * 0.5)?,
            learned_map: None,
            second_map: None,
        })
    }
    fn device(&self) -> &candle_core::Device {
        &self.0
    }
}

/// A model card for fake reconstructors: gray input, image threshold 0.5, pixel 0.3.
pub fn test_card(fit: vigil::model::artifact::Fit, working: usize, patch: usize) -> vigil::model::ModelCard {
    use vigil::model::artifact::{InputSpec, ScoreStats, Thresholds, TrainingSummary};
    vigil::model::ModelCard {
        schema_version: 1,
        vigil_version: "test".into(),
        architecture: vigil::model::Architecture::Spatial {
            width: 4,
            bottleneck: 2,
        },
        input: InputSpec {
            channels: 1,
            working_size: working,
            patch_size: patch,
            fit,
            normalisation: "unit-range".into(),
        },
        scoring: vigil::scoring::MapSpec {
            smoothing_sigma: 1.0,
            ..Default::default()
        },
        thresholds: Thresholds {
            image: 0.5,
            pixel: 0.3,
            method: "test".into(),
            quantile: 0.99,
            margin: 0.1,
            min_defect_area: 1,
            validation_images: 1,
            set_by: None,
            manual: false,
            level_scores: false,
        },
        validation_scores: ScoreStats::default(),
        training: TrainingSummary::default(),
        data_fingerprint: String::new(),
        weights_sha256: None,
    }
}

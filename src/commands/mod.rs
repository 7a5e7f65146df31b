//! The CLI's subcommands: argument structs in, work done through the library, exit codes out.

pub mod bench;
pub mod eval;
pub mod inspect;
pub mod train;

use std::path::Path;

use crate::cli::CalibrationArgs;
use crate::detector::Detector;
use crate::model::device::{self, DeviceChoice};
use crate::scoring::MapMethod;
use crate::train::CalibrationConfig;

impl CalibrationArgs {
    /// The calibration for a model whose anomaly map is made by `map`.
    pub fn config(&self, map: MapMethod) -> CalibrationConfig {
        CalibrationConfig {
            method: self.threshold_method,
            quantile: self.quantile,
            margin: self.margin.unwrap_or_else(|| CalibrationConfig::default_margin(map)),
            min_defect_area: self.min_defect_area,
        }
    }
}

/// Loads a model on the chosen device.
pub fn load_detector(dir: &Path, choice: DeviceChoice) -> anyhow::Result<Detector> {
    let device = device::select(choice)?;
    Ok(Detector::load(dir, &device)?)
}

/// `vigil calibrate`: new thresholds from good images, weights untouched.
pub fn calibrate(args: &crate::cli::CalibrateArgs) -> anyhow::Result<()> {
    use crate::train::{calibrate, dataset};
    let mut detector = load_detector(&args.model, args.device)?;
    let files = dataset::training_files(&args.data)?;
    let set = dataset::load_set(
        &args.data,
        &files,
        Some(detector.card.input.channels),
        detector.card.input.working_size,
    )?;
    let before = detector.card.thresholds.clone();
    let config = args.calibration.config(detector.card.scoring.method);
    calibrate::calibrate(&mut detector, &set.images, &config)?;
    detector.card.save(&args.model)?;
    let above = detector
        .card
        .validation_scores
        .values
        .iter()
        .filter(|&&v| v > before.image)
        .count();
    if above > 0 {
        tracing::warn!(
            "{above} of {} calibration images scored above the threshold before ({:.4}); after a change of light \
             or material that is expected, but if any of them shows a defect the new threshold will let such \
             defects through",
            set.images.len(),
            before.image
        );
    }
    let t = &detector.card.thresholds;
    println!(
        "calibrated on {} good image(s): image threshold {:.4} (was {:.4}), pixel threshold {:.4} (was {:.4}), method {}",
        set.images.len(),
        t.image,
        before.image,
        t.pixel,
        before.pixel,
        t.method
    );
    Ok(())
}

/// `vigil synth`.
pub fn synth(args: &crate::cli::SynthArgs) -> anyhow::Result<()> {
    let cfg = crate::synth::SynthConfig {
        size: args.size,
        train_good: args.train_good,
        test_good: args.test_good,
        test_defective: args.test_defective,
        seed: args.seed,
    };
    crate::synth::generate(&args.out, &cfg)?;
    println!("wrote a synthetic data set to {}", args.out.display());
    Ok(())
}

/// `vigil probe URL`: GET over plain HTTP/1.1; Ok when the status is 200.
pub fn probe(args: &crate::cli::ProbeArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let rest = args
        .url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("only http:// URLs"))?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let timeout = std::time::Duration::from_secs_f64(args.timeout);
    let url = &args.url;
    let addr = host
        .to_socket_addrs()
        .with_context(|| format!("{url}: cannot resolve {host}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{url}: cannot resolve {host}"))?;
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("{url}: cannot connect"))?;
    s.set_read_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).with_context(|| format!("{url}: no answer"))?;
    let status = String::from_utf8_lossy(&head[9..12]).to_string();
    anyhow::ensure!(status == "200", "{} answered {status}", args.url);
    Ok(())
}

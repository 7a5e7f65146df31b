//! vigil: learn what good parts look like, flag what cannot be reproduced.
//!
//! Data flows one way: image bytes → [`image_io`] → [`detector`] (fit to the network,
//! [`model`] reconstructs) → [`scoring`] (SSIM/L2 maps, smoothing, score, regions,
//! heatmap) → the caller (CLI, evaluation, server).

pub mod allocator;
pub mod api;
pub mod cli;
pub mod commands;
pub mod detector;
pub mod durable;
pub mod engine;
pub mod eval;
pub mod image_io;
pub mod jobs;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod npy;
pub mod registry;
pub mod scoring;
pub mod server;
pub mod storage;
pub mod synth;
pub mod telemetry;
pub mod train;

use std::process::ExitCode;

use clap::Parser;
use vigil::cli::{Cli, Command};
use vigil::commands;

fn main() -> ExitCode {
    vigil::allocator::keep_freed_memory();
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve(_)) {
        vigil::allocator::one_arena();
    }
    if let Some(n) = cli.threads {
        // Before any thread pool exists: candle and rayon both read this.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    vigil::telemetry::init(cli.json_logs);
    let threads = candle_core::utils::get_num_threads();
    let result = match &cli.command {
        Command::Serve(a) => vigil::server::serve(a),
        Command::Train(a) => commands::train::run(a, threads),
        Command::Inspect(a) => match commands::inspect::run(a) {
            Ok(0) => Ok(()),
            Ok(n) => {
                let text = format!("{n} image(s) or folder(s) could not be inspected (see their error objects)");
                if cli.json_logs {
                    tracing::warn!(failed = n, "{text}");
                } else {
                    eprintln!("{text}");
                }
                return ExitCode::from(1);
            }
            Err(e) => Err(e),
        },
        Command::Eval(a) => commands::eval::run(a),
        Command::Calibrate(a) => commands::calibrate(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Synth(a) => commands::synth(a),
        Command::Probe(a) => commands::probe(a),
    };
    // A container health check reads 1 as unhealthy; 2 is reserved there.
    let failed = ExitCode::from(if matches!(cli.command, Command::Probe(_)) { 1 } else { 2 });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e)
            if e.downcast_ref::<vigil::train::TrainError>()
                .is_some_and(|t| t.is_stop()) =>
        {
            // A log collector reading JSON lines gets it as one too.
            if cli.json_logs {
                tracing::warn!("{e}");
            } else {
                eprintln!("{e}");
            }
            ExitCode::from(130)
        }
        Err(e) if cli.json_logs => {
            // A log collector reading JSON lines gets the cause as one too.
            tracing::error!(error = error_chain(&e), "vigil stopped");
            failed
        }
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            failed
        }
    }
}

/// The error and its causes, joined by ": ", leaving out a cause whose text the message
/// before it already ends with (the library's errors name their source in their own
/// message, so `{:#}` would print it twice).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out == text || out.ends_with(&format!(": {text}")) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

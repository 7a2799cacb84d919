//! `adapterdrop-serve [--config PATH]`: serves the model repository over gRPC.

use std::path::PathBuf;
use std::process::ExitCode;

use adapterdrop_serve::config::Settings;
use adapterdrop_serve::server::App;
use clap::Parser;

#[derive(Parser)]
#[command(version, about = "gRPC server sharing AdapterDrop-dropped lower layers across adapter tasks")]
struct Cli {
    /// TOML configuration file; ADAPTERDROP__SECTION__KEY variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("adapterdrop-serve: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    adapterdrop_serve::telemetry::init(&settings.log);
    // Loading creates ONNX Runtime sessions: do it before the async runtime exists, never on a reactor thread.
    let result = App::load(settings).and_then(|app| {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
        runtime.block_on(async {
            let listener = app.bind().await?;
            app.serve(listener, shutdown_signal()).await
        })
    });
    match result {
        Ok(stopped) if stopped.drained => ExitCode::SUCCESS,
        // Requests were cut off: say so to the orchestrator, not only in the log.
        Ok(stopped) => {
            eprintln!("adapterdrop-serve: the shutdown grace period ran out with {} requests unanswered", stopped.abandoned);
            ExitCode::from(3)
        }
        Err(e) => {
            tracing::error!(error = %e, "start-up failed");
            eprintln!("adapterdrop-serve: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutdown requested");
}

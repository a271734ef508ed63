//! `unitsync`: runs the hub (`unitsync serve`) or talks to one as an operator.

use std::process::ExitCode;

use clap::Parser;
use unitsync_hub::cli::{Cli, Command, LogFormat};
use unitsync_hub::error::ErrorChain;

/// Exit code for bad configuration (EX_USAGE).
const EX_USAGE: u8 = 64;

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("UNITSYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_logs(args.log_format);
            let config = match args.config().and_then(|c| c.validate().map(|()| c)) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {}", ErrorChain(&e));
                    return ExitCode::from(EX_USAGE);
                }
            };
            let hub = match unitsync_hub::start(config).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(error = %ErrorChain(&e), "hub failed to start");
                    return ExitCode::FAILURE;
                }
            };
            let stop = hub.shutdown_token();
            tokio::spawn(async move {
                shutdown_signal().await;
                tracing::info!("shutting down");
                stop.cancel();
            });
            hub.wait().await;
            ExitCode::SUCCESS
        }
        command => match unitsync_hub::cli::run_client(&cli.global, command).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => {}
    }
}

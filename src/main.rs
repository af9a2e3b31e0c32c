//! The kvinject binary: see the library for what it does.

use clap::Parser;
use kvinject::{access, app, config, telemetry};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    // One crypto provider for the whole process: rustls on aws-lc-rs (no ring, no openssl).
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let cli = config::Cli::parse();
    let _log = telemetry::init(&cli.log);
    match cli.command {
        config::Command::Serve(args) => app::serve(args.validate()?).await.map(|()| ExitCode::SUCCESS),
        config::Command::Certs(args) => kvinject::certs::cli::run(args).map(|()| ExitCode::SUCCESS),
        config::Command::Access {
            command: config::AccessCommand::Check(args),
        } => {
            // 0 allowed, 1 denied, 2 could not decide.
            Ok(match access::cli::check(&args).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            })
        }
        config::Command::Lint(args) => Ok(match kvinject::lint::cli::run(&args).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        }),
        config::Command::Crd => {
            access::cli::crd();
            Ok(ExitCode::SUCCESS)
        }
    }
}

//! The kvinject binary: see the library for what it does.

use clap::Parser;
use kvinject::{app, config, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One crypto provider for the whole process: rustls on aws-lc-rs (no ring, no openssl).
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let cli = config::Cli::parse();
    telemetry::init(&cli.log);
    match cli.command {
        config::Command::Serve(args) => app::serve(args.validate()?).await,
        config::Command::Certs(args) => kvinject::certs::cli::run(args),
    }
}

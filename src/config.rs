//! Command line and environment: every flag has an `env=`, and `validate` turns the raw
//! arguments into a plain `ServeConfig` that tests can also build directly.

use clap::{Args, Parser, Subcommand};
use std::{net::SocketAddr, path::PathBuf, time::Duration};

#[derive(Parser, Debug)]
#[command(name = "kvinject", version, about = "Azure Key Vault secrets for Kubernetes pods, GitOps-safe")]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax); RUST_LOG wins when set.
    #[arg(long, env = "KVINJECT_LOG", default_value = "info", global = true)]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the mutating admission webhook (TLS) and the admin port (plaintext).
    Serve(ServeArgs),
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Address of the webhook's TLS listener.
    #[arg(long, env = "KVINJECT_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Address of the plaintext admin listener (/livez, /readyz, /metrics).
    #[arg(long, env = "KVINJECT_ADMIN_LISTEN", default_value = "0.0.0.0:8080")]
    pub admin_listen: SocketAddr,
}

#[derive(Args, Debug)]
pub struct TlsArgs {
    /// PEM certificate chain of the webhook's serving certificate.
    #[arg(long, env = "KVINJECT_TLS_CERT", default_value = "/etc/kvinject/tls/tls.crt")]
    pub tls_cert: PathBuf,
    /// PEM private key of the webhook's serving certificate.
    #[arg(long, env = "KVINJECT_TLS_KEY", default_value = "/etc/kvinject/tls/tls.key")]
    pub tls_key: PathBuf,
    /// How often the certificate files are re-read (they are swapped in when they change).
    #[arg(long, env = "KVINJECT_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
}

/// Validated configuration for `kvinject serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub tls_reload_interval: Duration,
}

impl ServeArgs {
    pub fn validate(self) -> anyhow::Result<ServeConfig> {
        Ok(ServeConfig {
            listen: self.listen,
            admin_listen: self.admin_listen,
            tls_cert: self.tls.tls_cert,
            tls_key: self.tls.tls_key,
            tls_reload_interval: self.tls.tls_reload_interval,
        })
    }
}

/// Parses `30s`, `10m`, `2h`, `500ms` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a duration like 30s, 10m or 1h"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("`{s}` has an unknown unit `{unit}`; use ms, s, m or h")),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (input, want) in [("30s", Some(30)), ("10m", Some(600)), ("1h", Some(3600)), ("45", Some(45)), ("", None), ("5d", None), ("m", None), ("-1s", None)] {
            assert_eq!(parse_duration(input).ok().map(|d| d.as_secs()), want, "input {input:?}");
        }
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    }
}

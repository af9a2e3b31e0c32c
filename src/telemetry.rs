//! JSON logs on stderr, filtered by RUST_LOG or --log.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_writer(std::io::stderr),
        )
        .init();
}

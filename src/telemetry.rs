//! JSON logs on stderr, filtered by RUST_LOG or --log.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Installs the subscriber. Lines are written by a thread of their own, so a request never
/// waits on stderr; none is dropped (a full queue, 128k lines, makes the writer wait). Keep
/// the guard alive until the process ends: dropping it flushes what is queued.
pub fn init(default_filter: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("kvinject-log")
        .finish(std::io::stderr());
    tracing_subscriber::registry()
        .with(filter)
        .with(
            fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(true)
                // The current span's fields once ("span"), not again in a list of all spans.
                .with_span_list(false)
                .with_writer(writer),
        )
        .init();
    guard
}

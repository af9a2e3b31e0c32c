//! JSON logs on stderr, filtered by RUST_LOG or --log.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Lines the log queue holds before a writer waits for the log thread.
const QUEUED_LINES: usize = 8192;

/// Bytes the log thread gathers before a `write` (fewer when the queue empties first).
const LOG_BUFFER: usize = 64 * 1024;

/// Installs the subscriber. Lines are written by a thread of their own, so a request never
/// waits on stderr; none is dropped (a full queue makes the writer wait). Keep the guard
/// alive until the process ends: dropping it flushes what is queued.
///
/// The queue holds `QUEUED_LINES`. Its slots are allocated, and touched, up front: the
/// library's default of 128k lines cost 4 MiB of resident memory, for bursts kvinject does
/// not make (it writes one line per admission).
///
/// The log thread writes through a buffer that it flushes each time it has emptied the
/// queue: lines queued together go out in one `write`, and none waits in the buffer once
/// the queue is empty. Writing each line with its own `write` took a tenth of the CPU time
/// of warm admissions at full load (docs, contributors/benchmarks.md, "Warm admissions against a no-op webhook").
pub fn init(default_filter: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("kvinject-log")
        .finish(std::io::BufWriter::with_capacity(LOG_BUFFER, std::io::stderr()));
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

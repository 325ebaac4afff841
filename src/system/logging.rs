//! Logs go to journald when the process is connected to the journal (as a systemd service),
//! otherwise to stderr in readable lines. `RUST_LOG` overrides the configured level.
//!
//! The engine's own log lines are not passed on (they describe front-door connections in the
//! engine's terms), except one: a subscriber skipped ahead in a filter's log, i.e. messages were
//! lost. That is counted in [`engine_skips`] and reported once per burst.

use log::{LevelFilter, Log, Metadata, Record};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

static ENGINE_SKIPS: AtomicU64 = AtomicU64::new(0);

/// How often the engine skipped a slow subscriber past messages it no longer held.
pub fn engine_skips() -> u64 {
    ENGINE_SKIPS.load(Ordering::Relaxed)
}

struct Gateway {
    inner: Box<dyn Log>,
    level: LevelFilter,
    last_skip_report: Mutex<Option<Instant>>,
}

impl Log for Gateway {
    fn enabled(&self, m: &Metadata) -> bool {
        m.target().starts_with("rumqttd") || self.inner.enabled(m)
    }

    fn log(&self, r: &Record) {
        if !r.target().starts_with("rumqttd") {
            if r.level() <= self.level && r.target() != "tracing::span" {
                self.inner.log(r);
            }
            return;
        }
        if r.level() <= log::Level::Warn && r.args().to_string().contains("jumping to head") {
            ENGINE_SKIPS.fetch_add(1, Ordering::Relaxed);
            let mut last = self.last_skip_report.lock().expect("log lock");
            if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                *last = Some(Instant::now());
                log::warn!(
                    "a subscriber fell behind by more than broker.limits.filter_log and skipped the oldest \
                     messages of its filter ({} times so far)",
                    engine_skips()
                );
            }
        }
    }

    fn flush(&self) {
        self.inner.flush()
    }
}

pub fn init(level: LevelFilter) {
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(level);
    let inner: Box<dyn Log> = match systemd_journal_logger::JournalLog::new() {
        Ok(j) if systemd_journal_logger::connected_to_journal() => Box::new(j.with_syslog_identifier("outpost".into())),
        _ => {
            let mut b = env_logger::Builder::new();
            b.filter_level(level);
            b.filter_module("tracing::span", LevelFilter::Off);
            b.filter_module("rumqttc", LevelFilter::Warn);
            if let Ok(spec) = std::env::var("RUST_LOG") {
                b.parse_filters(&spec);
            }
            b.format_timestamp_millis();
            Box::new(b.build())
        }
    };
    if log::set_boxed_logger(Box::new(Gateway {
        inner,
        level,
        last_skip_report: Mutex::new(None),
    }))
    .is_ok()
    {
        // The engine's warnings must reach the filter above even at level `error`.
        log::set_max_level(level.max(LevelFilter::Warn));
    }
}

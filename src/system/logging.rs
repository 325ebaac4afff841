//! Logs go to journald when the process is connected to the journal (as a systemd service),
//! otherwise to stderr in readable lines. `RUST_LOG` overrides the configured level.

use log::{LevelFilter, Log, Metadata, Record};

struct Gateway {
    inner: Box<dyn Log>,
    level: LevelFilter,
}

impl Log for Gateway {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= self.level && self.inner.enabled(m)
    }

    fn log(&self, r: &Record) {
        if r.level() <= self.level && r.target() != "tracing::span" {
            self.inner.log(r);
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
    if log::set_boxed_logger(Box::new(Gateway { inner, level })).is_ok() {
        log::set_max_level(level);
    }
}

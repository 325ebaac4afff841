//! Logs go to journald when the process is connected to the journal (as a systemd service),
//! otherwise to stderr in readable lines. `RUST_LOG` overrides the configured level.

use log::LevelFilter;

pub fn init(level: LevelFilter) {
    // rumqttd logs every refused or dropped engine connection at error level; those are the
    // front door's business and it logs them itself.
    let quiet = [
        ("rumqttd", LevelFilter::Off),
        ("tracing::span", LevelFilter::Off),
        ("rumqttc", LevelFilter::Warn),
    ];
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(logger) = systemd_journal_logger::JournalLog::new() {
            let logger = logger.with_syslog_identifier("outpost".into());
            if logger.install().is_ok() {
                let level = std::env::var("RUST_LOG")
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(level);
                log::set_max_level(level);
                return;
            }
        }
    }
    let mut b = env_logger::Builder::new();
    b.filter_level(level);
    for (m, l) in quiet {
        b.filter_module(m, l);
    }
    if let Ok(spec) = std::env::var("RUST_LOG") {
        b.parse_filters(&spec);
    }
    b.format_timestamp_millis();
    let _ = b.try_init();
}

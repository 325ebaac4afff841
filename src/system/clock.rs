//! The wall clock: the one place the daemon reads the time since the epoch (`now_ms`,
//! `now_secs`, `now_ns`), and whether the system clock is synchronized (NTP), which the
//! mqtt-e2e time window needs.
//!
//! The kernel keeps the answer (its STA_UNSYNC flag) behind one interface only: `adjtimex`
//! (or `clock_adjtime`). Reading with modes = 0 needs no privilege, but both calls are in
//! systemd's `@clock` group, which `@system-service` leaves out and `ProtectClock=` refuses, and
//! snapd's default filter has neither. A filter that kills on refusal kills the daemon for a
//! read. So the kernel is asked only when no seccomp filter is loaded; under one (our unit, a
//! snap), the answer comes from what a time daemon leaves readable, or is "cannot tell".

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long after the epoch `t` is; zero for a time before it (a clock set far back).
pub fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Milliseconds since the epoch: message expiry, spool timestamps, contact times.
pub fn now_ms() -> i64 {
    since_epoch(SystemTime::now()).as_millis() as i64
}

/// Seconds since the epoch: grants, keystore dates, status documents.
pub fn now_secs() -> u64 {
    since_epoch(SystemTime::now()).as_secs()
}

/// Nanoseconds since the epoch: the mqtt-e2e timestamps.
pub fn now_ns() -> i64 {
    since_epoch(SystemTime::now()).as_nanos() as i64
}

/// `Some(true)` synchronized, `Some(false)` not, `None` the system will not say here.
pub fn synchronized() -> Option<bool> {
    // systemd-timesyncd creates this once it has synchronized (readable under ProtectSystem=).
    if Path::new("/run/systemd/timesync/synchronized").exists() {
        return Some(true);
    }
    if under_seccomp().unwrap_or(true) {
        return None;
    }
    // SAFETY: adjtimex with modes = 0 only reads the kernel's clock state into `t`.
    let mut t: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut t) };
    (state >= 0).then_some(state != libc::TIME_ERROR)
}

/// Whether this process runs under a seccomp filter (`Seccomp: 2` in /proc/self/status);
/// `None` when /proc does not say.
pub fn under_seccomp() -> Option<bool> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .map(|v| v.trim() != "0")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_test_process_has_no_filter_and_gets_an_answer() {
        // cargo test runs without seccomp here; the answer may be either, but not "cannot tell".
        if super::under_seccomp() == Some(false) {
            assert!(super::synchronized().is_some());
        }
    }
}

//! Devices with their own identity: the keystore (`outpost devices ...`), their MQTT logins and
//! ACLs in the front door, and the service that turns their mqtt-e2e packets into plaintext
//! under `devices/<id>/...` and local commands into packets for them.

pub mod cli;
pub mod e2e;
pub mod keystore;
pub mod service;

/// Whether the kernel thinks the system clock is synchronized (NTP). The e2e time window
/// needs a good clock.
/// `None` when the system will not say (systemd's `ProtectClock=` denies even the read).
pub fn clock_synchronized() -> Option<bool> {
    if std::path::Path::new("/run/systemd/timesync/synchronized").exists() {
        return Some(true);
    }
    // SAFETY: adjtimex with modes = 0 only reads the kernel's clock state into `t`.
    let mut t: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut t) };
    (state >= 0).then_some(state != libc::TIME_ERROR)
}

//! The daemon's contact with the operating system: logging (journald or stderr), systemd
//! readiness and watchdog notifications, and signals.

pub mod clock;
pub mod fds;
pub mod health;
pub mod jsonfile;
pub mod logging;
pub mod memory;
pub mod notify;
pub mod revert;
pub mod snap;
pub mod sqlite;

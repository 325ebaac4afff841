//! Devices with their own identity: the keystore (`outpost devices ...`), their MQTT logins and
//! ACLs in the front door, and the service that turns their mqtt-e2e packets into plaintext
//! under `devices/<id>/...` and local commands into packets for them.

pub mod cli;
pub mod e2e;
pub mod keystore;
pub mod service;

/// Whether the system clock is synchronized (NTP): the e2e time window needs a good clock.
pub use crate::system::clock::synchronized as clock_synchronized;

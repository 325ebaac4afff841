//! The broker's counters: what a user checks when something goes wrong (refusals, denials,
//! malformed packets). Plain atomics, shared by every connection.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default, Debug)]
pub struct Metrics {
    /// Clients connected now (after CONNACK).
    pub connections: AtomicU64,
    pub connections_total: AtomicU64,
    /// CONNECTs refused (bad credentials, client id, limits, unsupported protocol).
    pub connects_refused: AtomicU64,
    /// Sockets closed before CONNECT: handshake timeouts and failures.
    pub handshakes_failed: AtomicU64,
    pub publishes_in: AtomicU64,
    /// PUBLISH packets delivered to clients.
    pub publishes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub publish_denied: AtomicU64,
    pub subscribe_denied: AtomicU64,
    /// Connections closed for a malformed or protocol-violating packet.
    pub malformed_packets: AtomicU64,
    /// Connections closed for a packet over `max_packet_size`.
    pub oversized_packets: AtomicU64,
    /// WebSocket connections closed for their framing: text frames, protocol errors, frames
    /// over the size limit, pings whose pongs the peer does not read (`broker::websocket`).
    pub websocket_violations: AtomicU64,
    /// Connections closed for exceeding `max_inflight`.
    pub inflight_exceeded: AtomicU64,
    /// Sockets still logging in that were closed to make room for a newer one (all pre-login
    /// slots taken: a slowloris attack, or a burst).
    pub prelogin_evicted: AtomicU64,
    /// Logins refused without a password check while their source or user was in back-off.
    pub logins_throttled: AtomicU64,
    /// Password hashes checked (argon2): a wrong password, an unknown user and a device's wrong
    /// password each cost one, so the time of a refusal tells no one which names exist.
    pub password_checks: AtomicU64,
    /// QoS 1/2 publishes not acknowledged because a copy could not be kept (a full disk):
    /// refused with 0x97 (MQTT 5), or the connection closed unacknowledged (3.1.1).
    pub publishes_not_kept: AtomicU64,
    /// Connections ended by a bug (a panic caught in their task); the rest carry on.
    pub session_panics: AtomicU64,
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    /// All counters, for the status document (`outpost status`, `/metrics`); `delivery_denied`
    /// is the router's and left at 0 here.
    pub fn snapshot(&self) -> crate::status_doc::BrokerCounters {
        let g = Metrics::get;
        crate::status_doc::BrokerCounters {
            connections: g(&self.connections),
            connections_total: g(&self.connections_total),
            connects_refused: g(&self.connects_refused),
            handshakes_failed: g(&self.handshakes_failed),
            publishes_in: g(&self.publishes_in),
            publishes_out: g(&self.publishes_out),
            bytes_in: g(&self.bytes_in),
            bytes_out: g(&self.bytes_out),
            publish_denied: g(&self.publish_denied),
            subscribe_denied: g(&self.subscribe_denied),
            malformed_packets: g(&self.malformed_packets),
            oversized_packets: g(&self.oversized_packets),
            inflight_exceeded: g(&self.inflight_exceeded),
            websocket_violations: g(&self.websocket_violations),
            session_panics: g(&self.session_panics),
            publishes_not_kept: g(&self.publishes_not_kept),
            logins_throttled: g(&self.logins_throttled),
            prelogin_evicted: g(&self.prelogin_evicted),
            password_checks: g(&self.password_checks),
            delivery_denied: 0,
        }
    }
}

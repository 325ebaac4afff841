//! Which of a bridge's upstream addresses (`urls`, primary first) to connect to next, and when:
//! after a failure the next address at once, the backoff only once a whole round failed in a
//! row (then the primary first again, unless `round_robin`), and back to the primary once a TCP
//! probe has seen it up for `fail_back_after`. The decisions are plain logic over counters;
//! `probe_primary` is the one part that touches the network. The packet ids of QoS 2 messages
//! stay with the address they were given on: the spool keys them by the address handed out
//! here (`Spool::session`).

use std::time::{Duration, Instant};

/// A session that lasted this long resets the backoff.
pub const STABLE: Duration = Duration::from_secs(10);

/// What comes after a failed connection (or a session that broke).
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// An address of this round is still untried: connect to it at once.
    AtOnce,
    /// Every address failed in a row: wait the backoff first.
    Backoff,
}

/// A connection just made, against the one made before it.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The first since the bridge started.
    First,
    /// A reconnection to the same address.
    Again,
    /// A reconnection to another address (a failover, or the fail back).
    Moved,
}

/// The failover state of one bridge's run.
#[derive(Debug)]
pub struct Failover {
    urls: Vec<String>,
    round_robin: bool,
    /// The address in use, or to try next.
    at: usize,
    /// Failed connections in a row since the last one made.
    failed_in_row: usize,
    /// The address of the last connection made.
    last_connected: Option<usize>,
    /// Backoffs since the last stable session, fail back or admin restart: each doubles the
    /// wait's cap.
    attempt: u32,
}

impl Failover {
    /// `urls` must not be empty (the config has at least `url`).
    pub fn new(urls: Vec<String>, round_robin: bool) -> Failover {
        assert!(!urls.is_empty(), "a bridge has at least one address");
        Failover {
            urls,
            round_robin,
            at: 0,
            failed_in_row: 0,
            last_connected: None,
            attempt: 0,
        }
    }

    /// The address to connect to.
    pub fn url(&self) -> &str {
        &self.urls[self.at]
    }

    /// A connection to `url()` was made: the round starts over.
    pub fn connected(&mut self) -> Arrival {
        self.failed_in_row = 0;
        let arrival = match self.last_connected {
            None => Arrival::First,
            Some(l) if l == self.at => Arrival::Again,
            Some(_) => Arrival::Moved,
        };
        self.last_connected = Some(self.at);
        arrival
    }

    /// The connection to `url()` failed or broke: moves on to the next address.
    pub fn failed(&mut self) -> Next {
        let n = self.urls.len();
        self.failed_in_row += 1;
        self.at = (self.at + 1) % n;
        if self.failed_in_row < n {
            return Next::AtOnce;
        }
        self.failed_in_row = 0;
        if !self.round_robin {
            self.at = 0;
        }
        Next::Backoff
    }

    /// The cap of the next backoff (the wait is jittered below it): `min` doubled once per
    /// backoff since the last reset, at most `max`.
    pub fn backoff(&mut self, min: Duration, max: Duration) -> Duration {
        let cap = max.min(min.saturating_mul(1u32 << self.attempt.min(20)));
        self.attempt += 1;
        cap
    }

    /// The next backoff starts from `min` again.
    pub fn reset_backoff(&mut self) {
        self.attempt = 0;
    }

    /// A session ended after `lasted`: a stable one resets the backoff.
    pub fn ended(&mut self, lasted: Duration) {
        if lasted >= STABLE {
            self.reset_backoff();
        }
    }

    /// The primary is back: connect to it next.
    pub fn fail_back(&mut self) {
        self.at = 0;
    }

    /// The primary's address while connected elsewhere and not round robin: the one to probe
    /// for the fail back.
    pub fn primary_to_watch(&self) -> Option<&str> {
        (self.at != 0 && !self.round_robin).then(|| self.urls[0].as_str())
    }
}

/// How long the primary has answered the probes, without a miss.
#[derive(Default)]
struct Uptime {
    since: Option<Instant>,
}

impl Uptime {
    /// After a probe at `now` that found the primary `up` or not: true once it has been up for
    /// `needed`.
    fn probed(&mut self, up: bool, now: Instant, needed: Duration) -> bool {
        if !up {
            self.since = None;
            return false;
        }
        now.duration_since(*self.since.get_or_insert(now)) >= needed
    }
}

/// Sends on `back` once the primary has accepted TCP connections for `needed`, probed every
/// `every` (the bridge's session elsewhere goes on meanwhile).
pub async fn probe_primary(url: String, every: Duration, needed: Duration, back: tokio::sync::oneshot::Sender<()>) {
    let Ok(ep) = crate::config::Endpoint::parse(&url) else {
        return;
    };
    let mut uptime = Uptime::default();
    loop {
        tokio::time::sleep(every).await;
        let reachable = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((ep.host.as_str(), ep.port)),
        )
        .await
        .is_ok_and(|c| c.is_ok());
        if uptime.probed(reachable, Instant::now(), needed) {
            let _ = back.send(());
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three(round_robin: bool) -> Failover {
        Failover::new(
            vec!["mqtt://a".into(), "mqtt://b".into(), "mqtt://c".into()],
            round_robin,
        )
    }

    #[test]
    fn each_address_is_tried_at_once_and_the_backoff_comes_after_a_whole_round() {
        let mut f = three(false);
        assert_eq!(f.url(), "mqtt://a");
        assert_eq!(f.failed(), Next::AtOnce);
        assert_eq!(f.url(), "mqtt://b");
        assert_eq!(f.failed(), Next::AtOnce);
        assert_eq!(f.url(), "mqtt://c");
        assert_eq!(f.failed(), Next::Backoff);
        // The primary first again, and a new round.
        assert_eq!(f.url(), "mqtt://a");
        assert_eq!(f.failed(), Next::AtOnce);
    }

    #[test]
    fn round_robin_goes_on_from_where_it_failed() {
        let mut f = three(true);
        f.failed();
        f.failed();
        assert_eq!(f.failed(), Next::Backoff);
        assert_eq!(f.url(), "mqtt://a");
        f.failed();
        assert_eq!(f.connected(), Arrival::First);
        assert_eq!(f.url(), "mqtt://b");
        // A broken session moves on too, and the round counts from the connection.
        assert_eq!(f.failed(), Next::AtOnce);
        assert_eq!(f.url(), "mqtt://c");
        assert_eq!(f.failed(), Next::AtOnce);
        assert_eq!(f.failed(), Next::Backoff);
        assert_eq!(f.url(), "mqtt://b", "round robin stays where the round ended");
        // Never probes a primary.
        assert_eq!(f.primary_to_watch(), None);
    }

    #[test]
    fn a_single_address_backs_off_at_every_failure() {
        let mut f = Failover::new(vec!["mqtt://a".into()], false);
        assert_eq!(f.failed(), Next::Backoff);
        assert_eq!(f.failed(), Next::Backoff);
        assert_eq!(f.url(), "mqtt://a");
        assert_eq!(f.primary_to_watch(), None);
    }

    #[test]
    fn a_connection_elsewhere_is_a_move_and_watches_the_primary_until_the_fail_back() {
        let mut f = three(false);
        assert_eq!(f.connected(), Arrival::First);
        assert_eq!(f.primary_to_watch(), None);
        assert_eq!(f.failed(), Next::AtOnce);
        assert_eq!(f.connected(), Arrival::Moved);
        assert_eq!(f.url(), "mqtt://b");
        assert_eq!(f.primary_to_watch(), Some("mqtt://a"));
        // A kick reconnects to the same address.
        assert_eq!(f.connected(), Arrival::Again);
        f.fail_back();
        assert_eq!(f.url(), "mqtt://a");
        assert_eq!(f.connected(), Arrival::Moved);
        assert_eq!(f.primary_to_watch(), None);
    }

    #[test]
    fn a_connection_starts_the_round_over() {
        let mut f = three(false);
        f.failed();
        f.failed();
        f.connected();
        assert_eq!(f.url(), "mqtt://c");
        assert_eq!(f.failed(), Next::AtOnce);
        assert_eq!(f.failed(), Next::AtOnce);
        assert_eq!(f.failed(), Next::Backoff);
    }

    #[test]
    fn the_backoff_doubles_to_its_max_and_resets_after_a_stable_session() {
        let (min, max) = (Duration::from_millis(500), Duration::from_secs(60));
        let mut f = three(false);
        let caps: Vec<u64> = (0..10).map(|_| f.backoff(min, max).as_millis() as u64).collect();
        assert_eq!(caps, [500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]);
        f.ended(STABLE - Duration::from_millis(1));
        assert_eq!(f.backoff(min, max), max);
        f.ended(STABLE);
        assert_eq!(f.backoff(min, max), min);
        f.reset_backoff();
        assert_eq!(f.backoff(min, max), min);
        // Many backoffs never overflow.
        for _ in 0..100 {
            f.backoff(min, max);
        }
        assert_eq!(f.backoff(min, max), max);
    }

    #[test]
    fn the_primary_counts_as_back_after_it_answered_for_long_enough_without_a_miss() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let needed = Duration::from_secs(10);
        let mut u = Uptime::default();
        assert!(!u.probed(true, at(0), needed));
        assert!(!u.probed(true, at(5), needed));
        // A miss starts over.
        assert!(!u.probed(false, at(10), needed));
        assert!(!u.probed(true, at(15), needed));
        assert!(!u.probed(true, at(20), needed));
        assert!(u.probed(true, at(25), needed));
    }
}

//! The mqtt-e2e wire format (pkarsy/toit-mqtt-e2e, whose code is the reference), so devices can
//! talk through brokers nobody trusts:
//!
//! ```text
//! payload = ts_ns (8, i64 BE) | rnd (4) | AES-128-GCM(key, nonce = ts_ns|rnd, aad)(plain) | tag (16)
//! plain   = version 0x01 | len (u16 BE) | message | zero padding up to `pad` message bytes
//! ```
//! A receiver checks, in this order: size, replay (the 12-byte nonce among recent ones), the
//! time window, the tag, the version, the length.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes128Gcm, KeyInit, Nonce};
use base64::Engine as _;
use std::collections::VecDeque;

pub const VERSION: u8 = 1;
/// The library's default additional authenticated data.
pub const DEFAULT_AAD: &[u8] = b"1234567812345678";
/// Nonce (12) + version and length (3) + tag (16).
pub const OVERHEAD: usize = 31;
/// Most nonces a receiver remembers. Nonces are kept for the whole time window (so a replay
/// within the window is always caught, where the library keeps only its last 10), up to this.
pub const RECENT: usize = 4096;

pub type Key = [u8; 16];

/// Why a packet was refused; each is counted per device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reject {
    TooLarge,
    BadLength,
    Replay,
    Stale,
    BadTag,
    BadVersion,
}

impl Reject {
    pub fn name(self) -> &'static str {
        match self {
            Reject::TooLarge => "too_large",
            Reject::BadLength => "bad_length",
            Reject::Replay => "replay",
            Reject::Stale => "stale",
            Reject::BadTag => "bad_tag",
            Reject::BadVersion => "bad_version",
        }
    }
}

/// Encrypts and decrypts with one key.
#[derive(Clone)]
pub struct Codec {
    cipher: Aes128Gcm,
    aad: Vec<u8>,
    pad: usize,
}

impl Codec {
    pub fn new(key: &Key, aad: &[u8], pad: usize) -> Codec {
        Codec {
            cipher: Aes128Gcm::new(key.into()),
            aad: aad.to_vec(),
            pad,
        }
    }

    /// One packet for `msg` (at most 65535 bytes), with the given time and random nonce part.
    pub fn encode(&self, ts_ns: i64, rnd: [u8; 4], msg: &[u8]) -> Vec<u8> {
        let len = msg.len().min(u16::MAX as usize);
        let mut plain = Vec::with_capacity(3 + len.max(self.pad));
        plain.push(VERSION);
        plain.extend_from_slice(&(len as u16).to_be_bytes());
        plain.extend_from_slice(&msg[..len]);
        plain.resize(3 + len.max(self.pad), 0);
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&ts_ns.to_be_bytes());
        nonce[8..].copy_from_slice(&rnd);
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &self.aad,
                },
            )
            .expect("AES-GCM encryption of a bounded message");
        let mut out = Vec::with_capacity(12 + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// A packet sent now, with a random nonce part.
    pub fn seal(&self, msg: &[u8]) -> Vec<u8> {
        self.encode(now_ns(), rand::random(), msg)
    }

    /// Decrypts and checks version and length (no replay or time checks: see [`Receiver`]).
    pub fn open(&self, packet: &[u8]) -> Result<Vec<u8>, Reject> {
        if packet.len() < OVERHEAD {
            return Err(Reject::BadLength);
        }
        let plain = self
            .cipher
            .decrypt(
                Nonce::from_slice(&packet[..12]),
                Payload {
                    msg: &packet[12..],
                    aad: &self.aad,
                },
            )
            .map_err(|_| Reject::BadTag)?;
        if plain[0] != VERSION {
            return Err(Reject::BadVersion);
        }
        let len = u16::from_be_bytes([plain[1], plain[2]]) as usize;
        if len > plain.len() - 3 {
            return Err(Reject::BadLength);
        }
        Ok(plain[3..3 + len].to_vec())
    }
}

/// The wall clock in the unit the codec takes (here for the tests and benches that call it).
pub use crate::system::clock::now_ns;

/// Receives from one peer: replay and time-window checks in the library's order.
pub struct Receiver {
    codec: Codec,
    window_ns: i64,
    max_packet: usize,
    /// Nonces seen (or sent), with their timestamps, in arrival order; `seen` is the same set,
    /// for lookups.
    recent: VecDeque<([u8; 12], i64)>,
    seen: std::collections::HashSet<[u8; 12]>,
}

impl Receiver {
    pub fn new(codec: Codec, window: std::time::Duration, max_packet: usize) -> Receiver {
        Receiver {
            codec,
            window_ns: window.as_nanos() as i64,
            max_packet,
            recent: VecDeque::new(),
            seen: Default::default(),
        }
    }

    pub fn receive(&mut self, packet: &[u8], now_ns: i64) -> Result<Vec<u8>, Reject> {
        if packet.len() > self.max_packet {
            return Err(Reject::TooLarge);
        }
        if packet.len() < OVERHEAD {
            return Err(Reject::BadLength);
        }
        let nonce: [u8; 12] = packet[..12].try_into().expect("length checked");
        if self.seen.contains(&nonce) {
            return Err(Reject::Replay);
        }
        let ts = i64::from_be_bytes(packet[..8].try_into().expect("length checked"));
        let diff = now_ns.saturating_sub(ts);
        if diff > self.window_ns || diff < -self.window_ns {
            return Err(Reject::Stale);
        }
        let msg = self.codec.open(packet)?;
        self.remember(nonce);
        Ok(msg)
    }

    /// Records a nonce this side sent, so an echo of it is refused as a replay.
    pub fn remember(&mut self, nonce: [u8; 12]) {
        let ts = i64::from_be_bytes(nonce[..8].try_into().expect("12-byte nonce"));
        // Older than the window: refused as stale anyway, no need to remember.
        let horizon = ts.saturating_sub(2 * self.window_ns);
        while self.recent.front().is_some_and(|(_, t)| *t < horizon) || self.recent.len() >= RECENT {
            let (old, _) = self.recent.pop_front().expect("not empty");
            self.seen.remove(&old);
        }
        if self.seen.insert(nonce) {
            self.recent.push_back((nonce, ts));
        }
    }

    pub fn codec(&self) -> &Codec {
        &self.codec
    }
}

/// The topic base a key gives: the first 12 characters of the standard Base64 of
/// AES-GCM(key, nonce 0x40 x 12, 0x23 x 16, no AAD), with `+` → `a` and `/` → `b`.
pub fn topic_base(key: &Key) -> String {
    let cipher = Aes128Gcm::new(key.into());
    let out = cipher
        .encrypt(
            Nonce::from_slice(&[0x40; 12]),
            Payload {
                msg: &[0x23; 16],
                aad: &[],
            },
        )
        .expect("AES-GCM encryption of 16 bytes");
    let b64 = base64::engine::general_purpose::STANDARD.encode(out);
    b64[..12].replace('+', "a").replace('/', "b").replace('=', "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn key(s: &str) -> Key {
        hex(s).try_into().unwrap()
    }

    const K: &str = "762e4c1dc0a7d8b60e61bc68dc858bee";
    const TS: i64 = 1764000000123456789;
    const RND: [u8; 4] = [0xa1, 0xb2, 0xc3, 0xd4];

    #[test]
    fn topic_bases_match_the_reference_vectors() {
        assert_eq!(topic_base(&key(K)), "FGeeQanXEwx3");
        assert_eq!(topic_base(&[0; 16]), "bccIfbb9MMUK");
        assert_eq!(topic_base(&key("000102030405060708090a0b0c0d0e0f")), "vCeuCf4Hfy3E");
    }

    #[test]
    fn packets_match_the_reference_vectors() {
        let cases = [
            ("ping", 50, "187afca76f25cd15a1b2c3d4c332716e7edb49d79e47d0ac726b345f8a4d0f9d4e0bb82285870b91d722c4de6ad6f9ffe4330e2f9d5282ac7d26e81c5fe640cbcc9718e6486871bd44b7d615509a96ce60"),
            ("pong", 60, "187afca76f25cd15a1b2c3d4c332716e78db49d79e47d0ac726b345f8a4d0f9d4e0bb82285870b91d722c4de6ad6f9ffe4330e2f9d5282ac7d26e81c5fe640cbcca51473a68211587663452a162280cf7f4fd5d121ce63fa83d0d1"),
            ("", 0, "187afca76f25cd15a1b2c3d4c33275e02d4a55a7b7dfcdcd2b3fb92005688f"),
            ("status", 0, "187afca76f25cd15a1b2c3d4c332736d63d45aa2ed443cdb83ce0a0e7e4d8b1fa2c01f0371"),
        ];
        for (msg, pad, want) in cases {
            let c = Codec::new(&key(K), DEFAULT_AAD, pad);
            let packet = c.encode(TS, RND, msg.as_bytes());
            assert_eq!(packet, hex(want), "{msg:?} pad {pad}");
            let mut r = Receiver::new(c, std::time::Duration::from_secs(15), 4096);
            assert_eq!(r.receive(&packet, TS + 1_000_000_000).unwrap(), msg.as_bytes());
        }
    }

    #[test]
    fn receive_rules_in_order() {
        let c = Codec::new(&key(K), DEFAULT_AAD, 50);
        let p = c.encode(TS, RND, b"ping");
        let mut r = Receiver::new(c.clone(), std::time::Duration::from_secs(15), 200);
        assert_eq!(r.receive(&p, TS + 15_000_000_000 + 1), Err(Reject::Stale));
        assert_eq!(r.receive(&p, TS - 15_000_000_001), Err(Reject::Stale));
        assert!(
            r.receive(&p, TS + 15_000_000_000).is_ok(),
            "the window's edge is accepted"
        );
        assert_eq!(r.receive(&p, TS), Err(Reject::Replay));
        let mut flipped = c.encode(TS, [1, 2, 3, 4], b"ping");
        flipped[40] ^= 1;
        assert_eq!(r.receive(&flipped, TS), Err(Reject::BadTag));
        assert_eq!(r.receive(&p[..30], TS), Err(Reject::BadLength));
        assert_eq!(r.receive(&vec![0; 201], TS), Err(Reject::TooLarge));
        let other = Codec::new(&[9; 16], DEFAULT_AAD, 50).encode(TS, [5; 4], b"ping");
        assert_eq!(r.receive(&other, TS), Err(Reject::BadTag));
        assert_eq!(r.receive(&c.encode(TS, [6; 4], b"pong"), TS).unwrap(), b"pong");
    }

    #[test]
    fn replays_are_caught_for_the_whole_window_not_only_the_last_ten() {
        let c = Codec::new(&key(K), DEFAULT_AAD, 50);
        let mut r = Receiver::new(c.clone(), std::time::Duration::from_secs(15), 200);
        let first = c.encode(TS, [0; 4], b"first");
        r.receive(&first, TS).unwrap();
        for i in 1..500u32 {
            r.receive(&c.encode(TS + i as i64, i.to_be_bytes(), b"x"), TS).unwrap();
        }
        assert_eq!(r.receive(&first, TS + 1_000_000_000), Err(Reject::Replay));
    }

    proptest! {
        // Arbitrary bytes never panic and are never accepted.
        #[test]
        fn garbage_is_refused_without_panic(data in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut r = Receiver::new(Codec::new(&[7; 16], DEFAULT_AAD, 50), std::time::Duration::from_secs(15), 150);
            let now = data.get(..8).map(|b| i64::from_be_bytes(b.try_into().unwrap())).unwrap_or(0);
            prop_assert!(r.receive(&data, now).is_err());
        }

        #[test]
        fn any_message_round_trips(msg in prop::collection::vec(any::<u8>(), 0..300), pad in 0usize..80, rnd in any::<[u8; 4]>()) {
            let c = Codec::new(&[3; 16], DEFAULT_AAD, pad);
            let p = c.encode(TS, rnd, &msg);
            prop_assert_eq!(p.len(), OVERHEAD + msg.len().max(pad));
            let mut r = Receiver::new(c, std::time::Duration::from_secs(15), 1 << 16);
            prop_assert_eq!(r.receive(&p, TS).unwrap(), msg);
        }
    }
}

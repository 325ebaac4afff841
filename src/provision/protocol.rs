//! The provisioning protocol of docs/provisioning.md, independent of the carrier: messages,
//! keys bound to the pairing code, and both sides' state machines over a [`Transport`].

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use x25519_dalek::{PublicKey, StaticSecret};

pub const VERSION: u8 = 1;
pub const HELLO: u8 = 0x01;
pub const HELLO_REPLY: u8 = 0x02;
pub const CONFIRM: u8 = 0x03;
pub const BUNDLE: u8 = 0x04;
pub const DONE: u8 = 0x05;
pub const ERROR: u8 = 0x7f;
/// Largest message either side accepts.
pub const MAX_MESSAGE: usize = 2048;

/// Frames and messages refused (bad CRC, length, type, sequence), over all provisioning runs.
pub static REFUSED: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProvError {
    #[error("no answer from the device in time")]
    Timeout,
    #[error("pairing failed: wrong pairing code")]
    PairingFailed,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the device reported error {0}: {1}")]
    Device(u8, String),
    #[error("link: {0}")]
    Link(String),
}

/// A carrier of whole messages: UART lines, BLE chunks, or memory in tests.
pub trait Transport: Send {
    fn send(&mut self, msg: &[u8]) -> impl Future<Output = Result<(), ProvError>> + Send;
    /// The next whole, intact message; `Timeout` when none came within `within`.
    fn recv(&mut self, within: Duration) -> impl Future<Output = Result<Vec<u8>, ProvError>> + Send;
}

/// What the device receives.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Bundle {
    pub version: u32,
    pub id: String,
    /// The e2e key, hex.
    pub key: String,
    pub mqtt: MqttSettings,
    pub e2e: E2eSettings,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wifi: Option<Wifi>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MqttSettings {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub username: String,
    pub password: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct E2eSettings {
    pub base: String,
    pub publish: String,
    pub subscribe: String,
    pub pad: usize,
    pub aad: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Wifi {
    pub ssid: String,
    pub password: String,
}

struct Keys {
    enc: [u8; 32],
    mac: [u8; 32],
    transcript: Vec<u8>,
}

fn derive(shared: &[u8; 32], code: &str, g: &[u8; 32], d: &[u8; 32], ng: &[u8], nd: &[u8]) -> Keys {
    let mut transcript = b"outpost-provision v1".to_vec();
    for part in [&g[..], &d[..], ng, nd] {
        transcript.extend_from_slice(part);
    }
    let salt = [ng, nd].concat();
    let ikm = [&shared[..], code.as_bytes()].concat();
    let mut okm = [0u8; 64];
    hkdf::Hkdf::<Sha256>::new(Some(&salt), &ikm)
        .expand(&transcript, &mut okm)
        .expect("64 bytes is a valid HKDF length");
    let (mut enc, mut mac) = ([0u8; 32], [0u8; 32]);
    enc.copy_from_slice(&okm[..32]);
    mac.copy_from_slice(&okm[32..]);
    Keys { enc, mac, transcript }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn hmac_ok(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.verify_slice(tag).is_ok()
}

/// The device's proof that it holds the e2e key.
pub fn done_mac(e2e_key: &[u8; 16], device_id: &str) -> [u8; 32] {
    hmac(e2e_key, &[b"outpost-provisioned", device_id.as_bytes()])
}

/// One side's messages in order: sequence numbers out, expected sequence numbers in.
struct Session<'a, T: Transport> {
    t: &'a mut T,
    sent: u8,
    next_in: u8,
    last: Vec<u8>,
}

impl<T: Transport> Session<'_, T> {
    async fn send(&mut self, kind: u8, body: &[u8]) -> Result<(), ProvError> {
        let mut m = vec![kind, self.sent];
        m.extend_from_slice(body);
        self.sent = self.sent.wrapping_add(1);
        self.last = m.clone();
        self.t.send(&m).await
    }

    /// The next message of `kind`, resending our last message while none comes (lost lines),
    /// and skipping repeats of what we already handled.
    async fn expect(&mut self, kind: u8) -> Result<Vec<u8>, ProvError> {
        for attempt in 0..6 {
            let m = match self.t.recv(Duration::from_secs(1)).await {
                Ok(m) => m,
                Err(ProvError::Timeout) if attempt < 5 && !self.last.is_empty() => {
                    let last = self.last.clone();
                    self.t.send(&last).await?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if m.len() < 2 || m.len() > MAX_MESSAGE {
                REFUSED.fetch_add(1, Ordering::Relaxed);
                return Err(ProvError::Protocol(format!("message of {} bytes", m.len())));
            }
            if m[1] == self.next_in.wrapping_sub(1) && self.next_in > 0 {
                // The peer repeated itself (it missed our answer): answer again.
                let last = self.last.clone();
                self.t.send(&last).await?;
                continue;
            }
            if m[1] != self.next_in {
                REFUSED.fetch_add(1, Ordering::Relaxed);
                return Err(ProvError::Protocol(format!(
                    "sequence {} where {} was due",
                    m[1], self.next_in
                )));
            }
            self.next_in = self.next_in.wrapping_add(1);
            if m[0] == ERROR {
                let code = m.get(2).copied().unwrap_or(0);
                let text = String::from_utf8_lossy(m.get(3..).unwrap_or_default()).to_string();
                return Err(if code == 2 {
                    ProvError::PairingFailed
                } else {
                    ProvError::Device(code, text)
                });
            }
            if m[0] != kind {
                REFUSED.fetch_add(1, Ordering::Relaxed);
                return Err(ProvError::Protocol(format!(
                    "message type {:#04x} where {kind:#04x} was due",
                    m[0]
                )));
            }
            return Ok(m[2..].to_vec());
        }
        Err(ProvError::Timeout)
    }

    async fn fail(&mut self, code: u8, text: &str) {
        let _ = self.send(ERROR, &[&[code][..], text.as_bytes()].concat()).await;
    }
}

/// The gateway's side: returns the device's hardware id once the device proved it holds the key.
pub async fn gateway<T: Transport>(
    t: &mut T,
    code: &str,
    bundle: &Bundle,
    e2e_key: &[u8; 16],
) -> Result<String, ProvError> {
    let mut s = Session {
        t,
        sent: 0,
        next_in: 0,
        last: vec![],
    };
    let secret = StaticSecret::from(rand::random::<[u8; 32]>());
    let g = PublicKey::from(&secret).to_bytes();
    let ng: [u8; 16] = rand::random();
    s.send(HELLO, &[&[VERSION][..], &g, &ng].concat()).await?;
    let reply = s.expect(HELLO_REPLY).await?;
    if reply.len() < 48 {
        REFUSED.fetch_add(1, Ordering::Relaxed);
        s.fail(3, "short HELLO_REPLY").await;
        return Err(ProvError::Protocol("short HELLO_REPLY".into()));
    }
    let d: [u8; 32] = reply[..32].try_into().expect("length checked");
    let nd = &reply[32..48];
    let hw_id = String::from_utf8_lossy(&reply[48..]).to_string();
    let shared = secret.diffie_hellman(&PublicKey::from(d)).to_bytes();
    let k = derive(&shared, code, &g, &d, &ng, nd);
    s.send(CONFIRM, &hmac(&k.mac, &[b"gateway", &k.transcript])).await?;
    let confirm = s.expect(CONFIRM).await?;
    if !hmac_ok(&k.mac, &[b"device", &k.transcript], &confirm) {
        s.fail(2, "pairing failed").await;
        return Err(ProvError::PairingFailed);
    }
    let nonce: [u8; 12] = rand::random();
    let json = serde_json::to_vec(bundle).expect("bundle serializes");
    let ct = Aes256Gcm::new((&k.enc).into())
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &json,
                aad: &k.transcript,
            },
        )
        .expect("AES-GCM encryption");
    s.send(BUNDLE, &[&nonce[..], &ct].concat()).await?;
    let done = s.expect(DONE).await?;
    if !hmac_ok(e2e_key, &[b"outpost-provisioned", bundle.id.as_bytes()], &done) {
        return Err(ProvError::Protocol(
            "the device's DONE does not prove it holds the key".into(),
        ));
    }
    Ok(hw_id)
}

/// The device's side, as docs/provisioning.md describes it: the reference for firmware authors
/// and the simulator in the tests. Returns the bundle.
pub async fn device<T: Transport>(t: &mut T, code: &str, hw_id: &str) -> Result<Bundle, ProvError> {
    let mut s = Session {
        t,
        sent: 0,
        next_in: 0,
        last: vec![],
    };
    let hello = loop {
        match s.expect(HELLO).await {
            Err(ProvError::Timeout) => continue,
            other => break other?,
        }
    };
    if hello.first() != Some(&VERSION) || hello.len() != 49 {
        s.fail(1, "version not supported").await;
        return Err(ProvError::Protocol("bad HELLO".into()));
    }
    let g: [u8; 32] = hello[1..33].try_into().expect("length checked");
    let ng = &hello[33..49];
    let secret = StaticSecret::from(rand::random::<[u8; 32]>());
    let d = PublicKey::from(&secret).to_bytes();
    let nd: [u8; 16] = rand::random();
    s.send(HELLO_REPLY, &[&d[..], &nd, hw_id.as_bytes()].concat()).await?;
    let k = derive(
        &secret.diffie_hellman(&PublicKey::from(g)).to_bytes(),
        code,
        &g,
        &d,
        ng,
        &nd,
    );
    let confirm = s.expect(CONFIRM).await?;
    if !hmac_ok(&k.mac, &[b"gateway", &k.transcript], &confirm) {
        s.fail(2, "pairing failed").await;
        return Err(ProvError::PairingFailed);
    }
    s.send(CONFIRM, &hmac(&k.mac, &[b"device", &k.transcript])).await?;
    let sealed = s.expect(BUNDLE).await?;
    if sealed.len() < 12 + 16 {
        s.fail(3, "short BUNDLE").await;
        return Err(ProvError::Protocol("short BUNDLE".into()));
    }
    let json = Aes256Gcm::new((&k.enc).into())
        .decrypt(
            Nonce::from_slice(&sealed[..12]),
            Payload {
                msg: &sealed[12..],
                aad: &k.transcript,
            },
        )
        .map_err(|_| ProvError::Protocol("BUNDLE does not decrypt".into()))?;
    let bundle: Bundle = serde_json::from_slice(&json).map_err(|e| ProvError::Protocol(format!("BUNDLE: {e}")))?;
    let key = crate::devices::keystore::parse_key(&bundle.key)
        .map_err(|e| ProvError::Protocol(format!("BUNDLE key: {e}")))?;
    s.send(DONE, &done_mac(&key, &bundle.id)).await?;
    Ok(bundle)
}

/// Two transports joined in memory, for tests: what one sends the other receives.
pub fn memory_pair() -> (MemoryLink, MemoryLink) {
    let (a_tx, a_rx) = tokio::sync::mpsc::channel(16);
    let (b_tx, b_rx) = tokio::sync::mpsc::channel(16);
    (MemoryLink { tx: a_tx, rx: b_rx }, MemoryLink { tx: b_tx, rx: a_rx })
}

pub struct MemoryLink {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
}

impl Transport for MemoryLink {
    async fn send(&mut self, msg: &[u8]) -> Result<(), ProvError> {
        self.tx
            .send(msg.to_vec())
            .await
            .map_err(|_| ProvError::Link("closed".into()))
    }
    async fn recv(&mut self, within: Duration) -> Result<Vec<u8>, ProvError> {
        match tokio::time::timeout(within, self.rx.recv()).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => Err(ProvError::Link("closed".into())),
            Err(_) => Err(ProvError::Timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> Bundle {
        Bundle {
            version: 1,
            id: "kitchen".into(),
            key: "762e4c1dc0a7d8b60e61bc68dc858bee".into(),
            mqtt: MqttSettings {
                host: "10.0.0.2".into(),
                port: 1883,
                tls: false,
                username: "kitchen".into(),
                password: "pw".into(),
            },
            e2e: E2eSettings {
                base: "FGeeQanXEwx3".into(),
                publish: "FGeeQanXEwx3/iot".into(),
                subscribe: "FGeeQanXEwx3/controller".into(),
                pad: 50,
                aad: "1234567812345678".into(),
            },
            wifi: Some(Wifi {
                ssid: "home".into(),
                password: "secret".into(),
            }),
        }
    }

    fn key() -> [u8; 16] {
        crate::devices::keystore::parse_key("762e4c1dc0a7d8b60e61bc68dc858bee").unwrap()
    }

    #[tokio::test]
    async fn provisioning_in_memory_and_a_wrong_code() {
        let (mut g, mut d) = memory_pair();
        let dev = tokio::spawn(async move { device(&mut d, "123456", "esp32-aa").await });
        assert_eq!(gateway(&mut g, "123456", &bundle(), &key()).await.unwrap(), "esp32-aa");
        assert_eq!(dev.await.unwrap().unwrap(), bundle());

        let (mut g, mut d) = memory_pair();
        let dev = tokio::spawn(async move { device(&mut d, "000000", "esp32-aa").await });
        assert_eq!(
            gateway(&mut g, "123456", &bundle(), &key()).await,
            Err(ProvError::PairingFailed)
        );
        assert_eq!(dev.await.unwrap(), Err(ProvError::PairingFailed));
    }

    /// The BLE message flow: every message cut into 20-byte pieces and put back together.
    struct Chunked(MemoryLink, crate::provision::ble::Reassembler);

    impl Transport for Chunked {
        async fn send(&mut self, msg: &[u8]) -> Result<(), ProvError> {
            for piece in crate::provision::ble::chunks(msg) {
                assert!(piece.len() <= 20);
                self.0.send(&piece).await?;
            }
            Ok(())
        }
        async fn recv(&mut self, within: Duration) -> Result<Vec<u8>, ProvError> {
            loop {
                let piece = self.0.recv(within).await?;
                if let Some(m) = self.1.push(&piece)? {
                    return Ok(m);
                }
            }
        }
    }

    #[tokio::test]
    async fn provisioning_over_twenty_byte_chunks() {
        let (g, d) = memory_pair();
        let (mut g, mut d) = (Chunked(g, Default::default()), Chunked(d, Default::default()));
        let dev = tokio::spawn(async move { device(&mut d, "424242", "ble-dev").await });
        assert_eq!(gateway(&mut g, "424242", &bundle(), &key()).await.unwrap(), "ble-dev");
        assert_eq!(dev.await.unwrap().unwrap().wifi.unwrap().ssid, "home");
    }

    #[test]
    fn oversized_announcements_are_refused() {
        let mut r = crate::provision::ble::Reassembler::default();
        assert!(r.push(&[0xff, 0xff, 1, 2]).is_err());
    }
}

//! The provisioning protocol of docs/provisioning.md (version 2), independent of the carrier:
//! messages, a SPAKE2 exchange bound to the pairing code, both identities and the transcript,
//! and both sides' state machines over a [`Transport`].
//!
//! Version 1 (X25519 + HMAC key confirmation) is gone: anyone posing as the device could test
//! every pairing code offline against the gateway's CONFIRM. A device that answers with
//! "version not supported" is told to update its firmware.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use curve25519_dalek::edwards::CompressedEdwardsY;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use spake2::{Ed25519Group, Identity, Password, Spake2};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub const VERSION: u8 = 2;
pub const HELLO: u8 = 0x01;
pub const START: u8 = 0x02;
pub const PAKE: u8 = 0x03;
pub const CONFIRM: u8 = 0x04;
pub const BUNDLE: u8 = 0x05;
pub const DONE: u8 = 0x06;
pub const ACK: u8 = 0x07;
pub const ANNOUNCE: u8 = 0x08;
pub const ERROR: u8 = 0x7f;

/// ERROR codes (docs/provisioning.md says who sends which, and when).
pub mod code {
    pub const VERSION: u8 = 1;
    pub const PAIRING: u8 = 2;
    pub const PROTOCOL: u8 = 3;
    pub const BUNDLE_REFUSED: u8 = 4;
    pub const TIMEOUT: u8 = 5;
    pub const DONE_REFUSED: u8 = 6;
    pub const GATEWAY_FAILED: u8 = 7;
}

/// Largest message (type, seq and body) either side accepts.
pub const MAX_MESSAGE: usize = 2048;
/// Largest bundle JSON the gateway sends and a device must accept.
pub const MAX_BUNDLE_JSON: usize = 1536;
/// Longest gateway id and hardware id, in bytes.
pub const MAX_ID: usize = 64;
/// A SPAKE2 message: side byte (`A` or `B`) and a compressed Ed25519 point.
pub const PAKE_LEN: usize = 33;
/// How long a side waits for an answer before it resends its last message, and how often.
pub const RESEND_AFTER: Duration = Duration::from_secs(1);
pub const RESENDS: u32 = 5;
/// How long the gateway keeps answering repeated DONEs after its ACK (a lost ACK line).
pub const LINGER: Duration = Duration::from_millis(1500);
const LABEL: &[u8] = b"outpost-provision v2";

/// Frames and messages refused (bad CRC, length, type, sequence), over all provisioning runs.
pub static REFUSED: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProvError {
    #[error("no answer from the device in time")]
    Timeout,
    #[error(
        "no answer from the device in time; {0} frame(s) from it were refused as damaged (a UART frame needs standard base64 with `=` padding and the CRC-32 as 8 lower-case hex digits: docs/provisioning.md)"
    )]
    Damaged(u64),
    #[error("pairing failed: wrong pairing code")]
    PairingFailed,
    #[error("the device does not speak provisioning version 2 ({0}); version 1 is refused since its pairing code can be searched offline: update the device's firmware")]
    Version(String),
    #[error("pairing code: {0}")]
    Code(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the peer reported error {0}: {1}")]
    Peer(u8, String),
    #[error("the gateway did not acknowledge DONE: the bundle may not be stored on the gateway")]
    NotAcknowledged,
    #[error("link: {0}")]
    Link(String),
}

/// A carrier of whole messages: UART lines, BLE chunks, or memory in tests.
pub trait Transport: Send {
    fn send(&mut self, msg: &[u8]) -> impl Future<Output = Result<(), ProvError>> + Send;
    /// The next whole, intact message; `Timeout` when none came within `within`.
    fn recv(&mut self, within: Duration) -> impl Future<Output = Result<Vec<u8>, ProvError>> + Send;
    /// Frames this link dropped as damaged so far (for a timeout that can say why).
    fn refused(&self) -> u64 {
        0
    }
}

/// Where the randomness of one exchange comes from: the OS, or fixed bytes for test vectors.
pub trait Entropy: Send {
    fn fill(&mut self, buf: &mut [u8]);
}

pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn fill(&mut self, buf: &mut [u8]) {
        rand::RngCore::fill_bytes(&mut rand::rng(), buf);
    }
}

/// Hands spake2 (rand_core 0.6) exactly the 64 bytes it reduces into a scalar.
struct Seed([u8; 64], usize);

impl spake2_rand::RngCore for Seed {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }
    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        let end = self.1 + dest.len();
        assert!(end <= 64, "spake2 asked for more than one scalar's bytes");
        dest.copy_from_slice(&self.0[self.1..end]);
        self.1 = end;
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), spake2_rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl spake2_rand::CryptoRng for Seed {}

use rand_core_06 as spake2_rand;

/// What the device receives.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Bundle {
    pub version: u32,
    pub id: String,
    /// The e2e key, 32 lower-case hex digits.
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

/// The pairing code as both sides feed it to SPAKE2: separators (space, `-`) removed, letters
/// upper-cased; only ASCII letters and digits, 6 to 32 of them, and not one character repeated
/// or a straight run (`123456`, `ABCDEF`, `987654`).
pub fn normalize_code(code: &str) -> Result<String, ProvError> {
    let mut out = String::new();
    for c in code.chars() {
        match c {
            ' ' | '-' => {}
            c if c.is_ascii_alphanumeric() => out.push(c.to_ascii_uppercase()),
            c => {
                return Err(ProvError::Code(format!(
                    "{c:?} is not allowed (only letters A-Z, digits 0-9, and spaces or `-` between them)"
                )))
            }
        }
    }
    if out.len() < 6 {
        return Err(ProvError::Code(format!(
            "{} character(s) where at least 6 are needed (6 digits: about 20 bits)",
            out.len()
        )));
    }
    if out.len() > 32 {
        return Err(ProvError::Code("longer than 32 characters".into()));
    }
    let b = out.as_bytes();
    let steps: Vec<i16> = b.windows(2).map(|w| w[1] as i16 - w[0] as i16).collect();
    if steps.iter().all(|s| *s == 0) {
        return Err(ProvError::Code("one character repeated is too easy to guess".into()));
    }
    if steps.iter().all(|s| *s == 1) || steps.iter().all(|s| *s == -1) {
        return Err(ProvError::Code("a straight run is too easy to guess".into()));
    }
    Ok(out)
}

/// A hardware id is 1-64 bytes of printable ASCII without spaces.
pub fn valid_hw_id(hw: &[u8]) -> bool {
    (1..=MAX_ID).contains(&hw.len()) && hw.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// The transcript both sides bind every key to.
pub fn transcript(gateway_id: &[u8], hw_id: &[u8], msg_a: &[u8], msg_b: &[u8]) -> Vec<u8> {
    let mut t = LABEL.to_vec();
    t.push(gateway_id.len() as u8);
    t.extend_from_slice(gateway_id);
    t.push(hw_id.len() as u8);
    t.extend_from_slice(hw_id);
    t.extend_from_slice(msg_a);
    t.extend_from_slice(msg_b);
    t
}

/// The keys of one exchange, derived from the SPAKE2 key and the transcript.
pub struct Keys {
    pub gateway: [u8; 32],
    pub device: [u8; 32],
    pub enc: [u8; 32],
    pub transcript: Vec<u8>,
}

impl Keys {
    pub fn derive(spake_key: &[u8], transcript: Vec<u8>) -> Keys {
        let mut okm = [0u8; 96];
        hkdf::Hkdf::<Sha256>::new(None, spake_key)
            .expand(&transcript, &mut okm)
            .expect("96 bytes is a valid HKDF length");
        let part = |i: usize| -> [u8; 32] { okm[i * 32..(i + 1) * 32].try_into().expect("32 bytes") };
        Keys {
            gateway: part(0),
            device: part(1),
            enc: part(2),
            transcript,
        }
    }
    pub fn gateway_confirm(&self) -> [u8; 32] {
        hmac(&self.gateway, &[b"gateway confirm"])
    }
    pub fn device_confirm(&self) -> [u8; 32] {
        hmac(&self.device, &[b"device confirm"])
    }
    pub fn ack(&self) -> [u8; 32] {
        hmac(&self.gateway, &[b"gateway ack"])
    }
    /// The device's proof that it holds the e2e key (the 16 raw bytes), bound to this exchange.
    pub fn done(&self, e2e_key: &[u8; 16], device_id: &str) -> [u8; 32] {
        hmac(
            e2e_key,
            &[
                b"outpost-provisioned",
                &[device_id.len() as u8],
                device_id.as_bytes(),
                &self.transcript,
            ],
        )
    }
    fn seal(&self, nonce: &[u8; 12], json: &[u8]) -> Vec<u8> {
        let ct = Aes256Gcm::new((&self.enc).into())
            .encrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: json,
                    aad: &self.transcript,
                },
            )
            .expect("AES-GCM encryption");
        [&nonce[..], &ct].concat()
    }
    fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < 12 + 16 {
            return None;
        }
        Aes256Gcm::new((&self.enc).into())
            .decrypt(
                Nonce::from_slice(&sealed[..12]),
                Payload {
                    msg: &sealed[12..],
                    aad: &self.transcript,
                },
            )
            .ok()
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn same(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Refuses a SPAKE2 message that is not `side | point` with a point of the prime-order group:
/// undecodable, the identity, of small order, or with a torsion part.
pub fn check_pake(msg: &[u8], side: u8) -> Result<(), ProvError> {
    if msg.len() != PAKE_LEN || msg[0] != side {
        return Err(ProvError::Protocol(format!(
            "SPAKE2 message of {} bytes or of the wrong side",
            msg.len()
        )));
    }
    let bytes: [u8; 32] = msg[1..].try_into().expect("length checked");
    match CompressedEdwardsY(bytes).decompress() {
        Some(p) if !p.is_small_order() && p.is_torsion_free() => Ok(()),
        _ => Err(ProvError::Protocol("degenerate SPAKE2 point refused".into())),
    }
}

/// SPAKE2 for one side: `A` is the gateway, `B` the device; the identities are the gateway id
/// and the hardware id; `seed` is the 64 bytes reduced into the secret scalar.
pub fn spake_start(
    is_gateway: bool,
    code: &str,
    gateway_id: &[u8],
    hw_id: &[u8],
    seed: [u8; 64],
) -> (Spake2<Ed25519Group>, Vec<u8>) {
    let (pw, a, b) = (
        Password::new(code.as_bytes()),
        Identity::new(gateway_id),
        Identity::new(hw_id),
    );
    if is_gateway {
        Spake2::<Ed25519Group>::start_a_with_rng(&pw, &a, &b, Seed(seed, 0))
    } else {
        Spake2::<Ed25519Group>::start_b_with_rng(&pw, &a, &b, Seed(seed, 0))
    }
}

/// One side's messages in order: sequence numbers out, expected sequence numbers in.
struct Session<'a, T: Transport> {
    t: &'a mut T,
    sent: u8,
    next_in: u8,
    last: Vec<u8>,
    /// Every message sent and received, in order (for the test vectors).
    log: Vec<(bool, Vec<u8>)>,
}

impl<'a, T: Transport> Session<'a, T> {
    fn new(t: &'a mut T) -> Self {
        Session {
            t,
            sent: 0,
            next_in: 0,
            last: vec![],
            log: vec![],
        }
    }

    async fn send(&mut self, kind: u8, body: &[u8]) -> Result<(), ProvError> {
        let mut m = vec![kind, self.sent];
        m.extend_from_slice(body);
        self.sent = self.sent.wrapping_add(1);
        self.last = m.clone();
        self.log.push((true, m.clone()));
        self.t.send(&m).await
    }

    async fn resend(&mut self) -> Result<(), ProvError> {
        let last = self.last.clone();
        self.t.send(&last).await
    }

    /// The next message of `kind`. While none comes, our last message is resent every second
    /// (`RESENDS` times, or until `wait` when given); a repeat of the peer's previous message
    /// is answered with our last one; anything out of order is a protocol error, answered with
    /// ERROR 3. An ERROR from the peer, with any seq, ends the exchange.
    async fn expect(&mut self, kind: u8, wait: Option<Duration>) -> Result<Vec<u8>, ProvError> {
        let deadline = wait.map(|w| tokio::time::Instant::now() + w);
        let mut silent = 0;
        loop {
            let m = match self.t.recv(RESEND_AFTER).await {
                Ok(m) => m,
                Err(ProvError::Timeout) => {
                    silent += 1;
                    let more = match deadline {
                        Some(d) => tokio::time::Instant::now() < d,
                        None => silent <= RESENDS,
                    };
                    if more && !self.last.is_empty() {
                        self.resend().await?;
                        continue;
                    }
                    self.fail(code::TIMEOUT, "no answer in time").await;
                    return Err(match self.t.refused() {
                        0 => ProvError::Timeout,
                        n => ProvError::Damaged(n),
                    });
                }
                Err(e) => return Err(e),
            };
            if m.len() < 2 || m.len() > MAX_MESSAGE {
                REFUSED.fetch_add(1, Ordering::Relaxed);
                return Err(self.protocol(format!("message of {} bytes", m.len())).await);
            }
            if m[0] == ERROR {
                self.log.push((false, m.clone()));
                let code = m.get(2).copied().unwrap_or(0);
                let text = String::from_utf8_lossy(m.get(3..).unwrap_or_default()).to_string();
                return Err(match code {
                    code::PAIRING => ProvError::PairingFailed,
                    code::VERSION => ProvError::Version(text),
                    _ => ProvError::Peer(code, text),
                });
            }
            if m[0] == ANNOUNCE {
                if kind == START {
                    // The device is there and waiting: answer at once.
                    self.resend().await?;
                    continue;
                }
                return Err(self
                    .protocol("the device started over (ANNOUNCE mid-exchange)".into())
                    .await);
            }
            if self.next_in > 0 && m[1] == self.next_in - 1 {
                // The peer repeated itself (it missed our answer): answer again.
                self.resend().await?;
                continue;
            }
            if m[1] != self.next_in {
                REFUSED.fetch_add(1, Ordering::Relaxed);
                return Err(self
                    .protocol(format!("sequence {} where {} was due", m[1], self.next_in))
                    .await);
            }
            if m[0] != kind {
                REFUSED.fetch_add(1, Ordering::Relaxed);
                return Err(self
                    .protocol(format!("message type {:#04x} where {kind:#04x} was due", m[0]))
                    .await);
            }
            self.next_in = self.next_in.wrapping_add(1);
            self.log.push((false, m.clone()));
            return Ok(m[2..].to_vec());
        }
    }

    /// After our last message: answers repeats of the peer's previous one until it is quiet.
    async fn linger(&mut self, quiet: Duration) {
        while let Ok(m) = self.t.recv(quiet).await {
            if m.len() >= 2 && m[0] != ERROR && self.next_in > 0 && m[1] == self.next_in - 1 {
                let _ = self.resend().await;
            }
        }
    }

    async fn fail(&mut self, code: u8, text: &str) {
        let m = [&[ERROR, self.sent, code][..], text.as_bytes()].concat();
        self.log.push((true, m.clone()));
        let _ = self.t.send(&m).await;
    }

    async fn protocol(&mut self, text: String) -> ProvError {
        self.fail(code::PROTOCOL, &text).await;
        ProvError::Protocol(text)
    }
}

/// What the gateway needs for one exchange.
pub struct GatewayParams<'a> {
    pub gateway_id: &'a str,
    /// Normalised ([`normalize_code`]).
    pub code: &'a str,
    pub bundle: &'a Bundle,
    pub e2e_key: &'a [u8; 16],
    /// How long HELLO is repeated while no device answers.
    pub wait: Duration,
}

/// What an exchange got to, whatever its outcome.
#[derive(Default, Debug)]
pub struct Attempt {
    /// The hardware id the device gave (in ANNOUNCE or START).
    pub hw_id: Option<String>,
    /// The gateway sent its SPAKE2 message: whoever is on the link had one guess at the code.
    pub code_tried: bool,
    /// Every message sent (`true`) and received, in order.
    pub log: Vec<(bool, Vec<u8>)>,
}

/// The gateway's side: returns the device's hardware id once the device proved it holds the
/// key and `commit` stored that (the ACK is sent only then).
pub async fn gateway<T: Transport>(
    t: &mut T,
    p: &GatewayParams<'_>,
    entropy: &mut dyn Entropy,
    attempt: &mut Attempt,
    commit: impl FnOnce(&str) -> Result<(), String>,
) -> Result<String, ProvError> {
    let mut s = Session::new(t);
    let res = gateway_steps(&mut s, p, entropy, attempt, commit).await;
    attempt.log = std::mem::take(&mut s.log);
    res
}

async fn gateway_steps<T: Transport>(
    s: &mut Session<'_, T>,
    p: &GatewayParams<'_>,
    entropy: &mut dyn Entropy,
    attempt: &mut Attempt,
    commit: impl FnOnce(&str) -> Result<(), String>,
) -> Result<String, ProvError> {
    let gid = p.gateway_id.as_bytes();
    if gid.is_empty() || gid.len() > MAX_ID {
        return Err(ProvError::Protocol("the gateway id must be 1-64 bytes".into()));
    }
    let json = serde_json::to_vec(p.bundle).expect("bundle serializes");
    if json.len() > MAX_BUNDLE_JSON {
        return Err(ProvError::Protocol(format!(
            "the bundle is {} bytes, over the {MAX_BUNDLE_JSON} a device must accept (shorter Wi-Fi settings?)",
            json.len()
        )));
    }
    s.send(HELLO, &[&[VERSION, gid.len() as u8][..], gid].concat()).await?;
    let start = s.expect(START, Some(p.wait)).await?;
    if start.first() != Some(&VERSION) {
        s.fail(code::VERSION, "this gateway speaks version 2 only").await;
        return Err(ProvError::Version(format!("START of version {:?}", start.first())));
    }
    let hw_len = start.get(1).copied().unwrap_or(0) as usize;
    if start.len() != 2 + hw_len + PAKE_LEN || !valid_hw_id(&start[2..2 + hw_len]) {
        return Err(s.protocol("START: bad length or hardware id".into()).await);
    }
    let hw = &start[2..2 + hw_len];
    let hw_id = String::from_utf8_lossy(hw).to_string();
    attempt.hw_id = Some(hw_id.clone());
    let msg_b = &start[2 + hw_len..];
    if let Err(e) = check_pake(msg_b, b'B') {
        return Err(s.protocol(e.to_string()).await);
    }
    let mut seed = [0u8; 64];
    entropy.fill(&mut seed);
    let (spake, msg_a) = spake_start(true, p.code, gid, hw, seed);
    let key = spake
        .finish(msg_b)
        .map_err(|e| ProvError::Protocol(format!("SPAKE2: {e:?}")))?;
    let k = Keys::derive(&key, transcript(gid, hw, &msg_a, msg_b));
    attempt.code_tried = true;
    s.send(PAKE, &[&msg_a[..], &k.gateway_confirm()].concat()).await?;
    let confirm = s.expect(CONFIRM, None).await?;
    if !same(&confirm, &k.device_confirm()) {
        s.fail(code::PAIRING, "pairing failed").await;
        return Err(ProvError::PairingFailed);
    }
    let mut nonce = [0u8; 12];
    entropy.fill(&mut nonce);
    s.send(BUNDLE, &k.seal(&nonce, &json)).await?;
    let done = s.expect(DONE, None).await?;
    if !same(&done, &k.done(p.e2e_key, &p.bundle.id)) {
        s.fail(code::DONE_REFUSED, "DONE does not prove the device holds the key")
            .await;
        return Err(ProvError::Protocol(
            "the device's DONE does not prove it holds the key".into(),
        ));
    }
    if let Err(e) = commit(&hw_id) {
        s.fail(code::GATEWAY_FAILED, "the gateway could not store the device")
            .await;
        return Err(ProvError::Link(format!("keystore: {e}")));
    }
    s.send(ACK, &k.ack()).await?;
    s.linger(LINGER).await;
    Ok(hw_id)
}

/// How the device side behaves (the reference for firmware authors, and the tests' device).
pub struct DeviceParams<'a> {
    pub code: &'a str,
    pub hw_id: &'a str,
    /// Send ANNOUNCE every second until a HELLO comes (the device starts).
    pub announce: bool,
}

/// The device's side, as docs/provisioning.md describes it. Returns the bundle once the gateway
/// acknowledged it.
pub async fn device<T: Transport>(
    t: &mut T,
    p: &DeviceParams<'_>,
    entropy: &mut dyn Entropy,
) -> Result<Bundle, ProvError> {
    let code = normalize_code(p.code)?;
    let hw = p.hw_id.as_bytes();
    if !valid_hw_id(hw) {
        return Err(ProvError::Protocol("bad hardware id".into()));
    }
    let mut s = Session::new(t);
    // Wait for HELLO (seq 0), announcing ourselves meanwhile if asked to.
    let hello = loop {
        if p.announce {
            let m = [&[ANNOUNCE, 0, VERSION][..], hw].concat();
            s.t.send(&m).await?;
        }
        match s.t.recv(RESEND_AFTER).await {
            Ok(m) if m.len() >= 2 && m[0] == HELLO && m[1] == 0 => break m,
            Ok(m) if m.len() >= 3 && m[0] == ERROR => {
                return Err(ProvError::Peer(m[2], String::from_utf8_lossy(&m[3..]).to_string()))
            }
            Ok(_) | Err(ProvError::Timeout) => continue,
            Err(e) => return Err(e),
        }
    };
    s.next_in = 1;
    s.log.push((false, hello.clone()));
    let hello = &hello[2..];
    if hello.first() != Some(&VERSION) {
        s.fail(code::VERSION, "version 2 only").await;
        return Err(ProvError::Version(format!("HELLO of version {:?}", hello.first())));
    }
    let gid_len = hello.get(1).copied().unwrap_or(0) as usize;
    if hello.len() != 2 + gid_len || gid_len == 0 || gid_len > MAX_ID {
        return Err(s.protocol("HELLO: bad length".into()).await);
    }
    let gid = &hello[2..];
    let mut seed = [0u8; 64];
    entropy.fill(&mut seed);
    let (spake, msg_b) = spake_start(false, &code, gid, hw, seed);
    s.send(START, &[&[VERSION, hw.len() as u8][..], hw, &msg_b].concat())
        .await?;
    let pake = s.expect(PAKE, None).await?;
    if pake.len() != PAKE_LEN + 32 {
        return Err(s.protocol("PAKE: bad length".into()).await);
    }
    let msg_a = &pake[..PAKE_LEN];
    if let Err(e) = check_pake(msg_a, b'A') {
        return Err(s.protocol(e.to_string()).await);
    }
    let key = spake
        .finish(msg_a)
        .map_err(|e| ProvError::Protocol(format!("SPAKE2: {e:?}")))?;
    let k = Keys::derive(&key, transcript(gid, hw, msg_a, &msg_b));
    if !same(&pake[PAKE_LEN..], &k.gateway_confirm()) {
        s.fail(code::PAIRING, "pairing failed").await;
        return Err(ProvError::PairingFailed);
    }
    s.send(CONFIRM, &k.device_confirm()).await?;
    let sealed = s.expect(BUNDLE, None).await?;
    let parsed = k
        .open(&sealed)
        .ok_or("does not decrypt")
        .and_then(|json| {
            if json.len() > MAX_BUNDLE_JSON {
                return Err("too large");
            }
            serde_json::from_slice::<Bundle>(&json).map_err(|_| "not a bundle")
        })
        .and_then(|b| {
            crate::devices::keystore::parse_key(&b.key)
                .map(|key| (b, key))
                .map_err(|_| "bad key")
        });
    let (bundle, key) = match parsed {
        Ok(v) => v,
        Err(why) => {
            s.fail(code::BUNDLE_REFUSED, why).await;
            return Err(ProvError::Protocol(format!("BUNDLE {why}")));
        }
    };
    s.send(DONE, &k.done(&key, &bundle.id)).await?;
    match s.expect(ACK, None).await {
        Ok(ack) if same(&ack, &k.ack()) => Ok(bundle),
        Ok(_) => Err(s.protocol("ACK does not verify".into()).await),
        Err(ProvError::Timeout) => Err(ProvError::NotAcknowledged),
        Err(e) => Err(e),
    }
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
mod tests;

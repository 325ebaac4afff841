use super::*;
use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::scalar::Scalar;
use sha2::{Digest, Sha512};

fn bundle() -> Bundle {
    Bundle {
        version: 2,
        id: "kitchen-sensor".into(),
        key: "762e4c1dc0a7d8b60e61bc68dc858bee".into(),
        mqtt: MqttSettings {
            host: "192.168.1.2".into(),
            port: 1883,
            tls: false,
            username: "kitchen-sensor".into(),
            password: "5e0b2f9c61d1a4e7b3c8".into(),
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
            password: "correct horse".into(),
        }),
    }
}

fn key() -> [u8; 16] {
    crate::devices::keystore::parse_key("762e4c1dc0a7d8b60e61bc68dc858bee").unwrap()
}

fn params<'a>(code: &'a str, b: &'a Bundle, k: &'a [u8; 16]) -> GatewayParams<'a> {
    GatewayParams {
        gateway_id: "outpost-01",
        code,
        bundle: b,
        e2e_key: k,
        wait: Duration::from_secs(5),
    }
}

fn dev<'a>(code: &'a str, hw: &'a str) -> DeviceParams<'a> {
    DeviceParams {
        code,
        hw_id: hw,
        announce: false,
    }
}

/// Hands out fixed byte strings in order (the test vectors' randomness).
struct Fixed(Vec<Vec<u8>>);

impl Entropy for Fixed {
    fn fill(&mut self, buf: &mut [u8]) {
        let next = self.0.remove(0);
        buf.copy_from_slice(&next[..buf.len()]);
    }
}

#[tokio::test]
async fn provisioning_in_memory_and_a_wrong_code() {
    let (b, k) = (bundle(), key());
    let (mut g, mut d) = memory_pair();
    let dv = tokio::spawn(async move { device(&mut d, &dev("739-201", "esp32-aa"), &mut OsEntropy).await });
    let mut committed = None;
    let mut a = Attempt::default();
    let hw = gateway(&mut g, &params("739201", &b, &k), &mut OsEntropy, &mut a, |hw| {
        committed = Some(hw.to_string());
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!((hw.as_str(), committed.as_deref()), ("esp32-aa", Some("esp32-aa")));
    assert_eq!(dv.await.unwrap().unwrap(), bundle());

    let (mut g, mut d) = memory_pair();
    let dv = tokio::spawn(async move { device(&mut d, &dev("739202", "esp32-aa"), &mut OsEntropy).await });
    let mut a = Attempt::default();
    let res = gateway(&mut g, &params("739201", &b, &k), &mut OsEntropy, &mut a, |_| {
        panic!("no commit")
    })
    .await;
    assert_eq!(res, Err(ProvError::PairingFailed));
    assert!(a.code_tried);
    // The device found out first (the gateway's confirmation did not verify) and said so.
    assert_eq!(dv.await.unwrap(), Err(ProvError::PairingFailed));
    assert_eq!(
        a.log.last().map(|(sent, m)| (*sent, m[0], m[2])),
        Some((false, ERROR, code::PAIRING))
    );
}

#[tokio::test]
async fn a_device_that_announces_itself_starts_the_exchange() {
    let (b, k) = (bundle(), key());
    let (mut g, mut d) = memory_pair();
    let dv = tokio::spawn(async move {
        let p = DeviceParams {
            announce: true,
            ..dev("ab12cd", "late-booter")
        };
        device(&mut d, &p, &mut OsEntropy).await
    });
    // The device announced before the gateway started; the gateway finds its ANNOUNCE waiting.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut a = Attempt::default();
    let hw = gateway(&mut g, &params("AB12CD", &b, &k), &mut OsEntropy, &mut a, |_| Ok(())).await;
    assert_eq!(hw.unwrap(), "late-booter");
    assert!(dv.await.unwrap().is_ok());
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
    let (b, k) = (bundle(), key());
    let (g, d) = memory_pair();
    let (mut g, mut d) = (Chunked(g, Default::default()), Chunked(d, Default::default()));
    let dv = tokio::spawn(async move { device(&mut d, &dev("424243", "ble-dev"), &mut OsEntropy).await });
    let mut a = Attempt::default();
    let hw = gateway(&mut g, &params("424243", &b, &k), &mut OsEntropy, &mut a, |_| Ok(())).await;
    assert_eq!(hw.unwrap(), "ble-dev");
    assert_eq!(dv.await.unwrap().unwrap().wifi.unwrap().ssid, "home");
}

#[test]
fn oversized_announcements_are_refused() {
    let mut r = crate::provision::ble::Reassembler::default();
    assert!(r.push(&[0xff, 0xff, 1, 2]).is_err());
}

#[test]
fn pairing_codes_are_normalised_and_weak_ones_refused() {
    assert_eq!(normalize_code("739-201").unwrap(), "739201");
    assert_eq!(normalize_code(" ab12 cd ").unwrap(), "AB12CD");
    for weak in ["", "1", "12345", "000000", "123456", "987654", "abcdef", "- - -"] {
        assert!(
            matches!(normalize_code(weak), Err(ProvError::Code(_))),
            "{weak:?} accepted"
        );
    }
    // Non-ASCII is refused rather than normalised (no Unicode form question arises).
    assert!(normalize_code("７３９２０１").is_err());
    assert!(normalize_code("73920١").is_err());
    assert!(normalize_code(&"7".repeat(33)).is_err());
}

/// A device (or an attacker posing as one) sends START with a degenerate point: refused with
/// ERROR 3 before the gateway uses its code.
#[tokio::test]
async fn degenerate_points_are_refused_before_the_code_is_used() {
    let (b, k) = (bundle(), key());
    let identity = {
        let mut p = [0u8; 32];
        p[0] = 1;
        p
    };
    // The identity, the all-zero encoding (a point of order 4), and a small-order point.
    let order8 = curve25519_dalek::constants::EIGHT_TORSION[1].compress().to_bytes();
    // A valid point with a torsion part.
    let mixed = (ED25519_BASEPOINT_POINT + curve25519_dalek::constants::EIGHT_TORSION[1])
        .compress()
        .to_bytes();
    for point in [identity, [0u8; 32], order8, mixed] {
        let (mut g, mut d) = memory_pair();
        let attacker = tokio::spawn(async move {
            let hello = d.recv(Duration::from_secs(2)).await.unwrap();
            assert_eq!(hello[0], HELLO);
            let body = [&[VERSION, 3][..], b"bad", b"B", &point].concat();
            d.send(&[&[START, 0][..], &body].concat()).await.unwrap();
            d.recv(Duration::from_secs(2)).await.unwrap()
        });
        let mut a = Attempt::default();
        let res = gateway(&mut g, &params("739201", &b, &k), &mut OsEntropy, &mut a, |_| Ok(())).await;
        assert!(matches!(res, Err(ProvError::Protocol(_))), "{res:?}");
        assert!(!a.code_tried);
        let answer = attacker.await.unwrap();
        assert_eq!((answer[0], answer[2]), (ERROR, code::PROTOCOL));
    }
    // An honest message passes the same check.
    let (_, msg) = spake_start(false, "739201", b"g", b"h", [7; 64]);
    check_pake(&msg, b'B').unwrap();
}

/// Posing as the device and going quiet once the gateway's confirmation arrived still costs
/// the attempt: that confirmation let the attacker check its one guess.
#[tokio::test]
async fn an_attempt_counts_once_the_gateway_sent_its_pake_message() {
    let (b, k) = (bundle(), key());
    let (mut g, mut d) = memory_pair();
    let attacker = tokio::spawn(async move {
        let _hello = d.recv(Duration::from_secs(2)).await.unwrap();
        let (_, msg) = spake_start(false, "111112", b"outpost-01", b"mallory", [9; 64]);
        let body = [&[VERSION, 7][..], b"mallory", &msg].concat();
        d.send(&[&[START, 0][..], &body].concat()).await.unwrap();
        let mut got = vec![];
        while let Ok(m) = d.recv(Duration::from_secs(20)).await {
            got.push(m);
        }
        got
    });
    let mut a = Attempt::default();
    let res = gateway(&mut g, &params("739201", &b, &k), &mut OsEntropy, &mut a, |_| Ok(())).await;
    assert_eq!(res, Err(ProvError::Timeout));
    assert!(a.code_tried);
    assert_eq!(a.hw_id.as_deref(), Some("mallory"));
    drop(g);
    let got = attacker.await.unwrap();
    // PAKE once and RESENDS times more, then ERROR 5 (timeout), and no BUNDLE.
    assert_eq!(got.iter().filter(|m| m[0] == PAKE).count(), 1 + RESENDS as usize);
    assert_eq!(got.last().map(|m| (m[0], m[2])), Some((ERROR, code::TIMEOUT)));
    assert!(got.iter().all(|m| m[0] != BUNDLE));
}

/// A device of version 1 answers HELLO with ERROR 1: the operator is told to update it.
#[tokio::test]
async fn a_version_1_device_is_refused_with_a_reason() {
    let (b, k) = (bundle(), key());
    let (mut g, mut d) = memory_pair();
    tokio::spawn(async move {
        let _ = d.recv(Duration::from_secs(2)).await.unwrap();
        d.send(&[&[ERROR, 0, 1][..], b"version not supported"].concat())
            .await
            .unwrap();
        let _ = d.recv(Duration::from_secs(2)).await;
    });
    let mut a = Attempt::default();
    let res = gateway(&mut g, &params("739201", &b, &k), &mut OsEntropy, &mut a, |_| Ok(())).await;
    let e = res.unwrap_err();
    assert!(matches!(e, ProvError::Version(_)));
    assert!(e.to_string().contains("update the device's firmware"), "{e}");
}

/// Drops the first message of `kind` it is asked to send (a lost line).
struct Lossy(MemoryLink, u8, bool);

impl Transport for Lossy {
    async fn send(&mut self, msg: &[u8]) -> Result<(), ProvError> {
        if msg[0] == self.1 && !self.2 {
            self.2 = true;
            return Ok(());
        }
        self.0.send(msg).await
    }
    async fn recv(&mut self, within: Duration) -> Result<Vec<u8>, ProvError> {
        self.0.recv(within).await
    }
}

#[tokio::test]
async fn a_lost_ack_is_sent_again_when_the_device_repeats_done() {
    let (b, k) = (bundle(), key());
    let (g, mut d) = memory_pair();
    let mut g = Lossy(g, ACK, false);
    let dv = tokio::spawn(async move { device(&mut d, &dev("739201", "hw"), &mut OsEntropy).await });
    let mut a = Attempt::default();
    let hw = gateway(&mut g, &params("739201", &b, &k), &mut OsEntropy, &mut a, |_| Ok(())).await;
    assert_eq!(hw.unwrap(), "hw");
    assert!(g.2, "the first ACK was dropped");
    assert_eq!(dv.await.unwrap().unwrap(), bundle(), "the device got the second ACK");
}

#[tokio::test]
async fn a_done_the_gateway_refuses_is_reported_to_the_device() {
    let b = bundle();
    let wrong = [0u8; 16]; // the gateway expects a proof with another key than the bundle's
    let (mut g, mut d) = memory_pair();
    let dv = tokio::spawn(async move { device(&mut d, &dev("739201", "hw"), &mut OsEntropy).await });
    let mut a = Attempt::default();
    let res = gateway(
        &mut g,
        &params("739201", &b, &wrong),
        &mut OsEntropy,
        &mut a,
        |_| Ok(()),
    )
    .await;
    assert!(matches!(res, Err(ProvError::Protocol(_))));
    assert!(matches!(dv.await.unwrap(), Err(ProvError::Peer(code::DONE_REFUSED, _))));
}

// ---- test vectors -------------------------------------------------------------------------

const M_HEX: &str = "15cfd18e385952982b6a8f8c7854963b58e34388c8e6dae891db756481a02312";
const N_HEX: &str = "f04f2e7eb734b2a8f8b472eaf9c3c632576ac64aea650b496a8a20ff00e583c3";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn point(h: &str) -> curve25519_dalek::EdwardsPoint {
    let b: Vec<u8> = (0..h.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        .collect();
    CompressedEdwardsY(b.try_into().unwrap()).decompress().unwrap()
}

/// The password scalar as docs/provisioning.md defines it.
fn w_scalar(code: &str) -> Scalar {
    let mut okm = [0u8; 48];
    hkdf::Hkdf::<Sha256>::new(Some(b""), code.as_bytes())
        .expand(b"SPAKE2 pw", &mut okm)
        .unwrap();
    let mut le = [0u8; 64];
    for (i, b) in okm.iter().enumerate() {
        le[47 - i] = *b;
    }
    Scalar::from_bytes_mod_order_wide(&le)
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = <Sha256 as Digest>::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn seed(label: &str) -> [u8; 64] {
    Sha512::digest(format!("outpost test vector: {label}").as_bytes()).into()
}

/// Runs one whole exchange with fixed randomness and writes down everything a firmware author
/// needs to check an implementation, recomputing SPAKE2 from the formulas the doc gives (so the
/// doc's description of the crate's SPAKE2 is checked too).
async fn vectors() -> String {
    let (b, k) = (bundle(), key());
    let (gid, hw, typed) = ("outpost-01", "esp32-c3-58cf79a1b2c4", "739-201");
    let code = normalize_code(typed).unwrap();
    let (xs, ys) = (seed("gateway scalar"), seed("device scalar"));
    let nonce = seed("bundle nonce")[..12].to_vec();
    let (mut g, mut d) = memory_pair();
    let dv = tokio::spawn(async move {
        let p = DeviceParams {
            code: typed,
            hw_id: hw,
            announce: false,
        };
        device(&mut d, &p, &mut Fixed(vec![ys.to_vec()])).await
    });
    let mut a = Attempt::default();
    let mut e = Fixed(vec![xs.to_vec(), nonce.clone()]);
    let p = GatewayParams {
        gateway_id: gid,
        code: &code,
        bundle: &b,
        e2e_key: &k,
        wait: Duration::from_secs(5),
    };
    gateway(&mut g, &p, &mut e, &mut a, |_| Ok(())).await.unwrap();
    assert_eq!(dv.await.unwrap().unwrap(), b);

    // SPAKE2 by the doc's formulas, checked against the crate's messages and key.
    let (x, y, w) = (
        Scalar::from_bytes_mod_order_wide(&xs),
        Scalar::from_bytes_mod_order_wide(&ys),
        w_scalar(&code),
    );
    let (m, n) = (point(M_HEX), point(N_HEX));
    let big_x = ED25519_BASEPOINT_POINT * x + m * w;
    let big_y = ED25519_BASEPOINT_POINT * y + n * w;
    let msg_a = [&[b'A'][..], big_x.compress().as_bytes()].concat();
    let msg_b = [&[b'B'][..], big_y.compress().as_bytes()].concat();
    let k_point = (big_y - n * w) * x;
    assert_eq!(k_point, (big_x - m * w) * y);
    let spake_key = sha256(&[
        &sha256(&[code.as_bytes()]),
        &sha256(&[gid.as_bytes()]),
        &sha256(&[hw.as_bytes()]),
        big_x.compress().as_bytes(),
        big_y.compress().as_bytes(),
        k_point.compress().as_bytes(),
    ]);
    let (crate_a, _) = spake_start(true, &code, gid.as_bytes(), hw.as_bytes(), xs);
    let (_, crate_b_msg) = spake_start(false, &code, gid.as_bytes(), hw.as_bytes(), ys);
    assert_eq!(crate_b_msg, msg_b, "the doc's Y is the crate's");
    assert_eq!(
        crate_a.finish(&msg_b).unwrap(),
        spake_key.to_vec(),
        "the doc's key is the crate's"
    );
    let keys = Keys::derive(&spake_key, transcript(gid.as_bytes(), hw.as_bytes(), &msg_a, &msg_b));
    let json = serde_json::to_vec(&b).unwrap();

    let mut out = String::new();
    let mut line = |name: &str, value: String| out.push_str(&format!("{name:<22} {value}\n"));
    line("gateway id", format!("{gid:?} (idA)"));
    line("hardware id", format!("{hw:?} (idB)"));
    line("pairing code", format!("{typed:?}, normalised {code:?}"));
    line("e2e key", hex(&k));
    line("gateway seed (64)", hex(&xs));
    line("x", hex(x.as_bytes()));
    line("device seed (64)", hex(&ys));
    line("y", hex(y.as_bytes()));
    line("w", hex(w.as_bytes()));
    line("message A", hex(&msg_a));
    line("message B", hex(&msg_b));
    line("K", hex(k_point.compress().as_bytes()));
    line("SPAKE2 key", hex(&spake_key));
    line("transcript T", hex(&keys.transcript));
    line("k_gateway", hex(&keys.gateway));
    line("k_device", hex(&keys.device));
    line("k_enc", hex(&keys.enc));
    line("gateway confirm", hex(&keys.gateway_confirm()));
    line("device confirm", hex(&keys.device_confirm()));
    line("bundle nonce", hex(&nonce));
    line("bundle JSON", String::from_utf8(json).unwrap());
    line("DONE proof", hex(&keys.done(&k, &b.id)));
    line("ACK", hex(&keys.ack()));
    out.push_str("\nThe messages, in order (type, seq, body), each followed by its UART line:\n\n");
    for (sent, msg) in &a.log {
        let name = match msg[0] {
            HELLO => "HELLO",
            START => "START",
            PAKE => "PAKE",
            CONFIRM => "CONFIRM",
            BUNDLE => "BUNDLE",
            DONE => "DONE",
            ACK => "ACK",
            _ => "?",
        };
        let dir = if *sent {
            "gateway → device"
        } else {
            "device → gateway"
        };
        out.push_str(&format!(
            "{dir} {name}\n  {}\n  {}",
            hex(msg),
            crate::provision::uart::encode_line(msg)
        ));
    }
    // The exchange checks out against the recomputed values.
    assert_eq!(&a.log[2].1[2..2 + PAKE_LEN], &msg_a[..]);
    out
}

/// The vectors in docs/provisioning.md are what the code computes (rewrite them with
/// `OUTPOST_WRITE_VECTORS=1 cargo test --lib vectors`).
#[tokio::test]
async fn the_docs_test_vectors_match_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/provisioning.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let (begin, end) = ("<!-- vectors:begin -->\n```\n", "```\n<!-- vectors:end -->");
    let (head, rest) = doc.split_once(begin).expect("the doc has a vectors block");
    let (block, tail) = rest.split_once(end).expect("the vectors block ends");
    let now = vectors().await;
    if std::env::var_os("OUTPOST_WRITE_VECTORS").is_some() {
        std::fs::write(path, format!("{head}{begin}{now}{end}{tail}")).unwrap();
        return;
    }
    assert_eq!(block, now, "docs/provisioning.md's test vectors drifted from the code");
}

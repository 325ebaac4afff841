//! No client can hurt another (issue 29): what one user's clients send, hold or fail to read
//! costs only that user. Each attack runs beside a bystander of another user whose QoS 1 round
//! trip is measured quiet and under attack.

use crate::common::*;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as Q5;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Users alice (the bystander) and mallory, each allowed `devices/<name>/#` only.
fn two_users(port: u16, sessions: &str) -> String {
    let (alice, mallory) = (passwd("alice-pw"), passwd("mallory-pw"));
    format!(
        r##"broker:
  listeners:
    - {{ bind: "127.0.0.1:{port}", protocol: mqtt, anonymous: false }}
  users:
    - {{ name: alice, password_hash: "{alice}" }}
    - {{ name: mallory, password_hash: "{mallory}" }}
  acl:
    - {{ who: "user:*", allow: {{ publish: ["devices/{{username}}/#"], subscribe: ["devices/{{username}}/#"] }} }}
  sessions: {sessions}
"##
    )
}

async fn alice(port: u16) -> Bystander {
    let mut o = opts(port, "alice-1");
    o.set_credentials("alice", "alice-pw");
    Bystander::connect_with(o, "devices/alice/echo").await
}

/// A raw socket logged in as mallory with MQTT 5 and the given Receive Maximum; reads its
/// CONNACK and nothing after unless the test does.
fn mallory5(port: u16, id: &str, receive_max: u16, keep_alive: u16) -> TcpStream {
    let mut props = v5::ConnectProperties::new();
    props.receive_maximum = Some(receive_max);
    let c = v5::Connect {
        keep_alive,
        client_id: id.into(),
        clean_start: true,
        properties: Some(props),
    };
    let mut b = BytesMut::new();
    c.write(&None, &Some(v5::Login::new("mallory", "mallory-pw")), &mut b)
        .unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&b).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = [0u8; 4];
    s.read_exact(&mut head).unwrap();
    assert_eq!((head[0], head[3]), (0x20, 0), "mallory's CONNACK");
    let mut rest = vec![0u8; head[1] as usize - 2];
    s.read_exact(&mut rest).unwrap();
    s
}

fn mallory4(port: u16, id: &str) -> TcpStream {
    let mut c = v4::Connect::new(id);
    c.set_login("mallory", "mallory-pw");
    let mut b = BytesMut::new();
    v4::Packet::Connect(c).write(&mut b, 1 << 20).unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&b).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0], "mallory's CONNACK");
    s
}

/// Full-size attacks (`OUTPOST_SOAK=1`, `.ci/test --soak`); scaled ones otherwise.
fn soak() -> bool {
    std::env::var("OUTPOST_SOAK").is_ok_and(|v| v == "1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_again_and_again_to_a_big_retained_message_pauses_nobody() {
    let _heavy = heavy_async().await;
    // Issue 29, point 2. Scaled: a 16 MiB budget and 300 SUBSCRIBEs of a 200 KiB retained
    // message (60 MB of copies before the fix); full size: the default budget and 1400.
    let (budget, subscribes) = if soak() {
        ("{}", 1400u16)
    } else {
        ("{ memory_budget: 16MiB }", 300)
    };
    let port = free_port();
    let gw = Gateway::start(&two_users(port, budget));
    let mut by = alice(port).await;
    let quiet = by
        .median(20, Duration::from_millis(10))
        .await
        .expect("quiet round trips");

    let mut m = mallory5(port, "mallory-rm1", 1, 60);
    let mut b = BytesMut::new();
    let mut p = v5::Publish::new("devices/mallory/blob", Q5::AtLeastOnce, vec![7u8; 200 * 1024], None);
    p.retain = true;
    p.pkid = 1;
    p.write(&mut b).unwrap();
    m.write_all(&b).unwrap();
    b.clear();
    for pkid in 2..2 + subscribes {
        let mut s = v5::Subscribe::new(v5::Filter::new("devices/mallory/blob", Q5::AtLeastOnce), None);
        s.pkid = pkid;
        s.write(&mut b).unwrap();
    }
    // All at once, and never an ack or a read after.
    m.write_all(&b).unwrap();
    let under = by.median(40, Duration::from_millis(25)).await;
    assert_unhurt(quiet, under, "SUBSCRIBEs again and again of a 200 KiB retained message");
    let st = gw.status();
    let queued = st["router"]["queued_bytes"].as_u64().unwrap();
    assert!(
        queued <= 3 * 205 * 1024,
        "copies of one retained message queued: {queued} bytes"
    );
    assert_eq!(st["router"]["publisher_pauses"].as_u64(), Some(0), "{}", st["router"]);
    drop(m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_subscribers_that_never_read_cost_only_that_user() {
    let _heavy = heavy_async().await;
    // Issue 29, point 2: sessions of one user that never read (nor acknowledge) fill only that
    // user's share (1 MiB of a 4 MiB budget), never the budget; its own publisher goes on.
    let port = free_port();
    let gw = Gateway::start(&two_users(port, "{ memory_budget: 4MiB }"));
    let mut by = alice(port).await;
    let quiet = by
        .median(20, Duration::from_millis(10))
        .await
        .expect("quiet round trips");

    let mut stalled = vec![];
    for i in 0..8 {
        let mut s = mallory4(port, &format!("mallory-sub-{i}"));
        let mut b = BytesMut::new();
        v4::Subscribe::new("devices/mallory/#", rumqttc::QoS::AtLeastOnce)
            .write(&mut b)
            .unwrap();
        s.write_all(&b).unwrap();
        let mut suback = [0u8; 5];
        s.read_exact(&mut suback).unwrap();
        stalled.push(s);
    }
    let mut o = opts(port, "mallory-pub");
    o.set_credentials("mallory", "mallory-pw");
    let (publisher, pev) = connect(o).await.unwrap();
    let _drive = drive(pev);
    let flood = tokio::spawn(async move {
        for i in 0..4000u32 {
            let mut body = i.to_be_bytes().to_vec();
            body.resize(1024, b'm');
            publisher
                .publish("devices/mallory/x", rumqttc::QoS::AtLeastOnce, false, body)
                .await
                .unwrap();
        }
    });
    let under = by.median(40, Duration::from_millis(25)).await;
    assert_unhurt(quiet, under, "8 stalled subscribers of one user");
    tokio::time::timeout(Duration::from_secs(30), flood)
        .await
        .expect("mallory's own publisher was paused")
        .unwrap();
    let st = gw.status();
    let r = &st["router"];
    assert_eq!(r["publisher_pauses"].as_u64(), Some(0), "{r}");
    assert!(
        r["dropped"]["user_share"].as_u64().unwrap_or(0) > 0,
        "drops are counted: {r}"
    );
    assert!(
        r["queued_bytes"].as_u64().unwrap() <= r["user_budget"].as_u64().unwrap() + 64 * 1024,
        "one user's queues past its share: {r}"
    );
    drop(stalled);
}

/// A 3.1.1 CONNECT as `user` from the loopback address `from` (127.0.0.x); the CONNACK code,
/// or `None` when the socket closed or nothing came within 5 s.
fn login_from(port: u16, from: [u8; 4], id: &str, user: &str, pw: &str) -> Option<u8> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&std::net::SocketAddr::from((from, 0)).into()).unwrap();
    sock.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
        .ok()?;
    let mut s: TcpStream = sock.into();
    let mut c = v4::Connect::new(id);
    c.set_login(user, pw);
    let mut b = BytesMut::new();
    v4::Packet::Connect(c).write(&mut b, 1 << 20).unwrap();
    s.write_all(&b).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).ok()?;
    Some(ack[3])
}

#[test]
fn a_password_guesser_locks_out_neither_the_user_nor_its_neighbours() {
    let _heavy = heavy();
    // Issue 29, point 5: while 127.0.0.2 guesses alice's password (and a device's), alice gets
    // in from 127.0.0.1, and mallory, behind the guesser's own address, gets in too.
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let port = free_port();
    let gw = Gateway::start(&two_users(port, "{}"));
    let stop = Arc::new(AtomicBool::new(false));
    let guesses = Arc::new(AtomicUsize::new(0));
    let guessers: Vec<_> = (0..4)
        .map(|t| {
            let (stop, guesses) = (stop.clone(), guesses.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let code = login_from(
                        port,
                        [127, 0, 0, 2],
                        &format!("g{t}-{n}"),
                        "alice",
                        &format!("guess{n}"),
                    );
                    assert_ne!(code, Some(0), "a guess got in");
                    guesses.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let mut alice_in = 0;
    for i in 0..25 {
        alice_in += (login_from(port, [127, 0, 0, 1], &format!("alice-{i}"), "alice", "alice-pw") == Some(0)) as usize;
    }
    let neighbour = login_from(port, [127, 0, 0, 2], "m-1", "mallory", "mallory-pw");
    stop.store(true, Ordering::Relaxed);
    for g in guessers {
        g.join().unwrap();
    }
    assert_eq!(alice_in, 25, "alice got in {alice_in} of 25 times during the guessing");
    assert_eq!(neighbour, Some(0), "a user behind the guesser's address was locked out");
    // The status file is written every 2 s.
    let end = std::time::Instant::now() + Duration::from_secs(6);
    let mut st = gw.status();
    while st["broker"]["logins_throttled"].as_u64().unwrap_or(0) == 0 && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
        st = gw.status();
    }
    assert!(
        st["broker"]["logins_throttled"].as_u64().unwrap_or(0) > 0,
        "the guesser was slowed down: {} guesses, {}",
        guesses.load(Ordering::Relaxed),
        st["broker"]
    );
    // The guesser, as alice, is still in back-off from its own address: refused.
    let last = login_from(port, [127, 0, 0, 2], "g-last", "alice", "alice-pw");
    assert!(matches!(last, Some(c) if c != 0), "{last:?}");
}

#[test]
fn topics_deeper_than_200_levels_are_refused() {
    // Issue 29, point 6.
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let deep = vec!["a"; 10_000].join("/");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut b = BytesMut::new();
    v4::Packet::Connect(v4::Connect::new("deep"))
        .write(&mut b, 1 << 20)
        .unwrap();
    let mut sub = v4::Subscribe::new(&deep, rumqttc::QoS::AtMostOnce);
    sub.pkid = 1;
    sub.write(&mut b).unwrap();
    s.write_all(&b).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = [0u8; 9];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got[4..], &[0x90, 3, 0, 1, 0x80], "SUBACK refuses the deep filter");
    b.clear();
    v4::Publish::new(&deep, rumqttc::QoS::AtMostOnce, "x")
        .write(&mut b)
        .unwrap();
    s.write_all(&b).unwrap();
    assert!(
        closes_within(&mut s, Duration::from_secs(5)),
        "a 10,000-level topic was taken"
    );
}

#[test]
fn more_open_qos2_publishes_than_receive_maximum_close_with_0x93() {
    // Issue 29, point 6 (Paho's test_flow_control2): 101 QoS 2 PUBLISHes, no PUBREL, against
    // a Receive Maximum of 100.
    let port = free_port();
    let _gw = Gateway::start(&open_broker(port));
    let c = v5::Connect {
        keep_alive: 60,
        client_id: "qos2-flood".into(),
        clean_start: true,
        properties: None,
    };
    let mut b = BytesMut::new();
    c.write(&None, &None, &mut b).unwrap();
    for pkid in 1..=101u16 {
        let mut p = v5::Publish::new("q2/flood", Q5::ExactlyOnce, &b"x"[..], None);
        p.pkid = pkid;
        p.write(&mut b).unwrap();
    }
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(&b).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut all = vec![];
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        all.extend_from_slice(&buf[..n]);
    }
    // CONNACK, then PUBRECs, then a DISCONNECT with 0x93.
    let packets = split_packets(&all);
    let recs = packets.iter().filter(|(first, _)| first >> 4 == 5).count();
    assert!(recs <= 100, "{recs} PUBRECs: more than the Receive Maximum");
    let last = packets.last().expect("packets came back");
    assert_eq!(
        (last.0, last.1.first()),
        (0xe0, Some(&0x93)),
        "the last packet is DISCONNECT 0x93"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_acknowledges_is_cut_off_while_messages_wait() {
    // Issue 29, point 6: Receive Maximum 1, the one delivery never acknowledged, more waiting:
    // cut off after the write timeout (1.5 x keep-alive, 30 s at least), not kept for ever.
    let port = free_port();
    let gw = Gateway::start(&two_users(port, "{}"));
    let mut m = mallory5(port, "mallory-noack", 1, 10);
    let mut b = BytesMut::new();
    let mut sub = v5::Subscribe::new(v5::Filter::new("devices/mallory/#", Q5::AtLeastOnce), None);
    sub.pkid = 1;
    sub.write(&mut b).unwrap();
    m.write_all(&b).unwrap();
    let mut o = opts(port, "mallory-pub2");
    o.set_credentials("mallory", "mallory-pw");
    let (p, pev) = connect(o).await.unwrap();
    let _d = drive(pev);
    for i in 0..5 {
        p.publish("devices/mallory/x", rumqttc::QoS::AtLeastOnce, false, vec![i; 10])
            .await
            .unwrap();
    }
    // It pings (so its keep-alive never runs out) and reads, but never acknowledges.
    let mut pinger = m.try_clone().unwrap();
    std::thread::spawn(move || {
        while pinger.write_all(&[0xc0, 0]).is_ok() {
            std::thread::sleep(Duration::from_secs(3));
        }
    });
    let started = std::time::Instant::now();
    let closed = tokio::task::spawn_blocking(move || closes_within(&mut m, Duration::from_secs(45)))
        .await
        .unwrap();
    let after = started.elapsed();
    assert!(closed, "a subscriber that never acknowledged was kept over 45 s");
    assert!(after >= Duration::from_secs(25), "cut off too early: {after:?}");
    // The log line follows the close by a moment.
    let end = std::time::Instant::now() + Duration::from_secs(3);
    while !gw.log().contains("no acknowledgement in") && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gw.log().contains("no acknowledgement in"), "the log says why");
}

/// Whole MQTT packets as (first byte, body).
fn split_packets(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = vec![];
    while b.len() >= 2 {
        let (mut len, mut mul, mut i) = (0usize, 1usize, 1);
        loop {
            let d = b[i];
            len += (d & 0x7f) as usize * mul;
            mul *= 128;
            i += 1;
            if d & 0x80 == 0 {
                break;
            }
        }
        if b.len() < i + len {
            break;
        }
        out.push((b[0], b[i..i + len].to_vec()));
        b = &b[i + len..];
    }
    out
}

/// A tmpfs of `size` mounted over `at` for as long as it lives, holding what `at` held (mounting
/// needs root, as CI runs).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn over(at: &std::path::Path, size: &str) -> Tmpfs {
        let keep = tempfile::tempdir().unwrap();
        let cp = |from: &std::path::Path, to: &std::path::Path| {
            let st = std::process::Command::new("cp")
                .arg("-a")
                .arg(from)
                .arg(to)
                .status()
                .unwrap();
            assert!(st.success());
        };
        cp(&at.join("."), keep.path());
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mounting a tmpfs over {} needs root", at.display());
        cp(&keep.path().join("."), at);
        Tmpfs(at.to_path_buf())
    }

    /// Fills it up but for `leave` bytes.
    fn fill(&self, leave: u64) -> std::path::PathBuf {
        let filler = self.0.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        loop {
            let st = nix_statvfs_free(&self.0);
            if st <= leave + chunk.len() as u64 {
                break;
            }
            if f.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = f.sync_all();
        filler
    }
}

/// Free bytes of the file system at `p` (`df` in bytes).
fn nix_statvfs_free(p: &std::path::Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A QoS 1 PUBLISH (MQTT 5) on a raw socket; the PUBACK's reason code, or `None` when the
/// connection closed instead.
fn publish5(s: &mut TcpStream, topic: &str, pkid: u16, retain: bool, body: &[u8]) -> Option<u8> {
    let mut p = v5::Publish::new(topic, Q5::AtLeastOnce, body.to_vec(), None);
    p.pkid = pkid;
    p.retain = retain;
    let mut b = BytesMut::new();
    p.write(&mut b).unwrap();
    s.write_all(&b).ok()?;
    let mut head = [0u8; 2];
    s.read_exact(&mut head).ok()?;
    let mut rest = vec![0u8; head[1] as usize];
    s.read_exact(&mut rest).ok()?;
    assert_eq!(head[0], 0x40, "a PUBACK");
    assert_eq!(&rest[..2], &pkid.to_be_bytes());
    Some(rest.get(2).copied().unwrap_or(0))
}

#[test]
fn a_full_disk_refuses_a_retained_publish_instead_of_acknowledging_it_and_recovers() {
    // Issue 29, point 3: on a full data directory a retained QoS 1 PUBLISH got its PUBACK and
    // was gone after a restart.
    let port = free_port();
    let mut gw = Gateway::start(&two_users(port, "{}"));
    assert!(gw.stop());
    let disk = Tmpfs::over(&gw.dir.path().join("data"), "16m");
    gw.start_again();
    let filler = disk.fill(0);

    let mut m = mallory5(port, "mallory-disk", 10, 60);
    // 200 KiB: more than the room left in the store's files (a few bytes may still fit).
    assert_eq!(
        publish5(&mut m, "devices/mallory/r", 1, true, &[b'n'; 200 * 1024]),
        Some(0x97),
        "a retained publish that could not be stored was acknowledged"
    );
    // The connection goes on, and a plain (not retained, not persistent) publish is taken.
    assert_eq!(publish5(&mut m, "devices/mallory/live", 2, false, b"x"), Some(0));
    // /healthz says why (the status file is written every 2 s).
    let url = format!("http://127.0.0.1:{}/healthz", gw.dashboard.unwrap());
    let end = std::time::Instant::now() + Duration::from_secs(6);
    let mut code = 0;
    while std::time::Instant::now() < end {
        code = match ureq::get(&url).call() {
            Ok(r) => r.status().as_u16(),
            Err(ureq::Error::StatusCode(c)) => c,
            Err(_) => 0,
        };
        if code == 503 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(code, 503, "/healthz while the store cannot write");
    // Counted (the status file cannot be written on this disk: /metrics has it from memory).
    let metrics = ureq::get(&format!("http://127.0.0.1:{}/metrics", gw.dashboard.unwrap()))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    let not_kept = metrics
        .lines()
        .find_map(|l| l.strip_prefix("outpost_publishes_not_kept_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(not_kept >= Some(1.0), "outpost_publishes_not_kept_total: {not_kept:?}");

    // Space comes back: the next retained publish is stored and acknowledged.
    std::fs::remove_file(filler).unwrap();
    assert_eq!(publish5(&mut m, "devices/mallory/r", 3, true, b"kept"), Some(0));
    drop(m);
    assert!(gw.stop(), "{}", gw.log());
    gw.start_again();
    let mut o = opts(port, "alice-check");
    o.set_credentials("mallory", "mallory-pw");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let got = rt.block_on(async {
        let (c, mut ev) = connect(o).await.unwrap();
        subscribe(&c, &mut ev, "devices/mallory/r", rumqttc::QoS::AtLeastOnce).await;
        next_publish(&mut ev, Duration::from_secs(5)).await
    });
    assert_eq!(got, Some(("devices/mallory/r".into(), b"kept".to_vec(), true)));
    drop(gw);
    drop(disk);
}

//! Reconnect storms (issue 29, point 4): a crowd of devices connecting at once, as after a
//! power cut or an access point's restart, again and again with the same client ids, all get
//! in (later, not never) and lose nothing. Scaled here; `OUTPOST_SOAK=1` runs the full size.

use crate::common::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn soak() -> bool {
    std::env::var("OUTPOST_SOAK").is_ok_and(|v| v == "1")
}

/// One device: CONNECT (3.1.1, clean), then `msgs` QoS 1 PUBLISHes a second apart, each
/// waited for its PUBACK, then DISCONNECT. Returns how many were acknowledged, or why it
/// could not get in.
async fn device(port: u16, id: String, msgs: usize) -> Result<usize, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut c = vec![0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, id.len() as u8];
    c.extend(id.as_bytes());
    c[1] = (c.len() - 2) as u8;
    s.write_all(&c).await.map_err(|e| format!("write CONNECT: {e}"))?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut ack))
        .await
        .map_err(|_| "no CONNACK in 30 s".to_string())?
        .map_err(|e| format!("closed before CONNACK: {e}"))?;
    if ack != [0x20, 2, 0, 0] {
        return Err(format!("CONNACK {ack:02x?}"));
    }
    let mut acked = 0;
    for n in 0..msgs {
        let topic = format!("storm/{id}");
        let body = format!("{n}");
        let mut p = vec![0x32, 0, 0, topic.len() as u8];
        p.extend(topic.as_bytes());
        p.extend(((n + 1) as u16).to_be_bytes());
        p.extend(body.as_bytes());
        p[1] = (p.len() - 2) as u8;
        if s.write_all(&p).await.is_err() {
            break;
        }
        let mut pa = [0u8; 4];
        match tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut pa)).await {
            Ok(Ok(_)) if pa[0] == 0x40 => acked += 1,
            _ => break,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = s.write_all(&[0xe0, 0]).await;
    Ok(acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_reconnecting_with_the_same_ids_gets_in_every_round_and_loses_nothing() {
    let _heavy = heavy_async().await;
    let (devices, rounds, msgs) = if soak() { (5000, 4, 20) } else { (1000, 3, 3) };
    let port = free_port();
    let gw = Gateway::start(&format!(
        "{}  limits: {{ max_connections: {} }}\n",
        open_broker(port),
        devices + 100
    ));
    let (sub, mut sev) = connect(opts(port, "storm-watch")).await.unwrap();
    subscribe(&sub, &mut sev, "storm/#", rumqttc::QoS::AtLeastOnce).await;
    let received = Arc::new(AtomicUsize::new(0));
    let r = received.clone();
    let _watch = tokio::spawn(async move {
        while let Ok(e) = sev.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(_)) = e {
                r.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let mut acked_total = 0;
    for round in 0..rounds {
        // All at once.
        let crowd: Vec<_> = (0..devices)
            .map(|i| tokio::spawn(device(port, format!("dev-{i}"), msgs)))
            .collect();
        let mut refused = vec![];
        for d in crowd {
            match d.await.unwrap() {
                Ok(n) => acked_total += n,
                Err(why) => refused.push(why),
            }
        }
        if !refused.is_empty() {
            let log = gw.log();
            let tail: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG")).rev().take(40).collect();
            panic!(
                "round {round}: {} of {devices} devices did not get in, e.g. {:?}\nstatus: {}\nlog tail:\n{}",
                refused.len(),
                &refused[..refused.len().min(3)],
                gw.status()["broker"],
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    assert_eq!(acked_total, devices * rounds * msgs, "publishes not acknowledged");
    let want = devices * rounds * msgs;
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while received.load(Ordering::Relaxed) < want && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(received.load(Ordering::Relaxed), want, "messages lost in the storm");
    assert!(
        gw.status()["broker"]["handshakes_failed"].as_u64() == Some(0),
        "{}",
        gw.status()["broker"]
    );
}

/// One login with a password; the CONNACK code, or `None` if the socket closed first.
async fn login(port: u16, id: &str, user: &str, pw: &str) -> Option<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xc2, 0, 60];
    for f in [id, user, pw] {
        body.extend((f.len() as u16).to_be_bytes());
        body.extend(f.as_bytes());
    }
    let mut c = vec![0x10, body.len() as u8];
    c.extend(body);
    s.write_all(&c).await.ok()?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut ack))
        .await
        .ok()?
        .ok()?;
    Some(ack[3])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_logging_in_with_passwords_is_told_busy_never_wrong_and_gets_in() {
    // The attack review (A11): with passwords, a crowd waits for the few argon2 checks; the
    // sockets evicted or out of time were refused as wrong passwords, and those failures put
    // the user in back-off. Now they are told the server is busy (3), and they retry.
    let _heavy = heavy_async().await;
    let devices = if soak() { 2000 } else { 800 };
    let port = free_port();
    let hash = passwd("fleet-pw");
    let _gw = Gateway::start(&format!(
        "broker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt, anonymous: false }}\n  users:\n    - {{ name: fleet, password_hash: \"{hash}\" }}\n  limits: {{ max_connections: {} }}\n",
        devices + 100
    ));
    let wrong = Arc::new(AtomicUsize::new(0));
    let busy = Arc::new(AtomicUsize::new(0));
    let crowd: Vec<_> = (0..devices)
        .map(|i| {
            let (wrong, busy) = (wrong.clone(), busy.clone());
            tokio::spawn(async move {
                let end = tokio::time::Instant::now() + Duration::from_secs(90);
                while tokio::time::Instant::now() < end {
                    match login(port, &format!("fleet-{i}"), "fleet", "fleet-pw").await {
                        Some(0) => return true,
                        Some(3) | None => busy.fetch_add(1, Ordering::Relaxed),
                        Some(_) => wrong.fetch_add(1, Ordering::Relaxed),
                    };
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                false
            })
        })
        .collect();
    let mut got_in = 0;
    for c in crowd {
        got_in += c.await.unwrap() as usize;
    }
    assert_eq!(
        wrong.load(Ordering::Relaxed),
        0,
        "right passwords refused as wrong ({} busy answers)",
        busy.load(Ordering::Relaxed)
    );
    assert_eq!(got_in, devices, "devices that never got in within 90 s");
}

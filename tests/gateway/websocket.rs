//! WebSocket clients cannot crash or slow the gateway (issue 29, point 1): ping floods before
//! and after CONNECT, on a `ws` listener and on the dashboard's `/mqtt`, from peers that never
//! read, while a bystander's QoS 1 round trip is measured.

use crate::common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A masked client frame.
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() <= 125);
    let key = [0x11u8, 0x22, 0x33, 0x44];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    f.extend(key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

/// Opens a WebSocket on `port` at `path` and returns the socket after the `101`.
fn upgrade(port: u16, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: mqtt\r\n\r\n"
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = vec![];
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).expect("an HTTP answer to the upgrade");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "no upgrade: {head}");
    s
}

/// Writes 125-byte pings, 50 per write, never reading, until `stop` or until the gateway cuts
/// the socket off; returns whether it was cut off.
fn flood(mut s: TcpStream, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let ping = frame(0x9, &[0x5a; 125]);
        let burst: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 50).collect();
        s.set_write_timeout(Some(Duration::from_millis(200))).unwrap();
        while !stop.load(Ordering::Relaxed) {
            match s.write(&burst) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => return true,
            }
        }
        false
    })
}

fn connect_packet(id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0, 0, id.len() as u8];
    body.extend(id.as_bytes());
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

/// `websocket_violations` from the status file (written every 2 s), once it reaches `want` or
/// after 6 s.
async fn violations_reach(gw: &Gateway, want: u64) -> u64 {
    let end = Instant::now() + Duration::from_secs(6);
    loop {
        let n = gw.status()["broker"]["websocket_violations"].as_u64().unwrap_or(0);
        if n >= want || Instant::now() > end {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_floods_that_never_read_are_cut_off_and_nobody_else_notices() {
    let _heavy = heavy_async().await;
    let (port, ws, dport) = (free_port(), free_port(), free_port());
    let mut gw = Gateway::start(&format!(
        "broker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n    - {{ bind: \"127.0.0.1:{ws}\", protocol: ws }}\n\
         dashboard:\n  bind: \"127.0.0.1:{dport}\"\n  anonymous: true\n"
    ));
    let mut by = Bystander::connect(port, "by").await;
    let quiet = by
        .median(20, Duration::from_millis(10))
        .await
        .expect("quiet round trips");

    // Before CONNECT on both WebSocket doors, and after CONNECT (keep-alive 0: no deadline
    // ends it) on the listener.
    let mut logged_in = upgrade(ws, "/mqtt");
    let mut f = frame(0x2, &connect_packet("flooder"));
    logged_in.write_all(&f).unwrap();
    let mut connack = [0u8; 6];
    logged_in.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x82, 4, 0x20, 2, 0, 0], "the flooder logs in first");
    f.clear();
    let stop = Arc::new(AtomicBool::new(false));
    let floods = [
        flood(upgrade(ws, "/mqtt"), stop.clone()),
        flood(upgrade(dport, "/mqtt"), stop.clone()),
        flood(logged_in, stop.clone()),
    ];
    let started = Instant::now();
    let under = by.median(40, Duration::from_millis(25)).await;
    assert!(
        gw.alive(),
        "the gateway died under a WebSocket ping flood:\n{}",
        gw.log()
    );
    assert_unhurt(quiet, under, "three WebSocket ping floods");

    // Each flooder is cut off by the gateway, well before the connect deadline (10 s) would.
    while floods.iter().any(|f| !f.is_finished()) && started.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let cut: Vec<bool> = floods.into_iter().map(|f| f.join().unwrap()).collect();
    assert_eq!(cut, [true, true, true], "every ping flood is cut off within 8 s");
    let counted = violations_reach(&gw, 3).await;
    assert!(counted >= 3, "each flood is counted: {counted}");
    assert!(by.round_trip().await.is_some());
    assert!(gw.alive());
}

#[tokio::test]
async fn text_frames_and_oversized_frames_close_only_that_websocket() {
    let (port, ws) = (free_port(), free_port());
    let gw = Gateway::start(&format!(
        "broker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n    - {{ bind: \"127.0.0.1:{ws}\", protocol: ws }}\n  limits:\n    max_packet_size: 1KiB\n"
    ));
    let mut by = Bystander::connect(port, "by").await;
    let mut text = upgrade(ws, "/mqtt");
    text.write_all(&frame(0x1, b"MQTT as text")).unwrap();
    assert!(
        closes_within(&mut text, Duration::from_secs(5)),
        "a text frame was taken"
    );

    let mut big = upgrade(ws, "/mqtt");
    // A binary frame announcing 64 KiB, over the 1 KiB packet limit.
    let mut head = vec![0x82, 0x80 | 126];
    head.extend(65535u16.to_be_bytes());
    head.extend([1, 2, 3, 4]);
    big.write_all(&head).unwrap();
    assert!(
        closes_within(&mut big, Duration::from_secs(5)),
        "an oversized frame was taken"
    );

    // A CONNECT cut into fragments with pings between them is one MQTT packet.
    let mut frag = upgrade(ws, "/mqtt");
    let c = connect_packet("fragments");
    let (a, b) = c.split_at(5);
    let mut wire = vec![0x02, 0x80 | a.len() as u8, 0, 0, 0, 0];
    wire.extend(a);
    wire.extend(frame(0x9, b"between"));
    wire.extend([0x80, 0x80 | b.len() as u8, 0, 0, 0, 0]);
    wire.extend(b);
    frag.write_all(&wire).unwrap();
    let mut got: Vec<u8> = vec![];
    let mut buf = [0u8; 64];
    while !got.windows(4).any(|w| w == [0x20u8, 2, 0, 0]) {
        let n = frag.read(&mut buf).expect("a CONNACK after fragments");
        assert!(n > 0, "closed after a fragmented CONNECT");
        got.extend(&buf[..n]);
    }
    assert!(by.round_trip().await.is_some());
    let counted = violations_reach(&gw, 2).await;
    assert!(counted >= 2, "text and oversized frames are counted: {counted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_subscriber_gets_a_large_retained_set_whole() {
    // The attack review of the adapter (D1): 80 x 4 KB retained messages to a `#` subscriber on
    // `/mqtt` went out as one oversized write, and the client was cut off with nothing.
    let (port, ws) = (free_port(), free_port());
    let _gw = Gateway::start(&format!(
        "broker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n    - {{ bind: \"127.0.0.1:{ws}\", protocol: ws }}\n"
    ));
    let (p, pev) = connect(opts(port, "retainer")).await.unwrap();
    let _d = drive(pev);
    for i in 0..300 {
        p.publish(format!("big/{i}"), rumqttc::QoS::AtLeastOnce, true, vec![b'r'; 4000])
            .await
            .unwrap();
    }
    // The retained set is in once a plain client sees all of it.
    let (c, mut cev) = connect(opts(port, "check")).await.unwrap();
    subscribe(&c, &mut cev, "big/#", rumqttc::QoS::AtMostOnce).await;
    let mut n = 0;
    while n < 300 && next_publish(&mut cev, Duration::from_secs(5)).await.is_some() {
        n += 1;
    }
    assert_eq!(n, 300);

    let mut o = rumqttc::MqttOptions::new("ws-wide", format!("ws://127.0.0.1:{ws}/mqtt"), ws);
    o.set_transport(rumqttc::Transport::Ws);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (w, mut wev) = connect(o).await.unwrap();
    subscribe(&w, &mut wev, "#", rumqttc::QoS::AtLeastOnce).await;
    let mut got = 0;
    while got < 300 {
        match next_publish(&mut wev, Duration::from_secs(10)).await {
            Some((t, body, true)) if t.starts_with("big/") => {
                assert_eq!(body.len(), 4000);
                got += 1;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(got, 300, "the WebSocket subscriber got {got} of 300 retained messages");
}

//! What the benchmarks share: broker processes (outpost, Mosquitto) pinned to core 0, and a
//! raw MQTT 3.1.1 load generator (publishers and subscribers that timestamp every message).

#![allow(dead_code)]

use bytes::{BufMut, BytesMut};
use outpost::broker::codec::{self, kind, Proto};
use rumqttc::mqttbytes::v4;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Payload bytes of every message the load generator sends (at least 16: sequence and time).
pub static PAYLOAD: AtomicU64 = AtomicU64::new(64);

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A broker process under test.
pub struct Broker {
    pub child: Child,
    pub port: u16,
    pub ready_in: Duration,
    pub dir: tempfile::TempDir,
}

impl Broker {
    pub fn outpost() -> Broker {
        Broker::outpost_with("")
    }

    /// outpost with `extra` appended to its config (e.g. a `bridges:` section).
    pub fn outpost_with(extra: &str) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg = dir.path().join("outpost.yaml");
        std::fs::write(
            &cfg,
            format!(
                "gateway: {{ data_dir: {} }}\nlog: {{ level: warn }}\nbroker:\n  listeners: [ {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }} ]\n{extra}",
                dir.path().display()
            ),
        )
        .unwrap();
        let sock_path = dir.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let start = Instant::now();
        let child = Command::new("taskset")
            .args(["-c", "0", env!("CARGO_BIN_EXE_outpost"), "run", "--config"])
            .arg(&cfg)
            .env("NOTIFY_SOCKET", &sock_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 512];
        loop {
            let n = sock.recv(&mut buf).expect("outpost READY=1");
            if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
                break;
            }
        }
        Broker {
            child,
            port,
            ready_in: start.elapsed(),
            dir,
        }
    }

    pub fn mosquitto() -> Broker {
        Broker::mosquitto_with("", "0")
    }

    /// Mosquitto with `extra` config lines, pinned to the cores in `cpus`.
    pub fn mosquitto_with(extra: &str, cpus: &str) -> Broker {
        Broker::mosquitto_on(free_port(), extra, cpus)
    }

    pub fn mosquitto_on(port: u16, extra: &str, cpus: &str) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("mosquitto.conf");
        std::fs::write(
            &cfg,
            format!("listener {port} 127.0.0.1\npersistence false\nset_tcp_nodelay true\nmax_queued_messages 2000000\n{}\n{extra}\n", if extra.contains("allow_anonymous") { "" } else { "allow_anonymous true" }),
        )
        .unwrap();
        let start = Instant::now();
        let child = Command::new("taskset")
            .args(["-c", cpus, "mosquitto", "-c"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (Debian package mosquitto) must be installed");
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            std::thread::sleep(Duration::from_millis(1));
        }
        Broker {
            child,
            port,
            ready_in: start.elapsed(),
            dir,
        }
    }

    /// Resident memory of the broker process, in MiB: now and at its peak.
    pub fn rss(&self) -> (f64, f64) {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| {
            s.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
                / 1024.0
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw MQTT 3.1.1 connection.
pub struct Conn {
    pub s: TcpStream,
    pub buf: BytesMut,
}

impl Conn {
    pub fn open(port: u16, id: &str) -> Conn {
        Conn::open_as(port, id, None)
    }

    pub fn open_as(port: u16, id: &str, login: Option<(&str, &str)>) -> Conn {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = Conn {
            s,
            buf: BytesMut::with_capacity(1 << 16),
        };
        let mut connect = v4::Connect::new(id);
        connect.keep_alive = 60;
        if let Some((u, p)) = login {
            connect.set_login(u, p);
        }
        let mut b = BytesMut::new();
        connect.write(&mut b).unwrap();
        c.s.write_all(&b).unwrap();
        let ack = c.next().unwrap();
        assert_eq!(ack.kind, kind::CONNACK);
        c
    }

    pub fn subscribe(&mut self, filter: &str, qos: u8) {
        let mut s = v4::Subscribe::new(filter, rumqttc::mqttbytes::qos(qos).unwrap());
        s.pkid = 1;
        let mut b = BytesMut::new();
        s.write(&mut b).unwrap();
        self.s.write_all(&b).unwrap();
        while self.next().unwrap().kind != kind::SUBACK {}
    }

    pub fn next(&mut self) -> Option<codec::Frame> {
        loop {
            if let Some(f) = codec::next_frame(&mut self.buf, 1 << 20).unwrap() {
                return Some(f);
            }
            let mut tmp = [0u8; 65536];
            match self.s.read(&mut tmp) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }
}

pub fn now_ns(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

pub fn publish(out: &mut BytesMut, topic: &str, qos: u8, pkid: u16, seq: u64, sent_ns: u64) {
    let mut payload = vec![0u8; (PAYLOAD.load(Ordering::Relaxed) as usize).max(16)];
    payload[..8].copy_from_slice(&seq.to_be_bytes());
    payload[8..16].copy_from_slice(&sent_ns.to_be_bytes());
    publish_raw(out, topic, qos, pkid, &payload);
}

/// A subscriber thread: acks QoS 1 deliveries, records latencies, counts messages.
pub fn spawn_subscriber(
    port: u16,
    id: &str,
    filter: &str,
    qos: u8,
    epoch: Instant,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<u64>> {
    spawn_subscriber_auth(port, id, filter, qos, epoch, count, stop, None)
}

/// As `spawn_subscriber`, logging in with a user name and password.
#[allow(clippy::too_many_arguments)]
pub fn spawn_subscriber_auth(
    port: u16,
    id: &str,
    filter: &str,
    qos: u8,
    epoch: Instant,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    login: Option<(&str, &str)>,
) -> std::thread::JoinHandle<Vec<u64>> {
    let mut c = Conn::open_as(port, id, login);
    c.subscribe(filter, qos);
    c.s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    std::thread::spawn(move || {
        let mut lat = Vec::with_capacity(1 << 20);
        let mut acks = BytesMut::new();
        let mut tmp = vec![0u8; 1 << 16];
        while !stop.load(Ordering::Relaxed) {
            let n = match c.s.read(&mut tmp) {
                Ok(0) => break,
                Ok(n) => n,
                Err(_) => continue,
            };
            c.buf.extend_from_slice(&tmp[..n]);
            let now = now_ns(epoch);
            while let Ok(Some(f)) = codec::next_frame(&mut c.buf, 1 << 20) {
                if f.kind != kind::PUBLISH {
                    continue;
                }
                let p = codec::decode_publish(Proto::V4, &f).unwrap();
                if p.qos > 0 {
                    acks.put_slice(&[0x40, 2]);
                    acks.put_u16(p.pkid);
                }
                // Payloads of other tools carry no send time: count them only.
                if let Some(sent) = p.payload.get(8..16) {
                    lat.push(now.saturating_sub(u64::from_be_bytes(sent.try_into().unwrap())));
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
            if !acks.is_empty() {
                let _ = c.s.write_all(&acks);
                acks.clear();
            }
        }
        lat
    })
}

/// A publisher: `total` messages at `rate` msg/s (0 = flat out), QoS 1 with a window of 100.
pub fn run_publisher(port: u16, id: &str, topic: &str, qos: u8, total: u64, rate: u64, epoch: Instant) {
    run_publisher_with(Conn::open(port, id), topic, qos, total, rate, &|out, pkid, seq| {
        publish(out, topic, qos, pkid, seq, now_ns(epoch))
    });
}

/// A publisher on an open connection; `write(out, pkid, seq)` appends one PUBLISH.
pub fn run_publisher_with(
    mut c: Conn,
    _topic: &str,
    qos: u8,
    total: u64,
    rate: u64,
    write: &dyn Fn(&mut BytesMut, u16, u64),
) {
    let acked = Arc::new(AtomicU64::new(0));
    let reader = if qos > 0 {
        let mut r = Conn {
            s: c.s.try_clone().unwrap(),
            buf: BytesMut::new(),
        };
        let acked = acked.clone();
        Some(std::thread::spawn(move || {
            while acked.load(Ordering::Relaxed) < total {
                match r.next() {
                    Some(f) if f.kind == kind::PUBACK => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        }))
    } else {
        None
    };
    let mut out = BytesMut::with_capacity(1 << 16);
    let start = Instant::now();
    let mut seq = 0u64;
    let batch = if rate == 0 { 64 } else { (rate / 1000).max(1) };
    while seq < total {
        if let Some(gap) = (seq * 1_000_000_000).checked_div(rate) {
            let due = start + Duration::from_nanos(gap);
            while Instant::now() < due {
                std::hint::spin_loop();
            }
        }
        let mut n = 0;
        while n < batch && seq < total {
            if qos > 0 {
                while seq - acked.load(Ordering::Relaxed) >= 100 {
                    std::hint::spin_loop();
                }
            }
            write(&mut out, (seq % 65535 + 1) as u16, seq);
            seq += 1;
            n += 1;
            if qos > 0 && seq - acked.load(Ordering::Relaxed) >= 100 {
                break;
            }
        }
        c.s.write_all(&out).unwrap();
        out.clear();
    }
    if let Some(r) = reader {
        let _ = r.join();
    }
}

/// A subscriber that only counts PUBLISHes (any payload).
pub fn spawn_subscriber_plain(
    port: u16,
    filter: &str,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<u64>> {
    spawn_subscriber_auth(port, "bench-plain-sub", filter, 0, Instant::now(), count, stop, None)
}

/// Appends a PUBLISH with the given payload.
pub fn publish_raw(out: &mut BytesMut, topic: &str, qos: u8, pkid: u16, payload: &[u8]) {
    let body = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload.len();
    out.put_u8(0x30 | (qos << 1));
    let mut len = body;
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if len == 0 {
            break;
        }
    }
    out.put_u16(topic.len() as u16);
    out.put_slice(topic.as_bytes());
    if qos > 0 {
        out.put_u16(pkid);
    }
    out.put_slice(payload);
}

//! Broker benchmark: outpost against Debian's Mosquitto on the same machine, in the same run,
//! with the same load generator (raw MQTT 3.1.1 over loopback, 64-byte payloads).
//!
//! The broker under test is pinned to core 0 and this process to core 1. For each broker:
//! flat-out throughput at QoS 0 and 1 (one publisher, one subscriber), latency p50/p99 at a fixed
//! 10k msg/s, idle RSS, RSS under 10 publishers x 10 subscribers at QoS 1, and start-to-ready.
//! Medians of `--runs` runs (default 3). Run: `cargo bench --bench broker [-- --runs N]`.

use bytes::{BufMut, BytesMut};
use outpost::broker::codec::{self, kind, Proto};
use rumqttc::mqttbytes::v4;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PAYLOAD: usize = 64;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A broker process under test.
struct Broker {
    child: Child,
    port: u16,
    ready_in: Duration,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn outpost() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg = dir.path().join("outpost.yaml");
        std::fs::write(
            &cfg,
            format!(
                "gateway: {{ data_dir: {} }}\nlog: {{ level: warn }}\nbroker:\n  listeners: [ {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }} ]\n",
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
            _dir: dir,
        }
    }

    fn mosquitto() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let cfg = dir.path().join("mosquitto.conf");
        std::fs::write(
            &cfg,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\nmax_queued_messages 100000\n"),
        )
        .unwrap();
        let start = Instant::now();
        let child = Command::new("taskset")
            .args(["-c", "0", "mosquitto", "-c"])
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
            _dir: dir,
        }
    }

    /// Resident memory of the broker process, in MiB: now and at its peak.
    fn rss(&self) -> (f64, f64) {
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
struct Conn {
    s: TcpStream,
    buf: BytesMut,
}

impl Conn {
    fn open(port: u16, id: &str) -> Conn {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = Conn {
            s,
            buf: BytesMut::with_capacity(1 << 16),
        };
        let mut connect = v4::Connect::new(id);
        connect.keep_alive = 60;
        let mut b = BytesMut::new();
        connect.write(&mut b).unwrap();
        c.s.write_all(&b).unwrap();
        let ack = c.next().unwrap();
        assert_eq!(ack.kind, kind::CONNACK);
        c
    }

    fn subscribe(&mut self, filter: &str, qos: u8) {
        let mut s = v4::Subscribe::new(filter, rumqttc::mqttbytes::qos(qos).unwrap());
        s.pkid = 1;
        let mut b = BytesMut::new();
        s.write(&mut b).unwrap();
        self.s.write_all(&b).unwrap();
        while self.next().unwrap().kind != kind::SUBACK {}
    }

    fn next(&mut self) -> Option<codec::Frame> {
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

fn now_ns(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

fn publish(out: &mut BytesMut, topic: &str, qos: u8, pkid: u16, seq: u64, sent_ns: u64) {
    let body = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + PAYLOAD;
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
    out.put_u64(seq);
    out.put_u64(sent_ns);
    out.put_bytes(0, PAYLOAD - 16);
}

/// A subscriber thread: acks QoS 1 deliveries, records latencies, counts messages.
fn spawn_subscriber(
    port: u16,
    id: &str,
    filter: &str,
    qos: u8,
    epoch: Instant,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<u64>> {
    let mut c = Conn::open(port, id);
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
                let sent = u64::from_be_bytes(p.payload[8..16].try_into().unwrap());
                lat.push(now.saturating_sub(sent));
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
fn run_publisher(port: u16, id: &str, topic: &str, qos: u8, total: u64, rate: u64, epoch: Instant) {
    let mut c = Conn::open(port, id);
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
            publish(&mut out, topic, qos, (seq % 65535 + 1) as u16, seq, now_ns(epoch));
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

struct Scenario {
    /// Messages delivered per second, and what share arrived.
    rate: f64,
    delivered: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn one_to_one(b: &Broker, qos: u8, total: u64, rate: u64) -> Scenario {
    let epoch = Instant::now();
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sub = spawn_subscriber(b.port, "bench-sub", "bench/t", qos, epoch, count.clone(), stop.clone());
    let t0 = Instant::now();
    run_publisher(b.port, "bench-pub", "bench/t", qos, total, rate, epoch);
    // Wait for deliveries to stop arriving.
    let mut last = count.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    while last < total && last_change.elapsed() < Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(5));
        let now = count.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_change = Instant::now();
        }
    }
    let elapsed = if last >= total { t0.elapsed() } else { last_change - t0 };
    stop.store(true, Ordering::Relaxed);
    let mut lat = sub.join().unwrap();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1e6
    };
    Scenario {
        rate: last as f64 / elapsed.as_secs_f64(),
        delivered: last as f64 / total as f64,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    }
}

/// 10 publishers x 10 subscribers at QoS 1 for a few seconds; returns peak RSS in MiB.
fn fan(b: &Broker, seconds: u64) -> f64 {
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let subs: Vec<_> = (0..10)
        .map(|i| {
            spawn_subscriber(
                b.port,
                &format!("fan-sub-{i}"),
                "fan/#",
                1,
                epoch,
                count.clone(),
                stop.clone(),
            )
        })
        .collect();
    let pubs: Vec<_> = (0..10)
        .map(|i| {
            let port = b.port;
            std::thread::spawn(move || {
                run_publisher(
                    port,
                    &format!("fan-pub-{i}"),
                    &format!("fan/{i}"),
                    1,
                    1000 * seconds,
                    1000,
                    epoch,
                )
            })
        })
        .collect();
    for p in pubs {
        p.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for s in subs {
        s.join().unwrap();
    }
    b.rss().1
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Row {
    qos0: f64,
    qos1: f64,
    qos0_delivered: f64,
    qos1_delivered: f64,
    fixed_delivered: f64,
    lat0: (f64, f64),
    lat1: (f64, f64),
    idle_rss: f64,
    fan_rss: f64,
    ready_ms: f64,
}

fn measure(make: fn() -> Broker, runs: usize) -> Row {
    let mut q0 = vec![];
    let mut q0d = vec![];
    let mut q1 = vec![];
    let mut q1d = vec![];
    let (mut l0, mut l1) = (vec![], vec![]);
    let mut idle = vec![];
    let mut ready = vec![];
    for _ in 0..runs {
        let b = make();
        ready.push(b.ready_in.as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(500));
        idle.push(b.rss().0);
        let s = one_to_one(&b, 0, 200_000, 0);
        q0.push(s.rate);
        q0d.push(s.delivered);
        let s = one_to_one(&b, 1, 100_000, 0);
        q1.push(s.rate);
        q1d.push(s.delivered);
        l0.push(one_to_one(&b, 0, 30_000, 10_000));
        l1.push(one_to_one(&b, 1, 30_000, 10_000));
    }
    let fan_rss = fan(&make(), 5);
    Row {
        qos0: median(q0),
        qos0_delivered: median(q0d),
        qos1: median(q1),
        qos1_delivered: median(q1d),
        fixed_delivered: l0.iter().chain(&l1).map(|s| s.delivered).fold(1.0, f64::min),
        lat0: (
            median(l0.iter().map(|s| s.p50_ms).collect()),
            median(l0.iter().map(|s| s.p99_ms).collect()),
        ),
        lat1: (
            median(l1.iter().map(|s| s.p50_ms).collect()),
            median(l1.iter().map(|s| s.p99_ms).collect()),
        ),
        idle_rss: median(idle),
        fan_rss,
        ready_ms: median(ready),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; anything else (cargo test --benches, --list) only builds it.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // The load generator runs on core 1; brokers are started on core 0.
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
    let m = measure(Broker::mosquitto, runs);
    let o = measure(Broker::outpost, runs);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let mut t = String::new();
    t += "| metric | outpost | mosquitto | outpost / mosquitto |\n|---|---|---|---|\n";
    t += &format!(
        "| QoS 0 flat out, 1 pub → 1 sub, delivered msg/s | {:.0} | {:.0} | {:.2}× |\n",
        o.qos0,
        m.qos0,
        ratio(o.qos0, m.qos0)
    );
    t += &format!(
        "| QoS 0 flat out, share of 200k delivered | {:.1}% | {:.1}% | |\n",
        o.qos0_delivered * 100.0,
        m.qos0_delivered * 100.0
    );
    t += &format!(
        "| QoS 1 flat out, 1 pub → 1 sub, delivered msg/s | {:.0} | {:.0} | {:.2}× |\n",
        o.qos1,
        m.qos1,
        ratio(o.qos1, m.qos1)
    );
    t += &format!(
        "| QoS 1 flat out, share of 100k delivered | {:.1}% | {:.1}% | |\n",
        o.qos1_delivered * 100.0,
        m.qos1_delivered * 100.0
    );
    t += &format!(
        "| QoS 0 latency at a fixed 10k msg/s, p50 / p99 (ms) | {:.2} / {:.2} | {:.2} / {:.2} | p99 {:.2}× |\n",
        o.lat0.0,
        o.lat0.1,
        m.lat0.0,
        m.lat0.1,
        ratio(o.lat0.1, m.lat0.1)
    );
    t += &format!(
        "| QoS 1 latency at a fixed 10k msg/s, p50 / p99 (ms) | {:.2} / {:.2} | {:.2} / {:.2} | p99 {:.2}× |\n",
        o.lat1.0,
        o.lat1.1,
        m.lat1.0,
        m.lat1.1,
        ratio(o.lat1.1, m.lat1.1)
    );
    t += &format!(
        "| idle RSS (MiB) | {:.1} | {:.1} | {:.2}× |\n",
        o.idle_rss,
        m.idle_rss,
        ratio(o.idle_rss, m.idle_rss)
    );
    t += &format!(
        "| peak RSS, 10 pub × 10 sub QoS 1, 10k msg/s in (MiB) | {:.1} | {:.1} | {:.2}× |\n",
        o.fan_rss,
        m.fan_rss,
        ratio(o.fan_rss, m.fan_rss)
    );
    t += &format!("| start to ready (ms) | {:.0} | {:.0} | |\n", o.ready_ms, m.ready_ms);
    t += &format!(
        "| fixed-rate runs: share delivered (min over runs) | {:.1}% | {:.1}% | |\n",
        o.fixed_delivered * 100.0,
        m.fixed_delivered * 100.0
    );
    println!("\n{t}");
    let _ = std::fs::create_dir_all("target");
    std::fs::write("target/bench-broker.md", &t).unwrap();
    println!("(medians of {runs} runs; written to target/bench-broker.md)");
}

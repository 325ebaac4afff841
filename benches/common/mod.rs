//! What the benchmarks share: broker processes (outpost, Mosquitto) pinned to core 0, and a
//! raw MQTT 3.1.1 load generator (publishers and subscribers that timestamp every message).

#![allow(dead_code)]

use bytes::{BufMut, BytesMut};
use outpost::broker::codec::{self, kind, Proto};
use rumqttc::mqttbytes::v4;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
        // `extra` may turn persistence on; `$DIR` in it is this broker's temp dir.
        let persistence = if extra.contains("persistence true") {
            ""
        } else {
            "persistence false\n"
        };
        let anonymous = if extra.contains("allow_anonymous") {
            ""
        } else {
            "allow_anonymous true\n"
        };
        let extra = extra.replace("$DIR", &dir.path().display().to_string());
        std::fs::write(
            &cfg,
            format!("listener {port} 127.0.0.1\n{persistence}set_tcp_nodelay true\nmax_queued_messages 2000000\n{anonymous}{extra}\n"),
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
        Conn::open_session(port, id, login, true).0
    }

    /// Connects with the given clean-session flag; returns the CONNACK's session-present flag.
    pub fn open_session(port: u16, id: &str, login: Option<(&str, &str)>, clean: bool) -> (Conn, bool) {
        Conn::connect(port, id, login, clean).unwrap_or_else(|e| panic!("{id}: {e}"))
    }

    /// As `open_session`, with an error for a refused socket, CONNECT or subscription.
    pub fn connect(port: u16, id: &str, login: Option<(&str, &str)>, clean: bool) -> std::io::Result<(Conn, bool)> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        let mut c = Conn {
            s,
            buf: BytesMut::with_capacity(4096),
        };
        let mut connect = v4::Connect::new(id);
        connect.keep_alive = 60;
        connect.clean_session = clean;
        if let Some((u, p)) = login {
            connect.set_login(u, p);
        }
        let mut b = BytesMut::new();
        connect.write(&mut b).unwrap();
        c.s.write_all(&b)?;
        let refused = |why: String| std::io::Error::new(ErrorKind::ConnectionRefused, why);
        let ack = c.next().ok_or_else(|| refused("closed before CONNACK".into()))?;
        if ack.kind != kind::CONNACK || ack.bytes[3] != 0 {
            return Err(refused(format!("CONNACK {:?}", &ack.bytes[..])));
        }
        let present = ack.bytes[2] & 1 == 1;
        Ok((c, present))
    }

    pub fn subscribe(&mut self, filter: &str, qos: u8) {
        self.try_subscribe(filter, qos)
            .unwrap_or_else(|e| panic!("SUBSCRIBE {filter}: {e}"))
    }

    /// Subscribes and waits for the SUBACK; an error if it refuses the filter or closes.
    pub fn try_subscribe(&mut self, filter: &str, qos: u8) -> std::io::Result<()> {
        let mut s = v4::Subscribe::new(filter, rumqttc::mqttbytes::qos(qos).unwrap());
        s.pkid = 1;
        let mut b = BytesMut::new();
        s.write(&mut b).unwrap();
        self.s.write_all(&b)?;
        loop {
            let f = self.next().ok_or(ErrorKind::ConnectionReset)?;
            if f.kind == kind::SUBACK {
                return match f.bytes.last() {
                    Some(0x80) => Err(std::io::Error::new(ErrorKind::PermissionDenied, "SUBACK failure")),
                    _ => Ok(()),
                };
            }
        }
    }

    /// Sends DISCONNECT and closes: a persistent session goes offline.
    pub fn disconnect(mut self) {
        let _ = self.s.write_all(&[0xe0, 0]);
        let _ = self.s.shutdown(std::net::Shutdown::Both);
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

    /// Reads packets until `done()` or the socket closes, giving each to `on`, which may append
    /// replies; the replies to one read go out in one write (to `w`: the connection's writer,
    /// shared with a publishing thread). Set a read timeout so `done` is checked while idle.
    pub fn pump(
        &mut self,
        w: &Mutex<TcpStream>,
        done: &dyn Fn() -> bool,
        on: &mut dyn FnMut(&codec::Frame, &mut BytesMut),
    ) {
        let mut replies = BytesMut::new();
        let mut tmp = vec![0u8; 1 << 16];
        // What came with an earlier packet (e.g. the CONNACK) is handled before the first read.
        loop {
            while let Ok(Some(f)) = codec::next_frame(&mut self.buf, 1 << 20) {
                on(&f, &mut replies);
            }
            if !replies.is_empty() {
                if w.lock().unwrap().write_all(&replies).is_err() {
                    break;
                }
                replies.clear();
            }
            if done() {
                break;
            }
            match self.s.read(&mut tmp) {
                Ok(0) => break,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => break,
            }
        }
    }
}

/// Raises this process's open-file limit (soft and hard) to `n`; brokers started afterwards
/// inherit it. Returns the soft limit now in force.
pub fn raise_fd_limit(n: libc::rlim_t) -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let want = libc::rlimit {
            rlim_cur: n,
            rlim_max: (n).max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
            // Not privileged: as far as the hard limit goes.
            let soft = libc::rlimit {
                rlim_cur: lim.rlim_max.min(n),
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// Appends a PUBACK, PUBREC, PUBREL or PUBCOMP (`kind::*`) for `pkid`.
pub fn ack(out: &mut BytesMut, packet: u8, pkid: u16) {
    out.put_u8(packet << 4 | if packet == kind::PUBREL { 2 } else { 0 });
    out.put_u8(2);
    out.put_u16(pkid);
}

/// The packet id of a PUBACK, PUBREC, PUBREL or PUBCOMP (3.1.1: no reason code).
pub fn ack_pkid(f: &codec::Frame) -> u16 {
    u16::from_be_bytes([f.bytes[2], f.bytes[3]])
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
    spawn_reader(c, epoch, count, stop)
}

/// The subscriber loop on an open (subscribed) connection, until `stop`: answers QoS 1
/// deliveries with PUBACK, QoS 2 with PUBREC and PUBREL with PUBCOMP; counts every PUBLISH and
/// returns the latencies (ns) of those whose payload carries a send time.
pub fn spawn_reader(
    mut c: Conn,
    epoch: Instant,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<u64>> {
    c.s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let w = Mutex::new(c.s.try_clone().unwrap());
    std::thread::spawn(move || {
        let mut lat = Vec::with_capacity(1 << 16);
        c.pump(&w, &|| stop.load(Ordering::Relaxed), &mut |f, replies| match f.kind {
            kind::PUBLISH => {
                let p = codec::decode_publish(Proto::V4, f).unwrap();
                match p.qos {
                    1 => ack(replies, kind::PUBACK, p.pkid),
                    2 => ack(replies, kind::PUBREC, p.pkid),
                    _ => {}
                }
                // Payloads of other tools carry no send time: count them only.
                if let Some(sent) = p.payload.get(8..16) {
                    let now = now_ns(epoch);
                    lat.push(now.saturating_sub(u64::from_be_bytes(sent.try_into().unwrap())));
                }
                count.fetch_add(1, Ordering::Relaxed);
            }
            kind::PUBREL => ack(replies, kind::PUBCOMP, ack_pkid(f)),
            _ => {}
        });
        lat
    })
}

/// How long a QoS 1/2 publisher waits for its window to move before it gives up.
pub const STALL: Duration = Duration::from_secs(10);

/// A publisher: `total` messages at `rate` msg/s (0 = flat out), QoS 1/2 with a window of 100.
/// Returns how many the broker acknowledged (QoS 1 PUBACK, QoS 2 PUBCOMP; QoS 0: sent).
pub fn run_publisher(port: u16, id: &str, topic: &str, qos: u8, total: u64, rate: u64, epoch: Instant) -> u64 {
    run_publisher_with(Conn::open(port, id), topic, qos, total, rate, &|out, pkid, seq| {
        publish(out, topic, qos, pkid, seq, now_ns(epoch))
    })
}

/// A publisher on an open connection; `write(out, pkid, seq)` appends one PUBLISH. QoS 2 runs
/// the whole flow: PUBREC is answered with PUBREL, a message is done at its PUBCOMP.
pub fn run_publisher_with(
    c: Conn,
    _topic: &str,
    qos: u8,
    total: u64,
    rate: u64,
    write: &dyn Fn(&mut BytesMut, u16, u64),
) -> u64 {
    let acked = Arc::new(AtomicU64::new(0));
    let give_up = Arc::new(AtomicBool::new(false));
    let w = Arc::new(Mutex::new(c.s.try_clone().unwrap()));
    let reader = if qos > 0 {
        let mut r = Conn {
            s: c.s.try_clone().unwrap(),
            buf: BytesMut::new(),
        };
        r.s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let (acked, give_up, w) = (acked.clone(), give_up.clone(), w.clone());
        let publisher = std::thread::current();
        Some(std::thread::spawn(move || {
            let done = || acked.load(Ordering::Relaxed) >= total || give_up.load(Ordering::Relaxed);
            r.pump(&w, &done, &mut |f, replies| match f.kind {
                kind::PUBACK | kind::PUBCOMP => {
                    acked.fetch_add(1, Ordering::Relaxed);
                    publisher.unpark();
                }
                kind::PUBREC => ack(replies, kind::PUBREL, ack_pkid(f)),
                _ => {}
            });
        }))
    } else {
        None
    };
    let mut out = BytesMut::with_capacity(1 << 16);
    let start = Instant::now();
    let mut seq = 0u64;
    let batch = if rate == 0 { 64 } else { (rate / 1000).max(1) };
    'send: while seq < total {
        if let Some(gap) = (seq * 1_000_000_000).checked_div(rate) {
            // Sleep, not spin: the subscribers and ack readers share this core.
            let due = start + Duration::from_nanos(gap);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let mut n = 0;
        while n < batch && seq < total {
            if qos > 0 && !wait_window(&acked, seq) {
                eprintln!(
                    "publisher: window stalled at {} of {total} acknowledged",
                    acked.load(Ordering::Relaxed)
                );
                break 'send;
            }
            write(&mut out, (seq % 65535 + 1) as u16, seq);
            seq += 1;
            n += 1;
            if qos > 0 && seq - acked.load(Ordering::Relaxed) >= 100 {
                break;
            }
        }
        if w.lock().unwrap().write_all(&out).is_err() {
            eprintln!("publisher: connection closed after {seq} of {total}");
            break;
        }
        out.clear();
    }
    let Some(r) = reader else { return seq };
    // The last acknowledgements, unless they stall too.
    let mut last = (acked.load(Ordering::Relaxed), Instant::now());
    while !r.is_finished() {
        std::thread::sleep(Duration::from_millis(1));
        let now = acked.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > STALL {
            eprintln!("publisher: {now} of {total} acknowledged, no more for {STALL:?}");
            break;
        }
    }
    give_up.store(true, Ordering::Relaxed);
    let _ = r.join();
    acked.load(Ordering::Relaxed)
}

/// Waits (parked: the ack reader wakes it) until fewer than 100 of `sent` are unacknowledged;
/// false if that stalls.
fn wait_window(acked: &AtomicU64, sent: u64) -> bool {
    let mut since: Option<Instant> = None;
    while sent - acked.load(Ordering::Relaxed) >= 100 {
        let t = *since.get_or_insert_with(Instant::now);
        if t.elapsed() > STALL {
            return false;
        }
        std::thread::park_timeout(Duration::from_millis(1));
    }
    true
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

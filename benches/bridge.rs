//! Bridge benchmark: outpost's bridge (durable spool, QoS 1) against a Mosquitto bridge
//! (`connection` section, messages in memory) to the same upstream Mosquitto, in the same run.
//!
//! The local broker under test is pinned to core 0; the upstream Mosquitto and the load
//! generator share core 1. Reports: local publish → upstream subscriber throughput at QoS 1 for
//! 64 B and 1 KiB payloads; the time to drain 100k messages queued during an outage; memory
//! (and outpost's spool file) while 1M messages are queued.
//! Run: `cargo bench --bench bridge [-- --runs N] [-- --queued N]`.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The upstream, with a password file so the subscriber can be let in before the bridge.
struct Upstream {
    broker: Option<Broker>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Upstream {
    fn new() -> Upstream {
        let dir = tempfile::tempdir().unwrap();
        Upstream {
            broker: None,
            port: free_port(),
            dir,
        }
    }

    fn users(&self, bridge: bool) {
        let pw = self.dir.path().join("passwd");
        let _ = std::fs::remove_file(&pw);
        let mut users = vec![("sub", "pw")];
        if bridge {
            users.push(("bridge", "pw"));
        }
        for (u, p) in users {
            let mut c = Command::new("mosquitto_passwd");
            if !pw.exists() {
                c.arg("-c");
            }
            assert!(c
                .arg("-b")
                .arg(&pw)
                .args([u, p])
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success());
        }
    }

    /// Starts Mosquitto on the reserved port; the bridge gets in only with `bridge`.
    fn start(&mut self, bridge: bool) {
        self.users(bridge);
        let conf = format!(
            "allow_anonymous false\npassword_file {}\n",
            self.dir.path().join("passwd").display()
        );
        self.broker = Some(Broker::mosquitto_on(self.port, &conf, "1"));
    }

    fn allow_bridge(&self) {
        self.users(true);
        let pid = self.broker.as_ref().unwrap().child.id();
        assert!(Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success());
    }
}

fn outpost_bridge(up: u16) -> Broker {
    Broker::outpost_with(&format!(
        "bridges:\n  - name: up\n    url: \"mqtt://127.0.0.1:{up}\"\n    auth: {{ username: bridge, password: pw }}\n    backoff: {{ min: 100ms, max: 500ms }}\n    spool: {{ max_bytes: 2GiB }}\n    rules: [ {{ direction: out, local: \"bench/#\", remote: \"up/{{#}}\", qos: 1 }} ]\n"
    ))
}

fn mosquitto_bridge(up: u16) -> Broker {
    Broker::mosquitto_with(
        &format!(
            "connection up\naddress 127.0.0.1:{up}\nremote_username bridge\nremote_password pw\ntopic # out 1 bench/ up/\ncleansession false\nbridge_protocol_version mqttv311\ntry_private false\nrestart_timeout 1\n"
        ),
        "0",
    )
}

/// Upstream subscriber counting deliveries on `up/#`.
fn counter(up: u16, epoch: Instant) -> (Arc<AtomicU64>, Arc<AtomicBool>, std::thread::JoinHandle<Vec<u64>>) {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let h = spawn_subscriber_auth(
        up,
        "bench-up-sub",
        "up/#",
        1,
        epoch,
        count.clone(),
        stop.clone(),
        Some(("sub", "pw")),
    );
    (count, stop, h)
}

/// Waits until `count` reaches `n` or stops moving for `idle`; returns (count, time of last change).
fn wait_count(count: &AtomicU64, n: u64, idle: Duration) -> (u64, Instant) {
    let mut last = count.load(Ordering::Relaxed);
    let mut changed = Instant::now();
    while last < n && changed.elapsed() < idle {
        std::thread::sleep(Duration::from_millis(2));
        let now = count.load(Ordering::Relaxed);
        if now != last {
            last = now;
            changed = Instant::now();
        }
    }
    (last, changed)
}

/// Local publish → upstream subscriber, QoS 1, flat out.
fn throughput(make: fn(u16) -> Broker, payload: u64, n: u64) -> (f64, f64) {
    PAYLOAD.store(payload, Ordering::Relaxed);
    let mut up = Upstream::new();
    up.start(true);
    let local = make(up.port);
    let epoch = Instant::now();
    let (count, stop, sub) = counter(up.port, epoch);
    std::thread::sleep(Duration::from_millis(1500)); // bridge connected
    let t0 = Instant::now();
    run_publisher(local.port, "bench-pub", "bench/t", 1, n, 0, epoch);
    let (got, last) = wait_count(&count, n, Duration::from_secs(3));
    let elapsed = if got >= n { t0.elapsed() } else { last - t0 };
    stop.store(true, Ordering::Relaxed);
    let _ = sub.join();
    (got as f64 / elapsed.as_secs_f64(), got as f64 / n as f64)
}

/// Queue `n` messages while the upstream refuses the bridge, then let it in: seconds from the
/// first to the last delivery, share delivered, and the local broker's RSS (MiB) and spool size
/// (MiB, outpost only) while they were queued.
fn drain(make: fn(u16) -> Broker, n: u64) -> (f64, f64, f64, f64) {
    PAYLOAD.store(64, Ordering::Relaxed);
    let mut up = Upstream::new();
    up.start(false);
    let local = make(up.port);
    let epoch = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    run_publisher(local.port, "bench-pub", "bench/t", 1, n, 0, epoch);
    std::thread::sleep(Duration::from_millis(1000));
    let (rss, _) = local.rss();
    let spool = std::fs::metadata(local.dir.path().join("bridges/up.db"))
        .map(|m| m.len() as f64 / (1 << 20) as f64)
        .unwrap_or(0.0)
        + std::fs::metadata(local.dir.path().join("bridges/up.db-wal"))
            .map(|m| m.len() as f64 / (1 << 20) as f64)
            .unwrap_or(0.0);
    let (count, stop, sub) = counter(up.port, epoch);
    std::thread::sleep(Duration::from_millis(300));
    up.allow_bridge();
    // The first delivery starts the clock.
    let wait_first = Instant::now();
    while count.load(Ordering::Relaxed) == 0 && wait_first.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let first = Instant::now();
    let (got, last) = wait_count(&count, n, Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let _ = sub.join();
    let secs = if got >= n {
        first.elapsed().as_secs_f64()
    } else {
        (last - first).as_secs_f64()
    };
    (secs, got as f64 / n as f64, rss, spool)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let runs = arg("--runs", 3) as usize;
    let queued = arg("--queued", 1_000_000);
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();

    let mut t = String::from("| metric | outpost bridge (spool on disk) | Mosquitto bridge (in memory) | outpost / Mosquitto |\n|---|---|---|---|\n");
    for (payload, n) in [(64u64, 50_000u64), (1024, 20_000)] {
        let o: Vec<(f64, f64)> = (0..runs).map(|_| throughput(outpost_bridge, payload, n)).collect();
        let m: Vec<(f64, f64)> = (0..runs).map(|_| throughput(mosquitto_bridge, payload, n)).collect();
        let (or, mr) = (
            median(o.iter().map(|x| x.0).collect()),
            median(m.iter().map(|x| x.0).collect()),
        );
        let (od, md) = (
            median(o.iter().map(|x| x.1).collect()),
            median(m.iter().map(|x| x.1).collect()),
        );
        t += &format!(
            "| QoS 1 local publish → upstream subscriber, {payload} B, msg/s (share of {n} delivered) | {or:.0} ({:.1}%) | {mr:.0} ({:.1}%) | {:.2}× |\n",
            od * 100.0,
            md * 100.0,
            or / mr
        );
    }
    let od: Vec<_> = (0..runs).map(|_| drain(outpost_bridge, 100_000)).collect();
    let md: Vec<_> = (0..runs).map(|_| drain(mosquitto_bridge, 100_000)).collect();
    let (os, ms) = (
        median(od.iter().map(|x| x.0).collect()),
        median(md.iter().map(|x| x.0).collect()),
    );
    t += &format!(
        "| drain 100k queued 64 B messages after an outage, first to last delivery (s) (share delivered) | {os:.2} ({:.1}%) | {ms:.2} ({:.1}%) | {:.2}× |\n",
        median(od.iter().map(|x| x.1).collect()) * 100.0,
        median(md.iter().map(|x| x.1).collect()) * 100.0,
        os / ms
    );
    let o = drain(outpost_bridge, queued);
    let m = drain(mosquitto_bridge, queued);
    t += &format!(
        "| {queued} × 64 B queued during an outage: local broker RSS (MiB) | {:.1} (spool file {:.0} MiB) | {:.1} | {:.2}× |\n",
        o.2,
        o.3,
        m.2,
        o.2 / m.2
    );
    t += &format!(
        "| then drained, first to last delivery (s) (share delivered) | {:.1} ({:.1}%) | {:.1} ({:.1}%) | |\n",
        o.0,
        o.1 * 100.0,
        m.0,
        m.1 * 100.0
    );
    println!("\n{t}");
    let _ = std::fs::create_dir_all("target");
    std::fs::write("target/bench-bridge.md", &t).unwrap();
    println!("(throughput and 100k drain: medians of {runs} runs; written to target/bench-bridge.md)");
}

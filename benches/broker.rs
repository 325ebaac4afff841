//! Broker benchmark: outpost against Debian's Mosquitto on the same machine, in the same run,
//! with the same load generator (raw MQTT 3.1.1 over loopback, 64-byte payloads).
//!
//! The broker under test is pinned to core 0 and this process to core 1. For each broker:
//! flat-out throughput at QoS 0 and 1 (one publisher, one subscriber), latency p50/p99 at a fixed
//! 10k msg/s, idle RSS, RSS under 10 publishers x 10 subscribers at QoS 1, and start-to-ready.
//! Medians of `--runs` runs (default 3). Run: `cargo bench --bench broker [-- --runs N]`.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

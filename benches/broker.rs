//! Broker benchmark: outpost against Debian's Mosquitto on the same machine, in the same run,
//! with the same load generator (raw MQTT 3.1.1 over loopback, TCP_NODELAY).
//!
//! The broker under test is pinned to core 0 and this process to core 1; every row starts a
//! fresh broker, Mosquitto first, then outpost. Rows:
//! - flat out: 1→1, 10→1, 1→10, 10→10 publishers→subscribers × QoS 0/1/2 × 64 B / 1 KiB,
//!   delivered msg/s (every delivery counts: 1→10 counts each message 10 times) and the share
//!   of the expected deliveries that arrived;
//! - latency p50/p99 at a fixed 10k msg/s, QoS 0 and 1 (1→1);
//! - persistent sessions (clean session 0) at QoS 1: subscriber connected, and subscriber
//!   offline while publishing, then draining its queue on reconnect;
//! - idle RSS, RSS per idle client with 10,000 clients connected, peak RSS with 10 × 10 at
//!   QoS 1, start to ready.
//!
//! Medians of `--runs` runs (default 3); the share delivered is the lowest of the runs.
//! `--quick`: one run with small message counts (a smoke test; its numbers are noise).
//! Run: `cargo bench --bench broker [-- --runs N] [-- --quick]`.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Publishers → subscribers of the flat-out matrix.
const SHAPES: [(u64, u64); 4] = [(1, 1), (10, 1), (1, 10), (10, 10)];
const PAYLOADS: [u64; 2] = [64, 1024];
/// How long deliveries may pause before a run counts what arrived as all that will.
const QUIET: Duration = Duration::from_secs(1);

struct Plan {
    runs: usize,
    quick: bool,
}

impl Plan {
    fn scale(&self, full: u64) -> u64 {
        if self.quick {
            full / 20
        } else {
            full
        }
    }

    /// Deliveries each flat-out row expects: about 1-3 s for Mosquitto.
    fn deliveries(&self, qos: u8) -> u64 {
        self.scale(match qos {
            0 => 200_000,
            1 => 100_000,
            _ => 50_000,
        })
    }

    /// Messages of a fixed-rate (10k msg/s) latency run.
    fn fixed(&self) -> u64 {
        self.scale(30_000)
    }

    fn persistent(&self) -> u64 {
        self.scale(50_000)
    }

    fn fan_seconds(&self) -> u64 {
        if self.quick {
            2
        } else {
            5
        }
    }
}

/// One measurement: `value` is msg/s, or the row's unit; `share` the deliveries (or clients)
/// that arrived of those expected, NaN where nothing is delivered.
#[derive(Clone, Copy)]
struct Outcome {
    value: f64,
    share: f64,
    p50_ms: f64,
    p99_ms: f64,
}

impl Outcome {
    fn scalar(value: f64) -> Outcome {
        Outcome {
            value,
            share: f64::NAN,
            p50_ms: 0.0,
            p99_ms: 0.0,
        }
    }
}

/// A load: `pubs` publishers each sending `per_pub` messages at `rate` msg/s (0: flat out) to
/// one topic; `subs` subscribers at the same QoS, persistent sessions unless `clean`.
struct Load<'a> {
    tag: &'a str,
    pubs: u64,
    subs: u64,
    qos: u8,
    per_pub: u64,
    rate: u64,
    clean: bool,
}

/// Polls `count` until `busy()` is false and `expected` arrived or nothing more came for
/// `QUIET`; returns what arrived and the time from `since` to the last arrival.
fn wait_deliveries(count: &AtomicU64, expected: u64, since: Instant, busy: &dyn Fn() -> bool) -> (u64, Duration) {
    let mut last = count.load(Ordering::Relaxed);
    let mut last_at = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(1));
        let now = count.load(Ordering::Relaxed);
        if now != last {
            last = now;
            last_at = Instant::now();
        }
        if !busy() && (last >= expected || last_at.elapsed() > QUIET) {
            return (last, last_at.saturating_duration_since(since));
        }
    }
}

fn percentiles(mut lat: Vec<u64>) -> (f64, f64) {
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1e6
    };
    (pct(0.5), pct(0.99))
}

fn run_load(b: &Broker, l: &Load) -> Outcome {
    let epoch = Instant::now();
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let subs: Vec<_> = (0..l.subs)
        .map(|i| {
            let (mut c, _) = Conn::open_session(b.port, &format!("{}-sub-{i}", l.tag), None, l.clean);
            c.subscribe("bench/t", l.qos);
            spawn_reader(c, epoch, count.clone(), stop.clone())
        })
        .collect();
    let t0 = Instant::now();
    let pubs: Vec<_> = (0..l.pubs)
        .map(|i| {
            let (port, id, qos, n, rate) = (b.port, format!("{}-pub-{i}", l.tag), l.qos, l.per_pub, l.rate);
            std::thread::spawn(move || run_publisher(port, &id, "bench/t", qos, n, rate, epoch))
        })
        .collect();
    let expected = l.pubs * l.per_pub * l.subs;
    let (got, elapsed) = wait_deliveries(&count, expected, t0, &|| pubs.iter().any(|p| !p.is_finished()));
    for p in pubs {
        let _ = p.join();
    }
    stop.store(true, Ordering::Relaxed);
    let lat = subs.into_iter().flat_map(|s| s.join().unwrap()).collect();
    let (p50_ms, p99_ms) = percentiles(lat);
    Outcome {
        value: got as f64 / elapsed.as_secs_f64().max(1e-9),
        share: got as f64 / expected as f64,
        p50_ms,
        p99_ms,
    }
}

/// A persistent subscriber goes offline, `total` QoS 1 messages are published to it, then it
/// reconnects and drains them. Returns the publish run (msg/s, share acknowledged) and the
/// drain (msg/s from reconnect to the last delivery, share delivered).
fn offline_drain(b: &Broker, total: u64) -> (Outcome, Outcome) {
    let epoch = Instant::now();
    let (mut c, _) = Conn::open_session(b.port, "drain-sub", None, false);
    c.subscribe("bench/t", 1);
    c.disconnect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let acked = run_publisher(b.port, "drain-pub", "bench/t", 1, total, 0, epoch);
    let publish = Outcome {
        share: acked as f64 / total as f64,
        ..Outcome::scalar(acked as f64 / t.elapsed().as_secs_f64())
    };
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let (c, present) = Conn::open_session(b.port, "drain-sub", None, false);
    if !present {
        eprintln!("drain: CONNACK without session present");
    }
    let sub = spawn_reader(c, epoch, count.clone(), stop.clone());
    let (got, elapsed) = wait_deliveries(&count, total, t0, &|| false);
    stop.store(true, Ordering::Relaxed);
    let _ = sub.join();
    let drain = Outcome {
        share: got as f64 / total as f64,
        ..Outcome::scalar(got as f64 / elapsed.as_secs_f64().max(1e-9))
    };
    (publish, drain)
}

/// Connects `n` idle clients, each subscribed at QoS 1 to a topic of its own, to a fresh
/// broker; returns the RSS added per client (KiB), with the share of clients that got in.
fn idle_clients(b: &Broker, n: u64) -> Outcome {
    std::thread::sleep(Duration::from_millis(500));
    let idle = b.rss().0;
    let mut conns = Vec::with_capacity(n as usize);
    for i in 0..n {
        let client = Conn::connect(b.port, &format!("idle-{i}"), None, true)
            .and_then(|(mut c, _)| c.try_subscribe(&format!("idle/{i}"), 1).map(|()| c));
        match client {
            Ok(c) => conns.push(c),
            Err(e) => {
                eprintln!("idle client {i}: {e}");
                break;
            }
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let with = b.rss().0;
    Outcome {
        share: conns.len() as f64 / n as f64,
        ..Outcome::scalar((with - idle) * 1024.0 / conns.len().max(1) as f64)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Mosquitto,
    Outpost,
}

/// What a broker is started for.
enum Setup {
    Default,
    /// 10,000 clients: no connection limit below that.
    ManyClients,
    /// Persistent sessions kept on disk.
    Persistence,
}

/// Mosquitto's in-flight window per client, both ways, as outpost's (`max_inflight: 100`) and
/// the publishers'. At its default of 20, Mosquitto answers a 3.1.1 client's QoS 2 PUBLISH
/// beyond the 20th in flight with PUBREC and then discards it (a 3.1.1 client cannot be told
/// its Receive Maximum): about 3/4 of a 100-window publisher's QoS 2 messages were lost.
const MOSQUITTO_INFLIGHT: &str = "max_inflight_messages 100\n";

fn start(k: Kind, s: Setup) -> Broker {
    match (k, s) {
        (Kind::Outpost, Setup::Default | Setup::Persistence) => Broker::outpost(),
        (Kind::Outpost, Setup::ManyClients) => Broker::outpost_with("  limits: { max_connections: 12000 }\n"),
        (Kind::Mosquitto, Setup::Default) => Broker::mosquitto_with(MOSQUITTO_INFLIGHT, "0"),
        (Kind::Mosquitto, Setup::ManyClients) => {
            Broker::mosquitto_with(&format!("{MOSQUITTO_INFLIGHT}max_connections -1\n"), "0")
        }
        (Kind::Mosquitto, Setup::Persistence) => Broker::mosquitto_with(
            &format!("{MOSQUITTO_INFLIGHT}persistence true\npersistence_location $DIR/\n"),
            "0",
        ),
    }
}

/// Every measurement under its row's key, per broker (0: outpost, 1: Mosquitto), per run.
#[derive(Default)]
struct Results(Vec<(String, [Vec<Outcome>; 2])>);

impl Results {
    fn push(&mut self, key: &str, k: Kind, o: Outcome) {
        let i = match self.0.iter().position(|(name, _)| name == key) {
            Some(i) => i,
            None => {
                self.0.push((key.to_string(), [vec![], vec![]]));
                self.0.len() - 1
            }
        };
        self.0[i].1[(k == Kind::Mosquitto) as usize].push(o);
    }

    /// Medians of the runs; the share is the lowest.
    fn get(&self, key: &str) -> [Outcome; 2] {
        let (_, v) = self.0.iter().find(|(name, _)| name == key).expect(key);
        let summary = |runs: &Vec<Outcome>| {
            let median = |f: &dyn Fn(&Outcome) -> f64| {
                let mut x: Vec<f64> = runs.iter().map(f).collect();
                x.sort_by(|a, b| a.total_cmp(b));
                x[x.len() / 2]
            };
            Outcome {
                value: median(&|o| o.value),
                share: runs.iter().map(|o| o.share).fold(f64::NAN, f64::min),
                p50_ms: median(&|o| o.p50_ms),
                p99_ms: median(&|o| o.p99_ms),
            }
        };
        [summary(&v[0]), summary(&v[1])]
    }
}

fn matrix_key(pubs: u64, subs: u64, qos: u8, payload: u64) -> String {
    format!("{pubs}x{subs}-q{qos}-{payload}")
}

fn measure_run(plan: &Plan, r: &mut Results) {
    let brokers = [Kind::Mosquitto, Kind::Outpost];
    let t = Instant::now();
    let lap = |what: &str| eprintln!("  {what} done at {:.1?}", t.elapsed());
    for (pubs, subs) in SHAPES {
        for qos in 0..=2u8 {
            for payload in PAYLOADS {
                let key = matrix_key(pubs, subs, qos, payload);
                PAYLOAD.store(payload, Ordering::Relaxed);
                for k in brokers {
                    let b = start(k, Setup::Default);
                    let load = Load {
                        tag: &key,
                        pubs,
                        subs,
                        qos,
                        per_pub: (plan.deliveries(qos) / subs / pubs).max(1),
                        rate: 0,
                        clean: true,
                    };
                    r.push(&key, k, run_load(&b, &load));
                }
            }
        }
    }
    lap("flat-out matrix");
    PAYLOAD.store(64, Ordering::Relaxed);
    for qos in [0, 1] {
        for k in brokers {
            let b = start(k, Setup::Default);
            let load = Load {
                tag: "fixed",
                pubs: 1,
                subs: 1,
                qos,
                per_pub: plan.fixed(),
                rate: 10_000,
                clean: true,
            };
            r.push(&format!("fixed-q{qos}"), k, run_load(&b, &load));
        }
    }
    lap("fixed-rate latency");
    for k in brokers {
        let b = start(k, Setup::Persistence);
        let load = Load {
            tag: "persist",
            pubs: 1,
            subs: 1,
            qos: 1,
            per_pub: plan.persistent(),
            rate: 0,
            clean: false,
        };
        r.push("persist-online", k, run_load(&b, &load));
        drop(b);
        let b = start(k, Setup::Persistence);
        let (publish, drain) = offline_drain(&b, plan.persistent());
        r.push("persist-offline-publish", k, publish);
        r.push("persist-drain", k, drain);
    }
    lap("persistent sessions");
    for k in brokers {
        let b = start(k, Setup::Default);
        r.push("ready", k, Outcome::scalar(b.ready_in.as_secs_f64() * 1000.0));
        std::thread::sleep(Duration::from_secs(1));
        r.push("idle-rss", k, Outcome::scalar(b.rss().0));
    }
    for k in brokers {
        r.push("clients", k, idle_clients(&start(k, Setup::ManyClients), CLIENTS));
    }
    lap("idle RSS and idle clients");
    for k in brokers {
        let b = start(k, Setup::Default);
        let load = Load {
            tag: "fan",
            pubs: 10,
            subs: 10,
            qos: 1,
            per_pub: 1000 * plan.fan_seconds(),
            rate: 1000,
            clean: true,
        };
        let o = run_load(&b, &load);
        r.push("fan-rss", k, Outcome { value: b.rss().1, ..o });
    }
    lap("10 × 10 RSS");
}

/// Idle clients of the memory row.
const CLIENTS: u64 = 10_000;

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn share(o: &Outcome) -> String {
    if o.share.is_nan() {
        "—".into()
    } else {
        format!("{:.1}%", o.share * 100.0)
    }
}

fn size(payload: u64) -> String {
    if payload >= 1024 {
        format!("{} KiB", payload / 1024)
    } else {
        format!("{payload} B")
    }
}

fn table(plan: &Plan, r: &Results) -> String {
    let mut t = String::new();
    t += "| pubs → subs | QoS | payload | outpost msg/s | outpost share delivered | mosquitto msg/s | mosquitto share delivered | outpost / mosquitto |\n";
    t += "|---|---|---|---|---|---|---|---|\n";
    for (pubs, subs) in SHAPES {
        for qos in 0..=2u8 {
            for payload in PAYLOADS {
                let [o, m] = r.get(&matrix_key(pubs, subs, qos, payload));
                t += &format!(
                    "| {pubs} → {subs} | {qos} | {} | {:.0} | {} | {:.0} | {} | {:.2}× |\n",
                    size(payload),
                    o.value,
                    share(&o),
                    m.value,
                    share(&m),
                    ratio(o.value, m.value)
                );
            }
        }
    }
    t += "\n| metric | outpost | mosquitto | outpost / mosquitto | share delivered, outpost / mosquitto |\n";
    t += "|---|---|---|---|---|\n";
    for qos in [0, 1] {
        let [o, m] = r.get(&format!("fixed-q{qos}"));
        t += &format!(
            "| QoS {qos} latency at a fixed 10k msg/s, 1 → 1, p50 / p99 (ms) | {:.2} / {:.2} | {:.2} / {:.2} | p99 {:.2}× | {} / {} |\n",
            o.p50_ms,
            o.p99_ms,
            m.p50_ms,
            m.p99_ms,
            ratio(o.p99_ms, m.p99_ms),
            share(&o),
            share(&m)
        );
    }
    let mut scalar = |label: &str, key: &str, digits: usize| {
        let [o, m] = r.get(key);
        t += &format!(
            "| {label} | {:.digits$} | {:.digits$} | {:.2}× | {} / {} |\n",
            o.value,
            m.value,
            ratio(o.value, m.value),
            share(&o),
            share(&m)
        );
    };
    scalar(
        "persistent session (clean session 0), QoS 1, 1 → 1, subscriber connected, delivered msg/s",
        "persist-online",
        0,
    );
    scalar(
        "persistent session, subscriber offline: QoS 1 publish msg/s, queued (share: acknowledged)",
        "persist-offline-publish",
        0,
    );
    scalar(
        "… then the subscriber reconnects: drain msg/s, reconnect to last delivery",
        "persist-drain",
        0,
    );
    scalar("idle RSS, fresh broker (MiB)", "idle-rss", 1);
    scalar(
        &format!("{CLIENTS} idle clients, one QoS 1 subscription each: RSS per client (KiB) (share: connected)"),
        "clients",
        2,
    );
    scalar(
        &format!(
            "peak RSS, 10 pub × 10 sub QoS 1, 10k msg/s in for {} s (MiB)",
            plan.fan_seconds()
        ),
        "fan-rss",
        1,
    );
    scalar("start to ready (ms)", "ready", 0);
    t += &format!(
        "\n{}. Flat-out totals: {} / {} / {} deliveries at QoS 0 / 1 / 2 per row, split over the publishers; \
         publishers keep 100 QoS 1/2 messages in flight; subscribers subscribe at the row's QoS. \
         Mosquitto 2.0.11: `persistence false` (but for the persistent-session rows), `set_tcp_nodelay true`, \
         `max_queued_messages 2000000`, `max_inflight_messages 100` (outpost's `max_inflight`; at its \
         default of 20 Mosquitto discards a 3.1.1 publisher's QoS 2 messages beyond the 20th in flight \
         after PUBREC), `max_connections -1` for the idle clients. outpost: its defaults (all services \
         running), `max_connections: 12000` for the idle clients. \
         Disk commit of the persistent-session rows: outpost commits every message for a persistent \
         session to SQLite (WAL, synchronous=FULL, group commit) before its PUBACK; Mosquitto \
         (`persistence true`) keeps them in memory and writes its persistence file only on autosave \
         (every 30 min by default) and at exit, not per message.\n",
        if plan.quick {
            "`--quick` smoke run: 1 run, 1/20 of the message counts; the figures are noise".to_string()
        } else {
            format!("Medians of {} runs; share delivered: the lowest of the runs", plan.runs)
        },
        plan.deliveries(0),
        plan.deliveries(1),
        plan.deliveries(2),
    );
    t
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes --bench; anything else (cargo test --benches, --list) only builds it.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 });
    let plan = Plan { runs, quick };
    // 10,000 clients need as many sockets here and in the broker, which inherits the limit.
    let fds = raise_fd_limit(65536);
    if fds < 2 * CLIENTS {
        eprintln!("open-file limit {fds}: the idle-clients row will fall short");
    }
    // The load generator runs on core 1; brokers are started on core 0.
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
    let started = Instant::now();
    let mut r = Results::default();
    for run in 0..plan.runs {
        measure_run(&plan, &mut r);
        eprintln!("run {} of {} done at {:.0?}", run + 1, plan.runs, started.elapsed());
    }
    let t = table(&plan, &r);
    println!("\n{t}");
    let _ = std::fs::create_dir_all("target");
    std::fs::write("target/bench-broker.md", &t).unwrap();
    println!("(written to target/bench-broker.md; took {:.0?})", started.elapsed());
}

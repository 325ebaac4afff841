//! mqtt-e2e benchmark: the codec alone (packets per second on one core), and a device's
//! encrypted packets through the gateway: decrypt, verify, republish as plaintext, counted at a
//! subscriber. 81-byte packets (4-byte messages, pad 50), as the library sends by default.
//! Run: `cargo bench --bench e2e`.

mod common;

use common::*;
use outpost::devices::e2e::{self, Codec, Receiver};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn codec_alone(n: u64) -> (f64, f64) {
    let key = [7u8; 16];
    let codec = Codec::new(&key, e2e::DEFAULT_AAD, 50);
    let now = e2e::now_ns();
    let t = Instant::now();
    let packets: Vec<Vec<u8>> = (0..n)
        .map(|i| codec.encode(now, (i as u32).to_be_bytes(), b"21.5"))
        .collect();
    let enc = n as f64 / t.elapsed().as_secs_f64();
    assert_eq!(packets[0].len(), 81);
    let mut r = Receiver::new(codec, Duration::from_secs(15), 1024);
    let t = Instant::now();
    for p in &packets {
        r.receive(p, now).expect("valid packet");
    }
    (enc, n as f64 / t.elapsed().as_secs_f64())
}

fn through_gateway(n: u64) -> (f64, f64) {
    let gw = Broker::outpost();
    let out = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["devices", "add", "bench", "--show-secret", "--data-dir"])
        .arg(gw.dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_string()
    };
    let hex = field("key:");
    let key: [u8; 16] = (0..32)
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let password = field("password:");
    std::thread::sleep(Duration::from_millis(1500)); // the gateway picks up the keystore
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sub = spawn_subscriber_plain(gw.port, "devices/bench/#", count.clone(), stop.clone());
    let codec = Codec::new(&key, e2e::DEFAULT_AAD, 50);
    let topic = format!("{}/iot/t", e2e::topic_base(&key));
    let c = Conn::open_as(gw.port, "bench-board", Some(("bench", &password)));
    let now = e2e::now_ns();
    let t0 = Instant::now();
    // QoS 1 with 100 in flight: the rate the gateway sustains, not how fast it can drop.
    run_publisher_with(c, &topic, 1, n, 0, &|out, pkid, seq| {
        publish_raw(
            out,
            &topic,
            1,
            pkid,
            &codec.encode(now, (seq as u32).to_be_bytes(), b"21.5"),
        )
    });
    let mut last = 0;
    let mut changed = Instant::now();
    while last < n && changed.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(2));
        let now = count.load(Ordering::Relaxed);
        if now != last {
            last = now;
            changed = Instant::now();
        }
    }
    let elapsed = if last >= n { t0.elapsed() } else { changed - t0 };
    stop.store(true, Ordering::Relaxed);
    let _ = sub.join();
    (last as f64 / elapsed.as_secs_f64(), last as f64 / n as f64)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
    let (enc, dec) = codec_alone(500_000);
    let (rate, share) = through_gateway(50_000);
    let t = format!(
        "| metric | value |\n|---|---|\n| codec alone, encrypt 81-byte packets (packets/s, one core) | {enc:.0} |\n| codec alone, receive (replay + window + decrypt + checks) (packets/s, one core) | {dec:.0} |\n| device → gateway: decrypt, verify, republish plaintext, at a subscriber (msg/s) (share of 50000 delivered) | {rate:.0} ({:.1}%) |\n",
        share * 100.0
    );
    println!("\n{t}");
    let _ = std::fs::create_dir_all("target");
    std::fs::write("target/bench-e2e.md", &t).unwrap();
}

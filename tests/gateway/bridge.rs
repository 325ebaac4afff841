//! Upstream bridges against a real Mosquitto: remapping both ways, TLS, outages, crashes, a full
//! spool, loops, reloads. What a user checks is what arrives upstream, and what is counted.

use crate::common::*;
use rumqttc::QoS;
use std::collections::HashMap;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);

/// A gateway section with a loopback listener and the given `bridges:` block.
fn with_bridges(port: u16, bridges: &str) -> String {
    format!("{}bridges:\n{bridges}", open_broker(port))
}

fn bridge(name: &str, url: &str, rules: &[&str], extra: &str) -> String {
    let mut s = format!("  - name: {name}\n    url: \"{url}\"\n    backoff: {{ min: 200ms, max: 1s }}\n    rules:\n");
    for r in rules {
        s.push_str(&format!("      - {r}\n"));
    }
    for line in extra.lines() {
        s.push_str(&format!("    {line}\n"));
    }
    s
}

const AUTH: &str = "auth: { username: bridge, password: bridge-pw }";

/// Publishes `n` numbered QoS 1 messages locally, alternating two topics; returns how many the
/// gateway acknowledged (all, unless the gateway goes away).
async fn publish_numbered(port: u16, prefix: &str, n: usize, pause_every: Option<(usize, Duration)>) -> usize {
    let (c, mut ev) = connect(opts(port, "numbered")).await.unwrap();
    let acks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = acks.clone();
    let driver = tokio::spawn(async move {
        while let Ok(e) = ev.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = e {
                a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    for i in 0..n {
        let topic = format!("{prefix}/{}", ["a", "b"][i % 2]);
        // Stop when the gateway is gone (the request queue would never drain).
        if driver.is_finished()
            || tokio::time::timeout(
                Duration::from_secs(2),
                c.publish(topic, QoS::AtLeastOnce, false, i.to_string()),
            )
            .await
            .is_err()
        {
            break;
        }
        if let Some((every, d)) = pause_every {
            if i % every == every - 1 {
                tokio::time::sleep(d).await;
            }
        }
    }
    let end = std::time::Instant::now() + T;
    while acks.load(std::sync::atomic::Ordering::SeqCst) < n && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    driver.abort();
    acks.load(std::sync::atomic::Ordering::SeqCst)
}

/// An upstream subscriber connected first, then the bridge let in (Mosquitto re-reads its
/// password file), so nothing the bridge sends can arrive before someone listens.
async fn watch_then_let_bridge_in(m: &Mosquitto, id: &str, filter: &str) -> Collector {
    let c = Collector::start(m.port, id, filter, Some(("sub", "sub-pw")), false);
    c.wait(T, "subscriber", |_| true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    m.allow_bridge();
    c
}

/// Checks that every number in `want` arrived, and that per topic the first arrivals are in
/// order. Returns the number of duplicates (allowed at QoS 1).
pub(crate) fn check_numbered(got: &[(String, Vec<u8>)], want: impl Iterator<Item = usize>) -> usize {
    let mut seen = HashMap::new();
    let mut last: HashMap<&str, usize> = HashMap::new();
    let mut dups = 0;
    for (topic, payload) in got {
        let n: usize = String::from_utf8_lossy(payload).parse().expect("numbered payload");
        if seen.insert(n, ()).is_some() {
            dups += 1;
            continue;
        }
        if let Some(prev) = last.insert(topic.as_str(), n) {
            assert!(n > prev, "on {topic}: {n} arrived after {prev}");
        }
    }
    let missing: Vec<usize> = want.filter(|n| !seen.contains_key(n)).collect();
    assert!(
        missing.is_empty(),
        "{} messages never arrived, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    dups
}

#[tokio::test]
async fn forwards_both_ways_with_remapping_and_reports_state() {
    let m = Mosquitto::start("allow_anonymous true");
    let port = free_port();
    let gw = Gateway::start(&with_bridges(
        port,
        &bridge(
            "cloud",
            &m.url(),
            &[
                r#"{ direction: out, local: "sensor/+/live", remote: "site1/sensor/{1}/live", qos: 1 }"#,
                r#"{ direction: in, remote: "site1/cmd/#", local: "cmd/#", qos: 1 }"#,
            ],
            "",
        ),
    ));
    let up = Collector::start(m.port, "cloud-app", "#", None, false);
    // The upstream status topic says online (retained).
    up.wait(T, "status online", |g| {
        g.iter().any(|(t, p)| t == "outpost/test-gw/status" && p == b"online")
    })
    .await;

    let (local, lev) = connect(opts(port, "local")).await.unwrap();
    let _d = drive(lev);
    local
        .publish("sensor/kitchen/live", QoS::AtLeastOnce, false, "230.5")
        .await
        .unwrap();
    local
        .publish("sensor/kitchen/1m", QoS::AtLeastOnce, false, "not bridged")
        .await
        .unwrap();
    up.wait(T, "remapped message", |g| {
        g.iter().any(|(t, p)| t == "site1/sensor/kitchen/live" && p == b"230.5")
    })
    .await;
    assert!(!up.got.lock().unwrap().iter().any(|(_, p)| p == b"not bridged"));

    // Inbound: upstream command lands locally under the mapped topic.
    let (s, mut sev) = connect(opts(port, "local-sub")).await.unwrap();
    subscribe(&s, &mut sev, "cmd/#", QoS::AtLeastOnce).await;
    let (cloud, cev) = connect(opts(m.port, "cloud-cmd")).await.unwrap();
    let _c = drive(cev);
    cloud
        .publish("site1/cmd/plug/set", QoS::AtLeastOnce, false, "on")
        .await
        .unwrap();
    assert_eq!(
        next_publish(&mut sev, T).await.map(|p| (p.0, p.1)),
        Some(("cmd/plug/set".into(), b"on".to_vec()))
    );

    // Local state topic and `outpost status`.
    let (st, mut stev) = connect(opts(port, "ops")).await.unwrap();
    subscribe(&st, &mut stev, "outpost/test-gw/bridges/cloud/state", QoS::AtMostOnce).await;
    let state = next_publish(&mut stev, T).await.expect("retained bridge state");
    let state: serde_json::Value = serde_json::from_slice(&state.1).unwrap();
    assert_eq!(state["connected"], true);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let b = gw.bridge_state("cloud");
    assert_eq!(
        (b["connected"].as_bool(), b["sent"].as_u64(), b["received"].as_u64()),
        (Some(true), Some(1), Some(1)),
        "{b}"
    );
    let table = std::process::Command::new(BIN)
        .args(["status", "--config"])
        .arg(&gw.config)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.lines().any(|l| l.starts_with("cloud") && l.contains(" up ")),
        "{table}"
    );
}

async fn outage(persistence: bool) {
    let mut m = Mosquitto::with_users(persistence, true);
    let port = free_port();
    let gw = Gateway::start(&with_bridges(
        port,
        &bridge(
            "cloud",
            &m.url(),
            &[r#"{ direction: out, local: "data/#", remote: "up/{#}", qos: 1 }"#],
            AUTH,
        ),
    ));
    let up = Collector::start(m.port, "counter", "up/#", Some(("sub", "sub-pw")), true);
    up.wait(T, "subscriber up", |_| true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 600 messages over ~3 s; the upstream goes away after the first second.
    let publisher = tokio::spawn(publish_numbered(
        port,
        "data",
        600,
        Some((20, Duration::from_millis(100))),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    m.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        publisher.await.unwrap(),
        600,
        "the gateway must take every message while upstream is down"
    );
    let queued = gw.bridge_state("cloud")["queued"].as_u64().unwrap();
    assert!(queued > 0, "nothing spooled during the outage");
    // Upstream back; our subscriber first, then the bridge.
    m.set_users(false);
    m.spawn();
    tokio::time::sleep(Duration::from_millis(500)).await;
    m.allow_bridge();
    up.wait(Duration::from_secs(30), "all 600", |g| {
        let mut s: Vec<&Vec<u8>> = g.iter().map(|(_, p)| p).collect();
        s.sort();
        s.dedup();
        s.len() >= 600
    })
    .await;
    let dups = check_numbered(&up.got.lock().unwrap(), 0..600);
    eprintln!("outage (upstream persistence {persistence}): 600 delivered, {dups} duplicates, {queued} were queued");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let b = gw.bridge_state("cloud");
    assert_eq!(b["queued"], 0, "{b}");
    assert!(b["reconnects"].as_u64().unwrap() >= 1, "{b}");
}

#[tokio::test]
async fn an_upstream_outage_loses_nothing_without_upstream_persistence() {
    outage(false).await;
}

#[tokio::test]
async fn an_upstream_outage_loses_nothing_with_upstream_persistence() {
    outage(true).await;
}

#[tokio::test]
async fn kill_9_while_upstream_is_down_loses_nothing_that_was_acknowledged() {
    let m = Mosquitto::with_users(false, false);
    let port = free_port();
    let mut gw = Gateway::start(&with_bridges(
        port,
        &bridge(
            "cloud",
            &m.url(),
            &[r#"{ direction: out, local: "data/#", remote: "up/{#}", qos: 1 }"#],
            AUTH,
        ),
    ));
    // Upstream refuses the bridge: everything goes to the spool. Kill -9 mid-stream.
    let publisher = tokio::spawn(publish_numbered(port, "data", 100_000, None));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gw.kill9();
    let acked = publisher.await.unwrap();
    assert!(acked > 100, "only {acked} messages acknowledged before the kill");
    gw.start_again();
    let up = watch_then_let_bridge_in(&m, "counter", "up/#").await;
    up.wait(Duration::from_secs(60), "every acknowledged message", |g| {
        let mut s: Vec<&Vec<u8>> = g.iter().map(|(_, p)| p).collect();
        s.sort();
        s.dedup();
        s.len() >= acked
    })
    .await;
    let dups = check_numbered(&up.got.lock().unwrap(), 0..acked);
    eprintln!("kill -9: {acked} acknowledged before the crash, all delivered after restart, {dups} duplicates");
}

#[tokio::test]
async fn a_full_spool_drops_by_its_policy_and_counts_every_drop() {
    let m = Mosquitto::with_users(false, false);
    let port = free_port();
    let gw = Gateway::start(&with_bridges(
        port,
        &bridge(
            "cloud",
            &m.url(),
            &[r#"{ direction: out, local: "data/#", remote: "u/{#}", qos: 1 }"#],
            &format!("{AUTH}\nspool: {{ max_bytes: 4KiB, when_full: drop-oldest }}"),
        ),
    ));
    // "u/a" + a 97-byte payload: 100 bytes each, so 40 fit in 4 KiB.
    let (c, ev) = connect(opts(port, "filler")).await.unwrap();
    let _d = drive(ev);
    for i in 0..100 {
        c.publish("data/a", QoS::AtLeastOnce, false, format!("{i:097}"))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let b = gw.bridge_state("cloud");
    assert_eq!(
        (b["queued"].as_u64(), b["dropped"]["spool_full_oldest"].as_u64()),
        (Some(40), Some(60)),
        "{b}"
    );
    let up = watch_then_let_bridge_in(&m, "counter", "u/#").await;
    up.wait(T, "the 40 kept", |g| g.len() >= 40).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got: Vec<usize> = up
        .got
        .lock()
        .unwrap()
        .iter()
        .map(|(_, p)| String::from_utf8_lossy(p).parse().unwrap())
        .collect();
    assert_eq!(got, (60..100).collect::<Vec<_>>(), "the newest 40, in order");
    assert_eq!(
        100 - got.len() as u64,
        b["dropped"]["spool_full_oldest"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn messages_over_the_upstream_packet_limit_are_refused_at_the_rule_and_counted() {
    let m = Mosquitto::start("allow_anonymous true");
    let port = free_port();
    let gw = Gateway::start(&with_bridges(
        port,
        &bridge(
            "cloud",
            &m.url(),
            &[r#"{ direction: out, local: "data/#", remote: "u/{#}", qos: 1 }"#],
            "max_packet_size: 1KiB",
        ),
    ));
    let up = Collector::start(m.port, "counter", "u/#", None, false);
    up.wait(T, "subscriber", |_| true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (c, ev) = connect(opts(port, "big")).await.unwrap();
    let _d = drive(ev);
    c.publish("data/big", QoS::AtLeastOnce, false, vec![0u8; 4096])
        .await
        .unwrap();
    c.publish("data/small", QoS::AtLeastOnce, false, "fits").await.unwrap();
    up.wait(T, "the small one", |g| g.iter().any(|(_, p)| p == b"fits"))
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let b = gw.bridge_state("cloud");
    assert_eq!(b["dropped"]["too_large"], 1, "{b}");
    assert_eq!(b["reconnects"], 0, "an oversized message must not break the link: {b}");
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn a_both_rule_and_a_chain_of_two_gateways_echo_nothing() {
    let m = Mosquitto::start("allow_anonymous true");
    let (port_a, port_b) = (free_port(), free_port());
    // B bridges to Mosquitto (MQTT 5), A bridges to B (3.1.1: no No Local, the echo filter works).
    let _b = Gateway::start(&with_bridges(
        port_b,
        &bridge(
            "cloud",
            &m.url(),
            &[r#"{ direction: both, local: "x/#", remote: "x/#", qos: 1 }"#],
            "protocol: 5",
        ),
    ));
    let _a = Gateway::start(&with_bridges(
        port_a,
        &bridge(
            "b",
            &format!("mqtt://127.0.0.1:{port_b}"),
            &[r#"{ direction: both, local: "x/#", remote: "x/#", qos: 1 }"#],
            // Both test gateways share one gateway id, and B keeps outpost/<its id>/ to itself:
            // A's bridge state (and its will) upstream goes elsewhere, as a second site's would.
            "status_topic: site-a/outpost/status",
        ),
    ));
    let cloud = Collector::start(m.port, "cloud-watch", "x/#", None, false);
    let at_a = Collector::start(port_a, "a-watch", "x/#", None, false);
    let at_b = Collector::start(port_b, "b-watch", "x/#", None, false);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let (pa, pev) = connect(opts(port_a, "a-pub")).await.unwrap();
    let _d = drive(pev);
    pa.publish("x/from-a", QoS::AtLeastOnce, false, "a").await.unwrap();
    let (pm, mev) = connect(opts(m.port, "m-pub")).await.unwrap();
    let _e = drive(mev);
    pm.publish("x/from-cloud", QoS::AtLeastOnce, false, "m").await.unwrap();

    for (who, c) in [("cloud", &cloud), ("gateway A", &at_a), ("gateway B", &at_b)] {
        c.wait(T, &format!("both messages at {who}"), |g| g.len() >= 2).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (who, c) in [("cloud", &cloud), ("gateway A", &at_a), ("gateway B", &at_b)] {
        let mut got: Vec<String> = c.got.lock().unwrap().iter().map(|(t, _)| t.clone()).collect();
        got.sort();
        assert_eq!(got, ["x/from-a", "x/from-cloud"], "{who} got an echo or missed one");
    }
}

#[tokio::test]
async fn adding_a_bridge_on_sighup_loses_nothing_from_another_bridges_spool() {
    let m1 = Mosquitto::with_users(false, false);
    let m2 = Mosquitto::start("allow_anonymous true");
    let port = free_port();
    let one = bridge(
        "one",
        &m1.url(),
        &[r#"{ direction: out, local: "data/#", remote: "one/{#}", qos: 1 }"#],
        AUTH,
    );
    let mut gw = Gateway::start(&with_bridges(port, &one));
    assert_eq!(publish_numbered(port, "data", 200, None).await, 200);

    let two = bridge(
        "two",
        &m2.url(),
        &[r#"{ direction: out, local: "data/#", remote: "two/{#}", qos: 1 }"#],
        "",
    );
    gw.write_config(&with_bridges(port, &format!("{one}{two}")));
    gw.signal("HUP");
    gw.wait_note("READY=1", T);
    let up2 = Collector::start(m2.port, "c2", "two/#", None, false);
    up2.wait(T, "subscriber", |_| true).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(publish_numbered(port, "data", 10, None).await, 10);
    up2.wait(T, "bridge two forwarding", |g| g.len() >= 10).await;

    let up1 = watch_then_let_bridge_in(&m1, "c1", "one/#").await;
    up1.wait(T, "bridge one's 210", |g| g.len() >= 210).await;
    check_numbered(&up1.got.lock().unwrap(), 0..200);
}

#[tokio::test]
async fn tls_with_a_custom_ca_and_client_certificate_and_a_clear_error_for_a_wrong_ca() {
    let good = tempfile::tempdir().unwrap();
    let pki = crate::robustness::make_pki(good.path());
    let wrong = tempfile::tempdir().unwrap();
    crate::robustness::make_pki(wrong.path());
    let p = good.path().display();
    let m = Mosquitto::start(&format!(
        "allow_anonymous true\ncafile {p}/ca.pem\ncertfile {p}/server.pem\nkeyfile {p}/server.key\nrequire_certificate true"
    ));
    let url = format!("mqtts://127.0.0.1:{}", m.port);
    let rule = r#"{ direction: out, local: "data/#", remote: "tls/{#}", qos: 1 }"#;
    let port = free_port();
    let gw = Gateway::start(&with_bridges(
        port,
        &format!(
            "{}{}",
            bridge(
                "secure",
                &url,
                &[rule],
                &format!("tls: {{ ca: {p}/ca.pem, cert: {p}/client.pem, key: {p}/client.key }}")
            ),
            bridge(
                "wrong-ca",
                &url,
                &[rule],
                &format!("tls: {{ ca: {}/ca.pem }}", wrong.path().display())
            ),
        ),
    ));
    // A subscriber over TLS on the same Mosquitto.
    let mut o = opts(m.port, "tls-watch");
    o.set_transport(rumqttc::Transport::tls_with_config(crate::robustness::tls_client(
        &pki, true,
    )));
    let (s, mut sev) = connect(o).await.unwrap();
    subscribe(&s, &mut sev, "tls/#", QoS::AtLeastOnce).await;
    let (c, ev) = connect(opts(port, "p")).await.unwrap();
    let _d = drive(ev);
    c.publish("data/x", QoS::AtLeastOnce, false, "over mTLS").await.unwrap();
    assert_eq!(
        next_publish(&mut sev, T).await.map(|m| m.1),
        Some(b"over mTLS".to_vec())
    );

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let err = gw.bridge_state("wrong-ca")["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        err.contains("invalid peer certificate")
            && err.contains("server name 127.0.0.1")
            && err.contains(&format!("CA {}/ca.pem", wrong.path().display())),
        "unclear TLS error: {err}"
    );
}

/// Polls the bridge's state until `f` holds; panics naming `what` after `within`.
pub(crate) async fn wait_state(
    gw: &Gateway,
    name: &str,
    within: Duration,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) {
    let end = std::time::Instant::now() + within;
    loop {
        let b = gw.bridge_state(name);
        if f(&b) {
            return;
        }
        assert!(std::time::Instant::now() < end, "{what}: {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn urls_fail_over_when_the_node_dies_and_fail_back_when_the_primary_returns() {
    let mut a = Mosquitto::start("allow_anonymous true\nmax_queued_messages 100000");
    let b = Mosquitto::start("allow_anonymous true\nmax_queued_messages 100000");
    let port = free_port();
    let cfg = format!(
        "  - name: cloud\n    urls: [\"{}\", \"{}\"]\n    failover: {{ fail_back_after: 2s, probe: 200ms }}\n    backoff: {{ min: 200ms, max: 1s }}\n    rules:\n      - {{ direction: out, local: \"data/#\", remote: \"up/{{#}}\", qos: 1 }}\n",
        a.url(),
        b.url()
    );
    let gw = Gateway::start(&with_bridges(port, &cfg));
    let on_a = Collector::start(a.port, "watch-a", "up/#", None, false);
    let on_b = Collector::start(b.port, "watch-b", "up/#", None, false);
    wait_state(&gw, "cloud", T, "connected to the primary", |s| {
        s["connected"] == true && s["url"] == a.url()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 600 messages over ~3 s; the primary dies (kill -9) after the first second.
    let publisher = tokio::spawn(publish_numbered(
        port,
        "data",
        600,
        Some((20, Duration::from_millis(100))),
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(on_a.count() > 0, "nothing went to the primary before it died");
    a.kill9();
    let killed = std::time::Instant::now();
    on_b.wait(T, "first message on the second node", |g| !g.is_empty())
        .await;
    let failover = killed.elapsed();
    assert_eq!(publisher.await.unwrap(), 600);
    let union = || {
        let mut all = on_a.got.lock().unwrap().clone();
        all.extend(on_b.got.lock().unwrap().iter().cloned());
        all
    };
    let end = std::time::Instant::now() + T;
    while {
        let mut u: Vec<Vec<u8>> = union().into_iter().map(|(_, p)| p).collect();
        u.sort();
        u.dedup();
        u.len() < 600
    } {
        assert!(std::time::Instant::now() < end, "not all 600 arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What the primary had before it died, then the rest on the other node: nothing lost, per
    // topic in order.
    let dups = check_numbered(&union(), 0..600);
    let s = gw.bridge_state("cloud");
    assert_eq!(
        (s["url"].as_str(), s["failovers"].as_u64()),
        (Some(b.url().as_str()), Some(1)),
        "{s}"
    );
    eprintln!(
        "failover: kill -9 of the primary → first message on the other node in {} ms; 600 delivered, {dups} duplicates",
        failover.as_millis()
    );

    // The primary returns: after 2 s up, the bridge goes back to it.
    a.spawn();
    let back = std::time::Instant::now();
    wait_state(&gw, "cloud", T, "failed back to the primary", |s| {
        s["connected"] == true && s["url"] == a.url()
    })
    .await;
    let back = back.elapsed();
    assert!(
        back >= Duration::from_secs(2),
        "failed back before the primary was up 2 s: {back:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_b = on_b.count();
    assert_eq!(publish_numbered(port, "data/late", 10, None).await, 10);
    on_a.wait(T, "new messages on the primary", |g| {
        g.iter().filter(|(t, _)| t.starts_with("up/late/")).count() >= 10
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !on_b.got.lock().unwrap()[before_b..]
            .iter()
            .any(|(t, _)| t.starts_with("up/late/")),
        "a message went to the second node after the fail back"
    );
    eprintln!(
        "fail back: primary restarted → bridge on it again in {} ms",
        back.as_millis()
    );
}

#[tokio::test]
async fn urls_in_round_robin_move_on_and_stay_where_they_are() {
    let mut a = Mosquitto::start("allow_anonymous true");
    let b = Mosquitto::start("allow_anonymous true");
    let port = free_port();
    let cfg = format!(
        "  - name: cloud\n    urls: [\"{}\", \"{}\"]\n    failover: {{ round_robin: true, fail_back_after: 1s, probe: 200ms }}\n    backoff: {{ min: 200ms, max: 1s }}\n    rules:\n      - {{ direction: out, local: \"data/#\", remote: \"up/{{#}}\", qos: 1 }}\n",
        a.url(),
        b.url()
    );
    let gw = Gateway::start(&with_bridges(port, &cfg));
    wait_state(&gw, "cloud", T, "connected to the first", |s| {
        s["connected"] == true && s["url"] == a.url()
    })
    .await;
    a.kill9();
    wait_state(&gw, "cloud", T, "moved to the second", |s| {
        s["connected"] == true && s["url"] == b.url()
    })
    .await;
    a.spawn();
    // Round robin: no fail back, however long the first is up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = gw.bridge_state("cloud");
    assert_eq!(
        (s["url"].as_str(), s["failovers"].as_u64()),
        (Some(b.url().as_str()), Some(1)),
        "{s}"
    );
}

#[tokio::test]
async fn a_connected_bridge_without_acks_is_reported_stalled_until_acks_move() {
    let m = Mosquitto::start("allow_anonymous true");
    let port = free_port();
    let gw = Gateway::start(&with_bridges(
        port,
        &bridge(
            "cloud",
            &m.url(),
            &[r#"{ direction: out, local: "data/#", remote: "up/{#}", qos: 1 }"#],
            "stall_after: 1s",
        ),
    ));
    let up = Collector::start(m.port, "watch", "up/#", None, false);
    wait_state(&gw, "cloud", T, "connected", |s| s["connected"] == true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The upstream freezes: its socket stays open, nothing is acknowledged.
    m.signal("STOP");
    assert_eq!(publish_numbered(port, "data", 5, None).await, 5);
    wait_state(&gw, "cloud", Duration::from_secs(5), "reported stalled", |s| {
        s["stalled"] == true && s["connected"] == true
    })
    .await;
    let table = std::process::Command::new(BIN)
        .args(["status", "--config"])
        .arg(&gw.config)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.lines().any(|l| l.starts_with("cloud") && l.contains(" stalled ")),
        "{table}"
    );
    m.signal("CONT");
    up.wait(T, "the 5 after the upstream thawed", |g| g.len() >= 5).await;
    wait_state(&gw, "cloud", T, "no longer stalled", |s| s["stalled"] == false).await;
    assert_eq!(gw.bridge_state("cloud")["reconnects"], 0);
}

#[tokio::test]
async fn strip_retain_sends_nothing_retained_upstream() {
    let m = Mosquitto::start("allow_anonymous true");
    let port = free_port();
    // Subscribed before the bridge comes: its `online` is not retained, so a later subscriber
    // would miss it.
    let live = Collector::start(m.port, "live", "#", None, false);
    let _gw = Gateway::start(&with_bridges(
        port,
        &bridge(
            "cloud",
            &m.url(),
            &[r#"{ direction: out, local: "data/#", remote: "up/{#}", qos: 1 }"#],
            "strip_retain: true",
        ),
    ));
    live.wait(T, "status online", |g| g.iter().any(|(_, p)| p == b"online"))
        .await;
    let (c, ev) = connect(opts(port, "p")).await.unwrap();
    let _d = drive(ev);
    c.publish("data/state", QoS::AtLeastOnce, true, "on").await.unwrap();
    live.wait(T, "the message, live", |g| g.iter().any(|(t, _)| t == "up/state"))
        .await;
    // A subscriber that comes later finds nothing retained: not the message, not the status.
    let late = Collector::start(m.port, "late", "#", None, false);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(late.count(), 0, "retained upstream: {:?}", late.got.lock().unwrap());
}

#[tokio::test]
async fn message_expiry_from_max_age_lets_the_upstream_drop_what_is_too_old() {
    let m = Mosquitto::start("allow_anonymous true\nmax_queued_messages 1000");
    let port = free_port();
    let rule = |to: &str| format!("{{ direction: out, local: \"data/#\", remote: \"{to}/{{#}}\", qos: 1 }}");
    let _gw = Gateway::start(&with_bridges(
        port,
        &format!(
            "{}{}",
            bridge(
                "exp",
                &m.url(),
                &[&rule("exp")],
                "protocol: 5\nmessage_expiry: true\nspool: { max_age: 2s }"
            ),
            bridge("keep", &m.url(), &[&rule("keep")], "protocol: 5"),
        ),
    ));
    // A persistent subscriber upstream that is away while the messages come.
    let away = Collector::start(m.port, "away", "+/x", None, true);
    away.wait(T, "subscribed", |_| true).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(away);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let live = Collector::start(m.port, "live", "+/x", None, false);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (c, ev) = connect(opts(port, "p")).await.unwrap();
    let _d = drive(ev);
    c.publish("data/x", QoS::AtLeastOnce, false, "reading").await.unwrap();
    live.wait(T, "both bridges sent it", |g| g.len() >= 2).await;
    // Longer away than max_age: the one with an expiry is gone from its queue, the other kept.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let back = Collector::start(m.port, "away", "+/x", None, true);
    back.wait(T, "the queued one", |g| !g.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let topics: Vec<String> = back.got.lock().unwrap().iter().map(|(t, _)| t.clone()).collect();
    assert_eq!(topics, ["keep/x"]);
}

#[tokio::test]
async fn one_config_for_a_fleet_fills_in_the_gateway_id_and_the_site_prefix() {
    let m = Mosquitto::start("allow_anonymous true");
    let port = free_port();
    let _gw = Gateway::start(&with_bridges(
        port,
        &bridge(
            "cloud",
            &m.url(),
            &[r#"{ direction: out, local: "data/#", remote: "data/{#}", qos: 1 }"#],
            "client_id: \"{gateway.id}-up\"\nremote_prefix: \"sites/{gateway.id}/\"\nstatus_topic: \"sites/{gateway.id}/status\"",
        ),
    ));
    let up = Collector::start(m.port, "watch", "sites/#", None, false);
    up.wait(T, "status online under the site", |g| {
        g.iter().any(|(t, p)| t == "sites/test-gw/status" && p == b"online")
    })
    .await;
    let (c, ev) = connect(opts(port, "p")).await.unwrap();
    let _d = drive(ev);
    c.publish("data/x", QoS::AtLeastOnce, false, "1").await.unwrap();
    up.wait(T, "the message under the site prefix", |g| {
        g.iter().any(|(t, _)| t == "sites/test-gw/data/x")
    })
    .await;
    let log = std::fs::read_to_string(m.dir.path().join("mosquitto.log")).unwrap();
    assert!(log.contains(" as test-gw-up"), "client id not filled in:\n{log}");
}

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

/// How many different payloads arrived (a duplicate counts once).
pub(crate) fn distinct(g: &[(String, Vec<u8>)]) -> usize {
    g.iter().map(|(_, p)| p).collect::<std::collections::HashSet<_>>().len()
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
    up.wait(Duration::from_secs(30), "all 600", |g| distinct(g) >= 600)
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
        distinct(g) >= acked
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
    // Its subscription is in place once a probe through the upstream reaches it.
    let (probe, ev) = connect(opts(m.port, "probe")).await.unwrap();
    let _p = drive(ev);
    let end = std::time::Instant::now() + T;
    while !live.got.lock().unwrap().iter().any(|(t, _)| t == "probe") {
        assert!(
            std::time::Instant::now() < end,
            "the upstream subscriber never subscribed"
        );
        probe.publish("probe", QoS::AtMostOnce, false, "p").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let retained: Vec<_> = late
        .got
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| t != "probe")
        .cloned()
        .collect();
    assert!(retained.is_empty(), "retained upstream: {retained:?}");
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

/// An MQTT 5 client that subscribes `filter` and hands every PUBLISH it gets to the receiver.
async fn v5_watch(
    port: u16,
    id: &str,
    filter: &str,
) -> (
    rumqttc::v5::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
) {
    v5_watch_as(port, id, filter, None).await
}

async fn v5_watch_as(
    port: u16,
    id: &str,
    filter: &str,
    creds: Option<(&str, &str)>,
) -> (
    rumqttc::v5::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
) {
    use rumqttc::v5::{self, mqttbytes::v5::Packet as P5};
    let mut o = v5::MqttOptions::new(id, "127.0.0.1", port);
    if let Some((u, p)) = creds {
        o.set_credentials(u, p);
    }
    let (c, mut ev) = v5::AsyncClient::new(o, 100);
    c.subscribe(filter, v5::mqttbytes::QoS::AtLeastOnce).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        while let Ok(e) = ev.poll().await {
            match e {
                v5::Event::Incoming(P5::SubAck(_)) => {
                    if let Some(s) = subscribed_tx.take() {
                        let _ = s.send(());
                    }
                }
                v5::Event::Incoming(P5::Publish(p)) => {
                    let _ = tx.send(p);
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(T, subscribed).await.unwrap().unwrap();
    (c, rx)
}

#[tokio::test]
async fn mqtt5_properties_cross_the_bridge_both_ways_untouched() {
    use rumqttc::v5::mqttbytes::{v5::PublishProperties, QoS as Q5};
    let m = Mosquitto::start("allow_anonymous true");
    let port = free_port();
    let gw = Gateway::start(&with_bridges(
        port,
        &bridge(
            "p5",
            &m.url(),
            &[
                "{ direction: out, local: \"app/#\", remote: \"up/{#}\", qos: 1 }",
                "{ direction: out, local: \"live/#\", remote: \"uplive/{#}\", qos: 0 }",
                "{ direction: in, remote: \"down/#\", local: \"local/{#}\", qos: 1 }",
            ],
            "protocol: 5",
        ),
    ));
    wait_state(&gw, "p5", T, "bridge connected", |b| b["connected"] == true).await;
    let (_up, mut upstream_got) = v5_watch(m.port, "upstream-sub", "+/x").await;
    let (_local, mut local_got) = v5_watch(port, "local-sub", "local/#").await;
    let props = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("reply/x".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"\x00req-7\xff")),
        // Repeated names and their order are the publisher's, and must be kept.
        user_properties: vec![
            ("site".into(), "a".into()),
            ("unit".into(), "°C".into()),
            ("site".into(), "b".into()),
        ],
        ..Default::default()
    };
    let (p, ev) = rumqttc::v5::AsyncClient::new(rumqttc::v5::MqttOptions::new("pub5", "127.0.0.1", port), 10);
    let _d = tokio::spawn(async move {
        let mut ev = ev;
        while ev.poll().await.is_ok() {}
    });
    p.publish_with_properties("app/x", Q5::AtLeastOnce, false, "{\"t\":21}", props.clone())
        .await
        .unwrap();
    p.publish_with_properties("live/x", Q5::AtMostOnce, false, "{\"t\":22}", props.clone())
        .await
        .unwrap();
    let mut seen = HashMap::new();
    while seen.len() < 2 {
        let got = tokio::time::timeout(T, upstream_got.recv())
            .await
            .unwrap_or_else(|_| panic!("upstream got only {:?}", seen.keys().collect::<Vec<_>>()))
            .unwrap();
        seen.insert(
            String::from_utf8_lossy(&got.topic).into_owned(),
            got.properties.unwrap_or_default(),
        );
    }
    for topic in ["up/x", "uplive/x"] {
        let got = &seen[topic];
        assert_eq!(got.user_properties, props.user_properties, "{topic}");
        assert_eq!(got.content_type, props.content_type, "{topic}");
        assert_eq!(got.response_topic, props.response_topic, "{topic}");
        assert_eq!(got.correlation_data, props.correlation_data, "{topic}");
        assert_eq!(got.payload_format_indicator, Some(1), "{topic}");
    }

    // And inward: an upstream publisher's properties reach the local subscriber.
    let (u, ev) = rumqttc::v5::AsyncClient::new(rumqttc::v5::MqttOptions::new("cloud-pub", "127.0.0.1", m.port), 10);
    let _d2 = tokio::spawn(async move {
        let mut ev = ev;
        while ev.poll().await.is_ok() {}
    });
    let inward = PublishProperties {
        user_properties: vec![("cmd-id".into(), "42".into()), ("from".into(), "cloud".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    u.publish_with_properties("down/valve", Q5::AtLeastOnce, false, "open", inward.clone())
        .await
        .unwrap();
    let got = tokio::time::timeout(T, local_got.recv())
        .await
        .expect("inbound message")
        .unwrap();
    assert_eq!(&got.topic[..], b"local/valve");
    let gp = got.properties.unwrap_or_default();
    assert_eq!(gp.user_properties, inward.user_properties);
    assert_eq!(gp.content_type, inward.content_type);
}

/// A TCP relay to a local port whose connections can all be cut at once with a reset, as a
/// failing network does (both ends see the connection break, nothing is closed politely).
struct Relay {
    port: u16,
    cut: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(to: u16) -> Relay {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (cut, rx) = tokio::sync::watch::channel(0u64);
        let task = tokio::spawn(async move {
            while let Ok((mut a, _)) = l.accept().await {
                let mut rx = rx.clone();
                rx.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut b) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                        _ = rx.changed() => {
                            // A zero linger resets at once (it never blocks; the deprecation
                            // is about a non-zero one).
                            #[allow(deprecated)]
                            let _ = a.set_linger(Some(Duration::ZERO));
                            #[allow(deprecated)]
                            let _ = b.set_linger(Some(Duration::ZERO));
                        }
                    }
                });
            }
        });
        Relay { port, cut, task }
    }

    fn cut(&self) {
        self.cut.send_modify(|g| *g += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes `n` numbered QoS 1 messages on `prefix/a` and `prefix/b`, calling `during` at
/// each tenth; returns how many the gateway acknowledged.
async fn publish_numbered_with(port: u16, prefix: &str, n: usize, mut during: impl FnMut(usize)) -> usize {
    let (c, mut ev) = connect(opts(port, "numbered-with")).await.unwrap();
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
        if i % (n / 10) == 0 {
            during(i / (n / 10));
        }
        c.publish(
            format!("{prefix}/{}", ["a", "b"][i % 2]),
            QoS::AtLeastOnce,
            false,
            i.to_string(),
        )
        .await
        .unwrap();
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let end = std::time::Instant::now() + T;
    while acks.load(std::sync::atomic::Ordering::SeqCst) < n && std::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    driver.abort();
    acks.load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test]
async fn qos2_rules_cross_exactly_once_through_broken_connections_and_a_restart() {
    qos2_through_breaks("3.1.1", true).await;
}

#[tokio::test]
async fn qos2_rules_cross_exactly_once_over_mqtt5_too() {
    qos2_through_breaks("5", true).await;
}

#[tokio::test]
async fn qos2_without_a_session_upstream_loses_nothing() {
    // No session kept upstream: what the upstream answered with PUBREC but never released
    // (Mosquitto delivers at PUBREL) must go again, not be forgotten.
    qos2_through_breaks("3.1.1", false).await;
}

/// 3000 messages by a `qos: 2` rule while the connection to the upstream breaks and outpost
/// restarts. With a session kept upstream each arrives exactly once; without, at least once.
async fn qos2_through_breaks(protocol: &str, persistent: bool) {
    let m = Mosquitto::start("allow_anonymous true\nmax_queued_messages 100000\nmax_inflight_messages 50");
    let relay = Relay::start(m.port).await;
    let port = free_port();
    let mut gw = Gateway::start(&with_bridges(
        port,
        &bridge(
            "q2",
            &format!("mqtt://127.0.0.1:{}", relay.port),
            &[r#"{ direction: out, local: "data/#", remote: "up/{#}", qos: 2 }"#],
            &format!("persistent_session: {persistent}\ninflight: 50\nprotocol: {protocol}"),
        ),
    ));
    wait_state(&gw, "q2", T, "bridge connected", |b| b["connected"] == true).await;
    let up = Collector::start(m.port, "exactly", "up/#", None, false);
    up.wait(T, "subscriber up", |_| true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 3000 messages; the network between the bridge and the upstream breaks six times while
    // they flow (each time with QoS 2 messages at every stage in flight).
    let n = 3000;
    let cuts = [1, 2, 4, 5, 7, 8];
    let acked = publish_numbered_with(port, "data", n, |tenth| {
        if cuts.contains(&tenth) {
            relay.cut();
        }
    })
    .await;
    assert_eq!(acked, n);
    // And outpost restarts (SIGTERM) while the rest is still going out.
    gw.restart();
    up.wait(Duration::from_secs(60), "every message", |g| distinct(g) >= n)
        .await;
    // Anything that was still to come would come within this.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = up.got.lock().unwrap().clone();
    let dups = check_numbered(&got, 0..n);
    // The log says how often the connection broke and a resumed session had QoS 2 messages to
    // finish (the status file is written every few seconds and restarts with the process).
    let log = gw.log();
    let resets = log.matches("bridge q2: Mqtt state").count();
    let resumed = log.matches("the upstream kept the session; finishing").count();
    let again = log
        .matches("QoS 2 messages it had answered with PUBREC go again")
        .count();
    eprintln!(
        "QoS 2 over {protocol}, session kept {persistent}: {n} delivered, {dups} duplicates, {resets} broken connections, \
         {resumed} sessions resumed with QoS 2 in flight, {again} without a session and PUBREC'd messages sent again"
    );
    if persistent {
        assert!(
            resets >= 2 && resumed >= 2,
            "the connection did not break with QoS 2 in flight; log:\n{log}"
        );
        assert_eq!(dups, 0, "QoS 2 must cross exactly once");
    } else {
        assert!(
            resets >= 2 && again >= 1,
            "no break caught a message at PUBREC; log:\n{log}"
        );
    }
    wait_state(&gw, "q2", T, "the spool empty", |b| b["queued"] == 0).await;
}

#[tokio::test]
async fn inbound_messages_are_acknowledged_upstream_only_once_safe_locally() {
    // The bridge's session upstream is persistent, and so is the local subscriber's: whatever
    // the upstream counts as delivered to outpost must come out at that subscriber, even when
    // outpost is killed (-9) while the messages stream in.
    let m = Mosquitto::start("allow_anonymous true\nmax_queued_messages 100000\nmax_inflight_messages 50");
    let port = free_port();
    let mut gw = Gateway::start(&with_bridges(
        port,
        &bridge(
            "in",
            &m.url(),
            &[r#"{ direction: in, remote: "cloud/#", local: "cmd/{#}", qos: 1 }"#],
            "persistent_session: true",
        ),
    ));
    wait_state(&gw, "in", T, "bridge connected", |b| b["connected"] == true).await;
    // The local subscriber's session exists, then it goes away: messages queue on disk for it.
    {
        let away = Collector::start(port, "keeper", "cmd/#", None, true);
        away.wait(T, "subscribed", |_| true).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = 4000;
    let (c, ev) = connect(opts(m.port, "cloud-pub")).await.unwrap();
    let _d = drive(ev);
    let sender = tokio::spawn(async move {
        for i in 0..n {
            c.publish(
                format!("cloud/{}", ["a", "b"][i % 2]),
                QoS::AtLeastOnce,
                false,
                i.to_string(),
            )
            .await
            .unwrap();
        }
        c
    });
    // Killed while they stream in.
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while gw.bridge_state("in")["received"].as_u64().unwrap_or(0) < (n / 4) as u64 {
        assert!(std::time::Instant::now() < end, "inbound messages do not arrive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.kill9();
    let _c = sender.await.unwrap();
    gw.start_again();
    let back = Collector::start(port, "keeper", "cmd/#", None, true);
    back.wait(Duration::from_secs(60), "every message the upstream sent", |g| {
        distinct(g) >= n
    })
    .await;
    // Every message, whatever the order: a message the upstream sends again after the restart
    // has been seen to arrive after later ones (README: per-topic order of inbound messages
    // across a kill -9 is not guaranteed; the cause is not found yet).
    let got = back.got.lock().unwrap().clone();
    let mut seen = std::collections::HashSet::new();
    let mut late = 0;
    let mut last: HashMap<String, usize> = HashMap::new();
    for (t, p) in &got {
        let k: usize = String::from_utf8_lossy(p).parse().expect("numbered payload");
        if seen.insert(k) && last.get(t).is_some_and(|&prev| k < prev) {
            late += 1;
        }
        last.entry(t.clone()).and_modify(|v| *v = (*v).max(k)).or_insert(k);
    }
    let missing: Vec<usize> = (0..n).filter(|k| !seen.contains(k)).collect();
    assert!(
        missing.is_empty(),
        "{} never arrived, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    eprintln!(
        "durable inbound: {n} delivered through a kill -9, {} duplicates, {late} first arrivals behind later ones",
        got.len() - seen.len()
    );
}

#[tokio::test]
async fn live_messages_go_before_the_backlog_which_is_marked_and_each_topic_keeps_its_order() {
    let m = Mosquitto::with_users(false, false);
    let port = free_port();
    let gw = Gateway::start(&with_bridges(
        port,
        &bridge(
            "bl",
            &m.url(),
            &[r#"{ direction: out, local: "data/#", remote: "up/{#}", qos: 1 }"#],
            &format!("{AUTH}\nprotocol: 5\nbacklog: {{ live_first: true, mark: true }}\ndrain_rate: 20/s"),
        ),
    ));
    // The upstream refuses the bridge: 300 messages on data/a wait in the spool.
    let (c, mut ev) = connect(opts(port, "pub")).await.unwrap();
    let acks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = acks.clone();
    let _d = tokio::spawn(async move {
        while let Ok(e) = ev.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = e {
                a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    for i in 0..300 {
        c.publish("data/a", QoS::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
    }
    let end = std::time::Instant::now() + T;
    while acks.load(std::sync::atomic::Ordering::SeqCst) < 300 {
        assert!(std::time::Instant::now() < end, "backlog not accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_s, mut got) = v5_watch_as(m.port, "watch", "up/#", Some(("sub", "sub-pw"))).await;
    m.allow_bridge();
    wait_state(&gw, "bl", Duration::from_secs(20), "bridge connected", |b| {
        b["connected"] == true
    })
    .await;
    // Live: 20 on a topic with no backlog, 5 more on the backlog's topic.
    for i in 300..320 {
        c.publish("data/b", QoS::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
    }
    for i in 320..325 {
        c.publish("data/a", QoS::AtLeastOnce, false, i.to_string())
            .await
            .unwrap();
    }
    let mut order = vec![];
    while order.len() < 325 {
        let p = tokio::time::timeout(Duration::from_secs(30), got.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of 325 arrived", order.len()))
            .unwrap();
        let n: usize = String::from_utf8_lossy(&p.payload).parse().unwrap();
        let mark = p
            .properties
            .unwrap_or_default()
            .user_properties
            .into_iter()
            .find(|(k, _)| k == "outpost-backlog")
            .map(|(_, v)| v);
        order.push((String::from_utf8_lossy(&p.topic).into_owned(), n, mark));
    }
    let pos = |n: usize| order.iter().position(|(_, x, _)| *x == n).unwrap();
    // Live on data/b overtook the backlog (at 20/s it takes 15 s to drain; the bridge is seen
    // connected within a few seconds): at least 100 backlog messages came after the last live.
    assert!(
        pos(319) + 100 < pos(299),
        "live messages waited for the backlog: the last live arrived {}th, the last backlog {}th",
        pos(319),
        pos(299)
    );
    // Each topic in order: data/a's live messages behind its backlog.
    let a: Vec<usize> = order
        .iter()
        .filter(|(t, _, _)| t == "up/a")
        .map(|(_, n, _)| *n)
        .collect();
    let b: Vec<usize> = order
        .iter()
        .filter(|(t, _, _)| t == "up/b")
        .map(|(_, n, _)| *n)
        .collect();
    assert_eq!(a, (0..300).chain(320..325).collect::<Vec<_>>());
    assert_eq!(b, (300..320).collect::<Vec<_>>());
    // The backlog is marked with when it was accepted; live messages are not.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for (t, n, mark) in &order {
        match (n < &300, mark) {
            (true, Some(ms)) => {
                let ms: i64 = ms.parse().expect("ms since the epoch");
                assert!(now - ms < 120_000 && now >= ms, "{t} {n}: accepted at {ms}?");
            }
            (false, None) => {}
            (backlog, mark) => panic!("{t} {n}: backlog {backlog}, mark {mark:?}"),
        }
    }
}

#[tokio::test]
async fn drain_rate_caps_qos0_publishes_too_and_counts_what_it_drops() {
    let m = Mosquitto::start("allow_anonymous true");
    let port = free_port();
    let gw = Gateway::start(&with_bridges(
        port,
        &bridge(
            "slow",
            &m.url(),
            &[r#"{ direction: out, local: "live/#", remote: "up/{#}", qos: 0 }"#],
            "drain_rate: 10/s",
        ),
    ));
    wait_state(&gw, "slow", T, "bridge connected", |b| b["connected"] == true).await;
    let up = Collector::start(m.port, "count", "up/#", None, false);
    up.wait(T, "subscriber up", |_| true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c, ev) = connect(opts(port, "fast")).await.unwrap();
    let _d = drive(ev);
    // 200 QoS 0 messages within about a second: at 10/s the upstream may get about 20.
    for i in 0..200 {
        c.publish("live/x", QoS::AtMostOnce, false, i.to_string())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = up.count();
    assert!((1..=40).contains(&got), "{got} of 200 went upstream at 10/s");
    wait_state(&gw, "slow", T, "every message sent or counted", |b| {
        b["sent"].as_u64().unwrap_or(0) + b["dropped"]["qos0_not_connected"].as_u64().unwrap_or(0) >= 200
    })
    .await;
}

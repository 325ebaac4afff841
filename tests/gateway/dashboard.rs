//! The dashboard port: health, Prometheus metrics, and MQTT over WebSocket on `/mqtt`.

use crate::common::*;
use rumqttc::{QoS, Transport};
use std::time::{Duration, Instant};

fn get(url: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut r = agent.get(url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

fn scrape(dport: u16) -> prometheus_parse::Scrape {
    let (code, text) = get(&format!("http://127.0.0.1:{dport}/metrics"));
    assert_eq!(code, 200, "{text}");
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("/metrics is Prometheus text")
}

fn value(s: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && label.is_none_or(|(k, v)| x.labels.get(k) == Some(v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

fn config(port: u16, dport: u16, upstream: u16, alice: &str) -> String {
    format!(
        "broker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n  users:\n    - {{ name: alice, password_hash: \"{alice}\" }}\n  acl:\n    - {{ who: \"*\", allow: {{ publish: [\"#\"], subscribe: [\"#\"] }} }}\n\
         dashboard:\n  bind: \"127.0.0.1:{dport}\"\n\
         bridges:\n  - name: cloud\n    url: \"mqtt://127.0.0.1:{upstream}\"\n    backoff: {{ min: 200ms, max: 1s }}\n    rules:\n      - {{ direction: out, local: \"sensor/#\", remote: \"site/{{#}}\", qos: 1 }}\n"
    )
}

#[tokio::test]
async fn metrics_move_with_traffic_and_healthz_sees_the_spool() {
    let (port, dport, upstream) = (free_port(), free_port(), free_port());
    let mut gw = Gateway::start(&config(port, dport, upstream, &passwd("alice-pw")));

    let (code, body) = get(&format!("http://127.0.0.1:{dport}/healthz"));
    assert_eq!(code, 200, "{body}");
    let before = scrape(dport);
    assert_eq!(
        value(&before, "outpost_bridge_connected", Some(("bridge", "cloud"))),
        Some(0.0)
    );
    let sent_before = value(&before, "outpost_messages_in_total", None).unwrap_or(0.0);

    let (c, ev) = connect(opts(port, "pub")).await.unwrap();
    drive(ev);
    for i in 0..5 {
        c.publish("sensor/t", QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    // The upstream is down: the five wait in the spool, and the counters say so.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let s = scrape(dport);
        let queued = value(&s, "outpost_bridge_queued_messages", Some(("bridge", "cloud")));
        let inn = value(&s, "outpost_messages_in_total", None).unwrap_or(0.0);
        if queued == Some(5.0) && inn >= sent_before + 5.0 {
            break;
        }
        assert!(
            Instant::now() < end,
            "metrics did not move: queued {queued:?}, in {inn}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The spool directory stops taking writes: /healthz says which bridge and why.
    let spool = gw.dir.path().join("data/bridges");
    std::fs::rename(&spool, gw.dir.path().join("data/bridges.moved")).unwrap();
    std::fs::write(&spool, b"not a directory").unwrap();
    let (code, body) = get(&format!("http://127.0.0.1:{dport}/healthz"));
    assert_eq!(code, 503, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["healthy"], false);
    assert!(doc["problems"][0].as_str().unwrap().contains("bridge cloud"), "{body}");
    std::fs::remove_file(&spool).unwrap();
    std::fs::rename(gw.dir.path().join("data/bridges.moved"), &spool).unwrap();
    assert_eq!(get(&format!("http://127.0.0.1:{dport}/healthz")).0, 200);
    assert!(gw.stop(), "gateway did not stop cleanly:\n{}", gw.log());
}

#[tokio::test]
async fn mqtt_over_websocket_on_the_dashboard_port() {
    let (port, dport, upstream) = (free_port(), free_port(), free_port());
    let mut gw = Gateway::start(&config(port, dport, upstream, &passwd("alice-pw")));

    let ws = |id: &str, pw: &str| {
        let mut o = rumqttc::MqttOptions::new(id, format!("ws://127.0.0.1:{dport}/mqtt"), dport);
        o.set_transport(Transport::Ws);
        o.set_credentials("alice", pw);
        o
    };
    match connect(ws("ws-bad", "wrong")).await {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::NotAuthorized)
        }
        Err(e) => panic!("a wrong password got {e}, not a CONNACK refusal"),
        Ok(_) => panic!("a wrong password got in"),
    }

    let (s, mut sev) = connect(ws("ws-sub", "alice-pw")).await.unwrap();
    subscribe(&s, &mut sev, "hello/#", QoS::AtLeastOnce).await;
    let (p, pev) = connect(opts(port, "tcp-pub")).await.unwrap();
    drive(pev);
    p.publish("hello/ws", QoS::AtLeastOnce, false, "over the dashboard port")
        .await
        .unwrap();
    let got = next_publish(&mut sev, Duration::from_secs(5)).await;
    assert_eq!(
        got,
        Some(("hello/ws".into(), b"over the dashboard port".to_vec(), false))
    );

    // A plain GET on /mqtt is told to upgrade; unknown pages are 404.
    assert_eq!(get(&format!("http://127.0.0.1:{dport}/mqtt")).0, 426);
    assert_eq!(get(&format!("http://127.0.0.1:{dport}/nope")).0, 404);
    assert!(gw.stop(), "gateway did not stop cleanly:\n{}", gw.log());
}

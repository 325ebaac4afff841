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
    let out_before = value(&before, "outpost_messages_out_total", None).unwrap_or(0.0);
    let (w, mut wev) = connect(opts(port, "watch")).await.unwrap();
    subscribe(&w, &mut wev, "sensor/#", QoS::AtMostOnce).await;

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
        let out = value(&s, "outpost_messages_out_total", None).unwrap_or(0.0);
        if queued == Some(5.0) && inn >= sent_before + 5.0 && out >= out_before + 5.0 {
            break;
        }
        assert!(
            Instant::now() < end,
            "metrics did not move: queued {queued:?}, in {inn}, out {out}"
        );
        // Keep the watcher's connection read.
        while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(10), wev.poll()).await {}
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

/// A headless Debian Chromium driven over WebDriver (chromedriver's REST API).
struct Browser {
    driver: std::process::Child,
    base: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let port = free_port();
        let driver = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver (Debian package chromium-driver) must be installed");
        let profile = tempfile::tempdir().unwrap();
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--window-size=1200,1400", format!("--user-data-dir={}", profile.path().display())]
            }
        }}});
        let root = format!("http://127.0.0.1:{port}");
        let end = Instant::now() + Duration::from_secs(20);
        let session = loop {
            match post_json(&format!("{root}/session"), &caps) {
                Ok(v) => break v,
                Err(e) => {
                    assert!(Instant::now() < end, "chromedriver did not answer: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        };
        let id = session["value"]["sessionId"]
            .as_str()
            .expect("a WebDriver session")
            .to_string();
        Browser {
            driver,
            base: format!("{root}/session/{id}"),
            _profile: profile,
        }
    }

    fn cmd(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        post_json(&format!("{}{path}", self.base), &body).unwrap_or_else(|e| panic!("WebDriver {path}: {e}"))["value"]
            .clone()
    }

    fn screenshot(&self) -> serde_json::Value {
        let mut r = ureq::get(format!("{}/screenshot", self.base))
            .call()
            .expect("WebDriver screenshot");
        serde_json::from_str::<serde_json::Value>(&r.body_mut().read_to_string().unwrap()).unwrap()["value"].clone()
    }

    fn script(&self, js: &str) -> serde_json::Value {
        self.cmd("/execute/sync", serde_json::json!({"script": js, "args": []}))
    }

    /// The WebDriver id of the element `css` selects.
    fn element(&self, css: &str) -> String {
        let el = self.cmd("/element", serde_json::json!({"using": "css selector", "value": css}));
        let id = el.as_object().and_then(|o| o.values().next()).and_then(|v| v.as_str());
        id.unwrap_or_else(|| panic!("no element {css}: {el}")).to_string()
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css);
        self.cmd(&format!("/element/{id}/value"), serde_json::json!({ "text": text }));
    }

    fn click(&self, css: &str) {
        let id = self.element(css);
        self.cmd(&format!("/element/{id}/click"), serde_json::json!({}));
    }

    /// Waits until the page's visible text contains every one of `want`.
    fn wait_text(&self, want: &[&str], within: Duration) -> String {
        let end = Instant::now() + within;
        loop {
            let t = self
                .script("return document.body.innerText")
                .as_str()
                .unwrap_or("")
                .to_string();
            if want.iter().all(|w| t.contains(w)) || Instant::now() > end {
                return t;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = ureq::delete(&self.base).call();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn the_page_logs_in_and_shows_live_topics_and_bridges() {
    let (port, dport, upstream) = (free_port(), free_port(), free_port());
    let mut gw = Gateway::start(&config(port, dport, upstream, &passwd("alice-pw")));
    let b = Browser::start();
    b.cmd(
        "/url",
        serde_json::json!({ "url": format!("http://127.0.0.1:{dport}/") }),
    );
    let t = b.wait_text(&["gateway test-gw", "Log in"], Duration::from_secs(10));
    assert!(t.contains("gateway test-gw") && t.contains("Log in"), "{t}");

    b.type_into("#user", "alice");
    b.type_into("#pass", "wrong");
    b.click("#go");
    let t = b.wait_text(&["wrong user or password"], Duration::from_secs(10));
    assert!(t.contains("wrong user or password"), "{t}");

    b.script("document.getElementById('pass').value = ''; return 0");
    b.type_into("#pass", "alice-pw");
    b.click("#go");
    let t = b.wait_text(&["connected"], Duration::from_secs(10));
    assert!(t.contains("connected"), "{t}");
    let form_shown = b.script("return document.getElementById('login').getClientRects().length > 0");
    assert_eq!(form_shown, false, "the login form is still shown after logging in");

    let out = std::process::Command::new("mosquitto_pub")
        .args(["-p", &port.to_string(), "-t", "plant/boiler/temp", "-m", "71.25"])
        .output()
        .expect("mosquitto_pub (Debian package mosquitto-clients) must be installed");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The message in the topic view; the bridge (its upstream is down) in the bridges panel.
    // A device made with the CLI shows in the devices panel from its state topic.
    let out = std::process::Command::new(BIN)
        .args(["devices", "add", "kitchen", "--config"])
        .arg(&gw.config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mqtt_url = format!("mqtt://127.0.0.1:{port}");
    let want = [
        "plant/",
        "boiler/",
        "temp\t",
        "71.25",
        "cloud\tdown",
        &mqtt_url,
        "kitchen\tlast seen never\trejected 0",
    ];
    let t = b.wait_text(&want, Duration::from_secs(15));
    // The topic sits in the tree under its levels, and clicking it charts its value.
    let path = b.script(
        "const rows = [...document.querySelectorAll('#topics tbody tr')].map(r => r.cells[0].innerText.trim());\
         const i = rows.findIndex(r => r.startsWith('▾ plant/'));\
         return rows.slice(i, i + 3)",
    );
    assert_eq!(path, serde_json::json!(["▾ plant/", "▾ boiler/", "temp"]), "{t}");
    // The rows are redrawn twice a second, so a WebDriver element can go stale between find
    // and click: find and click in one step in the page.
    b.script("document.querySelector(\"tr[data-topic='plant/boiler/temp'] td\").click(); return 0");
    std::thread::sleep(Duration::from_millis(800));
    let drawn = b.script(
        "const c = document.getElementById('chart');\
         const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;\
         for (let i = 0; i < d.length; i += 4) if (d[i] < 100 && d[i + 2] > 200 && d[i + 3] > 200) return true;\
         return false",
    );
    assert_eq!(drawn, true, "the chart drew nothing for plant/boiler/temp");
    let shot = b.screenshot();
    let png = base64_decode(shot.as_str().unwrap_or(""));
    let artifact = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&artifact, png).unwrap();
    for w in want {
        assert!(
            t.contains(w),
            "`{w}` not on the page (screenshot {}):\n{t}",
            artifact.display()
        );
    }
    drop(b);
    assert!(gw.stop(), "gateway did not stop cleanly:\n{}", gw.log());
}

fn post_json(url: &str, body: &serde_json::Value) -> Result<serde_json::Value, ureq::Error> {
    let mut r = ureq::post(url)
        .header("content-type", "application/json")
        .send(body.to_string())?;
    Ok(serde_json::from_str(&r.body_mut().read_to_string()?).expect("WebDriver answers JSON"))
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("WebDriver screenshot is base64")
}

#[tokio::test]
async fn https_and_wss_on_the_dashboard_port() {
    let (port, dport) = (free_port(), free_port());
    let d = tempfile::tempdir().unwrap();
    let pki = crate::robustness::make_pki(d.path());
    let p = d.path().display();
    let mut gw = Gateway::start(&format!(
        "{}dashboard:\n  bind: \"127.0.0.1:{dport}\"\n  tls: {{ cert: {p}/server.pem, key: {p}/server.key }}\n",
        open_broker(port)
    ));
    // Plain HTTP on the TLS port gets nowhere; the gateway keeps serving.
    assert!(ureq::get(format!("http://127.0.0.1:{dport}/healthz")).call().is_err());

    let mut o = rumqttc::MqttOptions::new("wss-sub", format!("wss://127.0.0.1:{dport}/mqtt"), dport);
    o.set_transport(Transport::wss_with_config(crate::robustness::tls_client(&pki, false)));
    let (s, mut sev) = connect(o).await.expect("MQTT over wss:// on the dashboard port");
    subscribe(&s, &mut sev, "tls/#", QoS::AtLeastOnce).await;
    let (c, ev) = connect(opts(port, "tcp-pub")).await.unwrap();
    drive(ev);
    c.publish("tls/x", QoS::AtLeastOnce, false, "secret").await.unwrap();
    let got = next_publish(&mut sev, Duration::from_secs(5)).await;
    assert_eq!(got, Some(("tls/x".into(), b"secret".to_vec(), false)));
    assert!(gw.stop(), "gateway did not stop cleanly:\n{}", gw.log());
}

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
        // Anonymous on /mqtt is asked for here: it is off by default.
        "{}dashboard:\n  bind: \"127.0.0.1:{dport}\"\n  anonymous: true\n  tls: {{ cert: {p}/server.pem, key: {p}/server.key }}\n",
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

/// A WebSocket handshake on `/mqtt` by hand, with or without an `Origin`; the HTTP status.
fn ws_handshake(dport: u16, origin: Option<&str>) -> (u16, std::net::TcpStream) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", dport)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let origin = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
    write!(
        s,
        "GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1:{dport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n{origin}\r\n"
    )
    .unwrap();
    let mut head = vec![];
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, s)
}

/// Sends an MQTT 3.1.1 CONNECT (optionally with a user) in one masked frame; the CONNACK code.
fn ws_connect(s: &mut std::net::TcpStream, user: Option<(&str, &str)>) -> Option<u8> {
    use std::io::{Read, Write};
    let str_ = |v: &str| {
        let mut o = vec![0, v.len() as u8];
        o.extend_from_slice(v.as_bytes());
        o
    };
    let mut body = str_("MQTT");
    body.extend([4u8, if user.is_some() { 0xc2 } else { 0x02 }, 0, 30]);
    body.extend(str_("raw-ws"));
    if let Some((u, p)) = user {
        body.extend(str_(u));
        body.extend(str_(p));
    }
    let mut pkt = vec![0x10, body.len() as u8];
    pkt.extend(body);
    let key = [9u8, 8, 7, 6];
    let mut frame = vec![0x82, 0x80 | pkt.len() as u8];
    frame.extend(key);
    frame.extend(pkt.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    s.write_all(&frame).unwrap();
    let mut head = [0u8; 2];
    s.read_exact(&mut head).ok()?;
    let mut payload = vec![0u8; (head[1] & 0x7f) as usize];
    s.read_exact(&mut payload).ok()?;
    (payload.first() == Some(&0x20)).then(|| payload[3])
}

/// Issue 13, point 4: another site's page in the operator's browser cannot open `/mqtt`, and
/// a client with no user name is not let in there even on loopback (unless configured).
#[test]
fn mqtt_on_the_dashboard_refuses_other_origins_and_anonymous_clients() {
    let (port, dport, upstream) = (free_port(), free_port(), free_port());
    let mut gw = Gateway::start(&config(port, dport, upstream, &passwd("alice-pw")));
    let (code, _) = ws_handshake(dport, Some("https://evil.example"));
    assert_eq!(code, 403, "a WebSocket from another origin was accepted");
    let (code, _) = ws_handshake(dport, Some(&format!("http://localhost.evil.example:{dport}")));
    assert_eq!(code, 403);
    // The dashboard's own page, and clients that are not browsers (no Origin), get in.
    let (code, mut s) = ws_handshake(dport, Some(&format!("http://127.0.0.1:{dport}")));
    assert_eq!(code, 101);
    assert_eq!(
        ws_connect(&mut s, None),
        Some(5),
        "an anonymous CONNECT on /mqtt was accepted"
    );
    let (code, mut s) = ws_handshake(dport, None);
    assert_eq!(code, 101);
    assert_eq!(ws_connect(&mut s, Some(("alice", "alice-pw"))), Some(0));
    assert!(gw.stop(), "gateway did not stop cleanly:\n{}", gw.log());

    // Listed origins get in; anonymous only when asked for.
    let (port, dport) = (free_port(), free_port());
    let mut gw = Gateway::start(&format!(
        "{}dashboard:\n  bind: \"127.0.0.1:{dport}\"\n  anonymous: true\n  origins: [\"https://ops.example\"]\n",
        open_broker(port)
    ));
    let (code, mut s) = ws_handshake(dport, Some("https://ops.example"));
    assert_eq!(code, 101);
    assert_eq!(ws_connect(&mut s, None), Some(0));
    assert!(gw.stop(), "gateway did not stop cleanly:\n{}", gw.log());
}

fn get_auth(url: &str, auth: Option<&str>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let mut req = agent.get(url);
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let mut r = req.call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
}

fn basic(user: &str, pw: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"))
    )
}

/// Issue 13, point 11: bound off loopback, `/metrics` and `/info.json` need a login or the
/// token, and `/healthz` says only whether the gateway is healthy.
#[test]
fn off_loopback_metrics_and_info_need_a_login_and_healthz_says_only_ok() {
    let (port, dport) = (free_port(), free_port());
    let mut gw = Gateway::start(&format!(
        "broker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n  users:\n    - {{ name: alice, password_hash: \"{}\" }}\n\
         dashboard:\n  bind: \"0.0.0.0:{dport}\"\n  token: \"scrape-token-0123456789\"\n",
        passwd("alice-pw")
    ));
    let url = |p: &str| format!("http://127.0.0.1:{dport}{p}");
    for p in ["/metrics", "/info.json"] {
        let (code, body) = get_auth(&url(p), None);
        assert_eq!(code, 401, "{p} without a login: {body}");
        assert!(!body.contains("test-gw"), "{p} told the gateway id without a login");
        assert_eq!(get_auth(&url(p), Some(&basic("alice", "wrong"))).0, 401);
        assert_eq!(get_auth(&url(p), Some("Bearer not-the-token-at-all")).0, 401);
        assert_eq!(get_auth(&url(p), Some(&basic("alice", "alice-pw"))).0, 200, "{p}");
        assert_eq!(get_auth(&url(p), Some("Bearer scrape-token-0123456789")).0, 200, "{p}");
    }
    let (code, body) = get_auth(&url("/healthz"), None);
    assert_eq!(code, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        serde_json::json!({"healthy": true})
    );
    // The token is for scrapers: it is not a user of the page.
    assert_eq!(get_auth(&url("/api/me"), Some("Bearer scrape-token-0123456789")).0, 401);
    assert!(gw.stop(), "gateway did not stop cleanly:\n{}", gw.log());
}

/// Issue 17, point 5 (server side): `/api/me` lists what the user may read, checked against
/// the policy in force, and says what is hidden.
#[test]
fn api_me_lists_what_a_limited_user_may_read() {
    let (port, dport) = (free_port(), free_port());
    let mut gw = Gateway::start(&format!(
        "broker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n  users:\n    - {{ name: alice, password_hash: \"{a}\" }}\n    - {{ name: bob, password_hash: \"{b}\" }}\n  acl:\n    - {{ who: \"user:alice\", allow: {{ publish: [\"#\"], subscribe: [\"#\"] }} }}\n    - {{ who: \"user:*\", allow: {{ subscribe: [\"plant/{{username}}/#\", \"sensor/+/1m\"] }} }}\n\
         dashboard:\n  bind: \"127.0.0.1:{dport}\"\n  admins: [alice]\n",
        a = passwd("alice-pw"),
        b = passwd("bob-pw")
    ));
    let me = |who: &str, pw: &str| {
        let (code, body) = get_auth(&format!("http://127.0.0.1:{dport}/api/me"), Some(&basic(who, pw)));
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let bob = me("bob", "bob-pw");
    assert_eq!(
        bob["filters"],
        serde_json::json!(["plant/bob/#", "sensor/+/1m"]),
        "{bob}"
    );
    assert_eq!(bob["everything"], false);
    assert_eq!(bob["admin"], false);
    assert!(bob["notice"].as_str().unwrap().contains("plant/bob/#"), "{bob}");
    let alice = me("alice", "alice-pw");
    assert_eq!(alice["filters"], serde_json::json!(["#"]));
    assert_eq!(alice["admin"], true);
    assert_eq!(get_auth(&format!("http://127.0.0.1:{dport}/api/me"), None).0, 401);
    assert!(gw.stop(), "gateway did not stop cleanly:\n{}", gw.log());
}

/// The next PUBLISH on an MQTT 5 client, as JSON.
async fn reply(ev: &mut rumqttc::v5::EventLoop) -> serde_json::Value {
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(end, ev.poll()).await {
            Ok(Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::Publish(p)))) => {
                return serde_json::from_slice::<serde_json::Value>(&p.payload).unwrap()
            }
            Ok(Ok(_)) => {}
            other => panic!("no reply: {other:?}"),
        }
    }
}

/// Issue 17, point 8 (admin): a dashboard admin pauses, resumes and restarts a bridge over the
/// broker; anyone else's request is refused by the broker (MQTT 5: PUBACK 0x87).
#[tokio::test]
async fn an_admin_pauses_and_restarts_a_bridge_and_others_are_refused() {
    let mut up = Mosquitto::start("allow_anonymous true");
    let (port, dport) = (free_port(), free_port());
    let mut gw = Gateway::start(&format!(
        "broker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n  users:\n    - {{ name: alice, password_hash: \"{a}\" }}\n    - {{ name: bob, password_hash: \"{b}\" }}\n  acl:\n    - {{ who: \"*\", allow: {{ publish: [\"#\"], subscribe: [\"#\"] }} }}\n\
         dashboard:\n  bind: \"127.0.0.1:{dport}\"\n  admins: [alice]\n\
         bridges:\n  - name: cloud\n    url: \"{url}\"\n    backoff: {{ min: 200ms, max: 1s }}\n    rules:\n      - {{ direction: out, local: \"sensor/#\", remote: \"site/{{#}}\", qos: 1 }}\n",
        a = passwd("alice-pw"),
        b = passwd("bob-pw"),
        url = up.url()
    ));
    let wait_bridge = |want: &dyn Fn(&serde_json::Value) -> bool, what: &str| {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let b = gw.bridge_state("cloud");
            if want(&b) {
                return b;
            }
            assert!(Instant::now() < end, "bridge never {what}: {b}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_bridge(&|b| b["connected"] == true, "connected");
    let mut o = rumqttc::v5::MqttOptions::new("alice-ops", "127.0.0.1", port);
    o.set_credentials("alice", "alice-pw");
    let (alice, mut aev) = rumqttc::v5::AsyncClient::new(o, 10);
    alice
        .subscribe(
            "outpost/test-gw/bridges/reply/#",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let ask = |action: &str| {
        serde_json::json!({ "bridge": "cloud", "action": action, "reply_to": "outpost/test-gw/bridges/reply/alice" })
            .to_string()
    };
    alice
        .publish(
            "outpost/test-gw/bridges/request",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            ask("pause"),
        )
        .await
        .unwrap();
    let r = reply(&mut aev).await;
    assert_eq!(r["ok"], true, "{r}");
    let b = wait_bridge(&|b| b["connected"] == false && b["paused"] == true, "paused");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        gw.bridge_state("cloud")["connected"],
        false,
        "a paused bridge reconnected: {b}"
    );
    alice
        .publish(
            "outpost/test-gw/bridges/request",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            ask("resume"),
        )
        .await
        .unwrap();
    assert_eq!(reply(&mut aev).await["ok"], true);
    wait_bridge(&|b| b["connected"] == true && b["paused"] == false, "resumed");
    let before = gw.bridge_state("cloud")["reconnects"].as_u64().unwrap();
    alice
        .publish(
            "outpost/test-gw/bridges/request",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            ask("restart"),
        )
        .await
        .unwrap();
    assert_eq!(reply(&mut aev).await["ok"], true);
    wait_bridge(
        &|b| b["connected"] == true && b["reconnects"].as_u64() > Some(before),
        "restarted",
    );

    // Bob is no admin: the broker refuses his request.
    let mut o = rumqttc::v5::MqttOptions::new("bob-ops", "127.0.0.1", port);
    o.set_credentials("bob", "bob-pw");
    let (bob, mut bev) = rumqttc::v5::AsyncClient::new(o, 10);
    bob.publish(
        "outpost/test-gw/bridges/request",
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        ask("pause"),
    )
    .await
    .unwrap();
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    let code = loop {
        match tokio::time::timeout_at(end, bev.poll()).await {
            Ok(Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(a)))) => break a.reason,
            Ok(Ok(_)) => {}
            other => panic!("no PUBACK for bob: {other:?}"),
        }
    };
    assert_eq!(code, rumqttc::v5::mqttbytes::v5::PubAckReason::NotAuthorized);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(gw.bridge_state("cloud")["paused"], false, "bob paused the bridge");
    assert!(gw.stop(), "gateway did not stop cleanly:\n{}", gw.log());
    up.stop();
}

//! Test harness: runs the real `outpost` binary on free loopback ports with a config written
//! for the test, waits for its READY=1 on a NOTIFY_SOCKET, and gives MQTT clients to talk to it.

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};
use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port for a test's gateway or Mosquitto. Taken from 20000-29999, outside the
/// kernel's ephemeral range (where outpost picks its engine ports), and never handed out twice
/// in one test run, so a port freed by a restarting gateway is not taken by another test.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20000 + (std::process::id() % 40) as u16 * 250,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// A running gateway process.
pub struct Gateway {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    notify: UnixDatagram,
    /// The dashboard's port: the test's own `dashboard:` section, or a free port of its own
    /// (the dashboard is on by default, and every test gateway must not take 8080).
    pub dashboard: Option<u16>,
    /// Everything the gateway wrote to its notify socket so far.
    pub notes: Vec<String>,
    env: Vec<(String, String)>,
}

impl Gateway {
    /// Starts outpost with `broker_yaml` as the `broker:` section (indented by the caller as a
    /// top-level block) and waits until it is ready.
    pub fn start(broker_yaml: &str) -> Gateway {
        Gateway::start_with_env(broker_yaml, &[])
    }

    /// As `start`, with extra environment variables for the process.
    pub fn start_with_env(broker_yaml: &str, env: &[(&str, &str)]) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("outpost.yaml");
        let dashboard = dashboard_port(broker_yaml).unwrap_or_else(|| Some(free_port()));
        let notify = UnixDatagram::bind(dir.path().join("notify.sock")).unwrap();
        notify.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut gw = Gateway {
            child: None,
            dir,
            config,
            notify,
            dashboard,
            notes: vec![],
            env,
        };
        gw.write_config(broker_yaml);
        gw.spawn();
        gw
    }

    /// Writes the config file: the gateway header, then `broker_yaml`, then (unless it has its
    /// own) a `dashboard:` section on this gateway's own port.
    pub fn write_config(&self, broker_yaml: &str) {
        let mut yaml = format!(
            "gateway:\n  id: test-gw\n  data_dir: {}\n  shutdown_timeout: 2s\nlog:\n  level: debug\n{broker_yaml}",
            self.dir.path().join("data").display()
        );
        if dashboard_port(broker_yaml).is_none() {
            if !yaml.ends_with('\n') {
                yaml.push('\n');
            }
            match self.dashboard {
                Some(p) => yaml.push_str(&format!("dashboard:\n  bind: \"127.0.0.1:{p}\"\n")),
                None => yaml.push_str("dashboard:\n  bind: null\n"),
            }
        }
        std::fs::write(&self.config, yaml).unwrap();
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("outpost.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&self.config)
            .env("NOTIFY_SOCKET", self.dir.path().join("notify.sock"))
            .env_remove("RUST_LOG")
            .envs(self.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_note("READY=1", Duration::from_secs(30));
    }

    /// Waits until the gateway sends a notification containing `what`.
    pub fn wait_note(&mut self, what: &str, within: Duration) -> String {
        let end = Instant::now() + within;
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let note = String::from_utf8_lossy(&buf[..n]).to_string();
                self.notes.push(note.clone());
                if note.contains(what) {
                    return note;
                }
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("outpost exited ({status}) before `{what}`; log:\n{}", self.log());
            }
        }
        panic!("no `{what}` from outpost in {within:?}; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("outpost.log")).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id();
        assert!(Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap()
            .success());
    }

    /// SIGTERM and wait for exit; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let pid = child.id();
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let end = Instant::now() + Duration::from_secs(15);
        while Instant::now() < end {
            if let Some(st) = child.try_wait().unwrap() {
                return st.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    pub fn restart(&mut self) {
        assert!(self.stop(), "outpost did not stop cleanly; log:\n{}", self.log());
        self.spawn();
    }

    /// The process's resident memory now and at its peak, in KiB (`/proc/<pid>/status`).
    pub fn rss_kib(&self) -> (u64, u64) {
        let pid = self.child.as_ref().expect("gateway running").id();
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            st.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The dashboard port a test's YAML sets itself: `None` when it has no `dashboard:` section,
/// `Some(None)` when it has one without a port on loopback (off, or elsewhere).
fn dashboard_port(yaml: &str) -> Option<Option<u16>> {
    let at = yaml
        .find("\ndashboard:")
        .map(|i| i + 1)
        .or(yaml.starts_with("dashboard:").then_some(0))?;
    let section: String = yaml[at..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with(' '))
        .collect::<Vec<_>>()
        .join("\n");
    Some(
        section
            .split("bind: \"127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|p| p.parse().ok()),
    )
}

/// A plain loopback `mqtt` listener section, anonymous allowed.
pub fn open_broker(port: u16) -> String {
    format!("broker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n")
}

pub fn opts(port: u16, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o
}

/// Connects a 3.1.1 client and waits for its CONNACK; the event loop is returned to poll.
pub async fn connect(o: MqttOptions) -> Result<(AsyncClient, EventLoop), ConnectionError> {
    let (c, mut ev) = AsyncClient::new(o, 100);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ev.poll())
            .await
            .expect("no CONNACK in 10s")?
        {
            Event::Incoming(Packet::ConnAck(_)) => return Ok((c, ev)),
            _ => continue,
        }
    }
}

/// Polls until a packet matching `f` arrives, or `None` after `within`.
pub async fn wait_for<T>(ev: &mut EventLoop, within: Duration, mut f: impl FnMut(&Packet) -> Option<T>) -> Option<T> {
    let end = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(end, ev.poll()).await {
            Err(_) => return None,
            Ok(Err(e)) => panic!("connection failed while waiting: {e}"),
            Ok(Ok(Event::Incoming(p))) => {
                if let Some(t) = f(&p) {
                    return Some(t);
                }
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// The next PUBLISH as (topic, payload, retain).
pub async fn next_publish(ev: &mut EventLoop, within: Duration) -> Option<(String, Vec<u8>, bool)> {
    wait_for(ev, within, |p| match p {
        Packet::Publish(p) => Some((p.topic.clone(), p.payload.to_vec(), p.retain)),
        _ => None,
    })
    .await
}

/// Subscribes and waits for the SUBACK codes.
pub async fn subscribe(
    c: &AsyncClient,
    ev: &mut EventLoop,
    filter: &str,
    qos: QoS,
) -> Vec<rumqttc::SubscribeReasonCode> {
    c.subscribe(filter, qos).await.unwrap();
    wait_for(ev, Duration::from_secs(10), |p| match p {
        Packet::SubAck(a) => Some(a.return_codes.clone()),
        _ => None,
    })
    .await
    .expect("no SUBACK")
}

/// Keeps an event loop polled in the background (for publishers).
pub fn drive(mut ev: EventLoop) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while ev.poll().await.is_ok() {} })
}

/// Reads from a raw socket until it closes; true if it closed within `within`.
pub fn closes_within(s: &mut std::net::TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 1024];
    let end = Instant::now() + within;
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                return false
            }
            Err(_) => return true,
        }
    }
    false
}

/// An argon2 hash made by the real `outpost passwd`.
pub fn passwd(pw: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .arg("passwd")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(pw.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A Debian Mosquitto on a free loopback port, standing in for the cloud broker.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    conf: String,
}

impl Mosquitto {
    /// Starts Mosquitto with `extra` config lines after its listener line.
    pub fn start(extra: &str) -> Mosquitto {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let conf = format!("listener {port} 127.0.0.1\n{extra}\n");
        let mut m = Mosquitto {
            child: None,
            port,
            dir,
            conf,
        };
        m.spawn();
        m
    }

    /// A broker that needs a password: users `sub` (always) and `bridge` (when `bridge_allowed`).
    /// Letting the bridge in later (`allow_bridge`) lets a test's subscriber connect first.
    pub fn with_users(persistence: bool, bridge_allowed: bool) -> Mosquitto {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("passwd");
        let conf = format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\npersistence {persistence}\npersistence_location {}/\nmax_queued_messages 100000\n",
            pw.display(),
            dir.path().display()
        );
        let mut m = Mosquitto {
            child: None,
            port,
            dir,
            conf,
        };
        m.set_users(bridge_allowed);
        m.spawn();
        m
    }

    pub fn set_users(&self, bridge_allowed: bool) {
        let pw = self.dir.path().join("passwd");
        let _ = std::fs::remove_file(&pw);
        let mut users = vec![("sub", "sub-pw")];
        if bridge_allowed {
            users.push(("bridge", "bridge-pw"));
        }
        for (u, p) in users {
            let mut cmd = Command::new("mosquitto_passwd");
            if !pw.exists() {
                cmd.arg("-c");
            }
            let st = cmd
                .arg("-b")
                .arg(&pw)
                .args([u, p])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success(), "mosquitto_passwd");
        }
    }

    /// Lets the `bridge` user in (Mosquitto re-reads its password file on SIGHUP).
    pub fn allow_bridge(&self) {
        self.set_users(true);
        let pid = self.child.as_ref().unwrap().id();
        assert!(Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
            .success());
        std::thread::sleep(Duration::from_millis(200));
    }

    pub fn spawn(&mut self) {
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(&conf, &self.conf).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mosquitto.log"))
            .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto (Debian package mosquitto) must be installed");
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < end,
                "mosquitto did not start:\n{}",
                std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (Mosquitto saves its persistence file) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let _ = c.wait();
        }
    }

    /// Sends a signal (`STOP`: the broker keeps its sockets open and answers nothing).
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id();
        assert!(Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .unwrap()
            .success());
    }

    /// SIGKILL: the node dies with no goodbye (its sockets are reset).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Messages as (topic, payload), in arrival order.
pub type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// A subscriber on the upstream broker that keeps every message it gets, reconnecting (and
/// resubscribing) by itself.
pub struct Collector {
    pub got: Received,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub fn start(port: u16, id: &str, filter: &str, creds: Option<(&str, &str)>, persistent: bool) -> Collector {
        let mut o = opts(port, id);
        o.set_clean_session(!persistent);
        if let Some((u, p)) = creds {
            o.set_credentials(u, p);
        }
        let (c, mut ev) = AsyncClient::new(o, 100);
        let got: Received = Default::default();
        let g = got.clone();
        let filter = filter.to_string();
        let task = tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        g.lock().unwrap().push((p.topic.clone(), p.payload.to_vec()))
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Collector { got, task }
    }

    pub fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Waits until `f` holds for what was collected, or panics after `within`.
    pub async fn wait(&self, within: Duration, what: &str, f: impl Fn(&[(String, Vec<u8>)]) -> bool) {
        let end = Instant::now() + within;
        loop {
            if f(&self.got.lock().unwrap()) {
                return;
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}; got {} messages",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gateway {
    /// `outpost status --json` for this gateway.
    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(BIN)
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The bridge's entry in the status file.
    pub fn bridge_state(&self, name: &str) -> serde_json::Value {
        self.status()["bridges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .cloned()
            .unwrap_or_default()
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none());
        self.spawn();
    }
}

/// A well-behaved client beside an attack: it publishes QoS 1 to a topic of its own and waits
/// for its own copy. Its round trip is what the other clients of a gateway feel.
pub struct Bystander {
    client: AsyncClient,
    ev: EventLoop,
    topic: String,
    n: u64,
}

impl Bystander {
    pub async fn connect(port: u16, id: &str) -> Bystander {
        Bystander::connect_with(opts(port, id), &format!("bystander/{id}")).await
    }

    /// With its own options (a login) and a topic it may publish and read.
    pub async fn connect_with(o: MqttOptions, topic: &str) -> Bystander {
        let (client, mut ev) = connect(o).await.expect("bystander connects");
        subscribe(&client, &mut ev, topic, QoS::AtLeastOnce).await;
        Bystander {
            client,
            ev,
            topic: topic.to_string(),
            n: 0,
        }
    }

    /// One QoS 1 round trip: publish, then the PUBACK and our own copy both back. `None` when
    /// it takes over 10 s.
    pub async fn round_trip(&mut self) -> Option<Duration> {
        self.n += 1;
        let body = self.n.to_string();
        let t0 = Instant::now();
        self.client
            .publish(&self.topic, QoS::AtLeastOnce, false, body.clone())
            .await
            .ok()?;
        let (mut acked, mut echoed) = (false, false);
        let end = tokio::time::Instant::now() + Duration::from_secs(10);
        while !(acked && echoed) {
            match tokio::time::timeout_at(end, self.ev.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked = true,
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.payload == body.as_bytes() => echoed = true,
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => return None,
            }
        }
        Some(t0.elapsed())
    }

    /// The median of `n` round trips, paced `gap` apart; `None` if any was lost.
    pub async fn median(&mut self, n: usize, gap: Duration) -> Option<Duration> {
        let mut all = Vec::with_capacity(n);
        for _ in 0..n {
            all.push(self.round_trip().await?);
            tokio::time::sleep(gap).await;
        }
        all.sort();
        Some(all[n / 2])
    }
}

/// The bystander's round trip under attack stays within a few times its quiet value (a floor
/// of 25 ms: on a loaded 2-core machine a quiet loopback round trip of 1 ms says little).
pub fn assert_unhurt(quiet: Duration, under_attack: Option<Duration>, what: &str) {
    let hurt = under_attack.unwrap_or_else(|| panic!("{what}: a bystander's round trip was lost"));
    let bound = (quiet * 5).max(Duration::from_millis(25));
    assert!(
        hurt <= bound,
        "{what}: a bystander's median round trip went from {quiet:?} to {hurt:?} (bound {bound:?})"
    );
}

/// Held by the tests that load the machine on purpose (storms, floods, attackers beside a
/// bystander): one at a time, so one's load is not another's measurement. Other tests run
/// beside them as usual. `heavy` for plain tests, `heavy_async` in async ones.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.blocking_lock()
}

pub async fn heavy_async() -> tokio::sync::MutexGuard<'static, ()> {
    HEAVY.lock().await
}

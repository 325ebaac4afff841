//! Clustered upstream brokers for the bridge tests, started by the test itself as root from the
//! Debian packages: a RabbitMQ 3.10 cluster (rabbitmq_mqtt) and an ejabberd 23.01 cluster
//! (mod_mqtt), on free loopback ports in a temp dir.
//!
//! Each cluster has its own `epmd` (on a free port, `ERL_EPMD_PORT`), its own node names and its
//! own Erlang cookie (`$HOME/.erlang.cookie`, HOME being the cluster's temp dir), so it cannot meet
//! a system instance the packages may have started (`rabbit@host` / `ejabberd@localhost` on epmd
//! 4369) nor another test's cluster. Erlang distribution stays on loopback
//! (`-kernel inet_dist_use_interface {127,0,0,1}`). Nothing goes through systemd or the
//! packages' wrappers (which re-run as the `rabbitmq` / `ejabberd` users with their own cookie).
//! Drop kills every node's process tree (`beam.smp`, `erl_child_setup`, `inet_gethost`) and the
//! cluster's epmd.

use crate::common::free_port;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// From cold to a whole cluster: ~35 s for RabbitMQ on an idle 2-core machine, more while
/// builds run beside it.
const BOOT: Duration = Duration::from_secs(240);

/// Users on every upstream: the bridge's and the test subscriber's.
pub const BRIDGE_USER: (&str, &str) = ("bridge", "bridge-pw");
pub const SUB_USER: (&str, &str) = ("sub", "sub-pw");

/// Distinguishes the clusters of one test process (node names, epmd is per cluster anyway).
fn cluster_tag(kind: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "outpost{}{kind}{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

fn write_cookie(home: &Path) {
    let f = home.join(".erlang.cookie");
    let cookie: String = (0..20).map(|_| (b'A' + rand::random_range(0..26u8)) as char).collect();
    std::fs::write(&f, cookie).unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o400)).unwrap();
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

fn tail(path: &Path, lines: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// `path` itself, or the `*.log` files in it when it is a directory (read when needed: a node
/// creates its logs as it boots).
fn log_files(path: &Path) -> Vec<PathBuf> {
    if !path.is_dir() {
        return vec![path.to_path_buf()];
    }
    std::fs::read_dir(path)
        .map(|r| {
            r.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect()
        })
        .unwrap_or_default()
}

/// Every process below `pid`, from /proc (`ppid` is the 4th field of `stat`, after the command
/// name in parentheses, which may hold spaces).
fn descendants(pid: u32) -> Vec<(u32, String)> {
    let mut all = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let ppid: u32 = stat[close + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        all.push((p, ppid, comm));
    }
    let mut out = vec![];
    let mut parents = vec![pid];
    while let Some(parent) = parents.pop() {
        for (p, pp, comm) in &all {
            if *pp == parent {
                out.push((*p, comm.clone()));
                parents.push(*p);
            }
        }
    }
    out
}

fn sigkill(pid: u32) {
    // SAFETY: kill(2) on a pid of our own process tree; no memory is involved.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// One Erlang node: the process we spawned (RabbitMQ's start script, or `erl` itself), whose
/// `beam.smp` is the node.
pub struct Node {
    pub name: String,
    pub mqtt_port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Node {
    fn spawn(name: String, mqtt_port: u16, dir: PathBuf, mut cmd: Command) -> Node {
        let log = dir.join("stdout.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting node {name}: {e}"));
        Node {
            name,
            mqtt_port,
            dir,
            child: Some(child),
            log,
        }
    }

    /// The node's VM: the spawned process itself when it is `beam.smp` (erl execs it), else the
    /// `beam.smp` below it.
    pub fn beam_pid(&self) -> Option<u32> {
        let pid = self.child.as_ref()?.id();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "beam.smp" {
            return Some(pid);
        }
        descendants(pid)
            .into_iter()
            .find(|(_, c)| c == "beam.smp")
            .map(|(p, _)| p)
    }

    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGKILL to the node's `beam.smp` (no goodbye: its sockets are reset, its cluster peers see
    /// the distribution link drop), then to what is left of its process tree. Returns when the
    /// VM was killed.
    pub fn kill9(&mut self) -> Instant {
        let beam = self.beam_pid();
        let Some(mut child) = self.child.take() else {
            panic!("node {} is not running", self.name);
        };
        let tree = descendants(child.id());
        sigkill(beam.unwrap_or(child.id()));
        let at = Instant::now();
        // RabbitMQ's start script reaps its VM and exits; then whatever of the tree is left
        // (erl_child_setup and inet_gethost end by themselves once the VM is gone).
        let end = at + Duration::from_secs(5);
        while child.try_wait().unwrap().is_none() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        for (p, _) in tree {
            if std::path::Path::new(&format!("/proc/{p}")).exists() {
                sigkill(p);
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        at
    }

    /// Waits for the node's MQTT listener; panics with the node's output and `logs` (files, or
    /// directories of `*.log`) if it dies or never listens.
    fn wait_mqtt(&mut self, deadline: Instant, logs: &[PathBuf]) {
        while !listening(self.mqtt_port) {
            let running = self.running();
            if !running || Instant::now() > deadline {
                let mut msg = format!(
                    "node {} {} on MQTT port {}\n--- {}:\n{}",
                    self.name,
                    if running { "is not listening" } else { "exited" },
                    self.mqtt_port,
                    self.log.display(),
                    tail(&self.log, 30)
                );
                for l in logs.iter().flat_map(|l| log_files(l)) {
                    msg.push_str(&format!("\n--- {}:\n{}", l.display(), tail(&l, 30)));
                }
                panic!("{msg}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.kill9();
        }
    }
}

/// The cluster's own epmd, on a free loopback port (not 4369, which a system instance uses).
struct Epmd {
    port: u16,
    child: Child,
}

impl Epmd {
    fn start(dir: &Path) -> Epmd {
        let port = free_port();
        let log = std::fs::File::create(dir.join("epmd.log")).unwrap();
        let child = Command::new("epmd")
            .args(["-port", &port.to_string(), "-address", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("epmd (Debian package erlang-base, pulled in by rabbitmq-server and ejabberd) must be installed");
        let mut e = Epmd { port, child };
        let end = Instant::now() + Duration::from_secs(10);
        while !listening(port) {
            assert!(
                Instant::now() < end && e.child.try_wait().unwrap().is_none(),
                "epmd did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        e
    }
}

impl Drop for Epmd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(mut cmd: Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

const RABBIT_BIN: &str = "/usr/lib/rabbitmq/bin";
/// Distribution on loopback only, and no `epmd -daemon` of its own: the cluster has its epmd.
const DIST_ARGS: &str = "-kernel inet_dist_use_interface {127,0,0,1} -start_epmd false";

/// A RabbitMQ cluster of `n` nodes with rabbitmq_mqtt, users `bridge` and `sub` (all permissions
/// on `/`), anonymous MQTT refused.
pub struct RabbitCluster {
    pub nodes: Vec<Node>,
    epmd: Epmd,
    dir: tempfile::TempDir,
    names: Vec<String>,
    ports: Vec<(u16, u16)>,
}

impl RabbitCluster {
    /// Starts the first node, then the others, which join it as they boot (peer discovery
    /// `classic_config` naming the first node: the same cluster `join_cluster` makes, without
    /// restarting each app), and waits until `cluster_status` lists every node running.
    pub fn start(n: usize) -> RabbitCluster {
        assert!(
            Path::new(RABBIT_BIN).join("rabbitmq-server").exists(),
            "{RABBIT_BIN}/rabbitmq-server not found: install Debian's rabbitmq-server \
             (`bash .ci/test --cluster` does) to run the cluster tests"
        );
        let dir = tempfile::tempdir().unwrap();
        write_cookie(dir.path());
        std::fs::write(dir.path().join("rabbitmq-env.conf"), "").unwrap();
        let epmd = Epmd::start(dir.path());
        let tag = cluster_tag("rmq");
        let names: Vec<String> = (1..=n).map(|i| format!("{tag}n{i}@localhost")).collect();
        let mut c = RabbitCluster {
            nodes: vec![],
            epmd,
            ports: vec![],
            names: names.clone(),
            dir,
        };
        let deadline = Instant::now() + BOOT;
        for (i, name) in names.iter().enumerate() {
            let (amqp, dist, mqtt) = (free_port(), free_port(), free_port());
            c.ports.push((amqp, dist));
            let nd = c.dir.path().join(format!("n{}", i + 1));
            std::fs::create_dir_all(&nd).unwrap();
            std::fs::write(nd.join("enabled_plugins"), "[rabbitmq_mqtt].\n").unwrap();
            let mut conf = format!(
                "listeners.tcp.1 = 127.0.0.1:{amqp}\nmqtt.listeners.tcp.1 = 127.0.0.1:{mqtt}\n\
                 mqtt.allow_anonymous = false\n"
            );
            if i > 0 {
                conf.push_str(&format!(
                    "cluster_formation.peer_discovery_backend = classic_config\n\
                     cluster_formation.classic_config.nodes.1 = {}\n\
                     cluster_formation.randomized_startup_delay_range.min = 0\n\
                     cluster_formation.randomized_startup_delay_range.max = 0\n",
                    names[0]
                ));
            }
            std::fs::write(nd.join("rabbitmq.conf"), conf).unwrap();
            let mut cmd = Command::new(Path::new(RABBIT_BIN).join("rabbitmq-server"));
            c.env(&mut cmd, i);
            c.nodes.push(Node::spawn(name.clone(), mqtt, nd, cmd));
            if i == 0 {
                // The others join a running first node; its users reach them with the join.
                let logs = c.node_logs(0);
                c.nodes[0].wait_mqtt(deadline, &logs);
            }
        }
        c.ctl(
            0,
            &[
                "eval",
                &format!(
                    "[begin ok = rabbit_auth_backend_internal:add_user(U, P, <<\"outpost-test\">>), \
                     ok = rabbit_auth_backend_internal:set_permissions(U, <<\"/\">>, <<\".*\">>, \
                     <<\".*\">>, <<\".*\">>, <<\"outpost-test\">>) end \
                     || {{U, P}} <- [{{<<\"{}\">>, <<\"{}\">>}}, {{<<\"{}\">>, <<\"{}\">>}}]], ok.",
                    BRIDGE_USER.0, BRIDGE_USER.1, SUB_USER.0, SUB_USER.1
                ),
            ],
        );
        for i in 1..n {
            let logs = c.node_logs(i);
            c.nodes[i].wait_mqtt(deadline, &logs);
        }
        loop {
            let running = c.running_nodes(0);
            if names.iter().all(|x| running.contains(x)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cluster_status on {} lists running {running:?}, not all of {names:?}",
                names[0]
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        c
    }

    fn env(&self, cmd: &mut Command, i: usize) {
        let nd = self.dir.path().join(format!("n{}", i + 1));
        let (amqp, dist) = self.ports[i];
        // A VM that dies at boot writes erl_crash.dump to its working directory: the node's.
        cmd.current_dir(&nd)
            .env("ERL_CRASH_DUMP", nd.join("erl_crash.dump"))
            .env("HOME", self.dir.path())
            .env("LC_ALL", "C.UTF-8")
            .env("ERL_EPMD_PORT", self.epmd.port.to_string())
            .env("RABBITMQ_CONF_ENV_FILE", self.dir.path().join("rabbitmq-env.conf"))
            .env("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", DIST_ARGS)
            .env("RABBITMQ_CTL_ERL_ARGS", DIST_ARGS)
            .env("RABBITMQ_NODENAME", &self.names[i])
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", amqp.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_MNESIA_BASE", nd.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", nd.join("log"))
            .env("RABBITMQ_CONFIG_FILE", nd.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", nd.join("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", nd.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", nd.join("pid"));
    }

    /// Node `i`'s log directory, for the message when it does not come up.
    fn node_logs(&self, i: usize) -> Vec<PathBuf> {
        vec![self.dir.path().join(format!("n{}/log", i + 1))]
    }

    /// `rabbitmqctl -n <node i> ARGS`, as root with the cluster's cookie; panics on failure.
    pub fn ctl(&self, i: usize, args: &[&str]) -> String {
        let mut cmd = Command::new(Path::new(RABBIT_BIN).join("rabbitmqctl"));
        self.env(&mut cmd, i);
        cmd.args(["-q", "-n", &self.nodes[i].name]).args(args);
        let out = run(cmd, &format!("rabbitmqctl -n {} {}", self.nodes[i].name, args[0]));
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// The `running_nodes` of `cluster_status`, asked of node `i`.
    pub fn running_nodes(&self, i: usize) -> Vec<String> {
        let out = self.ctl(i, &["cluster_status", "--formatter", "json"]);
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("cluster_status is not JSON ({e}): {out}"));
        v["running_nodes"]
            .as_array()
            .unwrap_or_else(|| panic!("no running_nodes in {v}"))
            .iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect()
    }

    pub fn url(&self, i: usize) -> String {
        format!("mqtt://127.0.0.1:{}", self.nodes[i].mqtt_port)
    }

    /// The node whose MQTT address is `url`.
    pub fn index_of(&self, url: &str) -> usize {
        (0..self.nodes.len())
            .find(|&i| self.url(i) == url)
            .unwrap_or_else(|| panic!("{url} is none of the cluster's nodes"))
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        // Nodes before epmd (field order would drop them first too; this says so).
        self.nodes.clear();
    }
}

/// Where Debian installs ejabberd's Erlang applications (`ERL_LIBS`): the directory holding
/// e.g. /usr/lib/x86_64-linux-gnu/ejabberd-23.01/ebin/ejabberd.app.
fn ejabberd_libs() -> PathBuf {
    for base in std::fs::read_dir("/usr/lib").into_iter().flatten().flatten() {
        let has = std::fs::read_dir(base.path()).into_iter().flatten().flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with("ejabberd-") && e.path().join("ebin/ejabberd.app").exists()
        });
        if has {
            return base.path();
        }
    }
    panic!(
        "no ejabberd-*/ebin/ejabberd.app under /usr/lib/*/: install Debian's ejabberd \
         (`bash .ci/test --cluster` does) to run the cluster tests"
    );
}

/// An ejabberd cluster of `n` nodes, each with a mod_mqtt listener, host `localhost`, users
/// `bridge` and `sub` (MQTT user names `bridge` / `sub`, i.e. `bridge@localhost`).
pub struct EjabberdCluster {
    pub nodes: Vec<Node>,
    epmd: Epmd,
    dir: tempfile::TempDir,
    libs: PathBuf,
}

impl EjabberdCluster {
    /// Starts every node, joins the others to the first (`join_cluster`), registers the users and
    /// waits until `list_cluster` on the first node lists every node.
    pub fn start(n: usize) -> EjabberdCluster {
        let libs = ejabberd_libs();
        let dir = tempfile::tempdir().unwrap();
        write_cookie(dir.path());
        let epmd = Epmd::start(dir.path());
        let tag = cluster_tag("ej");
        let mut c = EjabberdCluster {
            nodes: vec![],
            epmd,
            dir,
            libs,
        };
        let deadline = Instant::now() + BOOT;
        for i in 1..=n {
            let (mqtt, dist) = (free_port(), free_port());
            let nd = c.dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(nd.join("db")).unwrap();
            std::fs::write(
                nd.join("ejabberd.yml"),
                format!(
                    "hosts: [\"localhost\"]\nloglevel: info\ncertfiles: []\nauth_method: internal\n\
                     listen:\n  -\n    port: {mqtt}\n    ip: \"127.0.0.1\"\n    module: mod_mqtt\n    backlog: 1000\n\
                     modules:\n  mod_mqtt: {{}}\n"
                ),
            )
            .unwrap();
            let name = format!("{tag}n{i}@localhost");
            let mut cmd = Command::new("erl");
            c.env(&mut cmd, Some(&nd));
            cmd.args(["-sname", &name, "+K", "true", "+P", "250000", "-noinput"])
                .args(DIST_ARGS.split(' '))
                .args(["-kernel", "inet_dist_listen_min", &dist.to_string()])
                .args(["-kernel", "inet_dist_listen_max", &dist.to_string()])
                .args(["-mnesia", "dir", &format!("\"{}\"", nd.join("db").display())])
                .args(["-s", "ejabberd"]);
            c.nodes.push(Node::spawn(name, mqtt, nd, cmd));
        }
        for i in 0..n {
            let logs = vec![c.nodes[i].dir.join("ejabberd.log")];
            c.nodes[i].wait_mqtt(deadline, &logs);
        }
        let first = c.nodes[0].name.clone();
        for i in 1..n {
            c.ctl(i, &["join_cluster", &first]);
        }
        for (u, p) in [BRIDGE_USER, SUB_USER] {
            c.ctl(0, &["register", u, "localhost", p]);
        }
        let names: Vec<String> = c.nodes.iter().map(|x| x.name.clone()).collect();
        loop {
            let listed = c.cluster_nodes(0);
            if names.iter().all(|x| listed.contains(x)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "list_cluster on {first} lists {listed:?}, not all of {names:?}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        // A joined node restarts its applications: wait for its listener again.
        for i in 0..n {
            let logs = vec![c.nodes[i].dir.join("ejabberd.log")];
            c.nodes[i].wait_mqtt(deadline, &logs);
        }
        c
    }

    fn env(&self, cmd: &mut Command, node_dir: Option<&Path>) {
        // Crash dumps (erl_crash.dump in the working directory) stay in the temp dir.
        cmd.current_dir(node_dir.unwrap_or(self.dir.path()))
            .env(
                "ERL_CRASH_DUMP",
                node_dir.unwrap_or(self.dir.path()).join("erl_crash.dump"),
            )
            .env("HOME", self.dir.path())
            .env("LC_ALL", "C.UTF-8")
            .env("ERL_EPMD_PORT", self.epmd.port.to_string())
            .env("ERL_LIBS", &self.libs)
            .env("ERL_INETRC", "/etc/ejabberd/inetrc");
        if let Some(nd) = node_dir {
            cmd.env("EJABBERD_CONFIG_PATH", nd.join("ejabberd.yml"))
                .env("EJABBERD_LOG_PATH", nd.join("ejabberd.log"));
        }
    }

    /// `ejabberdctl`'s work done directly (its wrapper would `su` to user ejabberd, whose cookie
    /// is another): a hidden node running `ejabberd_ctl` against node `i`.
    pub fn ctl(&self, i: usize, args: &[&str]) -> String {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let me = format!(
            "ctl{}x{}@localhost",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let mut cmd = Command::new("erl");
        self.env(&mut cmd, None);
        cmd.args(["-sname", &me, "-hidden", "-noinput"])
            .args(DIST_ARGS.split(' '))
            .args(["-s", "ejabberd_ctl", "-extra", &self.nodes[i].name])
            .args(args);
        let out = run(
            cmd,
            &format!("ejabberdctl --node {} {}", self.nodes[i].name, args.join(" ")),
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// The nodes `list_cluster` prints, asked of node `i`.
    pub fn cluster_nodes(&self, i: usize) -> Vec<String> {
        self.ctl(i, &["list_cluster"])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    pub fn url(&self, i: usize) -> String {
        format!("mqtt://127.0.0.1:{}", self.nodes[i].mqtt_port)
    }

    pub fn index_of(&self, url: &str) -> usize {
        (0..self.nodes.len())
            .find(|&i| self.url(i) == url)
            .unwrap_or_else(|| panic!("{url} is none of the cluster's nodes"))
    }
}

impl Drop for EjabberdCluster {
    fn drop(&mut self) {
        self.nodes.clear();
    }
}

//! The systemd unit: `systemd-analyze verify/security`, its directory modes against the
//! tmpfiles entries, and the daemon started under the system-call filter systemd builds from
//! the unit (loaded with libseccomp by tests/tools/unit-seccomp-exec.py, then exec).

use super::ROOT;
use crate::common::*;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PYTHON: &str = "/usr/bin/python3"; // Debian's, which has python3-seccomp

fn unit_text() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("systemd/outpost.service")).unwrap()
}

fn unit_with_binary(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("outpost.service");
    std::fs::write(&path, text.replace("/usr/local/bin/outpost", BIN)).unwrap();
    path
}

/// The unit as it is, and the same unit with refused calls killing (systemd's default when
/// SystemCallErrorNumber= is absent): the daemon must not need EPERM to survive.
fn units(dir: &Path) -> [(&'static str, PathBuf); 2] {
    let kill_dir = dir.join("kill");
    std::fs::create_dir_all(&kill_dir).unwrap();
    let strict: String = unit_text()
        .lines()
        .filter(|l| !l.starts_with("SystemCallErrorNumber="))
        .map(|l| format!("{l}\n"))
        .collect();
    [
        ("the unit", unit_with_binary(dir, &unit_text())),
        ("the unit with SIGSYS on refusal", unit_with_binary(&kill_dir, &strict)),
    ]
}

fn under_filter(unit: &Path, cmd: &[&str]) -> Command {
    let mut c = Command::new(PYTHON);
    c.arg(Path::new(ROOT).join("tests/tools/unit-seccomp-exec.py"))
        .arg(unit)
        .arg("--")
        .args(cmd);
    c
}

#[test]
fn the_filter_is_really_loaded_and_refuses_with_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let [(_, unit), (_, strict)] = units(dir.path());
    // adjtimex(modes = 0): the read the clock check once made, outside @system-service.
    let probe = "import ctypes,os\nlibc=ctypes.CDLL(None,use_errno=True)\nb=ctypes.create_string_buffer(512)\nr=libc.adjtimex(b)\nprint('refused' if r<0 and ctypes.get_errno()==1 else 'allowed:%d'%r)";
    let o = under_filter(&unit, &[PYTHON, "-c", probe]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "refused",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = under_filter(&strict, &[PYTHON, "-c", probe]).output().unwrap();
    assert_eq!(
        o.status.signal(),
        Some(libc::SIGSYS),
        "without SystemCallErrorNumber= it kills"
    );
}

fn chown_to_nobody(p: &Path) {
    std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
}

struct Filtered {
    child: Child,
    log: PathBuf,
}

impl Drop for Filtered {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_daemon_serves_and_stops_under_the_units_own_syscall_filter() {
    let dir = tempfile::tempdir().unwrap();
    // The unit runs as User=outpost; the harness runs as that user, or nobody where it is missing.
    // So the binary is run from a copy nobody can reach (the checkout may sit under /root).
    chown_to_nobody(dir.path());
    let bin = dir.path().join("outpost");
    std::fs::copy(BIN, &bin).unwrap();
    for (what, unit) in units(dir.path()) {
        let port = free_port();
        let data = dir.path().join(format!("data-{port}"));
        std::fs::create_dir_all(&data).unwrap();
        chown_to_nobody(&data);
        let config = dir.path().join(format!("outpost-{port}.yaml"));
        std::fs::write(
            &config,
            format!(
                "gateway: {{ id: filtered, data_dir: {} }}\nbroker:\n  listeners:\n    - {{ bind: \"127.0.0.1:{port}\", protocol: mqtt }}\n",
                data.display()
            ),
        )
        .unwrap();
        let sock_path = dir.path().join(format!("notify-{port}"));
        let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
        std::fs::set_permissions(&sock_path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let log = dir.path().join(format!("log-{port}"));
        let child = under_filter(
            &unit,
            &[bin.to_str().unwrap(), "run", "--config", config.to_str().unwrap()],
        )
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "2000000")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
        let mut d = Filtered { child, log };
        let mut notes = String::new();
        let end = Instant::now() + Duration::from_secs(30);
        let mut buf = [0u8; 1024];
        while !(notes.contains("READY=1") && notes.contains("WATCHDOG=1")) {
            if let Ok(n) = sock.recv(&mut buf) {
                notes.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            if let Some(st) = d.child.try_wait().unwrap() {
                panic!(
                    "{what}: the daemon died ({st}, signal {:?}) under the filter; log:\n{}",
                    st.signal(),
                    std::fs::read_to_string(&d.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < end,
                "{what}: no READY=1 and WATCHDOG=1 in 30 s: {notes}"
            );
        }
        // It serves: an MQTT CONNECT is answered (outpost health, from outside the filter).
        let h = Command::new(BIN)
            .args(["health", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(h.status.success(), "{what}: {}", String::from_utf8_lossy(&h.stderr));
        // And it stops cleanly on SIGTERM, as systemd stops it.
        unsafe { libc::kill(d.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(15);
        let st = loop {
            if let Some(st) = d.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < end, "{what}: no exit 15 s after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            st.success(),
            "{what}: exit {st} (signal {:?}); log:\n{}",
            st.signal(),
            std::fs::read_to_string(&d.log).unwrap_or_default()
        );
    }
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_with_binary(dir.path(), &unit_text());
    let v = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    // systemd-analyze exits 0 even on parse errors: any output is a finding.
    assert!(said.trim().is_empty(), "systemd-analyze verify: {said}");
    let s = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=25"])
        .arg(&unit)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&s.stdout);
    assert!(s.status.success(), "exposure above 2.5: {report}");
    // Bluetooth goes through BlueZ over D-Bus; the unit gives no raw Bluetooth sockets.
    let families = unit_text()
        .lines()
        .find_map(|l| l.strip_prefix("RestrictAddressFamilies=").map(str::to_string))
        .unwrap();
    assert_eq!(families, "AF_UNIX AF_INET AF_INET6 AF_NETLINK");
}

/// Every directory both the unit and tmpfiles.d create gets the same mode from both (else
/// systemd warns at each start and the two fight over it).
#[test]
fn unit_directory_modes_match_tmpfiles() {
    let unit = unit_text();
    let setting = |k: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
    };
    let tmpfiles = std::fs::read_to_string(Path::new(ROOT).join("systemd/outpost.tmpfiles")).unwrap();
    let mut checked = 0;
    for (kind, base) in [("State", "/var/lib"), ("Configuration", "/etc")] {
        let Some(name) = setting(&format!("{kind}Directory")) else {
            continue;
        };
        let unit_mode = setting(&format!("{kind}DirectoryMode")).unwrap_or_else(|| "0755".into());
        let path = format!("{base}/{name}");
        let line = tmpfiles
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(path.as_str()))
            .unwrap_or_else(|| panic!("no tmpfiles line for {path}"));
        assert_eq!(
            line.split_whitespace().nth(2),
            Some(unit_mode.as_str()),
            "{path}: {line}"
        );
        checked += 1;
    }
    assert_eq!(checked, 2);
}

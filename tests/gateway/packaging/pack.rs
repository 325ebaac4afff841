//! The snap as snapcraft would make it: the prime directory laid out
//! (tests/tools/snapcraft-prime.py), checked and packed by the real `snap` client (snapd's own
//! validator), and read back with `unsquashfs` and `snap info`. snapcraft.yaml against
//! snapcraft's JSON schema is a CI-only check (`.ci/snapcraft-schema`).

use super::ROOT;
use crate::common::*;
use std::path::Path;
use std::process::{Command, Output};

const PYTHON: &str = "/usr/bin/python3"; // Debian's, with python3-jsonschema and python3-yaml

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tool(args: &[&str]) -> Output {
    Command::new(PYTHON)
        .arg(Path::new(ROOT).join("tests/tools/snapcraft-prime.py"))
        .args(args)
        .output()
        .unwrap()
}

fn project() -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(Path::new(ROOT).join("snap/snapcraft.yaml")).unwrap()).unwrap()
}

// snap/snapcraft.yaml against snapcraft's JSON schema is a CI-only check (.ci/snapcraft-schema):
// the schema is a fixture kept beside the repository, not in it.

#[test]
fn the_rust_part_brings_a_cargo_as_new_as_rust_version() {
    // The rust part must bring a cargo at least as new as rust-version (core24's is older).
    let part = &project()["parts"]["outpost"];
    assert_eq!(part["plugin"].as_str(), Some("rust"));
    let channel = part["rust-channel"].as_str().expect("rust-channel set");
    let cargo_toml = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml")).unwrap();
    let msrv = cargo_toml
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .map(|v| v.trim_end_matches('"').to_string())
        .unwrap();
    let minor = |v: &str| v.split('.').nth(1).and_then(|m| m.parse::<u32>().ok());
    assert!(
        channel == "stable" || minor(channel) >= minor(&msrv),
        "rust-channel {channel} is older than rust-version {msrv}"
    );
}

/// The hook names snapd runs (a typo is accepted by `snap pack` and then never runs).
fn hook_known(name: &str) -> bool {
    const FIXED: [&str; 10] = [
        "install",
        "configure",
        "default-configure",
        "pre-refresh",
        "post-refresh",
        "remove",
        "check-health",
        "gate-auto-refresh",
        "install-device",
        "fde-setup",
    ];
    const PREFIXES: [&str; 8] = [
        "prepare-plug-",
        "prepare-slot-",
        "connect-plug-",
        "connect-slot-",
        "disconnect-plug-",
        "disconnect-slot-",
        "unprepare-plug-",
        "unprepare-slot-",
    ];
    FIXED.contains(&name)
        || PREFIXES
            .iter()
            .any(|p| name.strip_prefix(p).is_some_and(|i| !i.is_empty()))
}

#[test]
fn the_snap_packs_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    // A release build is stripped; so is the binary here (the debug one is ~200 MB).
    let bin = dir.path().join("outpost");
    let s = Command::new("strip").arg("-o").arg(&bin).arg(BIN).status().unwrap();
    assert!(s.success());
    let prime = dir.path().join("prime");
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "armhf",
        other => panic!("no snap architecture for {other}"),
    };
    let yaml = Path::new(ROOT).join("snap/snapcraft.yaml");
    let o = tool(&[
        "prime",
        yaml.to_str().unwrap(),
        ROOT,
        bin.to_str().unwrap(),
        prime.to_str().unwrap(),
        arch,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    // Every hook is one snapd runs, and every hook with plugs in snapcraft.yaml has a file.
    for h in std::fs::read_dir(prime.join("meta/hooks")).unwrap() {
        let name = h.unwrap().file_name().into_string().unwrap();
        assert!(hook_known(&name), "meta/hooks/{name} is no hook snapd runs");
    }
    for (name, _) in project()["hooks"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        assert!(
            prime.join("meta/hooks").join(name).exists(),
            "hooks.{name} has no file in snap/hooks"
        );
    }

    // snapd's own validator.
    let o = Command::new("snap")
        .args(["pack", "--check-skeleton"])
        .arg(&prime)
        .output()
        .expect("the snap client (Debian package snapd)");
    assert!(o.status.success(), "snap pack --check-skeleton: {}", text(&o));
    // It only warns about an unknown interface or a missing file: treat those as failures.
    assert!(
        text(&o).trim().is_empty(),
        "snap pack --check-skeleton said: {}",
        text(&o)
    );
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let o = Command::new("snap").arg("pack").arg(&prime).arg(&out).output().unwrap();
    assert!(o.status.success(), "snap pack: {}", text(&o));
    let file = out.join(format!("outpost_0.1.0_{arch}.snap"));
    assert!(text(&o).contains(&format!("built: {}", file.display())), "{}", text(&o));

    // What is inside: the binary, the hook script and every hook, executable.
    let o = Command::new("unsquashfs")
        .arg("-lls")
        .arg(&file)
        .output()
        .expect("unsquashfs (squashfs-tools)");
    assert!(o.status.success(), "{}", text(&o));
    let listing = String::from_utf8_lossy(&o.stdout).to_string();
    for path in [
        "bin/outpost",
        "bin/outpost-snap-hook",
        "meta/hooks/install",
        "meta/hooks/configure",
        "meta/hooks/pre-refresh",
        "meta/hooks/post-refresh",
        "meta/hooks/check-health",
        "meta/hooks/connect-plug-daemon-notify",
        "meta/hooks/disconnect-plug-daemon-notify",
    ] {
        let line = listing
            .lines()
            .find(|l| l.ends_with(&format!("squashfs-root/{path}")))
            .unwrap_or_else(|| panic!("{path} not in the snap:\n{listing}"));
        assert!(line.starts_with("-rwxr-xr-x"), "{path} not executable: {line}");
    }

    // What a user sees of it.
    let o = Command::new("snap")
        .args(["info", "--verbose"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let info = String::from_utf8_lossy(&o.stdout).to_string();
    for want in [
        "name:    outpost",
        "version:    0.1.0",
        "outpost.daemon: notify, disabled, inactive",
        "confinement:    strict",
        "base:     core24",
        "  - outpost",
    ] {
        assert!(info.contains(want), "snap info lacks `{want}`:\n{info}");
    }
}

//! The module map holds (ARCHITECTURE.md, "may touch"): each top-level module of `src/` names
//! only the modules below it. A `crate::x` path in code (comments aside) that its row does not
//! allow fails here, so a new circle cannot slip in unseen.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module and the crate modules it may name. Leaves first.
const MAY_TOUCH: &[(&str, &[&str])] = &[
    ("topic", &[]),
    ("status_doc", &[]),
    ("config", &["topic"]),
    // revert.rs (snap refresh rollback) reads the device keystore and grants files: a known
    // upward reach, listed so it cannot grow.
    ("system", &["config", "devices", "grants", "status_doc"]),
    ("broker", &["config", "topic", "system", "status_doc"]),
    ("bridge", &["broker", "config", "topic", "system", "status_doc"]),
    (
        "devices",
        &["broker", "bridge", "config", "topic", "system", "status_doc"],
    ),
    (
        "grants",
        &["broker", "config", "devices", "topic", "system", "status_doc"],
    ),
    (
        "plugs",
        &["broker", "bridge", "config", "topic", "system", "status_doc"],
    ),
    (
        "provision",
        &["broker", "config", "devices", "topic", "system", "status_doc"],
    ),
    (
        "dashboard",
        &["broker", "bridge", "config", "grants", "topic", "system", "status_doc"],
    ),
    ("status", &["config", "topic", "system", "status_doc"]),
    (
        "reload",
        &["broker", "bridge", "config", "topic", "system", "status_doc"],
    ),
];

/// `crate::name` paths in the code of `dir` (or `dir.rs`), with the first file naming each.
fn named(src: &Path, module: &str) -> BTreeMap<String, String> {
    let mut files = vec![];
    let file = src.join(format!("{module}.rs"));
    if file.exists() {
        files.push(file);
    }
    let mut dirs = vec![src.join(module)];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let mut out = BTreeMap::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    out.entry(name).or_insert_with(|| f.display().to_string());
                }
            }
        }
    }
    out
}

#[test]
fn every_module_names_only_what_it_may_touch() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut wrong = vec![];
    for (module, may) in MAY_TOUCH {
        let may: BTreeSet<&str> = may.iter().copied().chain([*module]).collect();
        for (name, file) in named(&src, module) {
            if !may.contains(name.as_str()) {
                wrong.push(format!("{file}: `{module}` names crate::{name}, which it may not"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_check_sees_a_forbidden_path() {
    // config naming the broker is caught (the check is not blind).
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::write(
        dir.path().join("config/x.rs"),
        "// crate::broker in a comment is fine\nuse crate::broker::Shared;\n",
    )
    .unwrap();
    let got = named(dir.path(), "config");
    assert_eq!(got.keys().collect::<Vec<_>>(), vec!["broker"]);
}

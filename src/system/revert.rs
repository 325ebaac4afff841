//! Revert safety for the snap. `$SNAP_COMMON` (the default data_dir) is shared by every
//! revision and never rolled back, so state a newer revision migrated would leave an older one
//! (after `snap revert`, or a refresh that failed late) unable to read it. Two rules:
//!
//! - formats change compatibly (new fields are ignored and kept by older readers, see the
//!   keystore's and the grants' `format`); a format number goes up only when an older reader
//!   could not use the file;
//! - before every refresh the `pre-refresh` hook (which runs the *old* revision) copies the
//!   versioned state files into that revision's `$SNAP_DATA/pre-refresh`, which snapd keeps for
//!   that revision. When a revision starts and finds a state file in a newer format than it
//!   reads, it puts its own pre-refresh copy of that file back (the newer file is kept beside
//!   it, under `newer-formats/`) instead of failing to start.
//!
//! Only the files whose format is newer are put back; the others stay as they are. The bridges'
//! spools keep format 1 (the `meta` table); a change to them must add them here first.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The versioned state files in a data_dir, with the newest format this release reads.
fn versioned(data_dir: &Path) -> [(PathBuf, u32); 2] {
    [
        (
            crate::devices::keystore::path(data_dir),
            crate::devices::keystore::FORMAT,
        ),
        (crate::grants::path(data_dir), crate::grants::FORMAT),
    ]
}

/// The `format` a JSON state file declares (`None`: no such file).
fn format_of(path: &Path) -> Result<Option<u64>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(Some(v.get("format").and_then(|f| f.as_u64()).unwrap_or(0)))
}

/// pre-refresh: copies the versioned state files of `data_dir` into `copy_dir` (replacing an
/// older copy as a whole). Returns the files copied.
pub fn save(data_dir: &Path, copy_dir: &Path) -> Result<Vec<PathBuf>> {
    let tmp = copy_dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut copied = vec![];
    for (file, _) in versioned(data_dir) {
        if file.exists() {
            let name = file.file_name().expect("state files have names");
            std::fs::copy(&file, tmp.join(name)).with_context(|| format!("copying {}", file.display()))?;
            copied.push(file);
        }
    }
    let _ = std::fs::remove_dir_all(copy_dir);
    std::fs::rename(&tmp, copy_dir).with_context(|| format!("writing {}", copy_dir.display()))?;
    Ok(copied)
}

/// At start: every versioned state file this release cannot read (a newer format) is replaced
/// by its pre-refresh copy from `copy_dir`; the newer file moves to `newer-formats/<time>/`.
/// Returns what was put back; fails, saying what to do, when there is no usable copy.
pub fn restore_newer(data_dir: &Path, copy_dir: &Path) -> Result<Vec<String>> {
    let mut restored = vec![];
    for (file, readable) in versioned(data_dir) {
        let Some(format) = format_of(&file)? else { continue };
        if format <= u64::from(readable) {
            continue;
        }
        let name = file.file_name().expect("state files have names");
        let copy = copy_dir.join(name);
        match format_of(&copy) {
            Ok(Some(f)) if f <= u64::from(readable) => {}
            _ => bail!(
                "{} is in format {format}, written by a newer outpost (this one reads up to {readable}), and there \
                 is no pre-refresh copy in {}: refresh to the newer revision again (`snap refresh outpost`)",
                file.display(),
                copy_dir.display()
            ),
        }
        let secs = crate::system::clock::now_secs();
        let keep = data_dir.join("newer-formats").join(secs.to_string());
        std::fs::create_dir_all(&keep).with_context(|| format!("creating {}", keep.display()))?;
        std::fs::rename(&file, keep.join(name)).with_context(|| format!("moving {} aside", file.display()))?;
        let tmp = file.with_extension("restore.tmp");
        std::fs::copy(&copy, &tmp)
            .and_then(|_| std::fs::rename(&tmp, &file))
            .with_context(|| format!("putting back {}", copy.display()))?;
        restored.push(format!(
            "{} was in format {format} (newer than this outpost reads): put back its pre-refresh copy; the newer file \
             is kept in {}",
            file.display(),
            keep.display()
        ));
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_file_is_replaced_by_its_copy_and_kept_others_untouched() {
        let d = tempfile::tempdir().unwrap();
        let (data, copy) = (d.path().join("common"), d.path().join("pre-refresh"));
        std::fs::create_dir_all(&data).unwrap();
        let ks = crate::devices::keystore::path(&data);
        let grants = crate::grants::path(&data);
        std::fs::write(&ks, r#"{"format":1,"devices":[]}"#).unwrap();
        std::fs::write(&grants, r#"{"format":1,"grants":[]}"#).unwrap();
        assert_eq!(save(&data, &copy).unwrap().len(), 2);
        // A newer release migrates the keystore and adds a grant in the old format.
        std::fs::write(&ks, r#"{"format":9,"devices":{}}"#).unwrap();
        std::fs::write(&grants, r#"{"format":1,"grants":[],"x":1}"#).unwrap();
        let done = restore_newer(&data, &copy).unwrap();
        assert_eq!(done.len(), 1, "{done:?}");
        assert!(std::fs::read_to_string(&ks).unwrap().contains(r#""format":1"#));
        assert!(
            std::fs::read_to_string(&grants).unwrap().contains(r#""x":1"#),
            "only newer files go back"
        );
        let kept = std::fs::read_dir(data.join("newer-formats")).unwrap().count();
        assert_eq!(kept, 1);
        assert!(restore_newer(&data, &copy).unwrap().is_empty(), "nothing more to do");
        // Without a copy it refuses, saying how to get going again.
        std::fs::write(&ks, r#"{"format":9}"#).unwrap();
        std::fs::remove_dir_all(&copy).unwrap();
        let e = restore_newer(&data, &copy).unwrap_err().to_string();
        assert!(e.contains("newer outpost") && e.contains("snap refresh outpost"), "{e}");
    }
}

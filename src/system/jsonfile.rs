//! Small state files (the device keystore, the grants): JSON, mode 0600, changed under an
//! exclusive lock and replaced atomically (temporary file, fsync, rename, fsync of the folder),
//! so a crash leaves the old file or the new one, never a mix. [`replace`] does the same
//! atomic replacement for any other file written whole (the status document, the snap's
//! config).

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Reads the file; a missing file is `T::default()`.
pub fn load<T: DeserializeOwned + Default>(path: &Path) -> Result<T> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Loads `T` with `read` under an exclusive lock, lets `change` edit it, and writes it back.
pub fn update<T: Serialize, R>(
    path: &Path,
    read: impl FnOnce(&Path) -> Result<T>,
    change: impl FnOnce(&mut T) -> Result<R>,
) -> Result<R> {
    let dir = path.parent().context("state file path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let lock_path = path.with_extension("lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)?;
    give_to_folder_owner(&lock_path, path)?;
    lock.lock().with_context(|| format!("locking {}", path.display()))?;
    let mut value = read(path)?;
    let out = change(&mut value)?;
    write(path, &value)?;
    Ok(out)
}

fn write<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let tmp = write_temporary(path, &serde_json::to_vec_pretty(value)?, 0o600)?;
    give_to_folder_owner(&tmp, path)?;
    rename_synced(&tmp, path)
}

/// Replaces `path` with `bytes` atomically and durably: a crash or a power loss leaves the old
/// file or the new one. The file gets mode 0666 less the umask, as `std::fs::write` gives.
pub fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = write_temporary(path, bytes, 0o666)?;
    rename_synced(&tmp, path)
}

/// Writes `bytes` to `<path>.tmp`, fsynced, and returns that name.
fn write_temporary(path: &Path, bytes: &[u8], mode: u32) -> Result<PathBuf> {
    let mut name = path.file_name().context("a file to replace has a name")?.to_owned();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let _ = std::fs::remove_file(&tmp);
    // create_new + no symlink following: nothing planted at the temporary name is written through.
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(tmp)
}

/// Renames `tmp` over `path`, then fsyncs the folder so the rename itself is on disk.
fn rename_synced(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Run as root (`sudo outpost devices add ...`), the files go to whoever owns the data folder
/// (the `outpost` user of the systemd unit), or the daemon could not read them.
fn give_to_folder_owner(file: &Path, path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let Some(dir) = path.parent() else { return Ok(()) };
    let owner = std::fs::metadata(dir)?;
    std::os::unix::fs::chown(file, Some(owner.uid()), Some(owner.gid()))
        .with_context(|| format!("chown {}", file.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn replace_writes_the_new_bytes_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        super::replace(&path, b"one").unwrap();
        super::replace(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["status.json"]);
    }
}

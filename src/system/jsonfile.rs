//! Small state files (the device keystore, the grants): JSON, mode 0600, changed under an
//! exclusive lock and replaced atomically (temporary file, fsync, rename, fsync of the folder),
//! so a crash leaves the old file or the new one, never a mix.

use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

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
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    // create_new + no symlink following: nothing planted at the temporary name is written through.
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(value)?)?;
    f.sync_all()?;
    give_to_folder_owner(&tmp, path)?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    if let Some(dir) = path.parent() {
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

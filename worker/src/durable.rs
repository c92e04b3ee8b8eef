//! Writes that survive a crash: a file is written beside its final name,
//! flushed to the disk, renamed into place, and its folder flushed, so that
//! after a crash at any moment the name holds the old content or the whole
//! new one. Every write goes through [`crate::faults::check_write`], so the
//! fault-injection tests can fill the disk.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Flushes a file's content to the disk.
pub fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Flushes a folder's entries (names created, renamed or removed in it).
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// The folder holding `path` ("." for a bare name).
pub fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `bytes` to `path` atomically and durably.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::faults::check_write()?;
    let partial = partial_name(path);
    let written = (|| {
        let mut file = std::fs::File::create(&partial)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    rename(&partial, path)
}

/// Like [`write`], for a file only the worker's user may read (it holds a secret).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    crate::faults::check_write()?;
    let partial = partial_name(path);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&partial)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    rename(&partial, path)
}

/// Renames `from` to `to` and flushes the folder of `to` (and of `from`
/// when it is another folder).
pub fn rename(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    sync_dir(&parent(to))?;
    if parent(from) != parent(to) {
        sync_dir(&parent(from))?;
    }
    Ok(())
}

/// A name beside `path` for its content while it is being written.
pub fn partial_name(path: &Path) -> PathBuf {
    let name = path.file_name().map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

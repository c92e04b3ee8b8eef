//! Unpacking tar archives that come from elsewhere (an adapter the CLI
//! downloads, a checkpoint a worker downloads) so that they cannot be
//! turned against whoever unpacks them: only plain files with plain names
//! enter, at most a stated number of bytes in all, into a folder that did
//! not exist before.

use std::fs::File;
use std::io::Read;
use std::path::{Component, Path};

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("the archive holds a {kind} entry {name:?}; only plain files are allowed")]
    NotAFile { kind: String, name: String },
    #[error("the archive entry {0:?} is not a plain file name (no folders, absolute paths or ..)")]
    UnsafeName(String),
    #[error("the archive unpacks to more than {0} bytes")]
    TooLarge(u64),
    #[error("the archive names {0:?} twice")]
    Duplicate(String),
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

fn io(path: &Path, source: std::io::Error) -> UnpackError {
    UnpackError::Io { path: path.display().to_string(), source }
}

/// Unpacks `archive` (a tar stream) into `dir`, which must not exist yet
/// and is created: regular files with single-component names only, at most
/// `max_bytes` in all. Returns the names written, in archive order. On an
/// error, `dir` may hold part of the archive; the caller removes it.
pub fn unpack_plain_files(archive: impl Read, dir: &Path, max_bytes: u64) -> Result<Vec<String>, UnpackError> {
    std::fs::create_dir(dir).map_err(|e| io(dir, e))?;
    let mut entries = tar::Archive::new(archive);
    let mut names = Vec::new();
    let mut total = 0u64;
    for entry in entries.entries().map_err(|e| io(dir, e))? {
        let mut entry = entry.map_err(|e| io(dir, e))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let kind = entry.header().entry_type();
        if kind != tar::EntryType::Regular {
            return Err(UnpackError::NotAFile { kind: format!("{kind:?}"), name: raw });
        }
        let path = entry.path().map_err(|e| io(dir, e))?.into_owned();
        let mut components = path.components();
        let name = match (components.next(), components.next()) {
            (Some(Component::Normal(name)), None) => name.to_string_lossy().into_owned(),
            _ => return Err(UnsafeName(raw)),
        };
        if name.chars().any(char::is_control) {
            return Err(UnpackError::UnsafeName(raw));
        }
        let size = entry.header().size().map_err(|e| io(dir, e))?;
        total = total.saturating_add(size);
        if total > max_bytes {
            return Err(UnpackError::TooLarge(max_bytes));
        }
        let target = dir.join(&name);
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&target)
            .map_err(|e| if e.kind() == std::io::ErrorKind::AlreadyExists { UnpackError::Duplicate(name.clone()) } else { io(&target, e) })?;
        // Copies at most the declared size: a header that lies cannot make it write more.
        std::io::copy(&mut (&mut entry).take(size), &mut out).map_err(|e| io(&target, e))?;
        out.set_modified(std::time::SystemTime::now()).map_err(|e| io(&target, e))?;
        out.sync_all().map_err(|e| io(&target, e))?;
        names.push(name);
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io(dir, e))?;
    Ok(names)
}

use UnpackError::UnsafeName;

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        builder.into_inner().unwrap()
    }

    fn file(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, data).unwrap();
    }

    #[test]
    fn plain_files_unpack_and_everything_else_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let good = archive(|b| {
            file(b, "adapter_config.json", b"{}");
            file(b, "adapter_model.safetensors", b"weights");
        });
        let names = unpack_plain_files(good.as_slice(), &root.path().join("ok"), 1 << 20).unwrap();
        assert_eq!(names, ["adapter_config.json", "adapter_model.safetensors"]);
        let modified = std::fs::metadata(root.path().join("ok/adapter_config.json")).unwrap().modified().unwrap();
        let age = std::time::SystemTime::now().duration_since(modified).unwrap_or_default();
        assert!(age.as_secs() < 3600, "an unpacked file keeps the archive's zero mtime: {modified:?}");

        let symlink = archive(|b| {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            b.append_link(&mut header, "d", "/etc").unwrap();
        });
        let e = unpack_plain_files(symlink.as_slice(), &root.path().join("s"), 1 << 20).unwrap_err();
        assert!(matches!(e, UnpackError::NotAFile { .. }), "{e}");
        let too_big = archive(|b| file(b, "big", &[0u8; 2000]));
        assert!(matches!(unpack_plain_files(too_big.as_slice(), &root.path().join("b"), 1000), Err(UnpackError::TooLarge(1000))));
        let nested = archive(|b| file(b, "sub/file", b"x"));
        assert!(matches!(unpack_plain_files(nested.as_slice(), &root.path().join("n"), 1000), Err(UnpackError::UnsafeName(_))));
        assert!(unpack_plain_files(good.as_slice(), &root.path().join("ok"), 1 << 20).is_err(), "an existing folder is refused");
    }
}

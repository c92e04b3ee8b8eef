//! Where `ptune-worker` finds libtorch at run time, and whether it links the
//! CUDA half of it.
//!
//! RUNPATH, searched in order: `$ORIGIN/../torch/lib` (a binary in `bin/`
//! beside the wheel's `torch/` and `nvidia/` folders, the layout
//! site-packages has and images copy, so that libtorch_cuda's own
//! `$ORIGIN/../../nvidia/...` finds the CUDA libraries), `$ORIGIN/../lib`
//! (a release folder with the libraries in `lib/`), then the build's own
//! `torch/lib` (a checkout's `.venv`): the binary starts without
//! LD_LIBRARY_PATH wherever it is copied with its libraries, and in the
//! checkout that built it.
//!
//! With the `cuda` feature, `libtorch_cuda.so` is linked even though no
//! symbol of it is referenced: libtorch registers its CUDA kernels when that
//! library loads, and the linker's default `--as-needed` would drop it
//! (tch-rs issue 980), leaving a binary that never sees a GPU. It is a
//! feature, not the default, because loading the CUDA libraries the wheel
//! ships costs a CPU-only worker about 380 MB of resident memory and a
//! slower start (`ptune-worker --help`: 120 MB plain, 500 MB with them).

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN/../torch/lib:$ORIGIN/../lib");
    let output = Command::new("python3")
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib')); \
             print(torch.__version__); print(torch.version.cuda or 'none')",
        ])
        .output();
    let lines: Vec<String> = match output {
        Ok(output) if output.status.success() => {
            String::from_utf8_lossy(&output.stdout).lines().map(|l| l.trim().to_string()).collect()
        }
        _ => Vec::new(),
    };
    let torch_lib = lines.first().cloned();
    // Logged by the worker at start.
    println!("cargo:rustc-env=PTUNE_LIBTORCH_VERSION={}", lines.get(1).map_or("unknown", String::as_str));
    println!("cargo:rustc-env=PTUNE_TORCH_CUDA_VERSION={}", lines.get(2).map_or("unknown", String::as_str));
    if let Some(lib) = &torch_lib {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let Some(lib) = torch_lib.filter(|lib| Path::new(lib).join("libtorch_cuda.so").is_file()) else {
            panic!("feature `cuda` needs a CUDA build of torch (libtorch_cuda.so in torch/lib); this torch has none");
        };
        println!("cargo:rustc-link-search=native={lib}");
        println!("cargo:rustc-link-arg-bins=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg-bins=-ltorch_cuda");
        println!("cargo:rustc-link-arg-bins=-Wl,--as-needed");
    }
}

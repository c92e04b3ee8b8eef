//! Embeds the run-time path of the libtorch that tch linked (the PyPI torch
//! wheel's `torch/lib`), so `ptune-worker` starts without LD_LIBRARY_PATH.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=PATH");
    let output = Command::new("python3")
        .args(["-c", "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))"])
        .output();
    if let Ok(output) = output {
        if output.status.success() {
            let lib = String::from_utf8_lossy(&output.stdout).trim().to_string();
            println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        }
    }
}

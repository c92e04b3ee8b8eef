//! Compiles the ptune.v1 protos with the pure-Rust `protox`, so no `protoc` is needed.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "ptune/v1/types.proto",
    "ptune/v1/job_service.proto",
    "ptune/v1/worker_service.proto",
    "ptune/v1/sweep_service.proto",
    "ptune/v1/admin_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("ptune_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    // Requests that do not parse are INVALID_ARGUMENT, not INTERNAL (see src/codec.rs).
    tonic_prost_build::configure().codec_path("crate::codec::StrictCodec").compile_fds(fds)?;
    Ok(())
}

# The ptune worker image: the Rust binary with the libtorch of the pinned
# PyPI torch wheel (requirements.txt) and the CUDA libraries that wheel
# depends on (the nvidia-* wheels), on a slim Debian runtime, as an
# unprivileged numeric user. Python itself is not in the runtime: only the
# shared libraries, laid out under /opt/ptune as site-packages has them
# (torch/lib, nvidia/*/lib) with the binary in /opt/ptune/bin, so the
# worker's RUNPATH ($ORIGIN/../torch/lib, worker/build.rs) and libtorch's
# own RPATH ($ORIGIN/../../nvidia/*/lib) both resolve with no environment.
# Built with the `cuda` feature, so libtorch registers its CUDA kernels
# (scripts/check-worker-binary.sh checks the same binary layout in CI).
#
# Build from the repository root (docs/deploy.md):
#   docker build -f deploy/docker/worker.Dockerfile -t ptune/worker:0.1.0 .
#
# Base images are pinned by tag and digest; refresh both together. The
# image is large (about 3.5 GB, nearly all of it CUDA and libtorch).

FROM rust:1.95.0-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# A virtual environment for the torch wheel (Debian's pip refuses to
# install into the system Python).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv=3.11.2-1+b1 \
    && rm -rf /var/lib/apt/lists/*
ENV SITE_PACKAGES=/opt/venv/lib/python3.11/site-packages
# tch finds libtorch through the Python on PATH (LIBTORCH_USE_PYTORCH), and
# the worker's build.rs embeds that torch/lib as the binary's RUNPATH.
ENV PATH=/opt/venv/bin:$PATH \
    LIBTORCH_USE_PYTORCH=1
COPY requirements.txt /tmp/requirements.txt
# Only the torch line: the other package there is a model for local runs.
RUN python3 -m venv /opt/venv \
    && grep '^torch==' /tmp/requirements.txt > /tmp/torch.txt \
    && pip install --no-cache-dir --disable-pip-version-check -r /tmp/torch.txt
# The libraries the worker loads at run time: torch/lib without the Python
# binding, and the lib folders of the nvidia-* wheels (no headers, no static
# archives), at their site-packages paths under /stage/opt/ptune.
RUN mkdir -p /stage/opt/ptune/torch/lib \
    && find "$SITE_PACKAGES/torch/lib" -maxdepth 1 -name '*.so*' ! -name 'libtorch_python.so' \
         -exec cp -a {} /stage/opt/ptune/torch/lib/ \; \
    && for lib in "$SITE_PACKAGES"/nvidia/*/lib; do \
         dest="/stage/opt/ptune/${lib#"$SITE_PACKAGES"/}" \
         && mkdir -p "$dest" && find "$lib" -maxdepth 1 -name '*.so*' -exec cp -a {} "$dest/" \; ; \
       done
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ptune-worker --features cuda \
    && install -D -m 0755 target/release/ptune-worker /out/ptune-worker \
    && readelf -d /out/ptune-worker | grep -q "RUNPATH.*ORIGIN/../torch/lib" \
    && readelf -d /out/ptune-worker | grep -q 'NEEDED.*libtorch_cuda.so'

FROM debian:12.12-slim@sha256:d5d3f9c23164ea16f31852f95bd5959aad1c5e854332fe00f7b3a20fcc9f635c
COPY --from=build /stage/ /
# System roots, for an https:// coordinator whose certificate a public CA
# signed (a private CA is given with --ca-cert).
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/ptune-worker /opt/ptune/bin/ptune-worker
# The models volume (read-only is enough) and the work folder (dataset
# cache, checkpoints, lease journals, the worker's id), owned by the
# worker's user.
RUN mkdir -p /models /var/lib/ptune/worker \
    && chown 10001:10001 /models /var/lib/ptune/worker
# No LD_LIBRARY_PATH: the RUNPATH finds libtorch. HOME is writable under a
# read-only root (caches of CUDA and the tokenizers). The NVIDIA variables ask the container toolkit for the driver's compute
# libraries on GPU nodes; libcuda itself comes from the host.
ENV PATH=/opt/ptune/bin:$PATH \
    HOME=/tmp \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PTUNE_MODELS_DIR=/models \
    PTUNE_WORK_DIR=/var/lib/ptune/worker \
    PTUNE_LOG_FORMAT=json
VOLUME ["/models", "/var/lib/ptune/worker"]
USER 10001:10001
WORKDIR /var/lib/ptune/worker
# Fails the build when a library libtorch needs did not make it into the
# runtime.
RUN ["/opt/ptune/bin/ptune-worker", "--version"]
ENTRYPOINT ["/opt/ptune/bin/ptune-worker"]

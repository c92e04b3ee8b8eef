# The ptune coordinator image: the Rust binary on a distroless runtime
# (glibc and libgcc, no shell, no package manager), as an unprivileged
# numeric user. It has no libtorch and no PostgreSQL server, so it needs
# --database-url (PTUNE_DATABASE_URL); the embedded single-machine database
# is for running the binary directly, not for this image.
#
# Build from the repository root (docs/deploy.md):
#   docker build -f deploy/docker/coordinator.Dockerfile -t ptune/coordinator:0.1.0 .
#
# Base images are pinned by tag and digest; refresh both together.

FROM rust:1.95.0-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS build
WORKDIR /src
COPY . .
# The migrations and the dashboard's assets are embedded in the binary, so
# it is the only file the runtime needs.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ptune-coordinator \
    && install -D -m 0755 target/release/ptune-coordinator /out/ptune-coordinator

FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
COPY --from=build /out/ptune-coordinator /usr/local/bin/ptune-coordinator
# Listen on every interface inside the container; the defaults of the
# binary (127.0.0.1) are for a single machine.
ENV PTUNE_GRPC_ADDR=0.0.0.0:50051 \
    PTUNE_HTTP_ADDR=0.0.0.0:8080 \
    PTUNE_LOG_FORMAT=json
USER 10001:10001
# Fails the build when the binary cannot start on this runtime (a missing
# shared library).
RUN ["/usr/local/bin/ptune-coordinator", "--version"]
EXPOSE 50051 8080
ENTRYPOINT ["/usr/local/bin/ptune-coordinator"]

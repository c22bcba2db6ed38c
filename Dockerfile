# Weft's images: one target per image.
#
#   docker build --target proxy    -t ghcr.io/weft-mesh/weft-proxy:0.1.0 .
#   docker build --target operator -t ghcr.io/weft-mesh/weft-operator:0.1.0 .
#   docker build --target demo-app -t ghcr.io/weft-mesh/weft-demo-app:0.1.0 .   (the demo's app)
#
# `make images` builds both with buildah (no daemon, no registry) from base images it makes
# out of Debian packages; docs/images.md explains the build, the layout and the arguments.
#
# Every base image is a build argument, so a user who cannot reach the default registry
# passes a mirror or an image of their own (`--build-arg PROXY_BASE=...`). What each must be:
#   BUILDER_IMAGE  Rust >= 1.95 with cargo, a C compiler and libc headers (ring needs them),
#                  binutils' strip, CARGO_HOME=/usr/local/cargo, and a glibc no newer than
#                  the runtime bases'.
#   PROXY_BASE     Debian bookworm or later with apt (the proxy stage installs iptables and
#                  iproute2 from it) and /bin/sh.
#   OPERATOR_BASE  glibc and libgcc_s, CA certificates; no shell needed (distroless cc).
ARG BUILDER_IMAGE=docker.io/library/rust:1.95-bookworm
ARG PROXY_BASE=docker.io/library/debian:bookworm-slim
ARG OPERATOR_BASE=gcr.io/distroless/cc-debian12:nonroot

# ---------------------------------------------------------------------------------------
# build: the release binaries in one cargo invocation (they share most dependencies).
#
# The cargo registry and the target directory are cache mounts: compiled dependencies
# survive between builds, so a source change recompiles Weft's own crates only, and the
# image layers carry the two binaries, not gigabytes of target/. One COPY of what
# .dockerignore lets through (the workspace's manifests and members' sources: cargo loads
# every member), so an edit to docs/, charts/ or examples/ does not invalidate the build,
# and a storage driver that copies each layer whole (vfs) copies the builder once.
FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY . .
# rust-toolchain.toml stays out (.dockerignore): it names the toolchain of this project's
# machines, and a builder image's own Rust (>= rust-version in Cargo.toml) is what builds.
RUN --mount=type=cache,id=weft-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=weft-target,target=/src/target \
    cargo build --release --locked -p weft-proxy -p weft-operator -p weft-demo-app \
        --bin weft-proxy --bin weft-operator --bin weft-demo-app \
    && mkdir -p /out \
    && cp target/release/weft-proxy target/release/weft-operator target/release/weft-demo-app /out/ \
    && strip --strip-debug /out/weft-proxy /out/weft-operator /out/weft-demo-app
# The release profile's line tables make the binaries four times larger (94 MB for the
# operator); --strip-debug drops them and keeps the symbols, so a panic's backtrace still
# names its functions.

# ---------------------------------------------------------------------------------------
# proxy: `weft-proxy run` (the sidecar) and `weft-proxy init` (the init container, which
# needs iptables with both the nft and the legacy backend, and `ip` for IPv6).
FROM ${PROXY_BASE} AS proxy
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        iptables iproute2 \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log \
    && echo 'weft-proxy:x:5150:5150:Weft proxy:/nonexistent:/usr/sbin/nologin' >> /etc/passwd \
    && echo 'weft-proxy:x:5150:' >> /etc/group
COPY --from=build /out/weft-proxy /usr/local/bin/weft-proxy
# The injector runs the proxy as this UID and `weft-proxy init --proxy-uid` exempts it
# from interception; the init container overrides it with UID 0 (NET_ADMIN only). Numeric,
# so that the kubelet can check `runAsNonRoot` against it.
USER 5150:5150
ENTRYPOINT ["/usr/local/bin/weft-proxy"]
CMD ["run"]
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="weft-proxy" \
      org.opencontainers.image.description="Weft's sidecar proxy and its init container (weft-proxy run, weft-proxy init)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/weft"

# ---------------------------------------------------------------------------------------
# operator: one static-enough binary (glibc, libgcc_s) on a base without a shell.
FROM ${OPERATOR_BASE} AS operator
COPY --from=build /out/weft-operator /usr/local/bin/weft-operator
# distroless's `nonroot`; numeric for the kubelet's `runAsNonRoot` check.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/weft-operator"]
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="weft-operator" \
      org.opencontainers.image.description="Weft's control plane: controllers, admission webhook, identity CA and config push" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/weft"

# ---------------------------------------------------------------------------------------
# demo-app: the demo's and the node tests' application (`weft-demo-app serve|load|fail|
# recover`, demo/app). Not part of the mesh; no shell, so `kubectl exec` runs the binary.
FROM ${OPERATOR_BASE} AS demo-app
COPY --from=build /out/weft-demo-app /usr/local/bin/weft-demo-app
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/weft-demo-app"]
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="weft-demo-app" \
      org.opencontainers.image.description="Weft's demo application: an HTTP server that can be made to fail, and a load generator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/weft"

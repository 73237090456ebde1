# syntax=docker/dockerfile:1
# operator image for users with Docker: the same binary path, user, /etc/passwd and labels as
# images/build.sh writes without Docker (build.sh is what this repo's CI exercises).
#   docker build -f images/operator.Dockerfile -t ghcr.io/wsrelay/wsrelay-operator:0.1.0 .
# VERSION must be the [workspace.package] version in Cargo.toml: the build stage checks it, and
# images/build.sh fails when this default falls behind.
ARG VERSION=0.1.0

FROM rust:1.95-bookworm AS build
ARG VERSION
# musl: a fully static binary for FROM scratch; musl-gcc compiles ring's C code.
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools \
    && rustup target add x86_64-unknown-linux-musl
# As images/build.sh: no debug info, symbols kept for backtraces.
ENV CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=debuginfo
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY relay relay
COPY relay-config relay-config
COPY testkit testkit
COPY operator operator
COPY e2e e2e
COPY images images
RUN grep -qx "version = \"$VERSION\"" Cargo.toml || { echo "VERSION $VERSION is not Cargo.toml's"; exit 1; }
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p wsrelay-operator --bin wsrelay-operator
# An empty world-writable /tmp, as build.sh writes (Kubernetes mounts an emptyDir over it).
RUN mkdir -m 1777 /tmp/rootfs-tmp

FROM scratch
ARG VERSION
COPY images/rootfs/etc/passwd images/rootfs/etc/group /etc/
COPY --from=build /tmp/rootfs-tmp /tmp
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/wsrelay-operator /usr/local/bin/wsrelay-operator
ENV PATH=/usr/local/bin:/usr/bin:/bin
USER 65532:65532
EXPOSE 8080/tcp
LABEL org.opencontainers.image.source="https://github.com/wsrelay/wsrelay" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.title="wsrelay-operator" \
      org.opencontainers.image.description="Kubernetes operator for wsrelay WebSocket gateways" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/usr/local/bin/wsrelay-operator"]
CMD ["run"]

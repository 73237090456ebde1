# syntax=docker/dockerfile:1
# pause image for users with Docker: the same /pause, user and labels as
# images/build.sh writes without Docker (build.sh is what this repo's CI exercises).
#   docker build -f images/pause.Dockerfile -t ghcr.io/wsrelay/pause:0.1.0 .
# VERSION must be the [workspace.package] version in Cargo.toml: the build stage checks it, and
# images/build.sh fails when this default falls behind.
ARG VERSION=0.1.0

FROM rust:1.95-bookworm AS build
ARG VERSION
# musl: a fully static binary for FROM scratch (no C code here, so no musl-gcc needed).
RUN rustup target add x86_64-unknown-linux-musl
# As images/build.sh: no debug info, symbols kept for backtraces.
ENV CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=debuginfo
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY relay relay
COPY operator operator
COPY e2e e2e
COPY images images
RUN grep -qx "version = \"$VERSION\"" Cargo.toml || { echo "VERSION $VERSION is not Cargo.toml's"; exit 1; }
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p wsrelay-pause --bin wsrelay-pause

FROM scratch
ARG VERSION
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/wsrelay-pause /pause
ENV PATH=/usr/local/bin:/usr/bin:/bin
USER 65535:65535
LABEL org.opencontainers.image.source="https://github.com/wsrelay/wsrelay" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.title="pause" \
      org.opencontainers.image.description="Pod sandbox process: holds the namespaces, reaps orphans" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["/pause"]

# syntax=docker/dockerfile:1
#
# mailgate container image: multi-stage build, non-root runtime.
#
#   docker build -t mailgate .
#   docker run -d --name mailgate \
#     -v /srv/mailgate/config:/etc/mailgate:ro \
#     -v /srv/mailgate/certs:/etc/mailgate/certs:ro \
#     -p 25:25 -p 465:465 -p 587:587 -p 110:110 -p 995:995 \
#     -p 127.0.0.1:9090:9090 mailgate
#
# The metrics endpoint (/metrics, /healthz, /readyz) has no authentication:
# publish it on the host's loopback only, as above (inside the container the
# config binds 0.0.0.0:9090 so that Docker can forward to it), or not at all
# (the HEALTHCHECK reaches it from inside the container).
#
# Privileged ports (< 1024) as the non-root user, either:
#   a) listen on high ports in the config (2525, 4650, 5870, 1100, 9950) and map
#      them: -p 25:2525 -p 465:4650 ...; or
#   b) use the file capability set below: the binary carries
#      cap_net_bind_service=+ep, set with setcap in the builder stage. BuildKit
#      (the default builder since Docker 23) and buildah (CI, .ci/image.sh)
#      keep the security.capability xattr on COPY --from; the legacy builder
#      drops it (then use a). Do not run with
#      --cap-drop=ALL unless you also --cap-add=NET_BIND_SERVICE: a binary with
#      file capabilities outside the bounding set fails to exec (EPERM).
#      (Docker >= 20.10 also sets net.ipv4.ip_unprivileged_port_start=0 in
#      non-host network namespaces, which makes low ports work on its own.)
#
# Base images are build arguments so that a build without Docker Hub can use
# local ones (CI: .ci/image.sh makes both from the Debian mirror and builds
# with buildah):
#   buildah build --build-arg RUST_IMAGE=localhost/rust:1.95-bookworm \
#     --build-arg RUNTIME_IMAGE=localhost/debian:bookworm-slim -t mailgate .

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN apt-get update \
    && apt-get install -y --no-install-recommends libcap2-bin \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Dependency layer: build the dependency graph against a stub main so that
# source-only changes do not rebuild every crate. cargo refuses a manifest
# whose explicit targets ([[bench]] policy) have no file, hence benches/.
# --ignore-rust-version: mail-parser (via mail-auth) declares rust-version 1.98
# but builds on 1.95; cargo has no config key for this.
COPY Cargo.toml Cargo.lock ./
COPY benches/ benches/
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && cargo build --release --locked --ignore-rust-version --bin mailgate \
    && rm -rf src

# Whole context (trimmed by .dockerignore): src/ plus build.rs or data files if
# they appear. touch: COPY keeps the context's mtimes, which can be older than
# the stub build, and cargo would then keep the stub binary.
COPY . .
RUN find src -name '*.rs' -exec touch {} + \
    && cargo build --release --locked --ignore-rust-version --bin mailgate \
    && cp target/release/mailgate /usr/local/bin/mailgate \
    && setcap cap_net_bind_service=+ep /usr/local/bin/mailgate \
    && getcap /usr/local/bin/mailgate


FROM ${RUNTIME_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10025 mailgate \
    && useradd --system --uid 10025 --gid mailgate --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin mailgate \
    && install -d -o root -g mailgate -m 0750 /etc/mailgate /etc/mailgate/certs

# Keeps the cap_net_bind_service xattr with BuildKit (see the header).
COPY --from=builder /usr/local/bin/mailgate /usr/local/bin/mailgate

VOLUME ["/etc/mailgate", "/etc/mailgate/certs"]

# SMTP, SMTPS (implicit TLS), submission, POP3, POP3S, metrics.
EXPOSE 25 465 587 110 995 9090

USER 10025:10025

# GET /healthz on the metrics endpoint when `metrics:` is configured; otherwise
# connects to each configured listener on loopback and expects a greeting.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/mailgate", "healthcheck", "--config", "/etc/mailgate"]

# Exec form: mailgate is PID 1 and receives SIGTERM (graceful drain) and SIGHUP (reload).
ENTRYPOINT ["/usr/local/bin/mailgate"]
CMD ["--log-format", "json", "run", "--config", "/etc/mailgate"]

#!/usr/bin/env bash
# The container image, built and run for real, on a machine with neither a
# container engine nor a registry (CI reaches only the Debian mirror, crates.io,
# PyPI and npm). Called by .ci/run as root; needs buildah, debootstrap, Postfix
# (smtp-sink), curl, openssl and python3 (.ci/run installs them).
#
#  1. base: debootstrap a bookworm minbase from the mirror apt already uses and
#     import it as the runtime base (the Dockerfile's RUNTIME_IMAGE default,
#     prefixed with localhost/);
#  2. builder: that base plus Debian's C toolchain plus the host's active Rust
#     toolchain (rustup's servers are not reachable), tagged as the Dockerfile's
#     RUST_IMAGE default under localhost/;
#  3. build: `buildah build` of the repository's Dockerfile with both images as
#     build arguments (cargo inside fetches crates from crates.io: chroot
#     isolation shares the host's network);
#  4. run: the image's ENTRYPOINT+CMD as its USER (`buildah run`, chroot
#     isolation, host network) with a mounted config listening on loopback in
#     front of Postfix's smtp-sink; the image's HEALTHCHECK command must pass,
#     curl delivers one message over STARTTLS and the sink must have it; then
#     SIGTERM to the gateway's PID must end it cleanly.
#
# Everything (storage, base rootfs, config, logs) lives under $WORK, which is
# deleted at exit (MAILGATE_IMAGE_KEEP=1 keeps it for a look after a failure;
# the next run deletes it). Each step is bounded in time; timings and disk use
# are printed at the end.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$PWD"

WORK="${MAILGATE_IMAGE_WORK:-/var/tmp/mailgate-ci-image}"
SUITE=bookworm
IMAGE=localhost/mailgate:ci

# Dedicated storage: vfs (no overlay or fuse needed; it copies every layer,
# hence the cleanup), chroot isolation (no runc/crun, no user namespaces).
B=(buildah --root "$WORK/storage" --runroot "$WORK/run" --storage-driver vfs)
export BUILDAH_ISOLATION=chroot
# buildah stages image copies in TMPDIR: keep them inside $WORK as well.
export TMPDIR="$WORK/tmp"

timings=()
t_start=$SECONDS
disk_peak=""
step() { # step NAME CMD...: runs CMD and records how long it took
    local name="$1" t0=$SECONDS
    shift
    printf -- '--- %s\n' "$name"
    "$@"
    timings+=("$(printf '%-28s %4ss' "$name" $((SECONDS - t0)))")
}
# Every command that could hang runs under a limit (seconds follow).
limit=(timeout --kill-after=30)

# ---------------------------------------------------------------------------
# Cleanup: processes this script started (by PID), containers, images, storage.
sink_pid=""
run_pid=""
gw_pid=""
stop_pid() { # stop_pid PID: SIGTERM, up to 10 s, then SIGKILL
    local pid="$1" i
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    set +e
    stop_pid "$gw_pid"
    stop_pid "$run_pid"
    stop_pid "$sink_pid"
    wait 2>/dev/null
    timings+=("$(printf '%-28s %4ss' total $((SECONDS - t_start)))")
    echo "image timings:"
    printf '  %s\n' "${timings[@]}"
    echo "peak storage: ${disk_peak:-?} in $WORK; $(df -h --output=avail / | tail -n1 | tr -d ' ') free on /"
    if [ -n "${MAILGATE_IMAGE_KEEP:-}" ]; then
        echo "MAILGATE_IMAGE_KEEP: leaving $WORK (buildah ${B[*]:1})"
        exit "$rc"
    fi
    if [ -d "$WORK/storage" ]; then
        "${B[@]}" umount --all >/dev/null 2>&1
        "${B[@]}" rm --all >/dev/null 2>&1
        "${B[@]}" rmi --all --force >/dev/null 2>&1
    fi
    # --one-file-system: never follow a mount left behind into the host.
    rm -rf --one-file-system "$WORK"
    exit "$rc"
}
trap cleanup EXIT

# A previous run that was killed may have left its storage behind.
if [ -e "$WORK" ]; then
    echo "removing leftovers of a previous run in $WORK"
    if [ -d "$WORK/storage" ]; then
        "${B[@]}" umount --all >/dev/null 2>&1 || true
        "${B[@]}" rm --all >/dev/null 2>&1 || true
    fi
    rm -rf --one-file-system "$WORK"
fi
mkdir -p "$WORK/tmp"

# ---------------------------------------------------------------------------
# What to build: the Dockerfile's own defaults, made locally.
arg_default() { # the default of a global ARG in the Dockerfile
    sed -n "s/^ARG $1=//p" Dockerfile | head -n1
}
rust_default="$(arg_default RUST_IMAGE)"
runtime_default="$(arg_default RUNTIME_IMAGE)"
[ -n "$rust_default" ] && [ -n "$runtime_default" ] || {
    echo "Dockerfile: expected 'ARG RUST_IMAGE=...' and 'ARG RUNTIME_IMAGE=...' before the first FROM" >&2
    exit 1
}
RUST_TAG="localhost/$rust_default"
RUNTIME_TAG="localhost/$runtime_default"

# The builder carries the host's toolchain, so it must be the version the
# Dockerfile names (rust:1.95-bookworm → 1.95.x).
sysroot="$(rustc --print sysroot)"
host_rust="$(rustc --version | awk '{print $2}')"
want_rust="${rust_default#rust:}"
want_rust="${want_rust%%-*}"
case "$host_rust" in
"$want_rust" | "$want_rust".*) ;;
*)
    echo "host Rust $host_rust is not the Dockerfile's $rust_default" >&2
    exit 1
    ;;
esac

# The mirrors apt uses here (apt's own view of its sources).
apt_mirror() { # apt_mirror SUITE: the URI apt fetches SUITE/main from
    apt-cache policy | awk -v s="$1/main" '$1 ~ /^[0-9]+$/ && $3 == s {print $2; exit}'
}
mirror="$(apt_mirror "$SUITE")"
mirror="${mirror:-http://deb.debian.org/debian}"
security="$(apt_mirror "$SUITE-security")"
updates="$(apt_mirror "$SUITE-updates")"

echo "runtime base $RUNTIME_TAG, builder $RUST_TAG (host Rust $host_rust from $sysroot)"
echo "mirror $mirror${security:+, security $security}"
echo "disk before: $(df -h --output=avail / | tail -n1 | tr -d ' ') free on /"

# ---------------------------------------------------------------------------
# 1. Runtime base: what debian:bookworm-slim is (minbase, current updates, no
#    docs, apt sources for bookworm, -updates and -security, apt lists removed).
make_rootfs() {
    local root="$WORK/rootfs"
    "${limit[@]}" 600 debootstrap --variant=minbase --arch=amd64 "$SUITE" "$root" "$mirror" >"$WORK/debootstrap.log" 2>&1 || {
        tail -n 30 "$WORK/debootstrap.log" >&2
        return 1
    }
    rm -f "$root/etc/apt/sources.list"
    {
        printf 'Types: deb\nURIs: %s\nSuites: %s%s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$mirror" "$SUITE" "${updates:+ $SUITE-updates}"
        [ -z "$security" ] ||
            printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
                "$security" "$SUITE"
    } >"$root/etc/apt/sources.list.d/debian.sources"
    # As the slim images do: no documentation from later installs.
    cat >"$root/etc/dpkg/dpkg.cfg.d/excludes" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
    rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
}
import_base() {
    local ctr mnt
    ctr="$("${B[@]}" from --name mg-base scratch)"
    mnt="$("${B[@]}" mount "$ctr")"
    tar -C "$WORK/rootfs" --numeric-owner --xattrs --xattrs-include='*' -cf - . |
        tar -C "$mnt" --numeric-owner --xattrs --xattrs-include='*' -xpf -
    "${B[@]}" umount "$ctr" >/dev/null
    rm -rf --one-file-system "$WORK/rootfs"
    "${limit[@]}" 300 "${B[@]}" run "$ctr" -- sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq \
        && apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/*/changelog* /usr/share/man/* /usr/share/info/*' \
        >"$WORK/base-apt.log" 2>&1 || { tail -n 30 "$WORK/base-apt.log" >&2; return 1; }
    "${B[@]}" config --os linux --arch amd64 --cmd bash \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --label org.opencontainers.image.description="debootstrap $SUITE minbase (mailgate CI)" "$ctr"
    "${B[@]}" commit --quiet --rm "$ctr" "$RUNTIME_TAG" >/dev/null
}
step "debootstrap $SUITE minbase" make_rootfs
step "import runtime base" import_base

# ---------------------------------------------------------------------------
# 2. Builder: what rust:1.95-bookworm is for this Dockerfile (cargo and rustc
#    on PATH, CARGO_HOME=/usr/local/cargo, a C compiler for aws-lc-sys).
#    The toolchain directory is an install prefix (bin/, lib/rustlib/...), so
#    it goes to /usr/local; share/ (documentation, 0.8 GB) stays out.
make_builder() {
    local ctr mnt
    ctr="$("${B[@]}" from --pull=never --name mg-rust "$RUNTIME_TAG")"
    "${limit[@]}" 300 "${B[@]}" run "$ctr" -- sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        ca-certificates gcc libc6-dev make pkg-config libcap2-bin && rm -rf /var/lib/apt/lists/*' \
        >"$WORK/builder-apt.log" 2>&1 || { tail -n 30 "$WORK/builder-apt.log" >&2; return 1; }
    mnt="$("${B[@]}" mount "$ctr")"
    tar -C "$sysroot" -cf - bin lib libexec etc | tar -C "$mnt/usr/local" -xf -
    mkdir -p "$mnt/usr/local/cargo/bin"
    # This machine's local trust anchors (Debian's place for them; empty on a
    # machine whose HTTPS is not intercepted): cargo must reach crates.io the
    # way the host does.
    cp -a /usr/local/share/ca-certificates/. "$mnt/usr/local/share/ca-certificates/"
    "${B[@]}" umount "$ctr" >/dev/null
    "${limit[@]}" 60 "${B[@]}" run "$ctr" -- update-ca-certificates >"$WORK/ca.log" 2>&1 || { cat "$WORK/ca.log" >&2; return 1; }
    "${B[@]}" config --env CARGO_HOME=/usr/local/cargo \
        --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --label org.opencontainers.image.description="Rust $host_rust on $SUITE minbase (mailgate CI)" "$ctr"
    "${B[@]}" run "$ctr" -- sh -c 'cargo --version && rustc --version && cc --version | head -n1'
    "${B[@]}" commit --quiet --rm "$ctr" "$RUST_TAG" >/dev/null
}
step "builder image" make_builder

# ---------------------------------------------------------------------------
# 3. The repository's Dockerfile. Docker format keeps the HEALTHCHECK (OCI
#    image configs have no such field).
build_image() {
    # Before each RUN step, buildah's chroot isolation copies its runtime into a
    # sealed memfd; on this machine kind the kernel now and then refuses the seal
    # (F_ADD_SEALS: EBUSY, "Close_Fd sealing memfd copy: Device or resource
    # busy"), a transient of the build host, not of the Dockerfile. That one
    # failure is retried (twice at most, each attempt from scratch: vfs storage
    # keeps no layer cache); any other failure fails at once.
    local attempt
    for attempt in 1 2 3; do
        if "${limit[@]}" 2400 "${B[@]}" build --pull=never --format docker \
            --build-arg RUST_IMAGE="$RUST_TAG" --build-arg RUNTIME_IMAGE="$RUNTIME_TAG" \
            -t "$IMAGE" -f Dockerfile "$repo" 2>&1 | tee "$WORK/build.log"; then
            return 0
        fi
        grep -q 'sealing memfd copy: Device or resource busy' "$WORK/build.log" || return 1
        [ "$attempt" -lt 3 ] && echo "buildah: the kernel refused to seal a memfd (EBUSY), a host transient; building again ($attempt/3 failed)"
    done
    return 1
}
step "buildah build Dockerfile" build_image
"${B[@]}" images
disk_peak="$(du -sh --one-file-system "$WORK" | cut -f1)"
echo "storage after the build: $disk_peak in $WORK; $(df -h --output=avail / | tail -n1 | tr -d ' ') free on /"

# ---------------------------------------------------------------------------
# 4. Run the image as its config says, in front of a real backend.
"${B[@]}" inspect --type image "$IMAGE" >"$WORK/image.json"
image_config() { # image_config KEY[.KEY]: from the image's config; lists NUL-separated
    python3 - "$WORK/image.json" "$1" <<'EOF'
import json, sys
v = json.load(open(sys.argv[1]))["Docker"]["config"]
for k in sys.argv[2].split("."):
    v = (v or {}).get(k)
if isinstance(v, list):
    sys.stdout.write("".join(x + "\0" for x in v))
elif v is not None:
    sys.stdout.write(str(v))
EOF
}
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_port() { # wait_port PORT PID: until PORT accepts, while PID lives, 60 s at most
    local i
    for i in $(seq 1 600); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}
descendant_named() { # descendant_named PID NAME: the first descendant of PID running NAME
    local c
    for c in $(ps -o pid= --ppid "$1"); do
        if [ "$(cat "/proc/$c/comm" 2>/dev/null)" = "$2" ]; then
            echo "$c"
            return 0
        fi
        descendant_named "$c" "$2" && return 0
    done
    return 1
}

mapfile -d '' entrypoint < <(image_config Entrypoint)
mapfile -d '' cmd < <(image_config Cmd)
mapfile -d '' health < <(image_config Healthcheck.Test)
user="$(image_config User)"
echo "image: USER $user, ENTRYPOINT+CMD: ${entrypoint[*]} ${cmd[*]}; HEALTHCHECK: ${health[*]}"
[ "${#entrypoint[@]}" -gt 0 ] || { echo "image has no ENTRYPOINT" >&2; exit 1; }
case "$user" in
"" | 0 | 0:* | root | root:*)
    echo "image runs as root (USER '$user')" >&2
    exit 1
    ;;
esac
[ "${health[0]:-}" = CMD ] || { echo "image HEALTHCHECK is not exec form: ${health[*]}" >&2; exit 1; }
uid="${user%%:*}"
gid="${user#*:}"

run_image() {
    local e2e="$WORK/e2e" sink_port port ctr mnt rc i
    mkdir -p "$e2e/conf/certs" "$e2e/sink"
    chmod 0777 "$e2e/sink" # smtp-sink writes as nobody
    sink_port="$(free_port)"
    port="$(free_port)"

    # The backend: Postfix's smtp-sink, one file per message.
    smtp-sink -u nobody -h legacy-sink -m 16 -t 30 -d "$e2e/sink/%M." "127.0.0.1:$sink_port" 16 \
        >/dev/null 2>&1 &
    sink_pid=$!
    wait_port "$sink_port" "$sink_pid" || { echo "smtp-sink did not start" >&2; return 1; }

    # The config and certificates the image mounts at /etc/mailgate,
    # readable by its user only.
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        -keyout "$e2e/conf/certs/mail.key" -out "$e2e/conf/certs/mail.pem" 2>/dev/null
    cat >"$e2e/conf/mailgate.yaml" <<EOF
server: { hostname: gw.image.test, shutdown_grace: 2s }
tls:
  certificates: [ { cert: certs/mail.pem, key: certs/mail.key } ]
backends:
  sink: { address: "127.0.0.1:$sink_port" }
listeners:
  - { name: mx, protocol: smtp, bind: "127.0.0.1:$port", tls: starttls, require_tls: true, backend: sink }
EOF
    chown -R "0:$gid" "$e2e/conf"
    find "$e2e/conf" -type d -exec chmod 0750 {} +
    find "$e2e/conf" -type f -exec chmod 0640 {} +

    ctr="$("${B[@]}" from --pull=never --name mg-run "$IMAGE")"
    mnt="$("${B[@]}" mount "$ctr")"
    echo "binary in the image: $(getcap "$mnt${entrypoint[0]}" 2>/dev/null || true)"
    [ -n "$(getcap "$mnt${entrypoint[0]}" 2>/dev/null)" ] ||
        echo "note: the security.capability xattr did not survive this build (listen on high ports, see the Dockerfile header)"
    "${B[@]}" umount "$ctr" >/dev/null

    # One mount holding certs/ too. buildah 1.28's chroot isolation mounts
    # nested volumes in no fixed order: with the image's VOLUMEs (or a second
    # -v for certs/) the config or the certificates came out hidden, differently
    # from run to run. So this throwaway container drops the VOLUME entries
    # (the image keeps them).
    "${B[@]}" config --volume /etc/mailgate- --volume /etc/mailgate/certs- "$ctr"
    local mounts=(-v "$e2e/conf:/etc/mailgate:ro")
    "${limit[@]}" 120 "${B[@]}" run --user "$user" "${mounts[@]}" "$ctr" -- "${entrypoint[@]}" "${cmd[@]}" \
        >"$e2e/mailgate.log" 2>&1 &
    run_pid=$!
    if ! wait_port "$port" "$run_pid"; then
        echo "the image's gateway did not listen on 127.0.0.1:$port; its output:" >&2
        cat "$e2e/mailgate.log" >&2
        return 1
    fi
    gw_pid="$(descendant_named "$run_pid" "$(basename "${entrypoint[0]}")")" || {
        echo "no ${entrypoint[0]} process under buildah run (PID $run_pid)" >&2
        return 1
    }
    local ids
    ids="$(awk '/^Uid:/{u=$2} /^Gid:/{g=$2} END{print u":"g}' "/proc/$gw_pid/status")"
    echo "gateway PID $gw_pid runs as $ids"
    [ "$ids" = "$uid:$gid" ] || { echo "expected the image's USER $uid:$gid" >&2; return 1; }

    # The image's HEALTHCHECK, run in the same container as the same user.
    "${limit[@]}" 30 "${B[@]}" run --user "$user" "${mounts[@]}" "$ctr" -- "${health[@]:1}"
    echo "HEALTHCHECK passed"

    # One message through the image over STARTTLS (required, verified cert).
    local token
    token="image-ci-$$-$RANDOM"
    printf 'From: alice@example.org\r\nTo: bob@example.net\r\nSubject: %s\r\n\r\nThrough the image.\r\n' \
        "$token" >"$e2e/message.eml"
    curl -sS --max-time 30 --ssl-reqd --cacert "$e2e/conf/certs/mail.pem" \
        --url "smtp://127.0.0.1:$port" --mail-from alice@example.org --mail-rcpt bob@example.net \
        -T "$e2e/message.eml"
    for i in $(seq 1 50); do
        grep -qs "Subject: $token" "$e2e/sink/"* && break
        sleep 0.1
    done
    grep -qs "Subject: $token" "$e2e/sink/"* || {
        echo "smtp-sink did not receive the message; gateway output:" >&2
        cat "$e2e/mailgate.log" >&2
        return 1
    }
    echo "smtp-sink received the message: $(grep -ls "Subject: $token" "$e2e/sink/"* | head -n1)"
    grep -q '"level"' "$e2e/mailgate.log" || { echo "gateway wrote no JSON log lines" >&2; return 1; }

    # SIGTERM to the gateway (PID 1 in a real container): a graceful drain and exit 0.
    kill -TERM "$gw_pid"
    rc=0
    for i in $(seq 1 200); do
        kill -0 "$run_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$run_pid" 2>/dev/null; then
        echo "the gateway did not exit within 20 s of SIGTERM" >&2
        return 1
    fi
    wait "$run_pid" || rc=$?
    run_pid=""
    gw_pid=""
    echo "after SIGTERM: exit status $rc; last log line: $(tail -n1 "$e2e/mailgate.log")"
    [ "$rc" -eq 0 ] || { cat "$e2e/mailgate.log" >&2; return 1; }
    stop_pid "$sink_pid"
    sink_pid=""
    "${B[@]}" rm "$ctr" >/dev/null
}
step "run image + deliver" run_image

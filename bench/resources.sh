#!/usr/bin/env bash
# Resource bounds under hostile load (issue 8), measured side by side in one run:
#  1. normal clients' latency unloaded vs. with 1,000 slowloris connections
#     (1 byte per second each) held open;
#  2. 10,000 garbage connections (random bytes, TLS garbage, half-open):
#     mailgate RSS and open fds before and after.
# Prints figures; the README states the targets. Not part of CI.
#   bash bench/resources.sh [slowloris] [garbage]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
SLOW=${1:-1000}; GARBAGE=${2:-10000}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
cargo build -q --release --ignore-rust-version --bin mailgate --example loadgen
BIN=target/release/mailgate; LOAD=target/release/examples/loadgen
W=$(mktemp -d /tmp/mailgate-res.XXXXXX)
. bench/lib.sh
KEYTYPE=ec make_cert
SINK=$(free_port); PLAIN=$(free_port); SMTPS=$(free_port)
smtp-sink -u nobody -m 16384 127.0.0.1:"$SINK" 4096 >/dev/null 2>&1 & pids+=($!)
cat > "$W/m.yaml" <<YAML
listeners:
  - { name: plain, protocol: smtp, bind: "127.0.0.1:$PLAIN", tls: none, backend: sink, max_connections: 30000, timeouts: { command: 300s } }
  - { name: smtps, protocol: smtp, bind: "127.0.0.1:$SMTPS", tls: implicit, backend: sink, max_connections: 30000, timeouts: { tls_handshake: 10s } }
tls: { certificates: [ { cert: cert.pem, key: key.pem } ] }
backends: { sink: { address: "127.0.0.1:$SINK" } }
YAML
MAILGATE_LOG=error "$BIN" run --config "$W/m.yaml" >/dev/null 2>&1 & MG=$!; pids+=($MG)
wait_port "$SINK"; wait_port "$PLAIN"
rss() { awk '/VmRSS/{print $2}' /proc/"$MG"/status; }
fds() { ls /proc/"$MG"/fd | wc -l; }
p99() { "$LOAD" --addr 127.0.0.1:"$PLAIN" --mode plain -c 4 -n 800 --size 4096 | sed -n 's/.*p50_ms=\([0-9.]*\).*p99_ms=\([0-9.]*\).*/p50 \1 ms, p99 \2 ms/p'; }

base_rss=$(rss); base_fds=$(fds)
echo "normal traffic, unloaded:            $(p99)"
python3 - "$PLAIN" "$SLOW" > "$W/slow.out" 2>&1 <<'PY' & SP=$!
import socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port)); s.setblocking(False); socks.append(s)
print("SLOW READY", len(socks), flush=True)
msg = b"EHLO slowloris.example\r\n"
for t in range(40):                     # one byte per second, for 40 s
    for s in socks:
        try: s.send(msg[t % len(msg):t % len(msg) + 1])
        except OSError: pass
    time.sleep(1)
PY
for _ in $(seq 600); do grep -q "SLOW READY" "$W/slow.out" && break; sleep 0.1; done
sleep 2
echo "normal traffic, $SLOW slowloris:    $(p99)   (mailgate RSS $(rss) KiB, fds $(fds))"
kill "$SP" 2>/dev/null || true; wait "$SP" 2>/dev/null || true
sleep 2
mid_rss=$(rss)
python3 - "$PLAIN" "$SMTPS" "$GARBAGE" <<'PY'
import os, socket, sys
plain, smtps, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    port = smtps if i % 2 else plain
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.send(os.urandom(64 + i % 2000))
        if i % 3 == 0: s.shutdown(socket.SHUT_WR)   # half-open
        s.close()
    except OSError:
        pass
print("garbage connections sent:", n)
PY
sleep 5
end_rss=$(rss)
echo "RSS: start ${base_rss} KiB; after the slowloris connections closed ${mid_rss} KiB ($(( (mid_rss - base_rss) * 100 / base_rss ))%)"
echo "RSS: before $GARBAGE garbage connections ${mid_rss} KiB, after ${end_rss} KiB ($(( (end_rss - mid_rss) * 100 / mid_rss ))%)"
echo "open fds: baseline $base_fds, now $(fds)"
echo "normal traffic afterwards:           $(p99)"

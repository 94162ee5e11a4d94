#!/usr/bin/env bash
# Shared limiter state (issue 15, acceptance 4): what `state: store: redis`
# adds per connection and per MAIL+RCPT, against `store: memory`, side by
# side in one run: two mailgate processes with the same policy (connect
# rate + concurrent, MAIL messages, RCPT recipients; limits high enough
# that nothing is refused), one in-process, one on a redis-server on
# loopback, the same client (examples/loadgen.rs) and backend (smtp-sink),
# rounds alternating. Reports mailgate CPU ms per message (utime+stime from
# /proc), redis-server CPU ms per message, msgs/s and p50/p99 latency; then
# the store's memory per 100,000 keys of each kind mailgate writes (INFO
# memory before/after loading them through the same script, ops.lua).
# Loopback only; stops by itself. Not part of CI.
# Usage: bash bench/state.sh [messages] [concurrency]   (SMOKE=1: seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
N=${1:-3000}; C=${2:-10}; REPEATS=${REPEATS:-3}; KEYS=${KEYS:-100000}
if [ "${SMOKE:-0}" = 1 ]; then N=300; REPEATS=1; KEYS=10000; fi
command -v redis-server >/dev/null || { echo "redis-server is not installed (apt-get install redis-server)" >&2; exit 1; }

cargo build -q --release --ignore-rust-version --bin mailgate --example loadgen
BIN=target/release/mailgate; LOAD=target/release/examples/loadgen
W=$(mktemp -d /tmp/mailgate-bench.XXXXXX); chmod 755 "$W"
. bench/lib.sh

SINK=$(free_port); RPORT=$(free_port); MEM=$(free_port); RED=$(free_port)
smtp-sink -u nobody -h legacy-sink -m 8192 -t 300 127.0.0.1:"$SINK" 4096 >/dev/null 2>&1 & pids+=($!)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$W" >"$W/redis.log" 2>&1 & RS=$!; pids+=($RS)
wait_port "$SINK"; wait_port "$RPORT"
R() { redis-cli -p "$RPORT" "$@"; }

policy() {
  cat <<YAML
server: { hostname: gw.bench }
listeners:
  - { name: plain, protocol: smtp, bind: "127.0.0.1:$1", tls: none, backend: sink, policy: p, max_connections: 20000 }
backends: { sink: { address: "127.0.0.1:$SINK" } }
policies:
  p:
    limits:
      - { key: [ip], rate: 1000000/minute, burst: 1000000 }
      - { key: [ip], concurrent: 10000 }
      - { key: [sender_domain], messages: 1000000/minute, burst: 1000000 }
      - { key: [rcpt_domain], recipients: 1000000/minute, burst: 1000000 }
YAML
}
policy "$MEM" > "$W/memory.yaml"
{ policy "$RED"; printf 'state: { store: redis, url: "redis://127.0.0.1:%s/0", prefix: "bench:", timeout: 50ms }\n' "$RPORT"; } > "$W/redis.yaml"
MAILGATE_LOG=warn "$BIN" run --config "$W/memory.yaml" >"$W/memory.log" 2>&1 & MGM=$!; pids+=($MGM)
MAILGATE_LOG=warn "$BIN" run --config "$W/redis.yaml" >"$W/redis-mg.log" 2>&1 & MGR=$!; pids+=($MGR)
wait_port "$MEM"; wait_port "$RED"
TCK=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/"$1"/stat; }

# one NAME PORT PID PER_CONN: a loadgen run; prints "msgs/s p50 p99 mgCPUms rsCPUms errors"
one() {
  local port=$2 pid=$3 per=$4 c0 r0 c1 r1 out ok
  c0=$(cpu "$pid"); r0=$(cpu "$RS")
  # -n counts connections; each carries `per` messages; latency is per connection
  out=$("$LOAD" --addr 127.0.0.1:"$port" --mode plain -c "$C" -n "$((N / per))" --size 1024 --per-conn "$per" 2>&1)
  c1=$(cpu "$pid"); r1=$(cpu "$RS")
  ok=$(sed -n 's/.* acked=\([0-9]*\).*/\1/p' <<<"$out"); [ "${ok:-0}" -gt 0 ] || { echo "no message delivered: $out" >&2; exit 1; }
  printf '%s %s %s %s %s %s\n' \
    "$(sed -n 's/.* secs=\([0-9.]*\).*/\1/p' <<<"$out" | awk -v n="$ok" '{print n / $1}')" \
    "$(sed -n 's/.*p50_ms=\([0-9.]*\).*/\1/p' <<<"$out")" \
    "$(sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p' <<<"$out")" \
    "$(echo "($c1 - $c0) * 1000 / $TCK / $ok" | bc -l)" \
    "$(echo "($r1 - $r0) * 1000 / $TCK / $ok" | bc -l)" \
    "$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' <<<"$out")"
}
median() { sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }

echo "state benchmark: $N messages of 1 KiB per case, concurrency $C, $REPEATS rounds (alternating), loopback; CLK_TCK $TCK" >&2
declare -A res
for round in $(seq "$REPEATS"); do
  for per in 1 20; do
    for store in memory redis; do
      if [ "$store" = memory ]; then port=$MEM; pid=$MGM; else port=$RED; pid=$MGR; fi
      res[$store-$per-$round]=$(one "$store" "$port" "$pid" "$per")
      echo "  round $round, $per msg/conn, $store: ${res[$store-$per-$round]}" >&2
    done
  done
done
col() { for round in $(seq "$REPEATS"); do awk -v f="$3" '{print $f}' <<<"${res[$1-$2-$round]}"; done | median; }

echo
echo "1 msg/conn: connect + EHLO + MAIL + RCPT + DATA per connection (store: connect stage = rate + lease, release, MAIL, RCPT)"
echo "20 msg/conn: 20 x (MAIL + RCPT + DATA) per connection; latency columns are per connection"
printf '%-22s %-7s %9s %8s %8s %12s %12s %7s\n' case store "msgs/s" "p50 ms" "p99 ms" "mg CPU ms" "redis CPU ms" errors
for per in 1 20; do
  for store in memory redis; do
    printf '%-22s %-7s %9.0f %8.2f %8.2f %12.3f %12.3f %7s\n' "$per msg/conn" "$store" \
      "$(col $store $per 1)" "$(col $store $per 2)" "$(col $store $per 3)" "$(col $store $per 4)" "$(col $store $per 5)" "$(col $store $per 6)"
  done
done
for per in 1 20; do
  printf 'added by the store, %2s msg/conn: mailgate CPU %+.3f ms/msg, redis-server CPU %.3f ms/msg, p50 %+.2f ms\n' "$per" \
    "$(echo "$(col redis $per 4) - $(col memory $per 4)" | bc -l)" "$(col redis $per 5)" \
    "$(echo "$(col redis $per 2) - $(col memory $per 2)" | bc -l)"
done
sm=$(R INFO commandstats | tr -d '\r' | grep -E '^cmdstat_(evalsha|eval):' || true)
echo "store commands: ${sm//$'\n'/; }"

# store memory per $KEYS keys of each kind, written by ops.lua itself
R FLUSHALL >/dev/null
SHA=$(R SCRIPT LOAD "$(cat src/state/ops.lua)")
used() { R INFO memory | tr -d '\r' | sed -n 's/^used_memory:\([0-9]*\)/\1/p'; }
# load KIND ARGS...: $KEYS EVALSHA calls through redis-cli --pipe (RESP)
load() {
  local kind=$1 a=$2 b=$3 c=$4
  python3 - "$SHA" "$kind" "$a" "$b" "$c" "$KEYS" <<'PY' | R --pipe >/dev/null
import sys, hashlib
sha, kind, a, b, c, n = sys.argv[1:7]
def resp(*args):
    out = [f"*{len(args)}\r\n"]
    for x in args:
        x = str(x)
        out.append(f"${len(x.encode())}\r\n{x}\r\n")
    return "".join(out)
w = sys.stdout.write
letter = {"rate": "r", "lease": "c", "fail": "f", "remember": "g"}[kind]
for i in range(int(n)):
    key = f"bench:{letter}:0123456789abcdef:{hashlib.sha256(str(i).encode()).hexdigest()[:32]}"
    token = f"0123456789AB-1a2b3c-{i}"
    w(resp("EVALSHA", sha, 1, key, token, 30000, kind, a, b, c, ""))
PY
}
echo
echo "store memory per $KEYS keys (used_memory delta, keys as mailgate names them):"
for spec in "rate 6000000 60000000 0:rate bucket (GCRA arrival time)" \
            "lease 10000 0 0:concurrent lease (sorted set, 1 session)" \
            "fail 5 900000 0:auth_failures window (sorted set, 1 failure)" \
            "remember 2592000000 0 0:known-good network"; do
  args=${spec%%:*}; what=${spec#*:}
  R FLUSHALL >/dev/null; sleep 0.2; m0=$(used)
  # shellcheck disable=SC2086
  load $args
  m1=$(used); k=$(R DBSIZE)
  printf '  %-44s %8d keys  %10d bytes  = %5.0f bytes per key, %6.1f MiB per 100,000\n' "$what" "$k" "$((m1 - m0))" \
    "$(echo "($m1 - $m0) / $k" | bc -l)" "$(echo "($m1 - $m0) * 100000 / $k / 1048576" | bc -l)"
done
echo "(machine shared with other work: CPU figures are indicative; compare the two stores within this run)"

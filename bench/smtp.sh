#!/usr/bin/env bash
# Side-by-side SMTP benchmark: direct to Postfix smtp-sink vs. through mailgate,
# in one run, same machine, same client. Reports msgs/s, latency, mailgate CPU
# per message (utime+stime from /proc/PID/stat) and RSS per idle TLS session.
# Not part of CI. Usage: bash bench/smtp.sh [messages] [concurrency] [size]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
N=${1:-2000}; C=${2:-20}; SIZE=${3:-10240}; IDLE=${IDLE:-1000}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build -q --release --ignore-rust-version --bin mailgate --example loadgen
BIN=target/release/mailgate; LOAD=target/release/examples/loadgen
W=$(mktemp -d /tmp/mailgate-bench.XXXXXX); chmod 755 "$W"
. bench/lib.sh

make_cert

SINK=$(free_port); PLAIN=$(free_port); STLS=$(free_port); SMTPS=$(free_port)
smtp-sink -u nobody -h legacy-sink -m 8192 -t 300 127.0.0.1:"$SINK" 4096 >/dev/null 2>&1 & pids+=($!)
cat > "$W/mailgate.yaml" <<YAML
server: { hostname: gw.bench }
listeners:
  - { name: plain, protocol: smtp, bind: "127.0.0.1:$PLAIN", tls: none, backend: sink, max_connections: 20000 }
  - { name: mx, protocol: smtp, bind: "127.0.0.1:$STLS", tls: starttls, backend: sink, max_connections: 20000 }
  - { name: smtps, protocol: smtp, bind: "127.0.0.1:$SMTPS", tls: implicit, backend: sink, max_connections: 20000 }
tls: { certificates: [ { cert: cert.pem, key: key.pem } ] }
backends: { sink: { address: "127.0.0.1:$SINK" } }
YAML
MAILGATE_LOG=warn "$BIN" run --config "$W/mailgate.yaml" >"$W/mailgate.log" 2>&1 & MG=$!; pids+=($MG)
wait_port "$SINK"; wait_port "$PLAIN"; wait_port "$STLS"
TCK=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/"$MG"/stat; }
rss() { awk '/VmRSS/{print $2}' /proc/"$MG"/status; }

rows=()
# run NAME VIA_MAILGATE(0/1) CMD...
run() {
  local name=$1 via=$2; shift 2
  local c0 t0 t1 c1 out
  c0=$(cpu); t0=$(date +%s.%N)
  out=$("$@" 2>&1)
  t1=$(date +%s.%N); c1=$(cpu)
  local ok msgs
  if [[ $out == *RESULT* ]]; then
    ok=$(sed -n 's/.*ok=\([0-9]*\).*/\1/p' <<<"$out"); msgs=$ok
    local p50 p99 err
    p50=$(sed -n 's/.*p50_ms=\([0-9.]*\).*/\1/p' <<<"$out"); p99=$(sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p' <<<"$out")
    err=$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' <<<"$out")
  else
    msgs=$N; p50=-; p99=-; err=$(grep -ci error <<<"$out" || true)
  fi
  local secs rate cpums
  secs=$(echo "$t1 - $t0" | bc -l); rate=$(echo "$msgs / $secs" | bc -l)
  if [ "$msgs" = 0 ]; then msgs=1; echo "  $name: no message delivered: $out" >&2; fi
  if [ "$via" = 1 ]; then cpums=$(echo "($c1 - $c0) * 1000 / $TCK / $msgs" | bc -l); else cpums=0; fi
  rows+=("$(printf '%-34s %8.1f %9s %9s %7s %10s' "$name" "$rate" "$p50" "$p99" "$err" "$( [ "$via" = 1 ] && printf '%.3f' "$cpums" || echo -)")")
  echo "  done: $name" >&2
}

echo "benchmark: $N messages, concurrency $C, ${SIZE} bytes, new connection per message, key $KEYTYPE (TLS: full handshakes unless 'resumed')" >&2
run "smtp-source direct -> sink"        0 smtp-source -s "$C" -m "$N" -l "$SIZE" -f load@example.org -t sink@example.net 127.0.0.1:"$SINK"
run "smtp-source via mailgate (plain)"  1 smtp-source -s "$C" -m "$N" -l "$SIZE" -f load@example.org -t sink@example.net 127.0.0.1:"$PLAIN"
run "loadgen plain direct -> sink"      0 "$LOAD" --addr 127.0.0.1:"$SINK" --mode plain -c "$C" -n "$N" --size "$SIZE"
run "loadgen plain via mailgate"        1 "$LOAD" --addr 127.0.0.1:"$PLAIN" --mode plain -c "$C" -n "$N" --size "$SIZE"
run "loadgen STARTTLS via mailgate"     1 "$LOAD" --addr 127.0.0.1:"$STLS" --mode starttls --ca "$W/cert.pem" -c "$C" -n "$N" --size "$SIZE"
run "loadgen STARTTLS resumed via mg"   1 "$LOAD" --addr 127.0.0.1:"$STLS" --mode starttls --ca "$W/cert.pem" -c "$C" -n "$N" --size "$SIZE" --resume
run "loadgen implicit TLS via mailgate" 1 "$LOAD" --addr 127.0.0.1:"$SMTPS" --mode implicit --ca "$W/cert.pem" -c "$C" -n "$N" --size "$SIZE"
run "1 session: plain direct"           0 "$LOAD" --addr 127.0.0.1:"$SINK" --mode plain -c 1 -n 300 --size "$SIZE"
run "1 session: plain via mailgate"     1 "$LOAD" --addr 127.0.0.1:"$PLAIN" --mode plain -c 1 -n 300 --size "$SIZE"
run "1 session: STARTTLS via mailgate"  1 "$LOAD" --addr 127.0.0.1:"$STLS" --mode starttls --ca "$W/cert.pem" -c 1 -n 300 --size "$SIZE"

# idle sessions: TLS established and EHLO answered, then held
r0=$(rss)
"$LOAD" --addr 127.0.0.1:"$STLS" --mode starttls --ca "$W/cert.pem" --idle "$IDLE" --hold 6 >"$W/idle.out" 2>&1 & LP=$!
for _ in $(seq 600); do grep -q "IDLE READY" "$W/idle.out" 2>/dev/null && break; sleep 0.1; done
sleep 1; r1=$(rss); ready=$(cat "$W/idle.out")
wait "$LP" || true

echo
printf '%-34s %8s %9s %9s %7s %10s\n' case "msgs/s" "p50 ms" "p99 ms" errors "mg CPU ms/msg"
for r in "${rows[@]}"; do echo "$r"; done
echo
echo "idle STARTTLS sessions: $ready; mailgate RSS ${r0} KiB -> ${r1} KiB = $(( (r1 - r0) * 1024 / IDLE )) bytes per session ($(( (r1 - r0) * 1000 / IDLE )) KiB per 1000)"

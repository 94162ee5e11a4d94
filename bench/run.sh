#!/usr/bin/env bash
# The side-by-side benchmark (issue 7): every case direct to the backend and
# through mailgate in one run, same machine, same client (examples/loadgen.rs,
# tokio + rustls), same certificate. Backends: Postfix smtp-sink and Dovecot.
# mailgate's CPU (utime+stime from /proc/PID/stat) and RSS (/proc/PID/status)
# are read before and after each case. Each case runs REPEATS times (default 3);
# the table shows the median and the spread (min–max).
# Not part of CI (CI runs `SMOKE=1`, a few seconds). Needs root (Dovecot).
#
#   bash bench/run.sh                 # full run (< 10 min on 2 cores)
#   KEYTYPE=ec bash bench/run.sh      # ECDSA P-256 instead of RSA-2048
#   SMOKE=1 bash bench/run.sh         # seconds: tiny counts, 1 repeat
#   IDLE_ONLY=1 HOLD=10 bash bench/run.sh   # only the idle-session memory part
#   CASES='4MiB' IDLE_SETS= bash bench/run.sh # only cases whose name matches
#   MAILGATE_BIN=/path/mailgate bash bench/run.sh   # measure another mailgate binary
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then N=${N:-100}; C=${C:-10}; REPEATS=${REPEATS:-1}; IDLE_SETS=${IDLE_SETS-200}; HOLD=${HOLD:-1}; POPN=${POPN:-20}
else N=${N:-2000}; C=${C:-20}; REPEATS=${REPEATS:-3}; IDLE_SETS=${IDLE_SETS-"1000 10000"}; HOLD=${HOLD:-60}; POPN=${POPN:-300}; fi
SIZE=${SIZE:-10240}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
for t in smtp-sink dovecot openssl bc python3; do command -v "$t" >/dev/null || { echo "missing: $t (bash .ci/run installs it)" >&2; exit 1; }; done

cargo build -q --release --ignore-rust-version --bin mailgate --example loadgen
BIN=${MAILGATE_BIN:-target/release/mailgate}; LOAD=target/release/examples/loadgen   # MAILGATE_BIN: another build (bench/hardening.sh)
W=$(mktemp -d /tmp/mailgate-bench.XXXXXX); chmod 755 "$W"
. bench/lib.sh

make_cert
CA="$W/cert.pem"

# --- backends: smtp-sink (counting) and Dovecot with 10 messages of 10 KiB + one of 4 MiB
SINK=$(free_port); DOVE=$(free_port)
smtp-sink -c -u nobody -h legacy-sink -m 16384 -t 300 127.0.0.1:"$SINK" 4096 >"$W/sink.out" 2>&1 & pids+=($!)
mkdir -p "$W/run" "$W/state" "$W/home/bench/Maildir/"{new,cur,tmp} "$W/home/big/Maildir/"{new,cur,tmp}
for i in $(seq 10); do
  { printf 'From: load@example.org\nTo: bench@example.net\nSubject: bench %s\n\n' "$i"
    python3 -c 'import sys; [print("%05d" % n + " x" * 35) for n in range(140)]'; } > "$W/home/bench/Maildir/new/$((1700000000 + i)).M${i}P1.bench"
done
{ printf 'From: load@example.org\nSubject: big\n\n'; python3 -c '[print("%07d" % n + " y" * 36) for n in range(55000)]'; } > "$W/home/big/Maildir/new/1700000100.M1P1.big"
chown -R 65534:65534 "$W/home"
printf 'bench:bench:65534:65534::%s\nbig:big:65534:65534::%s\n' "$W/home/bench" "$W/home/big" > "$W/users"; chmod 644 "$W/users"
cat > "$W/dovecot.conf" <<CONF
base_dir = $W/run
state_dir = $W/state
protocols = pop3
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
log_path = $W/dovecot.log
mail_location = maildir:~/Maildir
first_valid_uid = 1
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $W/users
}
userdb {
  driver = passwd-file
  args = username_format=%u $W/users
}
service pop3-login {
  inet_listener pop3 {
    address = 127.0.0.1
    port = $DOVE
  }
  inet_listener pop3s {
    port = 0
  }
  service_count = 0
  process_min_avail = 2
}
protocol pop3 {
  mail_max_userip_connections = 10000
}
CONF
dovecot -F -c "$W/dovecot.conf" & pids+=($!)

# --- mailgate
P=(); for i in 1 2 3 4 5 6; do P+=("$(free_port)"); done
cat > "$W/mailgate.yaml" <<YAML
server: { hostname: gw.bench }
listeners:
  - { name: plain, protocol: smtp, bind: "127.0.0.1:${P[0]}", tls: none, backend: sink, max_connections: 30000 }
  - { name: mx, protocol: smtp, bind: "127.0.0.1:${P[1]}", tls: starttls, backend: sink, max_connections: 30000 }
  - { name: smtps, protocol: smtp, bind: "127.0.0.1:${P[2]}", tls: implicit, backend: sink, max_connections: 30000 }
  - { name: pop3plain, protocol: pop3, bind: "127.0.0.1:${P[3]}", tls: none, backend: dovecot, max_connections: 30000 }
  - { name: pop3, protocol: pop3, bind: "127.0.0.1:${P[4]}", tls: starttls, backend: dovecot, max_connections: 30000 }
  - { name: pop3s, protocol: pop3, bind: "127.0.0.1:${P[5]}", tls: implicit, backend: dovecot, max_connections: 30000 }
tls: { certificates: [ { cert: cert.pem, key: key.pem } ] }
backends: { sink: { address: "127.0.0.1:$SINK" }, dovecot: { address: "127.0.0.1:$DOVE" } }
YAML
MAILGATE_LOG=warn "$BIN" run --config "$W/mailgate.yaml" >"$W/mailgate.log" 2>&1 & MG=$!; pids+=($MG)
wait_port "$SINK"; wait_port "$DOVE"; for p in "${P[@]}"; do wait_port "$p"; done
TCK=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/"$MG"/stat; }
rss() { awk '/VmRSS/{print $2}' /proc/"$MG"/status; }
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p" <<<"$2"; }
med() { sort -g | awk '{a[NR]=$1} END {if (NR==0) {print "-"; exit} m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f [%.2f–%.2f]", m, a[1], a[NR]}'; }

declare -A RATE CPUMS P50 P99 ERR ACK
order=()
# case NAME VIA(0/1) LOADGEN-ARGS...: one repeat; appends to the per-case lists
case1() {
  local name=$1 via=$2; shift 2
  if [ -n "${CASES:-}" ] && ! grep -qE "$CASES" <<<"$name"; then return; fi
  [[ " ${order[*]} " == *" $name "* ]] || order+=("$name")
  local c0 c1 out ok
  c0=$(cpu); out=$("$LOAD" "$@" 2>&1 || true); c1=$(cpu)
  ok=$(field ok "$out"); ok=${ok:-0}
  RATE[$name]+="$(field msgs_per_s "$out") "; P50[$name]+="$(field p50_ms "$out") "; P99[$name]+="$(field p99_ms "$out") "
  ERR[$name]=$(( ${ERR[$name]:-0} + $(field errors "$out") ))
  ACK[$name]=$(( ${ACK[$name]:-0} + $(field acked "$out") ))
  if [ "$via" = 1 ] && [ "$ok" -gt 0 ]; then CPUMS[$name]+="$(echo "($c1 - $c0) * 1000 / $TCK / $ok" | bc -l) "; fi
  echo "  $name: $(grep RESULT <<<"$out" | cut -c1-150)" >&2
}

if [ "${IDLE_ONLY:-0}" != 1 ]; then
S=(--size "$SIZE" -c "$C" -n "$N")
echo "== SMTP: $N messages x $REPEATS, concurrency $C, $SIZE bytes, new connection per message, key $KEYTYPE" >&2
warm=$("$LOAD" --addr 127.0.0.1:"${P[1]}" --mode starttls --ca "$CA" -c 4 -n 50 2>&1 || true)   # warm-up (counted below)
for rep in $(seq "$REPEATS"); do
  case1 "smtp plain direct->sink"      0 --addr 127.0.0.1:"$SINK" --mode plain "${S[@]}"
  case1 "smtp plain via mailgate"      1 --addr 127.0.0.1:"${P[0]}" --mode plain "${S[@]}"
  case1 "smtp STARTTLS via mailgate"   1 --addr 127.0.0.1:"${P[1]}" --mode starttls --ca "$CA" "${S[@]}"
  case1 "smtp STARTTLS resumed via mg" 1 --addr 127.0.0.1:"${P[1]}" --mode starttls --ca "$CA" --resume "${S[@]}"
  case1 "smtp implicit TLS via mg"     1 --addr 127.0.0.1:"${P[2]}" --mode implicit --ca "$CA" "${S[@]}"
  case1 "smtp implicit resumed via mg" 1 --addr 127.0.0.1:"${P[2]}" --mode implicit --ca "$CA" --resume "${S[@]}"
  case1 "c=1 smtp plain direct"        0 --addr 127.0.0.1:"$SINK" --mode plain --size "$SIZE" -c 1 -n $((N / 10))
  case1 "c=1 smtp plain via mailgate"  1 --addr 127.0.0.1:"${P[0]}" --mode plain --size "$SIZE" -c 1 -n $((N / 10))
  case1 "c=1 smtp STARTTLS via mg"     1 --addr 127.0.0.1:"${P[1]}" --mode starttls --ca "$CA" --size "$SIZE" -c 1 -n $((N / 10))
done
echo "== POP3: $POPN sessions x $REPEATS (login, 10 x RETR 10 KiB, QUIT), concurrency 4" >&2
PO=(--proto pop3 --user bench --pass bench --per-conn 10 -c 4 -n "$POPN")
for rep in $(seq "$REPEATS"); do
  case1 "pop3 plain direct->dovecot"   0 --addr 127.0.0.1:"$DOVE" --mode plain "${PO[@]}"
  case1 "pop3 plain via mailgate"      1 --addr 127.0.0.1:"${P[3]}" --mode plain "${PO[@]}"
  case1 "pop3 STLS via mailgate"       1 --addr 127.0.0.1:"${P[4]}" --mode starttls --ca "$CA" "${PO[@]}"
  case1 "pop3s via mailgate"           1 --addr 127.0.0.1:"${P[5]}" --mode implicit --ca "$CA" "${PO[@]}"
  case1 "pop3 4MiB RETR direct"        0 --addr 127.0.0.1:"$DOVE" --mode plain --proto pop3 --user big --pass big --per-conn 5 -c 1 -n 4
  case1 "pop3 4MiB RETR via mailgate"  1 --addr 127.0.0.1:"${P[3]}" --mode plain --proto pop3 --user big --pass big --per-conn 5 -c 1 -n 4
done

# the sink counts what it accepted: it must equal what mailgate acknowledged
sleep 1
sink_count=$(tr '\r' '\n' < "$W/sink.out" | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -1)
acked=$(field acked "$warm"); acked=${acked:-0}; for k in "${!ACK[@]}"; do [[ $k == smtp* || $k == c=1\ smtp* ]] && acked=$((acked + ACK[$k])); done

printf '\n%-30s %24s %22s %22s %7s %24s\n' case "msgs|sessions/s" "p50 ms" "p99 ms" errors "mailgate CPU ms/unit"
for n in "${order[@]}"; do
  printf '%-30s %24s %22s %22s %7s %24s\n' "$n" "$(tr ' ' '\n' <<<"${RATE[$n]}" | grep . | med)" \
    "$(tr ' ' '\n' <<<"${P50[$n]}" | grep . | med)" "$(tr ' ' '\n' <<<"${P99[$n]}" | grep . | med)" "${ERR[$n]}" \
    "$(tr ' ' '\n' <<<"${CPUMS[$n]:-}" | grep . | med)"
done
echo "(median [min–max] of $REPEATS; CPU = mailgate utime+stime per message or session; TLS = full handshakes unless 'resumed')"
echo "smtp-sink counted $sink_count messages; SMTP messages acknowledged (250) to the load generator: $acked$( [ "$sink_count" = "$acked" ] && echo ' (equal)' || echo ' (MISMATCH)')"
fi

# --- idle sessions: STARTTLS done, EHLO answered, then held
for IDLE in $IDLE_SETS; do
  r0=$(rss); fd0=$(ls /proc/"$MG"/fd | wc -l)
  "$LOAD" --addr 127.0.0.1:"${P[1]}" --mode starttls --ca "$CA" --idle "$IDLE" --hold "$HOLD" >"$W/idle.out" 2>&1 & LP=$!
  for _ in $(seq 3000); do grep -q "IDLE READY" "$W/idle.out" 2>/dev/null && break; sleep 0.1; done
  sleep 1; r1=$(rss)
  wait "$LP" || true
  sleep 2; r2=$(rss); fd2=$(ls /proc/"$MG"/fd | wc -l)
  echo "idle STARTTLS sessions: $(grep IDLE "$W/idle.out" || echo none) held ${HOLD}s: RSS ${r0} KiB -> ${r1} KiB = $(( (r1 - r0) * 1024 / IDLE )) bytes/session; after close ${r2} KiB, fds ${fd0} -> ${fd2}"
done
echo "mailgate peak RSS: $(awk '/VmHWM/{print $2, $3}' /proc/"$MG"/status)"

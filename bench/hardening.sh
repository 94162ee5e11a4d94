#!/usr/bin/env bash
# The hardening figures (issue 11 acceptance 4, issue 19 acceptance 2), BEFORE and
# AFTER binaries side by side in one run: each case starts a fresh mailgate of each
# binary with the same config (only fields that exist in both: the AFTER binary's
# defaults supply its new bounds), prints one line per binary and the ratio
# AFTER/BEFORE of the case's main figure. Loopback only: a counting DNS server
# (examples/bench_dns.rs), Postfix smtp-sink as backend, Python clients
# (bench/hardening.py). Every client read has a timeout; every count is bounded.
#
#   BEFORE=/tmp/before/mailgate AFTER=target/release/mailgate bash bench/hardening.sh
#   SMOKE=1 ...            # small counts: cases 1-5 in under a minute (full: about 3 minutes)
#   CASES='dkim|spf' ...   # only cases whose name matches: dkim rss spf dns greeting run
#
# Cases: 1 dkim     CPU ms per DKIM-flood message (1,500 signatures, 300-entry h=)
#        2 rss      peak RSS for 100 x 20 MB messages in parallel, accepted / refused
#        3 spf      RSS before / after 300 MAILs whose SPF record is ~60 KB (TCP)
#        4 dns      DNS queries: 200 MAIL/RSET with void-lookup SPF; one 2,000-signature message
#        5 greeting time to greeting with 300 connections on the metrics port, ulimit -n 256
#        6 run      bench/run.sh's STARTTLS and POP3 4 MiB RETR cases (needs Dovecot, root); ~2 min per binary
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
BEFORE=${BEFORE:?BEFORE=path to the mailgate binary before}; AFTER=${AFTER:?AFTER=path to the mailgate binary after}
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then
  DKIM_MSGS=${DKIM_MSGS:-1}; DKIM_SIGS=${DKIM_SIGS:-150}; DKIM_H=${DKIM_H:-30}
  BIG_N=${BIG_N:-10}; BIG_SIZE=${BIG_SIZE:-2000000}; SPF_N=${SPF_N:-20}; VOID_N=${VOID_N:-20}
  SIGS2K=${SIGS2K:-200}; HOLD_N=${HOLD_N:-300}
else
  DKIM_MSGS=${DKIM_MSGS:-3}; DKIM_SIGS=${DKIM_SIGS:-1500}; DKIM_H=${DKIM_H:-300}
  BIG_N=${BIG_N:-100}; BIG_SIZE=${BIG_SIZE:-20000000}; SPF_N=${SPF_N:-300}; VOID_N=${VOID_N:-200}
  SIGS2K=${SIGS2K:-2000}; HOLD_N=${HOLD_N:-300}
fi
TIMEOUT=${TIMEOUT:-60}   # per message / per client read
CASES=${CASES:-dkim|rss|spf|dns|greeting|run}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
for t in smtp-sink openssl python3 bc; do command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }; done
for b in "$BEFORE" "$AFTER"; do [ -x "$b" ] || { echo "not an executable: $b" >&2; exit 1; }; done
BEFORE=$(realpath "$BEFORE"); AFTER=$(realpath "$AFTER")

cargo build -q --release --ignore-rust-version --example bench_dns
W=$(mktemp -d /tmp/mailgate-hard.XXXXXX); chmod 755 "$W"
. bench/lib.sh
PY=bench/hardening.py
T0=$(date +%s)

# --- the DNS server: a real RSA-2048 public key for every DKIM selector
openssl genrsa 2048 2>/dev/null | openssl rsa -pubout -outform DER 2>/dev/null | base64 -w0 > "$W/dkim.b64"
target/release/examples/bench_dns --key-file "$W/dkim.b64" --count-file "$W/dns.count" --port-file "$W/dns.port" \
  --big "$SPF_N" --void "$VOID_N" --selectors "$SIGS2K" --lifetime 7200 >"$W/dns.log" 2>&1 & pids+=($!)
for _ in $(seq 100); do [ -s "$W/dns.port" ] && break; sleep 0.1; done
DNS=$(cat "$W/dns.port")
dns_count() { sleep 0.3; cat "$W/dns.count"; }

SINK=$(free_port)
smtp-sink -u nobody -h legacy-sink -m 16384 -t 300 127.0.0.1:"$SINK" 4096 >/dev/null 2>&1 & pids+=($!)
wait_port "$SINK"

TCK=$(getconf CLK_TCK)
cpu_ms() { awk -v t="$TCK" '{printf "%d", ($14+$15) * 1000 / t}' /proc/"$MG"/stat; }   # clock-tick resolution
kib() { awk -v k="$1" '$1 == k":" {print $2}' /proc/"$MG"/status; }
field() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }
declare -A BIN=([before]=$BEFORE [after]=$AFTER)

# start_mg BIN YAML [FD_LIMIT]: a fresh mailgate (MG) on the config, listener port $LP up
start_mg() {
  local lim=${3:-}
  if [ -n "$lim" ]; then
    MAILGATE_LOG=warn sh -c 'ulimit -n "$1"; shift; exec "$@"' sh "$lim" "$1" run --config "$2" >"$W/mg.log" 2>&1 &
  else
    MAILGATE_LOG=warn "$1" run --config "$2" >"$W/mg.log" 2>&1 &
  fi
  MG=$!; pids+=($MG)
  wait_port "$LP"
}
stop_mg() { kill "$MG" 2>/dev/null || true; wait "$MG" 2>/dev/null || true; }

# config POLICY-LINES [LISTENER-FIELDS] [TOP-LEVEL-LINES]: $W/mg.yaml with one SMTP
# listener on a new port $LP (no policy when POLICY-LINES is empty)
config() {
  LP=$(free_port)
  local pol=""
  [ -n "$1" ] && pol=", policy: p"
  cat > "$W/mg.yaml" <<YAML
server: { hostname: gw.bench }
dns: { nameservers: ["127.0.0.1:$DNS"], timeout: 5s, attempts: 1 }
listeners:
  - { name: mx, protocol: smtp, bind: "127.0.0.1:$LP", tls: none, backend: sink, max_connections: 5000$pol${2:-} }
backends: { sink: { address: "127.0.0.1:$SINK" } }
${3:-}
YAML
  [ -z "$1" ] || printf 'policies:\n  p:\n    authserv_id: gw.bench\n%s\n' "$1" >> "$W/mg.yaml"
}

rows=()
row() { rows+=("$(printf '%-9s %-7s %s' "$1" "$2" "$3")"); echo "  $1 $2: $3" >&2; }
ratio() { # NAME BEFORE-VALUE AFTER-VALUE UNIT
  local r=-
  if [[ $2 =~ ^[0-9.]+$ && $3 =~ ^[0-9.]+$ ]] && [ "$(echo "$2 > 0" | bc)" = 1 ]; then r=$(printf '%.3f' "$(echo "$3 / $2" | bc -l)"); fi
  rows+=("$(printf '%-9s %-7s after/before = %s (%s: %s -> %s)' "$1" ratio "$r" "$4" "$2" "$3")")
}
want() { grep -qE "$CASES" <<<"$1"; }

# --- 1. CPU per DKIM-flood message
if want dkim; then
  echo "== 1 dkim: $DKIM_MSGS messages x $DKIM_SIGS DKIM-Signature fields, h= of $DKIM_H entries, key answered" >&2
  config "    dkim: { fail: tag }"
  declare -A V=()
  for b in before after; do bin=${BIN[$b]}
    start_mg "$bin" "$W/mg.yaml"
    c0=$(cpu_ms); out=$(python3 "$PY" dkim "$LP" "$DKIM_MSGS" "$DKIM_SIGS" "$DKIM_H" "$TIMEOUT"); c1=$(cpu_ms)
    v=$(printf '%.0f' "$(echo "($c1 - $c0) / $DKIM_MSGS" | bc -l)"); V[$b]=$v
    row dkim $b "$v CPU ms/message; replies $(field codes "$out"); $(field bytes "$out") bytes each; client $(field secs "$out") s"
    stop_mg
  done
  ratio dkim "${V[before]}" "${V[after]}" "CPU ms/message"
fi

# --- 2. peak RSS for parallel large messages
if want rss; then
  echo "== 2 rss: $BIG_N x $BIG_SIZE bytes in parallel, max_message_size 25MiB" >&2
  config "" ", max_message_size: 25MiB"
  declare -A V=()
  for b in before after; do bin=${BIN[$b]}
    start_mg "$bin" "$W/mg.yaml"
    r0=$(kib VmRSS); out=$(python3 "$PY" big "$LP" "$BIG_N" "$BIG_SIZE" "$TIMEOUT"); hwm=$(kib VmHWM)
    V[$b]=$hwm
    row rss $b "peak RSS $((hwm / 1024)) MiB (start $((r0 / 1024)) MiB); accepted $(field accepted "$out"), refused $(field refused "$out") (replies $(field codes "$out")); $(field secs "$out") s"
    stop_mg
  done
  ratio rss "${V[before]}" "${V[after]}" "peak RSS KiB"
fi

# --- 3. RSS after large-SPF MAILs
if want spf; then
  echo "== 3 spf: one session, $SPF_N x MAIL FROM:<u@eN.big.example> / RSET, ~60 KB SPF record each (TCP)" >&2
  config "    spf: { fail: reject }"
  declare -A V=()
  for b in before after; do bin=${BIN[$b]}
    start_mg "$bin" "$W/mg.yaml"
    sleep 0.5; r0=$(kib VmRSS); q0=$(dns_count)
    out=$(python3 "$PY" mails "$LP" "e%d.big.example" "$SPF_N" "$TIMEOUT"); r1=$(kib VmRSS); q1=$(dns_count)
    n=$(field mails "$out"); per=$(( (r1 - r0) / (n > 0 ? n : 1) ))
    V[$b]=$r1
    row spf $b "RSS $((r0 / 1024)) MiB -> $((r1 / 1024)) MiB after $n MAILs = $per KiB/MAIL; replies $(field codes "$out"); DNS queries $((q1 - q0)); $(field secs "$out") s"
    stop_mg
  done
  ratio spf "${V[before]}" "${V[after]}" "RSS KiB after"
fi

# --- 4. DNS queries: void-lookup SPF, many DKIM signatures
if want dns; then
  echo "== 4 dns: (a) $VOID_N x MAIL/RSET, SPF with 10 void mx: terms; (b) one message with $SIGS2K signatures, distinct selectors" >&2
  config "    spf: { fail: reject }
    dkim: { fail: tag }"
  declare -A VA=() VB=()
  for b in before after; do bin=${BIN[$b]}
    start_mg "$bin" "$W/mg.yaml"
    q0=$(dns_count); out=$(python3 "$PY" mails "$LP" "v%d.void.example" "$VOID_N" "$TIMEOUT"); q1=$(dns_count)
    VA[$b]=$((q1 - q0))
    row dns-void $b "$((q1 - q0)) DNS queries for $(field mails "$out") MAILs; replies $(field codes "$out"); $(field secs "$out") s"
    q0=$(dns_count); out=$(python3 "$PY" dkim "$LP" 1 "$SIGS2K" 1 "$TIMEOUT" distinct); q1=$(dns_count)
    VB[$b]=$((q1 - q0))
    row dns-dkim $b "$((q1 - q0)) DNS queries for one message of $SIGS2K signatures; reply $(field codes "$out"); $(field secs "$out") s"
    stop_mg
  done
  ratio dns-void "${VA[before]}" "${VA[after]}" "DNS queries"
  ratio dns-dkim "${VB[before]}" "${VB[after]}" "DNS queries"
fi

# --- 5. greeting while the metrics port is flooded, 256 fds
if want greeting; then
  echo "== 5 greeting: $HOLD_N idle connections on the metrics port, mailgate under ulimit -n 256" >&2
  MP=$(free_port)
  config "" "" "metrics: { bind: \"127.0.0.1:$MP\" }"
  declare -A V=()
  for b in before after; do bin=${BIN[$b]}
    start_mg "$bin" "$W/mg.yaml" 256
    wait_port "$MP"
    python3 "$PY" hold "$MP" "$HOLD_N" 30 >"$W/hold.out" 2>&1 & HP=$!; pids+=($HP)
    for _ in $(seq 300); do grep -q "HOLD READY" "$W/hold.out" && break; sleep 0.1; done
    sleep 1
    out=$(python3 "$PY" greeting "$LP" 10)
    s=$(field secs "$out"); V[$b]=$s
    if [ "$(field code "$out")" = 220 ]; then g="greeting after $s s"; else g="no greeting within 10 s"; fi
    fds=$(ls /proc/"$MG"/fd | wc -l)
    kill "$HP" 2>/dev/null || true; wait "$HP" 2>/dev/null || true
    emfile=$(grep -c 'Too many open files' "$W/mg.log" || true)
    row greeting $b "$g (metrics connections: $(grep -o 'held=[0-9]*' "$W/hold.out"), $(grep -o 'reopened=[0-9]*' "$W/hold.out"); mailgate fds $fds; EMFILE logged $emfile times)"
    stop_mg
  done
  ratio greeting "${V[before]}" "${V[after]}" "seconds to greeting"
fi

# --- 6. bench/run.sh's STARTTLS and POP3 4 MiB cases, once per binary
if want run; then
  echo "== 6 run: bench/run.sh cases 'smtp STARTTLS via mailgate' and 'pop3 4MiB RETR' per binary" >&2
  declare -A V=() D=()
  for b in before after; do bin=${BIN[$b]}
    out=$(MAILGATE_BIN="$bin" CASES='smtp STARTTLS via mailgate|4MiB RETR' IDLE_SETS= SMOKE="$SMOKE" bash bench/run.sh 2>"$W/run.err")
    st=$(grep '^smtp STARTTLS via mailgate' <<<"$out" | cut -c31- | awk '{print $8}')
    pd=$(grep '^pop3 4MiB RETR direct' <<<"$out" | cut -c31- | awk '{print $3}')
    pv=$(grep '^pop3 4MiB RETR via mailgate' <<<"$out" | cut -c31- | awk '{print $3}')
    V[$b]=$st; D[$b]=$(printf '%.3f' "$(echo "${pv:-0} / ${pd:-1}" | bc -l)")
    row starttls $b "${st:-?} CPU ms/message (median)"
    row pop3-4MiB $b "p50 ms per session (5 x RETR 4 MiB): direct ${pd:-?}, via mailgate ${pv:-?} = ${D[$b]} x direct"
  done
  ratio starttls "${V[before]}" "${V[after]}" "CPU ms/message"
  ratio pop3-4MiB "${D[before]}" "${D[after]}" "via/direct"
fi

echo
echo "before: $BEFORE"
echo "after:  $AFTER"
printf '%-9s %-7s %s\n' case binary figures
for r in "${rows[@]}"; do echo "$r"; done
echo "(SMOKE=$SMOKE; $(( $(date +%s) - T0 )) s)"

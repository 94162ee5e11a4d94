#!/usr/bin/env bash
# The side-by-side benchmark (issues 7 and 17): every case direct to the backend
# and through mailgate in one run, same machine, same clients, same certificate.
# Backends: Postfix smtp-sink and Dovecot. Clients: examples/loadgen.rs (tokio +
# rustls) and bench/smtp_load.py (Python smtplib, no session resumption,
# certificate verified). The anchors, when installed, take the same Python
# client in the same run: nginx mail (STARTTLS, SMTP proxy to the same sink,
# auth_http answered by that nginx itself) and haproxy (implicit TLS, TCP mode
# to the same sink); a missing one is skipped with a message. The CPU of a
# proxy (utime+stime of its process, all threads, from /proc/PID/stat) and
# mailgate's RSS (/proc/PID/status) are read before and after each case. Each
# case runs REPEATS times (default 3); the table shows the median and the
# spread (min–max), then the ratios mailgate/anchor of the medians. After every
# SMTP case the sink's count must have grown by exactly the messages the
# client saw acknowledged; any mismatch is printed and the script exits 1.
# Not part of CI. Needs root (Dovecot).
#
#   bash bench/run.sh                 # full run (< 10 min on 2 cores)
#   KEYTYPE=ec bash bench/run.sh      # ECDSA P-256 instead of RSA-2048
#   SMOKE=1 bash bench/run.sh         # seconds: tiny counts, 1 repeat
#   IDLE_ONLY=1 HOLD=10 bash bench/run.sh   # only the idle-session memory part
#   CASES='4MiB' IDLE_SETS= bash bench/run.sh # only cases whose name matches
#   CASES='^py' IDLE_SETS= bash bench/run.sh  # only the Python rows (mailgate, nginx, haproxy)
#   MAILGATE_BIN=/path/mailgate bash bench/run.sh   # measure another mailgate binary
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = 1 ]; then N=${N:-100}; C=${C:-10}; REPEATS=${REPEATS:-1}; IDLE_SETS=${IDLE_SETS-200}; HOLD=${HOLD:-1}; POPN=${POPN:-20}; PYN=${PYN:-100}; BIGN=${BIGN:-2}
else N=${N:-2000}; C=${C:-20}; REPEATS=${REPEATS:-3}; IDLE_SETS=${IDLE_SETS-"1000 10000"}; HOLD=${HOLD:-60}; POPN=${POPN:-300}; PYN=${PYN:-1000}; BIGN=${BIGN:-60}; fi
SIZE=${SIZE:-10240}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# a held session costs mailgate two descriptors (client and backend): a set
# larger than the descriptor limit allows is cut down to fit, and says so
IDLE_MAX=$(( ($(ulimit -n) - 200) / 2 ))
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
P=(); for i in 1 2 3 4 5 6 7; do P+=("$(free_port)"); done
cat > "$W/mailgate.yaml" <<YAML
server: { hostname: gw.bench }
listeners:
  - { name: plain, protocol: smtp, bind: "127.0.0.1:${P[0]}", tls: none, backend: sink, max_connections: 30000 }
  - { name: mx, protocol: smtp, bind: "127.0.0.1:${P[1]}", tls: starttls, backend: sink, max_connections: 30000 }
  - { name: smtps, protocol: smtp, bind: "127.0.0.1:${P[2]}", tls: implicit, backend: sink, max_connections: 30000 }
  - { name: pop3plain, protocol: pop3, bind: "127.0.0.1:${P[3]}", tls: none, backend: dovecot, max_connections: 30000 }
  - { name: pop3, protocol: pop3, bind: "127.0.0.1:${P[4]}", tls: starttls, backend: dovecot, max_connections: 30000 }
  - { name: pop3s, protocol: pop3, bind: "127.0.0.1:${P[5]}", tls: implicit, backend: dovecot, max_connections: 30000 }
  - { name: mx-fresh, protocol: smtp, bind: "127.0.0.1:${P[6]}", tls: starttls, backend: sink-fresh, max_connections: 30000 }
tls: { certificates: [ { cert: cert.pem, key: key.pem } ] }
backends:
  sink: { address: "127.0.0.1:$SINK", reuse: { max_idle: 64 } }
  sink-fresh: { address: "127.0.0.1:$SINK" }
  dovecot: { address: "127.0.0.1:$DOVE" }
YAML
MAILGATE_LOG=warn "$BIN" run --config "$W/mailgate.yaml" >"$W/mailgate.log" 2>&1 & MG=$!; pids+=($MG)

# --- the anchors, same certificate, same sink: nginx mail (STARTTLS) and haproxy (implicit TLS)
NGX_MOD=/usr/lib/nginx/modules/ngx_mail_module.so
NGX=0; HAP=0
if ! command -v nginx >/dev/null; then echo "nginx not installed: its rows are skipped" >&2
elif [ ! -f "$NGX_MOD" ]; then echo "nginx mail module ($NGX_MOD, libnginx-mod-mail) not installed: nginx rows skipped" >&2
else
  NGX_SMTP=$(free_port); NGX_AUTH=$(free_port); mkdir -p "$W/nginx"
  # one process (no master): its CPU is all of nginx's; auth_http is answered by
  # this nginx itself (the cost of nginx mail's one backend lookup per session)
  cat > "$W/nginx.conf" <<CONF
load_module $NGX_MOD;
daemon off;
master_process off;
pid $W/nginx/nginx.pid;
error_log $W/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $W/nginx/body; proxy_temp_path $W/nginx/proxy; fastcgi_temp_path $W/nginx/fcgi;
  uwsgi_temp_path $W/nginx/uwsgi; scgi_temp_path $W/nginx/scgi;
  server {
    listen 127.0.0.1:$NGX_AUTH;
    location = /auth { add_header Auth-Status OK; add_header Auth-Server 127.0.0.1; add_header Auth-Port $SINK; return 204; }
  }
}
mail {
  server_name gw.bench;
  auth_http 127.0.0.1:$NGX_AUTH/auth;
  proxy on;
  xclient off;
  smtp_auth none;
  ssl_certificate $W/cert.pem;
  ssl_certificate_key $W/key.pem;
  server { listen 127.0.0.1:$NGX_SMTP; protocol smtp; starttls on; }
}
CONF
  nginx -p "$W/nginx" -c "$W/nginx.conf" >"$W/nginx/out.log" 2>&1 & NGXPID=$!; pids+=($NGXPID); NGX=1
fi
if ! command -v haproxy >/dev/null; then echo "haproxy not installed: its rows are skipped" >&2
else
  HAP_SMTPS=$(free_port); cat "$W/cert.pem" "$W/key.pem" > "$W/haproxy.pem"
  cat > "$W/haproxy.cfg" <<CONF
global
  maxconn 4000
defaults
  mode tcp
  timeout connect 10s
  timeout client 300s
  timeout server 300s
frontend smtps
  bind 127.0.0.1:$HAP_SMTPS ssl crt $W/haproxy.pem
  default_backend sink
backend sink
  server sink 127.0.0.1:$SINK
CONF
  haproxy -db -f "$W/haproxy.cfg" >"$W/haproxy.log" 2>&1 & HAPPID=$!; pids+=($HAPPID); HAP=1
fi
wait_port "$SINK"; wait_port "$DOVE"; for p in "${P[@]}"; do wait_port "$p"; done
if [ "$NGX" = 1 ]; then wait_port "$NGX_SMTP"; fi
if [ "$HAP" = 1 ]; then wait_port "$HAP_SMTPS"; fi
TCK=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/"${1:-$MG}"/stat; }
rss() { awk '/VmRSS/{print $2}' /proc/"$MG"/status; }
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p" <<<"$2"; }
med() { sort -g | awk '{a[NR]=$1} END {if (NR==0) {print "-"; exit} m=(NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2; printf "%.2f [%.2f–%.2f]", m, a[1], a[NR]}'; }

declare -A RATE CPUMS P50 P99 ERR ACK
order=()
MISMATCH=0
SMTP_ACKED=0   # messages acknowledged to the SMTP clients (POP3 cases count sessions)
# the sink's count of accepted messages (smtp-sink -c writes it after each one)
sink_count() { tr '\r' '\n' < "$W/sink.out" | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -1; }
# sink_check NAME BEFORE ACKED: the sink grew by exactly ACKED (waits up to 3 s for it)
sink_check() {
  local now
  for _ in $(seq 30); do now=$(sink_count); now=${now:-0}; [ $((now - $2)) = "$3" ] && return 0; sleep 0.1; done
  echo "  MISMATCH $1: the sink counted $((now - $2)) messages, the client saw $3 acknowledged" >&2
  MISMATCH=$((MISMATCH + 1))
}
# run_case NAME PID(0: no proxy) SMTP(0/1) CMD...: one repeat; appends to the
# per-case lists. PID is the process whose CPU is charged to the case.
run_case() {
  local name=$1 pid=$2 smtp=$3; shift 3
  if [ -n "${CASES:-}" ] && ! grep -qE "$CASES" <<<"$name"; then return; fi
  [[ " ${order[*]} " == *" $name "* ]] || order+=("$name")
  local c0=0 c1=0 out ok acked s0
  s0=$(sink_count); s0=${s0:-0}
  if [ "$pid" != 0 ]; then c0=$(cpu "$pid"); fi
  out=$("$@" 2>&1 || true)
  if [ "$pid" != 0 ]; then c1=$(cpu "$pid"); fi
  ok=$(field ok "$out"); ok=${ok:-0}; acked=$(field acked "$out"); acked=${acked:-0}
  RATE[$name]+="$(field msgs_per_s "$out") "; P50[$name]+="$(field p50_ms "$out") "; P99[$name]+="$(field p99_ms "$out") "
  ERR[$name]=$(( ${ERR[$name]:-0} + $(field errors "$out") ))
  ACK[$name]=$(( ${ACK[$name]:-0} + acked ))
  if [ "$pid" != 0 ] && [ "$ok" -gt 0 ]; then CPUMS[$name]+="$(echo "($c1 - $c0) * 1000 / $TCK / $ok" | bc -l) "; fi
  if [ "$smtp" = 1 ]; then sink_check "$name" "$s0" "$acked"; SMTP_ACKED=$((SMTP_ACKED + acked)); fi
  echo "  $name: $(grep RESULT <<<"$out" | cut -c1-150)" >&2
}
# case1 NAME VIA(0/1) LOADGEN-ARGS...: a loadgen case, mailgate's CPU when VIA
case1() {
  local name=$1 via=$2; shift 2
  local smtp=1; [[ " $* " == *" --proto pop3 "* ]] && smtp=0
  run_case "$name" "$( [ "$via" = 1 ] && echo "$MG" || echo 0)" "$smtp" "$LOAD" "$@"
}
# py NAME PID SMTP_LOAD-ARGS...: a bench/smtp_load.py case, PID's CPU
py() { local name=$1 pid=$2; shift 2; run_case "$name" "$pid" 1 python3 bench/smtp_load.py "$@"; }
# median_of "LIST": the median of space-separated numbers; median NAME and
# rate_median NAME: of a case's CPU figures and of its rates
median_of() { tr ' ' '\n' <<<"$1" | { grep . || true; } | sort -g | awk '{a[NR]=$1} END {if (NR) print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }
median() { median_of "${CPUMS[$1]:-}"; }
rate_median() { median_of "${RATE[$1]:-}"; }

if [ "${IDLE_ONLY:-0}" != 1 ]; then
S=(--size "$SIZE" -c "$C" -n "$N")
echo "== SMTP: $N messages x $REPEATS, concurrency $C, $SIZE bytes, new connection per message, key $KEYTYPE" >&2
s0=$(sink_count); s0=${s0:-0}
warm=$("$LOAD" --addr 127.0.0.1:"${P[1]}" --mode starttls --ca "$CA" -c 4 -n 50 2>&1 || true)   # warm-up (counted below)
wa=$(field acked "$warm"); sink_check warm-up "$s0" "${wa:-0}"
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
echo "== SMTP, Python smtplib client: $PYN messages x $REPEATS, concurrency $C, $SIZE bytes, new connection and full handshake per message" >&2
PS=(--size "$SIZE" -c "$C" -n "$PYN" --ca "$CA")
for rep in $(seq "$REPEATS"); do
  py "py plain via mailgate"            "$MG" --port "${P[0]}" --mode plain "${PS[@]}"
  py "py STARTTLS via mailgate"         "$MG" --port "${P[1]}" --mode starttls "${PS[@]}"
  py "py STARTTLS via mg, no reuse"     "$MG" --port "${P[6]}" --mode starttls "${PS[@]}"
  if [ "$NGX" = 1 ]; then py "py STARTTLS via nginx mail" "$NGXPID" --port "$NGX_SMTP" --mode starttls "${PS[@]}"; fi
  py "py implicit TLS via mailgate"     "$MG" --port "${P[2]}" --mode implicit "${PS[@]}"
  if [ "$HAP" = 1 ]; then py "py implicit TLS via haproxy" "$HAPPID" --port "$HAP_SMTPS" --mode implicit "${PS[@]}"; fi
done
echo "== POP3: $POPN sessions x $REPEATS (login, 10 x RETR 10 KiB, QUIT), concurrency 4" >&2
PO=(--proto pop3 --user bench --pass bench --per-conn 10 -c 4 -n "$POPN")
for rep in $(seq "$REPEATS"); do
  case1 "pop3 plain direct->dovecot"   0 --addr 127.0.0.1:"$DOVE" --mode plain "${PO[@]}"
  case1 "pop3 plain via mailgate"      1 --addr 127.0.0.1:"${P[3]}" --mode plain "${PO[@]}"
  case1 "pop3 STLS via mailgate"       1 --addr 127.0.0.1:"${P[4]}" --mode starttls --ca "$CA" "${PO[@]}"
  case1 "pop3s via mailgate"           1 --addr 127.0.0.1:"${P[5]}" --mode implicit --ca "$CA" "${PO[@]}"
  case1 "pop3 4MiB RETR direct"        0 --addr 127.0.0.1:"$DOVE" --mode plain --proto pop3 --user big --pass big --per-conn 5 -c 1 -n "$BIGN"
  case1 "pop3 4MiB RETR via mailgate"  1 --addr 127.0.0.1:"${P[3]}" --mode plain --proto pop3 --user big --pass big --per-conn 5 -c 1 -n "$BIGN"
done

# the sink counts what it accepted: it must equal what the clients saw acknowledged
sleep 1
sink_total=$(sink_count)
acked=$(field acked "$warm"); acked=$(( ${acked:-0} + SMTP_ACKED ))

printf '\n%-30s %24s %22s %22s %7s %24s\n' case "msgs|sessions/s" "p50 ms" "p99 ms" errors "proxy CPU ms/unit"
for n in "${order[@]}"; do
  printf '%-30s %24s %22s %22s %7s %24s\n' "$n" "$(tr ' ' '\n' <<<"${RATE[$n]}" | grep . | med)" \
    "$(tr ' ' '\n' <<<"${P50[$n]}" | grep . | med)" "$(tr ' ' '\n' <<<"${P99[$n]}" | grep . | med)" "${ERR[$n]}" \
    "$(tr ' ' '\n' <<<"${CPUMS[$n]:-}" | grep . | med)"
done
echo "(median [min–max] of $REPEATS; CPU = utime+stime of the proxy in the row's name (mailgate, nginx, haproxy) per message or session; TLS = full handshakes unless 'resumed')"
# ratio NAME A B: median CPU of case A / case B
ratio() {
  local a b; a=$(median "$2"); b=$(median "$3")
  if [ -n "$a" ] && [ -n "$b" ]; then printf '%-44s %.2f / %.2f ms = %.2fx\n' "$1" "$a" "$b" "$(echo "$a / $b" | bc -l)"
  else echo "$1: not measured (a row is missing)"; fi
}
ratio "STARTTLS CPU/msg, mailgate / nginx mail:" "py STARTTLS via mailgate" "py STARTTLS via nginx mail"
ratio "STARTTLS CPU/msg, mailgate no reuse / nginx:" "py STARTTLS via mg, no reuse" "py STARTTLS via nginx mail"
ratio "implicit TLS CPU/msg, mailgate / haproxy:" "py implicit TLS via mailgate" "py implicit TLS via haproxy"
a=$(rate_median "pop3 4MiB RETR via mailgate"); b=$(rate_median "pop3 4MiB RETR direct")
if [ -n "$a" ] && [ -n "$b" ]; then printf '%-44s %.2f / %.2f sessions/s = %.3fx\n' "POP3 4 MiB RETR rate, mailgate / direct:" "$a" "$b" "$(echo "$a / $b" | bc -l)"; fi
# the same, repeat by repeat (each via run right after its direct run): the
# machine's drift over a run cancels out of each pair
pairs=$(paste -d/ <(tr ' ' '\n' <<<"${RATE[pop3 4MiB RETR via mailgate]:-}" | grep .) <(tr ' ' '\n' <<<"${RATE[pop3 4MiB RETR direct]:-}" | grep .) | bc -l | tr '\n' ' ')
if [ -n "${pairs// /}" ]; then printf '%-44s %.3fx (median of %s per-repeat ratios: %s)\n' "POP3 4 MiB RETR rate, paired:" "$(median_of "$pairs")" "$(wc -w <<<"$pairs")" "$(for r in $pairs; do printf '%.3f ' "$r"; done)"; fi
echo "smtp-sink counted ${sink_total:-0} messages; SMTP messages acknowledged (250) to the clients: $acked$( [ "${sink_total:-0}" = "$acked" ] && echo ' (equal)' || { MISMATCH=$((MISMATCH + 1)); echo ' (MISMATCH)'; })"
fi

# --- idle sessions: STARTTLS done, EHLO answered, MAIL and RCPT answered (so
# mailgate holds a backend connection for each), then held
for IDLE in $IDLE_SETS; do
  if [ "$IDLE" -gt "$IDLE_MAX" ]; then
    echo "idle set $IDLE needs $((2 * IDLE)) descriptors in mailgate; the limit here is $(ulimit -n) (ulimit -Hn): measuring $IDLE_MAX" >&2
    IDLE=$IDLE_MAX
  fi
  r0=$(rss); fd0=$(ls /proc/"$MG"/fd | wc -l)
  "$LOAD" --addr 127.0.0.1:"${P[1]}" --mode starttls --ca "$CA" --idle "$IDLE" --idle-rcpt --hold "$HOLD" >"$W/idle.out" 2>&1 & LP=$!
  for _ in $(seq 3000); do grep -q "IDLE READY" "$W/idle.out" 2>/dev/null && break; sleep 0.1; done
  sleep 1; r1=$(rss); fd1=$(ls /proc/"$MG"/fd | wc -l)
  wait "$LP" || true
  sleep 2; r2=$(rss); fd2=$(ls /proc/"$MG"/fd | wc -l)
  echo "idle STARTTLS sessions after RCPT: $(grep IDLE "$W/idle.out" || echo none) held ${HOLD}s: RSS ${r0} KiB -> ${r1} KiB = $(( (r1 - r0) * 1024 / IDLE )) bytes/session; fds ${fd0} -> ${fd1} held -> ${fd2} after close ($(( r2 )) KiB)"
done
echo "mailgate peak RSS: $(awk '/VmHWM/{print $2, $3}' /proc/"$MG"/status)"
if [ "$MISMATCH" != 0 ]; then echo "$MISMATCH sink count mismatch(es): see above" >&2; exit 1; fi

#!/usr/bin/env bash
# Side-by-side IMAP benchmark in one run, same machine, same client
# (bench/imap_load.py), same certificate (issue 13 acceptance 6): plaintext
# direct to Dovecot, through mailgate (plain and IMAPS) and through nginx's
# IMAP proxy (plain and IMAPS; nginx + libnginx-mod-mail, its auth_http a tiny
# Python server on loopback that sends every login to Dovecot). Each session
# is LOGIN, SELECT INBOX, FETCH of all 10 messages of 10 KiB, LOGOUT, on a new
# connection; TLS sessions are full handshakes (Python does not resume).
# Reports sessions/s, latency and the proxy's CPU ms per session (utime+stime
# from /proc: the mailgate process; nginx's master and workers; nginx's
# auth_http server is shown on its own line), and the ratios mailgate/nginx
# and mailgate/direct. Expect ±25% run-to-run noise on 2 cores: client, proxy
# and Dovecot share them. Needs root (Dovecot switches users). Not part of CI.
#   bash bench/imap.sh [sessions] [concurrency]     SMOKE=1: seconds-long run
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
if [ "${SMOKE:-0}" = 1 ]; then N=${1:-40}; C=${2:-4}; N1=${N1:-10}; REPS=${REPS:-1}
else N=${1:-400}; C=${2:-4}; N1=${N1:-100}; REPS=${REPS:-2}; fi
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
for t in dovecot nginx python3 openssl bc pgrep; do command -v "$t" >/dev/null || { echo "missing: $t (bash .ci/run installs all but nginx: apt-get install nginx libnginx-mod-mail)" >&2; exit 1; }; done
NGX_MOD=${NGX_MOD:-/usr/lib/nginx/modules/ngx_mail_module.so}
[ -f "$NGX_MOD" ] || { echo "missing: $NGX_MOD (apt-get install libnginx-mod-mail)" >&2; exit 1; }

cargo build -q --release --ignore-rust-version --bin mailgate
BIN=${MAILGATE_BIN:-${CARGO_TARGET_DIR:-target}/release/mailgate}
LOAD=bench/imap_load.py
W=$(mktemp -d /tmp/mailgate-imap-bench.XXXXXX); chmod 755 "$W"
. bench/lib.sh

make_cert

# Dovecot: plaintext IMAP, user bench/bench with 10 messages of 10 KiB
DOVE=$(free_port); MG_PLAIN=$(free_port); MG_IMAPS=$(free_port)
NGX_PLAIN=$(free_port); NGX_IMAPS=$(free_port); AUTH=$(free_port)
mkdir -p "$W/run" "$W/state" "$W/home/bench/Maildir/"{new,cur,tmp}
for i in $(seq 10); do
  { printf 'From: load@example.org\nTo: bench@example.net\nSubject: bench %s\n\n' "$i"
    python3 -c 'import sys; [print("%05d" % n + " x" * 35) for n in range(140)]'
  } > "$W/home/bench/Maildir/new/$((1700000000 + i)).M${i}P1.bench"
done
chown -R 65534:65534 "$W/home"
echo "bench:{PLAIN}bench:65534:65534::$W/home/bench" > "$W/users"; chmod 644 "$W/users"
cat > "$W/dovecot.conf" <<CONF
base_dir = $W/run
state_dir = $W/state
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
log_path = $W/dovecot.log
mail_location = maildir:~/Maildir
first_valid_uid = 1
passdb {
  driver = passwd-file
  args = username_format=%u $W/users
}
userdb {
  driver = passwd-file
  args = username_format=%u $W/users
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $DOVE
  }
  inet_listener imaps {
    port = 0
  }
  # high-performance login mode: one login process serves many connections
  service_count = 0
  process_min_avail = 2
}
protocol imap {
  mail_max_userip_connections = 10000
}
CONF
dovecot -F -c "$W/dovecot.conf" & pids+=($!)

cat > "$W/mailgate.yaml" <<YAML
server: { hostname: gw.bench }
listeners:
  - { name: plain, protocol: imap, bind: "127.0.0.1:$MG_PLAIN", tls: none, backend: dovecot, max_connections: 20000 }
  - { name: imaps, protocol: imap, bind: "127.0.0.1:$MG_IMAPS", tls: implicit, backend: dovecot, max_connections: 20000 }
tls: { certificates: [ { cert: cert.pem, key: key.pem } ] }
backends: { dovecot: { address: "127.0.0.1:$DOVE" } }
YAML
MAILGATE_LOG=warn "$BIN" run --config "$W/mailgate.yaml" >"$W/mailgate.log" 2>&1 & MG=$!; pids+=($MG)

# nginx's mail proxy asks an HTTP server where each login goes (auth_http)
cat > "$W/auth_http.py" <<'PY'
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        for k, v in (("Auth-Status", "OK"), ("Auth-Server", "127.0.0.1"), ("Auth-Port", sys.argv[2])):
            self.send_header(k, v)
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY
python3 "$W/auth_http.py" "$AUTH" "$DOVE" & AUTHPID=$!; pids+=($AUTHPID)
# as many workers as mailgate has runtime threads (one per core)
cat > "$W/nginx.conf" <<NGX
load_module $NGX_MOD;
daemon off;
worker_processes auto;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
events { worker_connections 20000; }
mail {
  server_name localhost;
  auth_http 127.0.0.1:$AUTH/auth;
  ssl_certificate $W/cert.pem;
  ssl_certificate_key $W/key.pem;
  server { listen 127.0.0.1:$NGX_PLAIN; protocol imap; }
  server { listen 127.0.0.1:$NGX_IMAPS ssl; protocol imap; }
}
NGX
nginx -e "$W/nginx-error.log" -p "$W" -c "$W/nginx.conf" & NGX=$!; pids+=($NGX)

for p in "$DOVE" "$MG_PLAIN" "$MG_IMAPS" "$AUTH" "$NGX_PLAIN" "$NGX_IMAPS"; do wait_port "$p"; done
TCK=$(getconf CLK_TCK)
ticks() { for p in "$@"; do awk '{print $14+$15}' /proc/"$p"/stat 2>/dev/null || echo 0; done | awk '{s+=$1} END {print s+0}'; }
cpu_mg() { ticks "$MG"; }
cpu_ngx() { ticks "$NGX" $(pgrep -P "$NGX"); }
cpu_auth() { ticks "$AUTHPID"; }
cpu_none() { echo 0; }

rows=(); declare -A RATE CPU CNT AUTHMS
# run LABEL KEY PROXY(mg|ngx|none) SESSIONS CONCURRENCY LOAD-ARGS...
run() {
  local label=$1 key=$2 proxy=$3 n=$4 c=$5; shift 5
  local c0 c1 a0 a1 out ok rate p50 p99 err cpums=-
  c0=$(cpu_"$proxy"); a0=$(cpu_auth)
  out=$(timeout 900 python3 "$LOAD" -n "$n" -c "$c" "$@" 2>&1) || true
  c1=$(cpu_"$proxy"); a1=$(cpu_auth)
  if [[ $out != *RESULT* ]]; then echo "  $label failed: $out" >&2; return; fi
  ok=$(sed -n 's/.*ok=\([0-9]*\).*/\1/p' <<<"$out")
  err=$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' <<<"$out")
  rate=$(sed -n 's/.*sessions_per_s=\([0-9.]*\).*/\1/p' <<<"$out")
  p50=$(sed -n 's/.*p50_ms=\([0-9.]*\).*/\1/p' <<<"$out"); p99=$(sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p' <<<"$out")
  if [ "$proxy" != none ] && [ "$ok" -gt 0 ]; then
    cpums=$(printf '%.3f' "$(echo "($c1 - $c0) * 1000 / $TCK / $ok" | bc -l)")
    CPU[$key]=$(echo "${CPU[$key]:-0} + $cpums" | bc -l)
  fi
  if [ "$proxy" = ngx ] && [ "$ok" -gt 0 ]; then
    AUTHMS[$key]=$(printf '%.3f' "$(echo "($a1 - $a0) * 1000 / $TCK / $ok" | bc -l)")
  fi
  RATE[$key]=$(echo "${RATE[$key]:-0} + $rate" | bc -l); CNT[$key]=$(( ${CNT[$key]:-0} + 1 ))
  rows+=("$(printf '%-36s %9s %9s %9s %7s %12s' "$label" "$rate" "$p50" "$p99" "$err" "$cpums")")
  echo "  done: $label" >&2
}
mean() { echo "${1:-0} / ${2:-1}" | bc -l; }
ratio() { # ratio NUM-KEY DEN-KEY ARRAY
  local -n arr=$3
  [ -n "${arr[$1]:-}" ] && [ -n "${arr[$2]:-}" ] || { echo -; return; }
  printf '%.2f' "$(echo "$(mean "${arr[$1]}" "${CNT[$1]}") / $(mean "${arr[$2]}" "${CNT[$2]}")" | bc -l)"
}

echo "IMAP benchmark: $N sessions at concurrency $C ($REPS rounds; and $N1 at concurrency 1); each: LOGIN, SELECT, FETCH 10 x 10 KiB, LOGOUT; key $KEYTYPE" >&2
SSL=(--mode ssl --ca "$W/cert.pem")
run "warm-up (discarded)" warm mg 20 2 --port "$MG_IMAPS" "${SSL[@]}"
run "warm-up (discarded)" warm ngx 20 2 --port "$NGX_IMAPS" "${SSL[@]}"; rows=(); unset 'RATE[warm]' 'CPU[warm]'
for rep in $(seq "$REPS"); do
  run "[$rep] direct plaintext -> dovecot" direct none "$N" "$C" --port "$DOVE"
  run "[$rep] plain via mailgate"          mg-plain mg "$N" "$C" --port "$MG_PLAIN"
  run "[$rep] plain via nginx"             ngx-plain ngx "$N" "$C" --port "$NGX_PLAIN"
  run "[$rep] IMAPS via mailgate"          mg-imaps mg "$N" "$C" --port "$MG_IMAPS" "${SSL[@]}"
  run "[$rep] IMAPS via nginx"             ngx-imaps ngx "$N" "$C" --port "$NGX_IMAPS" "${SSL[@]}"
done
run "c=1 direct plaintext -> dovecot" direct1 none "$N1" 1 --port "$DOVE"
run "c=1 IMAPS via mailgate"          mg-imaps1 mg "$N1" 1 --port "$MG_IMAPS" "${SSL[@]}"
run "c=1 IMAPS via nginx"             ngx-imaps1 ngx "$N1" 1 --port "$NGX_IMAPS" "${SSL[@]}"

printf '\n%-36s %9s %9s %9s %7s %12s\n' "run" "sess/s" "p50 ms" "p99 ms" "errors" "CPU ms/sess"
printf '%s\n' "${rows[@]}"
echo "(CPU ms/sess = the proxy's utime+stime per session: mailgate, or nginx master+workers; '-' = no proxy)"
echo "nginx's auth_http server (Python, not in nginx's column) CPU ms/sess: plain ${AUTHMS[ngx-plain]:--}, IMAPS ${AUTHMS[ngx-imaps]:--}"
echo
echo "ratios (means over the rounds at concurrency $C):"
echo "  IMAPS  mailgate/nginx  sess/s $(ratio mg-imaps ngx-imaps RATE)   CPU ms/sess $(ratio mg-imaps ngx-imaps CPU)"
echo "  plain  mailgate/nginx  sess/s $(ratio mg-plain ngx-plain RATE)   CPU ms/sess $(ratio mg-plain ngx-plain CPU)"
echo "  IMAPS via mailgate / direct plaintext  sess/s $(ratio mg-imaps direct RATE)"
echo "  plain via mailgate / direct plaintext  sess/s $(ratio mg-plain direct RATE)"
echo "  c=1 IMAPS mailgate/nginx  sess/s $(ratio mg-imaps1 ngx-imaps1 RATE)   CPU ms/sess $(ratio mg-imaps1 ngx-imaps1 CPU)"
echo "mailgate peak RSS: $(awk '/VmHWM/{print $2, $3}' /proc/"$MG"/status)"

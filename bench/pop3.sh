#!/usr/bin/env bash
# Side-by-side POP3 benchmark in one run, same machine, same client: plaintext
# direct to Dovecot vs. through mailgate (plain, STLS, POP3S). Each session is
# login, RETR of 10 messages of 10 KiB, QUIT, on a new connection; TLS sessions
# are full handshakes (Python does not resume). Reports sessions/s, latency and
# mailgate CPU ms per session (utime+stime of the mailgate process from
# /proc/PID/stat, divided by sessions). Expect ±25% run-to-run noise on 2 cores:
# client, mailgate and Dovecot share them. Needs root (Dovecot switches users).
# Not part of CI. Usage: bash bench/pop3.sh [sessions] [concurrency]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
N=${1:-400}; C=${2:-4}; N1=${N1:-100}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
for t in dovecot python3 openssl bc; do command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }; done

cargo build -q --release --ignore-rust-version --bin mailgate
BIN=${MAILGATE_BIN:-${CARGO_TARGET_DIR:-target}/release/mailgate}
LOAD=bench/pop3_load.py
W=$(mktemp -d /tmp/mailgate-pop3-bench.XXXXXX); chmod 755 "$W"
. bench/lib.sh


make_cert

# Dovecot: plaintext POP3, user bench/bench with 10 messages of 10 KiB
DOVE=$(free_port); PLAIN=$(free_port); STLS=$(free_port); POP3S=$(free_port)
mkdir -p "$W/run" "$W/state" "$W/home/bench/Maildir/"{new,cur,tmp}
for i in $(seq 10); do
  { printf 'From: load@example.org\nTo: bench@example.net\nSubject: bench %s\n\n' "$i"
    python3 -c 'import sys; [print("%05d" % n + " x" * 35) for n in range(140)]'
  } > "$W/home/bench/Maildir/new/$((1700000000 + i)).M${i}P1.bench"
done
chown -R 65534:65534 "$W/home"
echo "bench:bench:65534:65534::$W/home/bench" > "$W/users"; chmod 644 "$W/users"
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
  # high-performance login mode: one login process serves many connections
  service_count = 0
  process_min_avail = 2
}
protocol pop3 {
  pop3_uidl_format = %08Xu%08Xv
  mail_max_userip_connections = 10000
}
CONF
dovecot -F -c "$W/dovecot.conf" & pids+=($!)

cat > "$W/mailgate.yaml" <<YAML
server: { hostname: gw.bench }
listeners:
  - { name: plain, protocol: pop3, bind: "127.0.0.1:$PLAIN", tls: none, backend: dovecot, max_connections: 20000 }
  - { name: pop3, protocol: pop3, bind: "127.0.0.1:$STLS", tls: starttls, backend: dovecot, max_connections: 20000 }
  - { name: pop3s, protocol: pop3, bind: "127.0.0.1:$POP3S", tls: implicit, backend: dovecot, max_connections: 20000 }
tls: { certificates: [ { cert: cert.pem, key: key.pem } ] }
backends: { dovecot: { address: "127.0.0.1:$DOVE" } }
YAML
MAILGATE_LOG=warn "$BIN" run --config "$W/mailgate.yaml" >"$W/mailgate.log" 2>&1 & MG=$!; pids+=($MG)
wait_port "$DOVE"; wait_port "$PLAIN"; wait_port "$STLS"; wait_port "$POP3S"
TCK=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/"$MG"/stat; }

rows=()
# run NAME VIA_MAILGATE(0/1) SESSIONS CONCURRENCY LOAD-ARGS...
run() {
  local name=$1 via=$2 n=$3 c=$4; shift 4
  local c0 c1 out ok rate p50 p99 err cpums
  c0=$(cpu)
  out=$(python3 "$LOAD" -n "$n" -c "$c" "$@" 2>&1)
  c1=$(cpu)
  if [[ $out != *RESULT* ]]; then echo "  $name failed: $out" >&2; return; fi
  ok=$(sed -n 's/.*ok=\([0-9]*\).*/\1/p' <<<"$out")
  err=$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' <<<"$out")
  rate=$(sed -n 's/.*sessions_per_s=\([0-9.]*\).*/\1/p' <<<"$out")
  p50=$(sed -n 's/.*p50_ms=\([0-9.]*\).*/\1/p' <<<"$out"); p99=$(sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p' <<<"$out")
  if [ "$via" = 1 ] && [ "$ok" -gt 0 ]; then cpums=$(printf '%.3f' "$(echo "($c1 - $c0) * 1000 / $TCK / $ok" | bc -l)"); else cpums=-; fi
  rows+=("$(printf '%-32s %9s %9s %9s %7s %12s' "$name" "$rate" "$p50" "$p99" "$err" "$cpums")")
  echo "  done: $name" >&2
}

echo "POP3 benchmark: $N sessions at concurrency $C (and $N1 at concurrency 1); each: login, 10 x RETR 10 KiB, QUIT; key $KEYTYPE" >&2
run "warm-up via mailgate (discarded)" 1 20 2 --port "$POP3S" --mode ssl --ca "$W/cert.pem"; rows=()
for rep in 1 2; do
  run "[$rep] direct plaintext -> dovecot" 0 "$N" "$C" --port "$DOVE" --mode plain
  run "[$rep] plain via mailgate"          1 "$N" "$C" --port "$PLAIN" --mode plain
  run "[$rep] STLS via mailgate"           1 "$N" "$C" --port "$STLS" --mode stls --ca "$W/cert.pem"
  run "[$rep] POP3S via mailgate"          1 "$N" "$C" --port "$POP3S" --mode ssl --ca "$W/cert.pem"
done
run "c=1 direct plaintext -> dovecot" 0 "$N1" 1 --port "$DOVE" --mode plain
run "c=1 plain via mailgate"          1 "$N1" 1 --port "$PLAIN" --mode plain
run "c=1 POP3S via mailgate"          1 "$N1" 1 --port "$POP3S" --mode ssl --ca "$W/cert.pem"

printf '\n%-32s %9s %9s %9s %7s %12s\n' "run" "sess/s" "p50 ms" "p99 ms" "errors" "mg CPU ms/sess"
printf '%s\n' "${rows[@]}"
echo "(mg CPU ms/sess = mailgate utime+stime per session; '-' = mailgate not involved)"
echo "mailgate peak RSS: $(awk '/VmHWM/{print $2, $3}' /proc/"$MG"/status)"

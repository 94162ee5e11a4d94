#!/usr/bin/env bash
# Backend reuse with XCLIENT (issue 17), side by side in one run: mailgate in
# front of a real Postfix that trusts it for XCLIENT, one listener whose backend
# keeps connections (`identity: [xclient, received], reuse: {}`) and one whose
# backend does not (a new Postfix connection, greeting, EHLO, XCLIENT, EHLO per
# client session). Same Postfix, same client (examples/loadgen.rs, plaintext,
# a new client connection per 10 KiB message), rows alternating. Reports per
# row: mailgate CPU ms per message (utime+stime from /proc), messages/s, and the
# connections Postfix accepted (its `connect from` log lines). Postfix discards
# the mail (example.net is local, local_transport = discard), so its queue, not a mailbox, is the
# cost it adds. Postfix authorizes 127.0.0.0/8 for XCLIENT, which holds the
# client's own address: so it offers XCLIENT again after one (it checks the list
# against the address it was told; README, `reuse`). Not part of CI. Needs root.
#   bash bench/xclient_reuse.sh            # N=1000 messages per row, 3 repeats, c=4
#   N=200 REPEATS=1 bash bench/xclient_reuse.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/sbin:/sbin"
N=${N:-1000}; C=${C:-4}; REPEATS=${REPEATS:-3}; SIZE=${SIZE:-10240}
for t in postfix python3 bc; do command -v "$t" >/dev/null || { echo "missing: $t (bash .ci/run installs it)" >&2; exit 1; }; done
[ -x /usr/lib/postfix/sbin/smtpd ] || { echo "missing: Postfix daemons (/usr/lib/postfix/sbin)" >&2; exit 1; }
cargo build -q --release --ignore-rust-version --bin mailgate --example loadgen
BIN=${MAILGATE_BIN:-target/release/mailgate}; LOAD=target/release/examples/loadgen
W=$(mktemp -d /tmp/mailgate-xclient-bench.XXXXXX); chmod 755 "$W"
. bench/lib.sh
# Postfix is stopped with its own command (its daemons are not our children)
PF=$W/postfix
stop_postfix() { postfix -c "$PF/etc" stop >/dev/null 2>&1 || true; cleanup; }
trap stop_postfix EXIT

mkdir -p "$PF/etc" "$PF/queue" "$PF/data"; chmod 755 "$PF"; chown postfix "$PF/data"
PX=$(free_port); KEPT=$(free_port); FRESH=$(free_port)
cat > "$PF/etc/main.cf" <<CF
compatibility_level = 3.6
config_directory = $PF/etc
queue_directory = $PF/queue
data_directory = $PF/data
mail_owner = postfix
setgid_group = postdrop
myhostname = legacy.bench
mydestination = example.net
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.1/32
smtpd_authorized_xclient_hosts = 127.0.0.0/8
smtpd_peername_lookup = no
maillog_file = $PF/maillog
maillog_file_prefixes = $PF
local_transport = discard:
local_recipient_maps =
alias_maps =
alias_database =
biff = no
CF
cat > "$PF/etc/master.cf" <<CF
127.0.0.1:$PX inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
local     unix  - n n - - local
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
CF
postfix -c "$PF/etc" start >/dev/null
cat > "$W/mailgate.yaml" <<YAML
server: { hostname: gw.bench }
backends:
  kept: { address: "127.0.0.1:$PX", identity: [xclient, received], reuse: { max_idle: 16 } }
  fresh: { address: "127.0.0.1:$PX", identity: [xclient, received] }
listeners:
  - { name: kept, protocol: smtp, bind: "127.0.0.1:$KEPT", tls: none, backend: kept, max_connections: 1000 }
  - { name: fresh, protocol: smtp, bind: "127.0.0.1:$FRESH", tls: none, backend: fresh, max_connections: 1000 }
YAML
MAILGATE_LOG=warn "$BIN" run --config "$W/mailgate.yaml" >"$W/mailgate.log" 2>&1 & MG=$!; pids+=($MG)
wait_port "$PX"; wait_port "$KEPT"; wait_port "$FRESH"
TCK=$(getconf CLK_TCK)
cpu() { awk '{print $14+$15}' /proc/"$MG"/stat; }
connects() { grep -c ': connect from ' "$PF/maillog" || true; }
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p" <<<"$2"; }
declare -A CPUMS RATE CONN
ACKED=0
# messages Postfix took (cleanup logs each once: `QUEUEID: message-id=`); the
# recipient's domain (loadgen's sink@example.net) is local, so none is retried
queued() { grep -c 'postfix/cleanup\[.*: message-id=' "$PF/maillog" || true; }
echo "== $N messages x $REPEATS per row, concurrency $C, $SIZE bytes, new client connection per message" >&2
for rep in $(seq "$REPEATS"); do
  for row in kept fresh; do
    port=$KEPT; [ "$row" = fresh ] && port=$FRESH
    n0=$(connects); c0=$(cpu)
    out=$("$LOAD" --addr 127.0.0.1:"$port" --mode plain --size "$SIZE" -c "$C" -n "$N" 2>&1 || true)
    c1=$(cpu); sleep 0.5; n1=$(connects)
    ok=$(field ok "$out"); ok=${ok:-0}; acked=$(field acked "$out"); ACKED=$((ACKED + ${acked:-0}))
    if [ "$ok" -ne "$N" ]; then echo "  $row: only $ok of $N messages: $out" >&2; exit 1; fi
    CPUMS[$row]+="$(echo "($c1 - $c0) * 1000 / $TCK / $ok" | bc -l) "
    RATE[$row]+="$(field msgs_per_s "$out") "
    CONN[$row]+="$((n1 - n0)) "
    echo "  [$rep] $row: $(grep RESULT <<<"$out" | cut -c1-120)" >&2
  done
done
median() { tr ' ' '\n' <<<"$1" | grep . | sort -g | awk '{a[NR]=$1} END {print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }
printf '\n%-28s %16s %12s %22s\n' "row (medians of $REPEATS)" "mg CPU ms/msg" "msgs/s" "Postfix connections"
for row in kept fresh; do
  printf '%-28s %16.3f %12.1f %22s\n' "$row" "$(median "${CPUMS[$row]}")" "$(median "${RATE[$row]}")" "$(median "${CONN[$row]}")"
done
printf 'mailgate CPU per message, kept / fresh: %.3fx; messages/s: %.3fx\n' \
  "$(echo "$(median "${CPUMS[kept]}") / $(median "${CPUMS[fresh]}")" | bc -l)" \
  "$(echo "$(median "${RATE[kept]}") / $(median "${RATE[fresh]}")" | bc -l)"
# no loss: Postfix queued exactly the messages the client saw acknowledged
for _ in $(seq 100); do [ "$(queued)" = "$ACKED" ] && break; sleep 0.1; done
if [ "$(queued)" != "$ACKED" ]; then echo "MISMATCH: Postfix took $(queued), the client saw $ACKED acknowledged" >&2; exit 1; fi
echo "Postfix took $ACKED messages, equal to those acknowledged to the client"

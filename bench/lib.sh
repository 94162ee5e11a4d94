# Shared by the bench scripts (sourced after $W, the work dir, is set): process
# cleanup, loopback ports, and the test certificate (KEYTYPE=rsa:2048 | ec).
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 not up" >&2; exit 1; }
# make_cert: $W/cert.pem and $W/key.pem for localhost / 127.0.0.1 (an end-entity
# certificate: rustls clients refuse a CA certificate used as a server's)
KEYTYPE=${KEYTYPE:-rsa:2048}
make_cert() {
  local newkey
  if [ "$KEYTYPE" = ec ]; then newkey=(-newkey ec -pkeyopt ec_paramgen_curve:P-256); else newkey=(-newkey "$KEYTYPE"); fi
  openssl req -x509 "${newkey[@]}" -nodes -days 2 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -addext "basicConstraints=critical,CA:FALSE" \
    -addext "extendedKeyUsage=serverAuth" -keyout "$W/key.pem" -out "$W/cert.pem" 2>/dev/null
}

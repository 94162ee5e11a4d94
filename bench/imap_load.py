#!/usr/bin/env python3
"""IMAP load client for bench/imap.sh (not part of CI).

Each session: connect (plaintext or implicit TLS), LOGIN, SELECT INBOX,
FETCH 1:* BODY.PEEK[] (every message), LOGOUT. Sessions run in
--concurrency worker processes (not threads: the GIL would make the client
the bottleneck). Python's ssl does not resume sessions by default, so every
TLS session is a full handshake (the worst case for a TLS proxy).

Prints one line:
  RESULT ok=N errors=N secs=S sessions_per_s=R p50_ms=X p99_ms=Y bytes=B
"""
import argparse
import imaplib
import multiprocessing as mp
import ssl
import sys
import time


def session(a, ctx):
    if a.mode == "ssl":
        m = imaplib.IMAP4_SSL(a.host, a.port, ssl_context=ctx, timeout=30)
    else:
        m = imaplib.IMAP4(a.host, a.port, timeout=30)
    typ, _ = m.login(a.user, a.password)
    typ, data = m.select("INBOX")
    n = int(data[0])
    if n < a.messages:
        raise RuntimeError(f"{n} messages, want {a.messages}")
    typ, data = m.fetch(f"1:{n}", "(BODY.PEEK[])")
    got = [len(p[1]) for p in data if isinstance(p, tuple)]
    if len(got) != n or min(got) < a.min_size:
        raise RuntimeError(f"fetched {got}")
    m.logout()
    return sum(got)


def worker(a, n, out):
    ctx = ssl.create_default_context(cafile=a.ca) if a.mode == "ssl" else None
    lat, errors, total = [], 0, 0
    for _ in range(n):
        t = time.perf_counter()
        try:
            total += session(a, ctx)
            lat.append((time.perf_counter() - t) * 1000)
        except Exception as e:  # counted, first few shown
            errors += 1
            if errors <= 3:
                print(f"error: {e!r}", file=sys.stderr)
    out.put((lat, errors, total))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=["plain", "ssl"], default="plain")
    ap.add_argument("--ca")
    ap.add_argument("--user", default="bench")
    ap.add_argument("--password", default="bench")
    ap.add_argument("-n", "--sessions", type=int, default=200)
    ap.add_argument("-c", "--concurrency", type=int, default=4)
    ap.add_argument("--messages", type=int, default=10)
    ap.add_argument("--min-size", type=int, default=10240)
    a = ap.parse_args()
    c = max(1, min(a.concurrency, a.sessions))
    q = mp.Queue()
    share = [a.sessions // c + (1 if i < a.sessions % c else 0) for i in range(c)]
    t0 = time.perf_counter()
    procs = [mp.Process(target=worker, args=(a, n, q)) for n in share]
    for p in procs:
        p.start()
    lat, errors, total = [], 0, 0
    for _ in procs:
        l, e, b = q.get(timeout=600)
        lat += l
        errors += e
        total += b
    for p in procs:
        p.join(timeout=60)
    secs = time.perf_counter() - t0
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0
    print(
        f"RESULT ok={len(lat)} errors={errors} secs={secs:.3f} "
        f"sessions_per_s={len(lat) / secs:.1f} p50_ms={pct(0.5):.2f} "
        f"p99_ms={pct(0.99):.2f} bytes={total}"
    )


if __name__ == "__main__":
    main()

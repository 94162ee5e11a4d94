#!/usr/bin/env python3
"""SMTP load client for bench/run.sh's side-by-side rows against nginx mail and
haproxy (issue 17; not part of CI): the same client drives mailgate and the
anchors, so their CPU per message compares.

Each message: a new connection (plain, STARTTLS or implicit TLS), EHLO,
MAIL, RCPT, DATA of --size bytes, QUIT. Python's ssl does not resume
sessions unless told to, so every TLS connection is a full handshake; the
certificate is verified against --ca (host name included). Messages run in
--concurrency worker processes (not threads: the GIL would make the client
the bottleneck). Bounded: every socket operation has a 30 s timeout.

Prints one line:
  RESULT ok=N acked=N errors=N secs=S msgs_per_s=R p50_ms=X p99_ms=Y
(`acked`: messages the server answered 250 after DATA; `ok` counts the
sessions that also ended cleanly).
"""
import argparse
import multiprocessing as mp
import smtplib
import ssl
import sys
import time


def body(size):
    head = b"From: load@example.org\r\nTo: sink@example.net\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    n = max(0, size - len(head)) // len(line) + 1
    return head + line * n


def message(a, ctx, msg):
    """One session; True when DATA was acknowledged."""
    if a.mode == "implicit":
        s = smtplib.SMTP_SSL(a.host, a.port, context=ctx, timeout=30)
    else:
        s = smtplib.SMTP(a.host, a.port, timeout=30)
    acked = False
    try:
        s.ehlo("load.example.org")
        if a.mode == "starttls":
            s.starttls(context=ctx)
            s.ehlo("load.example.org")
        s.mail("load@example.org")
        s.rcpt("sink@example.net")
        code, _ = s.data(msg)
        acked = code == 250
        try:
            s.quit()
        except (OSError, smtplib.SMTPException):
            pass  # the message was answered already: it counts
    finally:
        s.close()
    return acked


def worker(a, n, out):
    ctx = None
    if a.mode != "plain":
        ctx = ssl.create_default_context(cafile=a.ca)
    msg = body(a.size)
    lat, errors, acked = [], 0, 0
    for _ in range(n):
        t = time.perf_counter()
        done = False
        try:
            done = message(a, ctx, msg)
        except Exception as e:  # counted, first few shown
            errors += 1
            if errors <= 3:
                print(f"error: {e!r}", file=sys.stderr)
        if done:
            acked += 1
            lat.append((time.perf_counter() - t) * 1000)
    out.put((lat, errors, acked))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--mode", choices=["plain", "starttls", "implicit"], default="plain")
    ap.add_argument("--ca")
    ap.add_argument("-n", "--messages", type=int, default=1000)
    ap.add_argument("-c", "--concurrency", type=int, default=20)
    ap.add_argument("--size", type=int, default=10240)
    a = ap.parse_args()
    c = max(1, min(a.concurrency, a.messages))
    q = mp.Queue()
    share = [a.messages // c + (1 if i < a.messages % c else 0) for i in range(c)]
    t0 = time.perf_counter()
    procs = [mp.Process(target=worker, args=(a, n, q)) for n in share]
    for p in procs:
        p.start()
    lat, errors, acked = [], 0, 0
    for _ in procs:
        l, e, k = q.get()
        lat += l
        errors += e
        acked += k
    for p in procs:
        p.join()
    secs = time.perf_counter() - t0
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else 0.0
    print(
        f"RESULT ok={len(lat)} acked={acked} errors={errors} secs={secs:.3f} "
        f"msgs_per_s={len(lat) / secs:.1f} p50_ms={pct(0.5):.2f} p99_ms={pct(0.99):.2f}"
    )


if __name__ == "__main__":
    main()

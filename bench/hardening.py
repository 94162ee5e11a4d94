"""SMTP clients of bench/hardening.sh (issues 11 and 19): each subcommand drives
one hostile case against a mailgate listener on loopback and prints one
`RESULT key=value ...` line (reply codes tallied, seconds). Bounded: every read
has a timeout, every count comes from the command line.

  dkim PORT MESSAGES SIGNATURES H_ENTRIES TIMEOUT [distinct]
  big PORT MESSAGES BYTES TIMEOUT          (all messages in parallel)
  mails PORT DOMAIN_FORMAT COUNT TIMEOUT   (one session: MAIL FROM / RSET)
  hold PORT COUNT SECONDS                  (idle connections kept open; HOLD READY)
  greeting PORT TIMEOUT                    (seconds to a 220, or none)
"""
import base64
import collections
import hashlib
import os
import signal
import socket
import sys
import threading
import time


class Smtp:
    def __init__(self, port, timeout):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.f = self.s.makefile("rb")

    def reply(self):
        """The code of the next (multi-line) reply; 0 when the server closed."""
        while True:
            line = self.f.readline(4096)
            if not line:
                return 0
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]) if line[:3].isdigit() else 0

    def cmd(self, line):
        self.s.sendall(line + b"\r\n")
        return self.reply()

    def message(self, helo, sender, msg):
        """Greeting, EHLO, one envelope and MSG (dot-terminated): the final reply code."""
        self.reply()
        self.cmd(b"EHLO " + helo)
        self.cmd(b"MAIL FROM:<" + sender + b">")
        self.cmd(b"RCPT TO:<b@sink.example>")
        code = self.cmd(b"DATA")
        if code == 354:
            try:
                self.s.sendall(msg)
            except OSError:
                pass  # refused mid-message: the reply may still be readable
            code = self.reply()
        return code


def result(**kv):
    print("RESULT " + " ".join(f"{k}={v}" for k, v in kv.items()), flush=True)


def codes_str(codes):
    return ",".join(f"{c}:{n}" for c, n in sorted(codes.items(), key=lambda kv: str(kv[0]))) or "-"


def fold(text):
    """Folds a header value at ';' and ':' so no line is near 1000 octets."""
    out, line = [], ""
    for tok in text.replace(":", ":\x00").replace("; ", ";\x00").split("\x00"):
        if len(line) + len(tok) > 70:
            out.append(line)
            line = "\t"
        line += tok
    out.append(line)
    return "\r\n".join(out)


def dkim_message(signatures, h_entries, distinct):
    body = b"hello from the flood\r\n"
    bh = base64.b64encode(hashlib.sha256(body).digest()).decode()
    # a signature over `dkim-signature` fields makes each verification hash up
    # to h_entries of the (large) other signature fields
    h = ":".join(["from"] + ["dkim-signature"] * (h_entries - 1))
    sig_b = base64.b64encode(os.urandom(256)).decode()
    fields = []
    for i in range(signatures):
        d, s = (f"d{i}.flood.example", f"s{i}") if distinct else ("flood.example", "flood")
        value = f"v=1; a=rsa-sha256; c=relaxed/relaxed; d={d}; s={s}; h={h}; bh={bh}; b={sig_b}"
        fields.append("DKIM-Signature: " + fold(value))
    head = "\r\n".join(fields) + "\r\nFrom: <a@flood.example>\r\nTo: <b@sink.example>\r\nSubject: flood\r\n\r\n"
    return head.encode() + body + b".\r\n"


def dkim(port, messages, signatures, h_entries, timeout, distinct=""):
    msg = dkim_message(int(signatures), int(h_entries), distinct == "distinct")
    codes, secs = collections.Counter(), []
    for _ in range(int(messages)):
        t = time.monotonic()
        try:
            c = Smtp(int(port), float(timeout))
            codes[c.message(b"flood.example", b"a@flood.example", msg)] += 1
            c.s.close()
        except socket.timeout:
            codes["timeout"] += 1
        except OSError:
            codes["error"] += 1
        secs.append(time.monotonic() - t)
    result(messages=messages, bytes=len(msg), codes=codes_str(codes), secs=f"{sum(secs):.2f}",
           max_secs=f"{max(secs):.2f}")


def big(port, messages, size, timeout):
    line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n"
    head = b"From: <load@example.org>\r\nTo: <b@sink.example>\r\nSubject: big\r\n\r\n"
    msg = head + line * ((int(size) - len(head)) // len(line)) + b".\r\n"
    codes, lock = collections.Counter(), threading.Lock()

    def one():
        try:
            c = Smtp(int(port), float(timeout))
            code = c.message(b"big.example", b"load@example.org", msg)
            c.cmd(b"QUIT")
            c.s.close()
        except socket.timeout:
            code = "timeout"
        except OSError:
            code = "error"
        with lock:
            codes[code] += 1

    t = time.monotonic()
    threads = [threading.Thread(target=one) for _ in range(int(messages))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    result(messages=messages, bytes=len(msg), accepted=codes[250], refused=int(messages) - codes[250],
           codes=codes_str(codes), secs=f"{time.monotonic() - t:.2f}")


def mails(port, fmt, count, timeout):
    codes = collections.Counter()
    t = time.monotonic()
    answered = 0
    try:
        c = Smtp(int(port), float(timeout))
        c.reply()
        c.cmd(b"EHLO mails.example")
        for n in range(1, int(count) + 1):
            code = c.cmd(b"MAIL FROM:<u@" + (fmt % n).encode() + b">")
            codes[code] += 1
            if code == 0 or code == 421:
                break
            answered += 1
            if c.cmd(b"RSET") != 250:
                break
        c.cmd(b"QUIT")
    except socket.timeout:
        codes["timeout"] += 1
    except OSError:
        codes["error"] += 1
    result(mails=answered, codes=codes_str(codes), secs=f"{time.monotonic() - t:.2f}")


def hold(port, count, seconds):
    """Keeps COUNT idle connections open for SECONDS: one the server closes is
    opened again (as an attacker keeping the port full would)."""
    import selectors
    sel = selectors.DefaultSelector()

    def connect():
        try:
            s = socket.create_connection(("127.0.0.1", int(port)), timeout=5)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            return True
        except OSError:
            return False

    held = sum(connect() for _ in range(int(count)))
    print(f"HOLD READY held={held}", flush=True)
    end, reopened, stop = time.monotonic() + float(seconds), 0, []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while time.monotonic() < end and not stop:
        before = reopened
        for key, _ in sel.select(timeout=0.2):
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(key.fileobj)
                key.fileobj.close()
                reopened += connect()
        if reopened != before:
            time.sleep(0.05)  # a bounded reconnect rate, also against a server closing at once
    print(f"HOLD DONE reopened={reopened}", flush=True)


def greeting(port, timeout):
    t = time.monotonic()
    try:
        c = Smtp(int(port), float(timeout))
        code = c.reply()
        secs = time.monotonic() - t
        c.cmd(b"QUIT")
        result(code=code, secs=f"{secs:.3f}")
    except (socket.timeout, OSError):
        result(code="none", secs="-")


if __name__ == "__main__":
    {"dkim": dkim, "big": big, "mails": mails, "hold": hold, "greeting": greeting}[sys.argv[1]](*sys.argv[2:])

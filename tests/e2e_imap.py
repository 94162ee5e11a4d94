"""IMAP client of tests/e2e_imap.rs (Python imaplib): one command per run.

  fetch MODE PORT [CA]        MODE plain | starttls | ssl: LOGIN alice, then in
                              INBOX and Archive FETCH 1:* BODY.PEEK[]; prints
                              `MSG <folder> <hex>` per message, in order
  append MODE PORT CA IN OUT  APPEND the bytes of file IN (a literal),
                              FETCH the newest INBOX message back into OUT
  idle MODE PORT CA MAILDIR   session A IDLEs in INBOX; session B
                              APPENDs one message, then one is delivered into
                              MAILDIR (tmp/, renamed into new/, as an MDA
                              does); prints `BEFORE <n>` (the count before),
                              `EXISTS <n>` for each arrival as A sees it, and
                              `DONE <tagged reply>` after DONE
  idle-bye MODE PORT CA       IDLEs in INBOX, prints `IDLING` once the `+`
                              came, then `GOT <line>` for each line until the
                              server closes, and `CLOSED <seconds>` after that
  login MODE PORT CA SRC PW.. from loopback address SRC, one connection, one
                              LOGIN alice per PW; prints `OK` or `NO <text>`
                              per attempt, `CLOSED` if the server hung up

Every socket has a timeout: nothing here waits unbounded.
"""
import imaplib
import os
import re
import socket
import ssl
import sys
import time

T = 20


def ctx_for(ca):
    return ssl.create_default_context(cafile=ca) if ca else None


class FromAddr(imaplib.IMAP4):
    """imaplib.IMAP4 connecting from a given local address."""

    def __init__(self, src, host, port):
        self.src = src
        super().__init__(host, port, timeout=T)

    def _create_socket(self, timeout):
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.src, 0)
        )


class FromAddrSSL(imaplib.IMAP4_SSL):
    def __init__(self, src, host, port, ctx):
        self.src = src
        super().__init__(host, port, ssl_context=ctx, timeout=T)

    def _create_socket(self, timeout):
        sock = socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.src, 0)
        )
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def connect(mode, port, ca, src="127.0.0.1"):
    ctx = ctx_for(ca) if mode != "plain" else None
    if mode == "ssl":
        return FromAddrSSL(src, "127.0.0.1", port, ctx)
    m = FromAddr(src, "127.0.0.1", port)
    if mode == "starttls":
        m.starttls(ssl_context=ctx)
    return m


def check(resp):
    typ, data = resp
    if typ != "OK":
        raise RuntimeError(f"{typ} {data!r}")
    return data


def bodies(data):
    """The BODY[] literals of a FETCH answer, in order."""
    return [part[1] for part in data if isinstance(part, tuple)]


def fetch(mode, port, ca=None):
    m = connect(mode, int(port), ca)
    check(m.login("alice", "secret"))
    for folder in ("INBOX", "Archive"):
        n = int(check(m.select(folder, readonly=True))[0])
        for body in bodies(check(m.fetch(f"1:{n}", "(BODY.PEEK[])"))):
            print(f"MSG {folder} {body.hex()}")
    m.logout()


def append(mode, port, ca, src, dst):
    msg = open(src, "rb").read()
    m = connect(mode, int(port), ca)
    check(m.login("alice", "secret"))
    check(m.append("INBOX", None, None, msg))
    n = int(check(m.select("INBOX", readonly=True))[0])
    got = bodies(check(m.fetch(str(n), "(BODY.PEEK[])")))
    open(dst, "wb").write(got[0])
    m.logout()


def wait_exists(a):
    """The next `* N EXISTS` A reads while idling (bounded by the timeout)."""
    deadline = time.monotonic() + T
    while time.monotonic() < deadline:
        line = a.readline()
        if not line:
            raise RuntimeError("closed while idling")
        hit = re.match(rb"\* (\d+) EXISTS", line)
        if hit:
            return int(hit.group(1))
    raise RuntimeError("no EXISTS while idling")


def deliver(maildir, message):
    name = f"{int(time.time())}.M1P{os.getpid()}.idle-delivery"
    tmp = os.path.join(maildir, "tmp", name)
    with open(tmp, "wb") as f:
        f.write(message)
    st = os.stat(maildir)
    os.chown(tmp, st.st_uid, st.st_gid)
    os.rename(tmp, os.path.join(maildir, "new", name))


def idle(mode, port, ca, maildir):
    a = connect(mode, int(port), ca)
    check(a.login("alice", "secret"))
    before = int(check(a.select("INBOX"))[0])
    print(f"BEFORE {before}")
    tag = a._new_tag().decode()
    a.send(f"{tag} IDLE\r\n".encode())
    line = a.readline()
    if not line.startswith(b"+"):
        raise RuntimeError(f"IDLE: {line!r}")
    b = connect(mode, int(port), ca)
    check(b.login("alice", "secret"))
    check(b.append("INBOX", None, None, b"Subject: idle\r\n\r\nappended while idling\r\n"))
    b.logout()
    print(f"EXISTS {wait_exists(a)}")
    deliver(maildir, b"Subject: idle\n\ndelivered while idling\n")
    print(f"EXISTS {wait_exists(a)}")
    a.send(b"DONE\r\n")
    while True:
        line = a.readline()
        if not line or line.startswith(tag.encode()):
            print(f"DONE {line.decode().strip()}")
            break
    a.logout()


def idle_bye(mode, port, ca):
    a = connect(mode, int(port), ca)
    check(a.login("alice", "secret"))
    check(a.select("INBOX"))
    tag = a._new_tag().decode()
    a.send(f"{tag} IDLE\r\n".encode())
    line = a.readline()
    if not line.startswith(b"+"):
        raise RuntimeError(f"IDLE: {line!r}")
    print("IDLING", flush=True)
    start = time.monotonic()
    while True:
        line = a.readline()
        if not line:
            break
        print(f"GOT {line.decode(errors='replace').strip()}", flush=True)
    print(f"CLOSED {time.monotonic() - start:.3f}", flush=True)


def login(mode, port, ca, src, *passwords):
    m = connect(mode, int(port), ca, src)
    for pw in passwords:
        try:
            m.login("alice", pw)
            print("OK")
            # a fresh session for the next attempt's LOGIN
            m.logout()
            m = connect(mode, int(port), ca, src)
        except imaplib.IMAP4.abort as e:
            print(f"CLOSED {e}")
            return
        except imaplib.IMAP4.error as e:
            text = e.args[0]
            print("NO " + (text.decode() if isinstance(text, bytes) else str(text)))
        except OSError as e:
            print(f"CLOSED {e!r}")
            return
    try:
        m.logout()
    except Exception:
        pass


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {
        "fetch": fetch,
        "append": append,
        "idle": idle,
        "idle-bye": idle_bye,
        "login": login,
    }[cmd](*args)


if __name__ == "__main__":
    main()

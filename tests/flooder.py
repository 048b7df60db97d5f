"""
A hostile client for the flood tests: holds many idle TCP connections to a
gateway's plain port from many source addresses, and TLS connections that
send half a ClientHello and stall; reopens what the gateway closes, so the
flood lasts until it is killed.

    python tests/flooder.py --plain HOST:PORT:N --tls HOST:PORT:N --sources 10.1.0.10-49 --seconds S

It prints a JSON line of counts every second ("open", "reopened",
"refused"), flushed, for the test to read.
"""

import argparse
import errno
import ipaddress
import json
import resource
import selectors
import socket
import sys
import time

# A TLS record header and the start of a ClientHello: a handshake that
# never completes.
PARTIAL_HELLO = bytes.fromhex("16030100c8010000c40303") + b"\x00" * 16


def target(text):
    host, port, count = text.rsplit(":", 2)
    return host, int(port), int(count)


def sourceRange(text):
    base, _, last = text.partition("-")
    first = ipaddress.ip_address(base)
    if not last:
        return [str(first)]
    prefix = str(first).rsplit(".", 1)[0]
    return [f"{prefix}.{n}" for n in range(int(str(first).rsplit(".", 1)[1]), int(last) + 1)]


class Flood:
    def __init__(self, targets, sources):
        self.selector = selectors.DefaultSelector()
        self.targets = targets
        self.sources = sources
        self.open = 0
        self.reopened = 0
        self.refused = 0
        self.pending = []
        self._next = 0

    def connect(self, host, port, tls):
        source = self.sources[self._next % len(self.sources)]
        self._next += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind((source, 0))
            sock.connect_ex((host, port))
        except OSError as e:
            sock.close()
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.EADDRNOTAVAIL):
                self.pending.append((host, port, tls))
                return
            raise
        self.selector.register(sock, selectors.EVENT_WRITE, (host, port, tls, "connecting"))

    def start(self):
        for host, port, count, tls in self.targets:
            for _ in range(count):
                self.connect(host, port, tls)

    def step(self, timeout):
        for key, events in self.selector.select(timeout):
            sock = key.fileobj
            host, port, tls, state = key.data
            if state == "connecting":
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    self.refused += 1
                    self.selector.unregister(sock)
                    sock.close()
                    self.pending.append((host, port, tls))
                    continue
                self.open += 1
                if tls:
                    try:
                        sock.send(PARTIAL_HELLO)
                    except OSError:
                        pass
                self.selector.modify(sock, selectors.EVENT_READ, (host, port, tls, "open"))
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                # Closed by the gateway: come back.
                self.open -= 1
                self.reopened += 1
                self.selector.unregister(sock)
                sock.close()
                self.pending.append((host, port, tls))
        # Reopen at a bounded rate.
        again, self.pending = self.pending[:200], self.pending[200:]
        for host, port, tls in again:
            self.connect(host, port, tls)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--plain", type=target, action="append", default=[])
    parser.add_argument("--tls", type=target, action="append", default=[])
    parser.add_argument("--sources", required=True)
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    targets = [(h, p, n, False) for h, p, n in args.plain] + [(h, p, n, True) for h, p, n in args.tls]
    flood = Flood(targets, sourceRange(args.sources))
    flood.start()
    deadline = time.monotonic() + args.seconds
    report = time.monotonic()
    while time.monotonic() < deadline:
        flood.step(0.2)
        if time.monotonic() >= report:
            report += 1.0
            print(json.dumps({"open": flood.open, "reopened": flood.reopened, "refused": flood.refused}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

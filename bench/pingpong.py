"""
The bench's 1-byte TCP ping-pong: round-trip latency through a path.

    python -m bench.pingpong server PORT
    python -m bench.pingpong client HOST PORT [-n 2000] [--warmup 200] [--interval 0]

The server echoes each byte it reads, one connection at a time. The client
connects with TCP_NODELAY (both ends set it), sends one byte, waits for it to
come back, N times after a warm-up, and prints one JSON line: round trips
per second and the p50, p99, min and max round trip in microseconds.
C{--interval} waits between round trips (seconds), to see one round trip at a
time through an otherwise idle path (e.g. under strace).

Plain blocking sockets and time.perf_counter: the client's own cost is the
same on every path, so what a tunnel adds is the difference of the p50s.
"""

import argparse
import json
import socket
import sys
import time


def serve(port):
    listener = socket.create_server(("", port), reuse_port=False)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            recv, send = conn.recv, conn.sendall
            while True:
                try:
                    data = recv(1)
                except OSError:
                    break
                if not data:
                    break
                send(data)


def percentile(ordered, fraction):
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def client(host, port, count, warmup, interval, timeout=10.0):
    conn = socket.create_connection((host, port), timeout=timeout)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    recv, send, clock = conn.recv, conn.send, time.perf_counter
    times = []
    started = None
    for i in range(warmup + count):
        if i == warmup:
            started = clock()
        before = clock()
        send(b"x")
        if recv(1) != b"x":
            raise SystemExit("ping-pong: connection closed or wrong byte")
        if i >= warmup:
            times.append(clock() - before)
        if interval:
            time.sleep(interval)
    elapsed = clock() - started
    conn.close()
    ordered = sorted(times)
    micro = 1e6
    return {
        "count": count,
        "rate": count / elapsed,
        "p50": percentile(ordered, 0.50) * micro,
        "p99": percentile(ordered, 0.99) * micro,
        "min": ordered[0] * micro,
        "max": ordered[-1] * micro,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description="1-byte TCP ping-pong")
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("server")
    s.add_argument("port", type=int)
    c = sub.add_parser("client")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("-n", "--count", type=int, default=2000)
    c.add_argument("--warmup", type=int, default=200)
    c.add_argument("--interval", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.mode == "server":
        serve(args.port)
        return 0
    print(json.dumps(client(args.host, args.port, args.count, args.warmup, args.interval)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

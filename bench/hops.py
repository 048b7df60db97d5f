"""
Where one ENT round trip goes: strace on each of ENT's four processes
during a slow 1-byte ping-pong (one round trip per 50 ms), then, per
process crossing, wake-up (epoll_wait returns) -> read -> write, and the
time from one process's write to the next one's wake-up.

    .venv/bin/python -m bench.hops [-n 40] [--keep DIR]

Builds the bench's ENT path (fresh namespaces, deleted afterwards). strace
slows every system call (tens of µs each), so the figures are larger than
untraced ones; the shares and the count of reactor turns are what count.
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.measure import CLK_TCK, tunnelProcesses  # noqa: E402
from bench.systems import BY_KEY, path  # noqa: E402
from bench.topology import LATENCY_PORT, PINGPONG, Namespaces  # noqa: E402

SYSCALLS = "read,write,recvfrom,sendto,sendmsg,recvmsg,writev,epoll_wait,epoll_pwait,epoll_ctl"
LINE = re.compile(r"^(?:\d+ +)?(\d+\.\d+) (\w+)\((\d+)?.*\) = (-?\d+)(?: \w+ \([^)]*\))? <(\d+\.\d+)>$")
READS = {"read", "recvfrom", "recvmsg"}
WRITES = {"write", "sendto", "sendmsg", "writev"}
WAITS = {"epoll_wait", "epoll_pwait"}
# A pure ACK of the inner TCP (20 + 32 bytes, framed or not) is not on the
# round trip's path: the next request does not wait for it.
ACK_SIZES = {52, 56}
# Path order of the crossings of one round trip.
ORDER = [
    ("client enta", "→"),
    ("gw1 entg", "→"),
    ("gw2 entg", "→"),
    ("server enta", "→"),
    ("server enta", "←"),
    ("gw2 entg", "←"),
    ("gw1 entg", "←"),
    ("client enta", "←"),
]


def userSystem(pid):
    """
    (user, system) CPU seconds of C{pid}.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def parse(filename):
    events = []
    with open(filename) as f:
        for line in f:
            m = LINE.match(line.strip())
            if m:
                start, name, fd, ret, took = m.groups()
                events.append((float(start), float(start) + float(took), name, int(fd or -1), int(ret)))
    return events


def crossings(events):
    """
    Each wake-up that reads data and writes it on: (wake, first read,
    first write, last write, epoll_waits between wake and first write,
    epoll_ctls between).
    """
    out = []
    i = 0
    while i < len(events):
        start, end, name, fd, ret = events[i]
        if name in WAITS and ret > 0:
            wake = end
            read = write = last = None
            waits = ctls = 0
            j = i + 1
            while j < len(events):
                s, e, n, f, r = events[j]
                if n in WAITS:
                    if write is not None or read is None:
                        break
                    if read is not None and write is None:
                        waits += 1
                elif n == "epoll_ctl" and read is not None and write is None:
                    ctls += 1
                elif n in READS and r > 0 and read is None:
                    if r in ACK_SIZES:
                        break
                    read = s
                elif n in WRITES and r > 0 and read is not None:
                    write = write or s
                    last = s
                j += 1
            if read is not None and write is not None:
                out.append({"wake": wake, "read": read, "write": write, "last": last, "waits": waits, "ctls": ctls})
                i = j
                continue
        i += 1
    return out


def analyse(traces):
    """
    traces: {label: [crossing]}; returns per-crossing rows of the median
    wake->read, read->write, and hop (previous write -> this wake) in µs.
    """
    allCrossings = sorted(((c["wake"], label, c) for label, cs in traces.items() for c in cs), key=lambda x: x[0])
    # Split into round trips: a gap over 20 ms starts a new one.
    trips, current, last = [], [], None
    for wake, label, c in allCrossings:
        if last is not None and wake - last > 0.02:
            trips.append(current)
            current = []
        current.append((label, c))
        last = wake
    if current:
        trips.append(current)
    complete = [t for t in trips if [label for label, _ in t] == [label for label, _ in ORDER]]
    rows = []
    for index, (label, direction) in enumerate(ORDER):
        wr = [(t[index][1]["read"] - t[index][1]["wake"]) * 1e6 for t in complete]
        rw = [(t[index][1]["write"] - t[index][1]["read"]) * 1e6 for t in complete]
        waits = [t[index][1]["waits"] for t in complete]
        hop = [(t[index][1]["wake"] - t[index - 1][1]["last"]) * 1e6 for t in complete] if index else []
        rows.append(
            {
                "process": label,
                "direction": direction,
                "wake_read": statistics.median(wr) if wr else None,
                "read_write": statistics.median(rw) if rw else None,
                "waits": statistics.median(waits) if waits else None,
                "hop_before": statistics.median(hop) if hop else None,
            }
        )
    edges = [((t[-1][1]["write"] - t[0][1]["wake"]) * 1e6) for t in complete]
    return rows, len(trips), len(complete), statistics.median(edges) if edges else None


def table(rows, trips, complete, span):
    lines = [
        f"{complete} of {trips} round trips seen whole; median of each step, µs (under strace):",
        "",
        "| # | process | direction | previous write → wake-up | wake-up → read | read → write "
        "| epoll_waits between read and write |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows, 1):
        fmt = lambda v: "—" if v is None else f"{v:.0f}"  # noqa: E731
        lines.append(
            f"| {i} | {r['process']} | {r['direction']} | {fmt(r['hop_before'])} | "
            f"{fmt(r['wake_read'])} | {fmt(r['read_write'])} | {fmt(r['waits'])} |"
        )
    lines += [
        "",
        f"Client agent's first wake-up to its write of the answer to its TUN, median: {span:.0f} µs." if span else "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="per-hop breakdown of an ENT round trip (strace)")
    parser.add_argument("-n", type=int, default=40)
    parser.add_argument("--keep", help="keep the strace files in this directory")
    parser.add_argument("--analyse", metavar="DIR", help="only analyse the strace files kept in DIR")
    args = parser.parse_args(argv)
    if args.analyse:
        traces = {
            name[: -len(".strace")].replace("-", " "): crossings(parse(os.path.join(args.analyse, name)))
            for name in os.listdir(args.analyse)
            if name.endswith(".strace")
        }
        print(table(*analyse(traces)))
        return 0
    if shutil.which("strace") is None:
        raise SystemExit("strace is missing: apt-get install strace (scripts/bench.sh does)")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    prefix = f"enth{os.getpid()}"
    namespaces = Namespaces(prefix)
    workdir = args.keep or tempfile.mkdtemp(prefix="ent-hops-")
    os.makedirs(workdir, exist_ok=True)
    logdir = tempfile.mkdtemp(prefix="ent-hops-logs-")
    try:
        with path(BY_KEY["ent"], prefix, namespaces, logdir) as (t, target, _):
            processes = tunnelProcesses(t)
            # Untraced first: CPU time of each process per round trip of a
            # fast ping-pong (two crossings of each process).
            before = {pid: userSystem(pid) for pid in processes}
            fast = t.exec(
                "client",
                sys.executable,
                PINGPONG,
                "client",
                target,
                str(LATENCY_PORT),
                "-n",
                "3000",
                "--warmup",
                "0",
                timeout=120,
            )
            cpu = {}
            for pid, label in processes.items():
                after = userSystem(pid)
                cpu[label] = [(after[k] - before[pid][k]) / 3000 * 1e6 for k in (0, 1)]
            tracers = []
            for pid, label in processes.items():
                out = os.path.join(workdir, label.replace(" ", "-") + ".strace")
                tracers.append(
                    (
                        label,
                        out,
                        subprocess.Popen(
                            ["strace", "-f", "-ttt", "-T", "-e", f"trace={SYSCALLS}", "-o", out, "-p", str(pid)],
                            stderr=subprocess.DEVNULL,
                        ),
                    )
                )
            time.sleep(1.5)
            result = t.exec(
                "client",
                sys.executable,
                PINGPONG,
                "client",
                target,
                str(LATENCY_PORT),
                "-n",
                str(args.n),
                "--warmup",
                "5",
                "--interval",
                "0.05",
                timeout=120,
            )
            for _, _, p in tracers:
                p.send_signal(signal.SIGINT)
            for _, _, p in tracers:
                p.wait(timeout=10)
    finally:
        shutil.rmtree(logdir, ignore_errors=True)
    print("ping-pong untraced:", fast.stdout.strip())
    print(
        "CPU µs per round trip, user + system (untraced): "
        + ", ".join(f"{label} {u:.0f} + {s:.0f}" for label, (u, s) in sorted(cpu.items()))
    )
    print("ping-pong under strace:", result.stdout.strip())
    traces = {label: crossings(parse(out)) for label, out, _ in tracers}
    rows, trips, complete, span = analyse(traces)
    print(table(rows, trips, complete, span))
    print(json.dumps({"rows": rows}))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    left = namespaces.leftovers()
    print(f"left behind: {', '.join(left) if left else 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

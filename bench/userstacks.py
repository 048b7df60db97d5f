"""
User-space TCP/IP stacks side by side: libslirp (through slirp4netns, the
same libslirp 4.7 as ENT's --stack user) against passt's pasta, with and
without 20 ms of added round trip between the app's kernel and the stack.

    .venv/bin/python -m bench.userstacks      (or: make bench-userstacks)

Everything runs in namespaces made here and deleted afterwards:

    guest ──(TUN pair, delayed)── router ══ stack's tap ══ [stack in "stack"] ── veth ── far
    iperf3 -c                     forwards,                pasta or               iperf3 -s
                                  masquerades              slirp4netns            (10.9.0.2)

The stack (pasta or slirp4netns) runs in the namespace "stack", which is
its "host": its sockets open there, and the only thing they can reach is the
"far" namespace over a veth. It serves the "router" namespace through a tap
device; the app runs in "guest", one more hop away, because this machine's
kernel has no netem: a small delayer here (mode C{delayer}) joins guest
and router with two TUN devices and holds each packet half the round trip
in each direction, so the TCP loop between the app's kernel and the stack
spans the delay, as the tunnel does for ENT's rootless agent.
"""

import argparse
import ctypes
import datetime
import heapq
import itertools
import os
import platform
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import measure as tools  # noqa: E402
from bench.topology import MeasureError, say  # noqa: E402
from ent.testing.topology import Topology  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PINGPONG = os.path.join(HERE, "pingpong.py")
HOSTS = ("stack", "far", "router", "guest")
LINKS = (("stack", "10.9.0.1", "far", "10.9.0.2"),)
FAR = "10.9.0.2"
IPERF_PORT, LATENCY_PORT = 5201, 5202
DELAYS = (0, 20)
TUN_MTU = 65000
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000


# --- the delayer -----------------------------------------------------------


def openTun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    import fcntl

    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def delayer(guestNetns, delayFile):
    """
    TUN "dly" here and TUN "dly" in C{guestNetns}; every packet read on one
    is written to the other RTT/2 later (RTT in ms from C{delayFile}).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    local = openTun("dly")
    target = os.open(guestNetns, os.O_RDONLY)
    if libc.setns(target, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns guest")
    guest = openTun("dly")
    if libc.setns(home, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns back")
    peer = {local: guest, guest: local}
    selector = selectors.DefaultSelector()
    for fd in peer:
        selector.register(fd, selectors.EVENT_READ)
    held, seq = [], itertools.count()
    half, checked = 0.0, 0.0
    while True:
        now = time.monotonic()
        if now - checked > 0.2:
            checked = now
            try:
                with open(delayFile) as f:
                    half = float(f.read().strip() or 0) / 2000
            except (OSError, ValueError):
                pass
        while held and held[0][0] <= now:
            _, _, fd, packet = heapq.heappop(held)
            try:
                os.write(fd, packet)
            except OSError:
                pass
        timeout = max(0.0, held[0][0] - now) if held else 0.2
        for key, _ in selector.select(min(timeout, 0.2)):
            for _ in range(64):
                try:
                    packet = os.read(key.fd, 65536)
                except BlockingIOError:
                    break
                if half:
                    heapq.heappush(held, (time.monotonic() + half, next(seq), peer[key.fd], packet))
                else:
                    try:
                        os.write(peer[key.fd], packet)
                    except OSError:  # the far TUN is not up yet
                        pass


# --- the paths -------------------------------------------------------------

STACKS = {
    # The stack's tap in "router" gets the "stack" namespace's address
    # (10.9.0.1/24, default via 10.9.0.2: pasta copies them); -4, no port
    # forwarding either way, and the gateway address is not mapped to the
    # host's loopback.
    "pasta": lambda t: [
        "pasta",
        "-f",
        "-q",
        "-4",
        "--runas",
        "0",
        "--config-net",
        "-I",
        "tap0",
        "-t",
        "none",
        "-u",
        "none",
        "-T",
        "none",
        "-U",
        "none",
        "--no-map-gw",
        "--no-dhcp",
        "--netns",
        t.ns("router"),
    ],
    # 10.0.2.100/24 on tap0, default via 10.0.2.2; the host's loopback refused.
    "slirp4netns": lambda t: [
        "slirp4netns",
        "--configure",
        "--mtu=65520",
        "--disable-host-loopback",
        "--netns-type=path",
        f"/run/netns/{t.ns('router')}",
        "tap0",
    ],
}


def check(t, host, *argv):
    result = t.exec(host, *argv)
    if result.returncode != 0:
        raise RuntimeError(f"{host}: {' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


def build(t, stack, delayFile):
    check(t, "stack", "ip", "route", "add", "default", "via", FAR)
    t.start("far", "iperf3", "-s", "-p", str(IPERF_PORT), name="iperf3-server")
    t.start("far", sys.executable, PINGPONG, "server", str(LATENCY_PORT), name="pingpong-server")
    t.start(
        "router",
        sys.executable,
        os.path.abspath(__file__),
        "delayer",
        f"/run/netns/{t.ns('guest')}",
        delayFile,
        name="delayer",
    )
    t.waitFor(lambda: t.exec("guest", "ip", "link", "show", "dly").returncode == 0)
    for host, address in (("router", "172.31.0.1/30"), ("guest", "172.31.0.2/30")):
        check(t, host, "ip", "link", "set", "dly", "mtu", str(TUN_MTU), "up")
        check(t, host, "ip", "addr", "add", address, "dev", "dly")
    check(t, "guest", "ip", "route", "add", "default", "dev", "dly")
    check(t, "router", "sysctl", "-qw", "net.ipv4.ip_forward=1")
    t.start("stack", *STACKS[stack](t), name=stack)
    t.waitFor(lambda: "inet " in t.exec("router", "ip", "-4", "addr", "show", "dev", "tap0").stdout, timeout=15)
    check(
        t,
        "router",
        "nft",
        "add table ip nat; add chain ip nat post { type nat hook postrouting priority 100; }; "
        "add rule ip nat post oifname tap0 masquerade",
    )
    t.waitFor(
        lambda: (
            t.exec(
                "guest",
                sys.executable,
                PINGPONG,
                "client",
                FAR,
                str(LATENCY_PORT),
                "-n",
                "3",
                "--warmup",
                "0",
                timeout=15,
            ).returncode
            == 0
        ),
        timeout=20,
        interval=0.5,
    )


def iperf(t, seconds, reverse):
    try:
        return tools.iperf(t, FAR, seconds, reverse, port=IPERF_PORT, host="guest")["bps"]
    except MeasureError as e:
        say(f"    {e}")
        return None


def pingpong(t, rtt):
    count, warmup = (2000, 200) if not rtt else (150, 10)
    try:
        return tools.pingpong(t, FAR, count, warmup, port=LATENCY_PORT, host="guest", server=None)
    except MeasureError:
        return None


def wscale(t, stack):
    """
    Whether the stack's SYN-ACK to the guest carries a window scale option:
    from ss in the guest, for a fresh connection.
    """
    probe = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            t.ns("guest"),
            sys.executable,
            PINGPONG,
            "client",
            FAR,
            str(LATENCY_PORT),
            "-n",
            "300",
            "--warmup",
            "0",
            "--interval",
            "0.01",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1)
        out = t.exec("guest", "ss", "-tni", "dst", FAR).stdout
    finally:
        probe.wait(30)
    return "wscale:" in out, " ".join(w for w in out.split() if w.startswith(("wscale:", "mss:", "rtt:")))


def measure(stack, seconds, delays, prefix, logdir):
    results = {}
    t = Topology(prefix=prefix, logdir=logdir, hosts=HOSTS, links=LINKS)
    delayFile = os.path.join(logdir, "rtt-ms")
    with open(delayFile, "w") as f:
        f.write("0")
    try:
        t.__enter__()
        build(t, stack, delayFile)
        results["wscale"] = wscale(t, stack)
        say(f"    window scaling toward the guest: {results['wscale'][0]} ({results['wscale'][1]})")
        for rtt in delays:
            with open(delayFile, "w") as f:
                f.write(str(rtt))
            time.sleep(0.5)
            pp = pingpong(t, rtt)
            forward, reverse = iperf(t, seconds, False), iperf(t, seconds, True)
            results[rtt] = {"forward": forward, "reverse": reverse, "pingpong": pp}
            say(
                f"    +{rtt:>2} ms  → {mbit(forward)} Mbit/s  ← {mbit(reverse)} Mbit/s  "
                + (f"ping-pong p50 {pp['p50']:.0f} µs" if pp else "")
            )
    finally:
        t.destroy()
    return results


def mbit(value):
    return "—" if value is None else f"{value / 1e6:.0f}" if value >= 1e8 else f"{value / 1e6:.1f}"


def render(results, info, seconds, delays):
    lines = [
        "## User-space stacks: libslirp against pasta",
        "",
        f"Run {info['date']} with `make bench-userstacks` (`python -m bench.userstacks`), Linux {info['kernel']}, "
        f"{info['nproc']} CPUs. slirp4netns {info['slirp4netns']} (libslirp {info['libslirp']}), "
        f"pasta from passt {info['passt']}. The app (iperf3 -c, one stream, {seconds} s; ping-pong) runs in a "
        "namespace one TUN hop away from the stack's tap, through a delayer that holds each packet half the "
        "added round trip each way (no netem on this kernel); the stack runs in its own namespace whose only "
        "network is a veth to the iperf3 server's. Both stacks go through the same delayer and the same hops.",
        "",
        "| stack | window scaling to the app | added RTT | → Mbit/s | ← Mbit/s | ping-pong p50 µs |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for stack in STACKS:
        entry = results.get(stack) or {}
        ws = entry.get("wscale")
        for rtt in delays:
            r = entry.get(rtt) or {}
            pp = r.get("pingpong")
            lines.append(
                f"| {stack} | {'yes' if ws and ws[0] else 'no' if ws else '—'} | +{rtt} ms | "
                f"{mbit(r.get('forward'))} | {mbit(r.get('reverse'))} | "
                f"{pp['p50']:.0f} |"
                if pp
                else f"| {stack} | — | +{rtt} ms | {mbit(r.get('forward'))} | {mbit(r.get('reverse'))} | — |"
            )
    return "\n".join(lines) + "\n"


def version(package):
    return (
        subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True).stdout or "?"
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["delayer"]:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        return delayer(argv[1], argv[2])
    parser = argparse.ArgumentParser(description="libslirp against pasta, in namespaces")
    parser.add_argument("--time", type=int, default=5)
    parser.add_argument("--delays", default=",".join(map(str, DELAYS)))
    parser.add_argument("--only", help="pasta or slirp4netns")
    parser.add_argument("--out", help="where to write userstacks.md (default bench/)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("run as root: this creates network namespaces")
    missing = [tool for tool in ("pasta", "slirp4netns", "iperf3") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: apt-get install passt slirp4netns iperf3")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    delays = tuple(int(d) for d in args.delays.split(","))
    info = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "kernel": platform.release(),
        "nproc": os.cpu_count(),
        "passt": version("passt"),
        "slirp4netns": version("slirp4netns"),
        "libslirp": version("libslirp0"),
    }
    prefix = f"entu{os.getpid()}"
    logroot = tempfile.mkdtemp(prefix="userstacksbench-")
    results = {}
    try:
        for stack in args.only.split(",") if args.only else STACKS:
            say(f"== {stack}")
            logdir = os.path.join(logroot, stack)
            os.makedirs(logdir)
            try:
                results[stack] = measure(stack, args.time, delays, prefix, logdir)
            except (RuntimeError, TimeoutError, OSError, subprocess.SubprocessError) as e:
                say(f"    FAILED: {e}")
    except KeyboardInterrupt:
        say("interrupted: cleaned up")
        return 130
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
    left = [line.split()[0] for line in listed if line.startswith(prefix + "-")]
    say(f"left behind: {', '.join(left) if left else 'nothing'} (logs in {logroot})")
    report = render(results, info, args.time, delays)
    say("\n" + report)
    out = args.out or HERE
    with open(os.path.join(out, "userstacks.md"), "w") as f:
        f.write("# ENT benchmark: user-space stacks\n\n" + report)
    return 1 if left or len(results) < len(STACKS) else 0


if __name__ == "__main__":
    sys.exit(main())

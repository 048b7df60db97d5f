"""
The rootless agent (C{--stack user}, libslirp) beside the TUN agent, on the
four-host namespace topology of L{ent.topology}, with 0, 5 and 20 ms of
round trip added on the gateway link.

    .venv/bin/python -m bench.rootless          (or: make bench-rootless)

Four pairs of agents: TUN client + TUN server (the baseline), rootless
client + TUN server, TUN client + rootless server, rootless at both ends.
For each, one fresh set of namespaces; the added delay is netem on the
gw1 <-> gw2 veth, half the round trip on each side (egress of gw1's end and
of gw2's end), changed in place between the delays. On a kernel without
netem, gw1's gateway reaches gw2's through bench/delayrelay.py instead,
which holds what it carries half the round trip each way (in the path for
every delay, 0 included). Nothing is configured
in the root namespace; the namespaces are deleted afterwards, also on
failure or Ctrl-C.

Measured, per pair and delay:
  - iperf3, one TCP stream, client -> server and server -> client (-R);
    iperf3 -s listens on port 7 of the server host, which the server agent
    replays (TUN: --replay 7) or exposes (rootless: --expose 6978=7); the
    iperf3 client connects to 10.3.0.2:7 (captured by the TUN agent's
    --dport 7) or to the rootless client agent's --listen 127.0.0.1:7007.
  - latency: bench/pingpong.py (1-byte request/response, TCP_NODELAY),
    to the server host's port 5202, mapped and exposed beside iperf3's.
  - the agents' CPU seconds per GB of each iperf3 run and peak RSS (VmHWM).

Writes bench/rootless.md (bench/results.md links it).
"""

import argparse
import contextlib
import datetime
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: python bench/rootless.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import measure as tools  # noqa: E402
from bench.topology import MeasureError, say  # noqa: E402
from ent.testing.topology import ADDRESS, USER_LISTEN_PORT, Tunnel  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PINGPONG = os.path.join(HERE, "pingpong.py")
SERVICE_PORT = 7  # iperf3 -s, behind the server agent
LATENCY_PORT = 5202  # bench/pingpong.py server, behind the server agent
LATENCY_LISTEN = USER_LISTEN_PORT + 1  # the rootless client's local port for it
TUN_SERVER = "192.168.0.254"
DELAYS = (0, 5, 20)  # ms of round trip added on the gw1 <-> gw2 link
GW_LINK = {"gw1": "v1gw1", "gw2": "v1gw2"}  # ent.topology's names for that veth pair's ends
RELAY_PORT = 16979  # bench/delayrelay.py in gw1, in front of gw2's 6979, when there is no netem
DELAYRELAY = os.path.join(HERE, "delayrelay.py")
CLK_TCK = os.sysconf("SC_CLK_TCK")
WINDOW = 65535  # bytes: slirp's largest window, no scaling


class Pair:
    def __init__(self, key, client, server):
        self.key, self.client, self.server = key, client, server

    @property
    def label(self):
        return f"{self.client} client, {self.server} server"

    @property
    def unprivileged(self):
        return [h for h, kind in (("client", self.client), ("server", self.server)) if kind == "rootless"]

    def roleArgs(self):
        if self.client == "rootless":
            client = [
                "--stack",
                "user",
                "--listen",
                f"{USER_LISTEN_PORT}={TUN_SERVER}:6978",
                "--listen",
                f"{LATENCY_LISTEN}={TUN_SERVER}:{LATENCY_PORT}",
            ]
        else:
            client = [
                "--dport",
                str(SERVICE_PORT),
                "--map",
                f"{ADDRESS['server']}:{LATENCY_PORT}={TUN_SERVER}:{LATENCY_PORT}",
            ]
        if self.server == "rootless":
            server = ["--stack", "user", "--expose", f"6978={SERVICE_PORT}", "--expose", str(LATENCY_PORT)]
        else:
            server = ["--replay", str(SERVICE_PORT), "--expose", str(LATENCY_PORT)]
        return {"client": client, "server": server}

    def targets(self):
        """
        (iperf3 host, port), (ping-pong host, port) as the client host's apps see them.
        """
        if self.client == "rootless":
            return ("127.0.0.1", USER_LISTEN_PORT), ("127.0.0.1", LATENCY_LISTEN)
        return (ADDRESS["server"], SERVICE_PORT), (ADDRESS["server"], LATENCY_PORT)


PAIRS = [
    Pair("tun", "TUN", "TUN"),
    Pair("userclient", "rootless", "TUN"),
    Pair("userserver", "TUN", "rootless"),
    Pair("userboth", "rootless", "rootless"),
]
BY_KEY = {p.key: p for p in PAIRS}


class BenchTunnel(Tunnel):
    """
    ENT's four services with iperf3 -s on port 7 and the ping-pong server
    on 5202 of the server host, instead of the echo server.
    """

    def __init__(self, pair, prefix, logdir):
        super().__init__(roleArgs=pair.roleArgs(), unprivileged=pair.unprivileged, logdir=logdir)
        self.pair = pair
        self.topology.prefix = prefix
        self.method = None
        self.delayFile = os.path.join(logdir, "delay-ms")

    def startAll(self):
        t = self.topology
        self.echo = None
        # netem where the kernel has it; else a delaying relay in gw1, in
        # the path of the gateways' leg for every delay (0 ms included).
        probe = t.exec("gw1", "tc", "qdisc", "add", "dev", GW_LINK["gw1"], "root", "netem", "delay", "0ms")
        if probe.returncode == 0:
            t.exec("gw1", "tc", "qdisc", "del", "dev", GW_LINK["gw1"], "root")
            self.method = "netem"
        else:
            self.method = "relay"
            with open(self.delayFile, "w") as f:
                f.write("0")
            t.start(
                "gw1",
                sys.executable,
                DELAYRELAY,
                str(RELAY_PORT),
                ADDRESS["gw2"],
                "6979",
                self.delayFile,
                name="gw1-delayrelay",
            )
            t.waitFor(lambda: t.exec("gw1", "ss", "-Hltn", f"sport = :{RELAY_PORT}").stdout.strip())
        t.start("server", "iperf3", "-s", "-p", str(SERVICE_PORT), name="iperf3-server")
        t.start("server", sys.executable, PINGPONG, "server", str(LATENCY_PORT), name="pingpong-server")
        for host in ("gw2", "gw1", "server", "client"):
            self.startService(host)
        try:
            t.waitFor(self.tunnelUp, timeout=40, interval=0.5)
        except TimeoutError:
            raise MeasureError(f"the tunnel did not come up; logs:\n{self.logs()}")

    def startService(self, host):
        if host == "gw1" and self.method == "relay":
            process = self.topology.twistd(
                "gw1", "entg", "--entg-connect", f"127.0.0.1:{RELAY_PORT}", "--enta-listen", "6980", *self.gatewayArgs
            )
            self.services[host] = process
            return process
        return super().startService(host)

    def tunnelUp(self):
        # A few ping-pong round trips: the same for every pair (a rootless
        # client has no TUN to ping through).
        _, (host, port) = self.pair.targets()
        try:
            result = self.topology.exec(
                "client", sys.executable, PINGPONG, "client", host, str(port), "-n", "3", "--warmup", "0", timeout=15
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0


def setDelay(tunnel, rtt):
    """
    netem on both ends of the gw1 <-> gw2 veth, rtt/2 each way (a large
    queue limit: the default 1000 packets would drop at the TUN path's rate);
    or the relay's hold, rtt/2 each way.
    """
    t = tunnel.topology
    if tunnel.method == "relay":
        with open(tunnel.delayFile + ".new", "w") as f:
            f.write(f"{rtt / 2:g}")
        os.replace(tunnel.delayFile + ".new", tunnel.delayFile)
        time.sleep(0.6)
        return
    for host, dev in GW_LINK.items():
        if rtt:
            argv = ["tc", "qdisc", "replace", "dev", dev, "root", "netem", "delay", f"{rtt / 2:g}ms", "limit", "100000"]
        else:
            argv = ["tc", "qdisc", "del", "dev", dev, "root"]
        result = t.exec(host, *argv)
        if result.returncode != 0 and rtt:
            raise MeasureError(f"{host}: {' '.join(argv)}: {result.stderr.strip()}")


def cpuSeconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def peakRss(pid):
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return None


def pingpong(t, host, port, rtt):
    # Fewer round trips with a delay, so that each run stays a few seconds.
    count, warmup = {0: (2000, 200), 5: (400, 20)}.get(rtt, (150, 10))
    return tools.pingpong(t, host, count, warmup, port=port, server=None)


def measure(tunnel, rtt, seconds):
    t, pair = tunnel.topology, tunnel.pair
    (host, port), (lhost, lport) = pair.targets()
    agents = {h: tunnel.services[h].pid for h in ("client", "server")}
    out = {"errors": []}

    def attempt(key, function, *args, **kwargs):
        try:
            out[key] = function(*args, **kwargs)
        except (MeasureError, subprocess.TimeoutExpired) as e:
            out[key] = None
            out["errors"].append(f"{key}: {e}")
            say(f"    {key}: FAILED: {str(e).splitlines()[0]}")

    attempt("pingpong", pingpong, t, lhost, lport, rtt)
    for key, reverse in (("forward", False), ("reverse", True)):
        before = {h: cpuSeconds(pid) for h, pid in agents.items()}
        attempt(key, tools.iperf, t, host, seconds, reverse=reverse, port=port)
        after = {h: cpuSeconds(pid) for h, pid in agents.items()}
        if out.get(key) and out[key]["bytes"]:
            gb = out[key]["bytes"] / 1e9
            out[key]["cpu"] = {
                h: (after[h] - before[h]) / gb for h in agents if before[h] is not None and after[h] is not None
            }
    pp = out.get("pingpong")
    say(
        f"    +{rtt:>2} ms  → {rate(out.get('forward'))}  ← {rate(out.get('reverse'))}  "
        + (f"ping-pong p50 {pp['p50']:.0f} µs, p99 {pp['p99']:.0f} µs" if pp else "ping-pong —")
    )
    return out


def rate(entry):
    if not entry:
        return "—"
    value = entry["bps"]
    return f"{value / 1e9:.2f} Gbit/s" if value >= 1e9 else f"{value / 1e6:.1f} Mbit/s"


def runPair(pair, prefix, logroot, seconds, delays, created):
    logdir = os.path.join(logroot, pair.key)
    os.makedirs(logdir)
    tunnel = BenchTunnel(pair, prefix, logdir)
    results = {"load": os.getloadavg()[0]}
    try:
        tunnel.topology.__enter__()
        created.update(tunnel.topology.created)
        tunnel.startAll()
        for rtt in delays:
            setDelay(tunnel, rtt)
            results[rtt] = measure(tunnel, rtt, seconds)
        results["method"] = tunnel.method
        results["rss"] = {h: peakRss(tunnel.services[h].pid) for h in ("client", "server")}
        tunnel.stopServices()
    finally:
        with shielded():
            tunnel.topology.destroy()
    return results


@contextlib.contextmanager
def shielded():
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def mbit(entry):
    return "—" if not entry else f"{entry['bps'] / 1e6:.0f}" if entry["bps"] >= 1e8 else f"{entry['bps'] / 1e6:.1f}"


def cpuCell(entry):
    if not entry or not entry.get("cpu"):
        return "—"
    return " / ".join(f"{entry['cpu'].get(h, 0):.1f}" for h in ("client", "server"))


def delayText(results):
    methods = {r.get("method") for r in results.values()} - {None}
    if methods == {"netem"}:
        return "Added RTT: netem on the gw1 ↔ gw2 veth, half the round trip on each end."
    if methods == {"relay"}:
        return (
            "Added RTT: this kernel has no netem (CONFIG_NET_SCH_NETEM not set), so gw1's gateway reaches "
            "gw2's through `bench/delayrelay.py` (in gw1, for every row, +0 ms included), which holds each "
            "chunk half the round trip in each direction: the tunnel's packets get the whole added round "
            "trip, the gateways' own TCP leg does not."
        )
    return f"Added RTT: {', '.join(sorted(methods)) or 'not set'} (see bench/rootless.py)."


def render(results, info, seconds, delays):
    lines = [
        "## Rootless agent (--stack user)",
        "",
        f"Run {info['date']} with `make bench-rootless` (`python -m bench.rootless`). Machine: Linux "
        f"{info['kernel']}, {info['nproc']} CPUs (nproc), Python {info['python']}, iperf3 {info['iperf3']}.",
        "",
        "Four namespaces (client host — gw1 — gw2 — server host), fresh for each pair of agents; a rootless "
        "agent runs as nobody with no capabilities (`setpriv`, as the tests do) and libslirp 4.7 instead of "
        "a TUN. " + delayText(results) + " iperf3: one TCP stream, "
        f"{seconds} s, client → server and server → client (`-R`), receiver's rate, to `iperf3 -s -p 7` "
        "on the server host (TUN server: `--replay 7`; rootless server: `--expose 6978=7`), from the client "
        "host's 10.3.0.2:7 (TUN client: `--dport 7`) or 127.0.0.1:7007 (rootless client: "
        "`--listen 7007=192.168.0.254:6978`). Ping-pong: `bench/pingpong.py` to port 5202 beside it "
        '(2000 round trips at +0 ms, 400 at +5, 150 at +20). "64 KiB ÷ RTT" is slirp\'s bound without '
        "window scaling, with the ping-pong p50 as the RTT. CPU: the agents' utime + stime per GB "
        "received, client / server agent.",
        "",
        "| client agent | server agent | added RTT | → Mbit/s | ← Mbit/s | 64 KiB ÷ RTT Mbit/s "
        "| ping-pong p50 µs | p99 µs | CPU s/GB → (client / server) | CPU s/GB ← |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for pair in PAIRS:
        entry = results.get(pair.key)
        if entry is None:
            continue
        for rtt in delays:
            r = entry.get(rtt) or {}
            pp = r.get("pingpong")
            bound = "—"
            if pp and pair.unprivileged:
                bound = f"{WINDOW * 8 / (pp['p50'] / 1e6) / 1e6:.0f}"
            lines.append(
                "| "
                + " | ".join(
                    [
                        pair.client,
                        pair.server,
                        f"+{rtt} ms",
                        mbit(r.get("forward")),
                        mbit(r.get("reverse")),
                        bound,
                        f"{pp['p50']:.0f}" if pp else "—",
                        f"{pp['p99']:.0f}" if pp else "—",
                        cpuCell(r.get("forward")),
                        cpuCell(r.get("reverse")),
                    ]
                )
                + " |"
            )
    lines += [
        "",
        "Peak RSS (VmHWM) of the agents at the end of each pair's runs, MB (10^6 bytes):",
        "",
        "| client agent | server agent | client agent RSS | server agent RSS |",
        "|---|---|---:|---:|",
    ]
    for pair in PAIRS:
        rss = (results.get(pair.key) or {}).get("rss") or {}
        cells = [f"{rss[h] / 1e6:.1f}" if rss.get(h) else "—" for h in ("client", "server")]
        lines.append(f"| {pair.client} | {pair.server} | {cells[0]} | {cells[1]} |")
    loads = ", ".join(
        f"{p.client}/{p.server} {results[p.key]['load']:.2f}"
        for p in PAIRS
        if (results.get(p.key) or {}).get("load") is not None
    )
    lines += [
        "",
        f"1-minute load average when each pair started (client/server agent): {loads}. The "
        f"{info['nproc']} CPUs are shared by every process of the path; compare rows within one run.",
    ]
    errors = [(p, e) for p in PAIRS for e in (results.get(p.key) or {}).get("errors", [])]
    errors += [
        (p, f"+{rtt} ms {e}")
        for p in PAIRS
        for rtt in delays
        for e in ((results.get(p.key) or {}).get(rtt) or {}).get("errors", [])
    ]
    if errors:
        lines += ["", "Failed measurements:", ""]
        lines += [f"- {p.label}: {e.splitlines()[0]}" for p, e in errors]
    return "\n".join(lines) + "\n"


def machineInfo():
    iperf3 = subprocess.run(["iperf3", "--version"], capture_output=True, text=True).stdout.split()
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "kernel": platform.release(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "iperf3": iperf3[1] if len(iperf3) > 1 else "?",
    }


def leftovers(prefix):
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
    return [line.split()[0] for line in listed if line.startswith(prefix + "-")]


def main(argv=None):
    parser = argparse.ArgumentParser(description="ENT's rootless agent beside the TUN agent")
    parser.add_argument("--time", type=int, default=5, help="seconds of each iperf3 run (default 5)")
    parser.add_argument("--only", help="comma-separated pairs: " + ",".join(BY_KEY))
    parser.add_argument("--delays", default=",".join(map(str, DELAYS)), help="added round trips in ms (default 0,5,20)")
    parser.add_argument("--out", help="where to write rootless.md (default: bench/, when every pair ran)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the benchmark creates network namespaces: run it as root")
    pairs = PAIRS if not args.only else [BY_KEY[k] for k in args.only.split(",")]
    delays = tuple(int(d) for d in args.delays.split(","))
    out = args.out or (None if args.only or args.delays != parser.get_default("delays") else HERE)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)

    info = machineInfo()
    prefix = f"entr{os.getpid()}"
    logroot = tempfile.mkdtemp(prefix="rootlessbench-")
    created = set()
    results = {}
    started = time.monotonic()
    say(f"ENT rootless benchmark: {len(pairs)} pairs × {len(delays)} delays, iperf3 {args.time} s (logs in {logroot})")
    interrupted = False
    try:
        for pair in pairs:
            say(f"\n== {pair.label}")
            try:
                results[pair.key] = runPair(pair, prefix, logroot, args.time, delays, created)
            except (MeasureError, TimeoutError, OSError, subprocess.SubprocessError) as e:
                say(f"    FAILED: {e}")
                results[pair.key] = {"errors": [str(e)]}
    except KeyboardInterrupt:
        interrupted = True
        say("\ninterrupted: cleaned up")
    left = leftovers(prefix)
    say(
        f"\nleft behind: {', '.join(left) if left else 'nothing'} ({len(created)} namespaces were created "
        f"and deleted); {time.monotonic() - started:.0f} s"
    )
    if interrupted:
        return 130
    report = render(results, info, args.time, delays)
    say("\n" + report)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "rootless.md"), "w") as f:
            f.write("# ENT benchmark: rootless agent\n\n" + report)
        say(f"wrote {os.path.join(out, 'rootless.md')}")
    failed = any(r.get("errors") or any((r.get(d) or {}).get("errors") for d in delays) for r in results.values())
    if not failed:
        import shutil

        shutil.rmtree(logroot, ignore_errors=True)
    else:
        say(f"some measurements failed; logs in {logroot}")
    return 1 if failed or left else 0


if __name__ == "__main__":
    sys.exit(main())

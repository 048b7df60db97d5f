"""
ENT's benchmark: ENT against OpenVPN and plain kernel routing, on the
four-host namespace topology of L{ent.topology}.

    .venv/bin/python -m bench.run          (or: make bench)

Each configuration gets its own fresh namespaces (client host, gateway 1,
gateway 2, server host); nothing is configured in the root namespace, and
the namespaces are deleted afterwards, also on Ctrl-C or SIGTERM.

  - kernel:        ip_forward in the two gateway namespaces, static routes;
                   the physical limit of the path.
  - ENT:           ENT's four services, capturing/replaying the iperf3 port,
                   with the default TUN MTU (65535) and with --mtu 1500.
  - OpenVPN:       OpenVPN 2.6 point-to-point in TCP mode without TLS and
                   without crypto, on the client and server hosts, with socat
                   TCP relays in the two gateways; default MTU (1500) and
                   --tun-mtu 60000.

Measured with public tools only: iperf3 (one stream each way, four streams
forward) and ping. For the tunnel's own processes: CPU seconds per GB of the
single-stream forward run (utime+stime from /proc/PID/stat) and peak RSS
(VmHWM). Writes bench/results.md and bench/results.png.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a script: python bench/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ent.topology import ADDRESS, HOSTS, Topology, Tunnel  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PORT = 5201  # iperf3's port, the one ENT captures and replays
PINGPONG = os.path.join(HERE, "pingpong.py")
LATENCY_PORT = 5202  # the ping-pong server's (bench/pingpong.py), mapped and exposed by ENT too
TUN_CLIENT, TUN_SERVER = "192.168.0.1", "192.168.0.254"
RSS_LIMIT = 60_000_000  # bytes: the goal "under 60 MB" (MB = 10^6 bytes)
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Processes in the namespaces that are measuring, not tunnelling.
NOT_TUNNEL = {"iperf3", "ping", "ip", "sysctl", "ss", "python", "python3"}
OPENVPN_COMMON = ["--dev", "tun", "--cipher", "none", "--auth", "none", "--disable-dco", "--verb", "3"]


class Config:
    def __init__(self, key, label, kind, mtu, options=(), gatewayOptions=(), scrape=False):
        self.key, self.label, self.kind, self.mtu, self.options = key, label, kind, mtu, list(options)
        self.gatewayOptions = list(gatewayOptions)
        # Scrape every ENT process's --metrics once a second while measuring.
        self.scrape = scrape


METRICS = ["--metrics", "tcp:9100:interface=127.0.0.1"]
SCRAPER = (
    "import time, urllib.request\n"
    "while True:\n"
    "    urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=5).read()\n"
    "    time.sleep(1)\n"
)


CONFIGS = [
    Config("kernel", "kernel routing", "kernel", 1500),
    Config("ent", "ENT default", "ent", 65535),
    Config("ent1500", "ENT --mtu 1500", "ent", 1500, ["--mtu", "1500"]),
    Config("entmetrics", "ENT default, --metrics scraped 1/s", "ent", 65535, METRICS, METRICS, scrape=True),
    Config("openvpn", "OpenVPN default", "openvpn", 1500),
    Config("openvpn60000", "OpenVPN --tun-mtu 60000", "openvpn", 60000, ["--tun-mtu", "60000"]),
]
BY_KEY = {c.key: c for c in CONFIGS}
# Which OpenVPN configuration each row is compared with. OpenVPN's default
# TUN MTU is 1500, so "OpenVPN default" is also "OpenVPN at MTU 1500".
OPENVPN_BASELINE = {"ent": "openvpn", "ent1500": "openvpn", "entmetrics": "openvpn", "openvpn": "openvpn",
                    "openvpn60000": "openvpn"}


def say(text=""):
    print(text, flush=True)


class MeasureError(Exception):
    pass


def check(t, host, *argv):
    result = t.exec(host, *argv)
    if result.returncode != 0:
        raise MeasureError(f"{host}: {' '.join(argv)}: exit {result.returncode}: {result.stderr.strip()}")
    return result.stdout


# --- the paths -----------------------------------------------------------

class Namespaces:
    """
    Remembers the namespaces a run created (name and nsfs inode), to prove
    at the end that none of them, and no process inside one, is left.
    """

    def __init__(self, prefix):
        self.prefix = prefix
        self.inodes = set()
        self.count = 0

    def record(self, topology):
        for name in topology.created:
            self.count += 1
            with contextlib.suppress(OSError):
                self.inodes.add(os.stat(f"/run/netns/{name}").st_ino)

    def leftovers(self):
        left = []
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
        left += [f"namespace {line.split()[0]}" for line in listed if line.startswith(self.prefix + "-")]
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                link = os.readlink(f"/proc/{entry}/ns/net")
            except OSError:
                continue
            inode = int(link.split("[", 1)[1].rstrip("]"))
            if inode in self.inodes:
                left.append(f"process {entry} ({readComm(int(entry))}) in a benchmark namespace")
        return left


@contextlib.contextmanager
def cleanupShielded():
    """
    While cleaning up, a second Ctrl-C or SIGTERM must not cut the clean-up
    short and leave namespaces behind.
    """
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def startPingPong(t):
    """
    The ping-pong server on the server host, on LATENCY_PORT.
    """
    t.start("server", sys.executable, PINGPONG, "server", str(LATENCY_PORT), name="pingpong-server")


def waitListening(t, host, port, timeout=15):
    t.waitFor(lambda: t.exec(host, "ss", "-Hltn", f"sport = :{port}").stdout.strip(), timeout=timeout)


class BenchTunnel(Tunnel):
    """
    ENT's four services, capturing and replaying the iperf3 port instead of
    the echo port, with an iperf3 server on the server host.
    """

    def __init__(self, port, prefix, **kwargs):
        super().__init__(**kwargs)
        self.port = port
        self.topology = Topology(prefix=prefix, logdir=self.logdir)

    def startAll(self):
        t = self.topology
        self.echo = None
        t.start("server", "iperf3", "-s", "-p", str(self.port), name="iperf3-server")
        startPingPong(t)
        for host in ("gw2", "gw1", "server", "client"):
            self.startService(host)
        try:
            t.waitFor(self.tunnelUp, timeout=30)
            waitListening(t, "server", self.port)
        except TimeoutError:
            raise MeasureError(f"the ENT tunnel did not come up; logs:\n{self.logs()}")

    def startService(self, host):
        if host in ("gw1", "gw2"):
            return super().startService(host)
        if host == "server":
            args = ["enta", "--replay", str(self.port), "--expose", str(LATENCY_PORT),
                    "--entg-connect", f"{ADDRESS['gw2.agent']}:6980"]
        else:
            args = ["enta", "--dport", str(self.port),
                    "--map", f"{ADDRESS['server']}:{LATENCY_PORT}={TUN_SERVER}:{LATENCY_PORT}",
                    "--entg-connect", f"{ADDRESS['gw1.agent']}:6980"]
        process = self.topology.twistd(host, *args, *self.agentArgs)
        self.services[host] = process
        return process


@contextlib.contextmanager
def path(config, prefix, namespaces, logdir):
    """
    Build C{config}'s path; yield (topology, iperf3 target, ping target).
    """
    if config.kind == "ent":
        tunnel = BenchTunnel(PORT, prefix, agentArgs=config.options, gatewayArgs=config.gatewayOptions,
                             logdir=logdir)
        try:
            tunnel.topology.__enter__()
            namespaces.record(tunnel.topology)
            tunnel.startAll()
            if config.scrape:
                for host in HOSTS:
                    tunnel.topology.start(host, sys.executable, "-c", SCRAPER, name=f"{host}-scraper")
            yield tunnel.topology, ADDRESS["server"], TUN_SERVER
            # An orderly stop, as a user would; whatever is left is killed below.
            tunnel.stopServices()
        finally:
            with cleanupShielded():
                tunnel.topology.destroy()
        return

    t = Topology(prefix=prefix, logdir=logdir)
    try:
        t.__enter__()
        namespaces.record(t)
        if config.kind == "kernel":
            for gw in ("gw1", "gw2"):
                check(t, gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            routes = {
                "client": [("10.2.0.0/24", ADDRESS["gw1.agent"]), ("10.3.0.0/24", ADDRESS["gw1.agent"])],
                "gw1": [("10.3.0.0/24", ADDRESS["gw2"])],
                "gw2": [("10.1.0.0/24", ADDRESS["gw1"])],
                "server": [("10.1.0.0/24", ADDRESS["gw2.agent"]), ("10.2.0.0/24", ADDRESS["gw2.agent"])],
            }
            for host, entries in routes.items():
                for net, via in entries:
                    check(t, host, "ip", "route", "add", net, "via", via)
            t.start("server", "iperf3", "-s", "-p", str(PORT), name="iperf3-server")
            startPingPong(t)
            waitListening(t, "server", PORT)
            target = ping = ADDRESS["server"]
        else:
            openvpn = shutil.which("openvpn") or "openvpn"
            common = [openvpn, *OPENVPN_COMMON, *config.options]
            t.start("server", *common, "--proto", "tcp-server", "--lport", "1194",
                    "--ifconfig", TUN_SERVER, TUN_CLIENT, name="server-openvpn")
            t.start("gw2", "socat", "TCP-LISTEN:1195,fork,reuseaddr", f"TCP:{ADDRESS['server']}:1194",
                    name="gw2-socat")
            t.start("gw1", "socat", "TCP-LISTEN:1194,fork,reuseaddr", f"TCP:{ADDRESS['gw2']}:1195",
                    name="gw1-socat")
            waitListening(t, "server", 1194)
            waitListening(t, "gw2", 1195)
            waitListening(t, "gw1", 1194)
            t.start("client", *common, "--proto", "tcp-client", "--remote", ADDRESS["gw1.agent"], "1194",
                    "--ifconfig", TUN_CLIENT, TUN_SERVER, name="client-openvpn")
            t.start("server", "iperf3", "-s", "-p", str(PORT), name="iperf3-server")
            startPingPong(t)
            try:
                t.waitFor(lambda: t.exec("client", "ping", "-c", "1", "-W", "1", TUN_SERVER).returncode == 0,
                          timeout=30)
            except TimeoutError:
                raise MeasureError("the OpenVPN tunnel did not come up; logs:\n" + tails(logdir))
            waitListening(t, "server", PORT)
            target = ping = TUN_SERVER
        yield t, target, ping
    finally:
        with cleanupShielded():
            t.destroy()


def tails(logdir, lines=20):
    out = []
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), errors="replace") as f:
            out.append(f"--- {name}\n" + "".join(f.readlines()[-lines:]))
    return "\n".join(out)


# --- measuring -------------------------------------------------------------

def iperf(t, target, seconds, reverse=False, streams=1):
    argv = ["iperf3", "-c", target, "-p", str(PORT), "-t", str(seconds), "-J", "--connect-timeout", "5000"]
    if reverse:
        argv.append("-R")
    if streams > 1:
        argv += ["-P", str(streams)]
    for attempt in (1, 2):
        # A pause between runs: iperf3's server may still be closing the last
        # test, and then resets the next one's control connection.
        time.sleep(1)
        try:
            result = t.exec("client", *argv, timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            raise MeasureError(f"iperf3 {' '.join(argv[1:])}: no result within {seconds + 30}s")
        try:
            data = json.loads(result.stdout)
        except ValueError:
            data = {"error": (result.stdout + result.stderr).strip()[-300:]}
        if result.returncode == 0 and "error" not in data:
            break
        if attempt == 1 and "control" in str(data.get("error")):
            say(f"    (iperf3 {' '.join(argv[1:])}: {data.get('error')}; once more)")
            continue
        raise MeasureError(f"iperf3 {' '.join(argv[1:])}: {data.get('error')}")
    received = data["end"]["sum_received"]
    return {
        "bps": received["bits_per_second"],
        "bytes": received["bytes"],
        "retransmits": data["end"].get("sum_sent", {}).get("retransmits"),
    }


def ping(t, target):
    t.exec("client", "ping", "-c", "3", "-i", "0.05", "-W", "1", target)  # warm up
    result = t.exec("client", "ping", "-c", "20", "-i", "0.05", "-W", "1", target)
    summary = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", result.stdout)
    times = [float(x) for x in re.findall(r"time=([\d.]+) ms", result.stdout)]
    if not summary or not times:
        raise MeasureError(f"ping {target}: {(result.stdout + result.stderr).strip()[-300:]}")
    return {"avg": float(summary[2]), "min": float(summary[1]), "max": float(summary[3]),
            "median": statistics.median(times), "received": len(times)}


def pingpong(t, target, count=2000, warmup=200):
    """
    The 1-byte TCP ping-pong (bench/pingpong.py) from the client host to
    the server host's LATENCY_PORT: round trips/s, p50 and p99 in µs.
    """
    waitListening(t, "server", LATENCY_PORT)
    result = t.exec("client", sys.executable, PINGPONG, "client", target, str(LATENCY_PORT),
                    "-n", str(count), "--warmup", str(warmup), timeout=120)
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise MeasureError(f"ping-pong {target}: {(result.stdout + result.stderr).strip()[-300:]}")


def readComm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def tunnelProcesses(t):
    """
    {pid: label} of the processes in the namespaces that carry the tunnel
    (ENT's services, openvpn, socat), not the measuring tools.
    """
    found = {}
    for host in HOSTS:
        pids = subprocess.run(["ip", "netns", "pids", t.ns(host)], capture_output=True, text=True).stdout.split()
        for pid in map(int, pids):
            comm = readComm(pid)
            if comm in NOT_TUNNEL or comm == "?":
                continue
            role = comm
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
                for plugin in ("enta", "entg"):
                    if plugin in argv:
                        role = plugin
            found[pid] = f"{host} {role}"
    return found


def cpuSeconds(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the command: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peakRss(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure(config, t, target, pingTarget, seconds, latencyOnly=False):
    result = {"errors": [], "load": os.getloadavg()[0]}

    def attempt(key, function, *args, **kwargs):
        try:
            result[key] = function(*args, **kwargs)
        except MeasureError as e:
            result[key] = None
            result["errors"].append(str(e))
            say(f"    {key}: FAILED: {e}")
        return result[key]

    attempt("ping", ping, t, pingTarget)
    attempt("pingpong", pingpong, t, target)
    if result.get("pingpong"):
        pp = result["pingpong"]
        say(f"    ping-pong {pp['rate']:.0f} round trips/s, p50 {pp['p50']:.0f} µs, p99 {pp['p99']:.0f} µs")
    if result.get("ping"):
        say(f"    ping      avg {result['ping']['avg']:.3f} ms, median {result['ping']['median']:.3f} ms")
    if latencyOnly:
        return result
    processes = tunnelProcesses(t)
    before = {pid: cpuSeconds(pid) for pid in processes}
    forward = attempt("forward", iperf, t, target, seconds)
    after = {pid: cpuSeconds(pid) for pid in processes}
    attempt("reverse", iperf, t, target, seconds, reverse=True)
    attempt("streams4", iperf, t, target, seconds, streams=4)

    # Per process role: CPU seconds per GB of the forward single stream (all
    # processes of one role added up: socat forks one per connection) and
    # the largest peak RSS.
    procs = {}
    for pid, label in processes.items():
        entry = procs.setdefault(label, {"cpu": 0.0, "hwm": 0, "count": 0})
        entry["count"] += 1
        if before.get(pid) is not None and after.get(pid) is not None:
            entry["cpu"] += after[pid] - before[pid]
        entry["hwm"] = max(entry["hwm"], peakRss(pid) or 0)
    for entry in procs.values():
        entry["cpu_per_gb"] = entry["cpu"] / (forward["bytes"] / 1e9) if forward and forward["bytes"] else None
    result["procs"] = procs
    for key in ("forward", "reverse", "streams4"):
        if result.get(key):
            say(f"    {key:9} {rate(result[key]['bps'])}  (retransmits {result[key]['retransmits']})")
    for label, entry in sorted(procs.items()):
        cpu = f"{entry['cpu_per_gb']:.2f} CPU s/GB" if entry.get("cpu_per_gb") is not None else "-"
        say(f"    {label:14} {cpu}, peak RSS {entry['hwm'] / 1e6:.1f} MB")
    return result


# --- reporting -------------------------------------------------------------

def rate(bps):
    if bps is None:
        return "—"
    return f"{bps / 1e9:.2f} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:.0f} Mbit/s"


def bps(results, key, direction):
    entry = results.get(key) or {}
    value = entry.get(direction)
    return value["bps"] if value else None


def ratio(a, b):
    return a / b if a is not None and b else None


def fmtRatio(value):
    return "—" if value is None else f"{value:.2f}×"


def pingAvg(results, key):
    entry = (results.get(key) or {}).get("ping")
    return entry["avg"] if entry else None


def addedPing(results, key):
    mine, kernel = pingAvg(results, key), pingAvg(results, "kernel")
    return None if mine is None or kernel is None else mine - kernel


def pp50(results, key):
    entry = (results.get(key) or {}).get("pingpong")
    return entry["p50"] if entry else None


def addedP50(results, key):
    mine, kernel = pp50(results, key), pp50(results, "kernel")
    return None if mine is None or kernel is None else mine - kernel


def latencyTable(results):
    """
    The latency rows: the 1-byte TCP ping-pong and the idle ping, with what
    each path adds over the kernel path and how that compares to OpenVPN.
    """
    lines = [
        "| configuration | round trips/s | p50 µs | p99 µs | added p50 µs | added ÷ OpenVPN's "
        "| ping median µs | added ping µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    kernelPing = (results.get("kernel") or {}).get("ping")
    for config in CONFIGS:
        if config.key not in results:
            continue
        entry = results[config.key] or {}
        pp, pi = entry.get("pingpong"), entry.get("ping")
        added = addedP50(results, config.key)
        base = addedP50(results, OPENVPN_BASELINE.get(config.key))
        cells = [
            config.label,
            f"{pp['rate']:.0f}" if pp else "—",
            f"{pp['p50']:.0f}" if pp else "—",
            f"{pp['p99']:.0f}" if pp else "—",
            "—" if config.key == "kernel" or added is None else f"{added:+.0f}",
            "—" if config.key == "kernel" or added is None or not base else f"{added / base:.2f}×",
            f"{pi['median'] * 1000:.0f}" if pi else "—",
            "—" if config.key == "kernel" or not pi or not kernelPing
            else f"{(pi['median'] - kernelPing['median']) * 1000:+.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


LATENCY_TEXT = (
    "Latency: `bench/pingpong.py`, a 1-byte TCP request/response with TCP_NODELAY at both ends, from the "
    "client host to the server host's port 5202 (ENT maps and exposes it), 2000 round trips after 200 "
    "warm-up, one at a time; p50/p99 of the round trips, added p50 = p50 − kernel path's p50, "
    "\"added ÷ OpenVPN's\" divides that by OpenVPN default's added p50. Ping: the median of the "
    "20 pings above (idle path, one every 50 ms)."
)


def fmtMs(value, signed=False):
    if value is None:
        return "—"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def goals(results):
    """
    [(goal, figures, met)] with met True, False or None (not measured).
    """
    out = []

    def both(a, b, factor):
        pairs = [(bps(results, a, d), bps(results, b, d)) for d in ("forward", "reverse")]
        ratios = [ratio(x, y) for x, y in pairs]
        met = None if None in ratios else all(r >= factor for r in ratios)
        return ratios, met

    ratios, met = both("ent", "openvpn", 2)
    out.append(("ENT default ≥ 2 × OpenVPN default, single stream, both directions",
                f"forward {fmtRatio(ratios[0])}, reverse {fmtRatio(ratios[1])}", met))
    ratios, met = both("ent1500", "openvpn", 1)
    out.append(("ENT at MTU 1500 ≥ 1 × OpenVPN at MTU 1500, single stream, both directions",
                f"forward {fmtRatio(ratios[0])}, reverse {fmtRatio(ratios[1])}", met))
    mine, theirs = addedP50(results, "ent"), addedP50(results, "openvpn")
    met = None if mine is None or not theirs else mine <= 2 * theirs
    out.append(("ENT default's added round trip (1-byte ping-pong p50 over the kernel path) ≤ 2 × OpenVPN "
                "default's (issue 15)",
                "—" if met is None else f"{mine:+.0f} µs vs {theirs:+.0f} µs ({mine / theirs:.2f}×)", met))
    for ent in ("ent", "ent1500"):
        mine, theirs = addedPing(results, ent), addedPing(results, OPENVPN_BASELINE[ent])
        met = None if mine is None or theirs is None else mine <= theirs
        out.append((f"added ping RTT over the kernel path ≤ OpenVPN's ({BY_KEY[ent].label} vs "
                     f"{BY_KEY[OPENVPN_BASELINE[ent]].label})",
                     f"{fmtMs(mine, True)} ms vs {fmtMs(theirs, True)} ms", met))
    peaks = []
    for ent in ("ent", "ent1500"):
        for label, entry in sorted(((results.get(ent) or {}).get("procs") or {}).items()):
            peaks.append((f"{BY_KEY[ent].label}: {label}", entry["hwm"]))
    if peaks:
        worst = max(peaks, key=lambda p: p[1])
        met = all(0 < hwm < RSS_LIMIT for _, hwm in peaks)
        figures = f"largest {worst[1] / 1e6:.1f} MB ({worst[0]}) of {len(peaks)} processes"
    else:
        met, figures = None, "not measured"
    out.append(("each ENT process under 60 MB RSS at full load (peak, VmHWM)", figures, met))
    return out


def firstLine(argv):
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def machineInfo():
    import twisted

    import ent
    cpu = "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    openvpn = firstLine(["openvpn", "--version"]).split()
    iperf3 = firstLine(["iperf3", "--version"]).split()
    socat = re.search(r"version ([\d.]+)", subprocess.run(["socat", "-V"], capture_output=True, text=True).stdout)
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "kernel": platform.release(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "ent": getattr(ent, "__version__", "?"),
        "openvpn": openvpn[1] if len(openvpn) > 1 else "?",
        "iperf3": iperf3[1] if len(iperf3) > 1 else "?",
        "socat": socat[1] if socat else "?",
    }


def render(results, info, seconds, pngName):
    lines = [
        "# ENT benchmark",
        "",
        f"Run {info['date']} with `make bench` (`python -m bench.run`). Machine: Linux {info['kernel']}, "
        f"{info['cpu']}, {info['nproc']} CPUs (nproc). Python {info['python']}, Twisted {info['twisted']}, "
        f"ENT {info['ent']}, OpenVPN {info['openvpn']}, iperf3 {info['iperf3']}, socat {info['socat']}.",
        "",
        "Four network namespaces, client host — gateway 1 — gateway 2 — server host, three veth links, "
        "fresh for each configuration. iperf3 client on the client host, server on the server host: "
        f"one TCP stream for {seconds} s forward (client → server) and reverse (`-R`), four streams forward "
        "(`-P 4`); receiver's rate. Ping: 20 × 0.05 s from the client host to the far end "
        "(the far tunnel address, or the server host for the kernel path) after 3 warm-up pings; "
        "added RTT = ping avg − kernel path ping avg.",
        "",
        "| configuration | TUN MTU | 1 stream → | 1 stream ← | 4 streams → | ping avg ms (median) "
        "| added RTT ms | vs OpenVPN → | vs OpenVPN ← | vs kernel → | vs kernel ← |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in CONFIGS:
        if config.key not in results:
            continue
        entry = results[config.key] or {}
        p = entry.get("ping")
        pingText = f"{p['avg']:.3f} ({p['median']:.3f})" if p else "—"
        base = OPENVPN_BASELINE.get(config.key)
        cells = [
            config.label, str(config.mtu),
            rate(bps(results, config.key, "forward")), rate(bps(results, config.key, "reverse")),
            rate(bps(results, config.key, "streams4")), pingText,
            "—" if config.key == "kernel" else fmtMs(addedPing(results, config.key), True),
        ]
        for other in (base, "kernel"):
            for d in ("forward", "reverse"):
                cells.append("—" if other is None else fmtRatio(ratio(bps(results, config.key, d), bps(results, other, d))))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "\"vs OpenVPN\" compares with OpenVPN at its default TUN MTU, 1500 (so ENT default and ENT --mtu 1500 "
        "are both compared with it, as the goals say). ",
    ]
    large = [ratio(bps(results, "ent", d), bps(results, "openvpn60000", d)) for d in ("forward", "reverse")]
    lines[-1] += (f"Large MTU against large MTU, ENT default (65535) vs OpenVPN --tun-mtu 60000: "
                  f"forward {fmtRatio(large[0])}, reverse {fmtRatio(large[1])}.")

    lines += ["", "## Latency", "", LATENCY_TEXT, ""] + latencyTable(results)
    lines += [
        "",
        "## The tunnels' processes",
        "",
        "CPU seconds (utime + stime from /proc/PID/stat) spent during the single-stream forward run, per GB "
        "(10^9 bytes) received by iperf3; peak RSS is VmHWM at the end of the configuration's runs "
        "(MB = 10^6 bytes). socat forks a child per connection; its processes are added up per host.",
        "",
        "| configuration | process | CPU s/GB | peak RSS MB |",
        "|---|---|---:|---:|",
    ]
    for config in CONFIGS:
        for label, entry in sorted(((results.get(config.key) or {}).get("procs") or {}).items()):
            cpu = "—" if entry.get("cpu_per_gb") is None else f"{entry['cpu_per_gb']:.2f}"
            lines.append(f"| {config.label} | {label} | {cpu} | {entry['hwm'] / 1e6:.1f} |")

    lines += ["", "## Goals (issue 5)", ""]
    for goal, figures, met in goals(results):
        verdict = {True: "**met**", False: "**not met**", None: "not measured"}[met]
        lines.append(f"- {goal}: {figures} — {verdict}")

    loads = ", ".join(f"{BY_KEY[k].label} {v['load']:.2f}" for k, v in results.items() if v)
    lines += [
        "",
        "## Conditions",
        "",
        f"1-minute load average when each configuration started: {loads}. The machine has {info['nproc']} "
        "CPUs and every process of a path shares them, so other work on the machine lowers the figures; "
        "compare configurations within one run.",
        "",
        "- OpenVPN (both hosts): `openvpn " + " ".join(OPENVPN_COMMON) + " --proto tcp-server --lport 1194 "
        f"--ifconfig {TUN_SERVER} {TUN_CLIENT}` on the server host, `--proto tcp-client --remote "
        f"{ADDRESS['gw1.agent']} 1194 --ifconfig {TUN_CLIENT} {TUN_SERVER}` on the client host "
        "(point to point, no TLS, no static key, so no crypto); `--tun-mtu 60000` added for the large MTU.",
        f"- socat: gw1 `socat TCP-LISTEN:1194,fork,reuseaddr TCP:{ADDRESS['gw2']}:1195`, "
        f"gw2 `socat TCP-LISTEN:1195,fork,reuseaddr TCP:{ADDRESS['server']}:1194`.",
        f"- ENT: `twistd -n entg` in the gateways as in the README, `twistd -n enta --dport {PORT}` "
        f"(client host) and `--replay {PORT}` (server host), plus `--mtu 1500` on both agents for ENT --mtu 1500, "
        f"and `--metrics tcp:9100:interface=127.0.0.1` on all four for the metrics row, each scraped once a second "
        f"by a Python loop in its namespace; "
        f"iperf3 connects to {ADDRESS['server']}:{PORT}, which ENT captures.",
        "- kernel: `net.ipv4.ip_forward=1` in the two gateway namespaces, static routes in all four.",
    ]
    errors = [(k, e) for k, v in results.items() if v for e in v["errors"]]
    if errors:
        lines += ["", "## Failed measurements", ""]
        lines += [f"- {BY_KEY[k].label}: {e.splitlines()[0]}" for k, e in errors]
    lines += ["", "The rootless agent (`--stack user`) beside the TUN agent, with 0, 5 and 20 ms of added round "
              "trip: [rootless.md](rootless.md) (`make bench-rootless`); libslirp against pasta: "
              "[userstacks.md](userstacks.md)."]
    lines += ["", f"![throughput]({pngName})", ""]
    return "\n".join(lines)


def chart(results, filename):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    configs = [c for c in CONFIGS if c.key in results]
    series = [("forward", "1 stream →", "#1f77b4"), ("reverse", "1 stream ←", "#ff7f0e"),
              ("streams4", "4 streams →", "#7f7f7f")]
    width = 0.27
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    for index, (key, name, colour) in enumerate(series):
        xs, heights = [], []
        for position, config in enumerate(configs):
            value = bps(results, config.key, key)
            if value:
                xs.append(position + (index - 1) * width)
                heights.append(value / 1e9)
        bars = ax.bar(xs, heights, width, label=name, color=colour)
        for bar, height in zip(bars, heights):
            text = f"{height:.2f}" if height >= 1 else f"{height * 1000:.0f}M"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, height), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.1)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("throughput, Gbit/s (log scale)")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"{c.label}\n(MTU {c.mtu})" for c in configs], fontsize=8)
    ax.set_title("iperf3 through four namespaces: client — gw1 — gw2 — server")
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(filename)
    plt.close(fig)


# --- main ------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="ENT benchmark against OpenVPN and kernel routing")
    parser.add_argument("--time", type=int, default=5, help="seconds of each iperf3 run (default 5)")
    parser.add_argument("--only", help="comma-separated configurations: " + ",".join(BY_KEY))
    parser.add_argument("--latency", action="store_true",
                        help="only the latency part (ping-pong and ping), by default for kernel, ent and openvpn; "
                             "quick, for development; writes nothing unless --out")
    parser.add_argument("--out", help="where to write results.md and results.png "
                        "(default: bench/, and only when every configuration ran)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the benchmark creates network namespaces: run it as root")
    selected = CONFIGS
    if args.only:
        unknown = set(args.only.split(",")) - set(BY_KEY)
        if unknown:
            parser.error(f"unknown configuration {', '.join(sorted(unknown))}")
        selected = [c for c in CONFIGS if c.key in args.only.split(",")]
    elif args.latency:
        selected = [BY_KEY[k] for k in ("kernel", "ent", "openvpn")]
    missing = [tool for tool in ("iperf3", "openvpn", "socat", "ping") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run scripts/bench.sh (or make bench), which installs them")
    out = args.out or (None if args.only or args.latency else HERE)

    # SIGTERM and SIGHUP clean up like Ctrl-C does; SIGINT too when this was
    # started with SIGINT ignored (a background job of a script).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)

    info = machineInfo()
    prefix = f"entb{os.getpid()}"
    namespaces = Namespaces(prefix)
    logroot = tempfile.mkdtemp(prefix="ent-bench-")
    results = {}
    say(f"ENT benchmark: {len(selected)} configurations, iperf3 {args.time} s per run (logs in {logroot})")
    interrupted = False
    try:
        for config in selected:
            say(f"\n== {config.label} (MTU {config.mtu})")
            logdir = os.path.join(logroot, config.key)
            os.makedirs(logdir)
            try:
                with path(config, prefix, namespaces, logdir) as (t, target, pingTarget):
                    results[config.key] = measure(config, t, target, pingTarget, args.time, args.latency)
            except (MeasureError, TimeoutError, subprocess.CalledProcessError) as e:
                say(f"    FAILED: {e}")
                results[config.key] = {"errors": [str(e)], "load": os.getloadavg()[0]}
    except KeyboardInterrupt:
        interrupted = True
        say("\ninterrupted: cleaned up")
    left = namespaces.leftovers()
    say(f"\nleft behind: {', '.join(left) if left else 'nothing'} "
        f"({namespaces.count} namespaces were created and deleted)")
    if interrupted:
        shutil.rmtree(logroot, ignore_errors=True)
        return 130

    if args.latency:
        say("\n" + "\n".join(latencyTable(results)))
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "latency.md"), "w") as f:
                f.write(f"Run {info['date']}\n\n" + "\n".join(latencyTable(results)) + "\n")
        failed = any(v.get("errors") for v in results.values())
        if not failed:
            shutil.rmtree(logroot, ignore_errors=True)
        return 1 if failed or left else 0
    report = render(results, info, args.time, "results.png")
    say("\n" + report)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(report)
        chart(results, os.path.join(out, "results.png"))
        say(f"wrote {os.path.join(out, 'results.md')} and {os.path.join(out, 'results.png')}")
    failed = any(v.get("errors") for v in results.values())
    if failed:
        say(f"some measurements failed; the services' logs are in {logroot}")
    else:
        shutil.rmtree(logroot, ignore_errors=True)
    return 1 if failed or left else 0


if __name__ == "__main__":
    sys.exit(main())

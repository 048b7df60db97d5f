"""
What the bench measures on a path, with public tools only: iperf3
throughput, ping and the 1-byte ping-pong (bench/pingpong.py), and the
tunnel's own processes' CPU seconds and peak RSS from /proc.
"""

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

from bench.topology import LATENCY_PORT, PINGPONG, PORT, MeasureError, readComm, say, waitListening
from ent.testing.topology import HOSTS

CLK_TCK = os.sysconf("SC_CLK_TCK")


# Processes in the namespaces that are measuring, not tunnelling.
NOT_TUNNEL = {"iperf3", "ping", "ip", "sysctl", "ss", "python", "python3"}


def iperf(t, target, seconds, reverse=False, streams=1, port=PORT, host="client"):
    """
    iperf3 from C{host} to C{target}:C{port}: the receiver's bits/s, bytes
    and the sender's retransmits; a failed run is tried once more.
    """
    argv = ["iperf3", "-c", target, "-p", str(port), "-t", str(seconds), "-J", "--connect-timeout", "5000"]
    if reverse:
        argv.append("-R")
    if streams > 1:
        argv += ["-P", str(streams)]
    for attempt in (1, 2):
        # A pause between runs: iperf3's server may still be closing the last
        # test, and then resets the next one's control connection.
        time.sleep(1)
        try:
            result = t.exec(host, *argv, timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            raise MeasureError(f"iperf3 {' '.join(argv[1:])}: no result within {seconds + 30}s")
        try:
            data = json.loads(result.stdout)
        except ValueError:
            data = {"error": (result.stdout + result.stderr).strip()[-300:]}
        if result.returncode == 0 and "error" not in data:
            break
        if attempt == 1:
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
    return {
        "avg": float(summary[2]),
        "min": float(summary[1]),
        "max": float(summary[3]),
        "median": statistics.median(times),
        "received": len(times),
    }


def pingpong(t, target, count=2000, warmup=200, port=LATENCY_PORT, host="client", server="server"):
    """
    The 1-byte TCP ping-pong (bench/pingpong.py) from C{host} to
    C{target}:C{port} (served on C{server}, C{None}: not to be waited for):
    round trips/s, p50 and p99 in µs.
    """
    if server is not None:
        waitListening(t, server, port)
    result = t.exec(
        host,
        sys.executable,
        PINGPONG,
        "client",
        target,
        str(port),
        "-n",
        str(count),
        "--warmup",
        str(warmup),
        timeout=120,
    )
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise MeasureError(f"ping-pong {target}:{port}: {(result.stdout + result.stderr).strip()[-300:]}")


# One busy loop per CPU, for the loaded ping-pong: work that competes with
# the path's processes for the CPUs, as on a busy host.
BUSY_LOOP = "while True: pass"


@contextlib.contextmanager
def cpuLoad(processes=None):
    """
    Keep every CPU busy (one busy loop each, at normal priority) while the
    block runs; they only compute, in no namespace's network.
    """
    hogs = [
        subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL)
        for _ in range(processes or os.cpu_count() or 1)
    ]
    try:
        time.sleep(0.2)
        yield
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


def loadedPingpong(t, target):
    """
    L{pingpong} while every CPU is kept busy by L{cpuLoad}.
    """
    with cpuLoad():
        return pingpong(t, target, count=2000, warmup=200)


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
    attempt("pingpongLoaded", loadedPingpong, t, target)
    if result.get("pingpongLoaded"):
        pp = result["pingpongLoaded"]
        say(f"    loaded    {pp['rate']:.0f} round trips/s, p50 {pp['p50']:.0f} µs, p99 {pp['p99']:.0f} µs")
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


def rate(bps):
    if bps is None:
        return "—"
    return f"{bps / 1e9:.2f} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:.0f} Mbit/s"

"""
How one ENT gateway scales with its agents: memory per idle agent and
frames per second routed among them.

    .venv/bin/python -m bench.scale [--agents 1,100,1000] [--seconds 5]

For each count N, in a fresh network namespace of its own (only its
loopback; deleted afterwards, also on failure): one gateway (twistd entg,
plain TCP), one load generator acting as its peer gateway, and N framed
agent connections, each from its own loopback source address (127.0.0.2,
127.0.0.3, …), each announcing its own tunnel address (10.x.y.z) as
C{enta --announce} does. Then:

  - RSS: the gateway's VmRSS with the peer alone, and with N idle agents
    (each owning its address): (RSS_N - RSS_0) / N per idle agent;
  - peer → agents: the generator sends frames to the N addresses in turn on
    the peer leg and drains the N agent sockets: frames/s routed, and the
    gateway's CPU microseconds per frame;
  - agents → peer: every agent sends frames (to an address nobody owns,
    which goes to the only peer); the generator drains the peer leg.

Then the routing cost, the same way: one active agent through a gateway
of main (today's one-to-one relay, C{git archive} of C{--baseline}), one
through this tree's gateway alone, one with 1000 idle agents attached
(every frame routed by address), and three active agents at once; each
direction's frames/s and the gateway's CPU per frame. The rounds
alternate, and each figure is the best of them, as the machine is shared.

Writes bench/scale.md (and prints it).
"""

import argparse
import json
import os
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.measure import cpuSeconds as cpu  # noqa: E402
from ent.protocols.packets import announcement  # noqa: E402
from ent.testing.topology import residentMemory as rss  # noqa: E402
from ent.testing.topology import twistdCommand

HERE = os.path.dirname(os.path.abspath(__file__))
AGENT_PORT, PEER_PORT, METRICS_PORT = 6980, 6979, 9100
PACKET_SIZE = 1500  # bytes of IP packet per frame, as at --mtu 1500
FAR_HOST = "10.200.0.1"  # a host behind the peer gateway
NOBODY = "10.201.0.1"  # an address no agent owns


def agentAddress(i):
    return f"10.{1 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"


def sourceAddress(i):
    i += 2
    return f"127.0.{i >> 8}.{i & 255}" if i >> 8 else f"127.0.0.{i}"


def packetFrame(src, dst, size=PACKET_SIZE):
    header = bytearray(20)
    header[0] = 0x45
    struct.pack_into(">H", header, 2, size)
    header[8], header[9] = 64, 17
    header[12:16] = socket.inet_aton(src)
    header[16:20] = socket.inet_aton(dst)
    packet = bytes(header) + bytes(size - 20)
    return struct.pack(">I", len(packet)) + packet


def gauge(name, side):
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{side="{side}"}}'):
            return float(line.split()[-1])
    return None


def waitFor(check, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


class Drain:
    """
    Read whatever arrives on C{sockets} until stopped; count the bytes.
    """

    def __init__(self, sockets):
        self.sockets = sockets
        self.received = 0
        self.running = True

    def run(self, until):
        selector = selectors.DefaultSelector()
        for s in self.sockets:
            s.setblocking(False)
            selector.register(s, selectors.EVENT_READ)
        while time.monotonic() < until:
            for key, _ in selector.select(0.1):
                try:
                    data = key.fileobj.recv(1 << 20)
                except BlockingIOError:
                    continue
                self.received += len(data)
        selector.close()


def blast(sockets, buffers, until):
    """
    Write C{buffers[i]} to C{sockets[i]} again and again until C{until};
    return the bytes written.
    """
    selector = selectors.DefaultSelector()
    pending = {}
    for s, buffer in zip(sockets, buffers, strict=True):
        s.setblocking(False)
        pending[s] = memoryview(buffer)
        selector.register(s, selectors.EVENT_WRITE, buffer)
    sent = 0
    while time.monotonic() < until:
        for key, _ in selector.select(0.1):
            s = key.fileobj
            try:
                n = s.send(pending[s])
            except BlockingIOError:
                continue
            sent += n
            rest = pending[s][n:]
            pending[s] = rest if len(rest) else memoryview(key.data)
    selector.close()
    return sent


def measureRate(pid, senders, buffers, receivers, seconds):
    """
    Frames per second and the gateway's CPU microseconds per frame, with
    C{senders} writing C{buffers} and C{receivers} drained.
    """
    drain = Drain(receivers)
    start = time.monotonic()
    until = start + seconds
    cpuBefore = cpu(pid)
    reader = threading.Thread(target=drain.run, args=(until + 0.5,))
    reader.start()
    blast(senders, buffers, until)
    reader.join()
    elapsed = time.monotonic() - start
    frames = drain.received / (PACKET_SIZE + 4)
    spent = cpu(pid) - cpuBefore
    return {"frames_per_second": frames / elapsed, "gateway_cpu_us_per_frame": spent / frames * 1e6 if frames else None}


def inside(pid, agents, seconds):
    """
    The generator, run inside the namespace; prints its figures as JSON.
    """
    peer = socket.create_connection(("127.0.0.1", PEER_PORT))
    waitFor(lambda: gauge("ent_gateway_legs", "peer") == 1, what="the peer leg")
    time.sleep(1.0)
    rss0 = rss(pid)
    legs = []
    for i in range(agents):
        s = socket.socket()
        s.bind((sourceAddress(i), 0))
        s.connect(("127.0.0.1", AGENT_PORT))
        address = agentAddress(i)
        packet = announcement(address)
        s.sendall(struct.pack(">I", len(packet)) + packet)
        legs.append(s)
    waitFor(lambda: gauge("ent_gateway_addresses", "agent") == agents, what=f"{agents} agents")
    time.sleep(1.0)
    rssN = rss(pid)
    # Peer to agents: frames to every agent in turn (at most 64 per buffer
    # cycle, so a cycle stays small).
    targets = [agentAddress(i) for i in range(agents)]
    cycle = b"".join(packetFrame(FAR_HOST, targets[i % agents]) for i in range(max(64, min(agents, 1024))))
    down = measureRate(pid, [peer], [cycle], legs, seconds)
    # Agents to peer: each agent sends from its own address.
    buffers = [packetFrame(agentAddress(i), NOBODY) * 16 for i in range(agents)]
    up = measureRate(pid, legs, buffers, [peer], seconds)
    for s in legs:
        s.close()
    peer.close()
    print(
        json.dumps(
            {
                "agents": agents,
                "rss_base": rss0,
                "rss_agents": rssN,
                "rss_per_agent": (rssN - rss0) / agents,
                "peer_to_agents": down,
                "agents_to_peer": up,
            }
        )
    )


def insideThroughput(pid, idle, active, seconds):
    """
    The generator of one routing-cost row, inside the namespace: C{idle}
    announced idle agents, C{active} agents that send from their own
    address; prints both directions' figures as JSON.
    """
    peer = socket.create_connection(("127.0.0.1", PEER_PORT))
    legs = []
    for i in range(idle):
        s = socket.socket()
        s.bind((sourceAddress(i), 0))
        s.connect(("127.0.0.1", AGENT_PORT))
        packet = announcement(agentAddress(i))
        s.sendall(struct.pack(">I", len(packet)) + packet)
        legs.append(s)
    if idle:
        waitFor(lambda: gauge("ent_gateway_addresses", "agent") == idle, what=f"{idle} idle agents")
    senders = []
    for i in range(idle, idle + active):
        s = socket.socket()
        s.bind((sourceAddress(i), 0))
        s.connect(("127.0.0.1", AGENT_PORT))
        senders.append(s)
    # A gateway of main exposes no leg gauges: give it time to take the legs.
    time.sleep(1.5)
    addresses = [agentAddress(i) for i in range(idle, idle + active)]
    up = measureRate(pid, senders, [packetFrame(a, FAR_HOST) * 16 for a in addresses], [peer], seconds)
    cycle = b"".join(packetFrame(FAR_HOST, addresses[i % active]) for i in range(48))
    down = measureRate(pid, [peer], [cycle], senders, seconds)
    for s in legs + senders:
        s.close()
    peer.close()
    print(json.dumps({"agents_to_peer": up, "peer_to_agents": down}))


def extractBaseline(ref):
    """
    A directory holding C{git archive REF} of this repository, or C{None}
    (with the reason printed) where there is no such ref.
    """
    directory = tempfile.mkdtemp(prefix="ent-baseline-")
    archive = subprocess.run(["git", "-C", os.path.dirname(HERE), "archive", ref], capture_output=True)
    if archive.returncode != 0:
        print(f"bench.scale: no baseline: git archive {ref}: {archive.stderr.decode().strip()}", file=sys.stderr)
        shutil.rmtree(directory)
        return None
    subprocess.run(["tar", "-x", "-C", directory], input=archive.stdout, check=True)
    return directory


def run(agents, seconds, generator=None, source=None, name=None):
    """
    One gateway in a namespace of its own and the generator beside it
    (C{generator}: its arguments, by default the idle-agents row for
    C{agents}); C{source}: a tree whose C{ent} the gateway runs instead
    of this one's.
    """
    namespace = f"entscale{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    gateway = None
    environment = dict(os.environ)
    if source is not None:
        environment["PYTHONPATH"] = source
    try:
        subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=True)
        logPath = os.path.join(HERE, f".scale-entg-{name or agents}.log")
        with open(logPath, "wb") as log:
            gateway = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    namespace,
                    *twistdCommand(),
                    "-n",
                    "--pidfile=",
                    "entg",
                    "--enta-listen",
                    f"tcp:{AGENT_PORT}:interface=127.0.0.1:backlog=4096",
                    "--entg-listen",
                    f"tcp:{PEER_PORT}:interface=127.0.0.1",
                    "--metrics",
                    f"tcp:{METRICS_PORT}:interface=127.0.0.1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=source or os.getcwd(),
            )
        result = None
        for _ in range(100):
            time.sleep(0.2)
            probe = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    namespace,
                    sys.executable,
                    "-c",
                    f"import socket; socket.create_connection(('127.0.0.1', {METRICS_PORT}))",
                ],
                capture_output=True,
            )
            if probe.returncode == 0:
                break
        result = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                namespace,
                sys.executable,
                "-m",
                "bench.scale",
                "--inside",
                str(gateway.pid),
                "--seconds",
                str(seconds),
                *(generator or ["--agents", str(agents)]),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=os.path.dirname(HERE),
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"generator failed:\n{result.stdout}\n{result.stderr}\n"
                + open(logPath, errors="replace").read()[-3000:]
            )
        os.unlink(logPath)
        return json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        if gateway is not None and gateway.poll() is None:
            gateway.terminate()
            try:
                gateway.wait(10)
            except subprocess.TimeoutExpired:
                gateway.kill()
                gateway.wait()
        subprocess.run(["ip", "netns", "del", namespace], check=False)


# The routing-cost rows: (label, source tree, idle agents, active agents).
COST_ROWS = (
    ("one-to-one relay (before the router), 1 agent", "baseline", 0, 1),
    ("this tree, 1 agent alone", None, 0, 1),
    ("this tree, 1 agent + 1000 idle", None, 1000, 1),
    ("this tree, 3 agents at once", None, 0, 3),
    ("this tree, 3 agents at once + 1000 idle", None, 1000, 3),
)


def routingCost(seconds, rounds, baseline):
    """
    Each row of L{COST_ROWS}, C{rounds} times in turn: the best figures.
    """
    best = {}
    for _ in range(rounds):
        for label, source, idle, active in COST_ROWS:
            if source == "baseline":
                if baseline is None:
                    continue
                source = baseline
            r = run(idle, seconds, ["--idle", str(idle), "--active", str(active)], source, name=f"cost-{idle}-{active}")
            r["active"] = active
            if label not in best:
                best[label] = r
                continue
            for direction in ("agents_to_peer", "peer_to_agents"):
                if r[direction]["frames_per_second"] > best[label][direction]["frames_per_second"]:
                    best[label][direction]["frames_per_second"] = r[direction]["frames_per_second"]
                cpuNow = r[direction]["gateway_cpu_us_per_frame"]
                cpuBest = best[label][direction]["gateway_cpu_us_per_frame"]
                if cpuNow is not None and (cpuBest is None or cpuNow < cpuBest):
                    best[label][direction]["gateway_cpu_us_per_frame"] = cpuNow
    return [(label, best[label]) for label, *_ in COST_ROWS if label in best]


def renderCost(rows, seconds, rounds):
    mbits = lambda fps: fps * (PACKET_SIZE + 4) * 8 / 1e6
    lines = [
        "",
        "## Routing cost",
        "",
        f"One active agent (or three) and one peer on the same gateway, {PACKET_SIZE}-byte packets, "
        f"{seconds} s per direction, best of {rounds} alternating rounds; the generator "
        "shares the two CPUs with the gateway, so the gateway's CPU per frame is the steadier figure.",
        "",
        "| gateway | agents → peer Mbit/s | CPU µs/frame | peer → agents Mbit/s | CPU µs/frame |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        up, down = r["agents_to_peer"], r["peer_to_agents"]
        lines.append(
            f"| {label} | {mbits(up['frames_per_second']):,.0f} | {up['gateway_cpu_us_per_frame'] or 0:.2f} "
            f"| {mbits(down['frames_per_second']):,.0f} | {down['gateway_cpu_us_per_frame'] or 0:.2f} |"
        )
    base = dict(rows).get(COST_ROWS[0][0])
    if base is not None:
        lines.append("")
        for label, r in rows[1:]:
            parts = []
            for direction, what in (("agents_to_peer", "agents → peer"), ("peer_to_agents", "peer → agents")):
                b, x = base[direction], r[direction]
                throughput = 100 * x["frames_per_second"] / b["frames_per_second"]
                cpuCost = 100 * (x["gateway_cpu_us_per_frame"] / b["gateway_cpu_us_per_frame"] - 1)
                parts.append(f"{what}: throughput {throughput:.0f} % of the relay's, CPU per frame {cpuCost:+.0f} %")
            lines.append(f"- {label} against the relay: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def render(results, seconds):
    lines = [
        "# ENT gateway scale",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}; one `twistd entg` on loopback in a namespace of its own, "
        f"plain TCP legs, {PACKET_SIZE}-byte packets, {seconds} s per rate "
        "(`python -m bench.scale`).",
        "",
        "| agents | gateway RSS, peer only | with the agents idle | per idle agent "
        "| peer → agents frames/s | CPU µs/frame | agents → peer frames/s | CPU µs/frame |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        down, up = r["peer_to_agents"], r["agents_to_peer"]
        lines.append(
            f"| {r['agents']:,} | {r['rss_base'] / 1e6:.1f} MB | {r['rss_agents'] / 1e6:.1f} MB "
            f"| {r['rss_per_agent'] / 1e3:.1f} kB "
            f"| {down['frames_per_second']:,.0f} | {down['gateway_cpu_us_per_frame'] or 0:.1f} "
            f"| {up['frames_per_second']:,.0f} | {up['gateway_cpu_us_per_frame'] or 0:.1f} |"
        )
    return "\n".join(lines) + "\n"


# Main as it was before the routing gateway (issue 13) was merged: the
# one-to-one relay the routing cost is measured against.
RELAY_BASELINE = "52820bd"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[1])
    parser.add_argument("--agents", default="1,100,1000", help="agent counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per rate")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the routing-cost rows (0: none)")
    parser.add_argument(
        "--baseline",
        default=RELAY_BASELINE,
        help=f"git ref of the one-to-one relay, for the routing cost (default {RELAY_BASELINE}: main before the router)",
    )
    parser.add_argument("--inside", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--idle", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--active", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.agents.split(",") if n]
    if args.inside is not None:
        if args.active is not None:
            insideThroughput(args.inside, args.idle, args.active, args.seconds)
        else:
            inside(args.inside, counts[0], args.seconds)
        return 0
    if os.geteuid() != 0:
        print("bench.scale needs root (it makes a network namespace)", file=sys.stderr)
        return 1
    results = [run(n, args.seconds) for n in counts]
    text = render(results, args.seconds)
    if args.rounds:
        baseline = extractBaseline(args.baseline)
        try:
            text += renderCost(routingCost(args.seconds, args.rounds, baseline), args.seconds, args.rounds)
        finally:
            if baseline is not None:
                shutil.rmtree(baseline, ignore_errors=True)
    with open(os.path.join(HERE, "scale.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

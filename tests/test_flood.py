"""
A gateway under hostile connections, for real: namespaces, real twistd
processes, a flooder holding thousands of idle connections and stalled
TLS handshakes, a real agent that must still get in and stay; an agent
that stops reading must not stall another behind the same peer; metrics
listen on loopback only.

    client (flooder on 40 more addresses) ── gw1 ── gw2 ── server

    c1 ─┐
        ├─ gw1 ── gw2 ── server           (fairness: two client hosts)
    c2 ─┘
"""

import json
import os
import signal
import subprocess
import sys
import time

from twisted.trial import unittest

from ent.testing.topology import ECHOSVR, Topology, Tunnel
from tests.checks import METRICS, scrapeIn, sha256s, tempDir
from tests.netns import requireRoot
from tests.ratstlsmock import library_path_under_test
from tests.test_ratstls_tunnel import ratsArgs
from tests.test_tls import makeCertificates, tlsArgs

FLOODER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "flooder.py")
FLOOD_SOURCES = "10.1.0.10-49"
PLAIN_FLOOD = 10_000
TLS_FLOOD = 500
RATS_TLS_FLOOD = 200


def cpuSeconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rssBytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def servicePid(process):
    """
    The twistd process under C{ip netns exec}.
    """
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    return int(children[0]) if children else process.pid


def agentConnection(topology):
    """
    The client agent's connection to gw1's agent port, as (local, peer).
    """
    out = topology.exec("client", "ss", "-tnH", "state", "established", "( dport = :6980 )").stdout
    pairs = {tuple(line.split()[2:4]) for line in out.splitlines() if line.split()[2].startswith("10.1.0.1:")}
    return pairs


class FloodTests(unittest.TestCase):
    def setUp(self):
        requireRoot(self)
        self.certs = tempDir(self, "ent-flood-certs-")
        makeCertificates(self.certs)

    def startFlood(self, topology, seconds=240, stalled=TLS_FLOOD):
        flood = topology.start(
            "client",
            sys.executable,
            FLOODER,
            "--plain",
            f"10.1.0.2:6980:{PLAIN_FLOOD}",
            "--tls",
            f"10.1.0.2:6979:{stalled}",
            "--sources",
            FLOOD_SOURCES,
            "--seconds",
            str(seconds),
            name="flooder",
        )
        self.addCleanup(lambda: flood.poll() is None and os.killpg(flood.pid, signal.SIGKILL))
        return flood

    def floodCounts(self, logdir):
        with open(os.path.join(logdir, "flooder.log")) as f:
            lines = [line for line in f if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {}

    def tunnel(self, gw1Limits, peers="tls"):
        """
        The tunnel, gw1 also accepting peers on 6979: the port the stalled
        handshakes go to, on TLS or on rats-tls (the library under test).
        """
        c = self.certs
        if peers == "tls":
            gw1, gw2 = tlsArgs(c, "gw1", "--entg-tls"), tlsArgs(c, "gw2", "--entg-tls")
        else:
            gw1 = gw2 = ["--entg-rats-tls", *ratsArgs(library_path_under_test())]
        hostArgs = {
            "gw1": [*gw1, "--entg-listen", "6979", *gw1Limits, *METRICS],
            "gw2": gw2,
            "client": ["--announce", "--log-format", "json"],
        }
        return Tunnel(hostArgs=hostArgs)

    def addFloodSources(self, topology):
        base = FLOOD_SOURCES.split("-")[0].rsplit(".", 1)
        for n in range(int(base[1]), int(FLOOD_SOURCES.split("-")[1]) + 1):
            topology.exec("client", "ip", "addr", "add", f"{base[0]}.{n}/24", "dev", "v0client", check=True)

    def logLines(self, logdir):
        with open(os.path.join(logdir, "client-enta.log")) as f:
            return sum(1 for _ in f)

    def connectSeconds(self, logdir, mark):
        """
        From the restarted client agent's "TUN up" line, after which it
        connects (its log after line C{mark}), to its "connected to
        gateway" line, in its JSON log.
        """
        records = []
        with open(os.path.join(logdir, "client-enta.log")) as f:
            for number, line in enumerate(f):
                if number >= mark and line.startswith("{"):
                    records.append(json.loads(line))
        from datetime import datetime

        times = [datetime.fromisoformat(r["time"]) for r in records]
        connected = [t for t, r in zip(times, records, strict=True) if "connected to gateway" in r["message"]]
        if not connected:
            raise AssertionError("the agent never connected")
        self.agentLog = "\n".join(f"{r['time']} {r['message']}" for r in records)
        up = [t for t, r in zip(times, records, strict=True) if r["message"].startswith("TUN ")]
        self.startSeconds = (connected[-1] - times[0]).total_seconds()
        return (connected[-1] - up[-1]).total_seconds()

    def echo(self, tunnel, size):
        result = tunnel.echoClient(size, timeout=120)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr + tunnel.logs())
        sent, back = sha256s(result.stdout)
        self.assertEqual(sent, back)
        return result

    def test_floodDoesNotLockOutARealAgent(self):
        """
        10,000 idle plain connections and 500 stalled TLS handshakes are
        held against gw1 (limits high enough to hold them all). A restarted
        real agent connects within 2 s and moves 20 MB; when the flood's
        connections all close at once the agent keeps the same TCP
        connection; gw1's RSS stays under 250 MB and its CPU falls back to
        idle.
        """
        with self.tunnel(["--max-legs", "12000", "--max-legs-per-source", "1000"]) as tunnel:
            t = tunnel.topology
            self.addFloodSources(t)
            gw1 = servicePid(tunnel.services["gw1"])
            flood = self.startFlood(t)
            t.waitFor(lambda: self.floodCounts(t.logdir).get("open", 0) >= PLAIN_FLOOD + TLS_FLOOD, timeout=60)
            counts = self.floodCounts(t.logdir)
            # The real agent comes back during the flood.
            t.stop(tunnel.services["client"])
            mark = self.logLines(t.logdir)
            tunnel.startService("client")
            t.waitFor(tunnel.tunnelUp, timeout=30)
            seconds = self.connectSeconds(t.logdir, mark)
            self.assertLess(seconds, 2.0, f"the agent took {seconds:.2f}s to connect during the flood\n{self.agentLog}")
            self.echo(tunnel, 20_000_000)
            before = agentConnection(t)
            self.assertEqual(len(before), 1, before)
            rss = rssBytes(gw1)
            self.assertLess(rss, 250 << 20, f"gw1 RSS {rss >> 20} MB with the flood")
            # The flood's connections all close at once.
            os.killpg(flood.pid, signal.SIGKILL)
            flood.wait()
            time.sleep(2)
            self.assertEqual(agentConnection(t), before, "the agent's leg went with the flood\n" + tunnel.logs())
            self.echo(tunnel, 1000)
            cpu = cpuSeconds(gw1)
            time.sleep(3)
            idle = (cpuSeconds(gw1) - cpu) / 3
            self.assertLess(idle, 0.05, f"gw1 uses {idle:.0%} of a CPU after the flood")
            print(
                f"\nflood: connect {seconds:.2f}s (start to connected {self.startSeconds:.2f}s), gw1 RSS {rss >> 20} MB, idle CPU {idle:.1%}, counts {counts}"
            )

    def test_perSourceCapLeavesTheRealAgentAlone(self):
        """
        With the default --max-legs-per-source (64), each flood address is
        capped (refused or made room for, and counted), and the real agent,
        restarted during the flood, gets in and is not disturbed; the
        stalled handshakes are rats-tls ones here (200, on gw1's rats-tls
        peer port), and the peer leg gw1 ── gw2 on rats-tls still carries.
        """
        with self.tunnel([], peers="rats-tls") as tunnel:
            t = tunnel.topology
            self.addFloodSources(t)
            flood = self.startFlood(t, stalled=RATS_TLS_FLOOD)
            t.waitFor(lambda: self.floodCounts(t.logdir).get("open", 0) > 0, timeout=60)
            time.sleep(3)
            t.stop(tunnel.services["client"])
            mark = self.logLines(t.logdir)
            tunnel.startService("client")
            t.waitFor(tunnel.tunnelUp, timeout=30)
            seconds = self.connectSeconds(t.logdir, mark)
            self.assertLess(seconds, 2.0, self.agentLog)
            self.echo(tunnel, 20_000_000)
            before = agentConnection(t)
            scrape = scrapeIn(t, "gw1")
            capped = sum(
                scrape.value("ent_legs_refused_total", leg=leg, reason=reason)
                for leg in ("agent", "peer")
                for reason in ("max_legs_per_source", "unproven_evicted", "max_legs")
            )
            self.assertGreater(capped, 0, "the flood's sources were never capped")
            os.killpg(flood.pid, signal.SIGKILL)
            flood.wait()
            time.sleep(2)
            self.assertEqual(agentConnection(t), before)
            self.echo(tunnel, 1000)


PINGPONG = """
import socket, statistics, sys, time
s = socket.create_connection((sys.argv[1], 7), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    s.sendall(b"x")
    if s.recv(1) != b"x":
        raise SystemExit("bad echo")
    times.append(time.perf_counter() - start)
    time.sleep(0.005)
print(f"p50 {statistics.median(times) * 1e6:.0f}")
"""

# On the server host: a stream to agent A's tunnel address that no flow
# control slows down (UDP, about 5 MB/s for up to a minute: enough to fill
# what lies between gw1 and a stopped agent in a second or two, little
# enough to leave the CPUs to the others).
BLAST = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = b"d" * 1400
end = time.monotonic() + 60
while time.monotonic() < end:
    started = time.monotonic()
    for _ in range(40):
        try:
            s.sendto(payload, ("192.168.0.1", 9999))
        except OSError:
            pass
    time.sleep(max(0.0, 0.01 - (time.monotonic() - started)))
"""


class FairnessTests(unittest.TestCase):
    """
    Two agents behind gw1, both reaching the server behind the same peer
    leg (gw1 ── gw2).  A's agent stops reading while a stream to it goes
    on; B's ping-pong and a 20 MB echo go on.
    """

    def setUp(self):
        requireRoot(self)
        self.logdir = tempDir(self, "ent-fair-")

    def test_stuckAgentDoesNotStallAnother(self):
        hosts = ("a", "b", "gw1", "gw2", "server")
        links = (
            ("a", "10.1.0.1", "gw1", "10.1.0.2"),
            ("b", "10.4.0.1", "gw1", "10.4.0.2"),
            ("gw1", "10.2.0.1", "gw2", "10.2.0.2"),
            ("gw2", "10.3.0.1", "server", "10.3.0.2"),
        )
        with Topology(logdir=self.logdir, hosts=hosts, links=links) as t:
            t.start("server", sys.executable, ECHOSVR, "server", "--host", "0.0.0.0", "--port", "7", name="echo")
            t.twistd("gw2", "entg", "--entg-listen", "6979", "--enta-listen", "6980")
            t.twistd("gw1", "entg", "--entg-connect", "10.2.0.2:6979", "--enta-listen", "6980", *METRICS)
            t.twistd("server", "enta", "--expose", "7", "--entg-connect", "10.3.0.1:6980")
            agents = {}
            for host, address, gateway in (("a", "192.168.0.1", "10.1.0.2"), ("b", "192.168.0.2", "10.4.0.2")):
                agents[host] = t.twistd(
                    host,
                    "enta",
                    "--map",
                    "7=192.168.0.254:7",
                    "--tun-addr",
                    f"{address}/24",
                    "--peer-addr",
                    "192.168.0.254",
                    "--announce",
                    "--entg-connect",
                    f"{gateway}:6980",
                )

            def up(host):
                return t.exec(host, "ping", "-c", "1", "-W", "1", "192.168.0.254").returncode == 0

            t.waitFor(lambda: up("a") and up("b"), timeout=30)

            def pingpong(count=400):
                result = t.exec("b", sys.executable, "-c", PINGPONG, "10.3.0.2", str(count), timeout=120)
                self.assertEqual(result.returncode, 0, result.stderr)
                return float(result.stdout.split()[1])

            alone = min(pingpong(300) for _ in range(2))
            # A's agent stops reading, in the middle of a stream to it.
            blast = t.start("server", sys.executable, "-c", BLAST, name="blast")
            self.addCleanup(lambda: blast.poll() is None and os.killpg(blast.pid, signal.SIGKILL))
            time.sleep(1)
            stopped = servicePid(agents["a"])
            os.kill(stopped, signal.SIGSTOP)
            self.addCleanup(_resume, stopped)

            def heldBack():
                return scrapeIn(t, "gw1").value("ent_dropped_total", leg="agent", reason="target_full")

            # A takes nothing more, and gw1 holds back what is for it.
            t.waitFor(heldBack, timeout=8)
            time.sleep(1)
            stuck = min(pingpong(300) for _ in range(2))
            echo = t.exec(
                "b",
                sys.executable,
                ECHOSVR,
                "client",
                "--host",
                "10.3.0.2",
                "--port",
                "7",
                "--bytes",
                "20000000",
                "--timeout",
                "60",
                timeout=120,
            )
            self.assertEqual(echo.returncode, 0, echo.stdout + echo.stderr)
            sent, back = sha256s(echo.stdout)
            self.assertEqual(sent, back)
            self.assertLess(stuck, 2 * alone, f"B's p50 {stuck:.0f} µs with A stuck, {alone:.0f} µs without A")
            dropped = heldBack()
            print(
                f"\nfairness: B p50 {alone:.0f} us alone, {stuck:.0f} us with A stuck; held back from A: {dropped:.0f}"
            )


def _resume(pid):
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


class MetricsBindTests(unittest.TestCase):
    def setUp(self):
        requireRoot(self)

    def test_metricsPortListensOnLoopbackOnly(self):
        with Topology(hosts=("gw",), links=()) as t:
            t.twistd("gw", "entg", "--enta-listen", "6980", "--metrics", "9100")
            t.waitFor(lambda: "9100" in t.exec("gw", "ss", "-tlnH").stdout, timeout=20)
            listening = [line.split()[3] for line in t.exec("gw", "ss", "-tlnH").stdout.splitlines()]
            self.assertIn("127.0.0.1:9100", listening)
            self.assertNotIn("0.0.0.0:9100", listening)
            self.assertNotIn("*:9100", listening)

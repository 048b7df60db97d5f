"""
Services through the tunnel for real, each to its own place: --map on the
client host, --expose on the server host, containment of everything else,
fail-closed when the gateway or the agent is gone, and --capture-from for
a namespace behind the client host.

    client host ── gw1 ── gw2 ── server host: HTTP :8080, echo :7, UDP echo :5353
       │  (FailClosedTests: a direct link, so that a leak could happen)
       └──────────────────────────── server host
"""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from twisted.trial import unittest

from ent.testing.topology import ADDRESS, ECHOSVR, Topology, Tunnel
from tests.checks import METRICS, scrapeIn
from tests.netns import requireRoot

SERVER = ADDRESS["server"]
SERVER_ROLE = ["--expose", "80=8080", "--expose", "7", "--expose", "53/udp=5353"]
CLIENT_ROLE = [
    "--map",
    f"{SERVER}:80=192.168.0.254:80",
    "--map",
    f"{SERVER}:7=192.168.0.254:7",
    "--map",
    f"{SERVER}:53/udp=192.168.0.254:53",
]

UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(65535)
    print("datagram from", peer[0], flush=True)
    s.sendto(data, peer)
"""

UDP_ROUND_TRIPS = r"""
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
s.connect((sys.argv[1], int(sys.argv[2])))
ok = 0
for i in range(int(sys.argv[3])):
    payload = b"%d " % i + os.urandom(200)
    s.send(payload)
    if s.recv(65535) == payload:
        ok += 1
print(f"{ok} of {sys.argv[3]} round trips")
"""

HTTP_GET = r"""
import hashlib, sys, urllib.request
body = urllib.request.urlopen(sys.argv[1], timeout=60).read()
print(len(body), hashlib.sha256(body).hexdigest())
"""

CONNECT = r"""
import socket, sys, time
started = time.monotonic()
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except OSError as e:
    print(f"failed after {time.monotonic() - started:.2f}s: {e}")
"""


UDP_PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.send(b"probe")
    print("answered" if s.recv(100) == b"probe" else "garbled")
except OSError as e:
    print(e)
"""


def udpProbe(topology, host, address, port):
    """
    One datagram to a UDP echo and its answer: "answered", or why not.
    """
    return topology.exec(host, sys.executable, "-c", UDP_PROBE, address, str(port)).stdout.strip()


def connect(topology, host, address, port, timeout=3):
    """
    Try one TCP connection from C{host}: "connected" or "failed after Ns: why".
    """
    return topology.exec(host, sys.executable, "-c", CONNECT, address, str(port), str(timeout)).stdout.strip()


def dropped(topology, host, counter="input_dropped"):
    """
    Packets the agent's containment counted on C{host}.
    """
    out = topology.exec(host, "nft", "list", "counter", "ip", "ent_tun0", counter).stdout
    return int(out.split("packets ")[1].split()[0])


def listening(topology, host, port):
    return lambda: connect(topology, host, "127.0.0.1", port, 1) == "connected"


class ServicesTunnel:
    """
    A tunnel whose agents map and expose C{CLIENT_ROLE} and C{SERVER_ROLE},
    with metrics, and the three services on the server host.
    """

    def __init__(self, testCase, clientRole=CLIENT_ROLE, serverRole=SERVER_ROLE):
        requireRoot(testCase)
        self.tunnel = Tunnel(
            roleArgs={"client": clientRole, "server": serverRole}, hostArgs={"client": METRICS, "server": METRICS}
        ).__enter__()
        testCase.addCleanup(self.tunnel.__exit__, None, None, None)
        self.topology = t = self.tunnel.topology
        self.webroot = tempfile.mkdtemp(prefix="ent-web-")
        testCase.addCleanup(shutil.rmtree, self.webroot, True)
        with open(os.path.join(self.webroot, "big.bin"), "wb") as f:
            f.write(os.urandom(10_000_000))
        t.start(
            "server",
            sys.executable,
            "-m",
            "http.server",
            "8080",
            "--bind",
            "0.0.0.0",
            "--directory",
            self.webroot,
            name="http",
        )
        t.start("server", sys.executable, "-u", "-c", UDP_ECHO, "5353", name="udp-echo")
        t.waitFor(listening(t, "server", 8080))

    def log(self, name):
        with open(os.path.join(self.tunnel.logdir, f"{name}.log"), errors="replace") as f:
            return f.read()


class ServicesThroughTheTunnelTests(unittest.TestCase):
    """
    Must-show 1 and 2 of issue 14.
    """

    def setUp(self):
        self.s = ServicesTunnel(self)
        self.t = self.s.topology
        self.logs = self.s.tunnel.logs

    def test_threeServicesEachToItsOwn(self):
        """
        A 10 MB HTTP GET, a 5 MB echo and 100 UDP round trips, each to its
        own service, all coming from the client's tunnel address.
        """
        t = self.t
        get = t.exec("client", sys.executable, "-c", HTTP_GET, f"http://{SERVER}/big.bin", timeout=120)
        with open(os.path.join(self.s.webroot, "big.bin"), "rb") as f:
            expected = f"10000000 {hashlib.sha256(f.read()).hexdigest()}"
        self.assertEqual(get.stdout.strip(), expected, get.stderr + self.logs())
        self.assertIn("192.168.0.1 - - ", self.s.log("http"))

        echo = self.s.tunnel.echoClient(5_000_000, timeout=120)
        self.assertEqual(echo.returncode, 0, echo.stdout + echo.stderr + self.logs())
        self.assertIn("received 5000000 bytes", echo.stdout)
        self.assertIn("content PASS", echo.stdout)
        self.assertIn("connection from 192.168.0.1:", self.s.log("echo"))

        udp = t.exec("client", sys.executable, "-c", UDP_ROUND_TRIPS, SERVER, "53", "100", timeout=120)
        self.assertEqual(udp.stdout.strip(), "100 of 100 round trips", udp.stderr + self.logs())
        self.assertIn("datagram from 192.168.0.1", self.s.log("udp-echo"))

    def test_onlyExposedServicesReachable(self):
        """
        A listener on the server host that is not exposed, and any port of
        the client host from the server side: unreachable through the
        tunnel, the drops counted in nftables and in the metrics; ping
        still answers both ways.
        """
        t = self.t
        t.start("server", sys.executable, ECHOSVR, "server", "--host", "0.0.0.0", "--port", "9999", name="unexposed")
        t.start(
            "client", sys.executable, ECHOSVR, "server", "--host", "0.0.0.0", "--port", "7777", name="client-listener"
        )
        t.waitFor(listening(t, "server", 9999))
        t.waitFor(listening(t, "client", 7777))
        before = {host: dropped(t, host) for host in ("client", "server")}

        self.assertIn("timed out", connect(t, "client", "192.168.0.254", 9999))
        self.assertIn("timed out", connect(t, "server", "192.168.0.1", 7777))
        self.assertIn("timed out", connect(t, "server", "192.168.0.1", 7))
        for host in ("client", "server"):
            self.assertGreater(dropped(t, host), before[host], host)
            t.waitFor(lambda: scrapeIn(t, host).value("ent_tunnel_dropped_total", hook="input") >= 1, timeout=20)
        self.assertEqual(connect(t, "client", SERVER, 7), "connected", "the exposed service still works")
        for host, far in (("client", "192.168.0.254"), ("server", "192.168.0.1")):
            ping = t.exec(host, "ping", "-c", "1", "-W", "2", far)
            self.assertEqual(ping.returncode, 0, ping.stdout)

    def test_rulesetOfTheExample(self):
        """
        The tables the two agents install, as the README shows them.
        """
        server = self.t.exec("server", "nft", "list", "table", "ip", "ent_tun0").stdout
        self.assertIn('iifname "tun0" tcp dport 80 redirect to :8080', server)
        self.assertIn('iifname "tun0" udp dport 53 redirect to :5353', server)
        for proto, port in (("tcp", 80), ("tcp", 7), ("udp", 53)):
            self.assertIn(
                f"ct original ip daddr 192.168.0.254 meta l4proto {proto} ct original proto-dst {port} accept", server
            )
        client = self.t.exec("client", "nft", "list", "table", "ip", "ent_tun0").stdout
        self.assertIn(f'oifname "tun0" ip daddr {SERVER} tcp dport 80 dnat to 192.168.0.254:80', client)
        self.assertIn(f'oifname "tun0" ip daddr {SERVER} udp dport 53 dnat to 192.168.0.254:53', client)
        rules = self.t.exec("client", "ip", "rule").stdout
        self.assertIn(f"from all to {SERVER} iif lo ipproto udp dport 53 lookup 6978 proto 231", rules)


LEAK_WATCH_CLIENT = f"""
table ip leakwatch {{
  counter leaked {{ }}
  counter direct {{ }}
  chain post {{
    type filter hook postrouting priority 0; policy accept;
    ip daddr {SERVER} tcp dport 7 counter name leaked
    ip daddr {SERVER} udp dport 53 counter name leaked
    oifname "dlc" counter name direct
  }}
}}
"""

LEAK_WATCH_SERVER = f"""
table netdev leakwatch {{
  counter arrived {{ }}
  counter control {{ }}
  chain in {{
    type filter hook ingress device "dls" priority 0; policy accept;
    ip daddr {SERVER} tcp dport 7 counter name arrived
    ip daddr {SERVER} udp dport 53 counter name arrived
    ip daddr {SERVER} tcp dport 8 counter name control
  }}
}}
"""


def counted(topology, host, family, counter):
    out = topology.exec(host, "nft", "list", "counter", family, "leakwatch", counter).stdout
    return int(out.split("packets ")[1].split()[0])


class FailClosedTests(unittest.TestCase):
    """
    Must-show 3: with a direct route from the client host to the server
    host, a captured service never goes by it in plain: refused at once
    while the gateway is away, unreachable after kill -9 of the agent,
    working again after a restart; `python -m ent cleanup` lets it go.
    """

    def setUp(self):
        requireRoot(self)
        self.s = ServicesTunnel(
            self,
            clientRole=["--map", f"{SERVER}:7=192.168.0.254:7", "--map", f"{SERVER}:53/udp=192.168.0.254:53"],
            serverRole=["--expose", "7", "--expose", "53/udp=5353"],
        )
        self.tunnel = self.s.tunnel
        self.t = t = self.s.topology
        # The direct link, only between namespaces this test made.
        run = lambda host, *argv: t.exec(host, *argv, check=True)
        run("client", "ip", "link", "add", "dlc", "type", "veth", "peer", "name", "dls", "netns", t.ns("server"))
        run("client", "ip", "addr", "add", "10.9.0.1/24", "dev", "dlc")
        run("client", "ip", "link", "set", "dlc", "up")
        run("server", "ip", "addr", "add", "10.9.0.2/24", "dev", "dls")
        run("server", "ip", "link", "set", "dls", "up")
        run("client", "ip", "route", "add", f"{SERVER}/32", "via", "10.9.0.2")
        t.exec("client", "nft", "-f", "-", input=LEAK_WATCH_CLIENT, check=True)
        t.exec("server", "nft", "-f", "-", input=LEAK_WATCH_SERVER, check=True)
        t.start("server", sys.executable, ECHOSVR, "server", "--host", "0.0.0.0", "--port", "8", name="plain")
        t.waitFor(listening(t, "server", 8))

    def assertNoLeak(self):
        self.assertEqual(counted(self.t, "client", "ip", "leaked"), 0, "left the client host in plain")
        self.assertEqual(counted(self.t, "server", "netdev", "arrived"), 0, "arrived by the direct link")

    def assertWorksThroughTheTunnel(self):
        echo = self.tunnel.echoClient(100_000)
        self.assertEqual(echo.returncode, 0, echo.stdout + echo.stderr + self.tunnel.logs())
        self.assertIn("connection from 192.168.0.1:", self.s.log("echo"))

    def test_neverInPlain(self):
        t = self.t
        # The direct route works, and the watch counts what takes it.
        self.assertEqual(connect(t, "client", SERVER, 8), "connected")
        self.assertGreater(counted(t, "server", "netdev", "control"), 0)
        self.assertGreater(counted(t, "client", "ip", "direct"), 0)
        self.assertWorksThroughTheTunnel()
        self.assertEqual(udpProbe(t, "client", SERVER, 53), "answered")
        self.assertNoLeak()

        # The gateway goes away: refused at once.
        t.stop(self.tunnel.services["gw1"])
        t.waitFor(lambda: "captured connections refused at once" in self.s.log("client-enta"))
        result = connect(t, "client", SERVER, 7, timeout=10)
        self.assertRegex(result, r"^failed after 0\.\d\ds: \[Errno 111\] Connection refused$")
        # The datagram is rejected on its way out: send() itself fails.
        self.assertEqual(udpProbe(t, "client", SERVER, 53), "[Errno 1] Operation not permitted")
        self.assertNoLeak()
        self.tunnel.startService("gw1")
        t.waitFor(lambda: connect(t, "client", SERVER, 7) == "connected", timeout=30)

        # The agent is killed: unreachable, by any route, until it restarts.
        t.stop(self.tunnel.services["client"], signal.SIGKILL)
        self.assertEqual(t.exec("client", "ip", "link", "show", "tun0").returncode, 1)
        for _ in range(3):
            result = connect(t, "client", SERVER, 7, timeout=10)
            self.assertRegex(result, r"^failed after 0\.\d\ds: \[Errno 113\] No route to host$")
        self.assertEqual(udpProbe(t, "client", SERVER, 53), "[Errno 113] No route to host")
        time.sleep(0.5)
        self.assertNoLeak()
        self.tunnel.startService("client")
        t.waitFor(self.tunnel.tunnelUp, timeout=30)
        self.assertWorksThroughTheTunnel()
        self.assertEqual(udpProbe(t, "client", SERVER, 53), "answered")
        self.assertNoLeak()

        # Killed again, and cleaned up by the operator: the host's own routes again.
        t.stop(self.tunnel.services["client"], signal.SIGKILL)
        cleanup = t.exec("client", sys.executable, "-m", "ent", "cleanup")
        self.assertEqual(cleanup.returncode, 0, cleanup.stderr)
        self.assertIn("removed the rules the agent on tun0 left (nftables table ent_tun0)", cleanup.stdout)
        self.assertEqual(self.tunnel.leftovers()["client"], ["nft: table ip leakwatch"], "only the test's own")
        self.assertEqual(connect(t, "client", SERVER, 7), "connected")
        self.assertGreater(counted(t, "server", "netdev", "arrived"), 0, "the direct route, as the user asked")


class CaptureFromTests(unittest.TestCase):
    """
    Must-show 4: a namespace behind a veth of the client host (a container)
    reaches the server through the tunnel.
    """

    def test_containerBehindTheClientHost(self):
        requireRoot(self)
        s = ServicesTunnel(
            self,
            clientRole=["--map", f"{SERVER}:7=192.168.0.254:7", "--capture-from", "vbox"],
            serverRole=["--expose", "7"],
        )
        t = s.topology
        box = t.ns("box")
        subprocess.run(["ip", "netns", "add", box], check=True)
        t.created.append(box)
        steps = [
            ("client", "ip", "link", "add", "vbox", "type", "veth", "peer", "name", "eth0", "netns", box),
            ("client", "ip", "addr", "add", "10.8.0.1/24", "dev", "vbox"),
            ("client", "ip", "link", "set", "vbox", "up"),
            ("client", "sysctl", "-qw", "net.ipv4.ip_forward=1"),
            ("box", "ip", "link", "set", "lo", "up"),
            ("box", "ip", "addr", "add", "10.8.0.2/24", "dev", "eth0"),
            ("box", "ip", "link", "set", "eth0", "up"),
            ("box", "ip", "route", "add", "default", "via", "10.8.0.1"),
        ]
        for host, *argv in steps:
            t.exec(host, *argv, check=True)
        echo = t.exec("box", *s.tunnel.echoCommand(1_000_000), timeout=90)
        self.assertEqual(echo.returncode, 0, echo.stdout + echo.stderr + s.tunnel.logs())
        self.assertIn("content PASS", echo.stdout)
        self.assertIn("connection from 192.168.0.1:", s.log("echo"))
        rules = t.exec("client", "ip", "rule").stdout
        self.assertIn("from all to 192.168.0.254 iif vbox ipproto tcp dport 7 lookup 6978 proto 231", rules)


class BothRolesOnOneHostTests(unittest.TestCase):
    """
    Each host runs a client agent and a server agent at once, on two
    tunnels: what one tunnel exposes is reachable through it, not through
    the other.

        tunnel a: client host tun0 --map 10.3.0.2:7  ->  server host tun0 --expose 7
        tunnel b: server host tunb --map 10.1.0.1:9  ->  client host tunb --expose 9
    """

    def test_clientAndServerAgentsSideBySide(self):
        requireRoot(self)
        t = Topology(logdir=tempfile.mkdtemp(prefix="ent-roles-")).__enter__()
        self.addCleanup(shutil.rmtree, t.logdir, True)
        self.addCleanup(t.destroy)
        t.start("server", sys.executable, ECHOSVR, "server", "--host", "0.0.0.0", "--port", "7", name="echo-7")
        t.start("client", sys.executable, ECHOSVR, "server", "--host", "0.0.0.0", "--port", "9", name="echo-9")
        for name, agentPort, peerPort in (("a", 6980, 6979), ("b", 6990, 6989)):
            t.twistd("gw2", "entg", "--entg-listen", str(peerPort), "--enta-listen", str(agentPort), name=f"gw2-{name}")
            t.twistd(
                "gw1",
                "entg",
                "--entg-connect",
                f"{ADDRESS['gw2']}:{peerPort}",
                "--enta-listen",
                str(agentPort),
                name=f"gw1-{name}",
            )
        gw1, gw2 = ADDRESS["gw1.agent"], ADDRESS["gw2.agent"]
        t.twistd("server", "enta", "--expose", "7", "--entg-connect", f"{gw2}:6980", name="server-a")
        t.twistd(
            "client", "enta", "--map", f"{SERVER}:7=192.168.0.254:7", "--entg-connect", f"{gw1}:6980", name="client-a"
        )
        t.twistd(
            "client",
            "enta",
            "--expose",
            "9",
            "--tun-name",
            "tunb",
            "--tun-addr",
            "192.168.1.254/24",
            "--peer-addr",
            "192.168.1.1",
            "--entg-connect",
            f"{gw1}:6990",
            name="client-b",
        )
        t.twistd(
            "server",
            "enta",
            "--map",
            f"{ADDRESS['client']}:9=192.168.1.254:9",
            "--tun-name",
            "tunb",
            "--tun-addr",
            "192.168.1.1/24",
            "--peer-addr",
            "192.168.1.254",
            "--entg-connect",
            f"{gw2}:6990",
            name="server-b",
        )
        # Each host's capturing agent, and the far end of its tunnel.
        for host, far, agent in (("client", "192.168.0.254", "client-a"), ("server", "192.168.1.254", "server-b")):
            t.waitFor(lambda: t.exec(host, "ping", "-c", "1", "-W", "1", far).returncode == 0, timeout=30)
            with open(f"{t.logdir}/{agent}.log") as log:
                self.assertIn("captured connections admitted", log.read())

        def echo(host, address, port):
            result = t.exec(
                host,
                sys.executable,
                ECHOSVR,
                "client",
                "--host",
                address,
                "--port",
                str(port),
                "--bytes",
                "100000",
                "--timeout",
                "20",
                timeout=60,
            )
            return result.returncode == 0 and "content PASS" in result.stdout

        self.assertTrue(echo("client", SERVER, 7), "tunnel a")
        self.assertTrue(echo("server", ADDRESS["client"], 9), "tunnel b")
        # The client host's port 9 is exposed on tunnel b only.
        self.assertIn("timed out", connect(t, "server", "192.168.0.1", 9))
        self.assertEqual(connect(t, "server", "192.168.1.254", 9), "connected")
        self.assertGreater(dropped(t, "client"), 0)


class ExposeToAnotherHostTests(unittest.TestCase):
    """
    --expose TUNPORT=HOST:PORT: the server host forwards the connection to
    another host of its network, which sees the server host as the client.
    """

    def test_forwardedToTheServersNeighbour(self):
        s = ServicesTunnel(
            self,
            clientRole=["--map", f"{SERVER}:8=192.168.0.254:8"],
            serverRole=["--expose", f"8={ADDRESS['gw2.agent']}:8"],
        )
        t = s.topology
        t.exec("server", "sysctl", "-qw", "net.ipv4.ip_forward=1", check=True)
        t.start("gw2", sys.executable, ECHOSVR, "server", "--host", "0.0.0.0", "--port", "8", name="neighbour")
        t.waitFor(listening(t, "gw2", 8))
        echo = t.exec(
            "client",
            sys.executable,
            ECHOSVR,
            "client",
            "--host",
            SERVER,
            "--port",
            "8",
            "--bytes",
            "1000000",
            "--timeout",
            "30",
            timeout=60,
        )
        self.assertEqual(echo.returncode, 0, echo.stdout + echo.stderr + s.tunnel.logs())
        self.assertIn("content PASS", echo.stdout)
        self.assertIn(f"connection from {SERVER}:", s.log("neighbour"))
        self.assertEqual(dropped(t, "server", "forward_dropped"), 0)

"""
Several agents on one gateway, for real: two tunnels through one pair of
gateways in namespaces, each frame routed to the agent that owns its
destination; an impostor claiming a live agent's address is refused; a
stopped agent's address is freed for its restart.
"""

import signal
import sys

from twisted.trial import unittest

from ent.legs import certs
from ent.testing.topology import ADDRESS
from tests.checks import METRICS, METRICS_PORT, scrapeIn, tempDir
from tests.netns import requireRoot
from tests.test_agents import TUNNELS, TwoTunnels
from tests.test_tls import makeCertificates, tlsArgs

# Connects to the client-side gateway as an agent and sends one frame from
# 192.168.0.1 (tunnel a's client agent's address); prints what became of
# the connection.
IMPOSTOR = """
import socket, struct, sys
packet = bytearray(20)
packet[0] = 0x45
struct.pack_into(">H", packet, 2, 20)
packet[12:16] = socket.inet_aton("192.168.0.1")
packet[16:20] = socket.inet_aton("192.168.0.254")
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(struct.pack(">I", len(packet)) + bytes(packet))
try:
    print("closed" if s.recv(100) == b"" else "data")
except ConnectionResetError:
    print("closed")
except socket.timeout:
    print("still open")
"""


class SharedGatewayTests(unittest.TestCase):
    def setUp(self):
        requireRoot(self)
        self.tunnels = TwoTunnels(
            self, sharedGateways=True, extraArgs=lambda host, name: METRICS if host.startswith("gw") else ()
        )
        self.t = self.tunnels.topology

    def assertEchoes(self, name):
        passed, output = self.tunnels.echo(name)
        self.assertTrue(passed, f"tunnel {name}: {output}\n{self.tunnels.logs()}")

    def status(self, host):
        result = self.t.exec(
            host, sys.executable, "-m", "ent", "status", "--metrics", f"127.0.0.1:{METRICS_PORT}", timeout=30
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        return result.stdout

    def legs(self, host):
        return scrapeIn(self.t, host).value("ent_gateway_legs", side="agent")

    def test_twoTunnelsThroughOneGatewayPair(self):
        for name in TUNNELS:
            self.assertEchoes(name)
        for host in ("gw1", "gw2"):
            text = self.status(host)
            self.assertIn("2 agents, 1 peer", text)
        gw2 = self.status("gw2")
        self.assertRegex(gw2, r"agent +10\.3\.0\.2:\d+ +- +192\.168\.0\.254 ")
        self.assertRegex(gw2, r"agent +10\.3\.0\.2:\d+ +- +192\.168\.1\.254 ")

        # An impostor claiming tunnel a's client address is refused; the
        # owner carries on.
        impostor = self.t.exec(
            "client", sys.executable, "-c", IMPOSTOR, ADDRESS["gw1.agent"], str(TUNNELS["a"][5]), timeout=30
        )
        self.assertEqual(impostor.stdout.strip(), "closed", impostor.stderr)
        log = open(f"{self.t.logdir}/gw1-a.log").read()
        self.assertRegex(
            log,
            r"agent 10\.1\.0\.1:\d+ refused: it sends from 192\.168\.0\.1, "
            r"which 10\.1\.0\.1:\d+ owns",
        )
        self.assertEqual(scrapeIn(self.t, "gw1").value("ent_dropped_total", leg="agent", reason="address_in_use"), 1)
        self.assertEchoes("a")

        # A stopped agent frees its address: its restart is not refused.
        code, _ = self.t.stop(self.tunnels.services["b"])
        self.assertIn(code, (0, -signal.SIGTERM))
        self.t.waitFor(lambda: self.legs("gw1") == 1, timeout=15)
        self.tunnels.startClient("b")
        self.tunnels.waitUp("b")
        self.assertEchoes("b")
        self.assertEchoes("a")
        self.assertEqual(self.legs("gw1"), 2)
        self.assertEqual(open(f"{self.t.logdir}/gw1-a.log").read().count("refused: it sends from"), 1)


class AllowedIpsTests(unittest.TestCase):
    """
    The same two tunnels on TLS legs, each agent's prefixes given by its
    certificate's name: no announcement is needed, and a second leg with
    a live agent's identity is refused.
    """

    def setUp(self):
        requireRoot(self)
        self.dir = tempDir(self, "ent-allowed-")
        makeCertificates(self.dir)
        for name in ("client-a", "client-b", "server-a", "server-b"):
            certs.makeCertificate(self.dir, name, [], certs.makeCa(self.dir))
        allowed = {
            "gw1": ["--allowed-ips", "client-a=192.168.0.1/32", "--allowed-ips", "client-b=192.168.1.0/25"],
            "gw2": ["--allowed-ips", "server-a=192.168.0.254/32", "--allowed-ips", "server-b=192.168.1.254/32"],
        }

        def extraArgs(host, name):
            if host in allowed:
                return [*tlsArgs(self.dir, host, "--enta-tls", "--entg-tls"), *allowed[host], *METRICS]
            return tlsArgs(self.dir, f"{host}-{name}", "--entg-tls")

        self.tunnels = TwoTunnels(self, sharedGateways=True, extraArgs=extraArgs, announce=False)
        self.t = self.tunnels.topology

    def test_prefixesByCertificateName(self):
        for name in TUNNELS:
            passed, output = self.tunnels.echo(name)
            self.assertTrue(passed, f"tunnel {name}: {output}\n{self.tunnels.logs()}")
        status = self.t.exec(
            "gw2", sys.executable, "-m", "ent", "status", "--metrics", f"127.0.0.1:{METRICS_PORT}", timeout=30
        ).stdout
        self.assertRegex(status, r"agent +10\.3\.0\.2:\d+ +server-a +192\.168\.0\.254/32 ")
        self.assertRegex(status, r"agent +10\.3\.0\.2:\d+ +server-b +192\.168\.1\.254/32 ")
        # One more agent presenting client-a's certificate is refused.
        self.t.twistd(
            "client",
            "enta",
            "--tun-name",
            "tun2",
            "--dport",
            "9",
            "--tun-addr",
            "192.168.2.1/24",
            "--peer-addr",
            "192.168.2.254",
            "--entg-connect",
            f"{ADDRESS['gw1.agent']}:{TUNNELS['a'][5]}",
            *tlsArgs(self.dir, "client-a", "--entg-tls"),
            name="client-twin",
        )
        log = f"{self.t.logdir}/gw1-a.log"
        self.t.waitFor(lambda: "refused: 192.168.0.1/32 belongs to" in open(log).read(), timeout=20)
        self.assertRegex(
            open(log).read(),
            r"agent 10\.1\.0\.1:\d+ \(client-a\) refused: 192\.168\.0\.1/32 "
            r"belongs to 10\.1\.0\.1:\d+ \(client-a\)",
        )
        passed, output = self.tunnels.echo("a")
        self.assertTrue(passed, output + self.tunnels.logs())

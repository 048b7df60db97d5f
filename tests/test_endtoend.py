"""
The whole tunnel for real: four network namespaces, ENT's services as
twistd processes, an unmodified echo server and client.
"""

import sys

from twisted.trial import unittest

from ent.testing.topology import Topology, Tunnel, twistdCommand
from tests.checks import assertEchoAndTransfer, assertStopsCleanly
from tests.netns import requireRoot


class TunnelTests(unittest.TestCase):
    """
    What an unmodified app gets through a running tunnel.
    """

    def setUp(self):
        requireRoot(self)
        self.tunnel = Tunnel().__enter__()
        self.addCleanup(self.tunnel.__exit__, None, None, None)

    def test_echoThroughTunnel(self):
        result = self.tunnel.echoClient(1000)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr + self.tunnel.logs())
        self.assertIn("content PASS", result.stdout)
        self.assertIn("received 1000 bytes", result.stdout)
        echoLog = open(f"{self.tunnel.logdir}/echo.log").read()
        self.assertIn("connection from 192.168.0.1:", echoLog, "the server should see the client's tunnel address")

    def test_20MBTransferSameSha256(self):
        assertEchoAndTransfer(self, self.tunnel)

    def test_pingFarTunnelAddress(self):
        for host, far in (("client", "192.168.0.254"), ("server", "192.168.0.1")):
            result = self.tunnel.topology.exec(host, "ping", "-c", "3", "-i", "0.2", "-W", "2", far)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            self.assertIn("3 received", result.stdout)

    def test_capturedOnlyOnItsPort(self):
        """
        Port 8 is not captured: the client has no route to the server host.
        """
        result = self.tunnel.topology.exec(
            "client", sys.executable, "-c", "import socket; socket.create_connection(('10.3.0.2', 8), timeout=2)"
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("Network is unreachable", result.stderr)


class StopTests(unittest.TestCase):
    def setUp(self):
        requireRoot(self)

    def test_stopLeavesNothingAndIsQuick(self):
        with Tunnel() as tunnel:
            self.assertEqual(tunnel.echoClient(100).returncode, 0, tunnel.logs())
            before = tunnel.leftovers()
            self.assertIn("client", before)
            self.assertIn("server", before)
            assertStopsCleanly(self, tunnel)
            self.assertIn("nftables table ip ent_tun0 removed", tunnel.logs())


class StartFailureTests(unittest.TestCase):
    """
    A refused start says why in one line, exits non-zero and leaves nothing.
    """

    def setUp(self):
        requireRoot(self)
        self.topology = Topology().__enter__()
        self.addCleanup(self.topology.destroy)

    def run_enta(self, *args):
        return self.topology.exec("client", *twistdCommand(), "-n", "--pidfile=", "enta", *args, timeout=30)

    def assertNothingConfigured(self):
        ex = self.topology.exec
        self.assertEqual(ex("client", "ip", "-o", "link", "show", "type", "tun").stdout, "")
        self.assertEqual(ex("client", "nft", "list", "tables").stdout, "")
        self.assertNotIn("proto 231", ex("client", "ip", "rule").stdout)

    def test_badOption(self):
        result = self.run_enta("--dport", "70000")
        self.assertEqual((result.returncode, result.stdout), (2, ""))
        self.assertIn("--dport '70000': port 70000 is out of range 1-65535", result.stderr)
        self.assertNothingConfigured()

    def test_conflictingOptions(self):
        result = self.run_enta("--dport", "7", "--replay", "7")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--dport and --replay exclude each other", result.stdout + result.stderr)
        self.assertNothingConfigured()

    def test_tunNameInUseByTheUser(self):
        ex = self.topology.exec
        ex("client", "ip", "link", "add", "tun0", "type", "bridge", check=True)
        result = self.run_enta("--dport", "7", "--entg-connect", "10.1.0.2:6980")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("enta: cannot start: an interface named tun0 already exists", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stderr + result.stdout)
        self.assertIn("tun0", ex("client", "ip", "-o", "link", "show", "type", "bridge").stdout)
        self.assertEqual(ex("client", "nft", "list", "tables").stdout, "")
        self.assertNotIn("proto 231", ex("client", "ip", "rule").stdout)

    def test_withoutPrivileges(self):
        result = self.topology.exec(
            "client",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            *twistdCommand(),
            "-n",
            "--pidfile=",
            "enta",
            "--dport",
            "7",
            timeout=30,
        )
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("enta: cannot start: cannot open /dev/net/tun: run as root", output)
        self.assertNotIn("Traceback", output)
        self.assertNothingConfigured()

    def test_badEndpointString(self):
        result = self.run_enta("--dport", "7", "--entg-connect", "tcp:host=10.1.0.2")
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("twistd enta: --entg-connect 'tcp:host=10.1.0.2'", output)
        self.assertNotIn("Traceback", output)
        self.assertNothingConfigured()

    def test_gatewayPortInUse(self):
        blocker = self.topology.start(
            "gw1",
            sys.executable,
            "-c",
            "import socket,time; s=socket.socket(); s.bind(('0.0.0.0',6980)); s.listen(); time.sleep(60)",
        )
        self.topology.waitFor(lambda: ":6980" in self.topology.exec("gw1", "ss", "-ltn").stdout)
        result = self.topology.exec("gw1", *twistdCommand(), "-n", "--pidfile=", "entg", timeout=30)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("entg: cannot start: Couldn't listen on 0.0.0.0:6980", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stderr + result.stdout)
        blocker.kill()

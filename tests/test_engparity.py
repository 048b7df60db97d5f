"""
ENG parity, so that ENG's users and scripts switch without edits: the bare
agent (neither capture nor replay), C{-V}/C{--version} on every command,
and ENG echosvr's command line and result line.
"""

import ipaddress
import os
import re
import socket
import subprocess
import sys
import time

from twisted.python import usage
from twisted.trial import unittest

from ent import __version__
from ent.services.options import EntaOptions
from ent.testing.topology import ADDRESS, ECHOSVR, Tunnel, twistdCommand
from tests.checks import assertStopsCleanly
from tests.netns import enterNewNamespace, requireRoot

ENG_RESULT = re.compile(
    r"^Sent (\d+) bytes, received (\d+) bytes\tcheck size: (PASS|FAIL)\tcheck content: (PASS|FAIL)$", re.MULTILINE
)


def enta(*argv):
    options = EntaOptions()
    options.parseOptions(list(argv))
    return options


class BareOptionsTests(unittest.TestCase):
    """
    Neither --dport nor --replay: ENG's plain agent, no longer refused.
    """

    def test_bareDefaults(self):
        o = enta("--entg-connect", "10.1.0.2:6980")
        self.assertEqual(o["role"], "bare")
        self.assertEqual(o["dports"], ())
        self.assertEqual(o["tun-interface"], ipaddress.IPv4Interface("192.168.0.1/24"))
        self.assertIsNone(o["peer-addr"])

    def test_anyTunAddressWithoutPeer(self):
        """
        No rule names the peer, so any address will do without --peer-addr.
        """
        self.assertEqual(enta("--tun-addr", "10.9.0.7/16")["tun-interface"], ipaddress.IPv4Interface("10.9.0.7/16"))

    def test_peerAddressStillChecked(self):
        o = enta("--tun-addr", "192.168.0.254/24", "--peer-addr", "192.168.0.1")
        self.assertEqual(o["peer-addr"], ipaddress.IPv4Address("192.168.0.1"))
        e = self.assertRaises(usage.UsageError, enta, "--peer-addr", "10.0.0.1")
        self.assertIn("must be another address", str(e))


class VersionTests(unittest.TestCase):
    """
    Every command prints one line with ENT's version and exits 0.
    """

    def assertVersion(self, argv, name):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        self.assertEqual(
            (result.returncode, result.stdout, result.stderr), (0, f"{name} (ENT) {__version__}\n", ""), argv
        )

    def test_twistdCommands(self):
        for plugin in ("enta", "entg", "ent-relay"):
            for flag in ("-V", "--version"):
                self.assertVersion([*twistdCommand(), plugin, flag], plugin)

    def test_pythonDashMEnt(self):
        ent = [sys.executable, "-m", "ent"]
        for flag in ("-V", "--version"):
            self.assertVersion([*ent, flag], "ent")
        for command in ("status", "certs", "demo"):
            self.assertVersion([*ent, command, "-V"], f"ent {command}")

    def test_echosvr(self):
        for flag in ("-V", "--version"):
            self.assertVersion([sys.executable, ECHOSVR, flag], "echosvr")


def waitListening(host, port, timeout=15.0):
    """
    Wait until something accepts on C{host}:C{port} in this namespace.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# A server that echoes wrongly: everything it read, transformed by TRANSFORM.
_BAD_ECHO = """
import socket, sys
transform = eval(sys.argv[1])
server = socket.create_server(("127.0.0.1", 8080))
while True:
    connection, _ = server.accept()
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
    connection.sendall(transform(data))
    connection.close()
"""


class EchosvrEngFormTests(unittest.TestCase):
    """
    ENG echosvr's command line in a namespace of this test's own, with ENG's
    defaults (127.0.0.1:8080) and ENG's result line.
    """

    def setUp(self):
        enterNewNamespace(self)

    def startServer(self, *argv):
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def stop():
            process.kill()
            process.wait()

        self.addCleanup(stop)
        waitListening("127.0.0.1", 8080)

    def client(self, *args):
        return subprocess.run([sys.executable, ECHOSVR, "client", *args], capture_output=True, text=True, timeout=60)

    def test_defaults(self):
        self.startServer(sys.executable, ECHOSVR, "server")
        result = self.client()
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(
            result.stdout.splitlines()[0], "Sent 64 bytes, received 64 bytes\tcheck size: PASS\tcheck content: PASS"
        )

    def test_shortFlagsInAnyOrder(self):
        self.startServer(sys.executable, ECHOSVR, "-p", "8080", "server", "-h", "127.0.0.1")
        result = subprocess.run(
            [sys.executable, ECHOSVR, "-h", "127.0.0.1", "client", "-p", "8080", "--bytes", "100000"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertEqual(ENG_RESULT.search(result.stdout).groups(), ("100000", "100000", "PASS", "PASS"))
        # ENT's own lines stay beside ENG's.
        self.assertIn("sha256 sent", result.stdout)
        self.assertIn("content PASS", result.stdout)

    def test_wrongContent(self):
        self.startServer(sys.executable, "-c", _BAD_ECHO, "lambda data: bytes(len(data))")
        result = self.client()
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertEqual(ENG_RESULT.search(result.stdout).groups(), ("64", "64", "PASS", "FAIL"))

    def test_wrongSize(self):
        self.startServer(sys.executable, "-c", _BAD_ECHO, "lambda data: data[:-1]")
        result = self.client()
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertEqual(ENG_RESULT.search(result.stdout).groups(), ("64", "63", "FAIL", "FAIL"))

    def test_helpIsLongOnly(self):
        result = subprocess.run([sys.executable, ECHOSVR, "--help"], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("-h HOST, --host HOST", result.stdout)
        result = subprocess.run(
            [sys.executable, ECHOSVR, "server", "--bytes", "5"], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 2)
        self.assertIn("--bytes is a client option", result.stderr)


class BareTunnel(Tunnel):
    """
    The four hosts with bare agents at both ends, as ENG runs them: the
    server's TUN takes 192.168.0.254, and nothing but the TUN routes.
    """

    def startService(self, host):
        if host not in ("client", "server"):
            return Tunnel.startService(self, host)
        if host == "client":
            args = ["enta", "--entg-connect", f"{ADDRESS['gw1.agent']}:6980"]
        else:
            args = ["enta", "--entg-connect", f"{ADDRESS['gw2.agent']}:6980", "--tun-addr", "192.168.0.254/24"]
        self.services[host] = self.topology.twistd(host, *args)
        return self.services[host]


class BareTunnelTests(unittest.TestCase):
    """
    Bare agents carry whatever the kernel routes into their TUN, and install
    nothing else.
    """

    def setUp(self):
        requireRoot(self)
        self.tunnel = BareTunnel().__enter__()
        self.addCleanup(self.tunnel.__exit__, None, None, None)
        self.ex = self.tunnel.topology.exec

    def test_plainConnectionAndPing(self):
        """
        The client connects to the server's tunnel address itself: no
        capture, no replay, the TUN's own route takes it.
        """
        result = self.ex(
            "client", sys.executable, ECHOSVR, "client", "--host", "192.168.0.254", "--port", "7", "--bytes", "100000"
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr + self.tunnel.logs())
        self.assertEqual(ENG_RESULT.search(result.stdout).groups(), ("100000", "100000", "PASS", "PASS"))
        with open(os.path.join(self.tunnel.logdir, "echo.log")) as f:
            self.assertIn("connection from 192.168.0.1:", f.read())
        for host, far in (("client", "192.168.0.254"), ("server", "192.168.0.1")):
            ping = self.ex(host, "ping", "-c", "3", "-i", "0.2", "-W", "2", far)
            self.assertEqual(ping.returncode, 0, ping.stdout + ping.stderr)
            self.assertIn("3 received", ping.stdout)
        logs = self.tunnel.logs()
        self.assertEqual(logs.count("bare endpoint: no rules"), 2, logs)

    def test_installsNothingButTheTun(self):
        for host in ("client", "server"):
            self.assertEqual(self.ex(host, "nft", "list", "tables").stdout, "")
            self.assertNotIn("proto 231", self.ex(host, "ip", "rule").stdout)
            self.assertEqual(self.ex(host, "ip", "route", "show", "table", "all", "proto", "231").stdout, "")
        found = self.tunnel.leftovers()
        self.assertEqual(sorted(found), ["client", "server"])
        for host, what in found.items():
            self.assertEqual([item.split(":")[0] for item in what], ["tun"], what)
        assertStopsCleanly(self, self.tunnel)

    def test_engEchosvrThroughTheTunnel(self):
        """
        ENG's demo: echosvr's server on the far tunnel address, its client
        from the near host, both in ENG's form.
        """
        self.tunnel.topology.start(
            "server", sys.executable, ECHOSVR, "server", "-h", "192.168.0.254", "-p", "8080", name="eng-echo"
        )
        self.tunnel.topology.waitFor(lambda: ":8080" in self.ex("server", "ss", "-ltn").stdout)
        result = self.ex("client", sys.executable, ECHOSVR, "client", "-h", "192.168.0.254", "-p", "8080")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr + self.tunnel.logs())
        self.assertEqual(
            result.stdout.splitlines()[0], "Sent 64 bytes, received 64 bytes\tcheck size: PASS\tcheck content: PASS"
        )

"""
Faults injected for real into a running tunnel: killed and restarted
processes, a cut gateway connection, many connections at once.
"""

import signal
import subprocess
import sys
import time

from twisted.trial import unittest

from ent.protocols.relay import RelayLeg
from ent.testing.topology import Tunnel
from tests.checks import sha256s
from tests.netns import requireRoot


class FaultTests(unittest.TestCase):
    def setUp(self):
        requireRoot(self)
        self.tunnel = Tunnel().__enter__()
        self.addCleanup(self.tunnel.__exit__, None, None, None)
        self.t = self.tunnel.topology

    def ourState(self, host):
        ex = self.t.exec
        return {
            "tuns": ex(host, "ip", "-o", "link", "show", "type", "tun").stdout.count("tun0"),
            "tables": ex(host, "nft", "list", "tables").stdout.split("\n").count("table ip ent_tun0"),
            "rules": ex(host, "ip", "rule").stdout.count("lookup 6978"),
            "routes": len(ex(host, "ip", "route", "show", "table", "6978").stdout.splitlines()),
        }

    def restart(self, host, sig=signal.SIGKILL):
        code, _ = self.t.stop(self.tunnel.services[host], sig)
        return code

    def test_agentKill9ThenRestartReplacesStaleState(self):
        # Two routes: through the TUN, and the unreachable one behind it.
        self.assertEqual(self.ourState("client"), {"tuns": 1, "tables": 1, "rules": 1, "routes": 2})
        self.assertEqual(self.restart("client"), -signal.SIGKILL)
        stale = self.ourState("client")
        self.assertEqual(stale["tuns"], 0, "the TUN dies with its process")
        self.assertEqual(
            (stale["tables"], stale["rules"], stale["routes"]),
            (1, 1, 1),
            "a killed agent leaves these: captured traffic meets the unreachable route",
        )
        self.tunnel.startService("client")
        self.t.waitFor(self.tunnel.tunnelUp, timeout=30)
        self.assertEqual(self.ourState("client"), {"tuns": 1, "tables": 1, "rules": 1, "routes": 2})
        echo = self.tunnel.echoClient(1000)
        self.assertEqual(echo.returncode, 0, echo.stdout + self.tunnel.logs())
        self.tunnel.stopServices()
        self.assertEqual(self.tunnel.leftovers(), {})

    def test_gatewayRestartAgentReconnects(self):
        self.restart("gw1")
        self.assertFalse(self.tunnel.tunnelUp())
        self.tunnel.startService("gw1")
        self.t.waitFor(self.tunnel.tunnelUp, timeout=30)
        echo = self.tunnel.echoClient(1000)
        self.assertEqual(echo.returncode, 0, echo.stdout + self.tunnel.logs())
        log = open(f"{self.tunnel.logdir}/client-enta.log").read()
        self.assertEqual(log.count("connected to gateway 10.1.0.2:6980"), 2)
        self.assertIn("lost gateway 10.1.0.2:6980", log)

    def transferThrough(self, cut, size=200_000_000, timeout=240):
        """
        Start a transfer, C{cut} the gateway link while it runs, and check
        that it completes with the same sha256. (200 MB rather than the 50 MB
        of the issue: at several Gbit/s 50 MB is through in a fraction of a
        second, too short a window to cut reliably.)
        """
        client = subprocess.Popen(
            ["ip", "netns", "exec", self.t.ns("client"), *self.tunnel.echoCommand(size, timeout=timeout)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.addCleanup(lambda: client.poll() is None and client.kill())
        echoLog = f"{self.tunnel.logdir}/echo.log"
        self.t.waitFor(lambda: open(echoLog).read().count("connection from") >= 1, timeout=20)
        cut()
        self.assertNotIn("closed after", open(echoLog).read(), "the transfer ended before the cut")
        output, _ = client.communicate(timeout=timeout + 60)
        self.assertEqual(client.returncode, 0, output + self.tunnel.logs())
        sent, back = sha256s(output)
        self.assertEqual(sent, back)
        self.assertIn(f"received {size} bytes", output)
        return output

    def test_killAndRestartGatewayDuringTransfer(self):
        def cut():
            self.restart("gw1")
            time.sleep(1.0)
            self.tunnel.startService("gw1")

        self.transferThrough(cut)
        log = open(f"{self.tunnel.logdir}/gw2-entg.log").read()
        self.assertIn("peer 10.2.0.1", log)

    def test_farGatewayCrashLeavesTheAgentsLegInPlace(self):
        """
        The far gateway is killed under load and stays away longer than the
        stall timeout: the near gateway holds the agent's leg paused (often
        mid-frame) and keeps it, so an agent that never reconnects (ENG's)
        carries on, on the same connection, once the far gateway is back.
        """
        outage = 60.0
        self.assertGreater(outage, RelayLeg.partialFrameTimeout)

        def cut():
            self.restart("gw2")
            time.sleep(outage)
            self.tunnel.startService("gw2")

        self.transferThrough(cut, timeout=400)
        gw1 = open(f"{self.tunnel.logdir}/gw1-entg.log").read()
        self.assertNotIn("dropping connection", gw1)
        self.assertEqual(gw1.count("agent connected from"), 1, gw1)
        client = open(f"{self.tunnel.logdir}/client-enta.log").read()
        self.assertEqual(client.count("connected to gateway"), 1, client)
        self.assertNotIn("lost gateway", client)

    def test_dropGatewayConnectionDuringTransfer(self):
        def cut():
            killed = self.t.exec("gw1", "ss", "-K", "dst", "10.2.0.2", "dport", "=", "6979")
            self.assertIn("10.2.0.2:6979", killed.stdout)

        self.transferThrough(cut)
        gw1 = f"{self.tunnel.logdir}/gw1-entg.log"
        self.t.waitFor(lambda: open(gw1).read().count("relaying between agent and peer gateway") == 2)
        self.assertIn("peer 10.2.0.2:6979 disconnected", open(gw1).read())

    def test_badFramesDropTheConnectionNotTheGateway(self):
        script = (
            "import os, socket, sys, time\n"
            "for data in (b'\\0\\0\\0\\0', b'\\xff\\xff\\xff\\xff', b'\\x7f' + os.urandom(4095)):\n"
            "    s = socket.create_connection(('10.1.0.2', 6980), timeout=5)\n"
            "    s.sendall(data)\n"
            "    try:\n"
            "        print(len(s.recv(100)))\n"
            "    except ConnectionResetError:\n"
            "        print('reset')\n"
            "    s.close()\n"
            "    time.sleep(0.2)\n"
        )
        result = self.t.exec("client", sys.executable, "-c", script)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(result.stdout.split()), 3)
        log = open(f"{self.tunnel.logdir}/gw1-entg.log").read()
        self.assertIn("agent leg: dropping connection from 10.1.0.1:", log)
        self.assertIn("frame with length 0", log)
        self.assertIn("frame of 4294967295 bytes exceeds the maximum of 65535", log)
        self.assertIsNone(self.tunnel.services["gw1"].poll(), "the gateway must survive")
        # The real agent, replaced by each bad connection, comes back by itself.
        self.t.waitFor(self.tunnel.tunnelUp, timeout=30)
        echo = self.tunnel.echoClient(1000)
        self.assertEqual(echo.returncode, 0, echo.stdout + self.tunnel.logs())

    def test_200ConcurrentConnections(self):
        result = self.tunnel.echoClient(20_000, timeout=120, connections=200)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr + self.tunnel.logs())
        self.assertIn("200 connections of 20000 bytes each: 200 echoed correctly, 0 failed", result.stdout)


class SlowPeerTests(unittest.TestCase):
    def setUp(self):
        requireRoot(self)
        self.tunnel = Tunnel().__enter__()
        self.addCleanup(self.tunnel.__exit__, None, None, None)
        self.t = self.tunnel.topology

    def test_peerThatStopsReadingKeepsMemoryBounded(self):
        """
        The server-side agent stops reading (SIGSTOP): backpressure reaches
        the client's TUN reader, which pauses; every process's memory stays
        bounded and does not grow; after SIGCONT the transfer completes
        intact.
        """
        size = 50_000_000
        client = subprocess.Popen(
            ["ip", "netns", "exec", self.t.ns("client"), *self.tunnel.echoCommand(size, timeout=240)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.addCleanup(lambda: client.poll() is None and client.kill())
        echoLog = f"{self.tunnel.logdir}/echo.log"
        self.t.waitFor(lambda: "connection from" in open(echoLog).read(), timeout=20)
        server = self.tunnel.services["server"]
        server.send_signal(signal.SIGSTOP)
        try:
            before = {h: self.tunnel.rss(h) for h in ("client", "gw1", "gw2")}
            time.sleep(3)
            after = {h: self.tunnel.rss(h) for h in ("client", "gw1", "gw2")}
            self.assertIsNone(client.poll(), "the transfer cannot finish while the server is stopped")
        finally:
            server.send_signal(signal.SIGCONT)
        for host in after:
            self.assertLess(after[host], 80 * 2**20, f"{host}: RSS {after[host]} bytes")
            self.assertLess(
                after[host] - before[host],
                8 * 2**20,
                f"{host}: RSS grew from {before[host]} to {after[host]} while stalled",
            )
        output, _ = client.communicate(timeout=300)
        self.assertEqual(client.returncode, 0, output + self.tunnel.logs())
        sent, back = sha256s(output)
        self.assertEqual(sent, back)
        print(f"\nRSS while stalled (bytes): {after}")

"""
The rootless agent (C{--stack user}) for real: twistd processes as nobody
with no capabilities, in namespaces of the four-host tunnel, mixed with TUN
agents, on plain TCP and TLS legs.
"""

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from twisted.trial import unittest

from ent import certs
from ent.topology import ADDRESS, ECHOSVR, USER_LISTEN_PORT, Tunnel, twistdCommand, UNPRIVILEGED
from tests.checks import METRICS, assertEchoAndTransfer, scrapeIn, sha256s
from tests.netns import requireRoot

STOP_LIMIT = 2.0
USER_CLIENT = ["--stack", "user", "--listen", f"{USER_LISTEN_PORT}=192.168.0.254:6978"]
USER_SERVER = ["--stack", "user", "--expose", "6978=7"]


def status(pid):
    """
    The Uid and capability lines of process C{pid}.
    """
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return fields


def socketDirs(pid):
    return glob.glob(os.path.join(tempfile.gettempdir(), f"ent-enta-{pid}-*"))


class RootlessMixin:
    def startTunnel(self, **kwargs):
        self.tunnel = Tunnel(**kwargs).__enter__()
        self.addCleanup(self.tunnel.__exit__, None, None, None)
        self.t = self.tunnel.topology
        return self.tunnel

    def assertUnprivileged(self, host):
        """
        C{host}'s agent runs as nobody with no capability of any kind.
        """
        fields = status(self.tunnel.services[host].pid)
        self.assertEqual(fields["Uid"], ["65534"] * 4)
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            self.assertEqual(int(fields[cap][0], 16), 0, f"{host} {cap}")

    def assertNoTun(self, host):
        tuns = self.t.exec(host, "ip", "-o", "link", "show", "type", "tun").stdout
        self.assertEqual(tuns.strip(), "")
        self.assertEqual(self.t.exec(host, "nft", "list", "tables").stdout.strip(), "")

    def assertStopsUnderLoad(self, *hosts):
        """
        SIGTERM to C{hosts}' agents while the echo client is moving data:
        each exits within 2 s and leaves nothing behind.
        """
        load = subprocess.Popen(
            ["ip", "netns", "exec", self.t.ns("client"), *self.tunnel.echoCommand(500_000_000, timeout=120)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.addCleanup(lambda: load.poll() is None and load.kill())
        time.sleep(2)
        self.assertIsNone(load.poll(), "the load ended before the stop")
        for host in hosts:
            pid = self.tunnel.services[host].pid
            code, seconds = self.t.stop(self.tunnel.services[host])
            self.assertIn(code, (0, -signal.SIGTERM), f"{host}: exit {code}\n{self.tunnel.logs()}")
            self.assertLess(seconds, STOP_LIMIT, f"{host} took {seconds:.2f}s\n{self.tunnel.logs()}")
            self.assertEqual(socketDirs(pid), [])
        # The far end of the load's connection is gone: nobody will close it.
        load.kill()
        load.wait()
        for host, (code, seconds) in self.tunnel.stopServices().items():
            self.assertLess(seconds, STOP_LIMIT, host)
        self.assertEqual(self.tunnel.leftovers(), {})


class RootlessClientTests(RootlessMixin, unittest.TestCase):
    """
    Must-show 1: a rootless client agent reaches the echo server behind a
    TUN server agent through two gateways.
    """

    def setUp(self):
        requireRoot(self)
        self.startTunnel(roleArgs={"client": USER_CLIENT}, unprivileged=["client"],
                         hostArgs={"client": METRICS})

    def test_echo20MB(self):
        self.assertUnprivileged("client")
        assertEchoAndTransfer(self, self.tunnel)
        self.assertNoTun("client")
        echoLog = open(f"{self.tunnel.logdir}/echo.log").read()
        self.assertIn("connection from 192.168.0.1:", echoLog, "the server sees the tunnel address")

    def test_metricsAndStatus(self):
        """
        The rootless agent counts what its stack carried, as a TUN agent does.
        """
        echo = self.tunnel.echoClient(1_000_000)
        self.assertEqual(echo.returncode, 0, echo.stdout + self.tunnel.logs())
        scrape = scrapeIn(self.t, "client")
        self.assertGreater(scrape.value("ent_tun_bytes_total", direction="read"), 1_000_000)
        self.assertGreater(scrape.value("ent_tun_bytes_total", direction="written"), 1_000_000)
        self.assertEqual(scrape.value("ent_tun_packets_total", direction="read"),
                         scrape.value("ent_leg_packets_total", leg="gateway", direction="sent"))
        self.assertEqual(scrape.value("ent_leg_up", leg="gateway"), 1)

    def test_stopUnderLoad(self):
        """
        Must-show 4 (client side): SIGTERM under load, out within 2 s.
        """
        self.assertStopsUnderLoad("client")

    def test_kernelStackRefusedUnprivileged(self):
        """
        The namespace is one where nobody could create a TUN: the kernel
        agent, run the same way, refuses to start in one line.
        """
        result = self.t.exec(
            "client", *UNPRIVILEGED, *twistdCommand(), "-n", "--pidfile=", "enta", "--tun-name", "tunx",
            "--dport", "9", "--entg-connect", f"{ADDRESS['gw1.agent']}:6980", timeout=30,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("enta: cannot start:", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)


class RootlessServerTests(RootlessMixin, unittest.TestCase):
    """
    Must-show 2: a TUN client agent reaches a service behind a rootless
    server agent; a port that is not exposed cannot be reached.
    """

    def setUp(self):
        requireRoot(self)
        client = ["--dport", "7", "--map", f"{ADDRESS['server']}:9=192.168.0.254:9"]
        self.startTunnel(roleArgs={"client": client, "server": USER_SERVER}, unprivileged=["server"])

    def test_pingFarTunnelAddress(self):
        """
        The rootless agent answers ping for its tunnel address, as a TUN
        agent's kernel does.
        """
        result = self.t.exec("client", "ping", "-c", "3", "-i", "0.2", "-W", "2", "192.168.0.254")
        self.assertIn("3 received", result.stdout, result.stdout + result.stderr)

    def test_echo20MB(self):
        self.assertUnprivileged("server")
        assertEchoAndTransfer(self, self.tunnel)
        self.assertNoTun("server")

    def test_notExposedIsUnreachable(self):
        """
        Port 9 has a listener on the server host and the client maps it
        into the tunnel, but the rootless agent does not expose it.
        """
        self.t.start("server", sys.executable, ECHOSVR, "server", "--host", "0.0.0.0", "--port", "9",
                     name="echo9")
        self.t.waitFor(lambda: ":9 " in self.t.exec("server", "ss", "-ltn").stdout)
        result = self.t.exec(
            "client", sys.executable, ECHOSVR, "client", "--host", ADDRESS["server"], "--port", "9",
            "--bytes", "100", "--timeout", "5", timeout=30,
        )
        self.assertNotEqual(result.returncode, 0, result.stdout)
        log = open(f"{self.tunnel.logdir}/echo9.log").read()
        self.assertNotIn("connection from", log)
        # The exposed one still works.
        self.assertEqual(self.tunnel.echoClient(1000).returncode, 0)

    def test_stopUnderLoad(self):
        """
        Must-show 4 (server side).
        """
        self.assertStopsUnderLoad("server")


class RootlessBothEndsTlsTests(RootlessMixin, unittest.TestCase):
    """
    Must-show 3: rootless at both ends, every leg on TLS, 100 concurrent
    connections.
    """

    def setUp(self):
        requireRoot(self)
        directory = tempfile.mkdtemp(prefix="ent-usertls-")
        self.addCleanup(shutil.rmtree, directory, True)
        ca = certs.makeCa(directory)
        certs.makeCertificate(directory, "gw1", [ADDRESS["gw1.agent"], ADDRESS["gw1"]], ca)
        certs.makeCertificate(directory, "gw2", [ADDRESS["gw2"], ADDRESS["gw2.agent"]], ca)
        certs.makeCertificate(directory, "agent", [], ca)
        # The agents run as nobody: their key must be theirs to read.
        os.chmod(directory, 0o755)
        for name in ("agent.key", "agent.pem", "ca.pem"):
            os.chown(os.path.join(directory, name), 65534, 65534)

        def tls(name, *flags):
            return [*flags, "--tls-cert", os.path.join(directory, f"{name}.pem"),
                    "--tls-key", os.path.join(directory, f"{name}.key"),
                    "--tls-ca", os.path.join(directory, "ca.pem")]

        self.startTunnel(
            roleArgs={"client": USER_CLIENT, "server": USER_SERVER}, unprivileged=["client", "server"],
            hostArgs={
                "client": tls("agent", "--entg-tls"),
                "gw1": tls("gw1", "--enta-tls", "--entg-tls"),
                "gw2": tls("gw2", "--enta-tls", "--entg-tls"),
                "server": tls("agent", "--entg-tls"),
            },
        )

    def test_hundredConcurrentConnections(self):
        self.assertUnprivileged("client")
        self.assertUnprivileged("server")
        result = self.tunnel.echoClient(200_000, timeout=120, connections=100)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr + self.tunnel.logs())
        self.assertIn("100 connections of 200000 bytes each: 100 echoed correctly, 0 failed", result.stdout)
        self.assertIn("TLS", self.tunnel.logs(200))

    def test_echo20MB(self):
        assertEchoAndTransfer(self, self.tunnel)
        sent, back = sha256s(self.tunnel.echoClient(1_000_000).stdout)
        self.assertEqual(sent, back)

    def test_stopUnderLoad(self):
        self.assertStopsUnderLoad("client", "server")

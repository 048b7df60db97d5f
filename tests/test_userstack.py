"""
The rootless agent (C{--stack user}) for real: twistd processes as nobody
with no capabilities, in namespaces of the four-host tunnel, mixed with TUN
agents, on plain TCP and TLS legs.
"""

import glob
import hashlib
import ipaddress
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, UNIXServerEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ent.capture.mapping import Exposure, Mapping, parseListen
from ent.capture.userstack import UserStack, removeStaleSocketDirs
from ent.errors import UserStackError
from ent.legs import certs
from ent.observability.stats import DropReporter
from ent.protocols.packets import checksum
from ent.protocols.splice import SocketRelayFactory
from ent.testing.topology import ADDRESS, ECHOSVR, UNPRIVILEGED, USER_LISTEN_PORT, Tunnel, twistdCommand
from tests.checks import METRICS, assertEchoAndTransfer, scrapeIn, sha256s
from tests.netns import requireRoot

STOP_LIMIT = 2.0
USER_CLIENT = ["--stack", "user", "--listen", f"{USER_LISTEN_PORT}=192.168.0.254:6978"]
USER_SERVER = ["--stack", "user", "--expose", "6978=7"]


# Sends without reading for 4 s, reports how much the connection took
# ("held SENT SENT_2S_LATER"), then reads the echo of all of it back.
SLOW_READER = """
import hashlib, socket, sys, threading, time
conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sent = [0]
digest = hashlib.sha256()
chunk = bytes(range(256)) * 256
def send():
    conn.settimeout(None)
    try:
        while not done.is_set():
            conn.sendall(chunk)
            digest.update(chunk)
            sent[0] += len(chunk)
    except OSError:
        pass
done = threading.Event()
sender = threading.Thread(target=send, daemon=True)
sender.start()
time.sleep(4)
first = sent[0]
time.sleep(2)
print("held", first, sent[0], flush=True)
done.set()
back = hashlib.sha256()
got = 0
conn.settimeout(60)
while sender.is_alive() or got < sent[0]:
    data = conn.recv(1 << 20)
    if not data:
        break
    back.update(data)
    got += len(data)
    if got >= sent[0] and not sender.is_alive():
        break
sender.join()
print("echo", "PASS" if got == sent[0] and back.digest() == digest.digest() else "FAIL", got, sent[0])
"""


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
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
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
        self.startTunnel(roleArgs={"client": USER_CLIENT}, unprivileged=["client"], hostArgs={"client": METRICS})

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
        self.assertEqual(
            scrape.value("ent_tun_packets_total", direction="read"),
            scrape.value("ent_leg_packets_total", leg="gateway", direction="sent"),
        )
        self.assertEqual(scrape.value("ent_leg_up", leg="gateway"), 1)

    def test_slowReaderSlowsTheSender(self):
        """
        Backpressure end to end: an app that sends through the rootless
        agent and does not read its echo is held back once the buffers on
        the way are full, and the agent's memory stays bounded.
        """
        result = self.t.exec("client", sys.executable, "-c", SLOW_READER, str(USER_LISTEN_PORT), timeout=120)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr + self.tunnel.logs())
        sent, afterPause, rss = None, None, self.tunnel.rss("client")
        for line in result.stdout.splitlines():
            if line.startswith("held "):
                sent, afterPause = (int(x) for x in line.split()[1:3])
        self.assertIsNotNone(sent, result.stdout)
        # Unread, at most the buffers on the way: the sender stopped.
        self.assertLess(sent, 48_000_000, result.stdout)
        self.assertLess(afterPause - sent, 1_000_000, result.stdout)
        self.assertIn("echo PASS", result.stdout)
        self.assertLess(rss, 150_000_000)

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
            "client",
            *UNPRIVILEGED,
            *twistdCommand(),
            "-n",
            "--pidfile=",
            "enta",
            "--tun-name",
            "tunx",
            "--dport",
            "9",
            "--entg-connect",
            f"{ADDRESS['gw1.agent']}:6980",
            timeout=30,
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
        self.t.start("server", sys.executable, ECHOSVR, "server", "--host", "0.0.0.0", "--port", "9", name="echo9")
        self.t.waitFor(lambda: ":9 " in self.t.exec("server", "ss", "-ltn").stdout)
        result = self.t.exec(
            "client",
            sys.executable,
            ECHOSVR,
            "client",
            "--host",
            ADDRESS["server"],
            "--port",
            "9",
            "--bytes",
            "100",
            "--timeout",
            "5",
            timeout=30,
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
            return [
                *flags,
                "--tls-cert",
                os.path.join(directory, f"{name}.pem"),
                "--tls-key",
                os.path.join(directory, f"{name}.key"),
                "--tls-ca",
                os.path.join(directory, "ca.pem"),
            ]

        self.startTunnel(
            roleArgs={"client": USER_CLIENT, "server": USER_SERVER},
            unprivileged=["client", "server"],
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


class StackPairTests(unittest.TestCase):
    """
    Two user-space stacks back to back in this process, the real libslirp
    on loopback sockets: a client stack's listen port reaches a service
    behind a server stack, with no gateway and no privilege at all.
    """

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.drops = DropReporter(reactor, "test")
        self.fdsBefore = openFds()

    def stack(self, address, deliver, **kwargs):
        stack = UserStack(ipaddress.IPv4Interface(address), 65535, deliver, self.drops, self.reactor, **kwargs)
        stack.start()
        self.addCleanup(stack.close)
        return stack

    async def test_echoThroughTwoStacks(self):
        reactor = self.reactor
        echo = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(HalfCloseEcho))
        self.addCleanup(echo.stopListening)
        stacks = {}
        listenPort = freePort()
        client = stacks["client"] = self.stack(
            "192.168.0.1/24",
            lambda packets, size: reactor.callLater(0, stacks["server"].writePackets, packets),
            listens=[Mapping("tcp", "127.0.0.1", listenPort, "192.168.0.254", 6978)],
        )
        server = stacks["server"] = self.stack(
            "192.168.0.254/24",
            lambda packets, size: reactor.callLater(0, client.writePackets, packets),
            exposures=[Exposure("tcp", 6978, None, echo.getHost().port)],
        )
        relay = SocketRelayFactory(
            TCP4ClientEndpoint(reactor, "127.0.0.1", echo.getHost().port), "echo", 10, self.drops
        )
        unix = await UNIXServerEndpoint(reactor, server.socketPath(server.exposures[0])).listen(relay)
        self.addCleanup(unix.stopListening)
        verifyObject(IPushProducer, client)
        payload = os.urandom(2_000_000)
        got = await deferToThread(echoOnce, listenPort, payload)
        self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(payload).hexdigest())
        self.assertGreater(client.stats.packetsRead, 0)
        self.assertGreater(server.stats.packetsWritten, 0)
        self.assertEqual(self.drops.total, {})

    def test_pingAnsweredForTheTunnelAddress(self):
        out = []
        server = self.stack(
            "192.168.0.254/24", lambda packets, size: out.extend(packets), exposures=[Exposure("tcp", 6978, None, 7)]
        )
        request = icmpEcho("192.168.0.1", "192.168.0.254", b"ping-payload")
        server.writePackets([request])
        self.assertEqual(len(out), 1)
        reply = out[0]
        self.assertEqual(reply[12:16], ipaddress.IPv4Address("192.168.0.254").packed)
        self.assertEqual(reply[16:20], ipaddress.IPv4Address("192.168.0.1").packed)
        self.assertEqual(reply[20], 0)
        self.assertEqual(checksum(reply[:20]), 0)
        self.assertEqual(checksum(reply[20:]), 0)
        self.assertTrue(reply.endswith(b"ping-payload"))

    def test_hangUpOnlyForReaders(self):
        """
        A socket slirp only writes to hears of its peer's hang-up through the
        write that fails, not as HUP: slirp takes HUP for end of input, and
        would never get to the write (the rootless server spun at 100% CPU
        when a service closed while the tunnel still had data for it).
        """
        import select

        from ent.capture.userstack import POLL_ERR, POLL_HUP, POLL_IN, POLL_OUT

        stack = self.stack("192.168.0.254/24", lambda packets, size: None, exposures=[Exposure("tcp", 6978, None, 7)])
        stack._polled = [(50, POLL_OUT | POLL_ERR), (51, POLL_IN | POLL_HUP)]
        stack._revents = {50: select.EPOLLOUT | select.EPOLLHUP, 51: select.EPOLLIN | select.EPOLLHUP}
        self.assertEqual(stack._reventsOf(0, None), POLL_OUT)
        self.assertEqual(stack._reventsOf(1, None), POLL_IN | POLL_HUP)
        stack._revents = {}

    def test_nothingToWaitForStaysOutOfEpoll(self):
        """
        An fd slirp polls only for errors is not in epoll, which would report
        its hang-up at every turn.
        """
        from ent.capture.userstack import POLL_ERR, POLL_HUP

        stack = self.stack("192.168.0.1/24", lambda packets, size: None)
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        b.close()
        original = stack.lib
        fill = original.slirp_pollfds_fill

        class Lib:
            def __getattr__(self, name):
                return getattr(original, name)

            def slirp_pollfds_fill(self, s, timeout, addPoll, opaque):
                fill(s, timeout, addPoll, opaque)
                addPoll(a.fileno(), POLL_ERR | POLL_HUP, opaque)

        stack.lib = Lib()
        self.addCleanup(setattr, stack, "lib", original)
        stack._fill()
        self.assertNotIn(a.fileno(), stack._registered)
        self.assertEqual(stack._epoll.poll(0), [])

    def test_notIpv4CountedNotLost(self):
        server = self.stack("192.168.0.254/24", lambda packets, size: None, exposures=[Exposure("tcp", 6978, None, 7)])
        ipv6 = bytes([0x60]) + bytes(39)
        self.assertEqual(server.writePackets([ipv6]), 1)
        self.assertEqual(self.drops.total[("gateway", "not_ipv4")], 1)

    def test_closeLeavesNothing(self):
        server = self.stack("192.168.0.254/24", lambda packets, size: None, exposures=[Exposure("tcp", 6978, None, 7)])
        directory = server.socketDir
        self.assertTrue(os.path.isdir(directory))
        server.close()
        self.assertFalse(os.path.exists(directory))
        self.assertEqual(openFds(), self.fdsBefore)

    def test_listenPortTakenIsAClearError(self):
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        fds = openFds()
        stack = UserStack(
            ipaddress.IPv4Interface("192.168.0.1/24"),
            65535,
            lambda packets, size: None,
            self.drops,
            self.reactor,
            listens=[parseListen(f"{port}=192.168.0.254:6978")],
        )
        e = self.assertRaises(UserStackError, stack.start)
        self.assertEqual(
            str(e), f"--listen {port}=192.168.0.254:6978: cannot listen on 127.0.0.1:{port} (in use or not allowed)"
        )
        self.assertEqual(openFds(), fds)


def openFds():
    return set(os.listdir("/proc/self/fd")) - {"0", "1", "2"}


def freePort():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


@implementer(IHalfCloseableProtocol)
class HalfCloseEcho(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


def echoOnce(port, payload):
    """
    Send C{payload} to 127.0.0.1:C{port}, half-close, return what came back.
    """
    import threading

    conn = socket.create_connection(("127.0.0.1", port), timeout=30)

    def send():
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    got = bytearray()
    while True:
        chunk = conn.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    sender.join()
    conn.close()
    return bytes(got)


def icmpEcho(source, destination, payload):
    icmp = bytearray(b"\x08\x00\x00\x00\x12\x34\x00\x01" + payload)
    icmp[2:4] = struct.pack(">H", checksum(bytes(icmp)))
    header = bytearray(20)
    header[0] = 0x45
    struct.pack_into(">H", header, 2, 20 + len(icmp))
    header[8] = 64
    header[9] = 1
    header[12:16] = ipaddress.IPv4Address(source).packed
    header[16:20] = ipaddress.IPv4Address(destination).packed
    struct.pack_into(">H", header, 10, checksum(bytes(header)))
    return bytes(header + icmp)


class RootlessRatsTlsTests(RootlessMixin, unittest.TestCase):
    """
    Rootless at both ends with every leg on rats-tls (the library under
    test: the mock, or a real build).
    """

    def setUp(self):
        requireRoot(self)
        from tests.ratstlsmock import library_path_under_test
        from tests.test_ratstls_tunnel import ratsArgs

        library = library_path_under_test()
        # The agents run as nobody: the library's folders must be theirs to read.
        folder = os.path.dirname(library)
        while folder.startswith(tempfile.gettempdir() + os.sep):
            os.chmod(folder, os.stat(folder).st_mode | 0o055)
            folder = os.path.dirname(folder)
        common = ratsArgs(library)
        self.startTunnel(
            roleArgs={"client": USER_CLIENT, "server": USER_SERVER},
            unprivileged=["client", "server"],
            hostArgs={
                "client": ["--entg-rats-tls", *common],
                "gw1": ["--enta-rats-tls", "--entg-rats-tls", *common],
                "gw2": ["--enta-rats-tls", "--entg-rats-tls", *common],
                "server": ["--entg-rats-tls", *common],
            },
        )

    def test_echo20MB(self):
        self.assertUnprivileged("client")
        self.assertUnprivileged("server")
        assertEchoAndTransfer(self, self.tunnel)


class StaleSocketDirTests(unittest.TestCase):
    def test_deadAgentsDirectoryRemoved(self):
        """
        A rootless agent killed with -9 leaves its socket directory; the next
        start of any agent of the same user removes it, and only it.
        """
        root = self.mktemp()
        os.mkdir(root)
        dead = subprocess.Popen(["true"])
        dead.wait()
        stale = os.path.join(root, f"ent-enta-{dead.pid}-abc")
        live = os.path.join(root, f"ent-enta-{os.getpid()}-def")
        other = os.path.join(root, "ent-enta-notapid-x")
        for path in (stale, live, other):
            os.mkdir(path)
        self.assertEqual(removeStaleSocketDirs(root), [stale])
        self.assertEqual(sorted(os.listdir(root)), sorted([os.path.basename(live), os.path.basename(other)]))

"""
The socket relay: its logic on fake transports, then for real in mock mode
(the vsock side is TCP) as the original socket-relay was validated: a TCP echo
server behind one relay (vsock-listen -> TCP-connect), a second relay in front
of it the other way round (TCP-listen -> vsock-connect), clients through
both. All sockets are on 127.0.0.1.
"""

import io
import os
import socket
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IHalfCloseableProtocol, IPullProducer, IStreamClientEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from ent.flow import Valve
from ent.legs.vsock import CID_ANY, VsockClientEndpoint, VsockServerEndpoint
from ent.observability.stats import ServiceStats
from ent.observability.status import Scrape, fetch, metricsUrl
from ent.protocols.splice import IncomingEnd, SocketRelayFactory
from ent.services.socketrelay import RelayOptions, SocketRelayService, makeRelayService
from ent.services.startup import StartupGuard

LOCAL = "127.0.0.1"


def relayOptions(*argv):
    options = RelayOptions()
    options.parseOptions(list(argv))
    return options


class RelayOptionsTests(unittest.TestCase):
    def test_parentSide(self):
        o = relayOptions("--tcp-address", "127.0.0.1:8443", "--vsock-address", "16:8888", "--tcp-to-vsock")
        self.assertEqual((o["listen"], o["connect"]), ("127.0.0.1:8443", "vsock:16:8888"))
        self.assertEqual(o["max-concurrent-connections"], 1024)

    def test_enclaveSide(self):
        o = relayOptions("--vsock-address", "8888", "--tcp-address", "127.0.0.1:8888")
        self.assertEqual((o["listen"], o["connect"]), ("vsock:8888", "127.0.0.1:8888"))
        o = relayOptions("--vsock-address", "3:8888", "--tcp-address", "localhost:8888")
        self.assertEqual((o["listen"], o["connect"]), ("vsock:8888:cid=3", "localhost:8888"))

    def test_mock(self):
        o = relayOptions("--mock-vsock", "--vsock-address", "8888", "--tcp-address", "127.0.0.1:9000")
        self.assertEqual((o["listen"], o["connect"]), ("127.0.0.1:8888", "127.0.0.1:9000"))
        o = relayOptions(
            "--mock-vsock",
            "--tcp-to-vsock",
            "--tcp-address",
            "8443",
            "--vsock-address",
            "127.0.0.1:8888",
            "--max-concurrent-connections",
            "5",
        )
        self.assertEqual((o["listen"], o["connect"]), ("8443", "127.0.0.1:8888"))
        self.assertEqual(o["max-concurrent-connections"], 5)

    def test_endpointStrings(self):
        o = relayOptions("--listen", "vsock:6980", "--connect", "tcp:127.0.0.1:6980")
        self.assertEqual((o["listen"], o["connect"]), ("vsock:6980", "tcp:127.0.0.1:6980"))

    def assertRefused(self, argv, fragment):
        e = self.assertRaises(usage.UsageError, relayOptions, *argv)
        self.assertIn(fragment, str(e))
        self.assertNotIn("\n", str(e))

    def test_refusals(self):
        self.assertRefused([], "give --tcp-address and --vsock-address")
        self.assertRefused(["--tcp-address", "127.0.0.1:1"], "give --tcp-address and --vsock-address")
        self.assertRefused(
            ["--tcp-address", "127.0.0.1:70000", "--vsock-address", "1"],
            "--tcp-address '127.0.0.1:70000': port 70000 is out of range 1-65535",
        )
        self.assertRefused(["--tcp-address", "8443", "--vsock-address", "1"], "--tcp-address '8443' is not HOST:PORT")
        self.assertRefused(
            ["--tcp-to-vsock", "--tcp-address", "localhost:1", "--vsock-address", "16:1"],
            "--tcp-address 'localhost:1' is not [ADDR:]PORT",
        )
        self.assertRefused(
            ["--tcp-to-vsock", "--tcp-address", "300.1.1.1:1", "--vsock-address", "16:1"],
            "'300.1.1.1' is not an IP address",
        )
        self.assertRefused(
            ["--tcp-to-vsock", "--tcp-address", "1", "--vsock-address", "8888"],
            "--vsock-address '8888': give CID:PORT to connect to",
        )
        self.assertRefused(
            ["--tcp-to-vsock", "--tcp-address", "1", "--vsock-address", "x:8888"],
            "--vsock-address 'x:8888': vsock CID 'x' is not a number",
        )
        self.assertRefused(["--tcp-address", "h:1", "--vsock-address", "4294967295"], "out of range 0-4294967294")
        self.assertRefused(
            ["--mock-vsock", "--tcp-to-vsock", "--tcp-address", "1", "--vsock-address", "8888"],
            "--vsock-address (mock) '8888' is not HOST:PORT",
        )
        self.assertRefused(
            ["--listen", "vsock:1", "--connect", "vsock:3:1", "--tcp-to-vsock"],
            "--listen and --connect exclude --tcp-to-vsock",
        )
        self.assertRefused(["--listen", "vsock:1"], "--listen and --connect go together")
        self.assertRefused(["--listen", "nonsense", "--connect", "vsock:3:1"], "neither [ADDR:]PORT")
        self.assertRefused(["--listen", "1", "--connect", "h:1", "--max-concurrent-connections", "0"], "at least 1")
        self.assertRefused(
            ["--listen", "1", "--connect", "h:1", "--max-concurrent-connections", "many"], "not a number"
        )

    def test_buildsEndpoints(self):
        reactor = MemoryReactor()
        guard = makeRelayService(relayOptions("--vsock-address", "8888", "--tcp-address", "127.0.0.1:8888"), reactor)
        self.assertIsInstance(guard, StartupGuard)
        [service] = guard
        self.assertIsInstance(service.listenEndpoint, VsockServerEndpoint)
        self.assertEqual((service.listenEndpoint.cid, service.listenEndpoint.port), (CID_ANY, 8888))
        self.assertIsInstance(service.relay.target, HostnameEndpoint)
        guard = makeRelayService(
            relayOptions("--tcp-address", "127.0.0.1:8443", "--vsock-address", "16:8888", "--tcp-to-vsock"), reactor
        )
        [service] = guard
        self.assertIsInstance(service.listenEndpoint, TCP4ServerEndpoint)
        self.assertIsInstance(service.relay.target, VsockClientEndpoint)
        self.assertEqual(service.relay.targetDescription, "vsock:16:8888")

    def test_badEndpointStringIsOneLine(self):
        options = relayOptions("--listen", "vsock:x", "--connect", "vsock:3:1")
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        e = self.assertRaises(SystemExit, makeRelayService, options, MemoryReactor())
        self.assertEqual(
            (e.code, stderr.getvalue()),
            (
                2,
                (
                    "twistd ent-relay: --listen 'vsock:x': vsock port 'x' is not a number (see twistd ent-relay --help)\n"
                ),
            ),
        )


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """
    Records connection attempts; the test connects or fails them.
    """

    def __init__(self):
        self.attempts = []

    def connect(self, factory):
        d = Deferred()
        self.attempts.append((factory, d))
        return d

    def succeed(self, n=-1):
        factory, d = self.attempts[n]
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(HalfCloseTransport())
        d.callback(protocol)
        return protocol


class HalfCloseTransport(StringTransport):
    writeClosed = False

    def loseWriteConnection(self):
        self.writeClosed = True


def lose(protocol):
    protocol.connectionLost(Failure(ConnectionDone()))


class RelayLogicTests(unittest.TestCase):
    """
    One relayed connection on fake transports.
    """

    def setUp(self):
        self.events = []
        self.patch(IncomingEnd, "log", Logger(observer=self.events.append))
        self.target = FakeEndpoint()
        self.drops = ServiceStats("ent-relay", Clock()).drops
        self.relay = SocketRelayFactory(self.target, "vsock:16:8888", 2, self.drops)

    def accept(self):
        incoming = self.relay.buildProtocol(None)
        incoming.makeConnection(HalfCloseTransport())
        return incoming

    def relayed(self):
        incoming = self.accept()
        return incoming, self.target.succeed()

    def test_pausedUntilConnectedThenJoinedWithValves(self):
        incoming = self.accept()
        self.assertEqual(incoming.transport.producerState, "paused")
        self.assertEqual(len(self.target.attempts), 1)
        outgoing = self.target.succeed()
        self.assertEqual(incoming.transport.producerState, "producing")
        self.assertIsInstance(incoming.transport.producer, Valve)
        self.assertIs(incoming.transport.producer.producer, outgoing.transport)
        self.assertIs(outgoing.transport.producer.producer, incoming.transport)
        self.assertTrue(incoming.transport.streaming)

    def test_bytesBothWaysAndCounted(self):
        incoming, outgoing = self.relayed()
        incoming.dataReceived(b"to the enclave")
        outgoing.dataReceived(b"back")
        self.assertEqual(outgoing.transport.value(), b"to the enclave")
        self.assertEqual(incoming.transport.value(), b"back")
        self.assertEqual((self.relay.bytesToTarget, self.relay.bytesFromTarget), (14, 4))

    def test_earlyBytesKeptUntilConnected(self):
        incoming = self.accept()
        incoming.dataReceived(b"early")
        outgoing = self.target.succeed()
        self.assertEqual(outgoing.transport.value(), b"early")

    def test_refusedAboveTheLimit(self):
        first, second = self.accept(), self.accept()
        third = self.accept()
        self.assertTrue(third.transport.disconnected)
        self.assertFalse(first.transport.disconnecting or second.transport.disconnecting)
        self.assertEqual(len(self.target.attempts), 2)
        self.assertEqual((self.relay.open, self.relay.accepted, self.relay.refused), (2, 2, 1))
        self.assertEqual(self.drops.total[("incoming", "connection_limit")], 1)
        lose(third)
        self.assertEqual(self.relay.open, 2)
        lose(first)
        self.assertEqual(self.relay.open, 1)
        self.assertFalse(self.accept().transport.disconnected)

    def test_halfClosePassedOnBothWays(self):
        incoming, outgoing = self.relayed()
        incoming.readConnectionLost()
        self.assertTrue(outgoing.transport.writeClosed)
        self.assertIsNone(outgoing.transport.producer, "a producer would hold the FIN back")
        self.assertFalse(incoming.transport.disconnecting)
        outgoing.dataReceived(b"the reply")
        self.assertEqual(incoming.transport.value(), b"the reply")
        outgoing.writeConnectionLost()
        self.assertFalse(outgoing.transport.disconnecting)
        outgoing.readConnectionLost()
        self.assertTrue(incoming.transport.writeClosed)
        self.assertTrue(outgoing.transport.disconnecting, "both directions of the target are done")
        incoming.writeConnectionLost()
        self.assertTrue(incoming.transport.disconnecting)

    def test_noHalfCloseOnTheTransportClosesInstead(self):
        incoming = self.relay.buildProtocol(None)
        incoming.makeConnection(StringTransport())  # no loseWriteConnection, as TLS
        outgoing = self.target.succeed()
        outgoing.dataReceived(b"last words")
        outgoing.readConnectionLost()
        self.assertEqual(incoming.transport.value(), b"last words")
        self.assertTrue(incoming.transport.disconnecting)

    def test_halfCloseBeforeConnected(self):
        incoming = self.accept()
        incoming.dataReceived(b"all of it")
        incoming.readConnectionLost()
        outgoing = self.target.succeed()
        self.assertEqual(outgoing.transport.value(), b"all of it")
        self.assertTrue(outgoing.transport.writeClosed)
        self.assertEqual(incoming.transport.producerState, "paused")

    def test_oneSideLostClosesTheOther(self):
        incoming, outgoing = self.relayed()
        lose(outgoing)
        self.assertTrue(incoming.transport.disconnecting)
        self.assertIsNone(incoming.transport.producer)
        self.assertEqual(self.relay.open, 1)
        lose(incoming)
        self.assertEqual((self.relay.open, self.relay.ends), (0, set()))

    def test_connectFailedClosesAndLogs(self):
        incoming = self.accept()
        self.target.attempts[0][1].errback(Failure(ConnectionRefusedError(111, "Connection refused")))
        self.assertTrue(incoming.transport.disconnecting)
        self.assertEqual(self.relay.failedConnects, 1)
        [event] = self.events
        self.assertEqual(
            formatEvent(event),
            "cannot relay 192.168.1.1:54321 to vsock:16:8888: "
            "Connection was refused by other side: 111: Connection refused.",
        )

    def test_lostWhileConnectingCancels(self):
        incoming = self.accept()
        lose(incoming)
        self.assertTrue(self.target.attempts[0][1].called)
        self.assertEqual((self.relay.failedConnects, self.relay.open), (0, 0))
        self.assertEqual(self.events, [])


@implementer(IHalfCloseableProtocol)
class EchoServer(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)

    def readConnectionLost(self):
        self.factory.halfClosed += 1
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.factory.closed += 1


class EchoFactory(Factory):
    protocol = EchoServer
    halfClosed = closed = 0


class EchoClient(Protocol):
    """
    Sends C{payload}, then half-closes (C{halfClose}), waits for the whole
    echo and closes, or stays open (C{hold}); C{done} fires with what came
    back.
    """

    def __init__(self, payload, halfClose=False, hold=False):
        self.payload = payload
        self.halfClose = halfClose
        self.hold = hold
        self.received = []
        self.count = 0
        self.done = Deferred()

    def connectionMade(self):
        self.transport.write(self.payload)
        if self.halfClose:
            self.transport.loseWriteConnection()

    def dataReceived(self, data):
        self.received.append(data)
        self.count += len(data)
        if not (self.halfClose or self.hold) and self.count >= len(self.payload):
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback(b"".join(self.received))


@implementer(IPullProducer)
class Firehose(Protocol):
    """
    Writes C{total} bytes as fast as its transport takes them.
    """

    chunk = b"\xa5" * 65536

    def __init__(self, total):
        self.total = total
        self.written = 0

    def connectionMade(self):
        self.transport.registerProducer(self, False)

    def resumeProducing(self):
        self.transport.write(self.chunk)
        self.written += len(self.chunk)
        if self.written >= self.total:
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self):
        pass


class Counter(Protocol):
    def __init__(self):
        self.count = 0
        self.done = Deferred()

    def dataReceived(self, data):
        self.count += len(data)

    def connectionLost(self, reason):
        self.done.callback(self.count)


async def waitFor(condition, timeout=10.0):
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await deferLater(reactor, 0.02)
    raise AssertionError("timed out waiting")


def freePort():
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


class MockModeTests(unittest.TestCase):
    """
    Two relays in-process on the real reactor, the vsock leg between them
    being TCP as in --mock-vsock.
    """

    async def listen(self, factory):
        port = await TCP4ServerEndpoint(reactor, 0, backlog=200, interface=LOCAL).listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def relay(self, targetPort, maxConnections=1024):
        service = SocketRelayService(
            TCP4ServerEndpoint(reactor, 0, backlog=200, interface=LOCAL),
            TCP4ClientEndpoint(reactor, LOCAL, targetPort),
            reactor,
            maxConnections,
            connectDescription=f"{LOCAL}:{targetPort}",
        )
        service.startService()
        self.addCleanup(service.stopService)
        return service

    async def chain(self, serverFactory, maxConnections=1024):
        """
        client -> front (TCP-listen -> vsock-connect) -> back (vsock-listen
        -> TCP-connect) -> server.
        """
        self.back = await self.relay(await self.listen(serverFactory))
        self.front = await self.relay(self.back.port.getHost().port, maxConnections)
        self.frontPort = self.front.port.getHost().port

    async def client(self, protocol):
        return await connectProtocol(TCP4ClientEndpoint(reactor, LOCAL, self.frontPort), protocol)

    async def echo(self, payload, halfClose=False):
        client = await self.client(EchoClient(payload, halfClose))
        return await client.done

    async def test_oneEcho(self):
        await self.chain(EchoFactory())
        self.assertEqual(await self.echo(b"hello enclave"), b"hello enclave")
        for relay in (self.front.relay, self.back.relay):
            self.assertEqual((relay.accepted, relay.bytesToTarget, relay.bytesFromTarget), (1, 13, 13))
        await waitFor(lambda: self.front.relay.open == 0 and self.back.relay.open == 0)

    async def test_hundredConcurrentClients(self):
        await self.chain(EchoFactory())
        payloads = [os.urandom(1000 + i * 997) for i in range(100)]
        clients = [await self.client(EchoClient(payload)) for payload in payloads]
        echoes = await gatherResults([client.done for client in clients])
        self.assertEqual(len(echoes), 100)
        for payload, echo in zip(payloads, echoes, strict=True):
            self.assertEqual(echo, payload)
        self.assertEqual(self.front.relay.accepted, 100)
        self.assertEqual(self.front.relay.bytesFromTarget, sum(map(len, payloads)))
        self.assertEqual(self.front.relay.refused, 0)

    async def test_connectionLimit(self):
        await self.chain(EchoFactory(), maxConnections=5)
        held = []
        for i in range(5):
            held.append(await self.client(EchoClient(b"ping %d" % i, hold=True)))
        await waitFor(lambda: all(client.count == 6 for client in held))
        self.assertEqual(self.front.relay.open, 5)
        sixth = await self.client(EchoClient(b"over the limit"))
        self.assertEqual(await sixth.done, b"")
        self.assertEqual(self.front.relay.refused, 1)
        self.assertEqual(self.front.relay.drops.total[("incoming", "connection_limit")], 1)
        self.assertEqual(self.back.relay.accepted, 5, "a refused connection never reaches the target")
        held[0].transport.loseConnection()
        await waitFor(lambda: self.front.relay.open == 4)
        self.assertEqual(await self.echo(b"room again"), b"room again")
        for client in held[1:]:
            client.transport.loseConnection()
            await client.done

    async def test_halfClosePassedThrough(self):
        server = EchoFactory()
        await self.chain(server)
        payload = os.urandom(300_000)
        self.assertEqual(await self.echo(payload, halfClose=True), payload)
        self.assertEqual(server.halfClosed, 1, "the server saw the client's half-close as such")
        await waitFor(lambda: self.front.relay.open == 0 and self.back.relay.open == 0)

    async def test_targetDown(self):
        events = []
        self.patch(IncomingEnd, "log", Logger(observer=events.append))
        down = freePort()
        relay = await self.relay(down)
        self.frontPort = relay.port.getHost().port
        self.assertEqual(await self.echo(b"anyone there?"), b"")
        self.assertEqual(relay.relay.failedConnects, 1)
        self.assertEqual(relay.relay.open, 0)
        [event] = events
        text = formatEvent(event)
        self.assertIn(f"to 127.0.0.1:{down}: Connection was refused", text)
        self.assertRegex(text, r"^cannot relay 127\.0\.0\.1:\d+ to ")

    async def test_slowReaderPausesTheSender(self):
        total = 256 * 2**20
        firehose = Firehose(total)
        await self.chain(Factory.forProtocol(lambda: firehose))
        reader = await self.client(Counter())
        reader.transport.pauseProducing()
        await waitFor(lambda: self.front.relay.open == 1 and firehose.written > 0)
        before = -1
        while before != firehose.written:
            before = firehose.written
            await deferLater(reactor, 0.3)
        self.assertLess(firehose.written, total, "the firehose should have been held back")
        for service in (self.front, self.back):
            [incoming] = [end for end in service.relay.ends if isinstance(end, IncomingEnd)]
            transport = incoming.transport
            buffered = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
            self.assertTrue(transport.producerPaused, "the relay paused the side that sends")
            self.assertNotIn(incoming.other.transport, reactor.getReaders())
            self.assertLessEqual(buffered, 2 * transport.bufferSize)
        reader.transport.resumeProducing()
        self.assertEqual(await reader.done, firehose.written)
        self.assertGreaterEqual(firehose.written, total)


def closedByPeer(sock):
    """
    Whether C{sock}'s peer closed or reset it (an abort is a reset).
    """
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def twistd():
    return os.path.join(os.path.dirname(sys.executable), "twistd")


class Output(ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.ended = Deferred()

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


class TwistdTests(unittest.TestCase):
    """
    C{twistd ent-relay} as a real process.
    """

    def runRelay(self, *argv):
        return subprocess.run(
            [twistd(), "-n", "--pidfile=", "ent-relay", *argv], capture_output=True, text=True, timeout=60
        )

    async def test_mockRelayEchoes(self):
        echo = await TCP4ServerEndpoint(reactor, 0, interface=LOCAL).listen(EchoFactory())
        self.addCleanup(echo.stopListening)
        port = freePort()
        process = Output()
        reactor.spawnProcess(
            process,
            twistd(),
            [
                twistd(),
                "-n",
                "--pidfile=",
                "ent-relay",
                "--mock-vsock",
                "--tcp-to-vsock",
                "--tcp-address",
                f"{LOCAL}:{port}",
                "--vsock-address",
                f"{LOCAL}:{echo.getHost().port}",
            ],
            env=os.environ,
        )
        try:
            await waitFor(lambda: b"relaying " in process.output, timeout=30)
            client = await connectProtocol(TCP4ClientEndpoint(reactor, LOCAL, port), EchoClient(b"through twistd"))
            self.assertEqual(await client.done, b"through twistd")
        finally:
            process.transport.signalProcess("TERM")
            await process.ended
        self.assertIn(
            f"relaying {LOCAL}:{port} ({LOCAL}:{port}) to {LOCAL}:{echo.getHost().port}", process.output.decode()
        )

    def test_badOption(self):
        result = self.runRelay("--tcp-to-vsock", "--tcp-address", "127.0.0.1:70000", "--vsock-address", "16:8888")
        self.assertEqual(
            (result.returncode, result.stdout, result.stderr),
            (
                2,
                "",
                (
                    "twistd ent-relay: --tcp-address '127.0.0.1:70000': port 70000 is out of range 1-65535 "
                    "(see twistd ent-relay --help)\n"
                ),
            ),
        )

    def test_portInUse(self):
        with socket.socket() as blocker:
            blocker.bind((LOCAL, 0))
            blocker.listen()
            port = blocker.getsockname()[1]
            result = self.runRelay("--mock-vsock", "--vsock-address", f"{LOCAL}:{port}", "--tcp-address", f"{LOCAL}:1")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(f"ent-relay: cannot start: Couldn't listen on {LOCAL}:{port}", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    async def test_metricsOfARealRelay(self):
        """
        C{--metrics} on a real relay: one connection held open, a second
        refused at the limit of one; the scrape and C{python -m ent status}
        say so.
        """
        echo = await TCP4ServerEndpoint(reactor, 0, interface=LOCAL).listen(EchoFactory())
        self.addCleanup(echo.stopListening)
        port, metricsPort = freePort(), freePort()
        process = Output()
        reactor.spawnProcess(
            process,
            twistd(),
            [
                twistd(),
                "-n",
                "--pidfile=",
                "ent-relay",
                "--mock-vsock",
                "--tcp-to-vsock",
                "--tcp-address",
                f"{LOCAL}:{port}",
                "--vsock-address",
                f"{LOCAL}:{echo.getHost().port}",
                "--max-concurrent-connections",
                "1",
                "--metrics",
                f"tcp:{metricsPort}:interface={LOCAL}",
            ],
            env=os.environ,
        )
        held = None
        try:
            await waitFor(lambda: b"relaying " in process.output, timeout=30)
            held = socket.create_connection((LOCAL, port))
            held.sendall(b"kept open")
            held.settimeout(10)
            self.assertEqual(await deferToThread(held.recv, 100), b"kept open")
            refused = socket.create_connection((LOCAL, port))
            refused.settimeout(10)
            self.assertTrue(await deferToThread(closedByPeer, refused), "refused at once")
            refused.close()
            url = f"{LOCAL}:{metricsPort}"
            scrape = Scrape(await deferToThread(fetch, metricsUrl(url), 5))
            self.assertEqual(scrape.value("ent_relay_connections_open"), 1)
            self.assertEqual(scrape.value("ent_relay_connections_accepted_total"), 1)
            self.assertEqual(scrape.value("ent_relay_connections_refused_total"), 1)
            self.assertEqual(scrape.value("ent_dropped_total", leg="incoming", reason="connection_limit"), 1)
            self.assertEqual(scrape.value("ent_relay_bytes_total", direction="to_target"), len(b"kept open"))
            result = await deferToThread(
                subprocess.run,
                [sys.executable, "-m", "ent", "status", "--metrics", url],
                capture_output=True,
                text=True,
                timeout=30,
            )
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            self.assertIn("1 open (limit 1), 1 accepted, 1 refused", result.stdout)
        finally:
            if held is not None:
                held.close()
            process.transport.signalProcess("TERM")
            await process.ended

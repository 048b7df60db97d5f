"""
Accepting rats-tls (and TLS) connections that strangers can make: the
handshakes run in a bounded pool off the reactor's thread, within one budget
for the whole handshake, and every way one can fail is cleaned up, counted
and logged at most once a minute per source.  Real loopback sockets, the
library under test (the mock, or $ENT_TEST_RATS_TLS_LIB).
"""

import errno
import socket
import threading
import time

from twisted.internet import defer, error, protocol, reactor, task, threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from ent import ratstls
from ent.errors import HandshakeRefused
from ent.legs import certs
from ent.legs.ratsendpoints import RatsTlsClientEndpoint, RatsTlsServerEndpoint, RatsTlsSettings
from ent.legs.ratspool import HandshakePool
from ent.legs.tls import TlsFiles, serverTls
from ent.observability.stats import ServiceStats
from ent.protocols.framed import FramedLeg
from tests.checks import tempDir
from tests.ratstlsmock import library_under_test
from tests.test_ratstransport import Collector, CollectorFactory, closeAll, timeout

# A TLS record of 100 bytes: the first of a ClientHello said to be 1000.
PARTIAL_CLIENT_HELLO = b"\x16\x03\x01\x00\x64" + b"\x01\x00\x03\xe8" + bytes(96)


class RecordingLibrary:
    """
    The library under test, noting the thread and the session of each
    C{rats_tls_init}.
    """

    def __init__(self, library):
        self.library = library
        self.threads = []
        self.sessions = []

    def session(self, config, verify=None):
        self.threads.append(threading.get_ident())
        session = self.library.session(config, verify)
        self.sessions.append(session)
        return session


def recordingSettings():
    library = RecordingLibrary(library_under_test())
    return library, RatsTlsSettings(library, ratstls.RatsTlsConfig(log_level=ratstls.LOG_NONE))


def poolThreads(pool):
    return [t for t in threading.enumerate() if t.name.startswith(pool.name)]


@defer.inlineCallbacks
def waitUntil(test, what, seconds=20):
    deadline = time.monotonic() + seconds
    while not test():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds}s: {what}")
        yield task.deferLater(reactor, 0.02, lambda: None)


def closedByPeer(sock, seconds=10):
    """
    Whether the other end closed C{sock} (EOF or reset) within C{seconds}.
    """
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


class RaisingPool:
    """
    A pool that cannot run anything.
    """

    stopped = False

    def submit(self, function, *args, **kwargs):
        raise RuntimeError("can't start new thread")

    def stop(self):
        pass


class NoThread(threading.Thread):
    def start(self):
        raise RuntimeError("can't start new thread")


class RatsAcceptTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.stats = ServiceStats("entg", reactor)
        self.lines = []

        def observe(event):
            if "connection refused" in event.get("log_format", ""):
                self.lines.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def failures(self, kind="rats-tls"):
        return self.stats.handshakeFailures[("agent", kind)]

    @defer.inlineCallbacks
    def listen(self, settings, pool=None, budget=30.0):
        endpoint = RatsTlsServerEndpoint(
            reactor,
            0,
            settings,
            interface="127.0.0.1",
            leg="agent",
            onHandshakeFailed=lambda kind: self.stats.handshakeFailed("agent", kind),
            handshakeTimeout=budget,
            pool=pool,
        )
        self.factory = CollectorFactory()
        port = yield endpoint.listen(self.factory)
        self.addCleanup(port.stopListening)
        return port

    def rawClient(self, port, hello=True):
        """
        A client that starts a handshake and never finishes it: its first
        TLS record (what the port waits for before a worker takes it) holds
        the start of a ClientHello that says it is 1000 bytes long.
        """
        sock = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(sock.close)
        if hello:
            sock.sendall(PARTIAL_CLIENT_HELLO)
        return sock

    def client(self, port, settings, **kwargs):
        return RatsTlsClientEndpoint(reactor, "127.0.0.1", port.getHost().port, settings, **kwargs)

    @defer.inlineCallbacks
    def test_initAndHandshakeOutsideTheReactorThread(self):
        """
        Both sides' C{rats_tls_init} runs in a pool worker, not in the
        reactor's thread (key generation and evidence take time).
        """
        library, settings = recordingSettings()
        port = yield self.listen(settings)
        client = yield timeout(self.client(port, settings).connect(protocol.Factory.forProtocol(Collector)))
        server = yield timeout(self.factory.first)
        yield timeout(server.made)
        self.addCleanup(closeAll, client, server)
        self.assertEqual(len(library.threads), 2)
        self.assertNotIn(threading.get_ident(), library.threads)
        client.transport.write(b"ping")
        yield timeout(server.waitFor(4))
        self.assertEqual(bytes(server.received), b"ping")

    @defer.inlineCallbacks
    def test_poolBound(self):
        """
        With 2 workers and 1 place in the queue, 4 handshakes that never
        finish get 2 threads, 1 wait, and the 4th socket is closed at once
        and counted as busy; no thread beyond the 2 is ever started, and the
        one that waited is served when a worker is free.
        """
        _, settings = recordingSettings()
        pool = HandshakePool(reactor, name="rats-tls test pool", size=2, queue=1)
        self.addCleanup(pool.stop)
        port = yield self.listen(settings, pool=pool)
        # Threads of earlier tests' pools end once their last job is out.
        yield waitUntil(lambda: not [t for t in threading.enumerate() if t.name.startswith("rats-tls")], "quiet")
        before = threading.active_count()
        socks = [self.rawClient(port) for _ in range(4)]
        yield waitUntil(lambda: self.failures("rats-tls-busy") == 1, "the 4th connection refused")
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(pool.workers, 2)
        self.assertEqual(len(poolThreads(pool)), 2)
        self.assertEqual(threading.active_count(), before + 2)
        self.assertTrue(closedByPeer(socks[3], 5), "the refused socket is closed at once")
        self.assertEqual(self.failures(), 0)

        socks[0].close()
        yield waitUntil(lambda: self.failures() == 1, "the 1st handshake failed")
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(pool.workers, 2, "the waiting handshake took the free worker")
        self.assertLessEqual(threading.active_count(), before + 2)
        socks[1].close()
        socks[2].close()
        yield waitUntil(lambda: self.failures() == 3, "every handshake ended")
        yield waitUntil(lambda: pool.workers == 0 and not poolThreads(pool), "the workers ended")
        self.assertEqual(self.failures("rats-tls-busy"), 1)
        self.assertEqual(self.factory.protocols, [])

    @defer.inlineCallbacks
    def test_slowDripCutAtBudget(self):
        """
        A client sending one byte every 2 s is cut when the 3 s budget is
        spent (the kernel's per-call timeout never fires), and the only
        worker then serves the next handshake.
        """
        _, settings = recordingSettings()
        pool = HandshakePool(reactor, name="rats-tls drip pool", size=1, queue=0)
        self.addCleanup(pool.stop)
        port = yield self.listen(settings, pool=pool, budget=3.0)
        sock = self.rawClient(port)
        drip = iter(b"\x16\x03\x01\x02\x00" + b"\x01" * 100)

        def send():
            try:
                sock.send(bytes([next(drip)]))
            except OSError:
                pass

        loop = task.LoopingCall(send)
        loop.start(2.0)
        self.addCleanup(lambda: loop.running and loop.stop())
        started = time.monotonic()
        yield waitUntil(lambda: self.failures() == 1, "the dripping handshake failed", seconds=15)
        elapsed = time.monotonic() - started
        self.assertGreater(elapsed, 2.5)
        self.assertLess(elapsed, 5.5)
        self.assertTrue(closedByPeer(sock, 2))
        self.assertEqual(len(self.lines), 1)
        self.assertIn("within 3s", self.lines[0]["detail"])

        client = yield timeout(self.client(port, settings).connect(protocol.Factory.forProtocol(Collector)))
        server = yield timeout(self.factory.first)
        yield timeout(server.made)
        self.addCleanup(closeAll, client, server)
        self.assertEqual(self.failures("rats-tls-busy"), 0)

    @defer.inlineCallbacks
    def test_stallersBeforeTheirHelloTakeNoWorker(self):
        """
        200 connections that send part of a first TLS record and stall wait
        in the reactor, not in the pool: with a single worker, a real
        handshake is served at once; the stallers are cut at the budget,
        and a peer that closes mid-record is let go at once.
        """
        from ent.legs import ratsendpoints

        # All from one address here: let them all wait.
        self.patch(ratsendpoints, "MAX_WAITING_HELLOS_PER_SOURCE", 1000)
        _, settings = recordingSettings()
        pool = HandshakePool(reactor, name="rats-tls stall pool", size=1, queue=0)
        self.addCleanup(pool.stop)
        port = yield self.listen(settings, pool=pool, budget=3.0)

        def connectAll():
            # In a thread: the reactor accepts meanwhile.
            socks = [self.rawClient(port, hello=False) for _ in range(200)]
            for sock in socks:
                sock.sendall(PARTIAL_CLIENT_HELLO[:3])
            return socks

        stallers = yield threads.deferToThread(connectAll)
        closing = self.rawClient(port, hello=False)
        closing.sendall(PARTIAL_CLIENT_HELLO[:40])
        closing.close()
        yield task.deferLater(reactor, 0.5, lambda: None)
        started = time.monotonic()
        client = yield timeout(self.client(port, settings).connect(protocol.Factory.forProtocol(Collector)))
        server = yield timeout(self.factory.first)
        yield timeout(server.made)
        self.addCleanup(closeAll, client, server)
        self.assertLess(time.monotonic() - started, 1.0)
        yield waitUntil(lambda: self.failures() >= 1, "the one that closed mid-record is let go")
        self.assertEqual(self.failures(), 1, [line["detail"] for line in self.lines])
        self.assertLessEqual(pool.workers, 1, "no staller holds a worker")
        yield waitUntil(lambda: self.failures() == 201, "the stallers cut at the budget", seconds=10)
        self.assertTrue(closedByPeer(stallers[0], 2))
        self.assertEqual(self.failures("rats-tls-busy"), 0)

    @defer.inlineCallbacks
    def test_waitingHellosAreBoundedPerSource(self):
        """
        Beyond the per-source bound of connections waiting for their first
        record, the oldest of that source is closed (counted as busy).
        """
        from ent.legs import ratsendpoints

        self.patch(ratsendpoints, "MAX_WAITING_HELLOS_PER_SOURCE", 5)
        _, settings = recordingSettings()
        port = yield self.listen(settings)
        socks = yield threads.deferToThread(lambda: [self.rawClient(port, hello=False) for _ in range(8)])
        yield waitUntil(lambda: self.failures("rats-tls-busy") == 3, "the 3 oldest closed")
        self.assertTrue(closedByPeer(socks[0], 2))
        self.assertFalse(closedByPeer(socks[7], 0.2))

    @defer.inlineCallbacks
    def test_resetRightAfterHandshake(self):
        """
        ENOTCONN from getpeername once the handshake is over (the peer
        reset at once): both sides free the session and close the socket;
        the server counts each and logs one line for the source.
        """

        def getpeername(self):
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")

        library, settings = recordingSettings()
        port = yield self.listen(settings)
        self.patch(socket.socket, "getpeername", getpeername)
        for _ in range(2):
            e = yield self.assertFailure(
                timeout(self.client(port, settings).connect(protocol.Factory.forProtocol(Collector))),
                error.ConnectError,
            )
            self.assertIn("right after the handshake", str(e))
        yield waitUntil(lambda: self.failures() == 2, "both server sides counted")
        self.assertEqual(len(library.sessions), 4)
        self.assertTrue(all(s.closed for s in library.sessions), "every session is cleaned up")
        self.assertEqual(self.factory.protocols, [])
        self.assertEqual(len(self.lines), 1, "one line per source and reason per minute")

    @defer.inlineCallbacks
    def assertRefusedAtOnce(self, pool):
        _, settings = recordingSettings()
        port = yield self.listen(settings, pool=pool)
        for n in (1, 2):
            sock = self.rawClient(port)
            yield waitUntil(lambda: self.failures("rats-tls-busy") == n, f"connection {n} refused")
            self.assertTrue(closedByPeer(sock, 5), "the socket is closed at once")
        self.assertEqual(len(self.lines), 1)
        failures = []
        e = yield self.assertFailure(
            timeout(
                self.client(port, settings, pool=pool, onHandshakeFailed=failures.append).connect(
                    protocol.Factory.forProtocol(Collector)
                )
            ),
            error.ConnectError,
        )
        self.assertIn("thread", str(e))
        self.assertEqual(failures, ["rats-tls-busy"])

    def test_poolThatRaisesOnSubmit(self):
        return self.assertRefusedAtOnce(RaisingPool())

    def test_threadThatCannotStart(self):
        pool = HandshakePool(reactor, name="rats-tls no thread", threadFactory=NoThread)
        self.addCleanup(pool.stop)
        return self.assertRefusedAtOnce(pool)


class HandshakePoolTests(unittest.TestCase):
    def test_stopFailsWaitingJobs(self):
        pool = HandshakePool(reactor, name="rats-tls stop pool", size=1, queue=1)
        running, release = threading.Event(), threading.Event()

        def block():
            running.set()
            release.wait(10)

        first = pool.submit(block)
        self.assertTrue(running.wait(10))
        second = pool.submit(lambda: 1)
        third = pool.submit(lambda: 2)
        self.failureResultOf(third, HandshakeRefused)
        pool.stop()
        self.failureResultOf(second, HandshakeRefused)
        self.failureResultOf(pool.submit(lambda: 3), HandshakeRefused)
        release.set()
        return first


class TlsHandshakeBudgetTests(unittest.TestCase):
    """
    A TLS leg whose peer never finishes the handshake is aborted when the
    budget is spent, counted and logged.
    """

    def setUp(self):
        directory = tempDir(self, "ent-tls-budget-")
        certs.makeCertificate(directory, "server")
        self.files = TlsFiles(*(f"{directory}/{n}" for n in ("server.pem", "server.key", "ca.pem")))

    @defer.inlineCallbacks
    def test_abortedAtBudget(self):
        clock = task.Clock()
        stats = ServiceStats("entg", reactor)
        legs = []

        class Leg(FramedLeg):
            leg = "agent"
            handshakeTimeout = 3.0

            def __init__(self):
                FramedLeg.__init__(self, stats, clock)
                legs.append(self)

            def legUp(self):
                raise AssertionError("a leg without a handshake is never up")

        endpoint = serverTls(TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), self.files)
        port = yield endpoint.listen(protocol.Factory.forProtocol(Leg))
        self.addCleanup(port.stopListening)
        sock = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(sock.close)
        yield waitUntil(lambda: legs, "the leg made")
        clock.advance(2.9)
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(dict(stats.handshakeFailures), {})
        clock.advance(0.2)
        yield waitUntil(lambda: stats.handshakeFailures[("agent", "tls")] == 1, "the TLS leg aborted")
        self.assertTrue(closedByPeer(sock, 5))
        self.assertFalse(clock.getDelayedCalls(), "no timer left behind")

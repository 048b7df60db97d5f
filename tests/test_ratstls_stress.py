"""
Stress for the rats-tls transport: 200 MB each way at once over one
session, ten times, sha256 equal, and no call ever entered a session while
another thread was inside it (OpenSSL sessions are not thread-safe; the
binding refuses and counts such calls).

Runs against the library under test (the mock, or a real build named by
$ENT_TEST_RATS_TLS_LIB).  $ENT_TEST_RATS_TLS_STRESS_ROUNDS and
$ENT_TEST_RATS_TLS_STRESS_MB shrink it for a quick run.
"""

import hashlib
import os
import random
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.trial import unittest
from zope.interface import implementer

from ent import ratstls
from ent.legs.ratsendpoints import RatsTlsClientEndpoint, RatsTlsServerEndpoint, RatsTlsSettings
from ent.ratstls import RatsTlsSession
from tests.ratstlsmock import REAL_LIBRARY, library_under_test

ROUNDS = int(os.environ.get("ENT_TEST_RATS_TLS_STRESS_ROUNDS", "10"))
MEGABYTES = int(os.environ.get("ENT_TEST_RATS_TLS_STRESS_MB", "200"))
CHUNK = 65536


@implementer(IPushProducer)
class Stream(protocol.Protocol):
    """
    Sends C{size} pseudo-random bytes (seeded, so no two chunks repeat) as
    a streaming producer, and hashes what arrives from the peer; C{done}
    fires once both directions are complete.
    """

    def __init__(self, size, seed, expect):
        self.size = size
        self.expect = expect
        self.random = random.Random(seed)
        self.sent = 0
        self.sentHash = hashlib.sha256()
        self.received = 0
        self.receivedHash = hashlib.sha256()
        self.paused = False
        self.registered = False
        self.done = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.transport.registerProducer(self, True)
        self.registered = True
        self.resumeProducing()

    def resumeProducing(self):
        self.paused = False
        while not self.paused and self.sent < self.size:
            chunk = self.random.randbytes(min(CHUNK, self.size - self.sent))
            self.sentHash.update(chunk)
            self.sent += len(chunk)
            self.transport.write(chunk)
        if self.sent == self.size and self.registered:
            self.registered = False
            self.transport.unregisterProducer()
            self._check()

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        self.paused = True

    def dataReceived(self, data):
        self.receivedHash.update(data)
        self.received += len(data)
        self._check()

    def _check(self):
        if self.sent == self.size and self.received >= self.expect and not self.done.called:
            self.done.callback(self)

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.errback(reason)
        self.lost.callback(None)


class StressTests(unittest.TestCase):
    timeout = 900
    log = Logger()

    def settings(self):
        config = ratstls.RatsTlsConfig(log_level=ratstls.LOG_NONE)
        return RatsTlsSettings(library_under_test(), config)

    @defer.inlineCallbacks
    def test_200MBEachWayTenTimes(self):
        """
        Full duplex at full speed, where two threads inside one session
        would sooner or later corrupt it: every round's bytes arrive intact,
        and no call into the library was ever made while another thread was
        inside the same session.
        """
        size = MEGABYTES * 1_000_000
        refusedBefore = RatsTlsSession.concurrent_entries
        rates = []
        for round in range(ROUNDS):
            servers = []

            def build(addr, round=round):
                stream = Stream(size, f"down {round}", size)
                servers.append(stream)
                return stream

            factory = protocol.Factory()
            factory.buildProtocol = build
            port = yield RatsTlsServerEndpoint(reactor, 0, self.settings(), interface="127.0.0.1").listen(factory)
            try:
                client = Stream(size, f"up {round}", size)
                endpoint = RatsTlsClientEndpoint(reactor, "127.0.0.1", port.getHost().port, self.settings())
                started = time.monotonic()
                yield endpoint.connect(protocol.Factory.forProtocol(lambda: client))
                while not servers:
                    yield task.deferLater(reactor, 0.01, lambda: None)
                server = servers[0]
                yield defer.gatherResults([client.done, server.done])
                elapsed = time.monotonic() - started
            finally:
                yield port.stopListening()
            self.assertEqual((client.sent, server.received), (size, size))
            self.assertEqual((server.sent, client.received), (size, size))
            self.assertEqual(server.receivedHash.hexdigest(), client.sentHash.hexdigest())
            self.assertEqual(client.receivedHash.hexdigest(), server.sentHash.hexdigest())
            client.transport.loseConnection()
            yield defer.gatherResults([client.lost, server.lost])
            rates.append(2 * size / 1e6 / elapsed)
            self.log.info(
                "rats-tls stress round {round}: {mb} MB each way in {seconds:.2f} s,"
                " {rate:.0f} MB/s both ways together ({library})",
                round=round + 1,
                mb=MEGABYTES,
                seconds=elapsed,
                rate=rates[-1],
                library=REAL_LIBRARY or "mock",
            )
        self.assertEqual(
            RatsTlsSession.concurrent_entries - refusedBefore,
            0,
            "a call entered a session while another thread was inside it",
        )
        self.log.info(
            "rats-tls stress: {rounds} rounds, mean {rate:.0f} MB/s both ways together ({library})",
            rounds=ROUNDS,
            rate=sum(rates) / len(rates),
            library=REAL_LIBRARY or "mock",
        )

"""
The gateway's bounds on fake transports: legs in total and per source,
room made by closing unproven legs, unproven legs closed under pressure,
refusals counted and logged in aggregate, fairness between agents behind
one peer, and a disconnect that costs the same whatever the number of legs.
"""

import time

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from ent.observability.stats import ServiceStats
from ent.protocols.framing import frame
from ent.protocols.limits import LegLimits
from ent.protocols.relay import RelayLegFactory
from ent.protocols.router import FORGET_BATCH, MAX_QUEUED, STALL_TIMEOUT, Router
from ent.services.startup import FD_RESERVE, legsWithinFileLimit, raiseFileLimit
from tests.test_router import packet


class LimitsTestCase(unittest.TestCase):
    maxLegs = 6
    perSource = 3

    def setUp(self):
        self.clock = Clock()
        self.stats = ServiceStats("entg", self.clock)
        self.router = Router(self.stats, self.clock)
        self.limits = LegLimits(
            self.clock, self.stats.legRefused, maxLegs=self.maxLegs, perSource=self.perSource, budget=10.0
        )
        self.agents = RelayLegFactory(self.router, "agent", limits=self.limits)
        self.peers = RelayLegFactory(self.router, "peer", limits=self.limits)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def accept(self, host, factory=None):
        """
        What the port does: build the protocol (None: close), connect it.
        """
        address = IPv4Address("TCP", host, 40000)
        leg = (factory or self.agents).buildProtocol(address)
        if leg is not None:
            leg.makeConnection(StringTransport(peerAddress=address))
        return leg

    def lose(self, leg):
        leg.connectionLost(Failure(ConnectionDone()))

    def prove(self, leg, src="192.168.0.1"):
        leg.dataReceived(frame(packet(src, "192.168.0.254")))

    def lines(self, text):
        return [e for e in self.logged if text in (e.get("log_format") or "")]


class PerSourceTests(LimitsTestCase):
    def test_unprovenLegMakesRoomForANewOne(self):
        """
        A source at its limit with idle connections: a new connection is
        taken, the oldest idle one closed.
        """
        legs = [self.accept("10.1.0.9") for _ in range(3)]
        new = self.accept("10.1.0.9")
        self.assertIsNotNone(new)
        self.assertTrue(legs[0].transport.disconnecting)
        self.assertFalse(legs[1].transport.disconnecting)
        self.assertEqual(self.stats.refusals[("agent", "unproven_evicted")], 1)
        self.assertEqual(self.limits.bySource["10.1.0.9"], 3)

    def test_provenLegsKeepTheirPlaces(self):
        legs = [self.accept("10.1.0.1") for _ in range(3)]
        for i, leg in enumerate(legs):
            self.prove(leg, f"192.168.0.{i + 1}")
        self.assertIsNone(self.accept("10.1.0.1"))
        self.assertEqual(self.stats.refusals[("agent", "max_legs_per_source")], 1)
        self.assertFalse(any(leg.transport.disconnecting for leg in legs))
        # Another source is not affected.
        self.assertIsNotNone(self.accept("10.1.0.2"))

    def test_closedLegFreesItsPlace(self):
        legs = [self.accept("10.1.0.1") for _ in range(3)]
        for i, leg in enumerate(legs):
            self.prove(leg, f"192.168.0.{i + 1}")
        self.lose(legs[0])
        self.assertIsNotNone(self.accept("10.1.0.1"))

    def test_refusalsAreLoggedOncePerMinutePerSource(self):
        for i in range(3):
            self.prove(self.accept("10.1.0.1"), f"192.168.0.{i + 1}")
        for _ in range(50):
            self.accept("10.1.0.1")
        self.assertEqual(self.stats.refusals[("agent", "max_legs_per_source")], 50)
        self.assertEqual(len(self.lines("refused: {why}")), 1)


class TotalTests(LimitsTestCase):
    def test_floodOfIdleConnectionsCannotLockOutAnAgent(self):
        """
        Every place taken by idle connections from many sources: a real
        agent still gets in, and once it sent a frame it keeps its leg
        however many more connections come.
        """
        for i in range(6):
            self.accept(f"10.1.1.{i}")
        agent = self.accept("10.1.0.1")
        self.assertIsNotNone(agent)
        self.prove(agent)
        for i in range(100):
            self.accept(f"10.1.2.{i}")
        self.assertFalse(agent.transport.disconnecting)
        self.assertTrue(self.limits.isProven(agent))
        self.assertEqual(self.limits.total, 6)

    def test_peersCountToo(self):
        for i in range(6):
            self.prove(self.accept(f"10.1.1.{i}"), f"192.168.0.{i + 1}")
        self.assertIsNone(self.accept("10.2.0.2", self.peers))
        self.assertEqual(self.stats.refusals[("peer", "max_legs")], 1)

    def test_oneLineForAFlood(self):
        for i in range(200):
            self.accept(f"10.1.1.{i % 5}")
        self.assertLessEqual(len(self.lines("closed before it sent a frame")), 5)
        self.assertEqual(self.lines("connected from"), [], "unproven legs are not announced")

    def test_connectedLineOnceProven(self):
        leg = self.accept("10.1.0.1")
        self.assertEqual(self.lines("connected from"), [])
        self.prove(leg)
        self.assertEqual(len(self.lines("connected from")), 1)


class PressureTests(LimitsTestCase):
    def test_unprovenLegsExpireUnderPressure(self):
        """
        Five idle legs against a limit of six: the oldest are closed once
        they are past the budget, until no more than half the limit is used.
        """
        legs = [self.accept(f"10.1.1.{i}") for i in range(5)]
        self.clock.advance(9.9)
        self.assertFalse(any(leg.transport.disconnecting for leg in legs))
        self.clock.advance(0.2)
        self.assertEqual([leg.transport.disconnecting for leg in legs], [True, True, False, False, False])
        self.assertEqual(self.stats.refusals[("agent", "unproven_timeout")], 2)

    def test_idleAgentIsLeftAloneWithoutPressure(self):
        """
        An idle agent of ENG's that keeps quiet keeps its leg while there
        is room.
        """
        leg = self.accept("10.1.0.1")
        self.clock.advance(3600)
        self.assertFalse(leg.transport.disconnecting)

    def test_provenLegsNeverExpire(self):
        legs = [self.accept(f"10.1.1.{i}") for i in range(5)]
        for i, leg in enumerate(legs):
            self.prove(leg, f"192.168.0.{i + 1}")
        self.clock.advance(3600)
        self.assertFalse(any(leg.transport.disconnecting for leg in legs))


class FileLimitTests(unittest.TestCase):
    def test_raisedToTheHardLimit(self):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
        raised = raiseFileLimit()
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], raised)
        if hard != resource.RLIM_INFINITY:
            self.assertEqual(raised, hard)

    def test_legsLeaveTheReserve(self):
        self.assertEqual(legsWithinFileLimit(4096, 1024), 1024 - FD_RESERVE)
        self.assertEqual(legsWithinFileLimit(4096, 1 << 20), 4096)


class FairnessTests(LimitsTestCase):
    maxLegs = 100
    perSource = 100

    def setUp(self):
        LimitsTestCase.setUp(self)
        self.a = self.accept("10.1.0.1")
        self.b = self.accept("10.1.0.2")
        self.peer = self.accept("10.2.0.2", self.peers)
        self.prove(self.a, "192.168.0.1")
        self.prove(self.b, "192.168.0.2")
        self.prove(self.peer, "192.168.0.254")
        self.clock.advance(0)

    def test_stuckAgentDoesNotStallThePeer(self):
        """
        Agent A takes nothing (its transport is full): the peer is not
        paused, B gets its frames, A's queue is bounded and what is beyond
        it is dropped and counted.
        """
        # The peer has just written to A when A's buffer fills.
        self.peer.dataReceived(frame(packet("192.168.0.254", "192.168.0.1")))
        self.a.transport.producer.pauseProducing()
        self.assertEqual(self.peer.transport.producerState, "producing")
        big = packet("192.168.0.254", "192.168.0.1", b"x" * 60000)
        for _ in range(MAX_QUEUED // len(frame(big)) + 5):
            self.peer.dataReceived(frame(big))
        self.assertEqual(self.peer.transport.producerState, "producing")
        self.assertGreater(self.stats.drops.total[("agent", "target_full")], 0)
        self.assertLessEqual(self.router.queuedBytes, MAX_QUEUED)
        self.b.transport.clear()
        self.peer.dataReceived(frame(packet("192.168.0.254", "192.168.0.2")))
        self.assertEqual(self.b.transport.value(), frame(packet("192.168.0.254", "192.168.0.2")))

    def test_stuckAgentIsClosedAfterTheStallTimeout(self):
        self.a.transport.producer.pauseProducing()
        self.clock.advance(STALL_TIMEOUT - 0.1)
        self.assertFalse(self.a.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.a.transport.disconnecting)
        self.assertFalse(self.router.attached(self.a))
        self.assertEqual(self.stats.drops.total[("agent", "write_stalled")], 1)

    def test_drainedAgentIsNotClosed(self):
        self.a.transport.producer.pauseProducing()
        self.clock.advance(STALL_TIMEOUT / 2)
        self.a.transport.producer.resumeProducing()
        self.clock.advance(STALL_TIMEOUT)
        self.assertFalse(self.a.transport.disconnecting)
        self.assertEqual(self.router.queuedBytes, 0)

    def test_peersAreStillPacedByBackpressure(self):
        """
        Frames to a full peer pause the agents that send them: every agent
        waits for the same link.
        """
        self.peer.transport.producer.pauseProducing()
        self.prove(self.a, "192.168.0.1")
        self.assertEqual(self.a.transport.producerState, "paused")


class DisconnectCostTests(LimitsTestCase):
    maxLegs = 100000
    perSource = 100000

    def setUp(self):
        LimitsTestCase.setUp(self)
        # The router's own cost: trial's Clock cancels a timer in O(n),
        # the reactor in O(1), so no limits (and their timers) here.
        self.agents = RelayLegFactory(self.router, "agent")
        self.peers = RelayLegFactory(self.router, "peer")

    def test_disconnectCostDoesNotGrowWithLegs(self):
        """
        Closing one leg among many does not visit every other leg: 200
        disconnects among 20,000 legs take about as long as among 200.
        """

        def timeDisconnects(count):
            legs = [self.accept(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}") for i in range(count)]
            started = time.perf_counter()
            for leg in legs[-200:]:
                self.lose(leg)
            elapsed = time.perf_counter() - started
            for leg in legs[:-200]:
                self.lose(leg)
            return elapsed

        small = min(timeDisconnects(200) for _ in range(3))
        large = min(timeDisconnects(20000) for _ in range(3))
        self.assertLess(large, small * 5 + 0.01, f"200 disconnects: {small:.4f}s among 200, {large:.4f}s among 20000")

    def test_departedLegsAreSweptFromGates(self):
        peer = self.accept("10.2.0.2", self.peers)
        legs = [self.accept(f"10.1.{i >> 8}.{i & 255}") for i in range(FORGET_BATCH + 10)]
        for i, leg in enumerate(legs):
            leg.dataReceived(frame(packet(f"192.168.{i >> 8}.{i & 255}", "10.9.0.1")))
        self.assertEqual(len(peer.gate.senders), len(legs))
        for leg in legs:
            self.lose(leg)
        self.assertLess(len(peer.gate.senders), FORGET_BATCH)
        # A gate that still names a departed leg pauses nothing of it.
        peer.transport.producer.pauseProducing()
        peer.transport.producer.resumeProducing()

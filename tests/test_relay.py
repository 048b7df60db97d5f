"""
The gateway's relay hub, on fake transports: which side gets what, and
how the sides pause each other.
"""

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from ent.observability.stats import ServiceStats
from ent.protocols.framing import frame, frameSequence
from ent.protocols.relay import RelayLeg
from ent.protocols.router import ALONE, Router


def connect(hub, side):
    leg = RelayLeg(hub, side)
    leg.makeConnection(StringTransport())
    return leg


def lose(leg):
    leg.connectionLost(Failure(ConnectionDone()))


class RelayHubTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.stats = ServiceStats("test", self.clock)
        self.drops = self.stats.drops
        self.hub = Router(self.stats, self.clock)

    def test_aloneSideIsPaused(self):
        agent = connect(self.hub, "agent")
        self.assertEqual(agent.transport.producerState, "paused")

    def test_joinedSidesFeedEachOther(self):
        """
        Each side, once it has written to the other, is paused while the
        other's buffer is full, and resumed when it drains.
        """
        agent = connect(self.hub, "agent")
        peer = connect(self.hub, "peer")
        self.assertEqual(agent.transport.producerState, "producing")
        self.assertEqual(peer.transport.producerState, "producing")
        agent.dataReceived(frame(b"\x45" * 20))
        peer.dataReceived(frame(b"\x45" * 20))
        for source, target in ((agent, peer), (peer, agent)):
            target.transport.producer.pauseProducing()
            self.assertEqual(source.transport.producerState, "paused")
            target.transport.producer.resumeProducing()
            self.assertEqual(source.transport.producerState, "producing")

    def test_framesRelayedBothWays(self):
        agent = connect(self.hub, "agent")
        peer = connect(self.hub, "peer")
        up = b"".join(frameSequence([b"\x45" * 30, b"\x60" * 50]))
        agent.dataReceived(up)
        self.assertEqual(peer.transport.value(), up)
        down = frame(b"\x45" * 99)
        peer.dataReceived(down[:10])
        self.assertEqual(agent.transport.value(), b"")
        peer.dataReceived(down[10:])
        self.assertEqual(agent.transport.value(), down)

    def test_sideLostPausesTheOtherAndFreesIt(self):
        agent = connect(self.hub, "agent")
        peer = connect(self.hub, "peer")
        lose(peer)
        self.assertEqual(agent.transport.producerState, "paused")
        self.assertEqual(agent.holds, {ALONE})  # nothing of the lost peer holds it
        newPeer = connect(self.hub, "peer")
        self.assertEqual(agent.transport.producerState, "producing")
        agent.dataReceived(frame(b"\x45" * 20))
        self.assertEqual(newPeer.transport.value(), frame(b"\x45" * 20))
        self.assertEqual(peer.transport.value(), b"")

    def test_partialFrameOfLostSideNeverReachesTheOther(self):
        agent = connect(self.hub, "agent")
        peer = connect(self.hub, "peer")
        agent.dataReceived(frame(b"\x45" * 40)[:20])
        lose(agent)
        newAgent = connect(self.hub, "agent")
        newAgent.dataReceived(frame(b"\x45" * 8))
        self.assertEqual(peer.transport.value(), frame(b"\x45" * 8))
        self.assertEqual(self.drops.total[("agent", "partial_frame_cut_off")], 1)

    def test_secondAgentWithTheSameAddressIsRefused(self):
        """
        A second agent leg no longer replaces the first: sending from the
        address the first owns closes it, and the first carries on.
        """
        first = connect(self.hub, "agent")
        peer = connect(self.hub, "peer")
        packet = b"\x45" * 20
        first.dataReceived(frame(packet))
        second = connect(self.hub, "agent")
        self.assertFalse(first.transport.disconnecting)
        second.dataReceived(frame(packet))
        self.assertTrue(second.transport.disconnecting)
        self.assertFalse(first.transport.disconnecting)
        lose(second)  # the refused one's loss must not detach the first
        first.dataReceived(frame(packet))
        self.assertEqual(peer.transport.value(), frame(packet) * 2)
        self.assertEqual(self.drops.total[("agent", "address_in_use")], 1)
        self.assertEqual(self.drops.total[("agent", "source_not_owned")], 1)

    def test_framingErrorDropsOnlyThatConnection(self):
        agent = connect(self.hub, "agent")
        peer = connect(self.hub, "peer")
        agent.dataReceived(b"\x00\x00\x00\x00")
        self.assertTrue(agent.transport.disconnected)
        self.assertFalse(peer.transport.disconnecting)
        self.assertEqual(self.drops.total[("agent", "zero_length_frame")], 1)
        self.assertEqual(peer.transport.value(), b"")

    def test_stalledPartialFrameDropsTheConnection(self):
        """
        A length prefix followed by a short read and a hang: the connection
        is dropped after the timeout, and nothing partial is relayed.
        """
        agent = connect(self.hub, "agent")
        peer = connect(self.hub, "peer")
        agent.dataReceived(frame(b"\x45" * 1000)[:10])
        self.clock.advance(agent.partialFrameTimeout - 1)
        self.assertFalse(agent.transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(agent.transport.disconnected)
        self.assertEqual(peer.transport.value(), b"")
        self.assertEqual(self.drops.total[("agent", "stalled_partial_frame")], 1)

    def test_slowButProgressingStreamIsKept(self):
        agent = connect(self.hub, "agent")
        connect(self.hub, "peer")
        for _ in range(5):
            agent.dataReceived(frame(b"\x45" * 10) + frame(b"\x45" * 10)[:5])
            self.clock.advance(agent.partialFrameTimeout - 1)
            agent.dataReceived(frame(b"\x45" * 10)[5:])
        self.assertFalse(agent.transport.disconnected)

    def test_legWeHoldPausedNeverStalls(self):
        """
        A partial frame on a leg that we paused ourselves (its other side
        is gone) is not the peer's stall: the leg stays, however long the
        other side is away, and the partial frame goes on once it is back.
        """
        agent = connect(self.hub, "agent")
        peer = connect(self.hub, "peer")
        whole = frame(b"\x45" * 1000)
        agent.dataReceived(whole[:944])
        lose(peer)
        self.assertFalse(agent.reading)
        self.clock.advance(agent.partialFrameTimeout * 10)
        self.assertFalse(agent.transport.disconnected)
        self.assertNotIn(("agent", "stalled_partial_frame"), self.drops.total)
        newPeer = connect(self.hub, "peer")
        self.assertTrue(agent.reading)
        agent.dataReceived(whole[944:])
        self.assertEqual(newPeer.transport.value(), whole)

    def test_stallCountsAgainOnceReading(self):
        """
        Once the leg reads again, a partial frame that does not move is a
        stall after a whole timeout from the resume.
        """
        agent = connect(self.hub, "agent")
        peer = connect(self.hub, "peer")
        agent.dataReceived(frame(b"\x45" * 1000)[:10])
        self.clock.advance(agent.partialFrameTimeout - 1)
        lose(peer)
        self.clock.advance(agent.partialFrameTimeout * 3)
        connect(self.hub, "peer")
        self.clock.advance(agent.partialFrameTimeout - 1)
        self.assertFalse(agent.transport.disconnected)
        self.clock.advance(1)
        self.assertTrue(agent.transport.disconnected)
        self.assertEqual(self.drops.total[("agent", "stalled_partial_frame")], 1)

    def test_backpressurePauseIsNoStall(self):
        """
        A leg paused because the other side's buffer is full is not stalled.
        """
        agent = connect(self.hub, "agent")
        peer = connect(self.hub, "peer")
        agent.dataReceived(frame(b"\x45" * 20) + frame(b"\x45" * 1000)[:10])
        peer.transport.producer.pauseProducing()  # peer's buffer is full
        self.assertEqual(agent.transport.producerState, "paused")
        self.clock.advance(agent.partialFrameTimeout * 3)
        self.assertFalse(agent.transport.disconnected)

    def test_closeStopsFeedingAndAbortsWhatCannotBeSent(self):
        """
        A stop unregisters the other side as producer, so nothing new is
        queued, and aborts a leg whose peer takes nothing within the close
        timeout.
        """
        agent = connect(self.hub, "agent")
        peer = connect(self.hub, "peer")
        self.hub.closeAll()
        self.assertIsNone(agent.transport.producer)
        self.assertIsNone(peer.transport.producer)
        self.assertTrue(agent.transport.disconnecting)
        self.assertFalse(agent.transport.disconnected)
        self.clock.advance(agent.closeTimeout)
        self.assertTrue(agent.transport.disconnected)

    def test_closedLegIsNotAbortedOnceGone(self):
        agent = connect(self.hub, "agent")
        agent.close()
        lose(agent)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_legIsThePushProducerOfItsReading(self):
        from twisted.internet.interfaces import IPushProducer
        from zope.interface.verify import verifyObject

        self.assertTrue(verifyObject(IPushProducer, connect(self.hub, "agent")))

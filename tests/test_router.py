"""
The gateway's router on fake transports: many agents and peers, who owns
which address, what is dropped and why, and backpressure between many legs.
"""

import ipaddress
import struct

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from ent.observability.stats import ServiceStats
from ent.protocols.framing import frame
from ent.protocols.relay import RelayLeg
from ent.protocols.router import ALONE, MAX_LEARNED, Router


def packet(src, dst, payload=b"x"):
    """
    An IPv4 or IPv6 packet from C{src} to C{dst} (enough of a header for
    the router, which reads only the version and the addresses).
    """
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        header = bytearray(20)
        header[0] = 0x45
        struct.pack_into(">H", header, 2, 20 + len(payload))
        header[12:16], header[16:20] = s.packed, d.packed
    else:
        header = bytearray(40)
        header[0] = 0x60
        struct.pack_into(">H", header, 4, len(payload))
        header[8:24], header[24:40] = s.packed, d.packed
    return bytes(header) + payload


class WriteCountingTransport(StringTransport):
    """
    Counts write and writeSequence calls: the router writes once per
    target per read.
    """

    writes = 0

    def write(self, data):
        self.writes += 1
        StringTransport.write(self, data)

    def writeSequence(self, data):
        self.writes += 1
        StringTransport.write(self, b"".join(data))


class FakeIdentityTransport(WriteCountingTransport):
    """
    A transport whose peer is authenticated as C{names} (the hook rats-tls
    evidence would use).
    """

    def __init__(self, names):
        WriteCountingTransport.__init__(self)
        self.names = names

    def getPeerIdentities(self):
        return self.names


class RouterTestCase(unittest.TestCase):
    allowedIps = None
    agentToAgent = False

    def setUp(self):
        self.clock = Clock()
        self.stats = ServiceStats("entg", self.clock)
        self.drops = self.stats.drops
        self.router = Router(self.stats, self.clock, allowedIps=self.allowedIps, agentToAgent=self.agentToAgent)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def connect(self, side, names=None):
        leg = RelayLeg(self.router, side)
        leg.makeConnection(WriteCountingTransport() if names is None else FakeIdentityTransport(names))
        return leg

    def lose(self, leg):
        leg.connectionLost(Failure(ConnectionDone()))

    def send(self, leg, *packets):
        leg.dataReceived(b"".join(frame(p) for p in packets))

    def take(self, leg):
        data = leg.transport.value()
        leg.transport.clear()
        return data

    def messages(self, text):
        return [e for e in self.logged if text in (e.get("log_format") or "")]


class RoutingTests(RouterTestCase):
    def test_peerFramesGoToTheAgentOwningTheDestination(self):
        a, b = self.connect("agent"), self.connect("agent")
        peer = self.connect("peer")
        self.send(a, packet("192.168.0.1", "192.168.0.254"))
        self.send(b, packet("192.168.1.1", "192.168.1.254"))
        self.assertEqual(len(self.take(peer)), 2 * (4 + 21))
        toA, toB = packet("192.168.0.254", "192.168.0.1"), packet("192.168.1.254", "192.168.1.1")
        self.send(peer, toA, toB, toA)
        self.assertEqual(self.take(a), frame(toA) * 2)
        self.assertEqual(self.take(b), frame(toB))
        self.assertEqual(a.transport.writes, 1, "one write per target per read")
        self.assertEqual(b.transport.writes, 1)

    def test_agentFramesGoToThePeerThatOwnsTheDestination(self):
        agent = self.connect("agent")
        p1, p2 = self.connect("peer"), self.connect("peer")
        self.send(p1, packet("10.1.0.1", "192.168.0.1"))
        self.send(p2, packet("10.2.0.1", "192.168.0.1"))
        self.take(agent)
        one, two = packet("192.168.0.1", "10.1.0.1"), packet("192.168.0.1", "10.2.0.1")
        self.send(agent, one, two, one, two)
        self.assertEqual(self.take(p1), frame(one) * 2)
        self.assertEqual(self.take(p2), frame(two) * 2)
        self.assertEqual((p1.transport.writes, p2.transport.writes), (1, 1))

    def test_onlyPeerTakesEveryUnknownDestination(self):
        """
        One agent and one peer: everything goes across, whatever its
        addresses, as before routing (and as ENG).
        """
        agent, peer = self.connect("agent"), self.connect("peer")
        out = [packet("192.168.0.1", "203.0.113.9"), packet("192.168.0.1", "2001:db8::1"), b"\x20" * 7]
        self.send(agent, *out)
        self.assertEqual(self.take(peer), b"".join(frame(p) for p in out))
        self.assertEqual(peer.transport.writes, 1)
        back = [packet("203.0.113.9", "198.51.100.1"), packet("2001:db8::1", "2001:db8::2")]
        self.send(peer, *back)
        self.assertEqual(self.take(agent), b"".join(frame(p) for p in back))
        self.assertEqual(dict(self.drops.total), {})

    def test_unknownDestinationWithSeveralLegsIsDroppedAndLoggedOncePerMinute(self):
        a, b = self.connect("agent"), self.connect("agent")
        peer = self.connect("peer")
        lost = packet("10.9.0.1", "192.168.7.7")
        for _ in range(3):
            self.send(peer, lost, lost)
        self.assertEqual((self.take(a), self.take(b)), (b"", b""))
        self.assertEqual(self.drops.total[("peer", "no_route")], 6)
        self.assertEqual(len(self.messages("dropping frames to")), 1)
        self.assertEqual(self.messages("dropping frames to")[0]["destination"], "192.168.7.7")
        self.clock.advance(59)
        self.send(peer, lost)
        self.assertEqual(len(self.messages("dropping frames to")), 1)
        self.clock.advance(1)
        self.send(peer, lost)
        self.assertEqual(len(self.messages("dropping frames to")), 2)

    def test_agentToAgentIsDropped(self):
        a, b = self.connect("agent"), self.connect("agent")
        self.connect("peer")
        self.send(a, packet("192.168.0.1", "192.168.0.254"))
        self.send(b, packet("192.168.1.1", "192.168.0.1"))
        self.assertEqual(self.take(a), b"")
        self.assertEqual(self.drops.total[("agent", "agent_to_agent")], 1)

    def test_lostAgentFreesItsAddresses(self):
        a = self.connect("agent")
        peer = self.connect("peer")
        self.connect("agent")
        self.connect("agent")
        self.send(a, packet("192.168.0.1", "192.168.0.254"))
        self.lose(a)
        self.send(peer, packet("192.168.0.254", "192.168.0.1"))
        self.assertEqual(self.drops.total[("peer", "no_route")], 1)
        again = self.connect("agent")
        self.send(again, packet("192.168.0.1", "192.168.0.254"))
        self.assertFalse(again.transport.disconnecting)
        self.send(peer, packet("192.168.0.254", "192.168.0.1"))
        self.assertEqual(len(self.take(again)), 4 + 21)

    def test_learnedAddressesAreBounded(self):
        agent, peer = self.connect("agent"), self.connect("peer")
        limit = MAX_LEARNED["agent"]
        self.send(agent, *[packet(f"10.0.{i // 256}.{i % 256}", "10.9.9.9") for i in range(limit + 2)])
        self.assertEqual(len(agent.owned), limit)
        self.assertEqual(self.drops.total[("agent", "source_not_owned")], 2)
        self.assertEqual(len(self.take(peer)), limit * (4 + 21))

    def test_peerSourcesAreNeverTakenFromAnAgent(self):
        agent = self.connect("agent")
        p1, _p2 = self.connect("peer"), self.connect("peer")
        self.send(agent, packet("192.168.0.1", "10.1.0.1"))
        self.send(p1, packet("192.168.0.1", "192.168.0.1"))
        self.assertIs(self.router.owners[ipaddress.ip_address("192.168.0.1").packed], agent)


class RefusalTests(RouterTestCase):
    def test_secondClaimIsRefusedAndLoggedWithBothPeers(self):
        first, peer = self.connect("agent"), self.connect("peer")
        self.send(first, packet("192.168.0.1", "192.168.0.254"))
        second = self.connect("agent")
        self.send(
            second,
            packet("192.168.0.9", "192.168.0.254"),
            packet("192.168.0.1", "192.168.0.254"),
            packet("192.168.0.9", "192.168.0.254"),
        )
        self.assertTrue(second.transport.disconnecting)
        self.assertEqual(second.transport.producerState, "paused")
        self.assertFalse(first.transport.disconnecting)
        # What it sent before the claim went on; nothing after it.
        self.assertEqual(
            self.take(peer),
            frame(packet("192.168.0.1", "192.168.0.254")) + frame(packet("192.168.0.9", "192.168.0.254")),
        )
        self.assertEqual(self.drops.total[("agent", "source_not_owned")], 2)
        [refused] = self.messages("refused")
        self.assertEqual(refused["address"], "192.168.0.1")
        self.assertEqual({refused["peer"], refused["owner"]}, {first.peerName(), second.peerName()})
        # The refused leg's own address was freed at once.
        self.assertNotIn(ipaddress.ip_address("192.168.0.9").packed, self.router.owners)
        self.send(peer, packet("192.168.0.254", "192.168.0.1"))
        self.assertEqual(len(self.take(first)), 4 + 21)


class AllowedIpsTests(RouterTestCase):
    allowedIps = {
        "client": [ipaddress.ip_network("192.168.0.0/24")],
        "lab": [ipaddress.ip_network("10.5.0.0/16"), ipaddress.ip_network("fd00::/64")],
    }

    def test_configuredPrefixesRouteAndLimitSources(self):
        client = self.connect("agent", ["client"])
        lab = self.connect("agent", ["lab.example", "lab"])
        peer = self.connect("peer")
        # Before either sent anything, the prefixes route to them.
        self.send(
            peer, packet("10.9.0.1", "192.168.0.77"), packet("10.9.0.1", "10.5.3.4"), packet("2001:db8::1", "fd00::5")
        )
        self.assertEqual(len(self.take(client)), 4 + 21)
        self.assertEqual(len(self.take(lab)), 2 * 4 + 21 + 41)
        self.send(client, packet("192.168.0.5", "10.9.0.1"), packet("10.5.0.1", "10.9.0.1"))
        self.assertEqual(self.take(peer), frame(packet("192.168.0.5", "10.9.0.1")))
        self.assertEqual(self.drops.total[("agent", "source_not_owned")], 1)
        self.assertFalse(client.transport.disconnecting, "a configured leg is not refused for a bad source")

    def test_learningAgentInsideAConfiguredPrefixIsRefused(self):
        client = self.connect("agent", ["client"])
        self.connect("peer")
        stranger = self.connect("agent")
        self.send(stranger, packet("192.168.0.1", "10.9.0.1"))
        self.assertTrue(stranger.transport.disconnecting)
        self.assertFalse(client.transport.disconnecting)

    def test_sameIdentityTwiceIsRefused(self):
        first = self.connect("agent", ["client"])
        peer = self.connect("peer")
        second = self.connect("agent", ["client"])
        self.assertTrue(second.transport.disconnecting)
        self.assertEqual(second.transport.producerState, "paused")
        # What it sent before its close took effect goes nowhere.
        self.send(second, packet("192.168.0.1", "10.9.0.1"))
        self.assertEqual(self.take(peer), b"")
        self.assertEqual(self.drops.total[("agent", "source_not_owned")], 1)
        self.assertFalse(first.transport.disconnecting)
        self.assertEqual(self.drops.total[("agent", "address_in_use")], 1)
        self.assertNotIn(second, self.router.legs["agent"])

    def test_unlistedIdentityIsRefused(self):
        """
        With --allowed-ips, an authenticated agent no entry names is
        refused at once; an unauthenticated one (plain TCP) still learns.
        """
        peer = self.connect("peer")
        stranger = self.connect("agent", ["intruder", "intruder.example"])
        self.assertTrue(stranger.transport.disconnecting)
        self.assertNotIn(stranger, self.router.legs["agent"])
        self.send(stranger, packet("192.168.9.1", "10.9.0.1"))
        self.assertEqual(self.take(peer), b"")
        self.assertEqual(self.drops.total[("agent", "identity_not_allowed")], 1)
        [refusal] = self.messages("no --allowed-ips entry names it")
        self.assertEqual(refusal["identity"], "intruder, intruder.example")
        plain = self.connect("agent")
        self.send(plain, packet("192.168.9.1", "10.9.0.1"))
        self.assertEqual(len(self.take(peer)), 4 + 21)

    def test_configuredPrefixOverLearnedAddressIsRefused(self):
        learner = self.connect("agent")
        self.connect("peer")
        self.send(learner, packet("10.5.1.1", "10.9.0.1"))
        lab = self.connect("agent", ["lab"])
        self.assertTrue(lab.transport.disconnecting)
        self.assertFalse(learner.transport.disconnecting)


class PeerRoutesTests(RouterTestCase):
    """
    Peers of C{--entg-connect HOST:PORT=PREFIX}: each takes its prefixes only,
    whether or not the others are up.
    """

    routes = {"gw2": (ipaddress.ip_network("192.168.0.254/32"),), "gw3": (ipaddress.ip_network("192.168.0.253/32"),)}

    def setUp(self):
        RouterTestCase.setUp(self)
        self.router.peerRoutes = sum(self.routes.values(), ())

    def peer(self, name):
        leg = RelayLeg(self.router, "peer", self.routes[name])
        leg.makeConnection(WriteCountingTransport())
        return leg

    def test_eachPeerTakesItsPrefixes(self):
        agent, gw2, gw3 = self.connect("agent"), self.peer("gw2"), self.peer("gw3")
        to254, to253 = packet("192.168.0.1", "192.168.0.254"), packet("192.168.0.1", "192.168.0.253")
        self.send(agent, to254, to253, to254)
        self.assertEqual(self.take(gw2), frame(to254) * 2)
        self.assertEqual(self.take(gw3), frame(to253))
        back = packet("192.168.0.253", "192.168.0.1")
        self.send(gw3, back)
        self.assertEqual(self.take(agent), frame(back))
        self.assertEqual(dict(self.drops.total), {})

    def test_alonePeerWithRoutesTakesNothingElse(self):
        """
        One agent and one peer, but the peer named its prefixes: frames for
        a peer that is away are dropped, not sent to it.
        """
        agent, gw2 = self.connect("agent"), self.peer("gw2")
        self.send(agent, packet("192.168.0.1", "192.168.0.253"), packet("192.168.0.1", "10.0.0.9"))
        self.assertEqual(self.take(gw2), b"")
        self.assertEqual(self.drops.total[("agent", "no_route")], 2)
        self.send(agent, packet("192.168.0.1", "192.168.0.254"))
        self.assertEqual(len(self.take(gw2)), 4 + 21)

    def test_peerFramesNeverGoToAnotherPeer(self):
        self.connect("agent")
        gw2, gw3 = self.peer("gw2"), self.peer("gw3")
        self.send(gw2, packet("192.168.0.254", "192.168.0.253"))
        self.assertEqual(self.take(gw3), b"")
        self.lose(gw3)
        self.send(gw2, packet("192.168.0.254", "192.168.0.253"))
        self.assertEqual(self.drops.total[("peer", "peer_to_peer")], 2)

    def test_acceptedPeerLearnsNothingBehindAConnectedOne(self):
        agent = self.connect("agent")
        accepted, gw2 = self.connect("peer"), self.peer("gw2")
        self.send(accepted, packet("192.168.0.253", "192.168.0.1"), packet("10.7.0.1", "192.168.0.1"))
        self.assertEqual(sorted(ipaddress.ip_address(a) for a in accepted.owned), [ipaddress.ip_address("10.7.0.1")])
        self.send(agent, packet("192.168.0.1", "192.168.0.253"), packet("192.168.0.1", "10.7.0.1"))
        self.assertEqual(self.drops.total[("agent", "no_route")], 1)
        self.assertEqual(len(self.take(accepted)), 4 + 21)
        self.assertEqual(self.take(gw2), b"")

    def test_agentHostRouteWinsOverAPeerPrefix(self):
        """
        A peer prefix may cover the agents' own network: an agent's address
        is a host route, longer than any prefix.
        """
        self.router.peerRoutes = (ipaddress.ip_network("192.168.0.0/24"),)
        gw = RelayLeg(self.router, "peer", self.router.peerRoutes)
        gw.makeConnection(WriteCountingTransport())
        agent = self.connect("agent")
        self.send(agent, packet("192.168.0.1", "192.168.0.254"))
        self.assertEqual(len(self.take(gw)), 4 + 21)
        self.send(gw, packet("192.168.0.254", "192.168.0.1"))
        self.assertEqual(len(self.take(agent)), 4 + 21)
        self.assertEqual(dict(self.drops.total), {})


class AgentToAgentTests(RouterTestCase):
    agentToAgent = True

    def test_allowedWithTheFlag(self):
        a, b = self.connect("agent"), self.connect("agent")
        self.connect("peer")
        self.send(a, packet("192.168.0.1", "192.168.0.254"))
        self.send(b, packet("192.168.1.1", "192.168.0.1"))
        self.assertEqual(self.take(a), frame(packet("192.168.1.1", "192.168.0.1")))


class BackpressureTests(RouterTestCase):
    def test_aloneLegsArePausedUntilTheOtherSideComes(self):
        a, b = self.connect("agent"), self.connect("agent")
        self.assertEqual((a.holds, b.holds), ({ALONE}, {ALONE}))
        peer = self.connect("peer")
        self.assertEqual((a.transport.producerState, b.transport.producerState), ("producing", "producing"))
        self.lose(peer)
        self.assertEqual((a.transport.producerState, b.transport.producerState), ("paused", "paused"))

    def test_fullTargetPausesOnlyItsSenders(self):
        a, b, c = self.connect("agent"), self.connect("agent"), self.connect("agent")
        p1, p2 = self.connect("peer"), self.connect("peer")
        self.send(p1, packet("10.1.0.1", "10.1.0.1"))  # p1 owns 10.1.0.1 ...
        self.send(p2, packet("10.2.0.1", "10.2.0.1"))  # ... p2 owns 10.2.0.1
        self.send(a, packet("192.168.0.1", "10.1.0.1"))
        self.send(b, packet("192.168.1.1", "10.1.0.1"))
        self.send(c, packet("192.168.2.1", "10.2.0.1"))
        p1.transport.producer.pauseProducing()  # p1's buffer is full
        states = [leg.transport.producerState for leg in (a, b, c)]
        self.assertEqual(states, ["paused", "paused", "producing"])
        # c writes to p1 while it is full: it is held too, after this read.
        self.send(c, packet("192.168.2.1", "10.1.0.1"))
        self.assertEqual(c.transport.producerState, "paused")
        p1.transport.producer.resumeProducing()
        states = [leg.transport.producerState for leg in (a, b, c)]
        self.assertEqual(states, ["producing"] * 3)

    def test_legHeldByTwoIsResumedWhenBothRelease(self):
        a = self.connect("agent")
        p1, p2 = self.connect("peer"), self.connect("peer")
        self.send(p1, packet("10.1.0.1", "10.1.0.1"))
        self.send(p2, packet("10.2.0.1", "10.2.0.1"))
        self.send(a, packet("192.168.0.1", "10.1.0.1"), packet("192.168.0.1", "10.2.0.1"))
        p1.transport.producer.pauseProducing()
        p2.transport.producer.pauseProducing()
        p1.transport.producer.resumeProducing()
        self.assertEqual(a.transport.producerState, "paused")
        p2.transport.producer.resumeProducing()
        self.assertEqual(a.transport.producerState, "producing")

    def test_lostTargetReleasesItsSendersAndForgetsThem(self):
        a = self.connect("agent")
        p1, p2 = self.connect("peer"), self.connect("peer")
        self.send(p1, packet("10.1.0.1", "10.1.0.1"))
        self.send(a, packet("192.168.0.1", "10.1.0.1"))
        p1.transport.producer.pauseProducing()
        self.assertEqual(a.transport.producerState, "paused")
        self.lose(p1)
        self.assertEqual(a.transport.producerState, "producing")
        self.lose(a)
        self.assertEqual(p2.gate.senders | p2.gate.held, set())

    def test_closeAllUnregistersEveryGate(self):
        legs = [self.connect("agent"), self.connect("agent"), self.connect("peer")]
        self.router.closeAll()
        for leg in legs:
            self.assertIsNone(leg.transport.producer)
            self.assertTrue(leg.transport.disconnecting)


class ReportTests(RouterTestCase):
    def test_reportListsEachLeg(self):
        agent = self.connect("agent", ["client"])
        peer = self.connect("peer")
        self.clock.advance(5)
        self.send(agent, packet("192.168.0.1", "10.9.0.1"))
        rows = {row["side"]: row for row in self.router.report()}
        self.assertEqual(rows["agent"]["identity"], "client")
        self.assertEqual(rows["agent"]["addresses"], ["192.168.0.1"])
        self.assertEqual(rows["agent"]["packetsReceived"], 1)
        self.assertEqual(rows["peer"]["packetsSent"], 1)
        self.assertEqual(rows["peer"]["bytesSent"], 4 + 21)
        self.assertEqual(rows["peer"]["up"], 5)
        self.assertEqual(rows["peer"]["identity"], "-")
        self.assertIs(peer.gate.leg, peer)


class AnnouncementTests(RouterTestCase):
    def test_announcementClaimsTheAddressAndGoesNowhere(self):
        from ent.protocols.packets import announcement

        a, b = self.connect("agent"), self.connect("agent")
        peer = self.connect("peer")
        self.send(a, announcement("192.168.0.254"))
        self.assertEqual(self.take(peer), b"")
        self.send(peer, packet("192.168.0.1", "192.168.0.254"))
        self.assertEqual(self.take(a), frame(packet("192.168.0.1", "192.168.0.254")))
        self.assertEqual(self.take(b), b"")
        self.send(b, announcement("192.168.0.254"))
        self.assertTrue(b.transport.disconnecting)
        self.assertEqual(dict(self.drops.total), {("agent", "address_in_use"): 1, ("agent", "source_not_owned"): 1})

    def test_announcementIsAValidPacket(self):
        from ent.protocols.packets import announcement, checksum, packetProblem

        packet = announcement("10.0.0.1")
        self.assertIsNone(packetProblem(packet))
        self.assertEqual(packet[12:16], packet[16:20])
        # Header and ICMP checksums verify, as the far kernel checks them.
        self.assertEqual((checksum(packet[:20]), checksum(packet[20:])), (0, 0))


class AlikeBatchTests(RouterTestCase):
    """
    A batch whose frames all have the same addresses (a bulk flow) is
    routed with one lookup; what it does is the same as frame by frame.
    """

    def countRoutes(self):
        calls = []
        route = self.router.route

        def counting(source, src, dst):
            calls.append((src, dst))
            return route(source, src, dst)

        self.router.route = counting
        return calls

    def test_alikeBatchRoutedOnce(self):
        a, b = self.connect("agent"), self.connect("agent")
        peer = self.connect("peer")
        self.send(a, packet("192.168.0.1", "192.168.0.254"))
        self.send(b, packet("192.168.1.1", "192.168.1.254"))
        self.take(peer)
        calls = self.countRoutes()
        bulk = packet("192.168.0.254", "192.168.0.1", b"y" * 1000)
        self.send(peer, *[bulk] * 50)
        self.assertEqual(self.take(a), frame(bulk) * 50)
        self.assertEqual(len(calls), 1)
        self.assertEqual(peer.decoder.pair, bulk[12:20])
        self.send(peer, *[bulk] * 50)
        self.assertEqual(len(calls), 1, "the second batch is the leg's cached route")
        self.assertEqual(a.legStats.packetsSent, 100)

    def test_mixedBatchRoutedFrameByFrame(self):
        a, b = self.connect("agent"), self.connect("agent")
        peer = self.connect("peer")
        self.send(a, packet("192.168.0.1", "192.168.0.254"))
        self.send(b, packet("192.168.1.1", "192.168.1.254"))
        self.take(peer)
        toA, toB = packet("192.168.0.254", "192.168.0.1"), packet("192.168.1.254", "192.168.1.1")
        self.send(peer, toA, toB)
        self.assertIsNone(peer.decoder.pair)
        self.assertEqual(self.take(a), frame(toA))
        self.assertEqual(self.take(b), frame(toB))

    def test_alikeBatchFromAForeignSourceIsCountedFrameByFrame(self):
        """
        An agent's alike batch from an address another agent owns: the first
        frame refuses the leg, every frame is counted.
        """
        a, b = self.connect("agent"), self.connect("agent")
        self.connect("peer")
        self.send(a, packet("192.168.0.1", "192.168.0.254"))
        self.send(b, *[packet("192.168.0.1", "192.168.0.254")] * 5)
        self.assertEqual(self.drops.total[("agent", "source_not_owned")], 5)
        self.assertTrue(b.refused)

    def test_soleAgentAlikeBatchFromAnOwnedSource(self):
        agent, peer = self.connect("agent"), self.connect("peer")
        self.send(agent, packet("192.168.0.1", "192.168.0.254"))
        self.take(peer)
        bulk = packet("192.168.0.1", "192.168.0.254", b"z" * 100)
        self.send(agent, *[bulk] * 20)
        self.assertEqual(self.take(peer), frame(bulk) * 20)

    def test_announcementLengthIsNeverAlike(self):
        from ent.protocols.packets import announcement

        agent = self.connect("agent")
        self.connect("peer")
        self.send(agent, announcement("192.168.0.1"), announcement("192.168.0.1"))
        self.assertIsNone(agent.decoder.pair)

    def test_interleavedFlowsRoutedOncePerFlow(self):
        """
        Frames of three flows, interleaved in one batch: each flow is looked
        up once, then found in the leg's route cache.
        """
        agents = [self.connect("agent") for _ in range(3)]
        peer = self.connect("peer")
        for i, agent in enumerate(agents):
            self.send(agent, packet(f"192.168.0.{i + 1}", "192.168.0.254"))
        self.take(peer)
        calls = self.countRoutes()
        back = [packet("192.168.0.254", f"192.168.0.{i + 1}") for i in range(3)]
        self.send(peer, *(back * 10))
        self.send(peer, *(back * 10))
        self.assertEqual(len(calls), 3)
        for agent, p in zip(agents, back, strict=True):
            self.assertEqual(self.take(agent), frame(p) * 20)

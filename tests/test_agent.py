"""
The agent's data path and the gateway service's wiring, on fakes: which
packets go where, and who pauses whom. The real thing runs in
test_endtoend.
"""

import ipaddress

from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from ent.flow import Valve
from ent.protocols.framing import frameSequence
from ent.services.agent import AgentService, GatewayLink
from ent.services.gateway import GatewayService
from tests.test_packets import ipv4


class FakeTun:
    def __init__(self):
        self.state = "paused"
        self.written = []

    def pauseProducing(self):
        self.state = "paused"

    def resumeProducing(self):
        self.state = "producing"

    def writePackets(self, packets):
        self.written.extend(packets)
        return 0


def agentOptions():
    return {
        "role": "capture",
        "dports": (7,),
        "tun-name": "tun0",
        "tun-interface": ipaddress.IPv4Interface("192.168.0.1/24"),
        "peer-addr": ipaddress.IPv4Address("192.168.0.254"),
        "tunnel-port": 6978,
        "mtu": 65535,
        "route-table": 6978,
    }


class AgentDataPathTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        endpoint = TCP4ClientEndpoint(self.reactor, "10.1.0.2", 6980)
        self.agent = AgentService(agentOptions(), endpoint, self.reactor)
        self.agent.tun = self.tun = FakeTun()

    def connect(self):
        link = GatewayLink(self.agent)
        link.makeConnection(StringTransport())
        return link

    def test_noGatewayCountsDrops(self):
        self.agent.packetsFromTun([b"\x45" * 20, b"\x45" * 20], 40)
        self.assertEqual(self.agent.drops.total[("tun", "no_gateway")], 2)

    def test_linkUpResumesTunAsProducerOfTheLink(self):
        link = self.connect()
        self.assertEqual(self.tun.state, "producing")
        self.assertIsInstance(link.transport.producer, Valve)
        self.assertIs(link.transport.producer.producer, self.tun)
        self.assertTrue(link.transport.streaming)

    def test_announceOnConnecting(self):
        """
        With --announce the first frame on every new link is the agent's
        announcement; without it the link carries only the TUN's packets.
        """
        from ent.protocols.framing import frame
        from ent.protocols.packets import announcement

        self.assertEqual(self.connect().transport.value(), b"")
        self.agent.options["announce"] = True
        self.assertEqual(self.connect().transport.value(), frame(announcement("192.168.0.1")))

    def test_tunBatchSentFramed(self):
        link = self.connect()
        packets = [b"\x45" * 20, b"\x60" * 40]
        self.agent.packetsFromTun(packets, sum(map(len, packets)))
        self.assertEqual(link.transport.value(), b"".join(frameSequence(packets)))
        self.assertEqual(self.agent.linkStats.packetsSent, 2)
        self.assertEqual(self.agent.linkStats.bytesSent, len(link.transport.value()))

    def test_framesFromGatewayWrittenToTun(self):
        link = self.connect()
        packets = [ipv4(b"a" * 30), ipv4(b"b" * 31)]
        stream = b"".join(frameSequence(packets + [b"\x45 not a packet"]))
        link.dataReceived(stream[:33])
        link.dataReceived(stream[33:])
        self.assertEqual(self.tun.written, packets)
        self.assertEqual(self.agent.drops.total[("gateway", "truncated_ipv4_header")], 1)

    def test_linkLostPausesTunAndKeepsIt(self):
        link = self.connect()
        link.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.tun.state, "paused")
        self.assertIsNone(self.agent.link)
        # The transport going away pauses, never closes, the TUN:
        Valve(self.tun).stopProducing()
        self.assertEqual(self.tun.state, "paused")
        again = self.connect()
        self.assertEqual(self.tun.state, "producing")
        self.assertIs(self.agent.link, again)

    def test_oversizeFrameDropsTheLink(self):
        link = self.connect()
        link.dataReceived(b"\xff\xff\xff\xff")
        self.assertTrue(link.transport.disconnected)
        self.assertEqual(self.tun.written, [])
        self.assertEqual(self.agent.drops.total[("gateway", "oversize_frame")], 1)


class GatewayServiceTests(unittest.TestCase):
    def test_listensForAgentAndPeer(self):
        reactor = MemoryReactorClock()
        service = GatewayService(
            TCP4ServerEndpoint(reactor, 6980), reactor, peerListen=TCP4ServerEndpoint(reactor, 6979)
        )
        service.startService()
        self.assertEqual(sorted(port for port, *_ in reactor.tcpServers), [6979, 6980])
        self.assertEqual(reactor.tcpClients, [])
        service.stopService()

    def test_connectsToPeer(self):
        reactor = MemoryReactorClock()
        service = GatewayService(
            TCP4ServerEndpoint(reactor, 6980), reactor, peerConnect=TCP4ClientEndpoint(reactor, "10.2.0.2", 6979)
        )
        service.startService()
        self.assertEqual([(h, p) for h, p, *_ in reactor.tcpClients], [("10.2.0.2", 6979)])
        self.assertEqual([port for port, *_ in reactor.tcpServers], [6980])
        service.stopService()

    def test_connectsToEachPeerAndListens(self):
        """
        One connection per peer, each leg built with its own prefixes, and
        peers accepted beside them.
        """
        reactor = MemoryReactorClock()
        routes2, routes3 = (ipaddress.ip_network("192.168.0.254/32"),), (ipaddress.ip_network("192.168.0.253/32"),)
        service = GatewayService(
            TCP4ServerEndpoint(reactor, 6980),
            reactor,
            peers=[
                (TCP4ClientEndpoint(reactor, "10.2.0.2", 6979), routes2),
                (TCP4ClientEndpoint(reactor, "10.3.0.2", 6979), routes3),
            ],
            peerListen=TCP4ServerEndpoint(reactor, 6979),
        )
        service.startService()
        self.addCleanup(service.stopService)
        clients = {(h, p): factory for h, p, factory, *_ in reactor.tcpClients}
        self.assertEqual(sorted(clients), [("10.2.0.2", 6979), ("10.3.0.2", 6979)])
        self.assertEqual(sorted(port for port, *_ in reactor.tcpServers), [6979, 6980])
        self.assertEqual(service.hub.peerRoutes, routes2 + routes3)
        # The endpoint wraps each leg (twisted.internet.endpoints).
        legs = [factory.buildProtocol(None)._wrappedProtocol for factory in clients.values()]
        self.assertEqual(sorted(leg.routes for leg in legs), sorted([routes2, routes3]))


class AgentStopTests(unittest.TestCase):
    """
    A stop must not wait for a link that the TUN keeps feeding.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        endpoint = TCP4ClientEndpoint(self.reactor, "10.1.0.2", 6980)
        self.agent = AgentService(agentOptions(), endpoint, self.reactor)
        self.agent.tun = self.tun = FakeTun()
        self.tun.stopReading = lambda: setattr(self.tun, "state", "stopped")
        self.link = GatewayLink(self.agent)
        self.link.makeConnection(StringTransport())

    def test_stopStopsTheTunAndUnregistersIt(self):
        self.agent.unconfigureHost = lambda: None
        self.agent.stopService()
        self.assertEqual(self.tun.state, "stopped")
        self.assertIsNone(self.link.transport.producer)
        self.assertTrue(self.link.transport.disconnecting)
        self.reactor.advance(self.link.closeTimeout)
        self.assertTrue(self.link.transport.disconnected)

    def test_linkUpWhileStoppingLeavesTunAlone(self):
        self.agent.unconfigureHost = lambda: None
        self.agent.stopService()
        late = GatewayLink(self.agent)
        late.makeConnection(StringTransport())
        self.assertEqual(self.tun.state, "stopped")
        self.assertIsNone(late.transport.producer)

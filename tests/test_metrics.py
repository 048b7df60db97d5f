"""
Metrics, JSON logs and the status summary, on fakes and on loopback: every
drop reason reaches its label, the exposition parses, the page is served
over real HTTP. The real tunnel is scraped in test_observability.
"""

import io
import ipaddress
import json
import socket
import sys

from prometheus_client.exposition import generate_latest
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial import unittest

from ent.observability import status
from ent.observability.logs import JsonLinesObserver, eventAsRecord, observerFor
from ent.observability.metrics import histogramOf, metricsSite, registryFor
from ent.observability.stats import DROP_REASONS, ServiceStats
from ent.protocols.framing import HEADER, frame
from ent.protocols.relay import RelayLeg
from ent.protocols.router import Router
from ent.protocols.splice import SocketRelayFactory
from ent.services.agent import AgentService, GatewayLink
from tests.test_agent import FakeTun, agentOptions
from tests.test_packets import ipv4, ipv6
from tests.test_socketrelay import FakeEndpoint, HalfCloseTransport


def scrape(stats):
    return status.Scrape(generate_latest(registryFor(stats)).decode())


def dropped(stats):
    return {(s.labels["leg"], s.labels["reason"]): s.value for s in scrape(stats).find("ent_dropped_total")}


class RefusingTun(FakeTun):
    """
    A TUN whose kernel refuses every packet, as a full queue would.
    """

    def __init__(self, agent):
        FakeTun.__init__(self)
        self.agent = agent

    def writePackets(self, packets):
        for _ in packets:
            self.agent._tunWriteFailed(OSError(105, "No buffer space available"))
        return len(packets)


class DropReasonTests(unittest.TestCase):
    """
    Each drop reason, caused through the code that drops, shows up in the
    exposition under its own leg and reason.
    """

    scenarios = (
        "framingErrorsOnTheGateway",
        "otherSideNotConnected",
        "routingOnTheGateway",
        "unlistedIdentityOnTheGateway",
        "policyGrantsOnTheGateway",
        "stuckAgentOnTheGateway",
        "badPacketsOnTheAgent",
        "tunSideDropsOnTheAgent",
        "connectionLimitOnTheRelay",
        "udpOnTheUserStack",
        "notIpv4OnTheUserStack",
    )

    def gateway(self):
        clock = Clock()
        stats = ServiceStats("entg", clock)
        hub = Router(stats, clock)

        def connect(side):
            leg = RelayLeg(hub, side)
            leg.makeConnection(StringTransport())
            return leg

        return stats, clock, connect

    def agent(self):
        from twisted.internet.endpoints import TCP4ClientEndpoint
        from twisted.internet.testing import MemoryReactorClock

        memory = MemoryReactorClock()
        agent = AgentService(agentOptions(), TCP4ClientEndpoint(memory, "10.1.0.2", 6980), memory)
        agent.tun = FakeTun()
        return agent

    def test_everyScenarioShowsItsDrops(self):
        for name in self.scenarios:
            stats, expected = getattr(self, name)()
            self.assertEqual(dropped(stats), expected, name)

    def test_everyReasonHasAScenario(self):
        caused = set()
        for name in self.scenarios:
            caused.update(reason for _, reason in getattr(self, name)()[1])
        self.assertEqual(set(DROP_REASONS) - caused, set())

    def framingErrorsOnTheGateway(self):
        stats, clock, connect = self.gateway()

        def dropped(leg):
            # What the aborted transport would do for real.
            self.assertTrue(leg.transport.disconnecting)
            leg.connectionLost(Failure(ConnectionDone()))

        zero = connect("agent")
        zero.dataReceived(HEADER.pack(0))
        dropped(zero)
        oversize = connect("agent")
        oversize.dataReceived(HEADER.pack(70000))
        dropped(oversize)
        connect("agent")  # a leg alone is paused by us, and a paused leg never stalls
        stalled = connect("peer")
        stalled.dataReceived(HEADER.pack(100) + b"x" * 10)
        clock.advance(stalled.partialFrameTimeout + 1)
        dropped(stalled)
        cut = connect("agent")
        cut.dataReceived(HEADER.pack(100) + b"x")
        cut.connectionLost(Failure(ConnectionDone()))
        return stats, {
            ("agent", "zero_length_frame"): 1,
            ("agent", "oversize_frame"): 1,
            ("peer", "stalled_partial_frame"): 1,
            ("agent", "partial_frame_cut_off"): 1,
        }

    def otherSideNotConnected(self):
        stats, clock, connect = self.gateway()
        connect("agent").dataReceived(frame(ipv4(b"a")) + frame(ipv4(b"b")))
        return stats, {("agent", "other_side_not_connected"): 2}

    def routingOnTheGateway(self):
        from tests.test_router import packet

        stats, clock, connect = self.gateway()
        a, b = connect("agent"), connect("agent")
        p1, p2 = connect("peer"), connect("peer")
        a.dataReceived(frame(packet("10.0.0.1", "10.0.0.2")))  # a owns .1; two peers, no route
        b.dataReceived(frame(packet("10.0.0.3", "10.0.0.1")))  # b owns .3; to agent a
        p1.dataReceived(frame(packet("10.9.0.1", "10.0.0.9")))  # two agents, no route
        p2.dataReceived(frame(packet("10.9.0.2", "10.9.0.1")))  # to peer p1
        b.dataReceived(frame(packet("10.0.0.1", "10.9.0.1")))  # a's address: b is refused
        return stats, {
            ("agent", "no_route"): 1,
            ("agent", "agent_to_agent"): 1,
            ("peer", "no_route"): 1,
            ("peer", "peer_to_peer"): 1,
            ("agent", "source_not_owned"): 1,
            ("agent", "address_in_use"): 1,
        }

    def unlistedIdentityOnTheGateway(self):
        from tests.test_router import FakeIdentityTransport

        clock = Clock()
        stats = ServiceStats("entg", clock)
        hub = Router(stats, clock, allowedIps={"client": [ipaddress.ip_network("192.168.0.0/24")]})
        RelayLeg(hub, "agent").makeConnection(FakeIdentityTransport(["stranger"]))
        return stats, {("agent", "identity_not_allowed"): 1}

    def policyGrantsOnTheGateway(self):
        from twisted.internet.address import IPv4Address

        from ent.legs.policy import parsePolicy
        from ent.protocols.admission import Admission
        from tests.test_admission import ipv4 as addressed

        clock = Clock()
        stats = ServiceStats("entg", clock)
        policy = parsePolicy(
            """
            [[identity]]
            name = "client"
            role = "agent"
            from = ["10.1.0.1/32"]
            services = ["192.168.0.254:80/tcp"]
            [[identity]]
            name = "gw2"
            role = "peer"
            from = ["10.2.0.2/32"]
            addresses = ["192.168.0.254/32"]
            """
        )
        hub = Router(stats, clock, admission=Admission(policy, clock, stats.legRefused))
        agent, peer = RelayLeg(hub, "agent"), RelayLeg(hub, "peer")
        agent.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.1.0.1", 1)))
        peer.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "10.2.0.2", 1)))
        agent.dataReceived(frame(addressed("192.168.0.1", "192.168.0.254", 6, 7)))
        peer.dataReceived(frame(addressed("192.168.0.9", "192.168.0.1")))
        return stats, {("agent", "service_not_allowed"): 1, ("peer", "source_not_allowed"): 1}

    def stuckAgentOnTheGateway(self):
        from ent.protocols.router import MAX_QUEUED, STALL_TIMEOUT
        from tests.test_router import packet

        stats, clock, connect = self.gateway()
        a, b, peer = connect("agent"), connect("agent"), connect("peer")
        a.dataReceived(frame(packet("192.168.0.1", "192.168.0.254")))
        b.dataReceived(frame(packet("192.168.0.2", "192.168.0.254")))
        a.transport.producer.pauseProducing()
        big = frame(packet("192.168.0.254", "192.168.0.1", b"x" * 60000))
        for _ in range(MAX_QUEUED // len(big) + 2):
            peer.dataReceived(big)
        clock.advance(STALL_TIMEOUT + 1)
        return stats, {("agent", "target_full"): 2, ("agent", "write_stalled"): 1}

    def badPacketsOnTheAgent(self):
        agent = self.agent()
        link = GatewayLink(agent)
        link.makeConnection(StringTransport())
        bad = [
            b"\x20" * 30,
            b"\x45\x00\x00",
            b"\x44" + ipv4(b"x" * 10)[1:],
            ipv4(b"x" * 10) + b"!",
            ipv6()[:30],
            ipv6(b"abc")[:-1],
        ]
        link.dataReceived(b"".join(frame(p) for p in bad))
        self.assertEqual(agent.tun.written, [])
        return agent.stats, {
            ("gateway", "not_ip"): 1,
            ("gateway", "truncated_ipv4_header"): 1,
            ("gateway", "bad_ipv4_header_length"): 1,
            ("gateway", "ipv4_length_mismatch"): 1,
            ("gateway", "truncated_ipv6_header"): 1,
            ("gateway", "ipv6_length_mismatch"): 1,
        }

    def tunSideDropsOnTheAgent(self):
        agent = self.agent()
        agent.packetsFromTun([ipv4(b"a")] * 3, 3 * len(ipv4(b"a")))
        agent.tun = RefusingTun(agent)
        agent.packetsFromLink([ipv4(b"b")] * 2)
        agent.tun = None
        agent.packetsFromLink([ipv4(b"c")])
        return agent.stats, {("tun", "no_gateway"): 3, ("gateway", "tun_write_failed"): 2, ("gateway", "tun_closed"): 1}

    def connectionLimitOnTheRelay(self):
        stats = ServiceStats("ent-relay", Clock())
        relay = SocketRelayFactory(FakeEndpoint(), "vsock:16:8888", 1, stats.drops)
        stats.relay = relay
        for _ in range(3):
            relay.buildProtocol(None).makeConnection(HalfCloseTransport())
        found = scrape(stats)
        self.assertEqual(found.value("ent_relay_connections_refused_total"), 2)
        self.assertEqual(found.value("ent_relay_connections_open"), 1)
        self.assertEqual(found.value("ent_relay_connection_limit"), 1)
        return stats, {("incoming", "connection_limit"): 2}

    def udpOnTheUserStack(self):
        from ent.capture.mapping import parseExposure
        from ent.capture.userudp import UdpFlows
        from tests.test_userudp import CLIENT, FAR, SERVER_OWN, FakeReactor, fromFar

        reactor = FakeReactor()
        stats = ServiceStats("enta", reactor)
        udp = UdpFlows(
            SERVER_OWN, 1500, lambda packet: None, stats.drops, reactor, exposures=[parseExposure("53/udp")], maxFlows=1
        )
        udp.packetFromTunnel(fromFar(b"x", 1000, 53, CLIENT, FAR, flags=0x2000))
        udp.packetFromTunnel(fromFar(b"x", 1000, 53, CLIENT, FAR)[:24])
        udp.packetFromTunnel(fromFar(b"x", 1000, 54, CLIENT, FAR))
        udp.packetFromTunnel(fromFar(b"x", 1000, 53, CLIENT, FAR))
        udp.packetFromTunnel(fromFar(b"x", 1001, 53, CLIENT, FAR))
        reactor.udpPorts[0].protocol.datagramReceived(b"x" * 1500, ("127.0.0.1", 53))
        reactor.udpPorts[0].protocol.connectionRefused()
        return stats, {
            ("gateway", "udp_fragment"): 1,
            ("gateway", "udp_malformed"): 1,
            ("gateway", "udp_unreachable"): 1,
            ("gateway", "udp_flow_limit"): 1,
            ("tun", "udp_oversize"): 1,
            ("tun", "udp_send_failed"): 1,
        }

    def notIpv4OnTheUserStack(self):
        import ipaddress

        from twisted.internet.testing import MemoryReactorClock

        from ent.capture.userstack import UserStack

        reactor = MemoryReactorClock()
        stats = ServiceStats("enta", reactor)
        stack = UserStack(
            ipaddress.IPv4Interface("192.168.0.1/24"), 1500, lambda packets, size: None, stats.drops, reactor
        )
        stack.start()
        self.addCleanup(stack.close)
        stack.writePackets([bytes([0x60]) + bytes(39)])
        return stats, {("gateway", "not_ipv4"): 1}

    def test_unknownReasonRefused(self):
        stats = ServiceStats("enta", Clock())
        self.assertRaises(ValueError, stats.drops.count, "gremlins")


class CollectorTests(unittest.TestCase):
    def test_legCountersFollowTheData(self):
        clock = Clock()
        stats = ServiceStats("entg", clock)
        stats.start()
        self.addCleanup(stats.stop)
        hub = Router(stats, clock)
        agent, peer = RelayLeg(hub, "agent"), RelayLeg(hub, "peer")
        agent.makeConnection(StringTransport())
        peer.makeConnection(StringTransport())
        data = frame(ipv4(b"x" * 100)) + frame(ipv4(b"y" * 50))
        agent.dataReceived(data[:30])
        agent.dataReceived(data[30:])
        found = scrape(stats)
        self.assertEqual(found.value("ent_leg_packets_total", leg="agent", direction="received"), 2)
        self.assertEqual(found.value("ent_leg_bytes_total", leg="agent", direction="received"), len(data))
        self.assertEqual(found.value("ent_leg_packets_total", leg="peer", direction="sent"), 2)
        self.assertEqual(found.value("ent_leg_bytes_total", leg="peer", direction="sent"), len(data))
        self.assertEqual(found.value("ent_leg_up", leg="agent"), 1)
        # A second agent comes, the first goes: the leg stays up, one reconnect.
        second = RelayLeg(hub, "agent")
        second.makeConnection(StringTransport())
        agent.connectionLost(Failure(ConnectionDone()))
        found = scrape(stats)
        self.assertEqual(found.value("ent_leg_up", leg="agent"), 1)
        self.assertEqual(found.value("ent_leg_reconnects_total", leg="agent"), 1)
        self.assertEqual(found.value("ent_leg_disconnects_total", leg="agent"), 1)
        peer.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(scrape(stats).value("ent_leg_up", leg="peer"), 0)
        self.assertEqual(found.find("ent_info")[0].labels["service"], "entg")
        self.assertEqual(found.value("ent_start_time_seconds"), 0)

    def test_handshakeFailures(self):
        stats = ServiceStats("entg", Clock())
        stats.handshakeFailed("agent", "tls")
        stats.handshakeFailed("agent", "tls")
        stats.handshakeFailed("peer", "rats-tls")
        found = scrape(stats)
        self.assertEqual(found.value("ent_handshake_failures_total", leg="agent", kind="tls"), 2)
        self.assertEqual(found.value("ent_handshake_failures_total", leg="peer", kind="rats-tls"), 1)

    def test_batchHistogram(self):
        counts = [1, 5, 0, 2] + [0] * 60 + [3]  # 5 wakeups of 1, 2 of 3, 3 of 64
        family = histogramOf("h", "doc", counts)
        samples = {(s.name, s.labels.get("le")): s.value for s in family.samples}
        self.assertEqual(samples[("h_bucket", "1")], 6)
        self.assertEqual(samples[("h_bucket", "2")], 6)
        self.assertEqual(samples[("h_bucket", "4")], 8)
        self.assertEqual(samples[("h_bucket", "32")], 8)
        self.assertEqual(samples[("h_bucket", "64")], 11)
        self.assertEqual(samples[("h_bucket", "+Inf")], 11)
        self.assertEqual(samples[("h_count", None)], 11)
        self.assertEqual(samples[("h_sum", None)], 5 + 6 + 192)


class MetricsHttpTests(unittest.TestCase):
    """
    The page over real HTTP on loopback, fetched from another thread as a
    scraper would.
    """

    async def test_scrapeOverHttp(self):
        stats = ServiceStats("ent-relay", reactor)
        stats.drops.count("connection_limit", 4, leg="incoming")
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(metricsSite(stats))
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/metrics"
        text = await deferToThread(status.fetch, url, 5)
        found = status.Scrape(text)
        self.assertEqual(found.value("ent_dropped_total", leg="incoming", reason="connection_limit"), 4)
        code = await deferToThread(status.main, ["--metrics", url])
        self.assertEqual(code, status.UP)

    async def test_gatewayLegsOneByOne(self):
        """
        A gateway's legs are counted by side in the metrics, and listed one
        by one on /legs and in the status summary.
        """
        from tests.test_router import FakeIdentityTransport, packet

        stats = ServiceStats("entg", reactor)
        hub = Router(stats, reactor)
        legs = []
        for side, names in (("agent", ["client"]), ("agent", None), ("peer", None)):
            leg = RelayLeg(hub, side)
            leg.makeConnection(FakeIdentityTransport(names or []))
            legs.append(leg)
        legs[0].dataReceived(frame(packet("192.168.0.1", "10.9.0.1")))
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(metricsSite(stats))
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/metrics"
        found = status.Scrape(await deferToThread(status.fetch, url, 5))
        self.assertEqual(found.value("ent_gateway_legs", side="agent"), 2)
        self.assertEqual(found.value("ent_gateway_legs", side="peer"), 1)
        self.assertEqual(found.value("ent_gateway_addresses", side="agent"), 1)
        listed = json.loads(await deferToThread(status.fetch, status.legsUrl(url), 5))
        self.assertEqual(
            [(leg["side"], leg["identity"]) for leg in listed], [("agent", "client"), ("agent", "-"), ("peer", "-")]
        )
        lines, code = status.summary(found, url, legs=listed)
        text = "\n".join(lines)
        self.assertIn("2 agents, 1 peer", text)
        self.assertRegex(
            text,
            r"agent +\S+ +client +192\.168\.0\.1 +up 0:00:00; in 1 packet \(25 B\), "
            r"out 0 packets",
        )
        self.assertRegex(text, r"peer .*in 0 packets \(0 B\), out 1 packet \(25 B\)")
        many = status.legLines([dict(listed[0], peer=f"10.1.0.{i}:1") for i in range(60)])
        self.assertEqual(len(many), 1 + status.MAX_LEGS_SHOWN + 1)
        self.assertIn("… and 10 more", many[-1])

    def test_unreachableIsExitCode2(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        self.assertEqual(status.main(["--metrics", f"127.0.0.1:{free}", "--timeout", "2"]), status.UNREACHABLE)


EXAMPLE = """\
# TYPE ent_info gauge
ent_info{service="entg",version="0.1.0"} 1.0
ent_start_time_seconds 1000.0
# TYPE ent_leg_up gauge
ent_leg_up{leg="agent"} 1.0
ent_leg_up{leg="peer"} 0.0
# TYPE ent_leg_connections_total counter
ent_leg_connections_total{leg="agent"} 1.0
ent_leg_connections_total{leg="peer"} 3.0
# TYPE ent_leg_reconnects_total counter
ent_leg_reconnects_total{leg="peer"} 2.0
# TYPE ent_leg_packets_total counter
ent_leg_packets_total{leg="agent",direction="received"} 1234.0
# TYPE ent_leg_bytes_total counter
ent_leg_bytes_total{leg="agent",direction="received"} 2500000.0
# TYPE ent_dropped_total counter
ent_dropped_total{leg="agent",reason="other_side_not_connected"} 7.0
# TYPE ent_handshake_failures_total counter
ent_handshake_failures_total{leg="peer",kind="tls"} 2.0
"""


class StatusSummaryTests(unittest.TestCase):
    def test_degradedWhenALegIsDown(self):
        lines, code = status.summary(status.Scrape(EXAMPLE), "http://x/metrics", now=1000 + 3725)
        text = "\n".join(lines)
        self.assertEqual(code, status.DEGRADED)
        self.assertIn("entg 0.1.0, up 1:02:05", text)
        self.assertIn("peer leg    DOWN  3 connections, 2 reconnects", text)
        self.assertIn("received 1,234 packets (2.5 MB)", text)
        self.assertIn("7  agent    other_side_not_connected", text)
        self.assertIn("2 failed (peer tls: 2)", text)
        self.assertEqual(lines[-1], "status: DEGRADED (down: peer)")

    def test_urls(self):
        self.assertEqual(status.metricsUrl("10.0.0.1:9100"), "http://10.0.0.1:9100/metrics")
        self.assertEqual(status.metricsUrl("http://h:1/other"), "http://h:1/other")


class JsonLogTests(unittest.TestCase):
    def test_structuredFieldsAndFailures(self):
        out = io.StringIO()
        log = Logger(namespace="ent.test", observer=JsonLinesObserver(out))
        log.warn(
            "lost {leg} {peer}: {reason}",
            leg="gateway",
            peer="10.1.0.2:6980",
            reason="Connection refused",
            where=object(),
        )
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("broken while relaying", leg="peer")
        first, second = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(first["level"], "warn")
        self.assertEqual(first["namespace"], "ent.test")
        self.assertEqual(first["message"], "lost gateway 10.1.0.2:6980: Connection refused")
        self.assertEqual(
            (first["leg"], first["peer"], first["reason"]), ("gateway", "10.1.0.2:6980", "Connection refused")
        )
        self.assertTrue(first["where"].startswith("<object object"))
        self.assertRegex(first["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")
        self.assertEqual(second["level"], "critical")
        self.assertEqual(second["leg"], "peer")
        self.assertIn("ZeroDivisionError", second["traceback"])
        self.assertIn("division by zero", second["error"])

    def test_levelsOfLegacyEvents(self):
        record = eventAsRecord(
            {
                "message": ("legacy",),
                "isError": 0,
                "system": "-",
                "log_time": 0,
                "log_format": "legacy",
                "log_level": LogLevel.info,
            }
        )
        self.assertEqual((record["level"], record["message"]), ("info", "legacy"))

    def test_observerGoesWhereTwistdWouldWrite(self):
        import sys

        self.assertIs(observerFor({"nodaemon": True, "logfile": None}).outFile, sys.stdout)
        self.assertIs(observerFor({"logfile": "-"}).outFile, sys.stdout)
        path = self.mktemp()
        observer = observerFor({"nodaemon": True, "logfile": path})
        self.addCleanup(observer.outFile.close)
        observer({"log_format": "to a file", "log_time": 0, "log_level": LogLevel.info, "n": 1})
        with open(path) as f:
            self.assertEqual(json.loads(f.read())["n"], 1)


class CommandTests(unittest.TestCase):
    def test_pythonMinusEnt(self):
        from ent.__main__ import main

        self.patch(sys, "stderr", io.StringIO())
        self.patch(sys, "stdout", io.StringIO())
        self.assertEqual(self.assertRaises(SystemExit, main, []).code, 2)
        self.assertEqual(self.assertRaises(SystemExit, main, ["nonsense"]).code, 2)
        self.assertEqual(main(["--help"]), 0)
        self.assertIn("status", sys.stdout.getvalue())


class ContainmentStatusTests(unittest.TestCase):
    def test_containmentDropsShown(self):
        scrape = status.Scrape(
            EXAMPLE
            + (
                "# TYPE ent_tunnel_dropped_total counter\n"
                'ent_tunnel_dropped_total{hook="input"} 12.0\n'
                'ent_tunnel_dropped_total{hook="forward"} 3.0\n'
            )
        )
        text = "\n".join(status.summary(scrape, "http://x/metrics", now=2000)[0])
        self.assertIn("containment       15 packets from the tunnel dropped (12 input, 3 forward)", text)

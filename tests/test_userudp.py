"""
UDP of the user-space stack (L{ent.capture.userudp}): packets, checksums and flow
tables against fakes, with a clock; the real thing through the four-host
tunnel is in L{tests.test_userstack}.
"""

import ipaddress
import os
import struct
import sys

from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.trial import unittest

from ent.capture.mapping import parseExposure, parseListen
from ent.capture.userudp import UdpFlows, onesSum, parseUdp, udpChecksum, udpPacket
from ent.errors import UserStackError
from ent.observability.stats import DropReporter
from ent.protocols.packets import checksum
from ent.testing.topology import ADDRESS
from tests.checks import METRICS, scrapeIn
from tests.netns import requireRoot
from tests.test_exposure import UDP_ECHO, udpProbe
from tests.test_userstack import USER_CLIENT, RootlessMixin

OWN = ipaddress.IPv4Interface("192.168.0.1/24")
SERVER_OWN = ipaddress.IPv4Interface("192.168.0.254/24")
FAR = ipaddress.IPv4Address("192.168.0.254").packed
CLIENT = ipaddress.IPv4Address("192.168.0.1").packed

# Sent by Linux through a TUN: 192.168.0.1:49153 -> 192.168.0.254:5353,
# DF set, IP id 0xb0e9 (see the test for how it was made).
KERNEL_PACKET = bytes.fromhex(
    "45000043b0e9400040110771c0a80001c0a800fec00114e9002faa92"
    "68656c6c6f2c20454e543a20612055445020646174616772616d206f66206f64642073697a6521"
)


class FakeUdpPort:
    def __init__(self, reactor, port, protocol, interface, maxPacketSize):
        self.reactor = reactor
        self.port = port
        self.protocol = protocol
        self.interface = interface
        self.maxPacketSize = maxPacketSize
        self.written = []
        self.connected = None
        self.reading = True
        self.listening = True
        protocol.makeConnection(self)

    def write(self, data, addr=None):
        if self.reactor.failWrites:
            raise OSError(105, "No buffer space available")
        self.written.append((data, addr))

    def connect(self, host, port):
        self.connected = (host, port)

    def stopListening(self):
        self.listening = False
        self.reading = False

    def stopReading(self):
        self.reading = False

    def startReading(self):
        self.reading = True


class FakeReactor(Clock):
    """
    A clock whose listenUDP records fake ports; C{taken} ports refuse.
    """

    def __init__(self):
        Clock.__init__(self)
        self.udpPorts = []
        self.taken = set()
        self.failWrites = False

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        if port in self.taken:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        fake = FakeUdpPort(self, port, protocol, interface, maxPacketSize)
        self.udpPorts.append(fake)
        return fake


def referenceUdpChecksum(source, destination, segment):
    """
    The UDP checksum by the book, with L{ent.packets.checksum}.
    """
    pseudo = source + destination + struct.pack(">BBH", 0, 17, len(segment))
    return checksum(pseudo + segment) or 0xFFFF


def verifies(packet):
    """
    Whether C{packet}'s IPv4 and UDP checksums are right, as a receiving
    kernel checks them.
    """
    header = packet[:20]
    segment = packet[20:]
    pseudo = packet[12:20] + struct.pack(">BBH", 0, 17, len(segment))
    return checksum(header) == 0 and checksum(pseudo + segment) == 0


def fromFar(data, sourcePort, destinationPort, source=FAR, destination=CLIENT, flags=0):
    packet = bytearray(udpPacket(source, sourcePort, destination, destinationPort, data, 7))
    if flags:
        packet[6:8] = struct.pack(">H", flags)
        packet[10:12] = b"\0\0"
        packet[10:12] = struct.pack(">H", checksum(bytes(packet[:20])))
    return bytes(packet)


class ChecksumTests(unittest.TestCase):
    def test_onesSumMatchesRfc1071(self):
        """
        The big-integer sum agrees with the word-by-word one, the edge
        cases included (all zeros, all ones, odd lengths).
        """
        samples = [b"", b"\0", b"\0\0\0\0", b"\xff\xff", b"\xff" * 7, b"\x01", b"\xff\xfe\x00\x01"]
        samples += [os.urandom(n) for n in range(1, 200)] + [os.urandom(1473), os.urandom(65507)]
        for data in samples:
            self.assertEqual(~onesSum(data) & 0xFFFF, checksum(data), data[:16].hex())

    def test_kernelPacket(self):
        """
        The UDP segment is byte for byte the one Linux sent for the same
        datagram (captured from a TUN in a scratch namespace); the IPv4
        header differs only in DF, and its checksum verifies.
        """
        data = KERNEL_PACKET[28:]
        packet = udpPacket(CLIENT, 49153, FAR, 5353, data, ident=0xB0E9)
        self.assertEqual(packet[20:], KERNEL_PACKET[20:])
        self.assertEqual(packet[:6], KERNEL_PACKET[:6])
        self.assertEqual(packet[6:8], b"\0\0", "DF clear")
        self.assertEqual(packet[8:10], KERNEL_PACKET[8:10])
        self.assertEqual(packet[12:20], KERNEL_PACKET[12:20])
        self.assertEqual(checksum(packet[:20]), 0)
        self.assertTrue(verifies(KERNEL_PACKET))

    def test_checksumAgainstReference(self):
        for size in (0, 1, 2, 3, 100, 1371, 1472):
            data = os.urandom(size)
            packet = udpPacket(CLIENT, 50000, FAR, 5353, data)
            self.assertTrue(verifies(packet), size)
            segment = bytearray(packet[20:])
            sent = struct.unpack(">H", segment[6:8])[0]
            segment[6:8] = b"\0\0"
            self.assertEqual(sent, referenceUdpChecksum(CLIENT, FAR, bytes(segment)))

    def test_zeroChecksumSentAsOnes(self):
        """
        A checksum that computes to 0 is sent as 0xFFFF (0 means none).
        """
        # Data whose sum makes the checksum 0: find the two bytes that do it.
        base = udpPacket(CLIENT, 50000, FAR, 5353, b"\0\0")
        value = struct.unpack(">H", base[26:28])[0]
        data = struct.pack(">H", value)
        self.assertEqual(udpChecksum(CLIENT, FAR, base[20:26] + b"\0\0" + data), 0xFFFF)
        self.assertTrue(verifies(udpPacket(CLIENT, 50000, FAR, 5353, data)))


class ParseTests(unittest.TestCase):
    def test_roundTrip(self):
        datagram, problem = parseUdp(KERNEL_PACKET)
        self.assertIsNone(problem)
        self.assertEqual(
            (datagram.source, datagram.sourcePort, datagram.destination, datagram.destinationPort),
            (CLIENT, 49153, FAR, 5353),
        )
        self.assertEqual(datagram.data, KERNEL_PACKET[28:])

    def test_fragments(self):
        for flags in (0x2000, 0x0001, 0x2010):
            self.assertEqual(parseUdp(fromFar(b"x" * 20, 5353, 50000, flags=flags)), (None, "udp_fragment"))
        # DF alone is no fragment.
        self.assertIsNone(parseUdp(fromFar(b"x", 5353, 50000, flags=0x4000))[1])

    def test_badChecksum(self):
        packet = bytearray(fromFar(b"payload", 5353, 50000))
        packet[-1] ^= 1
        self.assertEqual(parseUdp(bytes(packet)), (None, "udp_malformed"))

    def test_noChecksum(self):
        packet = bytearray(fromFar(b"payload", 5353, 50000))
        packet[26:28] = b"\0\0"
        self.assertEqual(parseUdp(bytes(packet))[0].data, b"payload")

    def test_badLengths(self):
        packet = fromFar(b"payload", 5353, 50000)
        self.assertEqual(parseUdp(packet[:24])[1], "udp_malformed")
        tooLong = bytearray(packet)
        tooLong[24:26] = struct.pack(">H", 100)
        self.assertEqual(parseUdp(bytes(tooLong))[1], "udp_malformed")
        self.assertEqual(parseUdp(fromFar(b"x", 0, 50000))[1], "udp_malformed")


class FlowsMixin:
    def flows(self, interface=OWN, listens=(), exposures=(), **kwargs):
        self.reactor = FakeReactor()
        self.drops = DropReporter(self.reactor, "enta")
        self.emitted = []
        flows = UdpFlows(
            interface,
            1500,
            self.emitted.append,
            self.drops,
            self.reactor,
            listens=listens,
            exposures=exposures,
            **kwargs,
        )
        flows.start()
        return flows

    def dropped(self):
        return {reason: n for (leg, reason), n in self.drops.total.items()}


class ClientFlowTests(FlowsMixin, unittest.TestCase):
    def setUp(self):
        self.udp = self.flows(listens=[parseListen("5353/udp=192.168.0.254:53")])
        [self.port] = self.reactor.udpPorts
        self.app = self.port.protocol

    def test_listens(self):
        self.assertEqual((self.port.port, self.port.interface), (5353, "127.0.0.1"))
        self.assertGreaterEqual(self.port.maxPacketSize, 65535)

    def test_portTaken(self):
        self.reactor.taken.add(5353)
        udp = UdpFlows(
            OWN, 1500, self.emitted.append, self.drops, self.reactor, listens=[parseListen("5353/udp=192.168.0.254:53")]
        )
        error = self.assertRaises(UserStackError, udp.start)
        self.assertIn("--listen 5353/udp=192.168.0.254:53", str(error))

    def test_datagramOut(self):
        self.app.datagramReceived(b"question", ("127.0.0.1", 40000))
        [packet] = self.emitted
        self.assertTrue(verifies(packet))
        self.assertEqual(packet[6:8], b"\0\0")
        self.assertEqual(packet[8], 64)
        datagram = parseUdp(packet)[0]
        self.assertEqual((datagram.source, datagram.destination, datagram.destinationPort), (CLIENT, FAR, 53))
        self.assertGreaterEqual(datagram.sourcePort, 49152)
        self.assertEqual(datagram.data, b"question")

    def test_flowPerAppSource(self):
        self.app.datagramReceived(b"a", ("127.0.0.1", 40000))
        self.app.datagramReceived(b"b", ("127.0.0.1", 40000))
        self.app.datagramReceived(b"c", ("127.0.0.1", 40001))
        ports = [parseUdp(p)[0].sourcePort for p in self.emitted]
        self.assertEqual(ports[0], ports[1])
        self.assertNotEqual(ports[0], ports[2])
        self.assertEqual(len(self.udp.clientFlows), 2)

    def test_replyToTheApp(self):
        self.app.datagramReceived(b"question", ("127.0.0.1", 40000))
        self.app.datagramReceived(b"question", ("127.0.0.1", 40001))
        tunnelPort = parseUdp(self.emitted[1])[0].sourcePort
        self.udp.packetFromTunnel(fromFar(b"answer", 53, tunnelPort))
        self.assertEqual(self.port.written, [(b"answer", ("127.0.0.1", 40001))])
        self.assertEqual(self.dropped(), {})

    def test_replyFromElsewhereDropped(self):
        """
        Only the far service of the flow answers it: another far port or
        address, or another port of this agent, is dropped and counted.
        """
        self.app.datagramReceived(b"question", ("127.0.0.1", 40000))
        tunnelPort = parseUdp(self.emitted[0])[0].sourcePort
        self.udp.packetFromTunnel(fromFar(b"x", 54, tunnelPort))
        self.udp.packetFromTunnel(fromFar(b"x", 53, tunnelPort, source=bytes([192, 168, 0, 9])))
        self.udp.packetFromTunnel(fromFar(b"x", 53, tunnelPort + 1))
        self.udp.packetFromTunnel(fromFar(b"x", 53, tunnelPort, destination=bytes([192, 168, 0, 2])))
        self.assertEqual(self.port.written, [])
        self.assertEqual(self.dropped(), {"udp_unreachable": 4})

    def test_idleExpiry(self):
        self.app.datagramReceived(b"a", ("127.0.0.1", 40000))
        tunnelPort = parseUdp(self.emitted[0])[0].sourcePort
        self.reactor.advance(50)
        self.udp.packetFromTunnel(fromFar(b"answer", 53, tunnelPort))
        self.reactor.advance(50)
        self.assertEqual(len(self.udp.clientFlows), 1, "a reply keeps the flow")
        self.reactor.advance(11)
        self.assertEqual(self.udp.clientFlows, {})
        self.assertEqual(self.udp.byTunnelPort, {})
        self.assertEqual(self.udp.counters["flowsExpired"], 1)
        self.udp.packetFromTunnel(fromFar(b"late", 53, tunnelPort))
        self.assertEqual(self.dropped(), {"udp_unreachable": 1})
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_bound(self):
        udp = self.flows(listens=[parseListen("5353/udp=192.168.0.254:53")], maxFlows=3)
        app = self.reactor.udpPorts[0].protocol
        for port in range(40000, 40005):
            app.datagramReceived(b"x", ("127.0.0.1", port))
        self.assertEqual(len(udp.clientFlows), 3)
        self.assertEqual(len(self.emitted), 3)
        self.assertEqual(self.dropped(), {"udp_flow_limit": 2})
        self.reactor.advance(61)
        app.datagramReceived(b"x", ("127.0.0.1", 40004))
        self.assertEqual(len(udp.clientFlows), 1)

    def test_portsWrapAndSkipUsed(self):
        udp = self.flows(listens=[parseListen("5353/udp=192.168.0.254:53")], ephemeral=(60000, 60002))
        app = self.reactor.udpPorts[0].protocol
        for port in range(40000, 40004):
            app.datagramReceived(b"x", ("127.0.0.1", port))
        self.assertEqual(sorted(udp.byTunnelPort), [60000, 60001, 60002])
        self.assertEqual(self.dropped(), {"udp_flow_limit": 1})

    def test_oversize(self):
        self.app.datagramReceived(b"x" * 1473, ("127.0.0.1", 40000))
        self.assertEqual(self.emitted, [])
        self.assertEqual(self.dropped(), {"udp_oversize": 1})
        self.app.datagramReceived(b"x" * 1472, ("127.0.0.1", 40000))
        self.assertEqual(len(self.emitted[0]), 1500)

    def test_pauseAndStop(self):
        self.udp.pauseProducing()
        self.assertFalse(self.port.reading)
        self.udp.resumeProducing()
        self.assertTrue(self.port.reading)
        self.app.datagramReceived(b"x", ("127.0.0.1", 40000))
        self.udp.stop()
        self.assertFalse(self.port.listening)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class ServerFlowTests(FlowsMixin, unittest.TestCase):
    def setUp(self):
        self.udp = self.flows(SERVER_OWN, exposures=[parseExposure("5353/udp"), parseExposure("53/udp=10.0.0.5:5300")])

    def fromClient(self, data, destinationPort, sourcePort=50000, source=CLIENT):
        self.udp.packetFromTunnel(fromFar(data, sourcePort, destinationPort, source=source, destination=FAR))

    def test_toTheService(self):
        self.fromClient(b"question", 5353)
        [sock] = self.reactor.udpPorts
        self.assertEqual((sock.port, sock.interface, sock.connected), (0, "127.0.0.1", ("127.0.0.1", 5353)))
        self.assertEqual(sock.written, [(b"question", None)])
        self.fromClient(b"again", 5353)
        self.assertEqual(len(self.reactor.udpPorts), 1)
        self.fromClient(b"other", 53)
        self.assertEqual(self.reactor.udpPorts[1].connected, ("10.0.0.5", 5300))
        self.assertEqual(self.reactor.udpPorts[1].interface, "")

    def test_replies(self):
        self.fromClient(b"question", 5353, sourcePort=50001)
        self.fromClient(b"question", 5353, sourcePort=50002)
        self.reactor.udpPorts[1].protocol.datagramReceived(b"answer", ("127.0.0.1", 5353))
        [packet] = self.emitted
        self.assertTrue(verifies(packet))
        datagram = parseUdp(packet)[0]
        self.assertEqual(
            (datagram.source, datagram.sourcePort, datagram.destination, datagram.destinationPort),
            (FAR, 5353, CLIENT, 50002),
        )
        self.assertEqual(datagram.data, b"answer")

    def test_notExposedDropped(self):
        self.fromClient(b"x", 5354)
        self.fromClient(b"x", 7)
        self.assertEqual(self.reactor.udpPorts, [])
        self.assertEqual(self.dropped(), {"udp_unreachable": 2})

    def test_fragmentDropped(self):
        self.udp.packetFromTunnel(fromFar(b"x" * 100, 50000, 5353, destination=FAR, flags=0x2000))
        self.assertEqual(self.reactor.udpPorts, [])
        self.assertEqual(self.dropped(), {"udp_fragment": 1})

    def test_idleExpiry(self):
        self.fromClient(b"x", 5353)
        [sock] = self.reactor.udpPorts
        self.reactor.advance(59)
        sock.protocol.datagramReceived(b"answer", ("127.0.0.1", 5353))
        self.reactor.advance(59)
        self.assertTrue(sock.listening)
        self.reactor.advance(2)
        self.assertFalse(sock.listening)
        self.assertEqual(self.udp.serverFlows, {})
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_bound(self):
        udp = self.flows(SERVER_OWN, exposures=[parseExposure("5353/udp")], maxFlows=2)
        for port in range(50000, 50004):
            udp.packetFromTunnel(fromFar(b"x", port, 5353, source=CLIENT, destination=FAR))
        self.assertEqual(len(udp.serverFlows), 2)
        self.assertEqual(self.dropped(), {"udp_flow_limit": 2})

    def test_oversizedReplyAndFailedSend(self):
        self.fromClient(b"x", 5353)
        [sock] = self.reactor.udpPorts
        sock.protocol.datagramReceived(b"y" * 1473, ("127.0.0.1", 5353))
        self.assertEqual(self.emitted, [])
        self.reactor.failWrites = True
        self.fromClient(b"x", 5353)
        sock.protocol.connectionRefused()
        self.assertEqual(self.dropped(), {"udp_oversize": 1, "udp_send_failed": 2})

    def test_pauseCoversFlows(self):
        self.fromClient(b"x", 5353)
        self.udp.pauseProducing()
        self.fromClient(b"x", 53)
        self.assertEqual([s.reading for s in self.reactor.udpPorts], [False, False])
        self.udp.resumeProducing()
        self.assertEqual([s.reading for s in self.reactor.udpPorts], [True, True])

    def test_stop(self):
        self.fromClient(b"x", 5353)
        self.udp.stop()
        self.assertFalse(self.reactor.udpPorts[0].listening)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


# The real thing: four namespaces, agents as nobody.

UDP_ROUND_TRIPS = r"""
import os, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# Two app sockets, two flows through the tunnel.
sockets = []
for _ in range(2):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect((host, port))
    sockets.append(s)
ok = retries = 0
for i in range(count):
    s = sockets[i % 2]
    payload = (b"%d " % i + os.urandom(1400))[:1 + (i * 137) % 1400]
    for attempt in range(3):
        s.send(payload)
        try:
            if s.recv(65535) == payload:
                ok += 1
            break
        except socket.timeout:
            retries += 1
print(f"{ok} of {count} round trips, {retries} retries")
"""


def serverListening(topology, port):
    return lambda: f":{port} " in topology.exec("server", "ss", "-lun").stdout


class UdpThroughUserStackMixin(RootlessMixin):
    def startEcho(self, *ports):
        for port in ports:
            self.t.start("server", sys.executable, "-u", "-c", UDP_ECHO, str(port), name=f"udp-echo-{port}")
            self.t.waitFor(serverListening(self.t, port))

    def echoLog(self, port):
        with open(os.path.join(self.tunnel.logdir, f"udp-echo-{port}.log"), errors="replace") as f:
            return f.read()

    def roundTrips(self, host, port, count=100):
        result = self.t.exec("client", sys.executable, "-c", UDP_ROUND_TRIPS, host, str(port), str(count), timeout=120)
        return result.stdout.strip() + result.stderr


class RootlessUdpClientTests(UdpThroughUserStackMixin, unittest.TestCase):
    """
    A rootless client agent carries an app's datagrams to a UDP service
    behind a TUN server agent, and the replies back.
    """

    def setUp(self):
        requireRoot(self)
        client = [*USER_CLIENT, "--listen", "5353/udp=192.168.0.254:5353"]
        server = ["--expose", "6978=7", "--expose", "5353/udp"]
        self.startTunnel(
            roleArgs={"client": client, "server": server}, unprivileged=["client"], hostArgs={"client": METRICS}
        )
        self.startEcho(5353)

    def test_echo(self):
        self.assertUnprivileged("client")
        result = self.roundTrips("127.0.0.1", 5353)
        self.assertTrue(result.startswith("100 of 100 round trips"), result + self.tunnel.logs())
        self.assertIn("datagram from 192.168.0.1", self.echoLog(5353), "the service sees the tunnel address")
        # The TCP listen still works beside it.
        self.assertEqual(self.tunnel.echoClient(1000).returncode, 0)
        scrape = scrapeIn(self.t, "client")
        self.assertEqual([s for s in scrape.find("ent_dropped_total") if s.labels["reason"].startswith("udp")], [])


class RootlessUdpServerTests(UdpThroughUserStackMixin, unittest.TestCase):
    """
    A TUN client agent reaches a UDP service behind a rootless server
    agent; a UDP port it does not expose is not reached.
    """

    def setUp(self):
        requireRoot(self)
        client = [
            "--dport",
            "7",
            "--map",
            f"{ADDRESS['server']}:5353/udp=192.168.0.254:5353",
            "--map",
            f"{ADDRESS['server']}:5354/udp=192.168.0.254:5354",
        ]
        server = ["--stack", "user", "--expose", "6978=7", "--expose", "5353/udp"]
        self.startTunnel(
            roleArgs={"client": client, "server": server}, unprivileged=["server"], hostArgs={"server": METRICS}
        )
        self.startEcho(5353, 5354)

    def test_echo(self):
        self.assertUnprivileged("server")
        result = self.roundTrips(ADDRESS["server"], 5353)
        self.assertTrue(result.startswith("100 of 100 round trips"), result + self.tunnel.logs())
        self.assertIn("datagram from 127.0.0.1", self.echoLog(5353))

    def test_notExposedIsUnreachable(self):
        """
        Port 5354 has a listener on the server host and the client maps
        it into the tunnel, but the rootless agent does not expose it.
        """
        self.assertEqual(udpProbe(self.t, "client", ADDRESS["server"], 5354), "timed out")
        self.assertNotIn("datagram from", self.echoLog(5354))
        scrape = scrapeIn(self.t, "server")
        self.assertGreaterEqual(scrape.value("ent_dropped_total", leg="gateway", reason="udp_unreachable"), 1)
        self.assertEqual(udpProbe(self.t, "client", ADDRESS["server"], 5353), "answered")

"""
UDP for the user-space stack, done here rather than by libslirp: slirp's
restricted mode drops UDP in the server role, and its guest forwards carry
TCP only.

Client role (C{--listen PORT/udp=TUNADDR:PORT}): each app source address
seen on a local UDP port becomes a flow with a tunnel source port of its
own; its datagrams leave as IPv4/UDP packets from the tunnel address, and
what comes back from TUNADDR:PORT to that port goes back to the app.
Server role (C{--expose TUNPORT/udp}): each far sender of an exposed port
gets a connected UDP socket to the local service; the service's replies go
back as packets from the tunnel address and TUNPORT.  Nothing else from
the tunnel reaches anything: it is dropped and counted.

Flows end after an idle time; their number is bounded.  Nothing is logged
per packet: drops are counted (L{ent.stats.DropReporter}), flows in
L{UdpFlows.counters}.
"""

import ipaddress
import struct

from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol

from ent.errors import UserStackError

UDP = 17
IP_HEADER = 20
UDP_HEADER = 8
TTL = 64
# Tunnel source ports of client flows: the IANA dynamic range.
EPHEMERAL = (49152, 65535)
IDLE_TIMEOUT = 60.0
MAX_FLOWS = 1024
# Read whole datagrams off local sockets, so that an oversized one is seen
# (and counted) instead of being cut short by Twisted's 8192 default.
MAX_DATAGRAM = 65535

_HEADERS = struct.Struct(">BBHHHBBH4s4sHHHH")
_PORTS = struct.Struct(">HHH")


def onesSum(data):
    """
    The 16-bit one's complement sum of C{data} (odd lengths padded with a
    zero byte), in one big-integer operation: 2**16 is 1 modulo 0xFFFF.
    """
    if len(data) % 2:
        data += b"\0"
    if not data:
        return 0
    total = int.from_bytes(data, "big") % 0xFFFF
    # A non-zero sum that is a multiple of 0xFFFF is 0xFFFF, not 0.
    if total == 0 and data.count(0) != len(data):
        return 0xFFFF
    return total


def internetChecksum(data):
    """
    The Internet checksum (RFC 1071) of C{data}: 0 when C{data} holds a
    correct one.
    """
    return ~onesSum(data) & 0xFFFF


def _fold(total):
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def udpChecksum(source, destination, segment):
    """
    The UDP checksum of C{segment} (header with a zero checksum, and data)
    from C{source} to C{destination} (packed IPv4): 0 is sent as 0xFFFF,
    since 0 means none.
    """
    pseudo = source + destination + struct.pack(">BBH", 0, UDP, len(segment))
    value = ~_fold(onesSum(pseudo) + onesSum(segment)) & 0xFFFF
    return value or 0xFFFF


def udpPacket(source, sourcePort, destination, destinationPort, data, ident=0):
    """
    An IPv4/UDP packet (no options, DF clear, TTL 64) carrying C{data};
    addresses packed.
    """
    length = UDP_HEADER + len(data)
    total = IP_HEADER + length
    header = bytearray(
        _HEADERS.pack(
            0x45, 0, total, ident & 0xFFFF, 0, TTL, UDP, 0, source, destination, sourcePort, destinationPort, length, 0
        )
    )
    header[10:12] = struct.pack(">H", ~onesSum(bytes(header[:IP_HEADER])) & 0xFFFF)
    header[26:28] = struct.pack(">H", udpChecksum(source, destination, bytes(header[IP_HEADER:]) + data))
    return bytes(header) + data


class Datagram:
    """
    What L{parseUdp} makes of a packet from the tunnel.
    """

    __slots__ = ("source", "sourcePort", "destination", "destinationPort", "data")

    def __init__(self, source, sourcePort, destination, destinationPort, data):
        self.source = source
        self.sourcePort = sourcePort
        self.destination = destination
        self.destinationPort = destinationPort
        self.data = data


def parseUdp(packet):
    """
    C{(datagram, None)} for a well-formed, unfragmented IPv4/UDP packet, or
    C{(None, reason)} with the drop reason.  The IPv4 header itself has been
    checked by L{ent.packets.wellFormed}.
    """
    start = (packet[0] & 0x0F) * 4
    if packet[6] & 0x3F or packet[7]:
        return None, "udp_fragment"
    if len(packet) < start + UDP_HEADER:
        return None, "udp_malformed"
    sourcePort, destinationPort, length = _PORTS.unpack_from(packet, start)
    if length < UDP_HEADER or start + length > len(packet) or destinationPort == 0 or sourcePort == 0:
        return None, "udp_malformed"
    segment = packet[start : start + length]
    if segment[6:8] != b"\0\0":
        pseudo = packet[12:20] + struct.pack(">BBH", 0, UDP, length)
        if _fold(onesSum(pseudo) + onesSum(segment)) != 0xFFFF:
            return None, "udp_malformed"
    return Datagram(packet[12:16], sourcePort, packet[16:20], destinationPort, segment[UDP_HEADER:]), None


class _Flow:
    """
    One flow: its idle timer checks the last use when it fires, so a busy
    flow costs one timestamp per datagram, not a timer reset.
    """

    def __init__(self, key, now):
        self.key = key
        self.lastUsed = now
        self.timer = None


class _ClientFlow(_Flow):
    def __init__(self, key, now, listen, appAddress, tunnelPort, transport):
        _Flow.__init__(self, key, now)
        self.listen = listen
        self.appAddress = appAddress
        self.tunnelPort = tunnelPort
        self.transport = transport
        self.far = ipaddress.IPv4Address(listen.tunAddress).packed


class _ServerFlow(_Flow, DatagramProtocol):
    """
    A far sender's flow to an exposed service, over a connected socket of
    its own, so that the service's replies tell which sender they are for.
    """

    def __init__(self, key, now, flows, exposure, far, farPort):
        _Flow.__init__(self, key, now)
        self.flows = flows
        self.exposure = exposure
        self.far = far
        self.farPort = farPort
        self.port = None

    def datagramReceived(self, data, addr):
        self.flows._fromService(self, data)

    def connectionRefused(self):
        # The service is down: the datagram is lost, as it would be on a
        # host whose port is closed.
        self.flows._count("udp_send_failed", leg="tun")


class _ListenProtocol(DatagramProtocol):
    """
    An app's datagrams to one C{--listen .../udp} port.
    """

    def __init__(self, flows, listen):
        self.flows = flows
        self.listen = listen

    def datagramReceived(self, data, addr):
        self.flows._fromApp(self, data, addr)


class UdpFlows:
    """
    The UDP side of one L{ent.capture.userstack.UserStack}.

    C{interface} is the agent's tunnel address; C{listens} and
    C{exposures} are those of proto udp; C{emit(packet)} sends a packet
    into the tunnel; C{drops} is a L{ent.stats.DropReporter}.
    """

    def __init__(
        self,
        interface,
        mtu,
        emit,
        drops,
        reactor,
        listens=(),
        exposures=(),
        idleTimeout=IDLE_TIMEOUT,
        maxFlows=MAX_FLOWS,
        ephemeral=EPHEMERAL,
    ):
        self.interface = interface
        self.own = interface.ip.packed
        self.mtu = mtu
        self.emit = emit
        self.drops = drops
        self.reactor = reactor
        self.listens = tuple(listens)
        self.exposures = {e.tunPort: e for e in exposures}
        self.idleTimeout = idleTimeout
        self.maxFlows = maxFlows
        self.ephemeral = ephemeral
        self.ports = []
        self.clientFlows = {}
        self.byTunnelPort = {}
        self.serverFlows = {}
        self.counters = {"flowsOpened": 0, "flowsExpired": 0, "datagramsIn": 0, "datagramsOut": 0}
        self.paused = False
        self._nextPort = ephemeral[0]
        self._ident = 0

    @property
    def maxData(self):
        """
        The largest datagram one unfragmented packet carries.
        """
        return self.mtu - IP_HEADER - UDP_HEADER

    def start(self):
        """
        Listen on the local ports of the client role; a port that is taken
        is refused in one line naming the flag.
        """
        for listen in self.listens:
            try:
                port = self.reactor.listenUDP(
                    listen.port,
                    _ListenProtocol(self, listen),
                    interface=listen.address or "",
                    maxPacketSize=MAX_DATAGRAM,
                )
            except CannotListenError as e:
                raise UserStackError(
                    f"{listen.flag}: cannot listen on {listen.address}:{listen.port} ({e.socketError})"
                )
            self.ports.append(port)

    def stop(self):
        """
        Close every local socket and forget every flow.
        """
        for flow in [*self.clientFlows.values(), *self.serverFlows.values()]:
            self._forget(flow)
        ports, self.ports = self.ports, []
        for port in ports:
            port.stopListening()

    def pauseProducing(self):
        """
        Read no more from local sockets while the tunnel is full.
        """
        self.paused = True
        for port in self._readers():
            port.stopReading()

    def resumeProducing(self):
        self.paused = False
        for port in self._readers():
            port.startReading()

    def _readers(self):
        return [*self.ports, *(f.port for f in self.serverFlows.values() if f.port is not None)]

    def _count(self, reason, n=1, leg="gateway"):
        self.drops.count(reason, n, leg=leg)

    # From the tunnel

    def packetFromTunnel(self, packet):
        """
        Take one IPv4 packet of protocol UDP from the tunnel: to a flow,
        to an exposure, or dropped and counted.
        """
        datagram, problem = parseUdp(packet)
        if problem is not None:
            self._count(problem)
            return
        if datagram.destination != self.own:
            self._count("udp_unreachable")
            return
        flow = self.byTunnelPort.get(datagram.destinationPort)
        if flow is not None:
            if datagram.source != flow.far or datagram.sourcePort != flow.listen.tunPort:
                self._count("udp_unreachable")
                return
            flow.lastUsed = self.reactor.seconds()
            self.counters["datagramsIn"] += 1
            try:
                flow.transport.write(datagram.data, flow.appAddress)
            except OSError:
                self._count("udp_send_failed", leg="tun")
            return
        exposure = self.exposures.get(datagram.destinationPort)
        if exposure is None:
            self._count("udp_unreachable")
            return
        key = (datagram.source, datagram.sourcePort, datagram.destinationPort)
        flow = self.serverFlows.get(key)
        if flow is None:
            flow = self._openServerFlow(key, exposure, datagram)
            if flow is None:
                return
        flow.lastUsed = self.reactor.seconds()
        self.counters["datagramsIn"] += 1
        try:
            flow.port.write(datagram.data)
        except OSError:
            self._count("udp_send_failed", leg="tun")

    def _openServerFlow(self, key, exposure, datagram):
        if len(self.serverFlows) >= self.maxFlows:
            self._count("udp_flow_limit")
            return None
        host = exposure.host or "127.0.0.1"
        flow = _ServerFlow(key, self.reactor.seconds(), self, exposure, datagram.source, datagram.sourcePort)
        try:
            flow.port = self.reactor.listenUDP(
                0, flow, interface="127.0.0.1" if host.startswith("127.") else "", maxPacketSize=MAX_DATAGRAM
            )
            flow.port.connect(host, exposure.port)
        except (CannotListenError, OSError):
            if flow.port is not None:
                flow.port.stopListening()
            self._count("udp_send_failed", leg="tun")
            return None
        if self.paused:
            flow.port.stopReading()
        self.serverFlows[key] = flow
        self._opened(flow)
        return flow

    def _fromService(self, flow, data):
        if len(data) > self.maxData:
            self._count("udp_oversize", leg="tun")
            return
        flow.lastUsed = self.reactor.seconds()
        self.counters["datagramsOut"] += 1
        self.emit(self._packet(self.own, flow.exposure.tunPort, flow.far, flow.farPort, data))

    # From the app (client role)

    def _fromApp(self, protocol, data, address):
        if len(data) > self.maxData:
            self._count("udp_oversize", leg="tun")
            return
        key = (protocol.listen.port, protocol.listen.address, address)
        flow = self.clientFlows.get(key)
        if flow is None:
            tunnelPort = self._allocatePort() if len(self.clientFlows) < self.maxFlows else None
            if tunnelPort is None:
                self._count("udp_flow_limit", leg="tun")
                return
            flow = _ClientFlow(key, self.reactor.seconds(), protocol.listen, address, tunnelPort, protocol.transport)
            self.clientFlows[key] = flow
            self.byTunnelPort[tunnelPort] = flow
            self._opened(flow)
        flow.lastUsed = self.reactor.seconds()
        self.counters["datagramsOut"] += 1
        self.emit(self._packet(self.own, flow.tunnelPort, flow.far, flow.listen.tunPort, data))

    def _allocatePort(self):
        """
        The next free tunnel source port of the ephemeral range, or C{None}.
        """
        low, high = self.ephemeral
        span = high - low + 1
        candidate = self._nextPort
        for _ in range(span):
            port, candidate = candidate, low + (candidate - low + 1) % span
            if port not in self.byTunnelPort and port not in self.exposures:
                self._nextPort = candidate
                return port
        return None

    def _packet(self, source, sourcePort, destination, destinationPort, data):
        self._ident = (self._ident + 1) & 0xFFFF
        return udpPacket(source, sourcePort, destination, destinationPort, data, self._ident)

    # Idle expiry

    def _opened(self, flow):
        self.counters["flowsOpened"] += 1
        flow.timer = self.reactor.callLater(self.idleTimeout, self._checkIdle, flow)

    def _checkIdle(self, flow):
        idle = self.reactor.seconds() - flow.lastUsed
        if idle < self.idleTimeout:
            flow.timer = self.reactor.callLater(self.idleTimeout - idle, self._checkIdle, flow)
            return
        flow.timer = None
        self.counters["flowsExpired"] += 1
        self._forget(flow)

    def _forget(self, flow):
        if flow.timer is not None and flow.timer.active():
            flow.timer.cancel()
        flow.timer = None
        if isinstance(flow, _ServerFlow):
            self.serverFlows.pop(flow.key, None)
            if flow.port is not None:
                port, flow.port = flow.port, None
                port.stopListening()
        else:
            self.clientFlows.pop(flow.key, None)
            self.byTunnelPort.pop(flow.tunnelPort, None)

"""
Counters for what ENT carries and drops, with drops logged in aggregate.

The data path only adds integers here, once per batch of packets; the
Prometheus exposition (L{ent.observability.metrics}) reads these objects when it is
scraped, so a service without C{--metrics} pays nothing more, and one with
it pays nothing per packet.
"""

from collections import Counter

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ent.ratelimit import OncePer

# Why something was dropped: the label of ent_dropped_total, and the
# sentence the aggregated log line gives for it.
DROP_REASONS = {
    "zero_length_frame": "frame of length 0 (connection dropped)",
    "oversize_frame": "frame longer than the largest IP packet (connection dropped)",
    "stalled_partial_frame": "part of a frame and then nothing (connection dropped)",
    "partial_frame_cut_off": "connection closed in the middle of a frame",
    "not_ip": "not an IPv4 or IPv6 packet",
    "truncated_ipv4_header": "truncated IPv4 header",
    "bad_ipv4_header_length": "bad IPv4 header length",
    "ipv4_length_mismatch": "IPv4 total length disagrees with the frame",
    "truncated_ipv6_header": "truncated IPv6 header",
    "ipv6_length_mismatch": "IPv6 payload length disagrees with the frame",
    "no_gateway": "no gateway connected",
    "tun_closed": "TUN already closed",
    "not_ipv4": "not IPv4 (the user-space stack carries IPv4 only)",
    "tun_write_failed": "the kernel refused the packet on the TUN",
    "other_side_not_connected": "the other side of the gateway is not connected",
    "connection_limit": "connection refused: the limit of open connections is reached",
    "no_route": "no connected leg owns the destination, and it has no default leg",
    "source_not_owned": "the agent sent from an address it does not own",
    "agent_to_agent": "from one agent to another on the same gateway (see --agent-to-agent)",
    "peer_to_peer": "from one peer gateway to another",
    "address_in_use": "connection refused: its address or prefix belongs to a live leg",
    "identity_not_allowed": "connection refused: its certificate names no --allowed-ips entry",
    "target_full": "to an agent that takes too little (its queue is full): dropped so the others go on",
    "write_stalled": "connection closed: the leg took nothing for its stall timeout",
    "service_not_allowed": "to a destination the agent's policy identity may not reach (services)",
    "source_not_allowed": "a peer gateway sent from outside the addresses of its policy identity",
    "udp_fragment": "fragmented UDP datagram (the user-space stack does not reassemble)",
    "udp_malformed": "UDP datagram with a bad length, port 0 or a bad checksum",
    "udp_unreachable": "UDP datagram for no exposed port or open flow of the user-space stack",
    "udp_flow_limit": "UDP datagram refused: the user-space stack's flow limit is reached",
    "udp_oversize": "UDP datagram larger than one packet of the tunnel's MTU",
    "udp_send_failed": "a local UDP socket refused the datagram (service down, or no socket)",
}


class DropReporter:
    """
    Count what is dropped by leg and reason, and log the totals
    periodically, so that nothing is lost silently and nothing floods.
    """

    log = Logger()

    def __init__(self, clock, what, interval=10.0):
        self.what = what
        self.total = Counter()
        self._unreported = Counter()
        self._loop = LoopingCall(self.report)
        self._loop.clock = clock
        self._interval = interval

    def count(self, reason, n=1, leg="tun"):
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}")
        self.total[(leg, reason)] += n
        self._unreported[(leg, reason)] += n

    def byReason(self, reason):
        """
        Drops of C{reason} on every leg.
        """
        return sum(n for (leg, r), n in self.total.items() if r == reason)

    def start(self):
        if not self._loop.running:
            self._loop.start(self._interval, now=False)

    def stop(self):
        if self._loop.running:
            self._loop.stop()
        self.report()

    def report(self):
        """
        Log the drops since the last report, one line per leg and reason.
        """
        for (leg, reason), n in sorted(self._unreported.items()):
            self.log.warn(
                "{what}: dropped {count} ({total} in all) on the {leg} leg: {description}",
                what=self.what,
                count=n,
                total=self.total[(leg, reason)],
                leg=leg,
                reason=reason,
                description=DROP_REASONS[reason],
            )
        self._unreported.clear()


class LegStats:
    """
    What one leg carried, and how often it came up and went down.

    C{packets*} count frames (one packet each); C{bytes*} count the bytes
    of the leg's stream, frame headers included, before any TLS.
    """

    def __init__(self, name):
        self.name = name
        # Connections up at once: a gateway side may briefly have two, the
        # one that replaces and the one being replaced.
        self.open = 0
        self.connections = 0
        self.disconnects = 0
        self.connectFailures = 0
        self.packetsReceived = 0
        self.bytesReceived = 0
        self.packetsSent = 0
        self.bytesSent = 0

    @property
    def up(self):
        return self.open > 0

    @property
    def reconnects(self):
        """
        Connections after the first: each one replaced a lost one.
        """
        return max(self.connections - 1, 0)

    def connected(self):
        self.open += 1
        self.connections += 1

    def lost(self):
        self.open -= 1
        self.disconnects += 1


class TunStats:
    """
    What the TUN reader and writer did; C{batches[n]} is how many wakeups
    read C{n} packets.
    """

    def __init__(self, batch, name):
        self.name = name
        self.batches = [0] * (batch + 1)
        self.packetsRead = 0
        self.bytesRead = 0
        self.packetsWritten = 0
        self.bytesWritten = 0
        self.pauses = 0
        self.paused = False


class ServiceStats:
    """
    Everything one service counts: its legs, its drops, its failed
    handshakes; read by L{ent.observability.metrics} and by the service's own log lines.
    """

    def __init__(self, service, clock):
        self.service = service
        self.clock = clock
        self.started = None
        self.drops = DropReporter(clock, service)
        self.legs = {}
        self.handshakeFailures = Counter()
        # Whether to log a failure a stranger caused (a failed handshake) now.
        self.logAllowed = OncePer(clock)
        # Legs refused or closed by the policy, by (leg, reason); legs
        # closed for a new rats-tls handshake, by leg.
        self.refusals = Counter()
        self.reattestations = Counter()
        # The agent's TUN counters, the relay's connection counters, the
        # gateway's router (its legs, for status).
        self.tun = None
        self.relay = None
        # The agent's containment drops ({hook: packets}), when it reads them.
        self.tunnelDrops = None
        self.router = None

    def start(self):
        self.started = self.clock.seconds()
        self.drops.start()

    def stop(self):
        self.drops.stop()

    def leg(self, name):
        if name not in self.legs:
            self.legs[name] = LegStats(name)
        return self.legs[name]

    def handshakeFailed(self, leg, kind):
        self.handshakeFailures[(leg, kind)] += 1

    def legRefused(self, leg, reason):
        self.refusals[(leg, reason)] += 1

    def reattested(self, leg):
        self.reattestations[leg] += 1

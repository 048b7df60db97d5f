"""
Prometheus metrics of a running service, on C{--metrics ENDPOINT}.

The values are read from the service's L{ent.observability.stats.ServiceStats} when the
endpoint is scraped (a custom collector), so the data path keeps adding
plain integers once per batch and never calls into prometheus_client.
This module is imported only when C{--metrics} is given.
"""

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from twisted.web.resource import Resource
from twisted.web.server import Site

from ent import __version__
from ent.legs.endpoints import listeningService

# Upper bounds of the TUN batch-size histogram; the reader takes at most
# ent.tun.DEFAULT_BATCH packets per wakeup.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def kernelDrops(name, path="/proc/net/dev"):
    """
    Packets the kernel dropped on their way to the TUN reader (its queue was
    full while the reader was paused), or C{None} if C{name} is not found.

    /proc/net/dev is read in the reading process's own network namespace.
    """
    try:
        with open(path) as f:
            for line in f:
                interface, colon, counters = line.partition(":")
                if colon and interface.strip() == name:
                    return int(counters.split()[11])  # transmit "drop"
    except (OSError, ValueError, IndexError):
        return None
    return None


class StatsCollector:
    """
    Turns one service's counters into metric families at scrape time.
    """

    def __init__(self, stats):
        self.stats = stats

    def collect(self):
        stats = self.stats
        info = InfoMetricFamily("ent", "The ENT service and its version.")
        info.add_metric([], {"service": stats.service, "version": __version__})
        yield info
        if stats.started is not None:
            yield GaugeMetricFamily(
                "ent_start_time_seconds", "When the service started (Unix time).", value=stats.started
            )
        yield from self._legs(stats)
        dropped = CounterMetricFamily(
            "ent_dropped", "Packets, frames or connections dropped, by leg and reason.", labels=["leg", "reason"]
        )
        for (leg, reason), n in sorted(stats.drops.total.items()):
            dropped.add_metric([leg, reason], n)
        yield dropped
        failures = CounterMetricFamily(
            "ent_handshake_failures", "Failed TLS or rats-tls handshakes, by leg and kind.", labels=["leg", "kind"]
        )
        for (leg, kind), n in sorted(stats.handshakeFailures.items()):
            failures.add_metric([leg, kind], n)
        yield failures
        refused = CounterMetricFamily(
            "ent_legs_refused",
            "Legs refused by the --policy (reason policy) or closed after a reload (policy_reload), by leg.",
            labels=["leg", "reason"],
        )
        for (leg, reason), n in sorted(stats.refusals.items()):
            refused.add_metric([leg, reason], n)
        yield refused
        reattested = CounterMetricFamily(
            "ent_reattestations", "rats-tls legs closed for a new handshake (--reattest), by leg.", labels=["leg"]
        )
        for leg, n in sorted(stats.reattestations.items()):
            reattested.add_metric([leg], n)
        yield reattested
        if stats.tun is not None:
            yield from self._tun(stats.tun)
        if stats.relay is not None:
            yield from self._relay(stats.relay)
        if stats.tunnelDrops is not None:
            contained = CounterMetricFamily(
                "ent_tunnel_dropped",
                "Packets from the tunnel that containment dropped (the table's nftables counters, "
                "read every few seconds), by hook: input (to this host), forward (through it), "
                "spoofed (a source outside the tunnel network or not routed back into the TUN).",
                labels=["hook"],
            )
            for hook, packets in sorted(stats.tunnelDrops.items()):
                contained.add_metric([hook], packets)
            yield contained
        if stats.router is not None:
            yield from self._router(stats.router)

    @staticmethod
    def _router(router):
        """
        The gateway's legs by side only: one series per agent would grow
        with the agents; C{/legs} lists them one by one.
        """
        legs = GaugeMetricFamily("ent_gateway_legs", "Legs connected now, by side.", labels=["side"])
        paused = GaugeMetricFamily(
            "ent_gateway_legs_paused",
            "Legs not read now (their target is full or the other side is missing).",
            labels=["side"],
        )
        owned = GaugeMetricFamily(
            "ent_gateway_addresses", "Addresses learned from the legs' frames, by side.", labels=["side"]
        )
        prefixes = GaugeMetricFamily(
            "ent_gateway_prefixes",
            "Prefixes (--allowed-ips, --entg-connect) owned by connected legs.",
            value=len(router.prefixes),
        )
        for side, connected in sorted(router.legs.items()):
            legs.add_metric([side], len(connected))
            paused.add_metric([side], sum(1 for leg in connected if leg.holds))
            owned.add_metric([side], sum(len(leg.owned) for leg in connected))
        yield from (legs, paused, owned, prefixes)

    @staticmethod
    def _legs(stats):
        legs = sorted(stats.legs.values(), key=lambda leg: leg.name)
        if not legs:
            return
        up = GaugeMetricFamily("ent_leg_up", "1 while the leg is connected.", labels=["leg"])
        connections = CounterMetricFamily("ent_leg_connections", "Times the leg came up.", labels=["leg"])
        reconnects = CounterMetricFamily(
            "ent_leg_reconnects", "Times the leg came up again after its first connection.", labels=["leg"]
        )
        disconnects = CounterMetricFamily("ent_leg_disconnects", "Times the leg went down.", labels=["leg"])
        connectFailures = CounterMetricFamily(
            "ent_leg_connect_failures", "Failed attempts to connect the leg (handshakes included).", labels=["leg"]
        )
        packets = CounterMetricFamily(
            "ent_leg_packets", "Frames (one IP packet each) received and sent on the leg.", labels=["leg", "direction"]
        )
        octets = CounterMetricFamily(
            "ent_leg_bytes",
            "Bytes of the leg's stream, frame headers included, before TLS.",
            labels=["leg", "direction"],
        )
        for leg in legs:
            name = [leg.name]
            up.add_metric(name, 1 if leg.up else 0)
            connections.add_metric(name, leg.connections)
            reconnects.add_metric(name, leg.reconnects)
            disconnects.add_metric(name, leg.disconnects)
            connectFailures.add_metric(name, leg.connectFailures)
            packets.add_metric([leg.name, "received"], leg.packetsReceived)
            packets.add_metric([leg.name, "sent"], leg.packetsSent)
            octets.add_metric([leg.name, "received"], leg.bytesReceived)
            octets.add_metric([leg.name, "sent"], leg.bytesSent)
        yield from (up, connections, reconnects, disconnects, connectFailures, packets, octets)

    @staticmethod
    def _tun(tun):
        packets = CounterMetricFamily(
            "ent_tun_packets", "Packets read from and written to the TUN.", labels=["direction"]
        )
        packets.add_metric(["read"], tun.packetsRead)
        packets.add_metric(["written"], tun.packetsWritten)
        yield packets
        octets = CounterMetricFamily("ent_tun_bytes", "Bytes read from and written to the TUN.", labels=["direction"])
        octets.add_metric(["read"], tun.bytesRead)
        octets.add_metric(["written"], tun.bytesWritten)
        yield octets
        yield histogramOf("ent_tun_read_batch_packets", "Packets read from the TUN per wakeup.", tun.batches)
        yield GaugeMetricFamily(
            "ent_tun_paused",
            "1 while the TUN reader is paused (the leg is full or down).",
            value=1 if tun.paused else 0,
        )
        yield CounterMetricFamily("ent_tun_pauses", "Times the TUN reader was paused.", value=tun.pauses)
        dropped = kernelDrops(tun.name) if tun.name else None
        if dropped is not None:
            yield CounterMetricFamily(
                "ent_tun_kernel_dropped",
                "Packets the kernel dropped because the TUN queue was full (reader paused or slow).",
                value=dropped,
            )

    @staticmethod
    def _relay(relay):
        yield GaugeMetricFamily("ent_relay_connections_open", "Relayed connections open now.", value=relay.open)
        yield GaugeMetricFamily(
            "ent_relay_connection_limit", "--max-concurrent-connections.", value=relay.maxConnections
        )
        yield CounterMetricFamily(
            "ent_relay_connections_accepted", "Connections accepted and relayed.", value=relay.accepted
        )
        yield CounterMetricFamily(
            "ent_relay_connections_refused", "Connections refused at the limit.", value=relay.refused
        )
        yield CounterMetricFamily(
            "ent_relay_connect_failures",
            "Accepted connections whose target could not be reached.",
            value=relay.failedConnects,
        )
        octets = CounterMetricFamily("ent_relay_bytes", "Bytes relayed, by direction.", labels=["direction"])
        octets.add_metric(["to_target"], relay.bytesToTarget)
        octets.add_metric(["from_target"], relay.bytesFromTarget)
        yield octets


def histogramOf(name, documentation, counts):
    """
    A histogram family from C{counts[n]}, the number of observations of
    the value C{n}.
    """
    buckets = []
    cumulative = 0
    bounds = iter(BATCH_BUCKETS)
    bound = next(bounds)
    for value, n in enumerate(counts):
        while bound is not None and value > bound:
            buckets.append((str(bound), cumulative))
            bound = next(bounds, None)
        cumulative += n
    while bound is not None:
        buckets.append((str(bound), cumulative))
        bound = next(bounds, None)
    buckets.append(("+Inf", cumulative))
    total = sum(value * n for value, n in enumerate(counts))
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=total)


def registryFor(stats):
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats))
    return registry


class MetricsPage(Resource):
    """
    C{/metrics}: the registry in the format the scraper asks for.
    """

    isLeaf = True

    def __init__(self, registry):
        Resource.__init__(self)
        self.registry = registry

    def render_GET(self, request):
        encoder, contentType = choose_encoder(request.getHeader("accept"))
        request.setHeader("content-type", contentType)
        return encoder(self.registry)


class LegsPage(Resource):
    """
    C{/legs}: the gateway's legs one by one, as JSON, for C{ent status}.
    """

    isLeaf = True

    def __init__(self, stats):
        Resource.__init__(self)
        self.stats = stats

    def render_GET(self, request):
        import json

        request.setHeader("content-type", "application/json")
        router = self.stats.router
        return json.dumps(router.report() if router is not None else []).encode()


class QuietSite(Site):
    """
    A site that does not log each request: a scrape every few seconds
    would bury the tunnel's own log lines.
    """

    noisy = False

    def log(self, request):
        pass


def metricsSite(stats):
    root = Resource()
    root.putChild(b"metrics", MetricsPage(registryFor(stats)))
    root.putChild(b"legs", LegsPage(stats))
    return QuietSite(root)


def metricsService(endpoint, stats):
    """
    A service that serves C{stats} on C{endpoint} at C{/metrics}; a port
    that cannot be listened on fails the start.
    """
    return listeningService(endpoint, metricsSite(stats))

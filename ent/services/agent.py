"""
ENTA: joins this host's TUN device to a gateway.

Start-up configures the host (TUN, nftables table, policy route) and undoes
every step already done if a later one fails; stop undoes them all.
"""

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.internet.defer import gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from ent import tun
from ent.capture import userstack
from ent.errors import EntError
from ent.flow import Valve
from ent.hostconfig import netfilter
from ent.hostconfig import steps as hostconfig
from ent.hostconfig.guard import TableGuard
from ent.legs.policy import Refusal
from ent.observability.stats import ServiceStats
from ent.protocols.admission import Admission, describeEvidence, legFacts
from ent.protocols.framed import FramedLeg
from ent.protocols.framing import HEADER_SIZE, frame, frameSequence
from ent.protocols.packets import announcement, wellFormed
from ent.protocols.reattest import QuickRetry, Reattestation
from ent.protocols.splice import DEFAULT_MAX_CONNECTIONS, SocketRelayFactory
from ent.protocols.writethrough import writeThrough


class GatewayLink(FramedLeg):
    """
    The agent's connection to its gateway.
    """

    leg = "gateway"
    refused = False
    reattesting = False
    identity = None
    reattestation = None

    def __init__(self, agent):
        FramedLeg.__init__(self, agent.stats, agent.reactor)
        self.agent = agent
        self.facts = None

    def legUp(self):
        """
        With a policy, the gateway must match an identity of role
        C{gateway} before anything is carried.
        """
        agent = self.agent
        self.facts = legFacts(self.transport, "gateway")
        result = agent.admission.admit(self.facts, "gateway", self.peerName())
        if isinstance(result, Refusal):
            self.refuseUnattached()
            return
        self.identity = result
        self.reattestation = agent.reattest.watch(self, connecting=True, retry=agent.retry)
        agent.linkUp(self)

    def framedDataReceived(self, packets, count):
        self.agent.packetsFromLink(packets)

    def legDown(self, reason):
        if self.reattestation is not None:
            self.reattestation.cancel()
            self.reattestation = None
        self.agent.linkDown(self, reason)


class GatewayLinkFactory(Factory):
    noisy = False

    def __init__(self, agent):
        self.agent = agent

    def buildProtocol(self, addr):
        return GatewayLink(self.agent)


class AgentService(MultiService):
    """
    The agent: host configuration plus a reconnecting link to the gateway.

    C{options} is a parsed L{ent.services.options.EntaOptions}; C{endpoint} is the
    gateway's client endpoint; C{reactor} provides the reactor and clock;
    C{stats} is where it counts (its own if not given).
    """

    log = Logger()
    stopping = False

    def __init__(self, options, endpoint, reactor, stats=None, hangup=None):
        MultiService.__init__(self)
        self.options = options
        self.reactor = reactor
        self.stats = stats if stats is not None else ServiceStats("enta", reactor)
        self.drops = self.stats.drops
        self.linkStats = self.stats.leg("gateway")
        self.tun = None
        self.link = None
        self._writeErrors = set()
        self._undo = []
        # The running side of the nftables table, once installed.
        self.guard = None
        # The user-space stack's exposures: Unix listeners and their relays.
        self._exposurePorts = []
        self._exposureRelays = []
        self.admission = Admission(options.get("policy-rules"), reactor, self.stats.legRefused)
        self.reattest = Reattestation(reactor, options.get("reattest", 0), self.stats.reattested)
        self.hangup = hangup
        # Back off after a failure; reconnect at once after closing the
        # link for re-attestation.
        self.retry = QuickRetry(backoffPolicy(initialDelay=0.5, maxDelay=10.0))
        self.client = ClientService(endpoint, GatewayLinkFactory(self), retryPolicy=self.retry, clock=reactor)
        self.client.setServiceParent(self)

    # Host configuration

    def configureHost(self):
        """
        Create the TUN, its nftables table and (capture side) the policy
        route, recording how to undo each step; a bare endpoint gets the
        TUN alone.  Before configuring anything, check this agent against
        the others on the host: a conflict is refused, naming the other
        agent.
        """
        o = self.options
        if o.get("stack") == "user":
            self._startUserStack()
            return
        name = o["tun-name"]
        interface = o["tun-interface"]
        mappings = o.get("mappings", ())
        captureFrom = tuple(o.get("capture-from", ()))
        fd = tun.openTun(name)
        self.tun = tun.TunTransport(fd, name, o["mtu"], self.packetsFromTun, self._tunWriteFailed, self.reactor)
        self.stats.tun = self.tun.stats
        self._undo.append(self._closeTun)
        ports = list(dict.fromkeys(m.port for m in mappings))
        captures = _captures(mappings, captureFrom)
        gatewayPort = o.get("gateway-port")
        policy = (
            hostconfig.run("policy-plan", name=name, ports=ports, table=o["route-table"], gatewayPort=gatewayPort) or {}
        )
        hostconfig.run("tun", name=name, address=str(interface.ip), prefixlen=interface.network.prefixlen, mtu=o["mtu"])
        if o["role"] == "bare":
            # ENG's plain agent: the host's own routes decide what enters.
            self.log.info(
                "TUN {tun} up as {address}, mtu {mtu}; bare endpoint: no rules, "
                "it carries whatever is routed into {tun}, and every listener of this host "
                "is reachable through the tunnel",
                tun=name,
                address=str(interface),
                mtu=o["mtu"],
                role=o["role"],
            )
            return
        zone = netfilter.chooseZone(name, netfilter.records())
        record = netfilter.AgentRecord(policy.get("table"), policy.get("priority"), gatewayPort, zone)
        plan = netfilter.AgentPlan(
            name, str(interface.ip), mappings, o.get("exposures", ()), record, captureFrom, str(interface.network)
        )
        self._undo.append(lambda: netfilter.remove(name))
        netfilter.install(plan)
        self.guard = TableGuard(name, self.stats, self.reactor, failClosed=bool(mappings))
        if policy:
            self._undo.append(lambda: hostconfig.run("policy-down", name=name, table=policy["table"]))
            hostconfig.run("policy-up", name=name, ports=ports, gatewayPort=gatewayPort, captures=captures, **policy)
        services = [_describe(item) for item in (*mappings, *o.get("exposures", ()))]
        self.log.info(
            "TUN {tun} up as {address}, mtu {mtu}; {carries} {services}{route}; from the tunnel only {accepted}",
            tun=name,
            address=str(interface),
            mtu=o["mtu"],
            role=o["role"],
            carries="maps" if mappings else "exposes",
            services=", ".join(services),
            peer=str(o["peer-addr"]),
            accepted="exposed services, ping and replies" if o["role"] == "replay" else "ping and replies",
            route=" (route table {table}, rule priority {priority})".format(**policy) if policy else "",
        )

    def _startUserStack(self):
        """
        Capture with libslirp in this process: nothing on the host changes
        but the local listeners (C{--listen}) and the Unix sockets slirp
        hands the exposed flows to, in a private directory.
        """
        o = self.options
        stack = userstack.UserStack(
            o["tun-interface"],
            o["mtu"],
            self.packetsFromTun,
            self.drops,
            self.reactor,
            listens=o["listens"],
            exposures=o["exposures"],
        )
        stack.start()
        self.tun = stack
        self._undo.append(self._closeTun)
        self.stats.tun = stack.stats
        self._undo.append(self._stopExposures)
        for exposure in o["exposures"]:
            if exposure.proto == "tcp":
                self._exposeToStack(stack, exposure)
        services = [_describe(item) for item in (*o["listens"], *o["exposures"])]
        self.log.info(
            "user-space stack (libslirp {version}) up as {address}, mtu {mtu}; {carries} {services}; "
            "from the tunnel only {accepted}",
            version=stack.version,
            address=str(o["tun-interface"]),
            mtu=stack.mtu,
            carries="listens" if o["listens"] else "exposes",
            services=", ".join(services),
            accepted="exposed services" if o["exposures"] else "replies",
        )

    def _exposeToStack(self, stack, exposure):
        """
        Relay the flows slirp accepts for C{exposure} to the local service.
        """
        host = exposure.host or "127.0.0.1"
        relay = SocketRelayFactory(
            TCP4ClientEndpoint(self.reactor, host, exposure.port, timeout=10),
            f"{host}:{exposure.port}",
            DEFAULT_MAX_CONNECTIONS,
            self.drops,
        )
        listening = UNIXServerEndpoint(
            self.reactor, stack.socketPath(exposure), backlog=userstack.LISTEN_BACKLOG, mode=0o600
        ).listen(relay)
        failures = []
        listening.addCallbacks(self._exposurePorts.append, failures.append)
        if failures:
            failures[0].raiseException()
        self._exposureRelays.append(relay)
        if self.stats.relay is None:
            self.stats.relay = relay

    def _stopExposures(self):
        """
        Close the exposures' listeners and relayed connections; fires when
        they are closed, so that their socket directory can go.
        """
        ports, self._exposurePorts = self._exposurePorts, []
        relays, self._exposureRelays = self._exposureRelays, []
        stopping = [port.stopListening() for port in ports] + [relay.closeAll() for relay in relays]
        return gatherResults([d for d in stopping if d is not None], consumeErrors=True)

    def unconfigureHost(self):
        """
        Undo every configuration step done, last first; go on past failures.
        """
        while self._undo:
            step = self._undo.pop()
            try:
                step()
            except EntError as e:
                self.log.error("clean-up step failed: {error}", error=str(e))

    def _closeTun(self):
        if self.tun is not None:
            self.tun.stopReading()
            self.tun.connectionLost(None)
            self.tun = None

    def startService(self):
        try:
            self.configureHost()
        except BaseException:
            self.unconfigureHost()
            raise
        self.stats.start()
        if self.guard is not None and self.options.get("metrics"):
            self.guard.startCounting()
        if self.hangup is not None:
            self.hangup.start(self.reloadPolicy)
        MultiService.startService(self)

    def reloadPolicy(self):
        """
        SIGHUP: re-read the policy and close the link if the gateway no
        longer matches it as it did; a wrong file changes nothing.
        """
        if not self.admission.active:
            self.log.warn("SIGHUP: no --policy to reload")
            return 0
        if not self.admission.reload():
            return 0
        link = self.link
        if link is None or self.admission.stillAdmitted(link.facts, link.identity):
            return 0
        self.log.warn(
            "gateway {peer} ({identity}) closed: the reloaded policy no longer admits it as it was",
            peer=link.peerName(),
            identity=link.identity.name if link.identity is not None else "-",
        )
        self.stats.legRefused("gateway", "policy_reload")
        link.refused = True
        link.transport.unregisterProducer()
        link.pauseProducing()
        link.transport.abortConnection()
        return 1

    def stopService(self):
        # Read no more from the TUN first: fed by a busy TUN, the link would
        # never empty its buffer, and its close would wait as long as the
        # application keeps sending.
        self.stopping = True
        if self.hangup is not None:
            self.hangup.stop()
        if self.tun is not None:
            self.tun.stopReading()
        if self.link is not None:
            self.link.transport.unregisterProducer()
            self.link.close()
        d = MultiService.stopService(self)
        d.addBoth(lambda result: self._stopExposures().addBoth(lambda _: result))

        def cleanUp(result):
            self.stats.stop()
            if self.guard is not None:
                self.guard.stopCounting()
            self.unconfigureHost()
            self.log.info(
                "agent stopped: {packetsOut} packets sent, {packetsIn} received",
                packetsOut=self.linkStats.packetsSent,
                packetsIn=self.linkStats.packetsReceived,
            )
            return result

        return d.addBoth(cleanUp)

    # The data path

    def linkUp(self, link):
        self.link = link
        self.log.info(
            "connected to gateway {peer}{identity}",
            leg=link.leg,
            peer=link.peerName(),
            identity=f" ({link.identity.name}, {describeEvidence(link.facts)})" if link.identity is not None else "",
            evidence=describeEvidence(link.facts),
        )
        if self.stopping:
            return
        if self.options.get("announce"):
            link.transport.write(frame(announcement(self.options["tun-interface"].ip)))
        admitted = self.guard.gateway(up=True) if self.guard is not None else succeed(None)
        admitted.addCallback(lambda _: self._carry(link))

    def _carry(self, link):
        """
        Read the TUN into C{link}, once captured connections are admitted:
        what the TUN carries before then would meet the refusing rules.
        """
        if self.link is link and self.tun is not None and not self.stopping:
            link.transport.registerProducer(Valve(self.tun), True)
            self.tun.resumeProducing()

    def linkDown(self, link, reason):
        if link is not self.link:
            return
        self.link = None
        if self.guard is not None and not self.stopping:
            self.guard.gateway(up=False)
        if self.tun is not None:
            self.tun.pauseProducing()
        self.log.warn(
            "lost gateway {peer}: {reason}{next}",
            leg=link.leg,
            peer=link.peerName(),
            reason=reason.getErrorMessage(),
            next="; reconnecting" if self.running else "",
        )

    def packetsFromTun(self, packets, size):
        """
        C{packets} read from the TUN, C{size} bytes in all.
        """
        link = self.link
        if link is None:
            self.drops.count("no_gateway", len(packets), leg="tun")
            return
        stats = self.linkStats
        stats.packetsSent += len(packets)
        stats.bytesSent += size + HEADER_SIZE * len(packets)
        writeThrough(link.transport, frameSequence(packets))

    def packetsFromLink(self, packets):
        if self.tun is None:
            self.drops.count("tun_closed", len(packets), leg="gateway")
            return
        self.tun.writePackets(wellFormed(packets, self.drops, leg="gateway"))

    def _tunWriteFailed(self, error):
        """
        Count every refused packet; log each kind of refusal once, the
        aggregated drop lines say how many followed.
        """
        self.drops.count("tun_write_failed", leg="gateway")
        if error.errno not in self._writeErrors:
            self._writeErrors.add(error.errno)
            self.log.error(
                "TUN {tun} refused a packet: {reason} (further ones are counted)",
                tun=self.options["tun-name"],
                leg="tun",
                reason=error.strerror,
            )


def _describe(item):
    """
    One mapping or exposure as the log line says it.
    """
    if hasattr(item, "tunAddress"):
        return f"{item.address or '*'}:{item.port}/{item.proto} -> {item.tunAddress}:{item.tunPort}"
    return f"{item.tunPort}/{item.proto} -> {item.host or 'local'}:{item.port}"


def _captures(mappings, captureFrom):
    """
    The policy rules of C{mappings}, as [proto, port, address, interface]:
    the host's own connections by what the app asked for; those routed from
    C{captureFrom} by where prerouting DNAT sent them, which is what routing
    sees for them, so that they too meet the unreachable route if the TUN
    is gone.
    """
    own = [[m.proto, m.port, m.address, "lo"] for m in mappings]
    routed = [[m.proto, m.tunPort, m.tunAddress, source] for source in captureFrom for m in mappings]
    return own + routed

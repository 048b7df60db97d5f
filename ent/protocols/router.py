"""
The gateway's router: which leg each frame goes to.

A gateway holds any number of agent legs and peer-gateway legs. A frame
from an agent goes to the leg that owns its IP destination; a destination
nobody owns goes to the only leg of the other side, if there is exactly
one and it is not a peer with prefixes of its own (so one agent and one
peer relay everything to each other, as ENG does), else it is dropped as
C{no_route}. A frame from a peer is routed the
same way among the agents.

Ownership of addresses:

  - an agent owns the source addresses it uses (learned from its frames,
    at most C{MAX_LEARNED["agent"]}), or, when C{--allowed-ips} lists one of
    its identities (L{ent.legs.identity}), exactly the prefixes listed there: a
    frame from another source is dropped as C{source_not_owned};
  - an agent that uses an address a live agent owns is refused: its leg is
    closed and both are logged; the owner is undisturbed. Addresses are
    freed when their leg closes;
  - a peer gateway carries many far hosts. A peer this gateway connects
    to with prefixes (C{--entg-connect HOST:PORT=PREFIX,...}) owns exactly
    those, connected or not: while it is away, frames to them are dropped
    as C{no_route}, never sent to another peer, and no other peer learns
    them (an agent's own address, a host route, still wins over them). Of any other peer, the sources of its frames are
    learned as routes to it (the latest peer wins), but never taken from an
    agent. A peer's frames are not dropped for their source, and go only
    to agents, never on to another peer, so no loop can form between
    gateways.

Backpressure: each leg's transport has a L{Gate} registered as its
producer. When the transport's buffer is full, the gate pauses the legs
that have written to it since it last paused, and any that write to it
while it is full; when the buffer drains it resumes them. A leg reads
again only when nothing holds it (L{Router.hold}). So a gateway holds at
most one read per source beyond each transport's buffer, whatever the
number of legs.

Fairness: pausing a peer leg because one of the agents behind it reads
slowly would stall every other agent behind that peer. So when the gateway
has several agents, a full agent never pauses its senders: what it cannot
take waits in its own queue (at most C{MAX_QUEUED} bytes beyond its
transport's buffer, C{MAX_QUEUED_TOTAL} for all agents), and beyond that
frames to it are dropped (C{target_full}; the TCP inside the tunnel slows
down as it would behind any full router). An agent whose transport stays
full for C{STALL_TIMEOUT} seconds takes nothing at all, and is closed
(C{write_stalled}). With one agent, as in ENG's relay, it is paced by
backpressure alone. Frames to peers are always paced by backpressure: all
agents that write to a full peer wait for the same link.

Per frame the router reads the length, the version and the two addresses
and does one or two dict look-ups (a repeated source/destination pair is a
cache hit); frames to the same target are written with one write-through
(L{ent.protocols.writethrough}) per read. Nothing is logged per frame: drops are counted
by reason and logged in aggregate by L{ent.observability.stats.DropReporter}, and a drop
for lack of a route is logged at most once a minute per destination.
"""

import ipaddress

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from ent.legs.policy import allowedIpsPolicy
from ent.observability.stats import DROP_REASONS
from ent.protocols.framing import HEADER, HEADER_SIZE
from ent.protocols.packets import ANNOUNCE_SIZE, isAnnouncement
from ent.protocols.writethrough import writeThrough
from ent.ratelimit import OncePer

OTHER = {"agent": "peer", "peer": "agent"}

# Why a leg is paused, beside the gates of full targets: no leg of the
# other side is connected, so its frames wait in its socket.
ALONE = "alone"

# Addresses a leg may learn: an agent is one host (or a small routed
# network behind a bare agent); a peer gateway fronts many.
MAX_LEARNED = {"agent": 256, "peer": 4096}
# Routes a leg remembers by address pair (one per flow through it) before
# they are forgotten all at once.
ROUTE_CACHE_SIZE = 1024
# Legs gone before the gates are swept of them (at least; or as many as
# there are legs, so that a sweep costs O(1) per disconnect).
FORGET_BATCH = 256
# Fair mode: what may wait for one full agent beyond its transport's
# buffer, and for all of them together; beyond, frames to it are dropped.
MAX_QUEUED = 1 << 20
MAX_QUEUED_TOTAL = 64 << 20
# An agent whose transport stays full this long is closed.
STALL_TIMEOUT = 10.0


def addressText(packed):
    return str(ipaddress.ip_address(bytes(packed))) if packed is not None else "?"


def _identityNote(leg):
    evidence = leg.evidenceText()
    return f" ({leg.identityText()}{', ' + evidence if evidence != '-' else ''})"


@implementer(IPushProducer)
class Gate:
    """
    The producer registered on one leg's transport: it pauses whoever
    writes to that leg while its buffer is full.
    """

    def __init__(self, router, leg):
        self.router = router
        self.leg = leg
        self.full = False
        # Legs that wrote since the last pause, and legs this gate holds.
        self.senders = set()
        self.held = set()
        # Fair mode (an agent among several): bytes written to the full
        # transport instead of pausing the senders, and since when it is full.
        self.queued = 0
        self.fullSince = None

    def willSend(self, source):
        if self.full:
            if source not in self.held:
                self.held.add(source)
                self.router.hold(source, self)
        else:
            self.senders.add(source)

    def pauseProducing(self):
        self.full = True
        self.fullSince = self.router.clock.seconds()
        self.router.watchStall(self)
        senders, self.senders = self.senders, set()
        if self.router.fair(self.leg):
            return  # what feeds it feeds others too: it is not paused for this one
        for source in senders:
            self.willSend(source)

    def resumeProducing(self):
        self.full = False
        self.fullSince = None
        if self.queued:
            self.router.queuedBytes -= self.queued
            self.queued = 0
        held, self.held = self.held, set()
        for source in held:
            self.router.release(source, self)

    def stopProducing(self):
        """
        The leg's connection is gone: nobody waits for it any more.
        """
        self.resumeProducing()


class Router:
    """
    Holds the gateway's legs, who owns which address, and moves frames.
    """

    log = Logger()
    # At most one log line per destination (and reason) in this many seconds.
    logInterval = 60.0
    maxLogged = 4096
    stallTimeout = STALL_TIMEOUT

    def __init__(self, stats, clock, allowedIps=None, agentToAgent=False, peerRoutes=(), admission=None, reattest=None):
        """
        C{admission}: the L{ent.protocols.admission.Admission} its legs pass
        before they are attached; C{allowedIps} (C{--allowed-ips}, name to
        prefixes) is the same as an admission by
        L{ent.legs.policy.allowedIpsPolicy}. C{reattest}: the
        L{ent.protocols.reattest.Reattestation} that schedules their new
        handshakes.
        """
        if allowedIps and admission is None:
            from ent.protocols.admission import Admission

            admission = Admission(allowedIpsPolicy(allowedIps), clock, stats.legRefused)
        self.admission = admission
        self.reattest = reattest
        self.stats = stats
        self.drops = stats.drops
        self.clock = clock
        self.agentToAgent = agentToAgent
        # Every prefix of every --entg-connect, its peer up or not.
        self.peerRoutes = tuple(peerRoutes)
        self.legs = {"agent": {}, "peer": {}}
        self._sole = {"agent": None, "peer": None}
        self._relayTo = {}
        self.owners = {}
        # Configured prefixes: (version, network, mask, leg), longest first.
        self.prefixes = []
        # Bumped on every change of the tables; a leg's cached route is
        # valid only for the generation it was computed in.
        self.generation = 0
        self._logAllowed = OncePer(clock, self.logInterval, self.maxLogged)
        # Legs gone since the gates were last swept of them.
        self._departed = set()
        # Bytes queued to full agents in fair mode, all gates together.
        self.queuedBytes = 0
        stats.router = self

    # Legs coming and going.

    def attach(self, leg):
        side = leg.side
        identity = leg.identity
        strict = self.admission is not None and self.admission.active and self.admission.policy.strict
        leg.prefixes = leg.routes
        if identity is not None:
            # Admitted by the policy: its identity says what it owns.
            leg.prefixes = leg.routes or tuple(identity.addresses or ())
            if strict:
                if side == "agent" and identity.services is not None:
                    leg.services = identity
                if side == "peer" and identity.addresses is not None:
                    leg.sourcePrefixes = tuple(identity.addresses)
                if side == "agent":
                    self._replaceSameIdentity(leg)
        elif side == "agent" and self.admission is not None and self.admission.active and leg.identities:
            # With --allowed-ips, an authenticated agent is let in by name only.
            self.log.error(
                "{leg} {peer} ({identity}) refused: no --allowed-ips entry names it",
                leg=side,
                peer=leg.peerName(),
                identity=leg.identityText(),
            )
            self._refuseAtConnect(leg, "identity_not_allowed")
            return
        clash = self._prefixClash(leg)
        if clash is not None:
            other, prefix = clash
            self.log.error(
                "{leg} {peer} ({identity}) refused: {prefix} belongs to {owner} ({ownerIdentity})",
                leg=side,
                peer=leg.peerName(),
                identity=leg.identityText(),
                prefix=str(prefix),
                owner=other.peerName(),
                ownerIdentity=other.identityText(),
            )
            self._refuseAtConnect(leg, "address_in_use")
            return
        legs, others = self.legs[side], self.legs[OTHER[side]]
        legs[leg] = None
        self._changed()
        leg.gate = Gate(self, leg)
        leg.transport.registerProducer(leg.gate, True)
        for prefix in leg.prefixes:
            mask = ((1 << prefix.prefixlen) - 1) << (prefix.max_prefixlen - prefix.prefixlen)
            self.prefixes.append((prefix.version, int(prefix.network_address), mask, prefix.prefixlen, leg))
        self.prefixes.sort(key=lambda p: -p[3])
        if not leg.unproven:
            self.connectedLine(leg)
        if not others:
            self.hold(leg, ALONE)
            if len(legs) == 1:
                self.log.info("{leg} waits for the {other} side", leg=side, other=OTHER[side])
            return
        if len(legs) == 1:
            for other in others:
                self.release(other, ALONE)
            self.log.info("relaying between agent and peer gateway")

    def connectedLine(self, leg):
        """
        Say that C{leg} connected, once it has shown it speaks the protocol
        (a flood of idle connections logs nothing but its refusals).
        """
        self.log.info(
            "{leg} connected from {peer}{identity}",
            leg=leg.side,
            peer=leg.peerName(),
            identity=_identityNote(leg) if leg.identities or leg.identity is not None else "",
            evidence=leg.evidenceText(),
        )

    def _replaceSameIdentity(self, leg):
        """
        An agent of the policy's identity that connects again replaces its
        older leg, which is presumed dead (its host lost the connection
        without a close): the newest handshake wins, as in WireGuard.
        """
        name = leg.identity.name
        for other in list(self.legs["agent"]):
            if other.identity is not None and other.identity.name == name:
                self.log.warn(
                    "agent {peer} ({identity}) replaces its older leg from {old}",
                    peer=leg.peerName(),
                    identity=name,
                    old=other.peerName(),
                )
                self.evict(other)

    def evict(self, leg):
        """
        Close C{leg} at once, routing nothing more of it or to it.
        """
        if self.attached(leg):
            self._remove(leg)
        leg.refused = True
        leg.transport.unregisterProducer()
        leg.pauseProducing()
        leg.transport.abortConnection()

    def recheck(self):
        """
        After the policy was reloaded: close every leg that it no longer
        admits as the identity it was admitted as; the others go on.
        """
        admission = self.admission
        closed = [
            leg
            for legs in self.legs.values()
            for leg in legs
            if leg.facts is not None and not admission.stillAdmitted(leg.facts, leg.identity)
        ]
        for leg in closed:
            self.log.warn(
                "{leg} {peer} ({identity}) closed: the reloaded policy no longer admits it as it was",
                leg=leg.side,
                peer=leg.peerName(),
                identity=leg.identityText(),
            )
            self.stats.legRefused(leg.side, "policy_reload")
            self.evict(leg)
        return len(closed)

    def _refuseAtConnect(self, leg, reason):
        self.drops.count(reason, leg=leg.side)
        leg.refused = True
        leg.pauseProducing()
        leg.close()

    def detach(self, leg, reason):
        if not self.attached(leg):
            return
        self._remove(leg)
        if leg.unproven:
            return  # it never sent a frame: counted, not logged
        self.log.warn(
            "{leg} {peer} disconnected: {reason}", leg=leg.side, peer=leg.peerName(), reason=reason.getErrorMessage()
        )

    def refuse(self, leg, owner, address):
        """
        Close C{leg}, which claims C{address} of the live C{owner}.
        """
        self.log.error(
            "{leg} {peer}{identity} refused: it sends from {address}, which {owner}{ownerIdentity} owns",
            leg=leg.side,
            peer=leg.peerName(),
            address=addressText(address),
            owner=owner.peerName(),
            identity=leg.identitySuffix(),
            ownerIdentity=owner.identitySuffix(),
        )
        self.drops.count("address_in_use", leg=leg.side)
        self._remove(leg)
        leg.refused = True
        leg.transport.unregisterProducer()
        leg.pauseProducing()
        leg.close()

    def _remove(self, leg):
        side = leg.side
        del self.legs[side][leg]
        owners = self.owners
        for address in leg.owned:
            if owners.get(address) is leg:
                del owners[address]
        leg.owned.clear()
        if leg.prefixes:
            self.prefixes = [p for p in self.prefixes if p[4] is not leg]
        leg.gate.resumeProducing()
        self._forgetLater(leg)
        self._changed()
        if not self.legs[side]:
            for other in self.legs[OTHER[side]]:
                self.hold(other, ALONE)

    def attached(self, leg):
        return leg in self.legs[leg.side]

    def _forgetLater(self, leg):
        """
        Other gates may still name C{leg} among their senders; that is
        harmless (L{hold} ignores a leg that is gone), so they are swept
        only once many legs have gone: a disconnect costs the same whatever
        the number of legs.
        """
        departed = self._departed
        departed.add(leg)
        if len(departed) >= max(FORGET_BATCH, len(self.legs["agent"]) + len(self.legs["peer"])):
            for legs in self.legs.values():
                for other in legs:
                    gate = other.gate
                    gate.senders -= departed
                    gate.held -= departed
            departed.clear()

    def _changed(self):
        for side, legs in self.legs.items():
            sole = next(iter(legs)) if len(legs) == 1 else None
            # A peer with routes (or a policy's addresses) takes only those, even alone.
            self._sole[side] = sole if sole is None or not (sole.routes or sole.sourcePrefixes is not None) else None
        self.generation += 1
        # One agent and one peer: the peer's frames are the agent's whatever
        # their addresses, so its decoder need not note them.
        relaying = (
            self._sole["agent"] is not None and self._sole["peer"] is not None and self._sole["agent"].services is None
        )
        for leg in self.legs["peer"]:
            leg.decoder.trackPairs = not relaying
        # One agent, one peer: each one's frames go to the other (forward).
        agent, peer = self._sole["agent"], self._sole["peer"]
        self._relayTo = {agent: peer, peer: agent} if relaying else {}

    def fair(self, target):
        """
        Whether a full C{target} must not pause its senders: an agent among
        several, whose senders (a peer) also feed the others.
        """
        return target.side == "agent" and len(self.legs["agent"]) > 1

    def watchStall(self, gate):
        """
        Close an agent's leg whose transport stays full for
        C{stallTimeout}: it takes nothing while its queue waits (in fair
        mode), or while it holds the legs that feed it.
        """
        if gate.leg.side != "agent" or self.stallTimeout is None:
            return
        since = gate.fullSince
        self.clock.callLater(self.stallTimeout, self._checkStall, gate, since)

    def _checkStall(self, gate, since):
        leg = gate.leg
        if gate.fullSince != since or not self.attached(leg):
            return
        self.drops.count("write_stalled", leg=leg.side)
        if self._logAllowed(("write_stalled", leg.peerName())):
            self.log.warn(
                "{leg} {peer}{identity} closed: it took nothing for {timeout}s",
                leg=leg.side,
                peer=leg.peerName(),
                identity=leg.identitySuffix(),
                timeout=self.stallTimeout,
            )
        self.evict(leg)

    def closeAll(self):
        """
        Close every leg, none feeding another any more.
        """
        legs = [leg for side in self.legs.values() for leg in side]
        for leg in legs:
            leg.transport.unregisterProducer()
        for leg in legs:
            leg.close()

    # Who owns what.

    def _prefixClash(self, leg):
        """
        A live leg of the same side owning part of C{leg}'s configured
        prefixes, as C{(leg, prefix)}, or C{None}.
        """
        for prefix in leg.prefixes:
            for other in self.legs[leg.side]:
                if any(prefix.overlaps(p) for p in other.prefixes):
                    return other, prefix
                if any(ipaddress.ip_address(bytes(a)) in prefix for a in other.owned):
                    return other, prefix
        return None

    def inPeerRoutes(self, address):
        """
        Whether C{address} lies behind a peer of C{--entg-connect}.
        """
        if not self.peerRoutes:
            return False
        address = ipaddress.ip_address(bytes(address))
        return any(address in prefix for prefix in self.peerRoutes)

    def prefixOwner(self, address):
        if not self.prefixes:
            return None
        version = 4 if len(address) == 4 else 6
        value = int.from_bytes(address, "big")
        for v, network, mask, _, leg in self.prefixes:
            if v == version and value & mask == network:
                return leg
        return None

    def _claim(self, leg, address):
        previous = self.owners.get(address)
        if previous is not None:
            previous.owned.discard(address)
        self.owners[address] = leg
        leg.owned.add(address)
        self.generation += 1

    def _checkAgentSource(self, agent, src):
        """
        C{None} if C{agent} may send from C{src} (claiming it if free), else
        the drop reason.
        """
        owner = self.owners.get(src)
        if owner is agent:
            return None
        if agent.prefixes:
            if self.prefixOwner(src) is not agent:
                return "source_not_owned"
        else:
            if owner is None:
                owner = self.prefixOwner(src)
            if owner is not None and owner.side == "agent":
                self.refuse(agent, owner, src)
                return "source_not_owned"
        if len(agent.owned) < MAX_LEARNED["agent"]:
            self._claim(agent, src)
        elif not agent.prefixes:
            return "source_not_owned"
        return None

    def _learnPeerSource(self, peer, src):
        owner = self.owners.get(src)
        if owner is peer or (owner is not None and owner.side == "agent") or peer.routes:
            return
        if len(peer.owned) >= MAX_LEARNED["peer"] or self.prefixOwner(src) is not None:
            return
        if self.inPeerRoutes(src):
            return
        self._claim(peer, src)

    # The data path.

    def route(self, source, src, dst):
        """
        C{(target, None)} or C{(None, drop reason)} for a frame from
        C{source}; may claim C{src} for it, or refuse it.
        """
        side = source.side
        if dst is None:
            return self._default(side, "not_ip")
        if side == "agent":
            problem = self._checkAgentSource(source, src)
            if problem is not None:
                return None, problem
        elif source.sourcePrefixes is not None:
            address = ipaddress.ip_address(bytes(src))
            if not any(address in prefix for prefix in source.sourcePrefixes):
                return None, "source_not_allowed"
        else:
            self._learnPeerSource(source, src)
        target = self.owners.get(dst)
        if target is None:
            target = self.prefixOwner(dst)
        if target is None and self.inPeerRoutes(dst):
            # Behind a peer that is away: never to another one.
            return None, ("no_route" if side == "agent" else "peer_to_peer")
        if target is None or target is source:
            return self._default(side, "no_route")
        if target.side == side:
            if side == "agent":
                return (target, None) if self.agentToAgent else (None, "agent_to_agent")
            return None, "peer_to_peer"
        return target, None

    def announced(self, source, address):
        """
        Take an agent's announcement (L{ent.protocols.packets.announcement}) as its
        claim of C{address}; return the drop reason if the claim fails.
        """
        if source.side == "agent":
            return self._checkAgentSource(source, address)
        self._learnPeerSource(source, address)
        return None

    def _default(self, side, reason):
        """
        The only leg of the other side, or why there is none.
        """
        target = self._sole[OTHER[side]]
        if target is not None:
            return target, None
        if not self.legs[OTHER[side]]:
            return None, "other_side_not_connected"
        return None, reason

    def forward(self, source, frames, count, pair=None):
        """
        Send the whole frames in C{frames} (C{count} of them) where they go;
        C{pair}, if given, is the source and destination address that every
        one of them has (L{FrameDecoder.pair}).
        """
        if source.refused:
            # Read before its close took effect: it goes nowhere.
            self.drops.count("source_not_owned", count, leg=source.side)
            return
        if source.services is not None:
            frames, count = self._allowedServices(source, frames, count)
            if not count:
                return
            pair = None
        target = self._relayTo.get(source)
        if target is not None:
            # One agent, one peer: everything from the peer is the agent's,
            # whatever its addresses (as ENG relays), and everything from
            # the agent is the peer's if it comes from addresses it owns.
            if (
                source.side == "peer"
                or (pair is not None and pair[: len(pair) // 2] in source.owned)
                or (pair is None and self._ownedSources(source, frames))
            ):
                self._send(source, target, [frames], len(frames), count)
                return
        elif pair is not None and self._forwardAlike(source, frames, count, pair):
            return
        runs = []
        unpack = HEADER.unpack_from
        end = len(frames)
        offset = 0
        current = None
        runStart = 0
        runCount = 0
        seen = 0
        cache = self._routeCache(source)
        while offset < end:
            (length,) = unpack(frames, offset)
            start = offset + HEADER_SIZE
            version = frames[start] >> 4
            if version == 4 and length >= 20:
                addresses = frames[start + 12 : start + 20]
            elif version == 6 and length >= 40:
                addresses = frames[start + 8 : start + 40]
            else:
                addresses = None
            half = len(addresses) // 2 if addresses is not None else 0
            if (
                length == ANNOUNCE_SIZE
                and addresses is not None
                and addresses[:half] == addresses[half:]
                and isAnnouncement(frames, start, length)
            ):
                target, reason = None, self.announced(source, addresses[:half])
            else:
                hit = cache.get(addresses)
                if hit is None:
                    hit = self._routeInto(cache, source, addresses)
                    cache = source.routeCache
                target, reason = hit
            seen += 1
            if reason is not None:
                self._dropped(source, reason, addresses[half:] if addresses is not None else None)
                if source.refused:
                    # Refused by this frame: nothing more of it is read.
                    self.drops.count(reason, count - seen, leg=source.side)
                    break
            if target is not current:
                if current is not None:
                    runs.append((current, runStart, offset, runCount))
                current, runStart, runCount = target, offset, 0
            runCount += 1
            offset = start + length
        if current is not None:
            runs.append((current, runStart, offset, runCount))
        if len(runs) == 1 and runs[0][1] == 0 and runs[0][2] == end:
            self._send(source, runs[0][0], [frames], end, count)
            return
        byTarget = {}
        for target, first, last, n in runs:
            if target is not None:
                byTarget.setdefault(target, []).append((first, last, n))
        for target, pieces in byTarget.items():
            buffers = [frames[first:last] for first, last, _ in pieces]
            self._send(
                source, target, buffers, sum(last - first for first, last, _ in pieces), sum(n for _, _, n in pieces)
            )

    def _allowedServices(self, source, frames, count):
        """
        The frames of C{frames} that go to a service C{source}'s identity
        may reach (TCP or UDP to a listed address and port, or an
        announcement), and their count; the others are dropped as
        C{service_not_allowed}.
        """
        allows = source.services.allowsService
        unpack = HEADER.unpack_from
        end = len(frames)
        offset = 0
        kept = []
        while offset < end:
            (length,) = unpack(frames, offset)
            start = offset + HEADER_SIZE
            following = start + length
            first = frames[start]
            allowed = False
            destination = None
            if first >> 4 == 4 and length >= 20:
                headerLength = (first & 0x0F) * 4
                protocol = frames[start + 9]
                destination = frames[start + 16 : start + 20]
                fragment = ((frames[start + 6] & 0x1F) << 8) | frames[start + 7]
                if protocol in (6, 17) and fragment == 0 and 20 <= headerLength and headerLength + 4 <= length:
                    at = start + headerLength + 2
                    allowed = allows(protocol, destination, (frames[at] << 8) | frames[at + 1])
                elif length == ANNOUNCE_SIZE and isAnnouncement(frames, start, length):
                    allowed = True
            elif first >> 4 == 6 and length >= 44:
                protocol = frames[start + 6]
                destination = frames[start + 24 : start + 40]
                if protocol in (6, 17):
                    at = start + 42
                    allowed = allows(protocol, destination, (frames[at] << 8) | frames[at + 1])
            if allowed:
                kept.append((offset, following))
            else:
                self._dropped(source, "service_not_allowed", destination)
            offset = following
        if len(kept) == count:
            return frames, count
        return b"".join(bytes(frames[a:b]) for a, b in kept), len(kept)

    def _routeCache(self, source):
        """
        C{source}'s routes by addresses, emptied when the router's
        generation (its legs or owners) changed since they were found.
        """
        if source.routeGeneration != self.generation:
            source.routeCache = {}
            source.routeGeneration = self.generation
        return source.routeCache

    def _routeInto(self, cache, source, addresses):
        """
        Route C{addresses} (source and destination, concatenated, or
        C{None} for a frame that is not IP) for C{source}, and remember it.
        """
        if addresses is None:
            hit = self.route(source, None, None)
        else:
            half = len(addresses) // 2
            hit = self.route(source, addresses[:half], addresses[half:])
        # Routing may have claimed an address: what was found before may no
        # longer hold.
        cache = self._routeCache(source)
        if len(cache) >= ROUTE_CACHE_SIZE:
            cache.clear()
        cache[addresses] = hit
        return hit

    def _forwardAlike(self, source, frames, count, pair):
        """
        Route a batch whose frames all have the same addresses with one
        lookup; C{False} if it needs the frame-by-frame path (a drop, whose
        counting and refusal work frame by frame).
        """
        cache = self._routeCache(source)
        hit = cache.get(pair)
        if hit is None:
            hit = self._routeInto(cache, source, pair)
        target, reason = hit
        if reason is not None or target is None:
            return False
        self._send(source, target, [frames], len(frames), count)
        return True

    @staticmethod
    def _ownedSources(agent, frames):
        """
        Whether every frame of C{frames} is from an address C{agent} owns
        (or is not IP), and none is an announcement.
        """
        owned = agent.owned
        unpack = HEADER.unpack_from
        end = len(frames)
        offset = 0
        last = None
        while offset < end:
            (length,) = unpack(frames, offset)
            start = offset + HEADER_SIZE
            offset = start + length
            version = frames[start] >> 4
            if version == 4 and length >= 20:
                src = frames[start + 12 : start + 16]
            elif version == 6 and length >= 40:
                src = frames[start + 8 : start + 24]
            else:
                continue
            if length == ANNOUNCE_SIZE or (src != last and src not in owned):
                return False
            last = src
        return True

    def _send(self, source, target, buffers, size, count):
        if target is None:
            return
        gate = target.gate
        if gate.full and self.fair(target):
            # Fair mode: an agent that reads slowly never pauses what feeds
            # the others too; what it cannot take waits in its own bounded
            # queue, and beyond it is dropped.
            if gate.queued + size > MAX_QUEUED or self.queuedBytes + size > MAX_QUEUED_TOTAL:
                self.drops.count("target_full", count, leg=target.side)
                return
            gate.queued += size
            self.queuedBytes += size
        elif not source.refused:
            if gate.full:
                gate.willSend(source)
            else:
                gate.senders.add(source)
        stats = target.legStats
        stats.packetsSent += count
        stats.bytesSent += size
        target.packetsSent += count
        target.bytesSent += size
        writeThrough(target.transport, buffers)

    def _dropped(self, source, reason, dst):
        """
        Count a dropped frame; say why once a minute per destination.
        """
        self.drops.count(reason, leg=source.side)
        if reason in ("source_not_owned", "not_ip", "other_side_not_connected"):
            return  # counted and logged in aggregate; refusals are logged apart
        if not self._logAllowed((reason, dst)):
            return
        self.log.warn(
            "{leg} {peer}: dropping frames to {destination}: {description} "
            "(logged at most once a minute per destination)",
            leg=source.side,
            peer=source.peerName(),
            destination=addressText(dst),
            reason=reason,
            description=DROP_REASONS[reason],
        )

    # Pausing.

    def hold(self, leg, why):
        """
        Stop reading C{leg} until every reason to hold it is released.
        """
        if not self.attached(leg):
            return  # gone: a gate that still names it has nothing to hold
        if not leg.holds:
            leg.pauseProducing()
        leg.holds.add(why)

    def release(self, leg, why):
        holds = leg.holds
        if why in holds:
            holds.discard(why)
            if not holds and self.attached(leg):
                leg.resumeProducing()

    # What status shows.

    def report(self):
        """
        One dict per leg, for C{/legs} and C{python -m ent status}.
        """
        now = self.clock.seconds()
        out = []
        for side, legs in self.legs.items():
            for leg in legs:
                configured = [str(p) for p in leg.prefixes]
                learned = sorted(addressText(a) for a in leg.owned)
                out.append(
                    {
                        "side": side,
                        "peer": leg.peerName(),
                        "identity": leg.identityShort(),
                        "kind": leg.facts.kind if leg.facts is not None else "tcp",
                        "evidence": leg.evidenceText(),
                        "addresses": configured or learned[:8],
                        "addressCount": len(configured or learned),
                        "up": now - leg.since,
                        "paused": bool(leg.holds),
                        "packetsReceived": leg.packetsReceived,
                        "bytesReceived": leg.bytesReceived,
                        "packetsSent": leg.packetsSent,
                        "bytesSent": leg.bytesSent,
                    }
                )
        return out

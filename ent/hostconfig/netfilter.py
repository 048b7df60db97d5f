"""
ENT's nftables rules, kept in one table that ENT owns.

Because the whole table is ours, start-up can replace a stale one left by a
killed agent in one atomic transaction, and stop removes exactly ours,
never touching the user's rules.
"""

import json
import re
import socket
import subprocess
from dataclasses import dataclass, field

from twisted.logger import Logger

from ent.errors import ConfigurationError, NetfilterError, PrivilegeError

log = Logger()


@dataclass(frozen=True)
class AgentRecord:
    """
    What other agents on this host must know of this one, kept as the
    comment of its nftables rule: the table outlives a killed agent, so a
    restart under the same TUN name finds the policy rules it left, and no
    other agent mistakes them for its own.
    """

    routeTable: int = None
    priority: int = None
    gatewayPort: int = None
    zone: int = None

    _FIELDS = (
        ("route-table", "routeTable"),
        ("priority", "priority"),
        ("gateway-port", "gatewayPort"),
        ("zone", "zone"),
    )

    def comment(self):
        pairs = [f"{key}={getattr(self, name)}" for key, name in self._FIELDS if getattr(self, name) is not None]
        return " ".join(["ent-agent", *pairs])

    @classmethod
    def fromComment(cls, text):
        if not text.startswith("ent-agent"):
            return None
        found = dict(re.findall(r"([a-z-]+)=(\d+)", text))
        return cls(**{name: int(found[key]) for key, name in cls._FIELDS if key in found})


@dataclass(frozen=True)
class AgentPlan:
    """
    Everything an agent asks of netfilter: its C{mappings} (client side,
    L{ent.services.Mapping}) sent into the TUN, its C{exposures} (server
    side, L{ent.services.Exposure}) handed to their services, and
    containment: from the TUN only sources of C{tunNetwork} that route
    back into it, and of those only exposed services, ICMP echo to
    C{tunAddress} and replies to what went through the TUN are accepted;
    the rest is dropped and counted.  C{captureFrom} names interfaces
    whose routed connections are captured too.
    """

    tunName: str
    tunAddress: str
    mappings: tuple = ()
    exposures: tuple = ()
    record: AgentRecord = field(default_factory=AgentRecord)
    captureFrom: tuple = ()
    tunNetwork: str = "192.168.0.0/24"

    @property
    def zone(self):
        return self.record.zone or ZONE_BASE


# The named counters of the drops containment makes, by hook: "spoofed"
# counts sources outside the tunnel network or not routed back into the TUN.
DROP_COUNTERS = ("input_dropped", "forward_dropped", "spoofed_dropped")

# Each agent's conntrack zone, so that nothing from its TUN meets a
# connection that did not go through it: one of ZONE_SLOTS numbers from
# ZONE_BASE, away from the small ones a user's own rules tend to take.
ZONE_BASE = 6978
ZONE_SLOTS = 50000

_IDENTIFIER = re.compile(r"^[A-Za-z0-9_.-]+$")


def tableName(tunName):
    """
    One table per TUN, so several agents on one host keep out of each other's
    way; the TUN name is kept as it is (nft takes "-" and "."), so that two
    names never share a table.
    """
    if not _IDENTIFIER.match(tunName):
        raise ConfigurationError(
            f"--tun-name {tunName!r}: nftables cannot name a table after it; use letters, digits, '_', '-' and '.'"
        )
    return "ent_" + tunName


def chooseZone(tunName, records, ifindex=None):
    """
    The conntrack zone of the agent on C{tunName}: from its TUN's ifindex,
    which no other interface of the host has while it exists, passing over
    the zones other agents' C{records} hold.
    """
    if ifindex is None:
        ifindex = socket.if_nametoindex(tunName)
    taken = {record.zone for name, record in records.items() if name != tunName}
    for offset in range(ZONE_SLOTS):
        zone = ZONE_BASE + (ifindex + offset) % ZONE_SLOTS
        if zone not in taken:
            return zone
    raise NetfilterError(f"no free conntrack zone in {ZONE_BASE}-{ZONE_BASE + ZONE_SLOTS - 1}")


def _portSet(ports):
    if len(ports) == 1:
        return str(ports[0])
    return "{ " + ", ".join(str(p) for p in ports) + " }"


def _grouped(items, key):
    """
    Items with the same C{key} together, in the order first seen, so that
    rules differing only in the port become one rule on a set.
    """
    groups = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups.items()


def _mappingRules(plan, match, action=None):
    """
    The DNAT of each mapping (or C{action}); C{match} says where the packet
    comes from or goes to.
    """
    lines = []
    specific = sorted(plan.mappings, key=lambda m: m.address is None)
    for (proto, address, tunAddress, tunPort), group in _grouped(
        specific, lambda m: (m.proto, m.address, m.tunAddress, m.tunPort)
    ):
        destination = f"ip daddr {address} " if address else ""
        verdict = action or f"dnat to {tunAddress}:{tunPort}"
        lines.append(f"{match} {destination}{proto} dport {_portSet([m.port for m in group])} {verdict}")
    return lines


def _zoneRules(plan):
    """
    Raw prerouting, before conntrack: drop spoofed sources from the TUN,
    then put what comes from it into the agent's zone.  A connection
    forwarded to another host (--expose TUNPORT=HOST:PORT) stays in the
    host's zone, where its replies arrive, by another interface; one
    captured from an interface (--capture-from) is put in the zone on its
    way in, as its replies come from the TUN.
    """
    tun = f'iifname "{plan.tunName}"'
    spoofed = 'counter name "spoofed_dropped" drop'
    lines = [f"{tun} ip saddr != {plan.tunNetwork} {spoofed}", f"{tun} fib saddr . iif oif missing {spoofed}"]
    lines += [f"{tun} ip daddr {plan.tunAddress} {e.proto} dport {e.tunPort} return" for e in plan.exposures if e.host]
    lines.append(f"{tun} ct zone set {plan.zone}")
    for interface in plan.captureFrom:
        lines += _mappingRules(plan, f'iifname "{interface}"', f"ct zone set {plan.zone}")
    return lines


def _exposureRules(plan):
    """
    Exposed services: redirected to a local port or DNATed to another host;
    one that keeps its port on this host needs no NAT at all.
    """
    lines = []
    for exposure in plan.exposures:
        match = f'iifname "{plan.tunName}" {exposure.proto} dport {exposure.tunPort}'
        if exposure.host is not None:
            lines.append(f"{match} dnat to {exposure.host}:{exposure.port}")
        elif exposure.port != exposure.tunPort:
            lines.append(f"{match} redirect to :{exposure.port}")
    return lines


def _acceptExposed(plan, local):
    """
    Accept new connections to the exposed ports (of this host when
    C{local}, else those DNATed to another host): after NAT the port seen is
    the service's, so match the port the tunnel asked for.  One rule per
    port: nft lists a set of ct proto-dst values as "[invalid type]".
    """
    return [
        f"ct original ip daddr {plan.tunAddress} meta l4proto {e.proto} ct original proto-dst {e.tunPort} accept"
        for e in plan.exposures
        if (e.host is None) == local
    ]


def _chain(name, lines, hook=None, kind="nat", priority=None):
    """
    A chain of C{lines}; a base chain (policy accept) when C{hook} is given.
    """
    if hook is not None:
        priority = (-100 if kind == "nat" else 0) if priority is None else priority
        lines = [f"type {kind} hook {hook} priority {priority}; policy accept;", *lines]
    return f"  chain {name} {{\n" + "".join(f"    {line}\n" for line in lines) + "  }\n"


# While the gateway is away, new captured connections are refused here.
FAIL_CLOSED_CHAIN = "fail_closed"


def failClosedRules(tunName):
    """
    Refuse new connections that our NAT sent into the TUN (so DNATed), the
    host's own and those it routes (--capture-from): TCP with a reset, the
    rest with ICMP port unreachable.
    """
    match = f'oifname "{tunName}" ct state new ct status dnat'
    return [f"{match} meta l4proto tcp reject with tcp reset", f"{match} reject"]


def gatewayCommand(tunName, up):
    """
    nft's arguments that let captured connections through while the
    gateway is connected (C{up}) and refuse them while it is not: one
    command, applied atomically.
    """
    chain = f"ip {tableName(tunName)} {FAIL_CLOSED_CHAIN}"
    commands = [f"flush chain {chain}"]
    if not up:
        commands += [f"add rule {chain} {rule}" for rule in failClosedRules(tunName)]
    return ["; ".join(commands)]


def rulesFor(plan):
    """
    The body of ENT's table for C{plan}, in nft syntax.
    """
    tun = plan.tunName
    comment = f'comment "{plan.record.comment()}"'
    text = "".join(f"  counter {name} {{ }}\n" for name in DROP_COUNTERS)
    text += _chain("raw_prerouting", _zoneRules(plan), "prerouting", kind="filter", priority=-300)
    text += _chain("raw_output", [f'oifname "{tun}" ct zone set {plan.zone}'], "output", kind="filter", priority=-300)
    if plan.mappings:
        text += _chain("output", _mappingRules(plan, f'oifname "{tun}"'), "output")
    prerouting = _exposureRules(plan)
    for interface in plan.captureFrom:
        prerouting += _mappingRules(plan, f'iifname "{interface}"')
    if prerouting:
        text += _chain("prerouting", prerouting, "prerouting")
    postrouting = [f'iifname "{i}" oifname "{tun}" masquerade' for i in plan.captureFrom]
    if any(e.host is not None for e in plan.exposures):
        postrouting.append(f'iifname "{tun}" ct status dnat masquerade')
    if postrouting:
        text += _chain("postrouting", postrouting, "postrouting", priority=100)
    contained = [
        "ct state established,related accept",
        *_acceptExposed(plan, local=True),
        f"ip daddr {plan.tunAddress} icmp type echo-request accept",
        f'counter name "input_dropped" drop {comment}',
    ]
    forward = [f'iifname "{tun}" jump through_tunnel']
    if plan.mappings:
        # Captured connections, the host's own and those it routes.
        text += _chain(FAIL_CLOSED_CHAIN, failClosedRules(tun))
        text += _chain("leaving", [f'oifname "{tun}" jump {FAIL_CLOSED_CHAIN}'], "output", kind="filter")
        forward.append(f'oifname "{tun}" jump {FAIL_CLOSED_CHAIN}')
    text += _chain("input", [f'iifname "{tun}" jump from_tunnel'], "input", kind="filter")
    text += _chain("forward", forward, "forward", kind="filter")
    text += _chain("from_tunnel", contained)
    forwarded = [
        "ct state established,related accept",
        *_acceptExposed(plan, local=False),
        'counter name "forward_dropped" drop',
    ]
    text += _chain("through_tunnel", forwarded)
    return text


def installScript(plan):
    """
    One atomic transaction: drop any stale table of ours, create the new one.
    """
    table = tableName(plan.tunName)
    return f"add table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n{rulesFor(plan)}}}\n"


def removeScript(tunName):
    table = tableName(tunName)
    # "add" first makes the delete succeed even when the table is gone.
    return f"add table ip {table}\ndelete table ip {table}\n"


def _nft(argv, script=None, nft="nft"):
    """
    Run nft, raising a L{NetfilterError} that quotes it; return its output.
    """
    try:
        result = subprocess.run(
            [nft, *argv], input=None if script is None else script.encode(), capture_output=True, timeout=10
        )
    except FileNotFoundError:
        raise NetfilterError(f"{nft} not found: install the nftables package")
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        if "Operation not permitted" in message:
            raise PrivilegeError(f"nft: {message.splitlines()[0]}; run as root")
        raise NetfilterError(f"nft failed: {message}")
    return result.stdout.decode(errors="replace")


def runNft(script, nft="nft"):
    """
    Apply an nft script atomically.
    """
    _nft(["-f", "-"], script, nft)


def records(nft="nft"):
    """
    The agents whose tables are on this host: {TUN name: L{AgentRecord}}.
    A table of an older ENT, without a record, maps to an empty record.
    """
    found = {}
    for item in json.loads(_nft(["-j", "list", "ruleset"], nft=nft) or "{}").get("nftables", ()):
        for kind in ("table", "rule"):
            entry = item.get(kind)
            if not entry or entry.get("family") != "ip":
                continue
            name = entry["name"] if kind == "table" else entry["table"]
            if not name.startswith("ent_"):
                continue
            record = AgentRecord.fromComment(entry.get("comment", "")) if kind == "rule" else None
            if record is not None or name[4:] not in found:
                found[name[4:]] = record or AgentRecord()
    return found


def install(plan):
    runNft(installScript(plan))
    log.info("nftables table ip {table} installed", table=tableName(plan.tunName))


def remove(tunName):
    runNft(removeScript(tunName))
    log.info("nftables table ip {table} removed", table=tableName(tunName))

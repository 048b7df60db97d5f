"""
The policy route that sends captured connections into the TUN.

Captured destinations have no route of their own; a policy rule on the
destination port sends them to a table whose default route is the TUN, so
connect() succeeds and the source address is the TUN's.  Behind that route
the table holds an unreachable one: when the TUN is gone (the agent was
killed) captured connections fail at once instead of falling through to
the main table and leaving in plain by another route.  Our rules carry a
protocol tag; the table's default route names the agent they belong to (its
oif is that agent's TUN), so several agents on one host each find exactly
their own and never touch another's.
"""

import errno
import re
import socket
import zlib
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from twisted.logger import Logger

from ent.errors import PrivilegeError, RoutingError

log = Logger()

# rtm_protocol value marking ENT's policy rules and routes ("ENT" is 0xE7-ish).
RTPROT_ENT = 231
DEFAULT_TABLE = 6978
DEFAULT_PRIORITY = 6978
# Automatic tables and rule priorities come from this range, one number
# per agent for both; all of it lies before the main table's rule (32766).
SLOTS = 1000
# The metric of the unreachable route, behind the TUN's (metric 0).
FAIL_CLOSED_METRIC = 65535


@dataclass(frozen=True)
class Capture:
    """
    One policy rule: C{proto} packets to C{port} (and C{address}, if given)
    that enter by C{interface} ("lo": this host's own) go to the table.
    """

    proto: str
    port: int
    address: str = None
    interface: str = "lo"


@dataclass(frozen=True)
class PolicyRoute:
    tunName: str
    ports: tuple
    table: int = DEFAULT_TABLE
    priority: int = DEFAULT_PRIORITY
    captures: tuple = ()

    def rules(self):
        """
        The rules to add: the C{captures}, or TCP to each of C{ports}.
        """
        return self.captures or tuple(Capture("tcp", port) for port in self.ports)


@dataclass
class Claim:
    """
    ENT's policy rules that point at one table, and the agent they are for.
    """

    table: int
    tunName: str = None
    alive: bool = False
    ports: list = field(default_factory=list)
    priorities: set = field(default_factory=set)

    def owner(self):
        if self.alive:
            return f"the agent on {self.tunName} (table {self.table})"
        if self.tunName:
            return f"the stopped agent on {self.tunName} (table {self.table})"
        return f"a stopped agent (table {self.table})"


@dataclass
class HostState:
    """
    What the kernel holds that decides where an agent's rules may go.
    """

    claims: dict = field(default_factory=dict)  # table: Claim
    tables: set = field(default_factory=set)  # any rule or route uses these
    priorities: dict = field(default_factory=dict)  # priority: {table, ...}
    interfaces: set = field(default_factory=set)
    records: dict = field(default_factory=dict)  # TUN name: AgentRecord


def _ports(rule):
    text = rule.get_attr("FRA_DPORT_RANGE")
    if not text:
        return []
    first, _, last = text.partition(":")
    return list(range(int(first), int(last or first) + 1))


def readState(ipr, records):
    """
    Read every rule, ENT's routes and the interfaces; C{records} are the
    agents' own records (from their nftables tables).
    """
    state = HostState(records=records)
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    state.interfaces = set(names.values())
    for rule in ipr.get_rules(family=socket.AF_INET):
        table = rule.get_attr("FRA_TABLE") or rule["table"]
        priority = rule.get_attr("FRA_PRIORITY") or 0
        state.tables.add(table)
        state.priorities.setdefault(priority, set()).add(table)
        if rule.get_attr("FRA_PROTOCOL") == RTPROT_ENT:
            claim = state.claims.setdefault(table, Claim(table))
            claim.ports.extend(_ports(rule))
            claim.priorities.add(priority)
    for route in ipr.route("dump", family=socket.AF_INET):
        table = route.get_attr("RTA_TABLE")
        state.tables.add(table)
        if route.get("proto") == RTPROT_ENT and route.get("dst_len") == 0:
            claim = state.claims.setdefault(table, Claim(table))
            if route.get_attr("RTA_OIF") is not None:
                # The TUN's route; the unreachable one outlives the agent.
                claim.tunName = names.get(route.get_attr("RTA_OIF"))
                claim.alive = True
    for name, record in records.items():
        claim = state.claims.get(record.routeTable)
        if claim is not None and claim.tunName is None:
            claim.tunName = name
            claim.alive = name in state.interfaces
    return state


def preferredSlot(tunName):
    """
    A name ending in a number N (tunN) gets table and priority 6978+N, any
    other name a number of its own: an agent keeps its table across
    restarts unless another took it.
    """
    match = re.fullmatch(r"\D*?(\d+)", tunName)
    offset = int(match.group(1)) if match else zlib.crc32(tunName.encode())
    return DEFAULT_TABLE + offset % SLOTS


def _slots(tunName):
    first = preferredSlot(tunName) - DEFAULT_TABLE
    return [DEFAULT_TABLE + (first + i) % SLOTS for i in range(SLOTS)]


def _inRange(number):
    return DEFAULT_TABLE <= number < DEFAULT_TABLE + SLOTS


def planPolicy(state, tunName, ports, table=None, gatewayPort=None):
    """
    Where the policy of a new agent on C{tunName} goes: a L{PolicyRoute}
    (C{None} without ports) and the tables of stale rules of the same TUN
    name, which only a killed agent of that name can have left (the new
    one's TUN exists, so no other agent has it).  Refuse, naming the other
    agent, what would take or break another's.
    """
    checkConflicts(state, tunName, ports, gatewayPort)
    stale = [t for t, c in state.claims.items() if c.tunName == tunName]
    if not ports:
        return None, stale
    mine = state.records.get(tunName)
    usable = lambda p, t: _inRange(p) and state.priorities.get(p, set()) <= {t, *stale}
    if table is None:
        free = [t for t in _slots(tunName) if (t not in state.tables or t in stale) and usable(t, t)]
        if mine is not None and mine.routeTable in stale:
            free.insert(0, mine.routeTable)
        if not free:
            raise RoutingError(f"no free routing table in {DEFAULT_TABLE}-{DEFAULT_TABLE + SLOTS - 1}")
        table = free[0]
    elif table in state.claims and table not in stale:
        raise RoutingError(f"--route-table {table} is in use by {state.claims[table].owner()}")
    recorded = [mine.priority] if mine is not None and mine.priority else []
    priority = next((p for p in [table, *recorded, *_slots(tunName)] if usable(p, table)), None)
    if priority is None:
        raise RoutingError(f"no free rule priority in {DEFAULT_PRIORITY}-{DEFAULT_PRIORITY + SLOTS - 1}")
    return PolicyRoute(tunName, tuple(ports), table, priority), stale


def checkConflicts(state, tunName, ports, gatewayPort=None):
    """
    Refuse ports another live agent captures, and a capture of another's
    gateway connection (or by another, of ours): either would loop.
    """
    for claim in state.claims.values():
        if not claim.alive or claim.tunName == tunName:
            continue
        for port in ports:
            if port in claim.ports:
                raise RoutingError(f"--dport {port} is already captured by {claim.owner()}")
        if gatewayPort in claim.ports:
            raise RoutingError(
                f"the gateway port {gatewayPort} is captured by {claim.owner()}: "
                "this agent's gateway connection would loop into that tunnel"
            )
    for name, record in state.records.items():
        if name != tunName and name in state.interfaces and record.gatewayPort in ports:
            raise RoutingError(
                f"--dport {record.gatewayPort} would capture the gateway connection of the agent on {name}"
            )


def _wrap(action, e):
    if e.code == errno.EPERM:
        return PrivilegeError(f"{action}: operation not permitted; run as root")
    return RoutingError(f"{action}: {e}")


def removePolicy(table, tunName, records=None, ipr=None):
    """
    Remove every rule of ours that points at C{table}, and our route there,
    unless the table belongs to another live agent (its route goes through
    that agent's TUN, or C{records} say so): those are its rules.  Return
    how many rules were removed.
    """
    if ipr is None:
        with IPRoute() as ipr:
            return removePolicy(table, tunName, records, ipr)
    try:
        claim = readState(ipr, records or {}).claims.get(table)
        if claim is None:
            return 0
        if claim.alive and claim.tunName != tunName:
            log.warn(
                "table {table} is the agent's on {owner}: its rules are left alone", table=table, owner=claim.tunName
            )
            return 0
        removed = 0
        for rule in ipr.get_rules(family=socket.AF_INET):
            if rule.get_attr("FRA_PROTOCOL") == RTPROT_ENT and rule.get_attr("FRA_TABLE") == table:
                destination = {}
                if rule.get_attr("FRA_DST"):
                    destination = {"dst": rule.get_attr("FRA_DST"), "dst_len": rule["dst_len"]}
                ipr.rule(
                    "del",
                    table=table,
                    priority=rule.get_attr("FRA_PRIORITY"),
                    protocol=RTPROT_ENT,
                    dport_range=rule.get_attr("FRA_DPORT_RANGE"),
                    iifname=rule.get_attr("FRA_IIFNAME"),
                    ip_proto=rule.get_attr("FRA_IP_PROTO"),
                    **destination,
                )
                removed += 1
        for route in ipr.route("dump", table=table):
            if route.get("proto") == RTPROT_ENT:
                ipr.route(
                    "del",
                    table=table,
                    dst="0.0.0.0/0",
                    oif=route.get_attr("RTA_OIF"),
                    type=route["type"],
                    priority=route.get_attr("RTA_PRIORITY"),
                )
    except NetlinkError as e:
        raise _wrap(f"removing policy routing of table {table}", e)
    if removed:
        log.info("removed {count} policy rules of table {table}", count=removed, table=table)
    return removed


def claimPolicy(tunName, ports, table, gatewayPort, records):
    """
    Plan an agent's policy (see L{planPolicy}) and remove the stale rules a
    killed agent of the same TUN name left; configure nothing else.
    """
    try:
        with IPRoute() as ipr:
            policy, stale = planPolicy(readState(ipr, records), tunName, ports, table, gatewayPort)
            for old in stale:
                # The table the new agent takes keeps failing closed until
                # its rules replace these (installPolicy).
                if policy is None or old != policy.table:
                    removePolicy(old, tunName, records, ipr)
    except NetlinkError as e:
        raise _wrap("reading the policy rules", e)
    return policy


def installPolicy(policy, gatewayPort=None, records=None):
    """
    Check again, just before, that no other agent took the table or the
    ports meanwhile; then one rule per captured port and a default route
    through the TUN in our table.  A failure takes back what was added.
    """
    action = f"installing policy route via {policy.tunName}"
    try:
        with IPRoute() as ipr:
            planPolicy(readState(ipr, records or {}), policy.tunName, policy.ports, policy.table, gatewayPort)
            removePolicy(policy.table, policy.tunName, records, ipr)
            try:
                _add(ipr, policy)
            except NetlinkError as e:
                removePolicy(policy.table, policy.tunName, records, ipr)
                raise _wrap(action, e)
    except NetlinkError as e:
        raise _wrap(action, e)
    log.info(
        "policy rules for tcp ports {ports} route via {tun} (table {table}, priority {priority})",
        ports=",".join(map(str, policy.ports)),
        tun=policy.tunName,
        table=policy.table,
        priority=policy.priority,
    )


_IP_PROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


def ruleArguments(policy, capture):
    """
    pyroute2's arguments for the rule of C{capture}.
    """
    arguments = dict(
        table=policy.table,
        priority=policy.priority,
        protocol=RTPROT_ENT,
        iifname=capture.interface,
        ip_proto=_IP_PROTO[capture.proto],
        dport_range=f"{capture.port}:{capture.port}",
    )
    if capture.address is not None:
        arguments.update(dst=capture.address, dst_len=32)
    return arguments


def _add(ipr, policy):
    (index,) = ipr.link_lookup(ifname=policy.tunName)
    ipr.route(
        "add", dst="0.0.0.0/0", type="unreachable", table=policy.table, proto=RTPROT_ENT, priority=FAIL_CLOSED_METRIC
    )
    ipr.route("add", dst="0.0.0.0/0", oif=index, table=policy.table, proto=RTPROT_ENT)
    for capture in policy.rules():
        ipr.rule("add", **ruleArguments(policy, capture))

"""
The policy route that sends captured connections into the TUN.

Captured destinations have no route of their own; a policy rule on the
destination port sends them to a table whose default route is the TUN, so
connect() succeeds and the source address is the TUN's.  Our rules carry a
protocol tag, so clean-up finds exactly ours.
"""

import errno
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from twisted.logger import Logger

from ent.errors import PrivilegeError, RoutingError

log = Logger()

# rtm_protocol value marking ENT's policy rules and routes ("ENT" is 0xE7-ish).
RTPROT_ENT = 231
DEFAULT_TABLE = 6978
DEFAULT_PRIORITY = 6978


@dataclass(frozen=True)
class PolicyRoute:
    tunName: str
    ports: tuple
    table: int = DEFAULT_TABLE
    priority: int = DEFAULT_PRIORITY


def _ours(rule, table):
    return (
        rule.get_attr("FRA_PROTOCOL") == RTPROT_ENT
        and rule.get_attr("FRA_TABLE") == table
    )


def _wrap(action, e):
    if e.code == errno.EPERM:
        return PrivilegeError(f"{action}: operation not permitted; run as root")
    return RoutingError(f"{action}: {e}")


def removePolicy(table=DEFAULT_TABLE):
    """
    Remove every rule of ours that points at C{table}, and flush the table.
    Return how many rules were removed.
    """
    removed = 0
    try:
        with IPRoute() as ipr:
            for rule in ipr.get_rules(family=socket.AF_INET):
                if _ours(rule, table):
                    ipr.rule(
                        "del",
                        table=table,
                        priority=rule.get_attr("FRA_PRIORITY"),
                        protocol=RTPROT_ENT,
                        dport_range=rule.get_attr("FRA_DPORT_RANGE"),
                        iifname=rule.get_attr("FRA_IIFNAME"),
                        ip_proto=rule.get_attr("FRA_IP_PROTO"),
                    )
                    removed += 1
            for route in ipr.route("dump", table=table):
                if route.get("proto") == RTPROT_ENT:
                    ipr.route("del", table=table, dst="0.0.0.0/0",
                              oif=route.get_attr("RTA_OIF"))
    except NetlinkError as e:
        raise _wrap(f"removing policy routing of table {table}", e)
    if removed:
        log.info("removed {count} policy rules of table {table}", count=removed, table=table)
    return removed


def installPolicy(policy):
    """
    Replace any stale rules of ours with one rule per captured port and a
    default route through the TUN in our table.
    """
    removePolicy(policy.table)
    try:
        with IPRoute() as ipr:
            (index,) = ipr.link_lookup(ifname=policy.tunName)
            ipr.route("add", dst="0.0.0.0/0", oif=index, table=policy.table,
                      proto=RTPROT_ENT)
            for port in policy.ports:
                ipr.rule(
                    "add",
                    table=policy.table,
                    priority=policy.priority,
                    protocol=RTPROT_ENT,
                    iifname="lo",
                    ip_proto=socket.IPPROTO_TCP,
                    dport_range=f"{port}:{port}",
                )
    except NetlinkError as e:
        raise _wrap(f"installing policy route via {policy.tunName}", e)
    log.info(
        "policy rules for tcp ports {ports} route via {tun} (table {table})",
        ports=",".join(map(str, policy.ports)), tun=policy.tunName, table=policy.table,
    )

"""
ENT's nftables rules, kept in one table that ENT owns.

Because the whole table is ours, start-up can replace a stale one left by a
killed agent in one atomic transaction, and stop removes exactly ours,
never touching the user's rules.
"""

import json
import re
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

    _FIELDS = (("route-table", "routeTable"), ("priority", "priority"), ("gateway-port", "gatewayPort"))

    def comment(self):
        pairs = [f"{key}={getattr(self, name)}" for key, name in self._FIELDS
                 if getattr(self, name) is not None]
        return " ".join(["ent-agent", *pairs])

    @classmethod
    def fromComment(cls, text):
        if not text.startswith("ent-agent"):
            return None
        found = dict(re.findall(r"([a-z-]+)=(\d+)", text))
        return cls(**{name: int(found[key]) for key, name in cls._FIELDS if key in found})


@dataclass(frozen=True)
class CapturePlan:
    """
    Client side: send the app's TCP connections to C{ports} into the tunnel,
    rewritten to the far agent's tunnel address and service port.
    """

    tunName: str
    ports: tuple
    peerAddress: str
    tunnelPort: int
    record: AgentRecord = field(default_factory=AgentRecord)


@dataclass(frozen=True)
class ReplayPlan:
    """
    Server side: connections arriving from the tunnel at C{tunnelPort} are
    redirected to the local service at C{port}.
    """

    tunName: str
    port: int
    tunnelPort: int
    record: AgentRecord = field(default_factory=AgentRecord)


_IDENTIFIER = re.compile(r"^[A-Za-z0-9_.-]+$")


def tableName(tunName):
    """
    One table per TUN, so several agents on one host keep out of each other's
    way; the TUN name is kept as it is (nft takes "-" and "."), so that two
    names never share a table.
    """
    if not _IDENTIFIER.match(tunName):
        raise ConfigurationError(
            f"--tun-name {tunName!r}: nftables cannot name a table after it; "
            "use letters, digits, '_', '-' and '.'"
        )
    return "ent_" + tunName


def _portSet(ports):
    if len(ports) == 1:
        return str(ports[0])
    return "{ " + ", ".join(str(p) for p in ports) + " }"


def _comment(plan):
    return f' comment "{plan.record.comment()}"'


def rulesFor(plan):
    """
    The body of ENT's table for C{plan}, in nft syntax.
    """
    if isinstance(plan, CapturePlan):
        return (
            "  chain output {\n"
            "    type nat hook output priority -100; policy accept;\n"
            f'    oifname "{plan.tunName}" tcp dport {_portSet(plan.ports)} '
            f"dnat to {plan.peerAddress}:{plan.tunnelPort}{_comment(plan)}\n"
            "  }\n"
        )
    if isinstance(plan, ReplayPlan):
        return (
            "  chain prerouting {\n"
            "    type nat hook prerouting priority -100; policy accept;\n"
            f'    iifname "{plan.tunName}" tcp dport {plan.tunnelPort} '
            f"redirect to :{plan.port}{_comment(plan)}\n"
            "  }\n"
        )
    raise TypeError(f"unknown plan {plan!r}")


def installScript(plan):
    """
    One atomic transaction: drop any stale table of ours, create the new one.
    """
    table = tableName(plan.tunName)
    return (
        f"add table ip {table}\n"
        f"delete table ip {table}\n"
        f"table ip {table} {{\n{rulesFor(plan)}}}\n"
    )


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
            [nft, *argv], input=None if script is None else script.encode(),
            capture_output=True, timeout=10,
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

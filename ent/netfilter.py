"""
ENT's nftables rules, kept in one table that ENT owns.

Because the whole table is ours, start-up can replace a stale one left by a
killed agent in one atomic transaction, and stop removes exactly ours,
never touching the user's rules.
"""

import subprocess
from dataclasses import dataclass

from twisted.logger import Logger

from ent.errors import NetfilterError, PrivilegeError

log = Logger()


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


@dataclass(frozen=True)
class ReplayPlan:
    """
    Server side: connections arriving from the tunnel at C{tunnelPort} are
    redirected to the local service at C{port}.
    """

    tunName: str
    port: int
    tunnelPort: int


def tableName(tunName):
    """
    One table per TUN, so several agents on one host keep out of each other's way.
    """
    return "ent_" + tunName.replace("-", "_").replace(".", "_")


def _portSet(ports):
    if len(ports) == 1:
        return str(ports[0])
    return "{ " + ", ".join(str(p) for p in ports) + " }"


def rulesFor(plan):
    """
    The body of ENT's table for C{plan}, in nft syntax.
    """
    if isinstance(plan, CapturePlan):
        return (
            "  chain output {\n"
            "    type nat hook output priority -100; policy accept;\n"
            f'    oifname "{plan.tunName}" tcp dport {_portSet(plan.ports)} '
            f"dnat to {plan.peerAddress}:{plan.tunnelPort}\n"
            "  }\n"
        )
    if isinstance(plan, ReplayPlan):
        return (
            "  chain prerouting {\n"
            "    type nat hook prerouting priority -100; policy accept;\n"
            f'    iifname "{plan.tunName}" tcp dport {plan.tunnelPort} '
            f"redirect to :{plan.port}\n"
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


def runNft(script, nft="nft"):
    """
    Apply an nft script atomically, raising a L{NetfilterError} that quotes nft.
    """
    try:
        result = subprocess.run(
            [nft, "-f", "-"], input=script.encode(), capture_output=True, timeout=10
        )
    except FileNotFoundError:
        raise NetfilterError(f"{nft} not found: install the nftables package")
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip()
        if "Operation not permitted" in message:
            raise PrivilegeError(f"nft: {message.splitlines()[0]}; run as root")
        raise NetfilterError(f"nft failed: {message}")


def install(plan):
    runNft(installScript(plan))
    log.info("nftables table ip {table} installed", table=tableName(plan.tunName))


def remove(tunName):
    runNft(removeScript(tunName))
    log.info("nftables table ip {table} removed", table=tableName(tunName))

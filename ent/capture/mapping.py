"""
What an agent carries: the services a client agent maps into the tunnel
(C{--map}, and ENG's C{--dport}) and those a server agent exposes to it
(C{--expose}, and ENG's C{--replay}).

Parsed here, strictly, with no kernel and no reactor, so a typo is refused
in one line naming the flag and the value before anything is configured.
"""

import ipaddress
import re
from dataclasses import dataclass

from ent.cli import parsePort
from ent.errors import ConfigurationError

PROTOCOLS = ("tcp", "udp")

_MAP = re.compile(
    r"(?:(?P<address>[0-9.]+):)?(?P<port>[0-9]+)(?:/(?P<proto>[a-z]+))?"
    r"=(?P<tunAddress>[0-9.]+):(?P<tunPort>[0-9]+)"
)
_EXPOSE = re.compile(r"(?P<tunPort>[0-9]+)(?:/(?P<proto>[a-z]+))?(?:=(?:(?P<host>[0-9.]+):)?(?P<port>[0-9]+))?")


@dataclass(frozen=True)
class Mapping:
    """
    Client side: the app's connections to C{address}:C{port} (any address
    when C{None}) go to C{tunAddress}:C{tunPort} inside the tunnel.
    C{flag} is how the user gave it, for messages.
    """

    proto: str
    address: str
    port: int
    tunAddress: str
    tunPort: int
    flag: str = "--map"

    def key(self):
        return (self.proto, self.address, self.port)


@dataclass(frozen=True)
class Exposure:
    """
    Server side: what arrives from the tunnel for this agent's tunnel
    address on C{tunPort} goes to C{host}:C{port} (this host when C{host}
    is C{None}).
    """

    proto: str
    tunPort: int
    host: str
    port: int
    flag: str = "--expose"

    def key(self):
        return (self.proto, self.tunPort)


def _proto(text, given):
    proto = text or "tcp"
    if proto not in PROTOCOLS:
        raise ConfigurationError(f"{given}: protocol {proto!r} is not tcp or udp")
    return proto


def _address(text, given):
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ConfigurationError(f"{given}: {text!r} is not an IPv4 address")


def parseMapping(text, flag="--map", defaultAddress=None):
    """
    C{[ADDR:]PORT[/udp]=TUNADDR:PORT}, of C{--map} or (with
    C{defaultAddress} 127.0.0.1) of the user-space stack's C{--listen}.
    """
    given = f"{flag} {text!r}"
    match = _MAP.fullmatch(text)
    if match is None:
        raise ConfigurationError(f"{given} is not [ADDR:]PORT[/udp]=TUNADDR:PORT")
    address = match["address"] and _address(match["address"], given)
    return Mapping(
        _proto(match["proto"], given),
        address or defaultAddress,
        parsePort(match["port"], f"{given}: port"),
        _address(match["tunAddress"], given),
        parsePort(match["tunPort"], f"{given}: tunnel port"),
        f"{flag} {text}",
    )


def parseListen(text):
    """
    C{--listen [ADDR:]PORT[/udp]=TUNADDR:PORT}: a local port (127.0.0.1
    unless given) whose connections become flows inside the tunnel.
    """
    return parseMapping(text, "--listen", "127.0.0.1")


def parseExposure(text):
    """
    C{TUNPORT[/udp][=[HOST:]PORT]}.
    """
    given = f"--expose {text!r}"
    match = _EXPOSE.fullmatch(text)
    if match is None:
        raise ConfigurationError(f"{given} is not TUNPORT[/udp][=[HOST:]PORT]")
    tunPort = parsePort(match["tunPort"], f"{given}: tunnel port")
    host = match["host"] and _address(match["host"], given)
    port = parsePort(match["port"], f"{given}: port") if match["port"] else tunPort
    return Exposure(_proto(match["proto"], given), tunPort, host, port, f"--expose {text}")


def checkUnique(items):
    """
    Refuse two items for the same traffic: which one is meant is a guess.
    """
    seen = {}
    for item in items:
        other = seen.setdefault(item.key(), item)
        if other is not item:
            raise ConfigurationError(f"{item.flag} and {other.flag} are for the same {item.proto} port")
    return tuple(items)

"""
Turn ENT's address options into Twisted endpoints.

ENG took plain C{HOST:PORT} and C{PORT}; ENT takes those and any Twisted
endpoint string (C{tcp:...}, C{tls:...}, C{unix:...}, plugins of ours).
"""

import ipaddress
import re

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    _parse,
    clientFromString,
    serverFromString,
)
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from ent.cli import parsePort
from ent.errors import ConfigurationError


@implementer(IStreamClientEndpoint)
class DescribedEndpoint:
    """
    A client endpoint that names itself as the operator wrote it, and logs
    (and counts in C{legStats}, if given) why a connection attempt failed
    before the caller retries.
    """

    log = Logger()

    def __init__(self, endpoint, description, legStats=None):
        self.endpoint = endpoint
        self.description = description
        self.legStats = legStats

    def __repr__(self):
        return self.description

    def connect(self, factory):
        def failed(reason):
            # A stop, not a failure: our Deferred was cancelled before or
            # (Twisted's own error, for a HostnameEndpoint) during the attempt.
            if reason.check(CancelledError, ConnectingCancelledError):
                return reason
            if self.legStats is not None:
                self.legStats.connectFailures += 1
            self.log.warn(
                "cannot connect to {endpoint}: {reason}",
                leg=self.legStats.name if self.legStats is not None else None,
                endpoint=self.description,
                reason=failureText(reason),
            )
            return reason

        return self.endpoint.connect(factory).addErrback(failed)


def addressText(address):
    """
    C{HOST:PORT} of an IP or hostname address, C{vsock:CID:PORT} of a vsock
    one: not the C{repr} of Twisted's address classes.
    """
    host = getattr(address, "host", getattr(address, "hostname", None))
    if host is None:
        return str(address)
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


def failureText(reason):
    """
    Why a connection attempt failed, for the log: an error that carries
    only an address (C{ConnectingCancelledError}) reads as C{HOST:PORT}.
    """
    if reason.check(ConnectingCancelledError):
        return f"attempt to connect to {addressText(reason.value.address)} cancelled"
    return reason.getErrorMessage()


def listeningService(endpoint, factory):
    """
    A service listening on C{endpoint}; a port it cannot listen on fails
    the start (one line, by L{ent.services.startup.StartupGuard}) instead of leaving a
    service running that nobody can reach.
    """
    service = StreamServerEndpointService(endpoint, factory)
    service._raiseSynchronously = True
    return service


_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d+)$")
_INTERFACE_PORT = re.compile(r"^(?:(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[0-9.]+)):)?(?P<port>\d+)$")


def portIn(description, port, what):
    """
    The port of C{description} that option C{what} gave; an error names both.
    """
    return parsePort(port, f"{what} {description!r}: port")


def isHostPort(text):
    return _HOST_PORT.match(text) is not None


def hostOf(text):
    """
    The host of a C{HOST:PORT} description, or C{None} for an endpoint string.
    """
    match = _HOST_PORT.match(text)
    if match is None:
        return None
    return match.group("v6") or match.group("host")


_TCP_CLIENTS = ("tcp", "tls", "ssl")
_TCP_SERVERS = ("tcp", "tcp6", "ssl")


def tcpPortOf(text, server=False):
    """
    The TCP port a client (or C{server}) description connects to (listens
    on), or C{None} when it is not TCP (unix, vsock, ...) or says no port.
    """
    match = (_INTERFACE_PORT if server else _HOST_PORT).match(text)
    if match:
        return int(match.group("port"))
    try:
        args, kwargs = _parse(text)
    except (ValueError, TypeError):
        return None
    if args[0] not in (_TCP_SERVERS if server else _TCP_CLIENTS):
        return None
    position = 1 if server else 2
    try:
        return int(kwargs.get("port", args[position] if len(args) > position else None))
    except (TypeError, ValueError):
        return None


def isPlainListen(text):
    return _INTERFACE_PORT.match(text) is not None


def checkPlainListen(text, what):
    """
    Check C{PORT} or C{ADDR:PORT}.
    """
    if not isPlainListen(text):
        raise ConfigurationError(f"{what} {text!r} is not [ADDR:]PORT")
    host, _, port = text.rpartition(":")
    portIn(text, port, what)
    if host:
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ConfigurationError(f"{what} {text!r}: {host!r} is not an IP address")
    return text


def checkServerDescription(text, what):
    """
    Check C{PORT}, C{ADDR:PORT} or a server endpoint string.
    """
    if isPlainListen(text):
        return checkPlainListen(text, what)
    if ":" not in text:
        raise ConfigurationError(f"{what} {text!r} is neither [ADDR:]PORT nor an endpoint string")
    # An endpoint string: its parser checks it when it is built.
    return text


def checkClientDescription(text, what):
    """
    Check C{HOST:PORT} or an endpoint string without building anything.
    """
    match = _HOST_PORT.match(text)
    if match:
        portIn(text, match.group("port"), what)
        return
    if ":" not in text:
        raise ConfigurationError(f"{what} {text!r} is neither HOST:PORT nor an endpoint string")


def clientEndpoint(reactor, text, what="client endpoint"):
    """
    An L{IStreamClientEndpoint} for C{HOST:PORT} or a client endpoint string
    (C{what}: the flag that gave it, for the error).
    """
    match = _HOST_PORT.match(text)
    if match:
        host = match.group("v6") or match.group("host")
        port = portIn(text, match.group("port"), what)
        return HostnameEndpoint(reactor, host, port)
    try:
        return clientFromString(reactor, text)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigurationError(f"{what} {text!r}: {_parserError(e)}")


# Connections the kernel queues for accept (Twisted's default is 50): a
# burst of connections must not make a real agent's connect wait for SYN
# retransmissions.
LISTEN_BACKLOG = 1024


def serverEndpoint(reactor, text, what="server endpoint"):
    """
    An L{IStreamServerEndpoint} for C{PORT}, C{ADDR:PORT} or a server endpoint
    string (C{what}: the flag that gave it, for the error).
    """
    match = _INTERFACE_PORT.match(text)
    if match:
        port = portIn(text, match.group("port"), what)
        if match.group("v6"):
            return TCP6ServerEndpoint(reactor, port, backlog=LISTEN_BACKLOG, interface=match.group("v6"))
        host = match.group("host") or "0.0.0.0"
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigurationError(f"{what} {text!r}: {host!r} is not an IP address")
        return TCP4ServerEndpoint(reactor, port, backlog=LISTEN_BACKLOG, interface=host)
    try:
        return serverFromString(reactor, text)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigurationError(f"{what} {text!r}: {_parserError(e)}")


def _parserError(error):
    """
    The reason an endpoint string parser gave; a C{KeyError}'s own C{str}
    would be the quoted key.
    """
    if isinstance(error, KeyError) and error.args:
        return f"no field {error.args[0]!r}"
    return str(error)

"""
vsock (AF_VSOCK) as Twisted endpoints: C{vsock:CID:PORT} to connect,
C{vsock:PORT} to listen.

An enclave has no network, only vsock to its parent; with these endpoints
every ENT leg and the socket relay can run over it unchanged.  Twisted's
reactor only knows AF_INET, AF_INET6 and AF_UNIX, so the port, the accepted
and the connecting transports are Twisted's TCP classes with the address
family and the addresses changed; reading, writing, half-close and
backpressure are Twisted's own, the same code that carries TCP.
"""

import fcntl
import socket
import struct
from dataclasses import dataclass

from twisted.internet import base, defer, error, tcp
from twisted.internet.endpoints import _WrappingFactory
from twisted.internet.interfaces import (
    IAddress,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

from ent.cli import parseNumber
from ent.errors import ConfigurationError, VsockAddressError, VsockConnectError

CID_ANY = socket.VMADDR_CID_ANY
PORT_ANY = socket.VMADDR_PORT_ANY
# CIDs and ports are 32 bits; the all-ones value of each means "any".
LAST = 0xFFFFFFFE
DEFAULT_TIMEOUT = 30
# _IO(7, 0xb9) of <linux/vm_sockets.h>.
IOCTL_VM_SOCKETS_GET_LOCAL_CID = 0x7B9


def _anyOr(value, anyValue):
    return "any" if value == anyValue else str(value)


@implementer(IAddress)
@dataclass(frozen=True)
class VsockAddress:
    """
    The address of one end of a vsock connection.
    """

    cid: int
    port: int

    def __str__(self):
        return f"vsock:{_anyOr(self.cid, CID_ANY)}:{_anyOr(self.port, PORT_ANY)}"


def localCid(device="/dev/vsock"):
    """
    This machine's own CID, what its peers connect to (an enclave's is set
    by its parent, a VM's by its hypervisor).
    """
    with open(device, "rb") as f:
        return struct.unpack("I", fcntl.ioctl(f, IOCTL_VM_SOCKETS_GET_LOCAL_CID, bytes(4)))[0]


def _number(text, what):
    try:
        return parseNumber(text, f"vsock {what}")
    except ConfigurationError as e:
        raise VsockAddressError(str(e))


def parseCid(text):
    """
    A CID to connect to or listen on (0 hypervisor, 1 local, 2 host, 3... VMs).
    """
    cid = _number(text, "CID")
    if not 0 <= cid <= LAST:
        raise VsockAddressError(f"vsock CID {cid} is out of range 0-{LAST}")
    return cid


def parsePort(text, listen=False):
    """
    A vsock port; to listen, 0 means any free port, as it does for TCP.
    """
    port = _number(text, "port")
    if not 0 <= port <= LAST:
        raise VsockAddressError(f"vsock port {port} is out of range 0-{LAST}")
    if listen and port == 0:
        return PORT_ANY
    return port


class VsockServer(tcp.Server):
    """
    An accepted vsock connection.
    """

    def getHost(self):
        return VsockAddress(*self.socket.getsockname())

    def getPeer(self):
        return VsockAddress(*self.client)


class VsockPort(tcp.Port):
    """
    A listening vsock socket.
    """

    addressFamily = socket.AF_VSOCK
    transport = VsockServer
    _type = "VSOCK"

    def __init__(self, port, factory, backlog=50, cid=CID_ANY, reactor=None):
        # Not tcp.Port.__init__: it takes the interface for an IP address.
        base.BasePort.__init__(self, reactor=reactor)
        self.port = port
        self.interface = cid
        self.factory = factory
        self.backlog = backlog

    def createInternetSocket(self):
        # No SO_REUSEADDR/SO_REUSEPORT: they are TCP's business.
        return base.BasePort.createInternetSocket(self)

    def startListening(self):
        try:
            tcp.Port.startListening(self)
        except error.CannotListenError as e:
            raise error.CannotListenError(
                f"vsock:{_anyOr(self.interface, CID_ANY)}", _anyOr(self.port, PORT_ANY), e.socketError
            ) from None

    def _buildAddr(self, address):
        return VsockAddress(*address)

    def getHost(self):
        return VsockAddress(*self.socket.getsockname())


class VsockClient(tcp.BaseClient):
    """
    An outgoing vsock connection, from its non-blocking connect on.
    """

    addressFamily = socket.AF_VSOCK

    def __init__(self, cid, port, connector, reactor):
        self.connector = connector
        self.addr = self.realAddress = (cid, port)
        try:
            skt = self.createInternetSocket()
        except OSError as e:
            self._finishInit(None, None, error.ConnectBindError(e.errno, e.strerror), reactor)
        else:
            self._finishInit(self.doConnect, skt, None, reactor)

    def failIfNotConnected(self, err):
        # Name the destination: "No such device" alone says nothing of where.
        # A plain UserError is the caller stopping the attempt, not a failure.
        if type(err) is not error.UserError:
            err = VsockConnectError(VsockAddress(*self.addr), err)
        tcp.BaseClient.failIfNotConnected(self, err)

    def getHost(self):
        return VsockAddress(*self.socket.getsockname())

    def getPeer(self):
        return VsockAddress(*self.realAddress)

    def __repr__(self):
        return f"<VsockClient to {VsockAddress(*self.addr)}>"


class VsockConnector(base.BaseConnector):
    def __init__(self, cid, port, factory, timeout, reactor):
        self.cid = cid
        self.port = port
        base.BaseConnector.__init__(self, factory, timeout, reactor)

    def _makeTransport(self):
        return VsockClient(self.cid, self.port, self, self.reactor)

    def getDestination(self):
        return VsockAddress(self.cid, self.port)


class _VsockEndpoint:
    def __init__(self, reactor, cid, port):
        self._reactor = reactor
        self.cid = cid
        self.port = port

    def __repr__(self):
        return str(VsockAddress(self.cid, self.port))


@implementer(IStreamClientEndpoint)
class VsockClientEndpoint(_VsockEndpoint):
    """
    Connects to vsock CID:PORT; the reactor must be a POSIX one.
    """

    def __init__(self, reactor, cid, port, timeout=DEFAULT_TIMEOUT):
        _VsockEndpoint.__init__(self, reactor, cid, port)
        self.timeout = timeout

    def connect(self, protocolFactory):
        try:
            # Twisted's own client endpoints wrap the factory the same way,
            # which gives cancellation and passes on half-close.
            wrapper = _WrappingFactory(protocolFactory)
            VsockConnector(self.cid, self.port, wrapper, self.timeout, self._reactor).connect()
            return wrapper._onConnection
        except BaseException:
            return defer.fail()


@implementer(IStreamServerEndpoint)
class VsockServerEndpoint(_VsockEndpoint):
    """
    Listens on vsock PORT, by default on every CID this machine has.
    """

    def __init__(self, reactor, port, cid=CID_ANY, backlog=50):
        _VsockEndpoint.__init__(self, reactor, cid, port)
        self.backlog = backlog

    def listen(self, protocolFactory):
        return defer.execute(self._listen, protocolFactory)

    def _listen(self, protocolFactory):
        port = VsockPort(self.port, protocolFactory, self.backlog, self.cid, self._reactor)
        port.startListening()
        return port


def _fields(kind, syntax, positional, keywords, args, kwargs):
    """
    The fields of a C{vsock:} endpoint string by name, positional ones first.
    """
    if len(args) > len(positional):
        raise VsockAddressError(f"vsock {kind} endpoint: too many fields, give {syntax}")
    fields = dict(zip(positional, args, strict=False))
    for name, value in kwargs.items():
        if name not in positional + keywords:
            raise VsockAddressError(f"vsock {kind} endpoint: unknown field {name!r}, give {syntax}")
        if name in fields:
            raise VsockAddressError(f"vsock {kind} endpoint: {name} given twice")
        fields[name] = value
    missing = [name for name in positional if name not in fields]
    if missing:
        raise VsockAddressError(f"vsock {kind} endpoint: no {' or '.join(missing)}, give {syntax}")
    return fields


def _positive(text, what):
    value = _number(text, what)
    if value <= 0:
        raise VsockAddressError(f"vsock {what} {value} must be positive")
    return value


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class VsockClientParser:
    """
    C{vsock:CID:PORT[:timeout=SECONDS]}, also as C{vsock:cid=CID:port=PORT}.
    """

    prefix = "vsock"

    def parseStreamClient(self, reactor, *args, **kwargs):
        fields = _fields("client", "vsock:CID:PORT", ("cid", "port"), ("timeout",), args, kwargs)
        return VsockClientEndpoint(
            reactor,
            parseCid(fields["cid"]),
            parsePort(fields["port"]),
            _positive(fields.get("timeout", DEFAULT_TIMEOUT), "timeout"),
        )


@implementer(IPlugin, IStreamServerEndpointStringParser)
class VsockServerParser:
    """
    C{vsock:PORT[:cid=CID][:backlog=N]}; port 0 picks a free port.
    """

    prefix = "vsock"

    def parseStreamServer(self, reactor, *args, **kwargs):
        fields = _fields("server", "vsock:PORT[:cid=CID]", ("port",), ("cid", "backlog"), args, kwargs)
        cid = parseCid(fields["cid"]) if "cid" in fields else CID_ANY
        return VsockServerEndpoint(
            reactor, parsePort(fields["port"], listen=True), cid, _positive(fields.get("backlog", 50), "backlog")
        )

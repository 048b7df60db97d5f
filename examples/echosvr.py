"""
An echo server and a client that checks its echo: the unmodified TCP app
that the demo and the tests send through the tunnel.

    python examples/echosvr.py server --host 0.0.0.0 --port 7
    python examples/echosvr.py client --host 10.4.0.2 --port 7 --bytes 1000000

It takes ENG echosvr's command line too, with its defaults (127.0.0.1:8080)
and its result line, so ENG's demo scripts run unchanged:

    python examples/echosvr.py server -h 0.0.0.0 -p 8080
    python examples/echosvr.py client -h 192.168.0.254 -p 8080
"""

import hashlib
import os
import sys

from twisted.internet import defer, endpoints, protocol, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from zope.interface import implementer

from ent import addVersionOption
from ent.cli import ArgumentParser, count, seconds

log = Logger()

ENG_HOST = "127.0.0.1"
ENG_PORT = 8080
CLIENT_DEFAULTS = {"bytes": 64, "timeout": 30.0, "connections": 1}


@implementer(IHalfCloseableProtocol)
class Echo(protocol.Protocol):
    """
    Echo everything; close when the client half-closes, after the echo of
    all it sent has been written.  A client that does not read its echo
    stops being read (the transport is its own producer), so that its data
    waits in TCP's buffers, not in this server's memory.
    """

    def connectionMade(self):
        self.count = 0
        self.transport.registerProducer(self.transport, True)
        self.peer = self.transport.getPeer()
        log.info("connection from {host}:{port}", host=self.peer.host, port=self.peer.port)

    def dataReceived(self, data):
        self.count += len(data)
        self.transport.write(data)

    def readConnectionLost(self):
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        log.info(
            "connection from {host}:{port} closed after {count} bytes",
            host=self.peer.host,
            port=self.peer.port,
            count=self.count,
        )


class EchoFactory(protocol.Factory):
    protocol = Echo


@implementer(IHalfCloseableProtocol)
class EchoCheck(protocol.Protocol):
    """
    Send the payload, half-close, and collect the echo.
    """

    def __init__(self, payload):
        self.payload = payload
        self.received = hashlib.sha256()
        self.size = 0
        self.head = b""
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()

    def dataReceived(self, data):
        if len(self.head) < 64:
            self.head += data[: 64 - len(self.head)]
        self.size += len(data)
        self.received.update(data)

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.done.callback(None)


def makePayload(size):
    text = b"ENT echo check. "
    if size <= 4096:
        return (text * (size // len(text) + 1))[:size]
    return os.urandom(size)


@defer.inlineCallbacks
def echoOnce(reactor, args, payload):
    """
    One connection: send C{payload}, half-close, check the echo.
    """
    endpoint = endpoints.TCP4ClientEndpoint(reactor, args.host, args.port, timeout=args.timeout)
    proto = EchoCheck(payload)
    yield endpoints.connectProtocol(endpoint, proto)
    timer = reactor.callLater(args.timeout, proto.transport.abortConnection)
    yield proto.done
    if timer.active():
        timer.cancel()
    ok = proto.size == len(payload) and proto.received.digest() == hashlib.sha256(payload).digest()
    return ok, proto


@defer.inlineCallbacks
def runClient(reactor, args):
    if args.connections > 1:
        yield runMany(reactor, args)
        return
    payload = makePayload(args.bytes)
    ok, proto = yield echoOnce(reactor, args, payload)
    verdict = "PASS" if ok else "FAILED"
    print(resultLine(len(payload), proto.size, ok))
    print(f"sha256 sent {hashlib.sha256(payload).hexdigest()}")
    print(f"sha256 back {proto.received.hexdigest()}")
    print(f"content {verdict}: {proto.head[:48]!r}")
    if not ok:
        raise SystemExit(1)


def resultLine(sent, received, contentOk):
    """
    ENG echosvr's result line, which its demo scripts look for.
    """
    size = "PASS" if sent == received else "FAIL"
    content = "PASS" if contentOk else "FAIL"
    return f"Sent {sent} bytes, received {received} bytes\tcheck size: {size}\tcheck content: {content}"


@defer.inlineCallbacks
def runMany(reactor, args):
    """
    Many concurrent connections, each with its own random payload.
    """
    payloads = [os.urandom(args.bytes) for _ in range(args.connections)]
    results = yield defer.DeferredList([echoOnce(reactor, args, p) for p in payloads], consumeErrors=True)
    passed = sum(1 for success, value in results if success and value[0])
    errors = [value.getErrorMessage() for success, value in results if not success]
    print(
        f"{args.connections} connections of {args.bytes} bytes each: "
        f"{passed} echoed correctly, {args.connections - passed} failed"
    )
    for message in sorted(set(errors)):
        print(f"error: {message}")
    print("content PASS" if passed == args.connections else "content FAILED")
    if passed != args.connections:
        raise SystemExit(1)


def runServer(reactor, args):
    endpoint = endpoints.TCP4ServerEndpoint(reactor, args.port, backlog=1024, interface=args.host)
    d = endpoint.listen(EchoFactory())
    d.addCallback(lambda port: log.info("echo server on {host}:{port}", host=args.host, port=args.port))
    d.addCallback(lambda _: defer.Deferred())
    return d


def parseArguments(argv):
    """
    ENG echosvr's command line (C{client|server}, C{-h HOST}, C{-p PORT} in
    any order; so help is C{--help} alone) with ENT's client options beside it.
    """
    parser = ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), add_help=False)
    parser.add_argument(
        "command",
        choices=("client", "server"),
        help="server: echo every connection; client: send, half-close, check the echo",
    )
    parser.add_argument(
        "-h", "--host", default=ENG_HOST, help=f"address to listen on or connect to (default {ENG_HOST})"
    )
    parser.add_argument("-p", "--port", type=count(1, 65535), default=ENG_PORT, help=f"TCP port (default {ENG_PORT})")
    parser.add_argument("--bytes", type=count(0), help=f"client: payload size (default {CLIENT_DEFAULTS['bytes']})")
    parser.add_argument(
        "--timeout", type=seconds, help=f"client: seconds to wait for the echo (default {CLIENT_DEFAULTS['timeout']:g})"
    )
    parser.add_argument(
        "--connections",
        type=count(1),
        help="client: concurrent connections, each with its own random payload (default 1)",
    )
    parser.add_argument("--help", action="help", help="show this help and exit")
    addVersionOption(parser, "echosvr")
    args = parser.parse_args(argv)
    for name, default in CLIENT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif args.command == "server":
            parser.error(f"--{name} is a client option")
    return args


def main(argv=None):
    args = parseArguments(argv)
    if args.command == "server":
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
        task.react(runServer, [args])
    else:
        task.react(runClient, [args])


if __name__ == "__main__":
    main()

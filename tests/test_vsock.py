"""
vsock endpoints: the string parsers, a real AF_VSOCK listening socket, and a
real connect that fails.

The machines these tests run on are VMs whose kernel has a virtio vsock
transport to the hypervisor but no loopback transport (no
CONFIG_VSOCKETS_LOOPBACK, no vsock_loopback module to load), so no vsock
connection can be made here without leaving the machine. The data path is
therefore tested through the relay in mock mode (test_socketrelay): the vsock
transports are Twisted's TCP transports with another address family, so the
code that moves the bytes is the same. There is no data-path test over real
vsock, since it could only skip here; on a kernel with a loopback transport,
`twistd -n entg --enta-listen vsock:6980` and an agent with
`--entg-connect vsock:1:6980` exercise it.

No test here sends anything to another CID: the failing connect goes to this
machine's own CID, which the guest kernel refuses without a packet leaving.
"""

import errno
import socket

from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import CannotListenError, ConnectError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial import unittest

from ent.errors import ConfigurationError, VsockConnectError
from ent.legs.endpoints import clientEndpoint, serverEndpoint
from ent.legs.vsock import CID_ANY, PORT_ANY, VsockAddress, VsockClientEndpoint, VsockServerEndpoint, localCid
from ent.services.options import EntgOptions


class ParserTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactor()

    def client(self, text):
        return clientFromString(self.reactor, text)

    def server(self, text):
        return serverFromString(self.reactor, text)

    def test_client(self):
        endpoint = self.client("vsock:16:8888")
        self.assertIsInstance(endpoint, VsockClientEndpoint)
        self.assertEqual((endpoint.cid, endpoint.port, endpoint.timeout), (16, 8888, 30))
        self.assertEqual(repr(endpoint), "vsock:16:8888")

    def test_clientKeywords(self):
        endpoint = self.client("vsock:cid=3:port=6980:timeout=5")
        self.assertEqual((endpoint.cid, endpoint.port, endpoint.timeout), (3, 6980, 5))

    def test_server(self):
        endpoint = self.server("vsock:6980")
        self.assertIsInstance(endpoint, VsockServerEndpoint)
        self.assertEqual((endpoint.cid, endpoint.port, endpoint.backlog), (CID_ANY, 6980, 50))

    def test_serverCidAndBacklog(self):
        endpoint = self.server("vsock:6980:cid=3:backlog=10")
        self.assertEqual((endpoint.cid, endpoint.port, endpoint.backlog), (3, 6980, 10))

    def test_serverPortZeroIsAny(self):
        self.assertEqual(self.server("vsock:0").port, PORT_ANY)

    def assertBad(self, parse, text, fragment):
        e = self.assertRaises(ValueError, parse, text)
        self.assertIn(fragment, str(e))

    def test_badClientStrings(self):
        self.assertBad(self.client, "vsock:x:1", "vsock CID 'x' is not a number")
        self.assertBad(self.client, "vsock:3:y", "vsock port 'y' is not a number")
        self.assertBad(self.client, "vsock:3", "no port, give vsock:CID:PORT")
        self.assertBad(self.client, "vsock:3:1:2", "too many fields")
        self.assertBad(self.client, "vsock:3:1:colour=blue", "unknown field 'colour'")
        self.assertBad(self.client, "vsock:3:1:port=2", "port given twice")
        self.assertBad(self.client, "vsock:4294967295:1", "vsock CID 4294967295 is out of range")
        self.assertBad(self.client, "vsock:3:4294967295", "vsock port 4294967295 is out of range")
        self.assertBad(self.client, "vsock:3:1:timeout=0", "timeout 0 must be positive")

    def test_badServerStrings(self):
        self.assertBad(self.server, "vsock:http", "vsock port 'http' is not a number")
        self.assertBad(self.server, "vsock:1:cid=-3", "vsock CID -3 is out of range")
        self.assertBad(self.server, "vsock:1:2", "too many fields, give vsock:PORT[:cid=CID]")
        self.assertBad(self.server, "vsock:cid=3", "no port")

    def test_entLegsTakeVsock(self):
        """
        ENTA's and ENTG's leg options go through the same parsers.
        """
        self.assertIsInstance(clientEndpoint(self.reactor, "vsock:3:6980"), VsockClientEndpoint)
        self.assertIsInstance(serverEndpoint(self.reactor, "vsock:6980"), VsockServerEndpoint)
        e = self.assertRaises(ConfigurationError, clientEndpoint, self.reactor, "vsock:three:6980", "--entg-connect")
        self.assertIn("--entg-connect 'vsock:three:6980': vsock CID 'three' is not a number", str(e))
        options = EntgOptions()
        options.parseOptions(["--entg-connect", "vsock:3:6979", "--enta-listen", "vsock:6980"])
        self.assertEqual(options["entg-connect"], "vsock:3:6979")

    def test_address(self):
        self.assertEqual(str(VsockAddress(16, 8888)), "vsock:16:8888")
        self.assertEqual(str(VsockAddress(CID_ANY, PORT_ANY)), "vsock:any:any")
        self.assertEqual(repr(VsockAddress(3, 1)), "VsockAddress(cid=3, port=1)")
        self.assertEqual(VsockAddress(3, 1), VsockAddress(3, 1))


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Collect(Protocol):
    def __init__(self):
        self.received = b""

    def dataReceived(self, data):
        self.received += data


class RealSocketTests(unittest.TestCase):
    """
    AF_VSOCK sockets of this kernel, through the reactor.
    """

    def listen(self, text="vsock:0"):
        d = serverFromString(reactor, text).listen(Factory.forProtocol(Echo))

        def listening(port):
            self.addCleanup(port.stopListening)
            return port

        return d.addCallback(listening)

    async def test_listens(self):
        port = await self.listen()
        host = port.getHost()
        self.assertIsInstance(host, VsockAddress)
        self.assertEqual(host.cid, CID_ANY)
        self.assertNotIn(host.port, (0, PORT_ANY))
        self.assertEqual(port.socket.family, socket.AF_VSOCK)

    async def test_portInUse(self):
        port = await self.listen()
        e = None
        try:
            await self.listen(f"vsock:{port.getHost().port}")
        except CannotListenError as error:
            e = error
        self.assertIsNotNone(e)
        self.assertIn(f"Couldn't listen on vsock:any:{port.getHost().port}", str(e))
        self.assertEqual(e.socketError.errno, errno.EADDRINUSE)

    async def test_connectFailureNamesTheDestination(self):
        """
        Without a loopback transport the kernel refuses a connect to its own
        CID (ENODEV); with one, nobody listens there (ECONNRESET). Either
        way the attempt stays on this machine.
        """
        cid = localCid()
        endpoint = clientFromString(reactor, f"vsock:{cid}:4000000000")
        e = None
        try:
            await endpoint.connect(Factory.forProtocol(Protocol))
        except ConnectError as error:
            e = error
        self.assertIsInstance(e, VsockConnectError)
        self.assertIsInstance(e.reason, ConnectError)
        self.assertEqual(e.address, VsockAddress(cid, 4000000000))
        self.assertTrue(str(e).startswith(f"cannot connect to vsock:{cid}:4000000000: "), str(e))

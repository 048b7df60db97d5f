"""
Mutual TLS on every leg, for real: the four-hop tunnel in namespaces, and
peers refused for a wrong certificate or a wrong name.
"""

import os
import time

from twisted.internet import defer, endpoints, protocol
from twisted.trial import unittest

from ent.legs import certs, tls
from ent.testing.topology import ADDRESS, Tunnel
from tests.checks import METRICS, assertEchoAndTransfer, scrapeIn, tempDir
from tests.netns import requireRoot


def makeCertificates(directory):
    ca = certs.makeCa(directory)
    certs.makeCertificate(directory, "gw1", [ADDRESS["gw1.agent"], ADDRESS["gw1"]], ca)
    certs.makeCertificate(directory, "gw2", [ADDRESS["gw2"], ADDRESS["gw2.agent"]], ca)
    certs.makeCertificate(directory, "client", [], ca)
    certs.makeCertificate(directory, "server", [], ca)
    other = os.path.join(directory, "other")
    os.mkdir(other)
    certs.makeCertificate(other, "client", [], certs.makeCa(other, "another CA"))


def tlsArgs(directory, name, *flags, ca=None):
    return [
        *flags,
        "--tls-cert",
        os.path.join(directory, f"{name}.pem"),
        "--tls-key",
        os.path.join(directory, f"{name}.key"),
        "--tls-ca",
        ca or os.path.join(directory, "ca.pem"),
    ]


class TlsTunnelTests(unittest.TestCase):
    def setUp(self):
        requireRoot(self)
        self.dir = tempDir(self, "ent-tls-")
        makeCertificates(self.dir)

    def hostArgs(self, client=None):
        d = self.dir
        return {
            "client": client or tlsArgs(d, "client", "--entg-tls"),
            "gw1": tlsArgs(d, "gw1", "--enta-tls", "--entg-tls"),
            "gw2": tlsArgs(d, "gw2", "--enta-tls", "--entg-tls"),
            "server": tlsArgs(d, "server", "--entg-tls"),
        }

    def test_everyLegOnTls(self):
        with Tunnel(hostArgs=self.hostArgs()) as tunnel:
            assertEchoAndTransfer(self, tunnel)
            # The legs really are TLS: a plain-TCP agent is not let in.
            logs = tunnel.logs(200)
            self.assertNotIn("handshake", logs)

    def waitForLog(self, tunnel, text, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in tunnel.logs(400):
                return
            time.sleep(0.2)
        self.fail(f"no {text!r} in the logs:\n{tunnel.logs()}")

    def test_gatewayRefusesWrongCertificate(self):
        """
        A client agent whose certificate another CA signed is refused by its
        gateway, which logs it; the agent never takes the agent side, so
        nothing it sends reaches a TUN.
        """
        other = os.path.join(self.dir, "other")
        client = tlsArgs(other, "client", "--entg-tls", ca=os.path.join(self.dir, "ca.pem"))
        hostArgs = self.hostArgs(client)
        hostArgs["gw1"] += METRICS
        with Tunnel(hostArgs=hostArgs, waitUp=False) as tunnel:
            self.waitForLog(tunnel, "agent leg: TLS handshake with 10.1.0.1")
            self.assertFalse(tunnel.tunnelUp())
            gw1 = scrapeIn(tunnel.topology, "gw1")
            self.assertGreaterEqual(gw1.value("ent_handshake_failures_total", leg="agent", kind="tls"), 1)
            self.assertEqual(gw1.value("ent_leg_connections_total", leg="agent"), 0)
            gw1 = open(os.path.join(tunnel.logdir, "gw1-entg.log")).read()
            self.assertNotIn("agent connected", gw1)
            tunnel.stopServices()
            server = open(os.path.join(tunnel.logdir, "server-enta.log")).read()
            self.assertRegex(server, r"agent stopped: \d+ packets sent, 0 received")

    def test_clientRefusesGatewayWithWrongName(self):
        client = tlsArgs(self.dir, "client", "--entg-tls", "--entg-tls-name", "gw-elsewhere", *METRICS)
        with Tunnel(hostArgs=self.hostArgs(client), waitUp=False) as tunnel:
            self.waitForLog(tunnel, "gateway leg: TLS handshake with 10.1.0.2:6980 failed")
            self.assertFalse(tunnel.tunnelUp())
            scrape = scrapeIn(tunnel.topology, "client")
            self.assertGreaterEqual(scrape.value("ent_handshake_failures_total", leg="gateway", kind="tls"), 1)
            self.assertEqual(scrape.value("ent_leg_up", leg="gateway"), 0)
            client = open(os.path.join(tunnel.logdir, "client-enta.log")).read()
            self.assertNotIn("connected to gateway", client)


class _Held(protocol.Protocol):
    """
    A leg's side that, as the agent does with its TUN, keeps a streaming
    producer registered on its transport while it sends.
    """

    def connectionMade(self):
        self.lost = defer.Deferred()
        self.transport.registerProducer(self, True)
        self.transport.write(b"x" * 4_000_000)  # the TCP buffer fills: the producer is paused

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass

    def connectionLost(self, reason):
        self.lost.callback(None)


class _Closer(protocol.Protocol):
    """
    A gateway that stops in the middle of the leg's data: it ends TLS
    (close_notify) and the connection.
    """

    received = 0

    def connectionMade(self):
        self.factory.closers.append(self)
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        self.lost.callback(None)

    def dataReceived(self, data):
        self.received += len(data)
        if self.received > 100_000 and not self.transport.disconnecting:
            self.transport.loseConnection()


class TlsPeerCloseTests(unittest.TestCase):
    def test_peerEndsTlsWhileOurProducerIsRegistered(self):
        """
        The peer ends TLS while this side's producer is registered and
        paused (a busy leg): the leg still learns that the connection is
        gone. Twisted's TLS closes the TCP connection then, which waits for
        the registered producer for ever, reading nothing.
        """
        from twisted.internet import reactor

        directory = tempDir(self, "ent-tls-")
        makeCertificates(directory)

        def files(name):
            return tls.TlsFiles(*(os.path.join(directory, f) for f in (f"{name}.pem", f"{name}.key", "ca.pem")))

        server = tls.serverTls(endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), files("gw1"))
        closing = protocol.Factory.forProtocol(_Closer)
        closing.closers = []
        port = yield server.listen(closing)
        self.addCleanup(port.stopListening)
        client = tls.clientTls(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), files("client"), "10.1.0.2"
        )
        held = yield client.connect(protocol.Factory.forProtocol(_Held))
        timeout = reactor.callLater(10, held.lost.cancel)
        try:
            yield held.lost
        except defer.CancelledError:
            held.transport.abortConnection()
            self.fail("the leg never learnt that its peer had closed")
        timeout.cancel()
        yield defer.gatherResults([closer.lost for closer in closing.closers])

    test_peerEndsTlsWhileOurProducerIsRegistered = defer.inlineCallbacks(test_peerEndsTlsWhileOurProducerIsRegistered)

"""
Standard TLS legs: mutual authentication against a private CA, with
Twisted's TLS (pyOpenSSL) and service_identity for the peer's name.

A leg is wrapped at the endpoint, so the framing and relay protocols never
know whether they run on TCP, TLS or rats-tls.
"""

from dataclasses import dataclass

from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from ent.errors import ConfigurationError


class LegTlsProtocol(TLSMemoryBIOProtocol):
    """
    Twisted's TLS, which closes the TCP connection itself when the peer
    ends TLS (close_notify, as a gateway does on SIGTERM). A busy leg still
    has its producer (the TUN, the other leg) registered then, and a TCP
    connection with a paused producer waits for it instead of closing,
    reading nothing: the leg never learnt that its peer had gone (found by
    bench/chaos.py). The session is over, so its producer goes with it.
    """

    def _tlsShutdownFinished(self, reason):
        if self._producer is not None:
            self.unregisterProducer()
        super()._tlsShutdownFinished(reason)


class _LegTlsFactory(TLSMemoryBIOFactory):
    protocol = LegTlsProtocol


@implementer(IStreamClientEndpoint)
class _ClientEndpoint:
    """
    C{wrapClientTLS} with L{LegTlsProtocol}.
    """

    def __init__(self, creator, endpoint):
        self.creator, self.endpoint = creator, endpoint

    def connect(self, factory):
        wrapper = _LegTlsFactory(self.creator, True, factory)
        return self.endpoint.connect(wrapper).addCallback(lambda protocol: protocol.wrappedProtocol)


@implementer(IStreamServerEndpoint)
class _ServerEndpoint:
    """
    C{wrapServerTLS} with L{LegTlsProtocol}.
    """

    def __init__(self, creator, endpoint):
        self.creator, self.endpoint = creator, endpoint

    def listen(self, factory):
        return self.endpoint.listen(_LegTlsFactory(self.creator, False, factory))


@dataclass(frozen=True)
class TlsFiles:
    """
    This side's certificate and key, and the CA that signs its peers.
    """

    certificate: str
    key: str
    ca: str

    def load(self):
        """
        Read and check the files; return (own PrivateCertificate, CA Certificate).
        """

        def read(path, what):
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise ConfigurationError(f"cannot read TLS {what} {path}: {e.strerror}")

        certPem = read(self.certificate, "certificate")
        keyPem = read(self.key, "key")
        caPem = read(self.ca, "CA certificate")
        try:
            own = PrivateCertificate.loadPEM(certPem + b"\n" + keyPem)
        except Exception as e:
            raise ConfigurationError(
                f"TLS certificate {self.certificate} and key {self.key} do not load as a pair: {e}"
            )
        try:
            ca = Certificate.loadPEM(caPem)
        except Exception as e:
            raise ConfigurationError(f"TLS CA certificate {self.ca} does not load: {e}")
        return own, ca


def clientTls(endpoint, files, peerName):
    """
    Wrap a client endpoint: present our certificate, accept only a server
    certificate signed by the CA and valid for C{peerName} (DNS name or IP).
    """
    own, ca = files.load()
    creator = optionsForClientTLS(peerName, trustRoot=ca, clientCertificate=own)
    return _ClientEndpoint(creator, endpoint)


def serverTls(endpoint, files):
    """
    Wrap a server endpoint: present our certificate and require a client
    certificate signed by the CA.
    """
    own, ca = files.load()
    return _ServerEndpoint(own.options(ca), endpoint)


def isTls(transport):
    """
    Whether C{transport} runs TLS, so a leg waits for the handshake before
    it carries anything.
    """
    return isinstance(transport, TLSMemoryBIOProtocol)

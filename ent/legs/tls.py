"""
Standard TLS legs: mutual authentication against a private CA, with
Twisted's TLS (pyOpenSSL) and service_identity for the peer's name.

A leg is wrapped at the endpoint, so the framing and relay protocols never
know whether they run on TCP, TLS or rats-tls.
"""

from dataclasses import dataclass

from twisted.internet.endpoints import wrapClientTLS, wrapServerTLS
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS

from ent.errors import ConfigurationError


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
    return wrapClientTLS(creator, endpoint)


def serverTls(endpoint, files):
    """
    Wrap a server endpoint: present our certificate and require a client
    certificate signed by the CA.
    """
    own, ca = files.load()
    return wrapServerTLS(own.options(ca), endpoint)


def isTls(transport):
    """
    Whether C{transport} runs TLS, so a leg waits for the handshake before
    it carries anything.
    """
    from twisted.protocols.tls import TLSMemoryBIOProtocol

    return isinstance(transport, TLSMemoryBIOProtocol)

"""
How each leg of the tunnel is protected: plain TCP, TLS or rats-tls.

The protection is applied to the leg's endpoint, so the protocols above it
are the same whichever is chosen.
"""

from dataclasses import dataclass

from ent import tls
from ent.endpoints import DescribedEndpoint
from ent.tls import TlsFiles


@dataclass(frozen=True)
class LegSecurity:
    """
    C{kind} is "tcp", "tls" or "rats-tls"; C{peerName} is the name a
    server's certificate must carry (TLS, connecting side only).
    """

    kind: str = "tcp"
    tlsFiles: TlsFiles | None = None
    peerName: str | None = None


def secureClient(reactor, endpoint, security, description):
    """
    The client endpoint of a leg, wrapped in its protection.
    """
    if security.kind == "tls":
        endpoint = tls.clientTls(endpoint, security.tlsFiles, security.peerName)
        description = f"{description} (TLS, {security.peerName})"
    return DescribedEndpoint(endpoint, description)


def secureServer(reactor, endpoint, security):
    """
    The server endpoint of a leg, wrapped in its protection.
    """
    if security.kind == "tls":
        return tls.serverTls(endpoint, security.tlsFiles)
    return endpoint

"""
How each leg of the tunnel is protected: plain TCP, TLS or rats-tls.

The protection is applied to the leg's endpoint, so the protocols above it
are the same whichever is chosen.
"""

from dataclasses import dataclass

from ent.cli import parsePort
from ent.legs import tls
from ent.legs.endpoints import DescribedEndpoint, hostOf
from ent.legs.tls import TlsFiles


@dataclass(frozen=True)
class RatsTlsChoice:
    """
    The rats-tls library and plugins one leg asks for.
    """

    library: str | None
    attester: str
    verifier: str
    tlsType: str
    cryptoType: str
    mutual: bool
    logLevel: int
    server: bool
    claims: tuple = ()


@dataclass(frozen=True)
class LegSecurity:
    """
    C{kind} is "tcp", "tls" or "rats-tls"; C{peerName} is the name a
    server's certificate must carry (TLS, connecting side only);
    C{handshakeTimeout} bounds a whole handshake (--handshake-timeout).
    """

    kind: str = "tcp"
    tlsFiles: TlsFiles | None = None
    peerName: str | None = None
    ratsTls: RatsTlsChoice | None = None
    handshakeTimeout: float = 10.0


_libraries = {}


def ratsTlsSettings(choice):
    """
    Load the library (once per path: loading runs its constructor) and
    pair it with this leg's plugin choice.
    """
    from ent import ratstls
    from ent.legs.ratsendpoints import RatsTlsSettings

    path = choice.library or ratstls.default_library_path()
    if path not in _libraries:
        _libraries[path] = ratstls.load(path)
    config = ratstls.RatsTlsConfig(
        attester=choice.attester,
        verifier=choice.verifier,
        tls_type=choice.tlsType,
        crypto_type=choice.cryptoType,
        mutual=choice.mutual,
        server=choice.server,
        log_level=choice.logLevel,
        claims=choice.claims,
    )
    return RatsTlsSettings(_libraries[path], config)


def _handshakeCounter(stats, leg):
    if stats is None:
        return None
    return lambda kind: stats.handshakeFailed(leg, kind)


def secureClient(reactor, endpoint, security, description, leg="rats-tls", stats=None):
    """
    The client endpoint of leg C{leg}, wrapped in its protection; failed
    connection attempts and rats-tls handshakes are counted in C{stats}
    (failed TLS handshakes by the leg's protocol, which sees them and
    enforces the budget, L{ent.protocols.framed.FramedLeg.handshakeTimeout}).
    """
    if security.kind == "tls":
        endpoint = tls.clientTls(endpoint, security.tlsFiles, security.peerName)
        description = f"{description} (TLS, {security.peerName})"
    elif security.kind == "rats-tls":
        from ent.legs.ratsendpoints import RatsTlsClientEndpoint

        host = hostOf(description)
        port = parsePort(description.rpartition(":")[2])
        endpoint = RatsTlsClientEndpoint(
            reactor,
            host,
            port,
            ratsTlsSettings(security.ratsTls),
            leg=leg,
            onHandshakeFailed=_handshakeCounter(stats, leg),
            handshakeTimeout=security.handshakeTimeout,
        )
        description = f"{description} (rats-tls)"
    return DescribedEndpoint(endpoint, description, stats.leg(leg) if stats is not None else None)


def secureServer(reactor, endpoint, security, description, leg="rats-tls", stats=None):
    """
    The server endpoint of leg C{leg}, wrapped in its protection.
    """
    if security.kind == "tls":
        return tls.serverTls(endpoint, security.tlsFiles)
    if security.kind == "rats-tls":
        from ent.legs.ratsendpoints import RatsTlsServerEndpoint

        interface, _, port = description.rpartition(":")
        return RatsTlsServerEndpoint(
            reactor,
            parsePort(port),
            ratsTlsSettings(security.ratsTls),
            interface=interface,
            leg=leg,
            onHandshakeFailed=_handshakeCounter(stats, leg),
            handshakeTimeout=security.handshakeTimeout,
        )
    return endpoint

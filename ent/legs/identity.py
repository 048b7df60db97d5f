"""
Who is at the other end of a leg, as names that C{--allowed-ips} can list.

A name comes from what authenticated the leg: today a TLS peer
certificate (its subjectAltName DNS names and IP addresses, else its CN).
A transport that knows better, e.g. a rats-tls transport whose evidence
carries a claim, provides C{getPeerIdentities()} returning the names; it is
asked first, so attested identities can be added without touching the
router.
"""

from ent.legs.tls import isTls


def certificateNames(certificate):
    """
    The names of a pyOpenSSL or cryptography certificate: its
    subjectAltName DNS names and IP addresses, else its common name.
    """
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    if not isinstance(certificate, x509.Certificate):
        certificate = certificate.to_cryptography()
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = None
    if sans is not None:
        names = sans.get_values_for_type(x509.DNSName)
        names += [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
        if names:
            return tuple(names)
    return tuple(a.value for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME))


def peerIdentities(transport):
    """
    The names of the authenticated peer of C{transport}; C{()} on a plain
    TCP leg (whose peer is known only by its address).
    """
    hook = getattr(transport, "getPeerIdentities", None)
    if hook is not None:
        return tuple(hook())
    if isTls(transport):
        certificate = transport.getPeerCertificate()
        if certificate is not None:
            return certificateNames(certificate)
    return ()

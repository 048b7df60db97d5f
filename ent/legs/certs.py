"""
Make a small private CA and certificates for a test deployment of TLS legs.

    python -m ent certs DIR gw1=10.2.0.1 gw2=10.2.0.2,gw2.example agent1 ...

Each NAME gets DIR/NAME.pem and DIR/NAME.key, valid for NAME and for the
DNS names and IP addresses after "=", signed by DIR/ca.pem (created with
DIR/ca.key when missing). Every certificate serves as both client and
server. For production, use your own PKI.
"""

import datetime
import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ent import addVersionOption
from ent.cli import ArgumentParser

VALIDITY = datetime.timedelta(days=825)


def _write(path, data, private=False):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _keyPem(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def makeCa(directory, common="ENT test CA"):
    """
    Create DIR/ca.pem and DIR/ca.key, or load them if present.
    """
    certPath, keyPath = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca.key")
    if os.path.exists(certPath) and os.path.exists(keyPath):
        with open(certPath, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(keyPath, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(_name(common))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write(certPath, cert.public_bytes(serialization.Encoding.PEM))
    _write(keyPath, _keyPem(key), private=True)
    return cert, key


def makeCertificate(directory, name, alternatives=(), ca=None):
    """
    Create DIR/NAME.pem and DIR/NAME.key, signed by the CA in DIR.
    """
    caCert, caKey = ca or makeCa(directory)
    sans = []
    for alt in (name, *alternatives):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(alt)))
        except ValueError:
            sans.append(x509.DNSName(alt))
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(caCert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(caKey, hashes.SHA256())
    )
    certPath = os.path.join(directory, f"{name}.pem")
    _write(certPath, cert.public_bytes(serialization.Encoding.PEM))
    _write(os.path.join(directory, f"{name}.key"), _keyPem(key), private=True)
    return certPath


def main(argv=None):
    parser = ArgumentParser(prog="python -m ent certs", description=__doc__.strip().splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("names", nargs="+", metavar="NAME[=ALT,ALT...]")
    addVersionOption(parser, "ent certs")
    args = parser.parse_args(argv)
    os.makedirs(args.directory, exist_ok=True)
    ca = makeCa(args.directory)
    for spec in args.names:
        name, _, rest = spec.partition("=")
        alternatives = [a for a in rest.split(",") if a]
        path = makeCertificate(args.directory, name, alternatives, ca)
        print(f"{path}: {', '.join([name, *alternatives])}")
    print(f"CA: {os.path.join(args.directory, 'ca.pem')}")


if __name__ == "__main__":
    sys.exit(main())

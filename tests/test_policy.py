"""
C{--policy}: reading the file (every key, good and bad, and the line each
error names), matching legs against identities and the refusal's sentence,
services, and C{--allowed-ips} as a policy.
"""

import ipaddress
import os

from twisted.trial import unittest

from ent.errors import PolicyError
from ent.legs.evidence import Evidence
from ent.legs.policy import (
    Identity,
    LegFacts,
    Policy,
    Refusal,
    Service,
    allowedIpsPolicy,
    loadPolicy,
    parsePolicy,
    parseService,
)

ENCLAVE = "9f01aa33" + "11" * 28
OTHER_ENCLAVE = "5c3a0b12" + "22" * 28
SIGNER = "ABCDEF01" + "33" * 28

EXAMPLE = f"""\
# The issue's example.
[[identity]]
name = "billing-client"
role = "agent"
sgx.mrenclave = "{ENCLAVE}"
sgx.min-isvsvn = 2
addresses = ["192.168.0.1/32"]
services = ["192.168.0.254:80/tcp"]

[[identity]]
name = "gw2"
role = "peer"
tls-names = ["gw2"]
addresses = ["192.168.0.254/32"]
"""


def sgx(mrenclave=ENCLAVE, mrsigner=SIGNER, isvprodid=1, isvsvn=2, debug=False, claims=()):
    """
    Verified SGX evidence, as the binding fills it.
    """
    return Evidence(
        kind="sgx_ecdsa",
        mrenclave=bytes.fromhex(mrenclave),
        mrsigner=bytes.fromhex(mrsigner),
        isvprodid=isvprodid,
        isvsvn=isvsvn,
        debug=debug,
        claims=tuple(sorted(claims)),
    )


def rats(evidence, role="agent", source="10.1.0.1", names=()):
    return LegFacts(role=role, source=ipaddress.ip_address(source), tlsNames=names, evidence=evidence, kind="rats-tls")


def identity(body, name="x", role="agent"):
    """
    A one-identity policy from the keys C{body}.
    """
    return parsePolicy(f'[[identity]]\nname = "{name}"\nrole = "{role}"\n{body}\n', "p.toml")


class ParseTests(unittest.TestCase):
    """
    What L{parsePolicy} accepts and what it makes of it.
    """

    def test_example(self):
        """
        The documented example: two identities, in file order, each with
        what the file says and C{None} for what it does not.
        """
        policy = parsePolicy(EXAMPLE, "/etc/ent/policy.toml")
        self.assertEqual(policy.path, "/etc/ent/policy.toml")
        self.assertTrue(policy.strict)
        self.assertFalse(policy.isEmpty())
        client, gw2 = policy.identities
        self.assertEqual(
            client,
            Identity(
                name="billing-client",
                role="agent",
                mrenclave=bytes.fromhex(ENCLAVE),
                minIsvsvn=2,
                addresses=(ipaddress.ip_network("192.168.0.1/32"),),
                services=(Service(ipaddress.ip_address("192.168.0.254"), 80, "tcp"),),
                line=2,
            ),
        )
        self.assertEqual(
            gw2,
            Identity(
                name="gw2",
                role="peer",
                tlsNames=("gw2",),
                addresses=(ipaddress.ip_network("192.168.0.254/32"),),
                line=10,
            ),
        )
        self.assertTrue(client.needsEvidence())
        self.assertFalse(gw2.needsEvidence())
        self.assertEqual(policy.forRole("agent"), (client,))
        self.assertEqual(policy.forRole("peer"), (gw2,))
        self.assertEqual(policy.forRole("gateway"), ())
        self.assertIs(policy.get("gw2"), gw2)
        self.assertIsNone(policy.get("nobody"))

    def test_everyKey(self):
        """
        Every key read into its field: hex case-insensitive, claims as
        sorted UTF-8 pairs, services parsed.
        """
        (got,) = parsePolicy(
            f"""
[[identity]]
name = "all_keys.1"
role = "agent"
tls-names = ["a", "b.example"]
from = ["10.1.0.0/16", "fd00::/64", "10.9.9.9"]
sgx.mrenclave = "{ENCLAVE.upper()}"
sgx.mrsigner = "{SIGNER}"
sgx.isvprodid = 65535
sgx.min-isvsvn = 0
sgx.debug = true
claims.zone = "eu"
claims.app = "billing ✓"
addresses = []
services = ["192.168.0.254:53/udp", "[fd00::1]:443/TCP"]
"""
        ).identities
        self.assertEqual(got.tlsNames, ("a", "b.example"))
        self.assertEqual(got.sources, tuple(map(ipaddress.ip_network, ["10.1.0.0/16", "fd00::/64", "10.9.9.9/32"])))
        self.assertEqual(got.mrenclave, bytes.fromhex(ENCLAVE))
        self.assertEqual(got.mrsigner, bytes.fromhex(SIGNER))
        self.assertEqual((got.isvprodid, got.minIsvsvn, got.debug), (65535, 0, True))
        self.assertEqual(got.claims, (("app", "billing ✓".encode()), ("zone", b"eu")))
        self.assertEqual(got.addresses, ())
        self.assertEqual([str(s) for s in got.services], ["192.168.0.254:53/udp", "[fd00::1]:443/tcp"])

    def test_subTables(self):
        """
        C{[identity.sgx]} and C{[identity.claims]} are the same as dotted keys.
        """
        dotted = identity(f'sgx.mrenclave = "{ENCLAVE}"\nsgx.debug = true\nclaims.app = "b"').identities[0]
        tables = identity(f'[identity.sgx]\nmrenclave = "{ENCLAVE}"\ndebug = true\n[identity.claims]\napp = "b"')
        self.assertEqual(tables.identities[0], dotted)

    def test_noIdentities(self):
        """
        An empty file is a valid policy that refuses everyone.
        """
        policy = parsePolicy("# nobody yet\n", "p.toml")
        self.assertTrue(policy.isEmpty())
        self.assertEqual(
            policy.match(LegFacts("agent", ipaddress.ip_address("10.0.0.1"))),
            Refusal("no identity of role agent in p.toml"),
        )

    def test_defaults(self):
        """
        Without grants: addresses learned, every service; debug off.
        """
        (got,) = identity('from = ["0.0.0.0/0", "::/0"]').identities
        self.assertIsNone(got.addresses)
        self.assertIsNone(got.services)
        self.assertFalse(got.debug)
        self.assertEqual(got.claims, ())
        self.assertEqual(got.grantsText(), "addresses learned; services any")

    def test_grantsText(self):
        policy = parsePolicy(EXAMPLE, "p.toml")
        self.assertEqual(
            policy.get("billing-client").grantsText(), "addresses 192.168.0.1/32; services 192.168.0.254:80/tcp"
        )
        self.assertEqual(policy.get("gw2").grantsText(), "addresses 192.168.0.254/32")

    def test_loadPolicy(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(EXAMPLE)
        self.assertEqual(loadPolicy(path), parsePolicy(EXAMPLE, path))

    def test_unreadable(self):
        path = self.mktemp()
        error = self.assertRaises(PolicyError, loadPolicy, path)
        self.assertEqual(str(error), f"{path}: No such file or directory")

    def test_notUtf8(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"# one\n# two \xff\n[[identity]]\n")
        error = self.assertRaises(PolicyError, loadPolicy, path)
        self.assertTrue(str(error).startswith(f"{path}:2: not UTF-8 text"), str(error))


class ErrorTests(unittest.TestCase):
    """
    Each mistake is a L{PolicyError} at C{FILE:LINE:} naming the key.
    """

    def assertError(self, text, message):
        error = self.assertRaises(PolicyError, parsePolicy, text, "/etc/ent/policy.toml")
        self.assertEqual(str(error), message)

    def assertKeyError(self, body, line, message, role="agent"):
        """
        C{body} written after an identity's name (line 2) and role (line 3).
        """
        self.assertError(
            f'[[identity]]\nname = "x"\nrole = "{role}"\n{body}\n',
            f'/etc/ent/policy.toml:{line}: identity "x": {message}',
        )

    def test_syntax(self):
        """
        A TOML syntax error is reported at tomllib's line.
        """
        self.assertError('[[identity]]\nname = "x"\nrole = \n', "/etc/ent/policy.toml:3: Invalid value (column 8)")

    def test_syntaxAtEnd(self):
        self.assertError(
            '[[identity]]\nname = "x', "/etc/ent/policy.toml:2: Unterminated string (at the end of the file)"
        )

    def test_mrenclaveSecondIdentity(self):
        """
        The line of a key several lines into the second identity, dotted.
        """
        text = (
            EXAMPLE + '\n[[identity]]\nname = "billing-client-2"\nrole = "agent"\n# comment\n\nsgx.mrenclave = "9f"\n'
        )
        self.assertError(
            text,
            "/etc/ent/policy.toml:21: identity \"billing-client-2\": sgx.mrenclave must be 64 hex characters, not '9f'",
        )

    def test_mrenclaveSecondIdentitySubTable(self):
        """
        The same key in an C{[identity.sgx]} sub-table of the second identity.
        """
        text = (
            EXAMPLE + '\n[[identity]]\nname = "c2"\nrole = "agent"\naddresses = ["192.168.0.2/32"]\n'
            '[identity.sgx]\nmin-isvsvn = 1\nmrenclave = "9f"\n'
        )
        self.assertError(
            text, "/etc/ent/policy.toml:22: identity \"c2\": sgx.mrenclave must be 64 hex characters, not '9f'"
        )

    def test_keyNamedLikeAnotherIdentitysKey(self):
        """
        The locator looks in the identity the error is about, not the first
        identity that has the key.
        """
        text = EXAMPLE + '\n[[identity]]\nname = "c2"\nrole = "agent"\n\n\nsgx.min-isvsvn = -1\n'
        self.assertError(
            text,
            '/etc/ent/policy.toml:21: identity "c2": sgx.min-isvsvn must be a whole number from 0 to 65535, not -1',
        )

    def test_claimSubTable(self):
        self.assertKeyError(
            'from = ["0.0.0.0/0"]\n[identity.claims]\napp = "a"\nzone = 3',
            7,
            "claims.zone must be a string in quotes, not 3",
        )

    def test_claimDotted(self):
        self.assertKeyError(
            'from = ["0.0.0.0/0"]\nclaims.zone = true', 5, "claims.zone must be a string in quotes, not true"
        )

    def test_claimsNotTable(self):
        self.assertKeyError('claims = "app"', 4, "claims must be a table (claims.NAME = \"VALUE\"), not 'app'")

    def test_unknownTopLevel(self):
        self.assertError(
            'version = 1\n[[identity]]\nname = "x"\n',
            "/etc/ent/policy.toml:1: unknown key 'version': a policy holds only [[identity]] tables",
        )

    def test_unknownTopLevelTable(self):
        self.assertError(
            '[[identity]]\nname = "x"\nrole = "peer"\nfrom = ["0.0.0.0/0"]\n\n[defaults]\nrole = "agent"\n',
            "/etc/ent/policy.toml:6: unknown key 'defaults': a policy holds only [[identity]] tables",
        )

    def test_identityNotArray(self):
        self.assertError(
            '\n[identity]\nname = "x"\n',
            "/etc/ent/policy.toml:2: identity must be an array of tables, written [[identity]]",
        )

    def test_unknownKey(self):
        self.assertKeyError(
            'from = ["0.0.0.0/0"]\nallowed-ips = []',
            5,
            "unknown key 'allowed-ips' (known: addresses, claims, from, name, role, services, sgx, tls-names)",
        )

    def test_unknownSgxKey(self):
        self.assertKeyError(
            'from = ["0.0.0.0/0"]\nsgx.isvsvn = 2',
            5,
            "unknown key 'sgx.isvsvn' (known: sgx.mrenclave, sgx.mrsigner, sgx.isvprodid, sgx.min-isvsvn, sgx.debug)",
        )

    def test_unknownSgxKeySubTable(self):
        self.assertKeyError(
            'from = ["0.0.0.0/0"]\n[identity.sgx]\ndebug = false\nmrenclav = "00"',
            7,
            "unknown key 'sgx.mrenclav' (known: sgx.mrenclave, sgx.mrsigner, sgx.isvprodid, sgx.min-isvsvn, sgx.debug)",
        )

    def test_sgxNotTable(self):
        self.assertKeyError('sgx = "yes"', 4, "sgx must be a table (sgx.KEY = ... or [identity.sgx]), not 'yes'")

    def test_nameMissing(self):
        self.assertError(
            EXAMPLE + '\n[[identity]]\nrole = "agent"\n', "/etc/ent/policy.toml:16: identity #3: name is missing"
        )

    def test_nameInvalid(self):
        for name, shown in [('""', "''"), ('"a b"', "'a b'"), ("3", "3"), ('"é"', "'é'")]:
            self.assertError(
                f'[[identity]]\nrole = "agent"\nname = {name}\n',
                f"/etc/ent/policy.toml:3: identity #1: name must be ASCII letters, digits, '-', '_' or '.', not {shown}",
            )

    def test_duplicateName(self):
        self.assertError(
            EXAMPLE + '\n[[identity]]\nrole = "agent"\nfrom = ["10.0.0.1"]\nname = "gw2"\n',
            '/etc/ent/policy.toml:19: identity "gw2": name is already used by the identity at line 10',
        )

    def test_roleMissing(self):
        self.assertError(
            '[[identity]]\nname = "x"\n',
            '/etc/ent/policy.toml:1: identity "x": role is missing: one of agent, peer, gateway',
        )

    def test_roleInvalid(self):
        self.assertError(
            '[[identity]]\nname = "x"\nrole = "client"\n',
            "/etc/ent/policy.toml:3: identity \"x\": role must be one of agent, peer, gateway, not 'client'",
        )

    def test_noRecognitionKey(self):
        """
        Grants alone would match anyone; so would C{sgx.debug}, which only
        allows.
        """
        message = (
            '/etc/ent/policy.toml:1: identity "x": has no key that recognises a leg (tls-names, from, sgx.*, '
            'claims), so it would match anyone: to mean anyone, say so with from = ["0.0.0.0/0", "::/0"]'
        )
        self.assertError('[[identity]]\nname = "x"\nrole = "agent"\naddresses = ["192.168.0.1/32"]\n', message)
        self.assertError('[[identity]]\nname = "x"\nrole = "agent"\nsgx.debug = true\n', message)

    def test_servicesOnPeer(self):
        self.assertKeyError(
            'tls-names = ["gw2"]\nservices = ["192.168.0.254:80/tcp"]',
            5,
            "services is only for role agent, not peer: it limits what an agent may reach",
            role="peer",
        )

    def test_tlsNames(self):
        self.assertKeyError('tls-names = "gw2"', 4, "tls-names must be a list of names in quotes, not 'gw2'")
        self.assertKeyError(
            "tls-names = []", 4, "tls-names must list at least one of names (an empty list matches nothing)"
        )
        self.assertKeyError('tls-names = ["a", ""]', 4, "tls-names holds an empty name")
        self.assertKeyError("tls-names = [1]", 4, "tls-names must be a list of names in quotes, not a list")

    def test_from(self):
        self.assertKeyError(
            'from = ["10.1.0.1/16"]', 4, "from: '10.1.0.1/16' is not a network prefix (10.1.0.1/16 has host bits set)"
        )
        self.assertKeyError(
            'from = ["gw1"]',
            4,
            "from: 'gw1' is not a network prefix ('gw1' does not appear to be an IPv4 or IPv6 network)",
        )
        self.assertKeyError("from = []", 4, "from must list at least one of prefixes (an empty list matches nothing)")

    def test_addresses(self):
        self.assertKeyError(
            'from = ["0.0.0.0/0"]\naddresses = "192.168.0.1"',
            5,
            "addresses must be a list of prefixes in quotes, not '192.168.0.1'",
        )
        self.assertKeyError(
            'from = ["0.0.0.0/0"]\naddresses = ["192.168.0.300"]',
            5,
            "addresses: '192.168.0.300' is not a network prefix "
            "('192.168.0.300' does not appear to be an IPv4 or IPv6 network)",
        )

    def test_measurements(self):
        for key in ("mrenclave", "mrsigner"):
            self.assertKeyError(
                f'sgx.{key} = "{ENCLAVE}0"', 4, f"sgx.{key} must be 64 hex characters, not '{ENCLAVE}0'"
            )
            self.assertKeyError(
                f'sgx.{key} = "{"g" * 64}"', 4, f"sgx.{key} must be 64 hex characters, not '{'g' * 64}'"
            )
            self.assertKeyError(f"sgx.{key} = 1", 4, f"sgx.{key} must be 64 hex characters, not 1")

    def test_numbers(self):
        for key in ("isvprodid", "min-isvsvn"):
            for value in ("65536", "-1", "true", '"2"', "1.0"):
                shown = {"true": "true", '"2"': "'2'"}.get(value, value)
                self.assertKeyError(
                    f'from = ["0.0.0.0/0"]\nsgx.{key} = {value}',
                    5,
                    f"sgx.{key} must be a whole number from 0 to 65535, not {shown}",
                )

    def test_debug(self):
        self.assertKeyError(
            'from = ["0.0.0.0/0"]\n\nsgx.debug = "yes"', 6, "sgx.debug must be true or false, not 'yes'"
        )

    def test_services(self):
        shape = "must be ADDRESS:PORT/tcp or ADDRESS:PORT/udp (IPv6 as [ADDRESS]:PORT/tcp)"
        for text, problem in [
            ("192.168.0.254:80", shape),
            ("192.168.0.254:80/icmp", shape),
            ("192.168.0.254/tcp", shape),
            ("fd00::1:443/tcp", "has an IPv6 address without brackets: write [ADDRESS]:PORT/PROTO"),
            ("server:80/tcp", "has 'server', which is not an IP address"),
            ("192.168.0.254:0/tcp", "has port '0': a port is 1 to 65535"),
            ("192.168.0.254:65536/udp", "has port '65536': a port is 1 to 65535"),
            ("[192.168.0.254]:80/tcp", "has an IPv4 address in brackets"),
        ]:
            self.assertKeyError(f'from = ["0.0.0.0/0"]\nservices = ["{text}"]', 5, f"services: {text!r} {problem}")


class MatchTests(unittest.TestCase):
    """
    L{Policy.match}: the identity a leg matches, or why it matches none.
    """

    def setUp(self):
        self.policy = parsePolicy(EXAMPLE, "p.toml")

    def assertRefused(self, policy, facts, key, detail, name="x"):
        self.assertEqual(policy.match(facts), Refusal(detail, key=key, identity=name))

    def test_sgxMatch(self):
        self.assertIs(self.policy.match(rats(sgx(isvsvn=2))), self.policy.get("billing-client"))
        self.assertIs(self.policy.match(rats(sgx(isvsvn=7))), self.policy.get("billing-client"))

    def test_mrenclaveMismatch(self):
        self.assertRefused(
            self.policy,
            rats(sgx(mrenclave=OTHER_ENCLAVE)),
            "sgx.mrenclave",
            "sgx.mrenclave is 5c3a0b12…, policy billing-client wants 9f01aa33…",
            "billing-client",
        )

    def test_mrsignerMismatch(self):
        policy = identity(f'sgx.mrsigner = "{SIGNER.lower()}"')
        self.assertIs(policy.match(rats(sgx())), policy.identities[0])
        self.assertRefused(
            policy, rats(sgx(mrsigner=ENCLAVE)), "sgx.mrsigner", "sgx.mrsigner is 9f01aa33…, policy x wants abcdef01…"
        )

    def test_isvprodid(self):
        policy = identity("sgx.isvprodid = 4")
        self.assertIs(policy.match(rats(sgx(isvprodid=4))), policy.identities[0])
        self.assertRefused(policy, rats(sgx(isvprodid=3)), "sgx.isvprodid", "sgx.isvprodid is 3, policy x wants 4")

    def test_svnBelowMinimum(self):
        self.assertRefused(
            self.policy,
            rats(sgx(isvsvn=1)),
            "sgx.min-isvsvn",
            "sgx.min-isvsvn: the enclave's isvsvn is 1, policy billing-client wants at least 2",
            "billing-client",
        )

    def test_debugRefusedByDefault(self):
        """
        A debug enclave matches no identity that does not allow it, even
        one that asks for no measurement.
        """
        self.assertRefused(
            self.policy,
            rats(sgx(debug=True)),
            "sgx.debug",
            "sgx.debug is true (a debug enclave), policy billing-client does not allow it",
            "billing-client",
        )
        anyone = identity('from = ["0.0.0.0/0"]')
        self.assertRefused(
            anyone,
            rats(sgx(debug=True)),
            "sgx.debug",
            "sgx.debug is true (a debug enclave), policy x does not allow it",
        )
        self.assertIs(anyone.match(rats(sgx(debug=False))), anyone.identities[0])

    def test_debugAllowed(self):
        policy = identity(f'sgx.mrenclave = "{ENCLAVE}"\nsgx.debug = true')
        self.assertIs(policy.match(rats(sgx(debug=True))), policy.identities[0])
        self.assertIs(policy.match(rats(sgx(debug=False))), policy.identities[0])

    def test_claims(self):
        policy = identity('claims.app = "billing"\nclaims.zone = "eu"')
        matching = sgx(claims=[("app", b"billing"), ("zone", b"eu"), ("extra", b"1")])
        self.assertIs(policy.match(rats(matching)), policy.identities[0])
        # Claims need no SGX: any verified evidence carries them.
        self.assertIs(
            policy.match(rats(Evidence(kind="none", claims=(("app", b"billing"), ("zone", b"eu"))))),
            policy.identities[0],
        )

    def test_missingClaim(self):
        policy = identity('claims.app = "billing"\nclaims.zone = "eu"')
        self.assertRefused(
            policy, rats(sgx(claims=[("zone", b"eu")])), "claims.app", "claims.app is missing, policy x wants 'billing'"
        )

    def test_wrongClaim(self):
        policy = identity('claims.app = "billing"\nclaims.zone = "eu"')
        self.assertRefused(
            policy,
            rats(sgx(claims=[("app", b"billing"), ("zone", b"us")])),
            "claims.zone",
            "claims.zone is 'us', policy x wants 'eu'",
        )
        self.assertRefused(
            policy,
            rats(sgx(claims=[("app", b"\xff\x00"), ("zone", b"eu")])),
            "claims.app",
            "claims.app is 0xff00, policy x wants 'billing'",
        )

    def test_claimWithoutEvidence(self):
        policy = identity('claims.app = "billing"')
        self.assertRefused(
            policy,
            LegFacts("agent", ipaddress.ip_address("10.1.0.1"), kind="tls"),
            "claims.app",
            "claims.app is missing (a tls leg has no evidence), policy x wants 'billing'",
        )

    def test_tlsNames(self):
        facts = LegFacts("peer", ipaddress.ip_address("10.2.0.1"), ("gw1", "gw1.example"), kind="tls")
        self.assertRefused(
            self.policy, facts, "tls-names", "tls-names are gw1, gw1.example, policy gw2 wants gw2", "gw2"
        )
        self.assertRefused(
            self.policy,
            LegFacts("peer", ipaddress.ip_address("10.2.0.1")),
            "tls-names",
            "tls-names: the leg has no certificate, policy gw2 wants gw2",
            "gw2",
        )
        matched = self.policy.match(LegFacts("peer", ipaddress.ip_address("10.2.0.1"), ("gw1", "gw2"), kind="tls"))
        self.assertIs(matched, self.policy.get("gw2"))

    def test_tlsNamesSeveral(self):
        policy = identity('tls-names = ["a", "b"]', role="peer")
        self.assertIs(policy.match(LegFacts("peer", None, ("b",), kind="tls")), policy.identities[0])
        self.assertRefused(
            policy,
            LegFacts("peer", None, ("c",), kind="tls"),
            "tls-names",
            "tls-names are c, policy x wants one of a, b",
        )

    def test_from(self):
        """
        C{from} is what a plain leg can match: its TCP source.
        """
        policy = identity('from = ["10.1.0.1/32", "fd00::/64"]')
        self.assertIs(policy.match(LegFacts("agent", ipaddress.ip_address("10.1.0.1"))), policy.identities[0])
        self.assertIs(policy.match(LegFacts("agent", ipaddress.ip_address("fd00::9"))), policy.identities[0])
        self.assertIs(policy.match(LegFacts("agent", ipaddress.ip_address("::ffff:10.1.0.1"))), policy.identities[0])
        self.assertIs(policy.match(LegFacts("agent", "10.1.0.1")), policy.identities[0])
        self.assertRefused(
            policy,
            LegFacts("agent", ipaddress.ip_address("10.1.0.9")),
            "from",
            "from is 10.1.0.9, policy x wants one of 10.1.0.1/32, fd00::/64",
        )
        self.assertRefused(
            identity('from = ["10.1.0.1/32"]'),
            LegFacts("agent", None),
            "from",
            "from is unknown, policy x wants 10.1.0.1/32",
        )

    def test_noEvidenceOnTlsLeg(self):
        self.assertRefused(
            self.policy,
            LegFacts("agent", ipaddress.ip_address("10.1.0.1"), ("client",), kind="tls"),
            "sgx.mrenclave",
            "sgx.mrenclave: the leg carries no SGX evidence (a tls leg has no evidence), "
            "policy billing-client wants 9f01aa33…",
            "billing-client",
        )

    def test_nullEvidence(self):
        """
        A nullattester peer's evidence (kind "none") carries no measurement.
        """
        self.assertRefused(
            self.policy,
            rats(Evidence()),
            "sgx.mrenclave",
            "sgx.mrenclave: the leg carries no SGX evidence (rats-tls evidence none), "
            "policy billing-client wants 9f01aa33…",
            "billing-client",
        )
        self.assertRefused(
            identity("sgx.min-isvsvn = 1"),
            rats(Evidence(kind="tdx_ecdsa")),
            "sgx.min-isvsvn",
            "sgx.min-isvsvn: the leg carries no SGX evidence (rats-tls evidence tdx_ecdsa), policy x wants at least 1",
        )

    def test_unverifiedRatsLeg(self):
        self.assertRefused(
            self.policy,
            rats(None),
            "sgx.mrenclave",
            "sgx.mrenclave: the leg carries no SGX evidence (the other side's rats-tls evidence was not verified), "
            "policy billing-client wants 9f01aa33…",
            "billing-client",
        )

    def test_everyKeyMustMatch(self):
        policy = identity(f'tls-names = ["c"]\nfrom = ["10.1.0.0/24"]\nsgx.mrenclave = "{ENCLAVE}"')
        self.assertIs(policy.match(rats(sgx(), names=("c",))), policy.identities[0])
        self.assertRefused(
            policy, rats(sgx(), names=("c",), source="10.1.1.1"), "from", "from is 10.1.1.1, policy x wants 10.1.0.0/24"
        )
        self.assertRefused(
            policy,
            rats(sgx(mrenclave=OTHER_ENCLAVE), names=("d",), source="10.1.1.1"),
            "tls-names",
            "tls-names are d, policy x wants c",
        )

    def test_firstMatchWins(self):
        policy = parsePolicy(
            """
[[identity]]
name = "narrow"
role = "agent"
from = ["10.1.0.1/32"]
addresses = ["192.168.0.1/32"]

[[identity]]
name = "wide"
role = "agent"
from = ["10.1.0.0/16"]

[[identity]]
name = "wide-peer"
role = "peer"
from = ["0.0.0.0/0"]
"""
        )
        self.assertEqual(policy.match(LegFacts("agent", ipaddress.ip_address("10.1.0.1"))).name, "narrow")
        self.assertEqual(policy.match(LegFacts("agent", ipaddress.ip_address("10.1.0.2"))).name, "wide")
        self.assertEqual(policy.match(LegFacts("peer", ipaddress.ip_address("10.1.0.1"))).name, "wide-peer")

    def test_roleMatters(self):
        self.assertEqual(
            self.policy.match(LegFacts("gateway", ipaddress.ip_address("10.1.0.1"), ("gw2",), kind="tls")),
            Refusal("no identity of role gateway in p.toml"),
        )

    def test_closestIdentity(self):
        """
        The refusal names the identity with the fewest differing keys (the
        first of equals), and its first differing key.
        """
        policy = parsePolicy(
            f"""
[[identity]]
name = "far"
role = "agent"
tls-names = ["a"]
from = ["10.9.0.0/16"]
sgx.mrenclave = "{OTHER_ENCLAVE}"

[[identity]]
name = "near"
role = "agent"
tls-names = ["a"]
sgx.mrenclave = "{ENCLAVE}"
sgx.min-isvsvn = 5

[[identity]]
name = "as-near"
role = "agent"
from = ["10.9.0.0/16"]
sgx.mrenclave = "{OTHER_ENCLAVE}"
"""
        )
        self.assertEqual(
            policy.match(rats(sgx(isvsvn=1), names=("b",))),
            Refusal("tls-names are b, policy near wants a", key="tls-names", identity="near"),
        )

    def test_strict(self):
        self.assertTrue(parsePolicy(EXAMPLE).strict)
        self.assertEqual(parsePolicy(EXAMPLE).path, "<policy>")


class ServiceTests(unittest.TestCase):
    """
    L{Identity.allowsService}: one set look-up by packed address, port and
    IP protocol number.
    """

    def setUp(self):
        self.agent = identity(
            'from = ["0.0.0.0/0"]\nservices = ["192.168.0.254:80/tcp", "192.168.0.254:53/udp", "[fd00::1]:443/tcp"]'
        ).identities[0]

    def test_tcp(self):
        address = ipaddress.ip_address("192.168.0.254").packed
        self.assertTrue(self.agent.allowsService(6, address, 80))
        self.assertFalse(self.agent.allowsService(6, address, 81))
        self.assertFalse(self.agent.allowsService(17, address, 80))
        self.assertFalse(self.agent.allowsService(6, ipaddress.ip_address("192.168.0.253").packed, 80))

    def test_udp(self):
        address = ipaddress.ip_address("192.168.0.254").packed
        self.assertTrue(self.agent.allowsService(17, address, 53))
        self.assertFalse(self.agent.allowsService(6, address, 53))

    def test_v6(self):
        address = ipaddress.ip_address("fd00::1").packed
        self.assertTrue(self.agent.allowsService(6, address, 443))
        self.assertTrue(self.agent.allowsService(6, memoryview(b"\0" + address)[1:], 443))
        self.assertFalse(self.agent.allowsService(17, address, 443))
        self.assertFalse(self.agent.allowsService(6, ipaddress.ip_address("fd00::2").packed, 443))

    def test_none(self):
        anything = identity('from = ["0.0.0.0/0"]').identities[0]
        self.assertTrue(anything.allowsService(6, os.urandom(4), 1234))
        self.assertTrue(anything.allowsService(17, os.urandom(16), 9))

    def test_emptyList(self):
        nothing = identity('from = ["0.0.0.0/0"]\nservices = []').identities[0]
        self.assertFalse(nothing.allowsService(6, ipaddress.ip_address("192.168.0.254").packed, 80))
        self.assertEqual(nothing.grantsText(), "addresses learned; services none")

    def test_text(self):
        self.assertEqual(str(parseService("[FD00::1]:443/TCP")), "[fd00::1]:443/tcp")
        self.assertEqual(str(Service(ipaddress.ip_address("10.0.0.1"), 53, "udp")), "10.0.0.1:53/udp")


class AllowedIpsTests(unittest.TestCase):
    """
    C{--allowed-ips NAME=PREFIX,...} as a policy that is not strict.
    """

    def setUp(self):
        self.prefixes = {
            "client-a": (ipaddress.ip_network("192.168.0.1/32"),),
            "client-b": (ipaddress.ip_network("192.168.1.0/25"), ipaddress.ip_network("fd00::/64")),
        }
        self.policy = allowedIpsPolicy(self.prefixes)

    def test_identities(self):
        self.assertFalse(self.policy.strict)
        self.assertIsNone(self.policy.path)
        self.assertEqual(
            self.policy.identities,
            (
                Identity("client-a", "agent", tlsNames=("client-a",), addresses=self.prefixes["client-a"]),
                Identity("client-b", "agent", tlsNames=("client-b",), addresses=self.prefixes["client-b"]),
                Identity("client-a", "peer", tlsNames=("client-a",), addresses=self.prefixes["client-a"]),
                Identity("client-b", "peer", tlsNames=("client-b",), addresses=self.prefixes["client-b"]),
            ),
        )

    def test_match(self):
        source = ipaddress.ip_address("10.1.0.1")
        agent = self.policy.match(LegFacts("agent", source, ("x", "client-b"), kind="tls"))
        self.assertEqual((agent.name, agent.role, agent.addresses), ("client-b", "agent", self.prefixes["client-b"]))
        self.assertIsNone(agent.services)
        peer = self.policy.match(LegFacts("peer", source, ("client-a",), kind="tls"))
        self.assertEqual((peer.name, peer.role), ("client-a", "peer"))

    def test_refusal(self):
        self.assertEqual(
            self.policy.match(LegFacts("agent", ipaddress.ip_address("10.1.0.1"), ("client-c",), kind="tls")),
            Refusal("tls-names are client-c, policy client-a wants client-a", key="tls-names", identity="client-a"),
        )
        self.assertEqual(
            self.policy.match(LegFacts("gateway", None)), Refusal("no identity of role gateway in --allowed-ips")
        )

    def test_empty(self):
        policy = allowedIpsPolicy({})
        self.assertTrue(policy.isEmpty())
        self.assertEqual(policy.forRole("agent"), ())


class PolicyTests(unittest.TestCase):
    def test_byHand(self):
        """
        A policy built in code (not from a file) takes text for prefixes
        and services, as the file does.
        """
        built = Policy(
            (Identity("a", "agent", sources=["10.0.0.0/8"], addresses=["192.168.0.1/32"], services=["[::1]:1/udp"]),)
        )
        self.assertEqual(built.get("a").sources, (ipaddress.ip_network("10.0.0.0/8"),))
        self.assertEqual(built.get("a").services, (Service(ipaddress.ip_address("::1"), 1, "udp"),))
        self.assertIs(built.match(LegFacts("agent", ipaddress.ip_address("10.2.3.4"))), built.identities[0])
        self.assertEqual(
            built.match(LegFacts("agent", None)), Refusal("from is unknown, policy a wants 10.0.0.0/8", "from", "a")
        )

"""
Option parsing of enta and entg: defaults, ENG's flag names, and refusals.
"""

import ipaddress
import os

from twisted.python import usage
from twisted.trial import unittest

from ent.services.options import EntaOptions, EntgOptions


def enta(*argv):
    options = EntaOptions()
    options.parseOptions(list(argv))
    return options


def entg(*argv):
    options = EntgOptions()
    options.parseOptions(list(argv))
    return options


def emptyFiles(testCase, *names):
    """
    Empty files named C{names} in a new directory: the TLS options refuse a
    path that cannot be read.
    """
    directory = testCase.mktemp()
    os.mkdir(directory)
    paths = [os.path.join(directory, name) for name in names]
    for path in paths:
        open(path, "w").close()
    return paths


class EntaOptionsTests(unittest.TestCase):
    def test_captureDefaults(self):
        o = enta("--dport", "7")
        self.assertEqual(o["role"], "capture")
        self.assertEqual(o["dports"], (7,))
        self.assertEqual(o["tun-interface"], ipaddress.IPv4Interface("192.168.0.1/24"))
        self.assertEqual(o["peer-addr"], ipaddress.IPv4Address("192.168.0.254"))
        self.assertEqual(o["tunnel-port"], 6978)
        self.assertEqual(o["entg-connect"], "127.0.0.1:6980")
        self.assertEqual(o["tun-name"], "tun0")

    def test_replayDefaults(self):
        o = enta("--replay", "7", "--entg-connect", "10.3.0.1:6980")
        self.assertEqual(o["role"], "replay")
        self.assertEqual(o["replay"], 7)
        self.assertEqual(o["tun-interface"], ipaddress.IPv4Interface("192.168.0.254/24"))
        self.assertEqual(o["peer-addr"], ipaddress.IPv4Address("192.168.0.1"))

    def test_captureAliasListsAndRepeats(self):
        o = enta("--capture", "7,8", "--dport", "9", "--dport", "7")
        self.assertEqual(o["dports"], (7, 8, 9))

    def test_engTunAddrAndMask(self):
        o = enta("--dport", "7", "--tun-addr", "10.8.0.1", "--tun-mask", "255.255.0.0", "--peer-addr", "10.8.0.2")
        self.assertEqual(o["tun-interface"], ipaddress.IPv4Interface("10.8.0.1/16"))
        o = enta("--dport", "7", "--tun-addr", "192.168.0.1/16")
        self.assertEqual(o["tun-interface"].network.prefixlen, 16)

    def test_endpointString(self):
        o = enta("--dport", "7", "--entg-connect", "tcp:host=10.1.0.2:port=6980")
        self.assertEqual(o["entg-connect"], "tcp:host=10.1.0.2:port=6980")

    def assertRefused(self, argv, fragment):
        e = self.assertRaises(usage.UsageError, enta, *argv)
        self.assertIn(fragment, str(e))

    def test_refusals(self):
        self.assertRefused(["--dport", "7", "--replay", "8"], "exclude")
        self.assertRefused(["--dport", "0"], "out of range")
        self.assertRefused(["--dport", "70000"], "out of range")
        self.assertRefused(["--dport", "seven"], "is not PORT[,PORT...]")
        self.assertRefused(["--replay", "65536"], "out of range")
        self.assertRefused(["--dport", "7", "--tun-addr", "10.9.9.9"], "give --peer-addr")
        self.assertRefused(["--dport", "7", "--tun-addr", "300.1.1.1"], "--tun-addr '300.1.1.1': Octet 300")
        self.assertRefused(["--dport", "7", "--tun-addr", "192.168.0.1/24", "--tun-mask", "16"], "not both")
        self.assertRefused(["--dport", "7", "--peer-addr", "10.0.0.1"], "must be another address")
        self.assertRefused(["--dport", "7", "--mtu", "70000"], "out of range")
        self.assertRefused(["--dport", "7", "--tun-name", "a-name-far-too-long"], "not a valid interface")
        self.assertRefused(["--dport", "7", "--entg-connect", "nonsense"], "neither HOST:PORT")
        self.assertRefused(["--dport", "7", "--entg-connect", "host:99999"], "out of range")
        self.assertRefused(["--dport", "7", "--route-table", "254"], "reserved")
        self.assertRefused(["--dport", "7", "--route-table", "main"], "neither a number nor auto")
        self.assertRefused(["--dport", "7", "--tun-name", "tun@1"], "nftables cannot name a table")

    def test_routeTableAutomaticUnlessGiven(self):
        self.assertIsNone(enta("--dport", "7")["route-table"])
        self.assertEqual(enta("--dport", "7", "--route-table", "100")["route-table"], 100)

    def test_captureThatWouldLoopRefused(self):
        """
        Capturing the gateway's port would send the agent's own connection
        to the gateway into the tunnel, wherever the gateway is.
        """
        for connect in ("10.1.0.2:6980", "tcp:host=10.1.0.2:port=6980", "tls:gw.example:6980"):
            self.assertRefused(
                ["--dport", "7,6980", "--entg-connect", connect],
                "--dport 6980 is the gateway's port (--entg-connect): capturing it would loop",
            )
        self.assertRefused(["--dport", "6980"], "--dport 6980 is the gateway's port")
        for metrics in ("9100", "127.0.0.1:9100", "tcp:9100:interface=127.0.0.1"):
            self.assertRefused(
                ["--dport", "9100", "--metrics", metrics], "--dport 9100 is the --metrics port: capturing it would loop"
            )
        self.assertEqual(enta("--dport", "7", "--entg-connect", "vsock:3:7")["gateway-port"], None)

    def test_unknownFlag(self):
        self.assertRaises(usage.UsageError, enta, "--dport", "7", "--no-such-flag")

    def test_userStackClient(self):
        o = enta("--stack", "user", "--listen", "7007=192.168.0.254:6978", "--listen", "10.0.0.5:80=192.168.0.9:80")
        self.assertEqual(o["role"], "capture")
        self.assertEqual(
            [(m.address, m.port, m.tunAddress, m.tunPort) for m in o["listens"]],
            [("127.0.0.1", 7007, "192.168.0.254", 6978), ("10.0.0.5", 80, "192.168.0.9", 80)],
        )
        self.assertEqual(o["mappings"], ())
        self.assertEqual(o["mtu"], 65521)
        self.assertIsNone(o["route-table"])

    def test_userStackServer(self):
        o = enta("--stack", "user", "--expose", "6978=7")
        self.assertEqual(o["role"], "replay")
        self.assertEqual(o["tun-interface"], ipaddress.IPv4Interface("192.168.0.254/24"))
        self.assertEqual([(e.tunPort, e.port) for e in o["exposures"]], [(6978, 7)])
        self.assertEqual(enta("--stack", "user", "--replay", "7")["exposures"][0].tunPort, 6978)
        self.assertEqual(enta("--stack", "user", "--expose", "6978", "--mtu", "1500")["mtu"], 1500)

    def test_userStackRefusals(self):
        self.assertRefused(["--stack", "user"], "--stack user carries only what --listen or --expose")
        self.assertRefused(["--stack", "usr", "--dport", "7"], "--stack 'usr' is neither kernel nor user")
        self.assertRefused(["--listen", "7007=192.168.0.254:6978"], "needs --stack user")
        self.assertRefused(["--stack", "user", "--dport", "7"], "--dport captures with netfilter")
        self.assertRefused(["--stack", "user", "--map", "7=192.168.0.254:7"], "use --listen")
        self.assertRefused(
            ["--stack", "user", "--listen", "7=192.168.0.254:7", "--route-table", "100"],
            "--route-table is for the kernel's stack",
        )
        self.assertRefused(["--stack", "user", "--listen", "7=192.168.0.254:7", "--expose", "7"], "exclude")
        self.assertRefused(["--stack", "user", "--listen", "7=10.0.0.1:7"], "not a far agent's address")
        self.assertRefused(
            ["--stack", "user", "--listen", "7=192.168.0.254:7", "--listen", "7=192.168.0.9:7"], "same tcp port"
        )
        self.assertRefused(["--stack", "user", "--listen", "seven"], "--listen 'seven' is not")


class EntgOptionsTests(unittest.TestCase):
    def test_defaultsListenForBoth(self):
        o = entg()
        self.assertEqual(o["enta-listen"], "6980")
        self.assertEqual(o["entg-listen"], "6979")
        self.assertIsNone(o["entg-connect"])

    def test_connectToPeer(self):
        o = entg("--entg-connect", "10.2.0.2:6979", "--enta-listen", "6980")
        self.assertEqual(o["entg-connect"], "10.2.0.2:6979")
        self.assertIsNone(o["entg-listen"])

    def test_connectAndListen(self):
        """
        A gateway may both connect to peers and accept others.
        """
        o = entg("--entg-connect", "10.2.0.2:6979", "--entg-listen", "6979")
        self.assertEqual((o["entg-connect"], o["entg-listen"]), ("10.2.0.2:6979", "6979"))
        self.assertEqual(o["entg-listen-security"].kind, "tcp")

    def test_severalPeers(self):
        o = entg(
            "--entg-connect",
            "10.2.0.2:6979=192.168.0.254/32",
            "--entg-connect",
            "gw3:6979=192.168.0.253,fd00::/64",
            "--entg-connect",
            "vsock:3:6979=10.0.0.0/8",
        )
        self.assertEqual(
            [(p.description, p.routes) for p in o["entg-peers"]],
            [
                ("10.2.0.2:6979", (ipaddress.ip_network("192.168.0.254/32"),)),
                ("gw3:6979", (ipaddress.ip_network("192.168.0.253/32"), ipaddress.ip_network("fd00::/64"))),
                ("vsock:3:6979", (ipaddress.ip_network("10.0.0.0/8"),)),
            ],
        )
        self.assertEqual([p.security.kind for p in o["entg-peers"]], ["tcp"] * 3)
        self.assertEqual(o["entg-connect"], "10.2.0.2:6979")
        self.assertIsNone(o["entg-listen"])

    def test_endpointStringKeepsItsEquals(self):
        o = entg("--entg-connect", "tcp:host=10.2.0.2:port=6979")
        self.assertEqual([(p.description, p.routes) for p in o["entg-peers"]], [("tcp:host=10.2.0.2:port=6979", ())])

    def test_severalPeersNameTheirCertificateHosts(self):
        cert, key, ca = emptyFiles(self, "c.pem", "c.key", "ca.pem")
        o = entg(
            "--entg-tls",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--tls-ca",
            ca,
            "--entg-connect",
            "gw2:6979=192.168.0.254",
            "--entg-connect",
            "gw3:6979=192.168.0.253",
        )
        self.assertEqual([p.security.peerName for p in o["entg-peers"]], ["gw2", "gw3"])

    def test_peerRefusals(self):
        two = ("--entg-connect", "gw2:6979=192.168.0.254")
        for argv, message in (
            (
                ["--entg-connect", "gw2:6979", "--entg-connect", "gw3:6979=10.0.0.0/8"],
                "--entg-connect 'gw2:6979' needs =PREFIX[,PREFIX...]: with several peers each names",
            ),
            (
                [*two, "--entg-connect", "gw3:6979=192.168.0.0/24"],
                "--entg-connect 'gw3:6979=192.168.0.0/24': 192.168.0.0/24 overlaps 192.168.0.254/32 of gw2:6979",
            ),
            ([*two, "--entg-connect", "gw2:6979=10.0.0.1"], "--entg-connect 'gw2:6979' is given twice"),
            (
                ["--entg-connect", "gw2:6979=10.0.0.1/8"],
                "--entg-connect 'gw2:6979=10.0.0.1/8': 10.0.0.1/8 has host bits",
            ),
            (["--entg-connect", "gw2:6979=ten"], "--entg-connect 'gw2:6979=ten'"),
            (["--entg-connect", "gw2:0=10.0.0.1"], "--entg-connect 'gw2:0': port 0 is out of range"),
            ([*two, "--entg-connect", "gw3:6979=10.0.0.1", "--entg-tls-name", "gw"], "--entg-tls-name names one peer"),
        ):
            e = self.assertRaises(usage.UsageError, entg, *argv)
            self.assertIn(message, str(e))
            self.assertNotIn("\n", str(e))

    def test_refusals(self):
        e = self.assertRaises(usage.UsageError, entg, "--enta-listen", "0")
        self.assertIn("out of range", str(e))
        e = self.assertRaises(usage.UsageError, entg, "--entg-listen", "ten")
        self.assertIn("neither [ADDR:]PORT", str(e))

    def test_allowedIps(self):
        cert, key, ca = emptyFiles(self, "c.pem", "c.key", "ca.pem")
        tls = ("--enta-tls", "--tls-cert", cert, "--tls-key", key, "--tls-ca", ca)
        o = entg(
            *tls,
            "--allowed-ips",
            "client=192.168.0.0/24,fd00::/64",
            "--allowed-ips",
            "10.1.0.1=192.168.1.1/32",
            "--agent-to-agent",
        )
        self.assertEqual(
            o["allowed-ips"],
            {
                "client": (ipaddress.ip_network("192.168.0.0/24"), ipaddress.ip_network("fd00::/64")),
                "10.1.0.1": (ipaddress.ip_network("192.168.1.1/32"),),
            },
        )
        self.assertTrue(o["agent-to-agent"])
        self.assertEqual(entg()["allowed-ips"], {})
        for argv, message in (
            (["--allowed-ips", "client"], "give NAME=PREFIX"),
            (["--allowed-ips", "client=192.168.0.1/24"], "has host bits set"),
            (
                ["--allowed-ips", "a=10.0.0.0/8", "--allowed-ips", "b=10.1.0.0/16"],
                "b: 10.1.0.0/16 overlaps 10.0.0.0/8 of a",
            ),
            (["--allowed-ips", "a=10.0.0.0/8", "--allowed-ips", "a=11.0.0.0/8"], "names a twice"),
        ):
            e = self.assertRaises(usage.UsageError, entg, *tls, *argv)
            self.assertIn(message, str(e))
        e = self.assertRaises(usage.UsageError, entg, "--allowed-ips", "a=10.0.0.0/8")
        self.assertIn("give --enta-tls or --entg-tls", str(e))


class SecurityOptionsTests(unittest.TestCase):
    def files(self, *names):
        return emptyFiles(self, *names)

    def test_plainByDefault(self):
        self.assertEqual(enta("--dport", "7")["entg-security"].kind, "tcp")
        o = entg()
        self.assertEqual((o["enta-security"].kind, o["entg-security"].kind), ("tcp", "tcp"))

    def test_tlsNeedsFilesAndTakesTheNameFromConnect(self):
        e = self.assertRaises(usage.UsageError, enta, "--dport", "7", "--entg-tls")
        self.assertIn("a TLS leg needs --tls-cert, --tls-key, --tls-ca", str(e))
        cert, key, ca = self.files("c.pem", "c.key", "ca.pem")
        o = enta(
            "--dport",
            "7",
            "--entg-tls",
            "--entg-connect",
            "gw1.example:6980",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--tls-ca",
            ca,
        )
        security = o["entg-security"]
        self.assertEqual((security.kind, security.peerName), ("tls", "gw1.example"))
        self.assertEqual(security.tlsFiles.ca, ca)

    def test_tlsNameOverride(self):
        cert, key, ca = self.files("c", "k", "a")
        o = entg(
            "--entg-tls",
            "--entg-connect",
            "10.2.0.2:6979",
            "--entg-tls-name",
            "gw2",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--tls-ca",
            ca,
        )
        self.assertEqual(o["entg-security"].peerName, "gw2")
        self.assertEqual(o["enta-security"].kind, "tcp")

    def test_ratsTlsRoleDefaultsAsEng(self):
        client = enta("--dport", "7", "--entg-rats-tls")["entg-security"].ratsTls
        self.assertEqual((client.attester, client.verifier, client.server), ("nullattester", "sgx_ecdsa", False))
        server = entg("--enta-rats-tls")["enta-security"].ratsTls
        self.assertEqual((server.attester, server.verifier, server.server), ("sgx_ecdsa", "nullverifier", True))

    def test_ratsTlsPluginsNamed(self):
        [library] = self.files("librats_tls.so")
        o = entg(
            "--entg-rats-tls",
            "--entg-connect",
            "10.2.0.2:6979",
            "--attester",
            "nullattester",
            "--verifier",
            "nullverifier",
            "--mutual",
            "--rats-tls-lib",
            library,
        )
        choice = o["entg-security"].ratsTls
        self.assertEqual(
            (choice.attester, choice.verifier, choice.mutual, choice.library),
            ("nullattester", "nullverifier", True, library),
        )

    def test_refusals(self):
        e = self.assertRaises(usage.UsageError, entg, "--enta-tls", "--enta-rats-tls")
        self.assertIn("exclude", str(e))
        e = self.assertRaises(
            usage.UsageError, enta, "--dport", "7", "--entg-rats-tls", "--entg-connect", "tcp:host=a:port=1"
        )
        self.assertIn("needs HOST:PORT", str(e))
        e = self.assertRaises(usage.UsageError, entg, "--enta-rats-tls", "--rats-tls-log-level", "loud")
        self.assertIn("is not one of", str(e))
        e = self.assertRaises(usage.UsageError, entg, "--enta-rats-tls", "--attester", "x" * 40)
        self.assertIn("not a plugin name", str(e))


class PolicyOptionsTests(unittest.TestCase):
    """
    --policy is read when the options are, so a wrong key is refused with
    its file and line before anything starts; --claim and --reattest.
    """

    def policyFile(self, text):
        from tests.checks import tempDir

        path = os.path.join(tempDir(self, "ent-options-"), "policy.toml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_policyIsLoaded(self):
        path = self.policyFile('[[identity]]\nname = "a"\nrole = "agent"\nfrom = ["10.1.0.1/32"]\n')
        for parse in (entg, lambda *a: enta("--dport", "7", *a)):
            o = parse("--policy", path)
            self.assertEqual([i.name for i in o["policy-rules"].identities], ["a"])
        self.assertIsNone(entg()["policy-rules"])

    def test_wrongKeyNamesFileAndLine(self):
        path = self.policyFile('[[identity]]\nname = "a"\nrole = "agent"\nfrom = ["10.1.0.1/32"]\nadresses = []\n')
        e = self.assertRaises(usage.UsageError, entg, "--policy", path)
        self.assertIn(f"{path}:5:", str(e))
        self.assertIn("adresses", str(e))

    def test_missingFile(self):
        e = self.assertRaises(usage.UsageError, entg, "--policy", "/nonexistent/policy.toml")
        self.assertIn("/nonexistent/policy.toml", str(e))

    def test_allowedIpsAndPolicyExcludeEachOther(self):
        path = self.policyFile("")
        e = self.assertRaises(usage.UsageError, entg, "--policy", path, "--allowed-ips", "a=10.0.0.0/8")
        self.assertIn("--allowed-ips and --policy exclude each other", str(e))

    def test_policyMakesTheAcceptingSideVerify(self):
        """
        librats_tls checks a connecting side only when asked for mutual:
        with a policy, the accepting side always is.
        """
        path = self.policyFile("")
        self.assertFalse(entg("--enta-rats-tls")["enta-security"].ratsTls.mutual)
        self.assertTrue(entg("--enta-rats-tls", "--policy", path)["enta-security"].ratsTls.mutual)

    def test_attestingConnectorPresentsItsEvidence(self):
        """
        librats_tls sends a connecting side's certificate (its evidence)
        only when that side is mutual: one that attests is.
        """
        self.assertFalse(enta("--entg-rats-tls")["entg-security"].ratsTls.mutual)
        self.assertTrue(enta("--entg-rats-tls", "--attester", "ent_sim")["entg-security"].ratsTls.mutual)

    def test_claims(self):
        o = enta("--dport", "7", "--entg-rats-tls", "--claim", "app=billing", "--claim", "tier=gold")
        self.assertEqual(o["entg-security"].ratsTls.claims, (("app", b"billing"), ("tier", b"gold")))
        for argv, message in (
            (["--claim", "app"], "give NAME=VALUE"),
            (["--claim", "a pp=x"], "give NAME=VALUE"),
            (["--claim", "a=1", "--claim", "a=2"], "names a twice"),
            (["--claim", "a=" + "x" * 2000], "longer than"),
        ):
            e = self.assertRaises(usage.UsageError, enta, "--dport", "7", *argv)
            self.assertIn(message, str(e))

    def test_handshakeTimeout(self):
        """
        --handshake-timeout: a positive number of seconds, default 10, on
        every leg's security, whichever protection it has.
        """
        self.assertEqual(entg()["handshake-timeout"], 10.0)
        self.assertEqual(entg("--enta-rats-tls")["enta-security"].handshakeTimeout, 10.0)
        o = enta("--dport", "7", "--entg-rats-tls", "--handshake-timeout", "2.5")
        self.assertEqual(o["entg-security"].handshakeTimeout, 2.5)
        self.assertEqual(entg("--handshake-timeout", "3")["enta-security"].handshakeTimeout, 3.0)
        for bad in ("0", "-1", "soon", "1e3", " 5"):
            e = self.assertRaises(usage.UsageError, entg, "--handshake-timeout", bad)
            self.assertIn("--handshake-timeout", str(e))

    def test_reattest(self):
        self.assertEqual(entg()["reattest"], 3600)
        self.assertEqual(entg("--reattest", "0")["reattest"], 0)
        e = self.assertRaises(usage.UsageError, entg, "--reattest", "-5")
        self.assertIn("--reattest", str(e))
        e = self.assertRaises(usage.UsageError, entg, "--reattest", "soon")
        self.assertIn("--reattest", str(e))


class PolicyVerifierTests(unittest.TestCase):
    """
    Measurements in a policy must meet a verifier that checks quotes:
    nullverifier would let whoever connects claim any MRENCLAVE.
    """

    def policyFile(self, role):
        from tests.checks import tempDir

        path = os.path.join(tempDir(self, "ent-options-"), "policy.toml")
        with open(path, "w") as f:
            f.write(f'[[identity]]\nname = "e"\nrole = "{role}"\nsgx.mrenclave = "{"9f" * 32}"\n')
        return path

    def test_nullVerifierRefusedForMeasurements(self):
        agents = self.policyFile("agent")
        e = self.assertRaises(usage.UsageError, entg, "--enta-rats-tls", "--policy", agents)
        self.assertIn("identity 'e' (line 1) asks for evidence", str(e))
        self.assertIn("nullverifier", str(e))
        # A verifier that checks, or legs that are not rats-tls, are fine.
        entg("--enta-rats-tls", "--verifier", "ent_sim", "--policy", agents)
        entg("--policy", agents)
        gateway = self.policyFile("gateway")
        self.assertRaises(
            usage.UsageError, enta, "--dport", "7", "--entg-rats-tls", "--verifier", "nullverifier", "--policy", gateway
        )
        enta("--dport", "7", "--entg-rats-tls", "--policy", gateway)

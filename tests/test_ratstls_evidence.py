"""
Tests for the evidence that L{ent.ratstls} reads in the verification
callback (L{ent.legs.evidence.Evidence}) and for custom claims.

The handshake tests need a real librats_tls with the ent_sim plugins
(tests/ratstls_sim, built beside each real library by
scripts/ratstls-build.sh): a simulated SGX ECDSA attester whose quote the
library itself turns into C{rtls_evidence_t}'s measurements.  They run in the
real-library runs of scripts/test.sh; the parsing and conf tests run
everywhere.  The ent_sim attester reads C{ENT_SIM_*} from the environment
in C{rats_tls_init}, so each test sets it before making the session.
"""

import os

from twisted.trial import unittest

from ent import ratstls
from ent.errors import ConfigurationError, RatsTlsError
from ent.legs.evidence import Evidence
from ent.ratstls import LAYOUT_V2022, LAYOUT_V2025, RatsTlsLibrary, ffi
from tests.ratstlsmock import MOCK_ONLY, REAL_ONLY, library_under_test, mock_library
from tests.test_ratstls_binding import Call, TestCase, cfg

MRENCLAVE = bytes(range(0x40, 0x60))
MRSIGNER = bytes(range(0xA0, 0xC0))
#: The ent_sim attester's defaults (tests/ratstls_sim/README.md).
DEFAULT_MRENCLAVE = bytes.fromhex("0123456789abcdef" * 4)
DEFAULT_MRSIGNER = bytes.fromhex("fedcba9876543210" * 4)

SIM_ENV = (
    "ENT_SIM_MRENCLAVE",
    "ENT_SIM_MRSIGNER",
    "ENT_SIM_ISVPRODID",
    "ENT_SIM_ISVSVN",
    "ENT_SIM_DEBUG",
    "ENT_SIM_TAMPER",
)


def unloaded(layout):
    """
    A L{RatsTlsLibrary} of C{layout} that loaded nothing: parsing and confs
    only need the layout.
    """
    return RatsTlsLibrary("/nonexistent/librats_tls.so", layout, None, None)


class EvidenceParsingTests(unittest.TestCase):
    """
    L{RatsTlsLibrary.parse_evidence} on hand-made C{rtls_evidence_t}s.
    """

    def sgx(self, layout, flags=0, **fields):
        """
        SGX ECDSA evidence as the libraries fill it: pointers into an
        C{sgx_quote3_t}.
        """
        quote = bytearray(436)
        quote[96:112] = flags.to_bytes(8, "little") + bytes(8)
        quote[112:144] = MRENCLAVE
        quote[176:208] = MRSIGNER
        self.quote = buffer = ffi.new("char[]", bytes(quote))
        ev = ffi.new(ratstls.EVIDENCE_CTYPES[layout][:-2] + " *")
        ev.type = 1
        ev.quote = buffer
        ev.quote_size = 436
        ev.sgx.attributes = ffi.cast("uint8_t *", buffer + 96)
        ev.sgx.mr_enclave = ffi.cast("uint8_t *", buffer + 112)
        ev.sgx.mr_signer = ffi.cast("uint8_t *", buffer + 176)
        ev.sgx.product_id = fields.get("product_id", 7)
        ev.sgx.security_version = fields.get("security_version", 3)
        return ev

    def test_sgxBothLayouts(self):
        for layout in (LAYOUT_V2022, LAYOUT_V2025):
            ev = self.sgx(layout)
            self.assertEqual(
                unloaded(layout).parse_evidence(ev), Evidence("sgx_ecdsa", MRENCLAVE, MRSIGNER, 7, 3, False), layout
            )

    def test_debugIsFlagsBit1(self):
        parse = unloaded(LAYOUT_V2025).parse_evidence
        self.assertTrue(parse(self.sgx(LAYOUT_V2025, flags=0x07)).debug)
        self.assertFalse(parse(self.sgx(LAYOUT_V2025, flags=0x05)).debug)

    def test_zeroedIsNone(self):
        for layout in (LAYOUT_V2022, LAYOUT_V2025):
            ev = ffi.new(ratstls.EVIDENCE_CTYPES[layout])
            self.assertEqual(unloaded(layout).parse_evidence(ev), Evidence(), layout)

    def test_v2022TrustsOnlySgx(self):
        """
        v2022 leaves the struct uninitialised for anything but SGX ECDSA: a
        type 2 there is garbage, not TDX; in v2025 it is TDX (no fields).
        """
        ev = ffi.new("rtls_evidence_v2022_t *", {"type": 2})
        self.assertEqual(unloaded(LAYOUT_V2022).parse_evidence(ev), Evidence())
        ev = ffi.new("rtls_evidence_v2025_t *", {"type": 2})
        self.assertEqual(unloaded(LAYOUT_V2025).parse_evidence(ev), Evidence("tdx_ecdsa"))
        ev = ffi.new("rtls_evidence_v2025_t *", {"type": 99})
        self.assertEqual(unloaded(LAYOUT_V2025).parse_evidence(ev), Evidence())

    def test_sgxWithoutMeasurementsRejected(self):
        ev = ffi.new("rtls_evidence_v2025_t *", {"type": 1})
        self.assertRaises(ValueError, unloaded(LAYOUT_V2025).parse_evidence, ev)

    def test_sgxPointersOutsideQuote(self):
        """
        Fields that do not point into the quote: garbage in v2022 (whose
        struct is uninitialised), so no evidence; an error in v2025.
        """
        for layout in (LAYOUT_V2022, LAYOUT_V2025):
            ev = self.sgx(layout)
            ev.sgx.mr_signer = ev.sgx.mr_enclave
            if layout == LAYOUT_V2022:
                self.assertEqual(unloaded(layout).parse_evidence(ev), Evidence())
            else:
                self.assertRaises(ValueError, unloaded(layout).parse_evidence, ev)
        ev = self.sgx(LAYOUT_V2022)
        ev.quote_size = 435
        self.assertEqual(unloaded(LAYOUT_V2022).parse_evidence(ev), Evidence())

    def test_nullRejected(self):
        self.assertRaises(ValueError, unloaded(LAYOUT_V2025).parse_evidence, ffi.NULL)

    def claims(self, pairs, length=None):
        array = ffi.new("claim_t[]", max(len(pairs), 1))
        keep = [array]
        for i, (name, value) in enumerate(pairs):
            if name is not None:
                keep.append(ffi.new("char[]", name))
                array[i].name = keep[-1]
            if value is not None:
                keep.append(ffi.new("uint8_t[]", value or b"\0"))
                array[i].value = keep[-1]
            array[i].value_size = len(value or b"") if value is not None else 5
        ev = ffi.new("rtls_evidence_v2025_t *")
        ev.custom_claims = array
        ev.custom_claims_length = len(pairs) if length is None else length
        self.keep = keep
        return ev

    def test_claimsSorted(self):
        ev = self.claims([(b"zeta", b"last"), (b"alpha", b"\x00\xff"), (b"empty", b"")])
        evidence = unloaded(LAYOUT_V2025).parse_evidence(ev)
        self.assertEqual(evidence.claims, (("alpha", b"\x00\xff"), ("empty", b""), ("zeta", b"last")))
        self.assertEqual(evidence.kind, "none")

    def test_claimsBounded(self):
        parse = unloaded(LAYOUT_V2025).parse_evidence
        self.assertEqual(len(parse(self.claims([(b"n%d" % i, b"v") for i in range(64)])).claims), 64)
        for bad in (
            self.claims([(b"n%d" % i, b"v") for i in range(65)]),
            self.claims([(b"x" * 256, b"v")]),
            self.claims([(b"big", b"v" * 4097)]),
            self.claims([(None, b"v")]),
            self.claims([(b"nullvalue", None)]),
            self.claims([(b"\xff", b"v")]),
        ):
            self.assertRaises(ValueError, parse, bad)
        self.assertEqual(parse(self.claims([(b"x" * 255, b"v" * 4096)])).claims[0][0], "x" * 255)
        ev = ffi.new("rtls_evidence_v2025_t *", {"custom_claims_length": 1})
        self.assertRaises(ValueError, parse, ev)


class ClaimsConfTests(unittest.TestCase):
    """
    C{RatsTlsConfig.claims} in C{rats_tls_conf_t}.
    """

    def test_v2025(self):
        conf = unloaded(LAYOUT_V2025).make_conf(cfg(claims=(("role", b"gateway"), ("empty", b""))))
        self.assertEqual(conf.custom_claims_length, 2)
        got = [
            (ffi.string(c.name), ffi.buffer(c.value, c.value_size)[:])
            for c in (conf.custom_claims[0], conf.custom_claims[1])
        ]
        self.assertEqual(got, [(b"role", b"gateway"), (b"empty", b"")])

    def test_none(self):
        conf = unloaded(LAYOUT_V2025).make_conf(cfg())
        self.assertEqual((conf.custom_claims, conf.custom_claims_length), (ffi.NULL, 0))

    def test_v2022Refuses(self):
        with self.assertRaises(ConfigurationError) as caught:
            unloaded(LAYOUT_V2022).make_conf(cfg(claims=(("role", b"gateway"),)))
        self.assertIn("2025", str(caught.exception))
        self.assertIn("/nonexistent/librats_tls.so", str(caught.exception))
        unloaded(LAYOUT_V2022).make_conf(cfg())

    def test_bounds(self):
        make = unloaded(LAYOUT_V2025).make_conf
        make(cfg(claims=tuple((f"n{i}", b"v" * 1024) for i in range(32))))
        make(cfg(claims=(("x" * 64, b""),)))
        for claims in (
            tuple((f"n{i}", b"v") for i in range(33)),
            (("x" * 65, b"v"),),
            (("", b"v"),),
            (("näme", b"v"),),
            (("nul\0", b"v"),),
            (("big", b"v" * 1025),),
            (("text", "not bytes"),),
            ((b"bytes-name", b"v"),),
            (("alone",),),
        ):
            self.assertRaises(ConfigurationError, make, cfg(claims=claims))


class MockEvidenceTests(TestCase):
    """
    The mock passes a zeroed C{rtls_evidence_t} of its own layout.
    """

    skip = MOCK_ONLY

    def test_bothLayouts(self):
        for layout in ("2022", "2025"):
            library = mock_library(layout)
            seen = []
            self.connected(
                library,
                server_config=cfg(server=True, mutual=True),
                client_config=cfg(mutual=True),
                server_verify=lambda ev: seen.append(ev) or True,
                client_verify=lambda ev: seen.append(ev) or True,
            )
            self.assertEqual(seen, [Evidence(), Evidence()], layout)


class SimTestCase(TestCase):
    """
    Handshakes against the real library with the ent_sim plugins.
    """

    skip = REAL_ONLY

    def setUp(self):
        super().setUp()
        self.library = library_under_test()
        for kind in ("attesters", "verifiers"):
            plugin = os.path.join(os.path.dirname(self.library.path), kind, f"lib{kind[:-1]}_ent_sim.so")
            if not os.path.isfile(plugin):
                raise AssertionError(f"{plugin} is missing: scripts/ratstls-build.sh builds it")
        for name in SIM_ENV:
            self.setenv(name, None)

    def simEnv(self, **values):
        """
        Set C{ENT_SIM_<NAME>} for each keyword, restored after the test.
        """
        for name, value in values.items():
            self.setenv("ENT_SIM_" + name.upper(), value)

    def valuesEnv(self, debug="0"):
        self.simEnv(mrenclave=MRENCLAVE.hex(), mrsigner=MRSIGNER.hex(), isvprodid="4660", isvsvn="65535", debug=debug)

    def clientAttests(self, client_claims=(), verify=None):
        """
        Client: ent_sim attester; server: ent_sim verifier, mutual.  Return
        the server session once both handshakes are done, or raise what the
        server's raised.
        """
        s_sock, c_sock = self.socketpair()
        server = self.session(
            self.library, cfg(server=True, mutual=True, verifier="ent_sim"), verify or (lambda ev: True)
        )
        client = self.session(self.library, cfg(mutual=True, attester="ent_sim", claims=client_claims))
        c_call = Call(client.negotiate, c_sock)
        try:
            self.wait(Call(server.negotiate, s_sock))
        finally:
            # TLS 1.3: the client may finish before the server rejects it.
            try:
                self.wait(c_call)
            except RatsTlsError:
                pass
        return server

    def serverAttests(self, verify=None):
        """
        Server: ent_sim attester, not mutual; client: ent_sim verifier.
        Return (client session, its negotiate call) with both calls done.
        """
        s_sock, c_sock = self.socketpair()
        server = self.session(self.library, cfg(server=True, attester="ent_sim"))
        client = self.session(self.library, cfg(verifier="ent_sim"), verify)
        s_call = Call(server.negotiate, s_sock)
        c_call = Call(client.negotiate, c_sock)
        try:
            self.wait(c_call)
        finally:
            try:
                self.wait(s_call)
            except RatsTlsError:
                pass
        return client


class SimEvidenceTests(SimTestCase):
    def test_clientEvidenceReachesServer(self):
        self.valuesEnv()
        seen = []
        server = self.clientAttests(verify=lambda ev: seen.append(ev) or True)
        want = Evidence("sgx_ecdsa", MRENCLAVE, MRSIGNER, 4660, 65535, False)
        self.assertEqual(server.evidence, want)
        self.assertTrue(seen)
        self.assertEqual(set(seen), {want})

    def test_debug(self):
        self.valuesEnv(debug="1")
        server = self.clientAttests()
        self.assertEqual(server.evidence, Evidence("sgx_ecdsa", MRENCLAVE, MRSIGNER, 4660, 65535, True))

    def test_defaults(self):
        server = self.clientAttests()
        self.assertEqual(server.evidence, Evidence("sgx_ecdsa", DEFAULT_MRENCLAVE, DEFAULT_MRSIGNER, 1, 1, False))

    def test_serverEvidenceReachesClient(self):
        self.valuesEnv()
        seen = []
        client = self.serverAttests(verify=lambda ev: seen.append(ev) or True)
        want = Evidence("sgx_ecdsa", MRENCLAVE, MRSIGNER, 4660, 65535, False)
        self.assertEqual(client.evidence, want)
        # The v2022 library runs the callback twice for one certificate.
        self.assertTrue(seen)
        self.assertEqual(set(seen), {want})

    def test_withoutVerifyAccepted(self):
        """
        Without C{verify} the plugin's verdict stands; the evidence is kept.
        """
        self.valuesEnv()
        client = self.serverAttests()
        self.assertEqual(client.evidence.mrenclave, MRENCLAVE)

    def test_tamperedRejected(self):
        """
        A quote changed after its MAC fails the ent_sim verifier, before the
        callback runs.
        """
        self.valuesEnv()
        self.simEnv(tamper="1")
        seen = []
        self.assertRaises(RatsTlsError, self.serverAttests, lambda ev: seen.append(ev) or True)
        self.assertEqual(seen, [])
        self.assertRaises(RatsTlsError, self.clientAttests)

    def test_verifyFalseRejects(self):
        self.valuesEnv()
        s_sock, c_sock = self.socketpair()
        server = self.session(self.library, cfg(server=True, attester="ent_sim"))
        client = self.session(self.library, cfg(verifier="ent_sim"), verify=lambda ev: False)
        s_call = Call(server.negotiate, s_sock)
        self.assertFailsAt("negotiate", Call(client.negotiate, c_sock), ratstls.ERR_HANDSHAKE)
        self.assertFailsAt("negotiate", s_call)
        self.assertEqual(client.evidence, Evidence("sgx_ecdsa", MRENCLAVE, MRSIGNER, 4660, 65535, False))

    def test_verifyRaisesRejects(self):
        def verify(evidence):
            raise ValueError("measurement not allowed")

        self.valuesEnv()
        e = self.assertRaises(RatsTlsError, self.serverAttests, verify)
        self.assertIn("measurement not allowed", str(e))

    def test_nullattesterPeer(self):
        """
        A nullattester peer, verified by the nullverifier: the callback runs
        and sees no evidence (v2025: a zeroed struct; v2022: an uninitialised
        one whose type is not SGX ECDSA).
        """
        seen = []
        s_sock, c_sock = self.socketpair()
        server = self.session(self.library, cfg(server=True))
        client = self.session(self.library, cfg(), verify=lambda ev: seen.append(ev) or True)
        s_call = Call(server.negotiate, s_sock)
        self.wait(Call(client.negotiate, c_sock))
        self.wait(s_call)
        self.assertTrue(seen)
        self.assertEqual(set(seen), {Evidence()})
        self.assertEqual(client.evidence, Evidence())

    def test_nullattesterPeerFailsSimVerifier(self):
        s_sock, c_sock = self.socketpair()
        server = self.session(self.library, cfg(server=True))
        client = self.session(self.library, cfg(verifier="ent_sim"), verify=lambda ev: True)
        s_call = Call(server.negotiate, s_sock)
        self.assertFailsAt("negotiate", Call(client.negotiate, c_sock))
        self.assertFailsAt("negotiate", s_call)
        self.assertIsNone(client.evidence)

    def test_malformedEnvFailsAttester(self):
        """
        The attester refuses malformed values, and both libraries then fail
        C{rats_tls_init} (where they collect evidence): the 2025 one with
        the attester's error, the 2022 one with the crypto wrapper's
        "no error" code 0x40000000, which is not 0 either.
        """
        for name, value in (
            ("mrenclave", "00" * 31),
            ("mrenclave", "zz" * 32),
            ("mrsigner", "00" * 33),
            ("isvprodid", "65536"),
            ("isvprodid", "-1"),
            ("isvsvn", "one"),
            ("isvsvn", ""),
            ("debug", "2"),
            ("tamper", "yes"),
        ):
            for other in SIM_ENV:
                os.environ.pop(other, None)
            self.simEnv(**{name: value})
            with self.assertRaises(RatsTlsError, msg=(name, value)) as caught:
                self.session(self.library, cfg(server=True, attester="ent_sim"))
            self.assertEqual(caught.exception.step, "init")
            if self.library.layout == LAYOUT_V2022:
                self.assertEqual(caught.exception.code, 0x40000000)


class SimClaimsTests(SimTestCase):
    def test_claimsReachServer(self):
        if self.library.layout != LAYOUT_V2025:
            raise unittest.SkipTest("custom claims need the 2025 library (see test_v2022RefusesClaims)")
        self.valuesEnv()
        claims = (("role", b"agent"), ("blob", bytes(range(256))), ("empty", b""))
        server = self.clientAttests(client_claims=claims)
        self.assertEqual(server.evidence.claims, tuple(sorted(claims)))
        self.assertEqual(server.evidence.mrenclave, MRENCLAVE)
        self.assertEqual(server.evidence.claim("role"), b"agent")

    def test_noClaims(self):
        server = self.clientAttests()
        self.assertEqual(server.evidence.claims, ())

    def test_v2022RefusesClaims(self):
        if self.library.layout != LAYOUT_V2022:
            raise unittest.SkipTest("the 2025 library takes claims (see test_claimsReachServer)")
        with self.assertRaises(ConfigurationError) as caught:
            self.session(self.library, cfg(mutual=True, attester="ent_sim", claims=(("role", b"agent"),)))
        self.assertIn("2025", str(caught.exception))

    def test_nullattesterCarriesNoClaims(self):
        """
        v2025: nullattester puts no evidence extension into its certificate,
        so its claims never travel.
        """
        if self.library.layout != LAYOUT_V2025:
            raise unittest.SkipTest("custom claims need the 2025 library")
        s_sock, c_sock = self.socketpair()
        server = self.session(self.library, cfg(server=True, mutual=True), lambda ev: True)
        client = self.session(self.library, cfg(mutual=True, claims=(("role", b"agent"),)))
        c_call = Call(client.negotiate, c_sock)
        self.wait(Call(server.negotiate, s_sock))
        self.wait(c_call)
        self.assertEqual(server.evidence, Evidence())

"""
The gateway's legs against a policy, on fake transports: a leg is attached
only once it matches an identity; what the identity grants (addresses,
services, a peer's prefixes) is enforced per frame; refusals are counted
and logged at most once a minute per source; a reload closes exactly the
legs it no longer admits; re-attestation closes rats-tls legs on time.
"""

import ipaddress
import os
import struct

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from ent.legs.evidence import Evidence
from ent.legs.policy import LegFacts, Refusal, parsePolicy
from ent.observability.stats import ServiceStats
from ent.protocols.admission import Admission, legFacts
from ent.protocols.framing import frame
from ent.protocols.reattest import QuickRetry, Reattestation
from ent.protocols.relay import RelayLeg
from ent.protocols.router import Router
from tests.checks import tempDir
from tests.test_router import RouterTestCase

MRENCLAVE = "9f" * 32

POLICY = f"""
[[identity]]
name = "client"
role = "agent"
from = ["10.1.0.1/32"]
addresses = ["192.168.0.1/32"]
services = ["192.168.0.254:80/tcp", "192.168.0.254:53/udp"]

[[identity]]
name = "other"
role = "agent"
from = ["10.1.0.3/32"]
addresses = ["192.168.0.3/32"]

[[identity]]
name = "enclave"
role = "agent"
sgx.mrenclave = "{MRENCLAVE}"
addresses = ["192.168.0.7/32"]

[[identity]]
name = "gw2"
role = "peer"
from = ["10.2.0.2/32"]
addresses = ["192.168.0.254/32"]
"""


def ipv4(src, dst, protocol=6, dport=80, fragment=0):
    """
    An IPv4 packet with a TCP or UDP header's ports (or another protocol).
    """
    header = bytearray(20)
    header[0] = 0x45
    header[9] = protocol
    struct.pack_into(">H", header, 2, 28)
    struct.pack_into(">H", header, 6, fragment)
    header[12:16] = ipaddress.ip_address(src).packed
    header[16:20] = ipaddress.ip_address(dst).packed
    return bytes(header) + struct.pack(">HHI", 40000, dport, 0)


class FakeRatsTransport(StringTransport):
    """
    A transport that says what rats-tls evidence its peer showed.
    """

    def __init__(self, evidence, peer):
        StringTransport.__init__(self, peerAddress=peer)
        self.evidence = evidence

    def getPeerEvidence(self):
        return self.evidence


class PolicyRouterTestCase(RouterTestCase):
    """
    The router's test case (send, take, lose) with a policy's admission.
    """

    policyText = POLICY

    def setUp(self):
        self.clock = Clock()
        self.stats = ServiceStats("entg", self.clock)
        directory = tempDir(self, "ent-policy-")
        self.path = os.path.join(directory, "policy.toml")
        self.write(self.policyText)
        from ent.legs.policy import loadPolicy

        self.admission = Admission(loadPolicy(self.path), self.clock, self.stats.legRefused)
        self.reattest = Reattestation(self.clock, 0, self.stats.reattested)
        self.router = Router(self.stats, self.clock, admission=self.admission, reattest=self.reattest)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def write(self, text):
        with open(self.path, "w") as f:
            f.write(text)

    def connect(self, side, host, transport=None, connecting=False, retry=None):
        leg = RelayLeg(self.router, side, connecting=connecting, retry=retry)
        leg.makeConnection(transport or StringTransport(peerAddress=IPv4Address("TCP", host, 40000)))
        return leg

    def refusals(self, text):
        return [
            e for e in self.logged if "refused by the policy" in (e.get("log_format") or "") and text in e["detail"]
        ]


class AdmissionTests(PolicyRouterTestCase):
    def test_matchingLegIsAttachedWithItsAddresses(self):
        agent = self.connect("agent", "10.1.0.1")
        self.assertTrue(self.router.attached(agent))
        self.assertEqual(agent.identity.name, "client")
        self.assertEqual(agent.prefixes, (ipaddress.ip_network("192.168.0.1/32"),))
        [row] = [r for r in self.router.report() if r["side"] == "agent"]
        self.assertEqual((row["identity"], row["kind"], row["evidence"]), ("client", "tcp", "-"))

    def test_unmatchedLegIsRefusedBeforeItIsAttached(self):
        """
        A plain leg from a source no identity lists is closed, never
        attached, counted by reason, and logged with the key that differed.
        """
        squatter = self.connect("agent", "10.1.0.9")
        self.assertFalse(self.router.attached(squatter))
        self.assertTrue(squatter.refused)
        self.assertTrue(squatter.transport.disconnecting)
        self.assertEqual(self.stats.refusals[("agent", "policy")], 1)
        [line] = self.refusals("from is 10.1.0.9")
        self.assertIn("policy client wants 10.1.0.1/32", line["detail"])
        # Nothing it sends goes anywhere, and it owns nothing.
        peer = self.connect("peer", "10.2.0.2")
        self.send(squatter, ipv4("192.168.0.1", "192.168.0.254"))
        self.assertEqual(self.take(peer), b"")
        self.assertEqual(self.router.owners, {})

    def test_refusalsAreLoggedOncePerMinutePerSource(self):
        for _ in range(5):
            self.connect("agent", "10.1.0.9")
        self.connect("agent", "10.1.0.8")
        self.assertEqual(self.stats.refusals[("agent", "policy")], 6)
        self.assertEqual(len(self.refusals("from is 10.1.0.9")), 1)
        self.assertEqual(len(self.refusals("from is 10.1.0.8")), 1)
        self.clock.advance(61)
        self.connect("agent", "10.1.0.9")
        self.assertEqual(len(self.refusals("from is 10.1.0.9")), 2)

    def test_squatterCannotTakeAnAddressAfterTheOwnerLeft(self):
        """
        The owner's leg is cut; a leg from elsewhere that sends from its
        address is refused; the owner reconnects and has it again.
        """
        owner = self.connect("agent", "10.1.0.1")
        peer = self.connect("peer", "10.2.0.2")
        owner.connectionLost(Failure(ConnectionDone()))
        squatter = self.connect("agent", "10.1.0.9")
        self.send(squatter, ipv4("192.168.0.1", "192.168.0.254"))
        self.assertEqual(self.take(peer), b"")
        back = self.connect("agent", "10.1.0.1")
        self.send(back, ipv4("192.168.0.1", "192.168.0.254"))
        self.assertEqual(self.take(peer), frame(ipv4("192.168.0.1", "192.168.0.254")))
        self.send(peer, ipv4("192.168.0.254", "192.168.0.1"))
        self.assertEqual(self.take(back), frame(ipv4("192.168.0.254", "192.168.0.1")))

    def test_sameIdentityReplacesItsOlderLeg(self):
        """
        A second leg of the same identity is the agent's new connection
        (its old one died without a close): it replaces the old leg.
        """
        old = self.connect("agent", "10.1.0.1")
        new = self.connect("agent", "10.1.0.1")
        self.assertFalse(self.router.attached(old))
        self.assertTrue(old.transport.disconnecting)
        self.assertTrue(self.router.attached(new))

    def test_agentSendsOnlyFromItsAddresses(self):
        agent = self.connect("agent", "10.1.0.3")
        peer = self.connect("peer", "10.2.0.2")
        self.send(agent, ipv4("192.168.0.9", "192.168.0.254"))
        self.assertEqual(self.take(peer), b"")
        self.assertEqual(self.stats.drops.total[("agent", "source_not_owned")], 1)

    def test_servicesLimitWhatAnAgentReaches(self):
        """
        Only the listed TCP and UDP services pass; another port, another
        protocol or a fragment is dropped with its own reason.
        """
        agent = self.connect("agent", "10.1.0.1")
        peer = self.connect("peer", "10.2.0.2")
        allowed = [ipv4("192.168.0.1", "192.168.0.254", 6, 80), ipv4("192.168.0.1", "192.168.0.254", 17, 53)]
        refused = [
            ipv4("192.168.0.1", "192.168.0.254", 6, 7),
            ipv4("192.168.0.1", "192.168.0.254", 17, 80),
            ipv4("192.168.0.1", "192.168.0.254", 1, 80),
            ipv4("192.168.0.1", "192.168.0.254", 6, 80, fragment=5),
        ]
        self.send(agent, refused[0], allowed[0], refused[1], allowed[1], refused[2], refused[3])
        self.assertEqual(self.take(peer), b"".join(frame(p) for p in allowed))
        self.assertEqual(self.stats.drops.total[("agent", "service_not_allowed")], 4)

    def test_noServicesMeansEveryDestination(self):
        agent = self.connect("agent", "10.1.0.3")
        peer = self.connect("peer", "10.2.0.2")
        self.send(agent, ipv4("192.168.0.3", "192.168.0.254", 6, 7))
        self.assertEqual(self.take(peer), frame(ipv4("192.168.0.3", "192.168.0.254", 6, 7)))

    def test_peerFramesFromOutsideItsAddressesAreDropped(self):
        agent = self.connect("agent", "10.1.0.3")
        peer = self.connect("peer", "10.2.0.2")
        self.send(peer, ipv4("192.168.0.99", "192.168.0.3"), ipv4("192.168.0.254", "192.168.0.3"))
        self.assertEqual(self.take(agent), frame(ipv4("192.168.0.254", "192.168.0.3")))
        self.assertEqual(self.stats.drops.total[("peer", "source_not_allowed")], 1)

    def test_agentOnThePeerPortIsRefused(self):
        leg = self.connect("peer", "10.1.0.1")
        self.assertFalse(self.router.attached(leg))
        self.assertEqual(self.stats.refusals[("peer", "policy")], 1)

    def test_evidenceDecides(self):
        # Only the enclave's identity: the refusal names its key.
        self.write(POLICY.split("[[identity]]")[0] + "[[identity]]" + POLICY.split("[[identity]]")[3])
        self.admission.reload()
        good = Evidence("sgx_ecdsa", bytes.fromhex(MRENCLAVE), b"\1" * 32, 1, 2, False)
        bad = Evidence("sgx_ecdsa", b"\x5c" * 32, b"\1" * 32, 1, 2, False)
        leg = self.connect("agent", None, FakeRatsTransport(bad, IPv4Address("TCP", "10.1.0.5", 1)))
        self.assertFalse(self.router.attached(leg))
        [line] = self.refusals("sgx.mrenclave is 5c5c5c5c")
        self.assertIn("policy enclave wants 9f9f9f9f", line["detail"])
        leg = self.connect("agent", None, FakeRatsTransport(good, IPv4Address("TCP", "10.1.0.5", 1)))
        self.assertTrue(self.router.attached(leg))
        [row] = [r for r in self.router.report() if r["side"] == "agent"]
        self.assertEqual(row["evidence"], "sgx_ecdsa mrenclave 9f9f9f9f… svn 2")
        self.assertEqual(row["kind"], "rats-tls")


class ReloadTests(PolicyRouterTestCase):
    def test_reloadClosesExactlyTheLegsNoLongerAdmitted(self):
        kept = self.connect("agent", "10.1.0.1")
        dropped = self.connect("agent", "10.1.0.3")
        peer = self.connect("peer", "10.2.0.2")
        self.write(POLICY.replace('name = "other"', 'name = "other"\ntls-names = ["x"]'))
        self.assertTrue(self.admission.reload())
        self.assertEqual(self.router.recheck(), 1)
        self.assertFalse(self.router.attached(dropped))
        self.assertTrue(dropped.transport.disconnecting)
        self.assertTrue(self.router.attached(kept))
        self.assertFalse(kept.transport.disconnecting)
        self.assertTrue(self.router.attached(peer))
        self.assertEqual(self.stats.refusals[("agent", "policy_reload")], 1)

    def test_changedGrantsCloseTheLeg(self):
        """
        An identity whose grants changed is not the one the leg was
        admitted as: it reconnects to get the new ones.
        """
        leg = self.connect("agent", "10.1.0.3")
        self.write(POLICY.replace('"192.168.0.3/32"', '"192.168.0.4/32"'))
        self.admission.reload()
        self.assertEqual(self.router.recheck(), 1)
        self.assertTrue(leg.transport.disconnecting)

    def test_movedIdentityStays(self):
        """
        Only what an identity says counts, not where it is in the file.
        """
        leg = self.connect("agent", "10.1.0.3")
        self.write("\n\n\n" + POLICY)
        self.admission.reload()
        self.assertEqual(self.router.recheck(), 0)
        self.assertFalse(leg.transport.disconnecting)

    def test_brokenFileChangesNothing(self):
        leg = self.connect("agent", "10.1.0.3")
        before = self.admission.policy
        for broken in (POLICY + "\n[[identity]\n", POLICY.replace("addresses", "adresses", 1)):
            self.write(broken)
            self.assertFalse(self.admission.reload())
            self.assertIs(self.admission.policy, before)
            self.assertEqual(self.router.recheck(), 0)
        self.assertFalse(leg.transport.disconnecting)
        errors = [e for e in self.logged if "policy not reloaded" in (e.get("log_format") or "")]
        self.assertEqual(len(errors), 2)
        self.assertIn(self.path, errors[1]["error"])


class ReattestTests(PolicyRouterTestCase):
    def evidence(self):
        return Evidence("sgx_ecdsa", bytes.fromhex(MRENCLAVE), b"\1" * 32, 1, 2, False)

    def test_connectingSideClosesBetween80And95Percent(self):
        self.reattest.seconds = 100
        retry = QuickRetry(lambda attempt: 10.0)
        leg = self.connect(
            "agent",
            None,
            FakeRatsTransport(self.evidence(), IPv4Address("TCP", "10.1.0.5", 1)),
            connecting=True,
            retry=retry,
        )
        self.clock.advance(79.9)
        self.assertFalse(leg.transport.disconnecting)
        self.clock.advance(15.2)
        self.assertTrue(leg.transport.disconnecting)
        self.assertEqual(self.stats.reattestations["peer" if leg.side == "peer" else "agent"], 1)
        self.assertEqual(retry(3), 0.0, "reconnects at once after a planned close")
        self.assertEqual(retry(3), 10.0, "and backs off as usual after that")

    def test_acceptingSideEnforcesTheDeadline(self):
        self.reattest.seconds = 100
        leg = self.connect("agent", None, FakeRatsTransport(self.evidence(), IPv4Address("TCP", "10.1.0.5", 1)))
        self.clock.advance(119.9)
        self.assertFalse(leg.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(leg.transport.disconnecting)

    def test_plainLegsAreNotReattested(self):
        self.reattest.seconds = 5
        leg = self.connect("agent", "10.1.0.1")
        self.clock.advance(1000)
        self.assertFalse(leg.transport.disconnecting)

    def test_legDownCancelsTheTimer(self):
        self.reattest.seconds = 100
        leg = self.connect("agent", None, FakeRatsTransport(self.evidence(), IPv4Address("TCP", "10.1.0.5", 1)))
        leg.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_spreadOut(self):
        """
        Legs that came up together do not all re-handshake at once.
        """
        self.reattest.seconds = 100
        legs = [
            self.connect(
                "peer", None, FakeRatsTransport(self.evidence(), IPv4Address("TCP", "10.2.0.2", 1)), connecting=True
            )
            for _ in range(20)
        ]
        times = sorted(leg.reattestation.getTime() for leg in legs if leg.reattestation is not None)
        self.assertGreater(times[-1] - times[0], 3.0)


class LegFactsTests(unittest.TestCase):
    def test_plain(self):
        facts = legFacts(StringTransport(peerAddress=IPv4Address("TCP", "10.1.0.1", 5)), "agent")
        self.assertEqual(facts, LegFacts("agent", ipaddress.ip_address("10.1.0.1"), (), None, "tcp"))

    def test_ratsTls(self):
        evidence = Evidence("none")
        facts = legFacts(FakeRatsTransport(evidence, IPv4Address("TCP", "10.1.0.1", 5)), "gateway")
        self.assertEqual((facts.kind, facts.evidence), ("rats-tls", evidence))

    def test_withoutPolicyEveryoneIsAdmitted(self):
        admission = Admission(None, Clock(), lambda *a: self.fail("counted"))
        self.assertIsNone(admission.admit(LegFacts("agent", None), "agent", "x"))

    def test_emptyPolicyRefusesEveryone(self):
        refused = []
        admission = Admission(parsePolicy(""), Clock(), lambda *a: refused.append(a))
        self.assertIsInstance(admission.admit(LegFacts("agent", None), "agent", "x"), Refusal)
        self.assertEqual(refused, [("agent", "policy")])

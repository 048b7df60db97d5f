"""
C{--policy} on rats-tls legs with the simulated TEE of tests/ratstls_sim
(the ent_sim attester and verifier), against each real librats_tls: every
party attests, and each admits the other by its measurements.

    client ── gw1 ── gw2 ── server     every leg rats-tls, ent_sim both ways
    c2..c5 ───┘                        (agents with the wrong evidence, one
                                        host each: refusals are logged once
                                        a minute per source)

Real-library only: the mock librats_tls has no ent_sim plugins.  The
ent_sim attester takes its quote's values from its process's environment
(ENT_SIM_MRENCLAVE, ..._MRSIGNER, ..._ISVPRODID, ..._ISVSVN, ..._DEBUG), so
each twistd is started with its own.
"""

import os
import re
import sys
import time

from twisted.trial import unittest

from tests.checks import METRICS, legsIn, sha256s, tempDir, twistdWithEnv
from tests.ratstlsmock import REAL_ONLY, library_path_under_test
from tests.test_policy_legs import AGENT_PORT, PEER_PORT, PolicyParties, writeFile

CLIENT_ENCLAVE = "9f01aa33" + "11" * 28
OTHER_ENCLAVE = "5c3a0b12" + "22" * 28
SERVER_ENCLAVE = "7e57e7e5" + "44" * 28
GATEWAY_ENCLAVE = "6a7e6a7e" + "55" * 28
ROGUE_ENCLAVE = "bad0bad0" + "66" * 28
SIGNER = "abcdef01" + "33" * 28


def sim(mrenclave, svn=3, debug=0):
    return {
        "ENT_SIM_MRENCLAVE": mrenclave,
        "ENT_SIM_MRSIGNER": SIGNER,
        "ENT_SIM_ISVPRODID": "1",
        "ENT_SIM_ISVSVN": str(svn),
        "ENT_SIM_DEBUG": str(debug),
    }


CLIENT = sim(CLIENT_ENCLAVE)
SERVER = sim(SERVER_ENCLAVE)
GATEWAY = sim(GATEWAY_ENCLAVE)


def gw1Policy(claim):
    return f"""\
[[identity]]
name = "billing-client"
role = "agent"
sgx.mrenclave = "{CLIENT_ENCLAVE}"
sgx.mrsigner = "{SIGNER}"
sgx.min-isvsvn = 2
{'claims.app = "billing"' if claim else ""}
addresses = ["192.168.0.1/32"]

[[identity]]
name = "gw2"
role = "peer"
sgx.mrenclave = "{GATEWAY_ENCLAVE}"
sgx.mrsigner = "{SIGNER}"
"""


def gw2Policy(peerKey="mrenclave", peerValue=GATEWAY_ENCLAVE):
    return f"""\
[[identity]]
name = "gw1"
role = "peer"
sgx.{peerKey} = "{peerValue}"

[[identity]]
name = "server"
role = "agent"
sgx.mrenclave = "{SERVER_ENCLAVE}"
sgx.mrsigner = "{SIGNER}"
addresses = ["192.168.0.254/32"]
"""


AGENT_POLICY = f"""\
[[identity]]
name = "gateway"
role = "gateway"
sgx.mrenclave = "{GATEWAY_ENCLAVE}"
sgx.mrsigner = "{SIGNER}"
"""

# Sends ARGV[2] bytes to ARGV[1]:7 in 1 MB pieces spread over ARGV[3]
# seconds while reading the echo; at the end, what came back and its sha256.
PACED = """
import hashlib, os, socket, sys, threading, time
size, seconds = int(sys.argv[2]), float(sys.argv[3])
piece = os.urandom(1 << 20)
s = socket.create_connection((sys.argv[1], 7), timeout=60)
sent = hashlib.sha256()
def send():
    started = time.monotonic()
    done = 0
    while done < size:
        chunk = piece[: size - done]
        s.sendall(chunk)
        sent.update(chunk)
        done += len(chunk)
        wait = started + seconds * done / size - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    s.shutdown(socket.SHUT_WR)
sender = threading.Thread(target=send)
sender.start()
back = hashlib.sha256()
received = 0
while True:
    data = s.recv(1 << 16)
    if not data:
        break
    received += len(data)
    back.update(data)
sender.join()
print(f"received {received} bytes", flush=True)
print("sha256 sent", sent.hexdigest(), flush=True)
print("sha256 back", back.hexdigest(), flush=True)
"""


def v2025():
    layout = os.environ.get("ENT_TEST_RATS_TLS_LAYOUT")
    if layout is not None:
        return layout == "v2025"
    return "ed65" not in (library_path_under_test() or "")


class AttestedParties(PolicyParties):
    """
    L{PolicyParties} whose services run on rats-tls with ent_sim, each with
    its own simulated enclave.
    """

    def ratsArgs(self):
        return [
            "--rats-tls-lib",
            self.library,
            "--attester",
            "ent_sim",
            "--verifier",
            "ent_sim",
            "--rats-tls-log-level",
            "error",
        ]

    def entg(self, host, env, *args):
        rats = ["--enta-rats-tls", "--entg-rats-tls", *self.ratsArgs()]
        return twistdWithEnv(self.topology, host, env, "entg", "--enta-listen", str(AGENT_PORT), *rats, *args, *METRICS)

    def attestedAgent(self, host, env, tunAddress, gateway, *args, name=None):
        return twistdWithEnv(
            self.topology,
            host,
            env,
            "enta",
            "--tun-addr",
            f"{tunAddress}/24",
            "--entg-connect",
            f"{gateway}:{AGENT_PORT}",
            "--entg-rats-tls",
            *self.ratsArgs(),
            *args,
            name=name or f"{host}-enta",
        )


class AttestedPolicyTests(unittest.TestCase):
    skip = REAL_ONLY

    def start(self, strangers=0, gw1Env=GATEWAY, gw2Peer=("mrenclave", GATEWAY_ENCLAVE), reattest=(), wait=True):
        """
        The four hosts of Tunnel (and C{strangers} more client hosts, c2 and
        on, each on its own link to gw1), every service on rats-tls with
        its own simulated enclave and policy.
        """
        library = library_path_under_test()
        self.claim = v2025()
        links = (
            ("client", "10.1.0.1", "gw1", "10.1.0.2"),
            *((f"c{i}", f"10.1.{i}.1", "gw1", f"10.1.{i}.2") for i in range(2, strangers + 2)),
            ("gw1", "10.2.0.1", "gw2", "10.2.0.2"),
            ("gw2", "10.3.0.1", "server", "10.3.0.2"),
        )
        hosts = ("client", *(f"c{i}" for i in range(2, strangers + 2)), "gw1", "gw2", "server")
        self.p = p = AttestedParties(self, hosts, links)
        p.library = library
        d = tempDir(self, "ent-policy-attested-")
        self.policies = {
            "gw1": writeFile(os.path.join(d, "gw1.toml"), gw1Policy(self.claim)),
            "gw2": writeFile(os.path.join(d, "gw2.toml"), gw2Policy(*gw2Peer)),
            "agent": writeFile(os.path.join(d, "agent.toml"), AGENT_POLICY),
        }
        self.reattest = list(reattest)
        p.echoServer("server")
        p.entg("gw2", GATEWAY, "--entg-listen", str(PEER_PORT), "--policy", self.policies["gw2"], *reattest)
        p.entg("gw1", gw1Env, "--entg-connect", f"10.2.0.2:{PEER_PORT}", "--policy", self.policies["gw1"], *reattest)
        p.attestedAgent(
            "server",
            SERVER,
            "192.168.0.254",
            "10.3.0.1",
            "--replay",
            "7",
            "--peer-addr",
            "192.168.0.1",
            "--policy",
            self.policies["agent"],
            *reattest,
        )
        self.client = self.clientAgent("client", CLIENT, "192.168.0.1", "10.1.0.2")
        if wait:
            p.waitPing("client", "192.168.0.254", timeout=45)
        return p

    def clientAgent(self, host, env, tunAddress, gateway, claim=None, name=None):
        claim = self.claim if claim is None else claim
        return self.p.attestedAgent(
            host,
            env,
            tunAddress,
            gateway,
            "--dport",
            "7",
            "--peer-addr",
            "192.168.0.254",
            "--policy",
            self.policies["agent"],
            *(["--claim", "app=billing"] if claim else []),
            *self.reattest,
            *METRICS,
            name=name,
        )

    def test_listedAgentJoins(self):
        """
        The agent with the listed measurements (and, on the 2025 library,
        claim) joins as billing-client, owns 192.168.0.1 and reaches its
        service: echo and 20 MB with the same sha256.  gw1's /legs shows
        the identity and the evidence; the agent's log, the gateway it
        admitted and that gateway's evidence.
        """
        p = self.start()
        t = p.topology
        echo = p.echo("client", 1000)
        self.assertEqual(echo.returncode, 0, echo.stdout + p.logs())
        big = p.echo("client", 20_000_000, timeout=120)
        self.assertEqual(big.returncode, 0, big.stdout + big.stderr + p.logs())
        p.assertEchoed(big.stdout, 20_000_000)
        self.assertEqual(p.sources("server"), {"192.168.0.1"})
        agents = [leg for leg in legsIn(t, "gw1") if leg["side"] == "agent"]
        self.assertEqual(len(agents), 1, agents)
        leg = agents[0]
        self.assertEqual(leg["identity"], "billing-client")
        self.assertEqual(leg["kind"], "rats-tls")
        self.assertEqual(leg["addresses"], ["192.168.0.1/32"])
        summary = f"sgx_ecdsa mrenclave {CLIENT_ENCLAVE[:8]}… svn 3"
        self.assertEqual(leg["evidence"], summary + (" claims app" if self.claim else ""))
        peers = [leg for leg in legsIn(t, "gw1") if leg["side"] == "peer"]
        self.assertEqual(
            [(leg["identity"], leg["evidence"]) for leg in peers],
            [("gw2", f"sgx_ecdsa mrenclave {GATEWAY_ENCLAVE[:8]}… svn 3")],
        )
        self.assertIn(
            f"connected to gateway 10.1.0.2:6980 (gateway, sgx_ecdsa mrenclave {GATEWAY_ENCLAVE[:8]}… svn 3)",
            p.log("client-enta"),
        )
        self.assertEqual(p.metric("gw1", "ent_legs_refused_total", leg="agent", reason="policy"), 0)

    def test_wrongEvidenceRefused(self):
        """
        Agents with a wrong MRENCLAVE, a debug enclave, an SVN below the
        minimum and (2025 library) without the claim are each refused by
        gw1, counted, logged with the key that differed, and get no echo;
        the listed agent's echo goes on working.
        """
        cases = [
            (
                sim(OTHER_ENCLAVE),
                None,
                f"sgx.mrenclave is {OTHER_ENCLAVE[:8]}…, policy billing-client wants {CLIENT_ENCLAVE[:8]}…",
            ),
            (
                sim(CLIENT_ENCLAVE, debug=1),
                None,
                "sgx.debug is true (a debug enclave), policy billing-client does not allow it",
            ),
            (
                sim(CLIENT_ENCLAVE, svn=1),
                None,
                "sgx.min-isvsvn: the enclave's isvsvn is 1, policy billing-client wants at least 2",
            ),
        ]
        if v2025():
            cases.append((CLIENT, False, "claims.app is missing, policy billing-client wants 'billing'"))
        p = self.start(strangers=len(cases))
        for i, (env, claim, _) in enumerate(cases, 2):
            self.clientAgent(f"c{i}", env, f"192.168.0.{i + 10}", f"10.1.{i}.2", claim=claim)
        for i, (_, _, detail) in enumerate(cases, 2):
            p.waitLog("gw1-entg", rf"agent 10\.1\.{i}\.1:\d+ refused by the policy: " + re.escape(detail), timeout=30)
        refused = p.metric("gw1", "ent_legs_refused_total", leg="agent", reason="policy")
        self.assertGreaterEqual(refused, len(cases))
        for i in range(2, len(cases) + 2):
            p.assertNoEcho(f"c{i}")
            # Its leg may be up for a moment between a handshake and the
            # refusal, but the gateway never sent it anything.
            self.assertEqual(p.metric(f"c{i}", "ent_leg_packets_total", leg="gateway", direction="received"), 0)
        self.assertEqual(p.sources("server"), set())
        self.assertEqual(
            [leg["peer"].split(":")[0] for leg in legsIn(p.topology, "gw1") if leg["side"] == "agent"], ["10.1.0.1"]
        )
        p.assertEchoes("client")
        self.assertEqual(p.sources("server"), {"192.168.0.1"})

    def test_agentRefusesGatewayOfAnotherMeasurement(self):
        """
        gw1 runs another MRENCLAVE (same signer; gw2 admits it by signer):
        the client agent, whose policy names the gateway's measurement,
        refuses it, counts and logs it, and carries nothing.
        """
        p = self.start(gw1Env=sim(ROGUE_ENCLAVE), gw2Peer=("mrsigner", SIGNER), wait=False)
        p.waitLog(
            "client-enta",
            r"gateway 10\.1\.0\.2:6980 refused by the policy: "
            + re.escape(f"sgx.mrenclave is {ROGUE_ENCLAVE[:8]}…, policy gateway wants {GATEWAY_ENCLAVE[:8]}…"),
            timeout=30,
        )
        # gw1 itself is in the tunnel: its peer leg to gw2 is up.
        p.waitLog("gw2-entg", rf"peer connected from 10\.2\.0\.1:\d+ \(gw1, sgx_ecdsa mrenclave {ROGUE_ENCLAVE[:8]}…")
        self.assertGreaterEqual(p.metric("client", "ent_legs_refused_total", leg="gateway", reason="policy"), 1)
        self.assertEqual(p.metric("client", "ent_leg_up", leg="gateway"), 0)
        p.assertNoEcho("client")
        self.assertNotIn("connected to gateway", p.log("client-enta"))
        self.assertEqual(p.sources("server"), set())
        # The gateway sees its agent leave right after the handshake, as
        # any agent that goes away: no error of its own.
        self.assertNotIn("Traceback", p.log("gw1-entg"))

    def test_reattestationUnderLoad(self):
        """
        With --reattest 5 everywhere, 200 MB echoed over about 18 s arrive
        with the same sha256 across at least three re-handshakes of the
        client's leg.  Paced: unpaced, 200 MB take about 9 s here, which
        spans only two.
        """
        p = self.start(reattest=["--reattest", "5"])
        before = p.metric("client", "ent_reattestations_total", leg="gateway")
        started = time.monotonic()
        result = p.topology.exec("client", sys.executable, "-c", PACED, "10.3.0.2", "200000000", "18", timeout=180)
        took = time.monotonic() - started
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr + p.logs())
        self.assertIn("received 200000000 bytes", result.stdout, p.logs())
        sent, back = sha256s(result.stdout)
        self.assertEqual(sent, back)
        rehandshakes = p.metric("client", "ent_reattestations_total", leg="gateway") - before
        print(f"\nreattest: 200 MB echoed in {took:.1f} s across {rehandshakes:.0f} re-handshakes of the client's leg")
        self.assertGreaterEqual(rehandshakes, 3, p.logs())
        self.assertGreaterEqual(took, 16.0)
        self.assertGreaterEqual(p.metric("gw1", "ent_reattestations_total", leg="peer"), 3)
        self.assertGreaterEqual(p.log("client-enta").count("connected to gateway"), 4)
        # Every one came back admitted: nothing was refused on the way.
        for host, leg in (("gw1", "agent"), ("gw1", "peer"), ("gw2", "peer"), ("gw2", "agent")):
            self.assertEqual(p.metric(host, "ent_legs_refused_total", leg=leg, reason="policy"), 0, host + leg)
        self.assertEqual(p.metric("client", "ent_legs_refused_total", leg="gateway", reason="policy"), 0)

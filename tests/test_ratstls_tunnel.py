"""
The four-hop tunnel with every leg on rats-tls, as real twistd processes in
namespaces, against the library under test (the mock: a real TLS session
with null evidence; or the real build named by $ENT_TEST_RATS_TLS_LIB).
"""

import os
import shutil

from twisted.trial import unittest

from ent.testing.topology import Topology, Tunnel, twistdCommand
from tests.checks import assertEchoAndTransfer, assertStopsCleanly
from tests.netns import requireRoot
from tests.ratstlsmock import MOCK_ONLY, build_mock, library_path_under_test


def ratsArgs(library, logLevel="off"):
    return [
        "--rats-tls-lib",
        library,
        "--attester",
        "nullattester",
        "--verifier",
        "nullverifier",
        "--rats-tls-log-level",
        logLevel,
    ]


class RatsTlsTunnelTests(unittest.TestCase):
    def setUp(self):
        requireRoot(self)
        self.library = library_path_under_test()

    def hostArgs(self, logLevel="off"):
        common = ratsArgs(self.library, logLevel)
        return {
            "client": ["--entg-rats-tls", *common],
            "gw1": ["--enta-rats-tls", "--entg-rats-tls", *common],
            "gw2": ["--enta-rats-tls", "--entg-rats-tls", *common],
            "server": ["--entg-rats-tls", *common],
        }

    def test_everyLegOnRatsTls(self):
        """
        Echo and 20 MB each way over three rats-tls legs.  With the library's
        ERROR logging on, the real library logs every receive that finds
        half a TLS record ("SSL_read() failed"): ENT receives only whole
        records, so a handful of such lines at most (about 1000 in this
        transfer without that), not one per record.
        """
        with Tunnel(hostArgs=self.hostArgs(logLevel="error")) as tunnel:
            assertEchoAndTransfer(self, tunnel)
            # Each leg negotiated rats-tls: plain TCP would not even connect.
            ss = tunnel.topology.exec("gw1", "ss", "-tn").stdout
            self.assertIn("10.1.0.2:6980", ss)
            logs = tunnel.logs(1_000_000)
            self.assertLessEqual(logs.count("SSL_read() failed"), 12, tunnel.logs())

    def test_stopWithLiveSessionsIsQuickAndClean(self):
        with Tunnel(hostArgs=self.hostArgs()) as tunnel:
            self.assertEqual(tunnel.echoClient(100).returncode, 0, tunnel.logs())
            assertStopsCleanly(self, tunnel)
            self.assertNotIn("Traceback", tunnel.logs(400))


class RatsTlsLibraryErrorTests(unittest.TestCase):
    """
    A missing library or plugin directory stops the start with a message
    saying what is missing and how to point ENT at it.

    Mock-only: they break copies of the mock (ENT's checks, not the
    library, are under test).
    """

    skip = MOCK_ONLY

    def setUp(self):
        requireRoot(self)
        self.topology = Topology().__enter__()
        self.addCleanup(self.topology.destroy)

    def runEntg(self, *args):
        return self.topology.exec(
            "gw1", *twistdCommand(), "-n", "--pidfile=", "entg", "--enta-rats-tls", *args, timeout=30
        )

    def test_missingLibrary(self):
        result = self.runEntg("--rats-tls-lib", "/nonexistent/librats_tls.so")
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("/nonexistent/librats_tls.so", output)
        self.assertIn("--rats-tls-lib", output)
        self.assertNotIn("Traceback", output)

    def test_missingPluginDirectory(self):
        copy = os.path.dirname(build_mock(fresh=True))
        shutil.rmtree(os.path.join(copy, "rats-tls", "verifiers"))
        result = self.runEntg("--rats-tls-lib", os.path.join(copy, "librats_tls.so"))
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("verifiers", output)
        self.assertNotIn("FATAL", output, "the library's constructor must not have run")
        self.assertNotIn("Traceback", output)

"""
The chaos run in short (bench/chaos.py): 60 s of random faults on plain
legs and 60 s on TLS legs (rats-tls has its own tunnel tests; the full run,
make chaos, covers it), under the continuous echo traffic. About 4 minutes.
"""

import os
import shutil
import tempfile

from twisted.trial import unittest

from bench import chaos
from tests.netns import requireRoot

SECONDS = 60.0
KINDS = ("plain", "tls")
# Fixed, so that a failure replays the same faults; CHAOS_SEED chooses another.
SEED = int(os.environ.get("CHAOS_SEED") or 1)


class ChaosTests(unittest.TestCase):
    def test_tunnelHoldsUnderRandomFaults(self):
        requireRoot(self)
        # Kept when the run fails: its logs are the report of the bug.
        directory = tempfile.mkdtemp(prefix="ent-chaos-")
        phases = chaos.runChaos(SECONDS, KINDS, SEED, output=os.path.join(directory, "chaos.md"), logdir=directory)
        hits = {}
        for phase in phases:
            context = f"CHAOS_SEED={SEED}, {phase.kind}: {phase.broken}; logs in {directory}\n{getattr(phase, 'leftLogs', '')}"
            self.assertEqual(phase.broken, [], context)
            self.assertEqual(phase.wrong, [], context)
            names = {name for name, _, _ in phase.checks}
            self.assertEqual(len(names), 10, context)
            self.assertTrue(all(ok for _, ok, _ in phase.checks), context)
            self.assertGreater(phase.tcp["completed"], 20, context)
            self.assertGreater(phase.udp["ok"], 20, context)
            for host in chaos.PROCESSES:
                self.assertGreaterEqual(
                    sum(n for (_, target), n in phase.faults.items() if target == host), 1, f"{host}: {context}"
                )
            for (kind, _), n in phase.faults.items():
                hits[kind] = hits.get(kind, 0) + n
        self.assertEqual(sorted(hits), sorted(chaos.FAULTS), f"CHAOS_SEED={SEED}: faults {hits}")
        shutil.rmtree(directory, ignore_errors=True)

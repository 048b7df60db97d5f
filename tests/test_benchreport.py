"""
The benchmark's latency report (bench/report.py): medians across rounds and
the ratio to OpenVPN, from made-up results (the measuring itself runs in
make bench, not here).
"""

from twisted.trial import unittest

from bench.report import latencyReport, latencyTable, medianResults


def result(p50, loaded, ping):
    return {
        "pingpong": {"rate": 1e6 / p50, "p50": p50, "p99": 2 * p50},
        "pingpongLoaded": {"rate": 1e6 / loaded, "p50": loaded, "p99": 3 * loaded},
        "ping": {"median": ping / 1000},
    }


ROUNDS = [
    {"kernel": result(100, 20, 80), "ent": result(400, 300, 900), "openvpn": result(250, 150, 450)},
    {"kernel": result(90, 25, 75), "ent": result(500, 280, 950), "openvpn": result(260, 140, 470)},
    {"kernel": result(80, 30, 70), "ent": result(380, 260, 880), "openvpn": result(240, 130, 440)},
]
INFO = {"date": "2026-11-29 07:00 UTC", "kernel": "6.18", "cpu": "test CPU", "nproc": 2, "python": "3.11.2"}


class LatencyReportTests(unittest.TestCase):
    def test_medianOfEachFigure(self):
        merged = medianResults(ROUNDS)
        self.assertEqual(merged["ent"]["pingpong"]["p50"], 400)
        self.assertEqual(merged["kernel"]["pingpongLoaded"]["p50"], 25)
        self.assertEqual(merged["openvpn"]["ping"]["median"], 0.45)

    def test_addedAndRatioFromTheMedians(self):
        row = next(line for line in latencyTable(medianResults(ROUNDS)) if line.startswith("| ENT default |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        # idle: 400 - 90 = +310 against 250 - 90 = +160; loaded: 280 - 25 against 140 - 25
        self.assertEqual(cells[4:6], ["+310", "1.94×"])
        self.assertEqual(cells[8:10], ["+255", "2.22×"])

    def test_eachRoundsRatioListed(self):
        text = latencyReport(ROUNDS, INFO)
        self.assertIn("- ENT default: 2.00× / 2.15×, 2.41× / 2.22×, 1.88× / 2.30×", text)
        self.assertIn("Round 3:", text)
        self.assertIn("--rounds 3", text)

    def test_missingMeasurementShowsDash(self):
        rounds = [{"kernel": result(100, 20, 80), "ent": {"errors": ["failed"]}, "openvpn": result(250, 150, 450)}]
        row = next(line for line in latencyTable(medianResults(rounds)) if line.startswith("| ENT default |"))
        self.assertIn("—", row)
        self.assertIn("- ENT default: — / —", latencyReport(rounds, INFO))


class HotPathTests(unittest.TestCase):
    def test_forwardsEveryFrame(self):
        """
        bench.hotpath measures the real router: it fails unless every frame
        of each round trip was forwarded.
        """
        from bench import hotpath

        self.assertEqual(hotpath.main(rounds=200), 0)

"""
--map, --expose and --capture-from as the agent's options read them, and
how ENG's --dport and --replay become their special cases.
"""

from twisted.python import usage
from twisted.trial import unittest

from ent.capture.mapping import Exposure, Mapping
from tests.test_options import enta


class MapOptionTests(unittest.TestCase):
    def test_mappingsBesideEngsDport(self):
        o = enta("--dport", "7", "--map", "10.3.0.2:80=192.168.0.254:8080", "--map", "53/udp=192.168.0.254:53")
        self.assertEqual(o["role"], "capture")
        self.assertEqual(
            o["mappings"],
            (
                Mapping("tcp", None, 7, "192.168.0.254", 6978, "--dport 7"),
                Mapping("tcp", "10.3.0.2", 80, "192.168.0.254", 8080, "--map 10.3.0.2:80=192.168.0.254:8080"),
                Mapping("udp", None, 53, "192.168.0.254", 53, "--map 53/udp=192.168.0.254:53"),
            ),
        )
        self.assertEqual(o["exposures"], ())

    def test_mapAloneIsAClient(self):
        o = enta("--map", "5432=192.168.0.254:5432")
        self.assertEqual((o["role"], o["dports"], str(o["tun-interface"])), ("capture", (), "192.168.0.1/24"))

    def test_refusals(self):
        cases = [
            (["--map", "80"], "--map '80' is not [ADDR:]PORT[/udp]=TUNADDR:PORT"),
            (
                ["--map", "80/sctp=192.168.0.254:80"],
                "--map '80/sctp=192.168.0.254:80': protocol 'sctp' is not tcp or udp",
            ),
            (
                ["--map", "1.2.3:80=192.168.0.254:80"],
                "--map '1.2.3:80=192.168.0.254:80': '1.2.3' is not an IPv4 address",
            ),
            (["--map", "80=192.168.0.254:0"], "--map '80=192.168.0.254:0': tunnel port 0 is out of range 1-65535"),
            (
                ["--map", "80=10.0.0.1:80"],
                "--map 80=10.0.0.1:80: 10.0.0.1 is not a far agent's address in the TUN network 192.168.0.0/24",
            ),
            (
                ["--dport", "7", "--map", "7=192.168.0.254:7"],
                "--map 7=192.168.0.254:7 and --dport 7 are for the same tcp port",
            ),
            (
                ["--map", "6980=192.168.0.254:1"],
                "--map 6980=192.168.0.254:1 is the gateway's port (--entg-connect): capturing it would loop",
            ),
            (["--map", "7=192.168.0.254:7", "--expose", "8"], "--map and --expose exclude each other"),
        ]
        for argv, message in cases:
            e = self.assertRaises(usage.UsageError, enta, *argv)
            self.assertIn(message, str(e))

    def test_udpAndTcpOnOnePortAreTwoServices(self):
        o = enta("--map", "53=192.168.0.254:53", "--map", "53/udp=192.168.0.254:53")
        self.assertEqual([m.proto for m in o["mappings"]], ["tcp", "udp"])


class ExposeOptionTests(unittest.TestCase):
    def test_exposuresBesideEngsReplay(self):
        o = enta(
            "--replay",
            "7",
            "--expose",
            "80=8080",
            "--expose",
            "22",
            "--expose",
            "53/udp=5353",
            "--expose",
            "443=10.9.0.5:8443",
        )
        self.assertEqual(o["role"], "replay")
        self.assertEqual(str(o["tun-interface"]), "192.168.0.254/24")
        self.assertEqual(
            [(e.proto, e.tunPort, e.host, e.port) for e in o["exposures"]],
            [
                ("tcp", 6978, None, 7),
                ("tcp", 80, None, 8080),
                ("tcp", 22, None, 22),
                ("udp", 53, None, 5353),
                ("tcp", 443, "10.9.0.5", 8443),
            ],
        )
        self.assertEqual(o["exposures"][0], Exposure("tcp", 6978, None, 7, "--replay 7"))

    def test_refusals(self):
        cases = [
            (["--expose", "80=x"], "--expose '80=x' is not TUNPORT[/udp][=[HOST:]PORT]"),
            (["--expose", "80", "--expose", "80=8080"], "--expose 80=8080 and --expose 80 are for the same tcp port"),
            (["--replay", "7", "--expose", "6978=8"], "--expose 6978=8 and --replay 7 are for the same tcp port"),
            (["--expose", "0"], "--expose '0': tunnel port 0 is out of range 1-65535"),
        ]
        for argv, message in cases:
            e = self.assertRaises(usage.UsageError, enta, *argv)
            self.assertIn(message, str(e))


class CaptureFromOptionTests(unittest.TestCase):
    def test_repeatableAndOnlyForAClient(self):
        o = enta(
            "--map", "7=192.168.0.254:7", "--capture-from", "br0", "--capture-from", "veth1", "--capture-from", "br0"
        )
        self.assertEqual(o["capture-from"], ["br0", "veth1"])
        e = self.assertRaises(usage.UsageError, enta, "--expose", "7", "--capture-from", "br0")
        self.assertIn("--capture-from br0 captures for --map or --dport: give one", str(e))
        e = self.assertRaises(usage.UsageError, enta, "--dport", "7", "--capture-from", "a/b")
        self.assertIn("--capture-from 'a/b' is not an interface name", str(e))

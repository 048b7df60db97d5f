"""
Usage errors (issue 12): every command refuses a bad command line with one
line on stderr that names the flag and the value and points to C{--help},
and exits 2; the values behind those refusals are strict; and a failed
connection attempt is logged with HOST:PORT, not an address's repr.
"""

import os
import socket
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.address import HostnameAddress
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger, formatEvent
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial import unittest

from ent.legs.endpoints import DescribedEndpoint, failureText
from ent.observability.stats import LegStats
from ent.testing.topology import ECHOSVR, twistdCommand
from tests.netns import enterNewNamespace
from tests.test_options import enta, entg
from tests.test_socketrelay import relayOptions as relay

PYTHON_M_ENT = [sys.executable, "-m", "ent"]


def foreground(plugin, *argv):
    """
    C{twistd PLUGIN ARGV} in the foreground and without a pidfile: a command
    line wrongly accepted then runs until the test's timeout kills it,
    instead of leaving a daemon behind.
    """
    return [*twistdCommand(), "-n", "--pidfile=", plugin, *argv]


class OneLineTests(unittest.TestCase):
    """
    Real processes, in a network namespace of their own so that a command
    line wrongly accepted configures nothing on this host.
    """

    def setUp(self):
        enterNewNamespace(self)

    def runCommand(self, argv):
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)

    def assertRefused(self, argv, prog, *fragments):
        """
        C{argv} exits 2 with nothing on stdout and one line on stderr:
        C{PROG: ... (see PROG --help)} with each of C{fragments}.
        """
        result = self.runCommand(argv)
        self.assertEqual((result.returncode, result.stdout), (2, ""), (argv, result.stderr))
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, (argv, result.stderr))
        [line] = lines
        self.assertTrue(line.startswith(f"{prog}: ") and line.endswith(f" (see {prog} --help)"), line)
        for fragment in fragments:
            self.assertIn(fragment, line)

    def test_unknownFlagAndMissingValue(self):
        for plugin in ("enta", "entg", "ent-relay"):
            self.assertRefused(
                [*twistdCommand(), plugin, "--bogus"], f"twistd {plugin}", "option --bogus not recognized"
            )
        self.assertRefused([*twistdCommand(), "enta", "--dport"], "twistd enta", "--dport requires argument")
        self.assertRefused([*twistdCommand(), "enta", "extra"], "twistd enta", "unexpected argument 'extra'")

    def test_agentValues(self):
        for argv, fragments in [
            (
                ["--dport", "80, 22"],
                ["--dport '80, 22' is not PORT[,PORT...]: digits and commas, no spaces or empty items"],
            ),
            (
                ["--dport", "80,,81"],
                ["--dport '80,,81' is not PORT[,PORT...]: digits and commas, no spaces or empty items"],
            ),
            (["--dport", "80", "--peer-addr", "192.168.0.0"], ["--peer-addr 192.168.0.0", "network address"]),
            (["--dport", "80", "--peer-addr", "192.168.0.255"], ["--peer-addr 192.168.0.255", "broadcast address"]),
            (
                ["--dport", "80", "--tun-addr", "10.0.0.0/24", "--peer-addr", "10.0.0.2"],
                ["--tun-addr '10.0.0.0/24'", "network address"],
            ),
            (
                ["--dport", "80", "--tun-addr", "10.0.0.255/24", "--peer-addr", "10.0.0.2"],
                ["--tun-addr '10.0.0.255/24'", "broadcast address"],
            ),
            (["--dport", "80", "--mtu", " 1500"], ["--mtu ' 1500' is not a number"]),
            (["--dport", "80", "--tun-name", "tun%d"], ["--tun-name 'tun%d'"]),
            (["--dport", "80", "--entg-connect", "tcp:nohost"], ["--entg-connect 'tcp:nohost'"]),
            (
                [
                    "--dport",
                    "80",
                    "--entg-tls",
                    "--tls-cert",
                    "/nonexistent/c.pem",
                    "--tls-key",
                    "/nonexistent/c.key",
                    "--tls-ca",
                    "/nonexistent/ca.pem",
                ],
                ["--tls-cert '/nonexistent/c.pem': No such file or directory"],
            ),
            (
                ["--dport", "80", "--entg-rats-tls", "--rats-tls-lib", "/nonexistent/librats_tls.so"],
                ["--rats-tls-lib '/nonexistent/librats_tls.so'"],
            ),
            (["--dport", "80", "--entg-rats-tls", "--attester", "null attester"], ["--attester 'null attester'"]),
        ]:
            self.assertRefused(foreground("enta", *argv), "twistd enta", *fragments)

    def test_gatewayAndRelayValues(self):
        self.assertRefused(foreground("entg", "--enta-listen", "tcp:x"), "twistd entg", "--enta-listen 'tcp:x'")
        self.assertRefused(foreground("entg", "--enta-listen", "+6980"), "twistd entg", "--enta-listen '+6980'")
        self.assertRefused(
            foreground(
                "ent-relay",
                "--max-concurrent-connections",
                "1_0",
                "--listen",
                "tcp:7000",
                "--connect",
                "tcp:127.0.0.1:7001",
            ),
            "twistd ent-relay",
            "--max-concurrent-connections '1_0' is not a number",
        )
        self.assertRefused(
            foreground("ent-relay", "--listen", "tcp:7000", "--connect", "tcp:x"),
            "twistd ent-relay",
            "--connect 'tcp:x'",
        )

    def test_argparseCommands(self):
        self.assertRefused([*PYTHON_M_ENT, "bogus"], "python -m ent", "unknown command 'bogus'")
        self.assertRefused([*PYTHON_M_ENT], "python -m ent", "no command")
        self.assertRefused(
            [*PYTHON_M_ENT, "status", "--metrics", "127.0.0.1:1", "--bogus"], "python -m ent status", "--bogus"
        )
        # The unknown flag is named, not the missing required one.
        self.assertRefused(
            [*PYTHON_M_ENT, "status", "--bogus"], "python -m ent status", "unrecognized arguments: --bogus"
        )
        self.assertRefused([*PYTHON_M_ENT, "status"], "python -m ent status", "required: --metrics")
        self.assertRefused(
            [*PYTHON_M_ENT, "status", "--metrics", "127.0.0.1:1", "--timeout", "-1"],
            "python -m ent status",
            "--timeout",
            "'-1'",
        )
        self.assertRefused([*PYTHON_M_ENT, "certs"], "python -m ent certs", "directory")
        self.assertRefused([*PYTHON_M_ENT, "demo", "--bytes", "x"], "python -m ent demo", "--bytes", "'x'")
        echosvr = [sys.executable, ECHOSVR]
        self.assertRefused([*echosvr, "client", "-p", "0"], "echosvr.py", "-p/--port", "value 0 is out of range")
        self.assertRefused([*echosvr, "client", "--bytes", "-5"], "echosvr.py", "--bytes", "value -5")
        self.assertRefused([*echosvr, "server", "--bytes", "5"], "echosvr.py", "--bytes is a client option")

    def test_helpStillExitsZero(self):
        for argv in (
            [*twistdCommand(), "enta", "--help"],
            [*PYTHON_M_ENT, "--help"],
            [*PYTHON_M_ENT, "status", "--help"],
        ):
            result = self.runCommand(argv)
            self.assertEqual((result.returncode, result.stderr), (0, ""), argv)
            self.assertIn("--", result.stdout)


class StrictValueTests(unittest.TestCase):
    """
    Without twistd as the parent, a refusal is a L{usage.UsageError} with
    the one line's text.
    """

    def assertRefused(self, parse, argv, message):
        e = self.assertRaises(usage.UsageError, parse, *argv)
        self.assertEqual(str(e), message)

    def test_ports(self):
        self.assertRefused(
            enta,
            ["--dport", "80, 22"],
            "--dport '80, 22' is not PORT[,PORT...]: digits and commas, no spaces or empty items",
        )
        self.assertRefused(
            enta,
            ["--capture", "80,"],
            "--capture '80,' is not PORT[,PORT...]: digits and commas, no spaces or empty items",
        )
        self.assertRefused(
            enta, ["--dport", "8_0"], "--dport '8_0' is not PORT[,PORT...]: digits and commas, no spaces or empty items"
        )
        self.assertRefused(enta, ["--dport", "22,70000"], "--dport '22,70000': port 70000 is out of range 1-65535")
        self.assertRefused(enta, ["--replay", "+80"], "--replay '+80' is not a number")
        self.assertRefused(enta, ["--dport", "80", "--tunnel-port", " 1"], "--tunnel-port ' 1' is not a number")
        self.assertEqual(enta("--dport", "80,22", "--dport", "443")["dports"], (80, 22, 443))

    def test_numbers(self):
        self.assertRefused(enta, ["--mtu", "1_500"], "--mtu '1_500' is not a number")
        self.assertRefused(enta, ["--route-table", "+7"], "--route-table '+7' is neither a number nor auto")
        self.assertRefused(
            relay,
            ["--max-concurrent-connections", "0", "--listen", "tcp:1", "--connect", "tcp:h:1"],
            "--max-concurrent-connections 0 is out of range: at least 1",
        )

    def test_addresses(self):
        self.assertRefused(
            enta,
            ["--dport", "7", "--peer-addr", "192.168.0.0"],
            "--peer-addr 192.168.0.0 is the network address of the TUN network 192.168.0.0/24, not an agent's",
        )
        self.assertRefused(
            enta,
            ["--tun-addr", "10.1.255.255/16"],
            "--tun-addr '10.1.255.255/16': 10.1.255.255 is the broadcast address of 10.1.0.0/16",
        )
        self.assertRefused(
            enta,
            ["--tun-addr", "10.1.0.1", "--tun-mask", "255.0.255.0"],
            "--tun-addr '10.1.0.1' --tun-mask '255.0.255.0': '255.0.255.0' is not a valid netmask",
        )
        self.assertRefused(
            enta, ["--peer-addr", "1.2.3", "--dport", "7"], "--peer-addr '1.2.3': Expected 4 octets in '1.2.3'"
        )
        self.assertRefused(entg, ["--entg-connect", "gw:0"], "--entg-connect 'gw:0': port 0 is out of range 1-65535")
        self.assertRefused(
            entg,
            ["--entg-connect", "gw:6979=10.0.0.0/33"],
            "--entg-connect 'gw:6979=10.0.0.0/33': '10.0.0.0/33' does not appear to be an IPv4 or IPv6 network",
        )
        self.assertRefused(
            entg,
            ["--entg-connect", "gw2:6979", "--entg-connect", "gw3:6979=10.3.0.0/16"],
            "--entg-connect 'gw2:6979' needs =PREFIX[,PREFIX...]: "
            "with several peers each names the tunnel addresses behind it",
        )

    def test_names(self):
        for name in ("a:b", ".", "tun%d", "a b", "", "sixteen-bytes-xx"):
            e = self.assertRaises(usage.UsageError, enta, "--tun-name", name)
            self.assertIn(f"--tun-name {name!r} is not a valid interface name", str(e))
        self.assertEqual(enta("--tun-name", "ent-a.1")["tun-name"], "ent-a.1")
        self.assertRefused(
            entg,
            ["--enta-rats-tls", "--verifier", "x/y"],
            "--verifier 'x/y' is not a plugin name (up to 31 letters, digits, '_', '.', '-')",
        )

    def test_files(self):
        directory = self.mktemp()
        os.mkdir(directory)
        cert = os.path.join(directory, "cert.pem")
        open(cert, "w").close()
        missing = os.path.join(directory, "key.pem")
        self.assertRefused(
            entg,
            ["--enta-tls", "--tls-cert", cert, "--tls-key", missing, "--tls-ca", cert],
            f"--tls-key {missing!r}: No such file or directory",
        )
        self.assertRefused(
            entg,
            ["--enta-tls", "--tls-cert", cert, "--tls-key", cert, "--tls-ca", directory],
            f"--tls-ca {directory!r}: Is a directory",
        )
        self.assertRefused(
            entg,
            [
                "--entg-tls",
                "--entg-connect",
                "10.0.0.1:1",
                "--entg-tls-name",
                "gw 2",
                "--tls-cert",
                cert,
                "--tls-key",
                cert,
                "--tls-ca",
                cert,
            ],
            "--entg-tls-name 'gw 2' is not a DNS name or an IP address",
        )


def closedPort():
    """
    A loopback port nothing listens on.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ConnectFailureLogTests(unittest.TestCase):
    """
    L{DescribedEndpoint} logs a failed attempt with the endpoint's HOST:PORT
    and the reason; a cancelled attempt is a stop, neither logged nor counted.
    """

    def setUp(self):
        self.events = []
        self.patch(DescribedEndpoint, "log", Logger(observer=self.events.append))
        self.leg = LegStats("gateway")

    def endpoint(self, port):
        return DescribedEndpoint(HostnameEndpoint(reactor, "127.0.0.1", port), f"127.0.0.1:{port}", self.leg)

    async def test_refused(self):
        port = closedPort()
        attempt = self.endpoint(port).connect(Factory.forProtocol(Protocol))
        await self.assertFailure(attempt, ConnectionRefusedError)
        [event] = self.events
        text = formatEvent(event)
        self.assertTrue(text.startswith(f"cannot connect to 127.0.0.1:{port}: Connection was refused"), text)
        self.assertNotIn("Address(", text)
        self.assertEqual(self.leg.connectFailures, 1)

    async def test_cancelledDuringTheAttempt(self):
        """
        Cancelled while its SYN waits on a listener whose accept queue is
        full, a L{HostnameEndpoint} fails with C{ConnectingCancelledError},
        whose message is only a C{HostnameAddress}: a stop, not a failure.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(2):
            filler = socket.socket()
            self.addCleanup(filler.close)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        attempt = self.endpoint(port).connect(Factory.forProtocol(Protocol))
        await deferLater(reactor, 0.5, lambda: None)
        self.assertNoResult(attempt)  # still waiting for the full listener
        attempt.cancel()
        await self.assertFailure(attempt, ConnectingCancelledError)
        self.assertEqual((self.events, self.leg.connectFailures), ([], 0))

    def test_failureText(self):
        reason = Failure(ConnectingCancelledError(HostnameAddress(b"gw.example", 6980)))
        self.assertEqual(failureText(reason), "attempt to connect to gw.example:6980 cancelled")
        self.assertEqual(failureText(Failure(ConnectionRefusedError())), "Connection was refused by other side.")

"""
SIGTERM while the tunnel is busy: every ENT process exits within 2 s, in
either direction of the load, and an agent removes what it configured.

Real twistd processes in namespaces, iperf3 through the tunnel.
"""

import os
import signal
import socket
import subprocess
import time

from twisted.trial import unittest

from ent.testing.topology import ADDRESS, Tunnel, twistdCommand
from tests.netns import requireRoot

# Seconds an ENT process may take to exit after SIGTERM.
STOP_LIMIT = 2.0


class StopUnderLoadTests(unittest.TestCase):
    def setUp(self):
        requireRoot(self)
        self.tunnel = Tunnel().__enter__()
        self.addCleanup(self.tunnel.__exit__, None, None, None)
        self.t = self.tunnel.topology

    def load(self, reverse):
        """
        iperf3 through the tunnel (client to server, or back with
        C{reverse}) until it is seen moving data.
        """
        t = self.t
        t.stop(self.tunnel.echo)
        t.start("server", "iperf3", "-s", "-p", "7", name="iperf3-server")
        log = os.path.join(self.tunnel.logdir, "iperf3-client.log")

        def moving():
            if not os.path.exists(log):
                t.start(
                    "client",
                    "iperf3",
                    "-c",
                    ADDRESS["server"],
                    "-p",
                    "7",
                    "-t",
                    "60",
                    "--forceflush",
                    *(["-R"] if reverse else []),
                    name="iperf3-client",
                )
                return False
            with open(log) as f:
                text = f.read()
            if "unable to connect" in text or "error" in text:
                os.unlink(log)  # the server was not listening yet: try again
                return False
            return "bits/sec" in text

        t.waitFor(moving, timeout=20, interval=0.3)

    def assertStopsInTime(self, host):
        code, seconds = self.t.stop(self.tunnel.services[host], timeout=30)
        logs = self.tunnel.logs()
        self.assertIn(code, (0, -signal.SIGTERM), f"{host}: exit {code}\n{logs}")
        self.assertLess(seconds, STOP_LIMIT, f"{host} took {seconds:.2f}s to stop\n{logs}")
        self.assertNotIn(host, self.tunnel.leftovers(), logs)

    def stopUnderLoad(self, host, reverse):
        self.load(reverse)
        time.sleep(1)  # buffers full on every hop
        self.assertStopsInTime(host)

    def test_clientAgentUpload(self):
        self.stopUnderLoad("client", reverse=False)

    def test_clientAgentDownload(self):
        self.stopUnderLoad("client", reverse=True)

    def test_serverAgentUpload(self):
        self.stopUnderLoad("server", reverse=False)

    def test_serverAgentDownload(self):
        self.stopUnderLoad("server", reverse=True)

    def test_clientGatewayUpload(self):
        self.stopUnderLoad("gw1", reverse=False)

    def test_clientGatewayDownload(self):
        self.stopUnderLoad("gw1", reverse=True)

    def test_serverGatewayUpload(self):
        self.stopUnderLoad("gw2", reverse=False)

    def test_serverGatewayDownload(self):
        self.stopUnderLoad("gw2", reverse=True)

    def frozen(self, host):
        """
        SIGSTOP C{host}'s service (it reads nothing while stopped) until
        the test ends.
        """
        process = self.tunnel.services[host]
        os.kill(process.pid, signal.SIGSTOP)
        self.addCleanup(lambda: process.poll() is None and os.kill(process.pid, signal.SIGCONT))

    def test_agentWhoseGatewayReadsNothing(self):
        """
        The gateway stops reading mid-upload, so the agent's link has data
        it can never send: the stop aborts it instead of waiting for ever.
        """
        self.load(reverse=False)
        self.frozen("gw1")
        time.sleep(1.5)  # the link's buffer fills and pauses the TUN
        self.assertStopsInTime("client")

    def test_gatewayWhosePeerReadsNothing(self):
        self.load(reverse=False)
        self.frozen("gw2")
        time.sleep(1.5)
        self.assertStopsInTime("gw1")


def _freePort():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RelayStopUnderLoadTests(unittest.TestCase):
    """
    C{twistd ent-relay} (mock vsock, on loopback) relaying iperf3 at full
    speed exits within the limit of SIGTERM.
    """

    def setUp(self):
        self.processes = []
        self.addCleanup(self._killAll)

    def _killAll(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()

    def start(self, *argv):
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.processes.append(process)
        return process

    def stopRelayUnderLoad(self, reverse):
        target, listen = _freePort(), _freePort()
        self.start("iperf3", "-s", "-B", "127.0.0.1", "-p", str(target))
        relay = self.start(
            *twistdCommand(),
            "-n",
            "--pidfile=",
            "ent-relay",
            "--mock-vsock",
            "--tcp-to-vsock",
            "--tcp-address",
            f"127.0.0.1:{listen}",
            "--vsock-address",
            f"127.0.0.1:{target}",
        )
        deadline = time.monotonic() + 30
        while "relaying " not in (line := relay.stdout.readline()):
            self.assertLess(time.monotonic(), deadline, "the relay did not start")
            self.assertNotEqual(line, "", "the relay exited")
        client = self.start(
            "iperf3", "-c", "127.0.0.1", "-p", str(listen), "-t", "60", "--forceflush", *(["-R"] if reverse else [])
        )
        while "bits/sec" not in (line := client.stdout.readline()):
            self.assertLess(time.monotonic(), deadline, "iperf3 moved nothing")
            self.assertNotEqual(line, "", "iperf3 ended")
        time.sleep(1)
        started = time.monotonic()
        relay.send_signal(signal.SIGTERM)
        code = relay.wait(30)
        seconds = time.monotonic() - started
        self.assertIn(code, (0, -signal.SIGTERM))
        self.assertLess(seconds, STOP_LIMIT, f"ent-relay took {seconds:.2f}s to stop")

    def test_upload(self):
        self.stopRelayUnderLoad(reverse=False)

    def test_download(self):
        self.stopRelayUnderLoad(reverse=True)

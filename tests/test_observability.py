"""
Metrics, status and JSON logs of a real tunnel in namespaces: the four
services run as twistd processes with --metrics, traffic and faults are
made for real, and the endpoints are scraped over HTTP.
"""

import json
import os
import signal
import sys
import time

from twisted.trial import unittest

from ent.testing.topology import ADDRESS, Tunnel
from tests.checks import METRICS, METRICS_PORT, scrapeIn, statusIn
from tests.netns import requireRoot

HOSTS = ("client", "gw1", "gw2", "server")

# A gateway that speaks the wire format but sends the agent what a broken
# or hostile peer might: one packet of each malformed kind, then a frame of
# length 0. It accepts one agent and exits.
FAKE_GATEWAY = r"""
import socket, struct, sys, time
def frame(p): return struct.pack(">I", len(p)) + p
ipv4 = bytes([0x45, 0]) + struct.pack(">H", 30) + bytes(26)
ipv6 = bytes([0x60]) + bytes(3) + struct.pack(">H", 10) + bytes(34) + bytes(10)
bad = [b"\x20" * 30, ipv4[:10], ipv4 + b"!", ipv6[:30], ipv6[:-1]]
server = socket.create_server((sys.argv[1], 6980))
agent, _ = server.accept()
server.close()
print("agent connected", flush=True)
agent.sendall(b"".join(frame(p) for p in bad))
time.sleep(0.5)
agent.sendall(struct.pack(">I", 0))
agent.settimeout(10)
try:
    while agent.recv(65536):
        pass
except OSError:
    pass
print("agent dropped us", flush=True)
"""

OVERSIZE_FRAME = r"""
import socket, struct, sys
s = socket.create_connection((sys.argv[1], 6980))
s.sendall(struct.pack(">I", 70000) + b"x" * 100)
s.settimeout(10)
try:
    while s.recv(65536):
        pass
except OSError:
    pass
"""

# Datagrams to the far tunnel address (port 9, discard), faster than any
# queue drains.
UDP_BLAST = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[2])):
    s.sendto(b"x" * 100, (sys.argv[1], 9))
"""


class TunnelMetricsTests(unittest.TestCase):
    def setUp(self):
        requireRoot(self)
        args = {host: list(METRICS) for host in HOSTS}
        args["client"] += ["--log-format", "json"]
        self.tunnel = Tunnel(hostArgs=args).__enter__()
        self.addCleanup(self.tunnel.__exit__, None, None, None)
        self.t = self.tunnel.topology

    def settledScrapes(self):
        """
        Scrape every host until two rounds agree: the in-flight packets of
        the last transfer are counted everywhere by then.
        """

        def counts():
            return {
                h: [
                    (s.name, tuple(sorted(s.labels.items())), s.value)
                    for s in scrapeIn(self.t, h).find("ent_leg_packets_total")
                ]
                for h in HOSTS
            }

        last = counts()
        for _ in range(20):
            time.sleep(0.5)
            now = counts()
            if now == last:
                return {h: scrapeIn(self.t, h) for h in HOSTS}
            last = now
        self.fail("the counters never settled")

    def test_countsAgreeHopByHop(self):
        """
        After a 2 MB echo, each hop received what the previous one sent,
        packet for packet and byte for byte, and the status command says UP.
        """
        echo = self.tunnel.echoClient(2_000_000)
        self.assertEqual(echo.returncode, 0, echo.stdout + self.tunnel.logs())
        s = self.settledScrapes()

        def packets(host, leg, direction):
            return s[host].value("ent_leg_packets_total", leg=leg, direction=direction)

        def octets(host, leg, direction):
            return s[host].value("ent_leg_bytes_total", leg=leg, direction=direction)

        for count in (packets, octets):
            # Client to server...
            self.assertEqual(count("client", "gateway", "sent"), count("gw1", "agent", "received"))
            self.assertEqual(count("gw1", "agent", "received"), count("gw1", "peer", "sent"))
            self.assertEqual(count("gw1", "peer", "sent"), count("gw2", "peer", "received"))
            self.assertEqual(count("gw2", "peer", "received"), count("gw2", "agent", "sent"))
            self.assertEqual(count("gw2", "agent", "sent"), count("server", "gateway", "received"))
            # ...and back.
            self.assertEqual(count("server", "gateway", "sent"), count("gw2", "agent", "received"))
            self.assertEqual(count("gw2", "agent", "received"), count("gw2", "peer", "sent"))
            self.assertEqual(count("gw2", "peer", "sent"), count("gw1", "peer", "received"))
            self.assertEqual(count("gw1", "peer", "received"), count("gw1", "agent", "sent"))
            self.assertEqual(count("gw1", "agent", "sent"), count("client", "gateway", "received"))
        self.assertGreater(octets("client", "gateway", "sent"), 2_000_000)
        self.assertGreater(octets("client", "gateway", "received"), 2_000_000)

        for host in ("client", "server"):
            scrape = s[host]
            read = scrape.value("ent_tun_packets_total", direction="read")
            self.assertEqual(scrape.value("ent_leg_packets_total", leg="gateway", direction="sent"), read)
            self.assertEqual(scrape.value("ent_tun_read_batch_packets_sum"), read)
            self.assertGreater(scrape.value("ent_tun_read_batch_packets_count"), 0)
            self.assertEqual(
                scrape.value("ent_tun_packets_total", direction="written"),
                scrape.value("ent_leg_packets_total", leg="gateway", direction="received"),
            )
            self.assertEqual(scrape.find("ent_dropped_total"), [])
        for host in HOSTS:
            code, output = statusIn(self.t, host)
            self.assertEqual(code, 0, output)
            self.assertTrue(output.rstrip().endswith("status: UP"), output)
        self.assertEqual(s["gw1"].find("ent_info")[0].labels["service"], "entg")

    def test_dropsReconnectsAndJsonLogs(self):
        """
        Faults made for real: the gateway goes away (the TUN reader pauses,
        the kernel drops what its queue cannot hold, status says DEGRADED), a fake gateway
        sends malformed packets and a zero-length frame (each counted under
        its reason, the connection dropped), a client sends an oversize
        frame to the real gateway; the agent reconnects each time, and its
        JSON log lines parse and carry the fields.
        """
        t, tunnel = self.t, self.tunnel
        t.stop(tunnel.services["gw1"])
        t.waitFor(lambda: scrapeIn(t, "client").value("ent_leg_up", leg="gateway") == 0)
        # Its retries are refused while nothing listens, and counted.
        t.waitFor(lambda: scrapeIn(t, "client").value("ent_leg_connect_failures_total", leg="gateway") >= 1, timeout=20)
        code, output = statusIn(t, "client")
        self.assertEqual(code, 1, output)
        self.assertIn("status: DEGRADED (down: gateway)", output)
        # The TUN reader is paused, so packets wait in the kernel's queue
        # for the next gateway; beyond the queue the kernel drops them, and
        # the metrics show how many.
        self.assertEqual(scrapeIn(t, "client").value("ent_tun_paused"), 1)
        blast = t.exec("client", sys.executable, "-c", UDP_BLAST, "192.168.0.254", "2000")
        self.assertEqual(blast.returncode, 0, blast.stderr)
        # The queue holds 500 (the TUN's txqueuelen); the rest is dropped.
        self.assertGreaterEqual(scrapeIn(t, "client").value("ent_tun_kernel_dropped_total"), 1000)
        self.assertIn("dropped by the kernel while the reader was paused", statusIn(t, "client")[1])

        writtenBefore = scrapeIn(t, "client").value("ent_tun_packets_total", direction="written")
        fake = t.start("gw1", sys.executable, "-c", FAKE_GATEWAY, ADDRESS["gw1.agent"], name="fake-gateway")
        fakeLog = os.path.join(tunnel.logdir, "fake-gateway.log")
        t.waitFor(lambda: "agent dropped us" in open(fakeLog).read(), timeout=40)
        fake.wait(10)
        client = scrapeIn(t, "client")
        for reason in (
            "not_ip",
            "truncated_ipv4_header",
            "ipv4_length_mismatch",
            "truncated_ipv6_header",
            "ipv6_length_mismatch",
            "zero_length_frame",
        ):
            self.assertEqual(client.value("ent_dropped_total", leg="gateway", reason=reason), 1, reason)
        self.assertEqual(
            client.value("ent_tun_packets_total", direction="written"),
            writtenBefore,
            "nothing malformed reaches the TUN",
        )

        tunnel.startService("gw1")
        t.waitFor(tunnel.tunnelUp, timeout=40)
        client = scrapeIn(t, "client")
        self.assertEqual(client.value("ent_leg_up", leg="gateway"), 1)
        self.assertGreaterEqual(client.value("ent_leg_reconnects_total", leg="gateway"), 2)

        # An oversize frame to the real gateway: it drops that connection
        # (the agent it displaced comes back by itself).
        t.exec("client", sys.executable, "-c", OVERSIZE_FRAME, ADDRESS["gw1.agent"], timeout=30)
        t.waitFor(lambda: scrapeIn(t, "gw1").value("ent_dropped_total", leg="agent", reason="oversize_frame") == 1)
        t.waitFor(tunnel.tunnelUp, timeout=40)
        echo = tunnel.echoClient(100_000)
        self.assertEqual(echo.returncode, 0, echo.stdout + tunnel.logs())

        tunnel.stopServices()
        with open(os.path.join(tunnel.logdir, "client-enta.log")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        drops = {r["reason"]: r for r in records if r.get("description") and r.get("reason")}
        self.assertEqual(drops["not_ip"]["leg"], "gateway")
        self.assertEqual(drops["not_ip"]["count"], 1)
        self.assertEqual(drops["zero_length_frame"]["description"], "frame of length 0 (connection dropped)")
        lost = [r for r in records if r["message"].startswith("lost gateway")]
        self.assertTrue(lost)
        self.assertEqual(
            (lost[0]["leg"], lost[0]["peer"], lost[0]["level"]), ("gateway", f"{ADDRESS['gw1.agent']}:6980", "warn")
        )
        framing = [r for r in records if r.get("reason") == "frame with length 0"]
        self.assertEqual(framing[0]["level"], "error")
        self.assertEqual(tunnel.leftovers(), {})


class MetricsStartupTests(unittest.TestCase):
    def test_metricsPortInUseRefusesStartLeavingNothing(self):
        requireRoot(self)
        tunnel = Tunnel(waitUp=False)
        tunnel.topology.__enter__()
        self.addCleanup(tunnel.__exit__, None, None, None)
        t = tunnel.topology
        blocker = t.start(
            "client",
            sys.executable,
            "-c",
            f"import socket, time; s = socket.create_server(('127.0.0.1', {METRICS_PORT})); "
            "print('bound', flush=True); time.sleep(60)",
            name="blocker",
        )
        t.waitFor(lambda: "bound" in open(os.path.join(tunnel.logdir, "blocker.log")).read())
        from ent.testing.topology import twistdCommand

        result = t.exec(
            "client",
            *twistdCommand(),
            "-n",
            "--pidfile=",
            "enta",
            "--dport",
            "7",
            "--entg-connect",
            f"{ADDRESS['gw1.agent']}:6980",
            *METRICS,
            timeout=60,
        )
        output = result.stdout + result.stderr
        self.assertNotEqual(result.returncode, 0, output)
        self.assertIn(f"enta: cannot start: Couldn't listen on 127.0.0.1:{METRICS_PORT}", output)
        self.assertNotIn("Traceback", output)
        self.assertEqual(tunnel.leftovers(), {})
        blocker.send_signal(signal.SIGKILL)

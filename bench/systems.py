"""
The systems the bench compares, each on its own fresh path of four
namespaces: kernel routing, ENT (default MTU, --mtu 1500, with --metrics
scraped) and OpenVPN (default MTU and --tun-mtu 60000).
"""

import contextlib
import shutil
import sys

from bench.topology import (
    PORT,
    TUN_CLIENT,
    TUN_SERVER,
    BenchTunnel,
    MeasureError,
    check,
    cleanupShielded,
    startPingPong,
    tails,
    waitListening,
)
from ent.testing.topology import ADDRESS, HOSTS, Topology

OPENVPN_COMMON = ["--dev", "tun", "--cipher", "none", "--auth", "none", "--disable-dco", "--verb", "3"]


class Config:
    def __init__(self, key, label, kind, mtu, options=(), gatewayOptions=(), scrape=False):
        self.key, self.label, self.kind, self.mtu, self.options = key, label, kind, mtu, list(options)
        self.gatewayOptions = list(gatewayOptions)
        # Scrape every ENT process's --metrics once a second while measuring.
        self.scrape = scrape


METRICS = ["--metrics", "tcp:9100:interface=127.0.0.1"]


SCRAPER = (
    "import time, urllib.request\n"
    "while True:\n"
    "    urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=5).read()\n"
    "    time.sleep(1)\n"
)


CONFIGS = [
    Config("kernel", "kernel routing", "kernel", 1500),
    Config("ent", "ENT default", "ent", 65535),
    Config("ent1500", "ENT --mtu 1500", "ent", 1500, ["--mtu", "1500"]),
    Config("entmetrics", "ENT default, --metrics scraped 1/s", "ent", 65535, METRICS, METRICS, scrape=True),
    Config("openvpn", "OpenVPN default", "openvpn", 1500),
    Config("openvpn60000", "OpenVPN --tun-mtu 60000", "openvpn", 60000, ["--tun-mtu", "60000"]),
]


BY_KEY = {c.key: c for c in CONFIGS}


# Which OpenVPN configuration each row is compared with. OpenVPN's default
# TUN MTU is 1500, so "OpenVPN default" is also "OpenVPN at MTU 1500".
OPENVPN_BASELINE = {
    "ent": "openvpn",
    "ent1500": "openvpn",
    "entmetrics": "openvpn",
    "openvpn": "openvpn",
    "openvpn60000": "openvpn",
}


@contextlib.contextmanager
def path(config, prefix, namespaces, logdir):
    """
    Build C{config}'s path; yield (topology, iperf3 target, ping target).
    """
    if config.kind == "ent":
        tunnel = BenchTunnel(PORT, prefix, agentArgs=config.options, gatewayArgs=config.gatewayOptions, logdir=logdir)
        try:
            tunnel.topology.__enter__()
            namespaces.record(tunnel.topology)
            tunnel.startAll()
            if config.scrape:
                for host in HOSTS:
                    tunnel.topology.start(host, sys.executable, "-c", SCRAPER, name=f"{host}-scraper")
            yield tunnel.topology, ADDRESS["server"], TUN_SERVER
            # An orderly stop, as a user would; whatever is left is killed below.
            tunnel.stopServices()
        finally:
            with cleanupShielded():
                tunnel.topology.destroy()
        return

    t = Topology(prefix=prefix, logdir=logdir)
    try:
        t.__enter__()
        namespaces.record(t)
        if config.kind == "kernel":
            for gw in ("gw1", "gw2"):
                check(t, gw, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            routes = {
                "client": [("10.2.0.0/24", ADDRESS["gw1.agent"]), ("10.3.0.0/24", ADDRESS["gw1.agent"])],
                "gw1": [("10.3.0.0/24", ADDRESS["gw2"])],
                "gw2": [("10.1.0.0/24", ADDRESS["gw1"])],
                "server": [("10.1.0.0/24", ADDRESS["gw2.agent"]), ("10.2.0.0/24", ADDRESS["gw2.agent"])],
            }
            for host, entries in routes.items():
                for net, via in entries:
                    check(t, host, "ip", "route", "add", net, "via", via)
            t.start("server", "iperf3", "-s", "-p", str(PORT), name="iperf3-server")
            startPingPong(t)
            waitListening(t, "server", PORT)
            target = ping = ADDRESS["server"]
        else:
            openvpn = shutil.which("openvpn") or "openvpn"
            common = [openvpn, *OPENVPN_COMMON, *config.options]
            t.start(
                "server",
                *common,
                "--proto",
                "tcp-server",
                "--lport",
                "1194",
                "--ifconfig",
                TUN_SERVER,
                TUN_CLIENT,
                name="server-openvpn",
            )
            t.start("gw2", "socat", "TCP-LISTEN:1195,fork,reuseaddr", f"TCP:{ADDRESS['server']}:1194", name="gw2-socat")
            t.start("gw1", "socat", "TCP-LISTEN:1194,fork,reuseaddr", f"TCP:{ADDRESS['gw2']}:1195", name="gw1-socat")
            waitListening(t, "server", 1194)
            waitListening(t, "gw2", 1195)
            waitListening(t, "gw1", 1194)
            t.start(
                "client",
                *common,
                "--proto",
                "tcp-client",
                "--remote",
                ADDRESS["gw1.agent"],
                "1194",
                "--ifconfig",
                TUN_CLIENT,
                TUN_SERVER,
                name="client-openvpn",
            )
            t.start("server", "iperf3", "-s", "-p", str(PORT), name="iperf3-server")
            startPingPong(t)
            try:
                t.waitFor(
                    lambda: t.exec("client", "ping", "-c", "1", "-W", "1", TUN_SERVER).returncode == 0, timeout=30
                )
            except TimeoutError:
                raise MeasureError("the OpenVPN tunnel did not come up; logs:\n" + tails(logdir))
            waitListening(t, "server", PORT)
            target = ping = TUN_SERVER
        yield t, target, ping
    finally:
        with cleanupShielded():
            t.destroy()

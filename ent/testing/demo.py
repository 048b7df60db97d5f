"""
The demo: the whole tunnel in four network namespaces on this machine.

    python -m ent demo

It builds the namespaces (nothing changes in the root namespace), starts
the two gateways, the two agents and an echo server, sends the unmodified
echo client through the tunnel, shows what happened, stops everything and
checks that nothing is left. Interrupting it cleans up as well.
"""

import os
import signal
import sys
import tempfile

from ent import addVersionOption
from ent.cli import ArgumentParser, count
from ent.testing.topology import ADDRESS, Tunnel


def say(text=""):
    print(text, flush=True)


def indent(text):
    return "\n".join("    " + line for line in text.strip().splitlines())


def main(argv=None):
    parser = ArgumentParser(prog="python -m ent demo", description="ENT demo in network namespaces")
    parser.add_argument("--bytes", type=count(1), default=1_000_000, help="payload of the second echo")
    addVersionOption(parser, "ent demo")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the demo creates network namespaces: run it as root")

    # SIGTERM and SIGHUP clean up like Ctrl-C does.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)

    say("ENT demo: client host -> ENTA -> ENTG -> ENTG -> ENTA -> server host")
    say(
        f"  client host {ADDRESS['client']}, gateways {ADDRESS['gw1.agent']}/{ADDRESS['gw1']} "
        f"and {ADDRESS['gw2']}/{ADDRESS['gw2.agent']}, server host {ADDRESS['server']}"
    )
    ok = False
    try:
        with Tunnel(logdir=tempfile.mkdtemp(prefix="ent-demo-")) as tunnel:
            t = tunnel.topology
            say(
                f"\n[1] namespaces {', '.join(t.created)} are up; services started "
                f"(logs in {tunnel.logdir}); the tunnel answers ping"
            )
            route = t.exec("client", "ip", "route", "get", ADDRESS["server"])
            say(
                f"\n[2] without ENT the client has no route to the server host:\n{indent(route.stderr or route.stdout)}"
            )
            say("    ENTA on the client host captured port 7 with:")
            say(indent(t.exec("client", "ip", "rule").stdout))
            say(indent(t.exec("client", "nft", "list", "ruleset").stdout))

            ping = t.exec("client", "ping", "-c", "3", "-i", "0.2", "192.168.0.254")
            say(f"\n[3] ping of the far agent's tunnel address:\n{indent(ping.stdout.splitlines()[-1])}")

            results = []
            for size in (64, args.bytes):
                echo = tunnel.echoClient(size)
                results.append(echo.returncode == 0)
                say(
                    f"\n[4] echo client on the client host -> {ADDRESS['server']}:7, {size} bytes:\n"
                    f"{indent(echo.stdout + echo.stderr)}"
                )
            with open(os.path.join(tunnel.logdir, "echo.log")) as f:
                seen = [line.split("] ", 1)[1] for line in f if "connection from" in line]
            say("\n[5] the echo server on the server host saw (the client's tunnel address):")
            say(indent("".join(seen)))

            stopped = tunnel.stopServices()
            say("\n[6] stopped every service with SIGTERM:")
            for host, (code, seconds) in stopped.items():
                say(f"    {host}: exit {code} after {seconds:.2f}s")
            left = tunnel.leftovers()
            say(f"    left behind in the namespaces: {left or 'nothing'}")
            ok = all(results) and not left
    except KeyboardInterrupt:
        say("\ninterrupted: cleaning up")
        return 130
    say("\nnamespaces deleted.")
    say("DEMO PASSED" if ok else "DEMO FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

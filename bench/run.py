"""
ENT's benchmark: ENT against OpenVPN and plain kernel routing, on the
four-host namespace topology of L{ent.testing.topology}.

    .venv/bin/python -m bench.run          (or: make bench)

Each configuration gets its own fresh namespaces (client host, gateway 1,
gateway 2, server host); nothing is configured in the root namespace, and
the namespaces are deleted afterwards, also on Ctrl-C or SIGTERM.

  - kernel:        ip_forward in the two gateway namespaces, static routes;
                   the physical limit of the path.
  - ENT:           ENT's four services, capturing/replaying the iperf3 port,
                   with the default TUN MTU (65535) and with --mtu 1500.
  - OpenVPN:       OpenVPN 2.6 point-to-point in TCP mode without TLS and
                   without crypto, on the client and server hosts, with socat
                   TCP relays in the two gateways; default MTU (1500) and
                   --tun-mtu 60000.

Measured with public tools only: iperf3 (one stream each way, four streams
forward) and ping. For the tunnel's own processes: CPU seconds per GB of the
single-stream forward run (utime+stime from /proc/PID/stat) and peak RSS
(VmHWM). Writes bench/results.md and bench/results.png.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile

if __package__ in (None, ""):  # run as a script: python bench/run.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.measure import measure  # noqa: E402
from bench.report import chart, latencyReport, machineInfo, render  # noqa: E402
from bench.systems import BY_KEY, CONFIGS, path  # noqa: E402
from bench.topology import HERE, MeasureError, Namespaces, say  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description="ENT benchmark against OpenVPN and kernel routing")
    parser.add_argument("--time", type=int, default=5, help="seconds of each iperf3 run (default 5)")
    parser.add_argument("--only", help="comma-separated configurations: " + ",".join(BY_KEY))
    parser.add_argument(
        "--latency",
        action="store_true",
        help="only the latency part (ping-pong and ping), by default for kernel, ent and openvpn; "
        "quick, for development; writes nothing unless --out",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="with --latency: measure every configuration this many times, in turn, and report the "
        "median (default 3; latency on a shared machine varies from run to run)",
    )
    parser.add_argument(
        "--out",
        help="where to write results.md and results.png (default: bench/, and only when every configuration ran)",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("the benchmark creates network namespaces: run it as root")
    selected = CONFIGS
    if args.only:
        unknown = set(args.only.split(",")) - set(BY_KEY)
        if unknown:
            parser.error(f"unknown configuration {', '.join(sorted(unknown))}")
        selected = [c for c in CONFIGS if c.key in args.only.split(",")]
    elif args.latency:
        selected = [BY_KEY[k] for k in ("kernel", "ent", "openvpn")]
    missing = [tool for tool in ("iperf3", "openvpn", "socat", "ping") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run scripts/bench.sh (or make bench), which installs them")
    out = args.out or (None if args.only or args.latency else HERE)

    # SIGTERM and SIGHUP clean up like Ctrl-C does; SIGINT too when this was
    # started with SIGINT ignored (a background job of a script).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)

    info = machineInfo()
    prefix = f"entb{os.getpid()}"
    namespaces = Namespaces(prefix)
    logroot = tempfile.mkdtemp(prefix="ent-bench-")
    rounds = [{} for _ in range(args.rounds if args.latency else 1)]
    say(f"ENT benchmark: {len(selected)} configurations, iperf3 {args.time} s per run (logs in {logroot})")
    interrupted = False
    try:
        for number, results in enumerate(rounds, 1):
            for config in selected:
                say(f"\n== {config.label} (MTU {config.mtu})" + (f", round {number}" if len(rounds) > 1 else ""))
                logdir = os.path.join(logroot, f"{config.key}-{number}")
                os.makedirs(logdir)
                try:
                    with path(config, prefix, namespaces, logdir) as (t, target, pingTarget):
                        results[config.key] = measure(config, t, target, pingTarget, args.time, args.latency)
                except (MeasureError, TimeoutError, subprocess.CalledProcessError) as e:
                    say(f"    FAILED: {e}")
                    results[config.key] = {"errors": [str(e)], "load": os.getloadavg()[0]}
    except KeyboardInterrupt:
        interrupted = True
        say("\ninterrupted: cleaned up")
    left = namespaces.leftovers()
    say(
        f"\nleft behind: {', '.join(left) if left else 'nothing'} "
        f"({namespaces.count} namespaces were created and deleted)"
    )
    if interrupted:
        shutil.rmtree(logroot, ignore_errors=True)
        return 130

    if args.latency:
        text = latencyReport(rounds, info)
        say("\n" + text)
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "latency.md"), "w") as f:
                f.write(text + "\n")
            say(f"wrote {os.path.join(out, 'latency.md')}")
        failed = any(v.get("errors") for results in rounds for v in results.values())
        if not failed:
            shutil.rmtree(logroot, ignore_errors=True)
        return 1 if failed or left else 0
    results = rounds[0]
    report = render(results, info, args.time, "results.png")
    say("\n" + report)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(report)
        chart(results, os.path.join(out, "results.png"))
        say(f"wrote {os.path.join(out, 'results.md')} and {os.path.join(out, 'results.png')}")
    failed = any(v.get("errors") for v in results.values())
    if failed:
        say(f"some measurements failed; the services' logs are in {logroot}")
    else:
        shutil.rmtree(logroot, ignore_errors=True)
    return 1 if failed or left else 0


if __name__ == "__main__":
    sys.exit(main())

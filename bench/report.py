"""
The bench's report: bench/results.md (tables, goals, the machine it ran on)
and the chart bench/results.png.
"""

import contextlib
import datetime
import os
import platform
import re
import statistics
import subprocess

from bench.measure import rate
from bench.systems import BY_KEY, CONFIGS, OPENVPN_BASELINE, OPENVPN_COMMON
from bench.topology import PORT, TUN_CLIENT, TUN_SERVER
from ent.testing.topology import ADDRESS

RSS_LIMIT = 60_000_000  # bytes: the goal "under 60 MB" (MB = 10^6 bytes)


def bps(results, key, direction):
    entry = results.get(key) or {}
    value = entry.get(direction)
    return value["bps"] if value else None


def ratio(a, b):
    return a / b if a is not None and b else None


def fmtRatio(value):
    return "—" if value is None else f"{value:.2f}×"


def pingAvg(results, key):
    entry = (results.get(key) or {}).get("ping")
    return entry["avg"] if entry else None


def addedPing(results, key):
    mine, kernel = pingAvg(results, key), pingAvg(results, "kernel")
    return None if mine is None or kernel is None else mine - kernel


def pp50(results, key, which="pingpong"):
    entry = (results.get(key) or {}).get(which)
    return entry["p50"] if entry else None


def addedP50(results, key, which="pingpong"):
    """
    What C{key}'s path adds to the round trip's p50 over the kernel path's,
    idle (C{"pingpong"}) or with every CPU busy (C{"pingpongLoaded"}).
    """
    mine, kernel = pp50(results, key, which), pp50(results, "kernel", which)
    return None if mine is None or kernel is None else mine - kernel


def latencyTable(results):
    """
    The latency rows: the 1-byte TCP ping-pong and the idle ping, with what
    each path adds over the kernel path and how that compares to OpenVPN.
    """
    lines = [
        "| configuration | round trips/s | p50 µs | p99 µs | added p50 µs | added ÷ OpenVPN's "
        "| loaded p50 µs | loaded p99 µs | loaded added µs | loaded added ÷ OpenVPN's "
        "| ping median µs | added ping µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    kernelPing = (results.get("kernel") or {}).get("ping")
    for config in CONFIGS:
        if config.key not in results:
            continue
        entry = results[config.key] or {}
        pp, pi, loaded = entry.get("pingpong"), entry.get("ping"), entry.get("pingpongLoaded")
        added = addedP50(results, config.key)
        base = addedP50(results, OPENVPN_BASELINE.get(config.key))
        addedLoaded = addedP50(results, config.key, "pingpongLoaded")
        baseLoaded = addedP50(results, OPENVPN_BASELINE.get(config.key), "pingpongLoaded")
        cells = [
            config.label,
            f"{pp['rate']:.0f}" if pp else "—",
            f"{pp['p50']:.0f}" if pp else "—",
            f"{pp['p99']:.0f}" if pp else "—",
            "—" if config.key == "kernel" or added is None else f"{added:+.0f}",
            "—" if config.key == "kernel" or added is None or not base else f"{added / base:.2f}×",
            f"{loaded['p50']:.0f}" if loaded else "—",
            f"{loaded['p99']:.0f}" if loaded else "—",
            "—" if config.key == "kernel" or addedLoaded is None else f"{addedLoaded:+.0f}",
            "—"
            if config.key == "kernel" or addedLoaded is None or not baseLoaded
            else f"{addedLoaded / baseLoaded:.2f}×",
            f"{pi['median'] * 1000:.0f}" if pi else "—",
            "—"
            if config.key == "kernel" or not pi or not kernelPing
            else f"{(pi['median'] - kernelPing['median']) * 1000:+.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def medianResults(rounds):
    """
    One result per configuration from several rounds: the median of each
    latency figure (rate, p50, p99 of both ping-pongs; the ping's median).
    """
    merged = {}
    for key in {key for results in rounds for key in results}:
        entries = [results[key] for results in rounds if results.get(key)]
        entry = {}
        for which, fields in (("pingpong", ("rate", "p50", "p99")), ("pingpongLoaded", ("rate", "p50", "p99"))):
            got = [e[which] for e in entries if e.get(which)]
            if got:
                entry[which] = {f: statistics.median(g[f] for g in got) for f in fields}
        pings = [e["ping"] for e in entries if e.get("ping")]
        if pings:
            entry["ping"] = {"median": statistics.median(p["median"] for p in pings)}
        merged[key] = entry
    return merged


def latencyReport(rounds, info):
    """
    The latency part on its own (python -m bench.run --latency): the median
    of the rounds, what each round gave for the ratio to OpenVPN, and each
    round's table.
    """
    lines = [
        "# ENT latency",
        "",
        f"Run {info['date']} with `python -m bench.run --latency --rounds {len(rounds)}` "
        f"(`make bench` runs it after the throughput part). Machine: Linux {info['kernel']}, {info['cpu']}, {info['nproc']} CPUs. "
        f"Python {info['python']}.",
        "",
        LATENCY_TEXT,
        "",
        f"Every configuration was measured {len(rounds)} times, in turn (fresh namespaces each time); "
        "the table has the median of each figure, added p50 and the ratio are taken from those medians.",
        "",
        *latencyTable(medianResults(rounds)),
        "",
        "The ratio to OpenVPN default's added p50 in each round, idle / loaded:",
        "",
    ]
    for key in ("ent", "ent1500", "entmetrics"):
        if not any(key in results for results in rounds):
            continue
        ratios = []
        for results in rounds:
            cells = []
            for which in ("pingpong", "pingpongLoaded"):
                mine, theirs = addedP50(results, key, which), addedP50(results, OPENVPN_BASELINE[key], which)
                cells.append("—" if mine is None or not theirs else f"{mine / theirs:.2f}×")
            ratios.append(" / ".join(cells))
        lines.append(f"- {BY_KEY[key].label}: " + ", ".join(ratios))
    for number, results in enumerate(rounds, 1):
        lines += ["", f"Round {number}:", "", *latencyTable(results)]
    return "\n".join(lines)


LATENCY_TEXT = (
    "Latency: `bench/pingpong.py`, a 1-byte TCP request/response with TCP_NODELAY at both ends, from the "
    "client host to the server host's port 5202 (ENT maps and exposes it), 2000 round trips after 200 "
    "warm-up, one at a time; p50/p99 of the round trips, added p50 = p50 − kernel path's p50, "
    "\"added ÷ OpenVPN's\" divides that by OpenVPN default's added p50. Loaded: the same ping-pong "
    "(2000 round trips after 200) while one busy loop per CPU competes with the path's processes "
    "(`bench/measure.py` cpuLoad), compared the same way. Ping: the median of the "
    "20 pings above (idle path, one every 50 ms)."
)


def fmtMs(value, signed=False):
    if value is None:
        return "—"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def goals(results):
    """
    [(goal, figures, met)] with met True, False or None (not measured).
    """
    out = []

    def both(a, b, factor):
        pairs = [(bps(results, a, d), bps(results, b, d)) for d in ("forward", "reverse")]
        ratios = [ratio(x, y) for x, y in pairs]
        met = None if None in ratios else all(r >= factor for r in ratios)
        return ratios, met

    ratios, met = both("ent", "openvpn", 2)
    out.append(
        (
            "ENT default ≥ 2 × OpenVPN default, single stream, both directions",
            f"forward {fmtRatio(ratios[0])}, reverse {fmtRatio(ratios[1])}",
            met,
        )
    )
    ratios, met = both("ent1500", "openvpn", 1)
    out.append(
        (
            "ENT at MTU 1500 ≥ 1 × OpenVPN at MTU 1500, single stream, both directions",
            f"forward {fmtRatio(ratios[0])}, reverse {fmtRatio(ratios[1])}",
            met,
        )
    )
    mine, theirs = addedP50(results, "ent"), addedP50(results, "openvpn")
    met = None if mine is None or not theirs else mine <= 2 * theirs
    out.append(
        (
            "ENT default's added round trip (1-byte ping-pong p50 over the kernel path) ≤ 2 × OpenVPN "
            "default's (issue 15)",
            "—" if met is None else f"{mine:+.0f} µs vs {theirs:+.0f} µs ({mine / theirs:.2f}×)",
            met,
        )
    )
    mine, theirs = addedP50(results, "ent", "pingpongLoaded"), addedP50(results, "openvpn", "pingpongLoaded")
    met = None if mine is None or not theirs else mine <= 2 * theirs
    out.append(
        (
            "the same with every CPU kept busy (issue 15)",
            "—" if met is None else f"{mine:+.0f} µs vs {theirs:+.0f} µs ({mine / theirs:.2f}×)",
            met,
        )
    )
    for ent in ("ent", "ent1500"):
        mine, theirs = addedPing(results, ent), addedPing(results, OPENVPN_BASELINE[ent])
        met = None if mine is None or theirs is None else mine <= theirs
        out.append(
            (
                f"added ping RTT over the kernel path ≤ OpenVPN's ({BY_KEY[ent].label} vs "
                f"{BY_KEY[OPENVPN_BASELINE[ent]].label})",
                f"{fmtMs(mine, True)} ms vs {fmtMs(theirs, True)} ms",
                met,
            )
        )
    peaks = []
    for ent in ("ent", "ent1500"):
        for label, entry in sorted(((results.get(ent) or {}).get("procs") or {}).items()):
            peaks.append((f"{BY_KEY[ent].label}: {label}", entry["hwm"]))
    if peaks:
        worst = max(peaks, key=lambda p: p[1])
        met = all(0 < hwm < RSS_LIMIT for _, hwm in peaks)
        figures = f"largest {worst[1] / 1e6:.1f} MB ({worst[0]}) of {len(peaks)} processes"
    else:
        met, figures = None, "not measured"
    out.append(("each ENT process under 60 MB RSS at full load (peak, VmHWM)", figures, met))
    return out


def firstLine(argv):
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def machineInfo():
    import ent
    import twisted

    cpu = "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    openvpn = firstLine(["openvpn", "--version"]).split()
    iperf3 = firstLine(["iperf3", "--version"]).split()
    socat = re.search(r"version ([\d.]+)", subprocess.run(["socat", "-V"], capture_output=True, text=True).stdout)
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "kernel": platform.release(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "ent": getattr(ent, "__version__", "?"),
        "openvpn": openvpn[1] if len(openvpn) > 1 else "?",
        "iperf3": iperf3[1] if len(iperf3) > 1 else "?",
        "socat": socat[1] if socat else "?",
    }


def render(results, info, seconds, pngName):
    lines = [
        "# ENT benchmark",
        "",
        f"Run {info['date']} with `make bench` (`python -m bench.run`). Machine: Linux {info['kernel']}, "
        f"{info['cpu']}, {info['nproc']} CPUs (nproc). Python {info['python']}, Twisted {info['twisted']}, "
        f"ENT {info['ent']}, OpenVPN {info['openvpn']}, iperf3 {info['iperf3']}, socat {info['socat']}.",
        "",
        "Four network namespaces, client host — gateway 1 — gateway 2 — server host, three veth links, "
        "fresh for each configuration. iperf3 client on the client host, server on the server host: "
        f"one TCP stream for {seconds} s forward (client → server) and reverse (`-R`), four streams forward "
        "(`-P 4`); receiver's rate. Ping: 20 × 0.05 s from the client host to the far end "
        "(the far tunnel address, or the server host for the kernel path) after 3 warm-up pings; "
        "added RTT = ping avg − kernel path ping avg.",
        "",
        "| configuration | TUN MTU | 1 stream → | 1 stream ← | 4 streams → | ping avg ms (median) "
        "| added RTT ms | vs OpenVPN → | vs OpenVPN ← | vs kernel → | vs kernel ← |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in CONFIGS:
        if config.key not in results:
            continue
        entry = results[config.key] or {}
        p = entry.get("ping")
        pingText = f"{p['avg']:.3f} ({p['median']:.3f})" if p else "—"
        base = OPENVPN_BASELINE.get(config.key)
        cells = [
            config.label,
            str(config.mtu),
            rate(bps(results, config.key, "forward")),
            rate(bps(results, config.key, "reverse")),
            rate(bps(results, config.key, "streams4")),
            pingText,
            "—" if config.key == "kernel" else fmtMs(addedPing(results, config.key), True),
        ]
        for other in (base, "kernel"):
            for d in ("forward", "reverse"):
                cells.append(
                    "—" if other is None else fmtRatio(ratio(bps(results, config.key, d), bps(results, other, d)))
                )
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        '"vs OpenVPN" compares with OpenVPN at its default TUN MTU, 1500 (so ENT default and ENT --mtu 1500 '
        "are both compared with it, as the goals say). ",
    ]
    large = [ratio(bps(results, "ent", d), bps(results, "openvpn60000", d)) for d in ("forward", "reverse")]
    lines[-1] += (
        f"Large MTU against large MTU, ENT default (65535) vs OpenVPN --tun-mtu 60000: "
        f"forward {fmtRatio(large[0])}, reverse {fmtRatio(large[1])}."
    )

    lines += ["", "## Latency", "", LATENCY_TEXT, ""] + latencyTable(results)
    lines += [
        "",
        "## The tunnels' processes",
        "",
        "CPU seconds (utime + stime from /proc/PID/stat) spent during the single-stream forward run, per GB "
        "(10^9 bytes) received by iperf3; peak RSS is VmHWM at the end of the configuration's runs "
        "(MB = 10^6 bytes). socat forks a child per connection; its processes are added up per host.",
        "",
        "| configuration | process | CPU s/GB | peak RSS MB |",
        "|---|---|---:|---:|",
    ]
    for config in CONFIGS:
        for label, entry in sorted(((results.get(config.key) or {}).get("procs") or {}).items()):
            cpu = "—" if entry.get("cpu_per_gb") is None else f"{entry['cpu_per_gb']:.2f}"
            lines.append(f"| {config.label} | {label} | {cpu} | {entry['hwm'] / 1e6:.1f} |")

    lines += ["", "## Goals (issue 5)", ""]
    for goal, figures, met in goals(results):
        verdict = {True: "**met**", False: "**not met**", None: "not measured"}[met]
        lines.append(f"- {goal}: {figures} — {verdict}")

    loads = ", ".join(f"{BY_KEY[k].label} {v['load']:.2f}" for k, v in results.items() if v)
    lines += [
        "",
        "## Conditions",
        "",
        f"1-minute load average when each configuration started: {loads}. The machine has {info['nproc']} "
        "CPUs and every process of a path shares them, so other work on the machine lowers the figures; "
        "compare configurations within one run.",
        "",
        "- OpenVPN (both hosts): `openvpn " + " ".join(OPENVPN_COMMON) + " --proto tcp-server --lport 1194 "
        f"--ifconfig {TUN_SERVER} {TUN_CLIENT}` on the server host, `--proto tcp-client --remote "
        f"{ADDRESS['gw1.agent']} 1194 --ifconfig {TUN_CLIENT} {TUN_SERVER}` on the client host "
        "(point to point, no TLS, no static key, so no crypto); `--tun-mtu 60000` added for the large MTU.",
        f"- socat: gw1 `socat TCP-LISTEN:1194,fork,reuseaddr TCP:{ADDRESS['gw2']}:1195`, "
        f"gw2 `socat TCP-LISTEN:1195,fork,reuseaddr TCP:{ADDRESS['server']}:1194`.",
        f"- ENT: `twistd -n entg` in the gateways as in the README, `twistd -n enta --dport {PORT}` "
        f"(client host) and `--replay {PORT}` (server host), plus `--mtu 1500` on both agents for ENT --mtu 1500, "
        f"and `--metrics tcp:9100:interface=127.0.0.1` on all four for the metrics row, each scraped once a second "
        f"by a Python loop in its namespace; "
        f"iperf3 connects to {ADDRESS['server']}:{PORT}, which ENT captures.",
        "- kernel: `net.ipv4.ip_forward=1` in the two gateway namespaces, static routes in all four.",
    ]
    errors = [(k, e) for k, v in results.items() if v for e in v["errors"]]
    if errors:
        lines += ["", "## Failed measurements", ""]
        lines += [f"- {BY_KEY[k].label}: {e.splitlines()[0]}" for k, e in errors]
    lines += [
        "",
        "The rootless agent (`--stack user`) beside the TUN agent, with 0, 5 and 20 ms of added round "
        "trip: [rootless.md](rootless.md) (`make bench-rootless`); libslirp against pasta: "
        "[userstacks.md](userstacks.md).",
    ]
    lines += ["", f"![throughput]({pngName})", ""]
    return "\n".join(lines)


def chart(results, filename):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    configs = [c for c in CONFIGS if c.key in results]
    series = [
        ("forward", "1 stream →", "#1f77b4"),
        ("reverse", "1 stream ←", "#ff7f0e"),
        ("streams4", "4 streams →", "#7f7f7f"),
    ]
    width = 0.27
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    for index, (key, name, colour) in enumerate(series):
        xs, heights = [], []
        for position, config in enumerate(configs):
            value = bps(results, config.key, key)
            if value:
                xs.append(position + (index - 1) * width)
                heights.append(value / 1e9)
        bars = ax.bar(xs, heights, width, label=name, color=colour)
        for bar, height in zip(bars, heights, strict=True):
            text = f"{height:.2f}" if height >= 1 else f"{height * 1000:.0f}M"
            ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, height),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.1)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("throughput, Gbit/s (log scale)")
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels([f"{c.label}\n(MTU {c.mtu})" for c in configs], fontsize=8)
    ax.set_title("iperf3 through four namespaces: client — gw1 — gw2 — server")
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(filename)
    plt.close(fig)

"""
C{python -m ent status --metrics URL}: a short human summary of a running
ENT service, read from its metrics endpoint; no twistd, no debugger.

Exit code 0 when every leg is up, 1 when one is down, 2 when the metrics
cannot be read.
"""

import json
import sys
import time
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from ent import addVersionOption
from ent.cli import ArgumentParser, seconds
from ent.observability.stats import DROP_REASONS

UP, DEGRADED, UNREACHABLE = 0, 1, 2


class Scrape:
    """
    The samples of one scrape, looked up by name and labels.
    """

    def __init__(self, text):
        self.samples = []
        for family in text_string_to_metric_families(text):
            self.samples.extend(family.samples)

    def find(self, name, **labels):
        return [s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name, default=0, **labels):
        found = self.find(name, **labels)
        return found[0].value if found else default

    def labelValues(self, name, label):
        return sorted({s.labels[label] for s in self.find(name) if label in s.labels})


def metricsUrl(text):
    """
    C{HOST:PORT}, C{http://HOST:PORT} or a full URL; the path defaults to
    C{/metrics}.
    """
    if "://" not in text:
        text = f"http://{text}"
    scheme, _, rest = text.partition("://")
    if "/" not in rest:
        text = f"{text}/metrics"
    return text


def fetch(url, timeout):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode("utf-8")


def size(n):
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def count(n, word):
    n = int(n)
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def duration(seconds):
    seconds = int(max(seconds, 0))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    text = f"{hours}:{minutes:02}:{seconds:02}"
    return f"{days}d {text}" if days else text


# Legs listed one by one; beyond this many, a count.
MAX_LEGS_SHOWN = 50


def legsUrl(url):
    """
    The gateway's C{/legs} beside its metrics URL.
    """
    base, _, _ = url.rpartition("/")
    return f"{base}/legs"


def legLines(legs):
    """
    One line per gateway leg: side, peer, identity, addresses, time up,
    counters.
    """
    agents = sum(1 for leg in legs if leg["side"] == "agent")
    lines = [f"  {'legs':<18}{count(agents, 'agent')}, {count(len(legs) - agents, 'peer')}"]
    for leg in legs[:MAX_LEGS_SHOWN]:
        addresses = ", ".join(leg["addresses"])
        if leg["addressCount"] > len(leg["addresses"]):
            addresses += f" (+{leg['addressCount'] - len(leg['addresses'])})"
        lines.append(
            f"  {'':<18}{leg['side']:<6}{leg['peer']:<22}{leg['identity']:<16}{addresses or '-':<18}"
            f"  up {duration(leg['up'])}{', paused' if leg['paused'] else ''}; "
            f"in {count(leg['packetsReceived'], 'packet')} ({size(leg['bytesReceived'])}), "
            f"out {count(leg['packetsSent'], 'packet')} ({size(leg['bytesSent'])})"
            + (f"; evidence {leg['evidence']}" if leg.get("evidence", "-") != "-" else "")
        )
    if len(legs) > MAX_LEGS_SHOWN:
        lines.append(f"  {'':<18}… and {len(legs) - MAX_LEGS_SHOWN:,} more")
    return lines


def summary(scrape, url, now=None, legs=None):
    """
    The lines to print and the exit code; C{legs} is a gateway's C{/legs}.
    """
    now = time.time() if now is None else now
    info = scrape.find("ent_info")
    service = info[0].labels.get("service", "?") if info else "?"
    version = info[0].labels.get("version", "?") if info else "?"
    started = scrape.value("ent_start_time_seconds", None)
    uptime = f", up {duration(now - started)}" if started else ""
    lines = [f"{service} {version}{uptime} ({url})"]

    down = []
    for leg in scrape.labelValues("ent_leg_up", "leg"):
        up = scrape.value("ent_leg_up", leg=leg) == 1
        if not up:
            down.append(leg)
        lines.append(
            f"  {leg + ' leg':<12}{'UP' if up else 'DOWN':<6}"
            f"{count(scrape.value('ent_leg_connections_total', leg=leg), 'connection')}, "
            f"{count(scrape.value('ent_leg_reconnects_total', leg=leg), 'reconnect')}, "
            f"{count(scrape.value('ent_leg_connect_failures_total', leg=leg), 'failed connect')}"
        )
        lines.append(
            f"  {'':<18}received "
            f"{count(scrape.value('ent_leg_packets_total', leg=leg, direction='received'), 'packet')} "
            f"({size(scrape.value('ent_leg_bytes_total', leg=leg, direction='received'))}), sent "
            f"{count(scrape.value('ent_leg_packets_total', leg=leg, direction='sent'), 'packet')} "
            f"({size(scrape.value('ent_leg_bytes_total', leg=leg, direction='sent'))})"
        )

    if legs is not None:
        lines.extend(legLines(legs))

    if scrape.find("ent_tun_packets_total"):
        wakeups = scrape.value("ent_tun_read_batch_packets_count")
        read = scrape.value("ent_tun_packets_total", direction="read")
        perWakeup = f" ({read / wakeups:.1f} per wakeup)" if wakeups else ""
        state = "paused" if scrape.value("ent_tun_paused") == 1 else "reading"
        lines.append(
            f"  {'TUN':<12}{state:<8}read {count(read, 'packet')} "
            f"({size(scrape.value('ent_tun_bytes_total', direction='read'))}) in "
            f"{count(wakeups, 'wakeup')}{perWakeup}; wrote "
            f"{count(scrape.value('ent_tun_packets_total', direction='written'), 'packet')} "
            f"({size(scrape.value('ent_tun_bytes_total', direction='written'))})"
        )
        kernel = scrape.value("ent_tun_kernel_dropped_total")
        if kernel:
            lines.append(
                f"  {'':<18}{int(kernel):,} packets dropped by the kernel while the reader was paused (TUN queue full)"
            )

    contained = scrape.find("ent_tunnel_dropped_total")
    if contained:
        parts = ", ".join(f"{int(s.value):,} {s.labels.get('hook', '?')}" for s in contained)
        lines.append(
            f"  {'containment':<18}{int(sum(s.value for s in contained)):,} packets from the "
            f"tunnel dropped ({parts}): spoofed, not exposed or not a reply"
        )

    if scrape.find("ent_relay_connections_open"):
        lines.append(
            f"  {'relay':<18}{int(scrape.value('ent_relay_connections_open')):,} open "
            f"(limit {int(scrape.value('ent_relay_connection_limit')):,}), "
            f"{int(scrape.value('ent_relay_connections_accepted_total')):,} accepted, "
            f"{int(scrape.value('ent_relay_connections_refused_total')):,} refused, "
            f"{int(scrape.value('ent_relay_connect_failures_total')):,} target failures; "
            f"{size(scrape.value('ent_relay_bytes_total', direction='to_target'))} to target, "
            f"{size(scrape.value('ent_relay_bytes_total', direction='from_target'))} back"
        )

    handshakes = scrape.find("ent_handshake_failures_total")
    if handshakes:
        parts = ", ".join(f"{s.labels['leg']} {s.labels['kind']}: {int(s.value)}" for s in handshakes)
        lines.append(f"  {'handshakes':<18}{int(sum(s.value for s in handshakes))} failed ({parts})")

    drops = [s for s in scrape.find("ent_dropped_total") if s.value]
    if drops:
        lines.append(f"  {'drops':<18}{int(sum(s.value for s in drops)):,} in all")
        for s in sorted(drops, key=lambda s: -s.value):
            reason = s.labels.get("reason", "?")
            lines.append(
                f"  {'':<18}{int(s.value):>10,}  {s.labels.get('leg', '?'):<9}{reason}"
                f"  ({DROP_REASONS.get(reason, 'unknown reason')})"
            )
    else:
        lines.append(f"  {'drops':<18}none")

    if down:
        lines.append(f"status: DEGRADED (down: {', '.join(down)})")
        return lines, DEGRADED
    lines.append("status: UP")
    return lines, UP


def main(argv=None):
    parser = ArgumentParser(
        prog="python -m ent status", description="Summarise a running ENT service from its --metrics endpoint."
    )
    parser.add_argument(
        "--metrics", required=True, help="the service's metrics: HOST:PORT or URL (path /metrics by default)"
    )
    parser.add_argument("--timeout", type=seconds, default=5.0, help="seconds to wait for the scrape")
    addVersionOption(parser, "ent status")
    args = parser.parse_args(argv)
    url = metricsUrl(args.metrics)
    try:
        text = fetch(url, args.timeout)
        scrape = Scrape(text)
    except (OSError, urllib.error.URLError, ValueError) as e:
        reason = getattr(e, "reason", e)
        print(f"cannot read metrics from {url}: {reason}", file=sys.stderr)
        return UNREACHABLE
    if not scrape.find("ent_info"):
        print(f"{url} does not serve ENT metrics (no ent_info)", file=sys.stderr)
        return UNREACHABLE
    legs = None
    if scrape.find("ent_gateway_legs"):
        try:
            legs = json.loads(fetch(legsUrl(url), args.timeout))
        except (OSError, urllib.error.URLError, ValueError):
            legs = None  # an older gateway: the summary without its legs
    lines, code = summary(scrape, url, legs=legs)
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main())

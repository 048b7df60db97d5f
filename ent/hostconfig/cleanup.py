"""
C{python -m ent cleanup [--tun-name NAME]}: remove what a killed agent
left on this host.

An agent killed with SIGKILL leaves its nftables table and its policy
rules with an unreachable route behind them on purpose: until it restarts,
captured connections fail instead of leaving in plain by another route.
This is how an operator who does not mean to restart it lets them go by
the host's normal routes again.  A running agent's rules are never touched.

Exit code 0 when done (also when nothing was left), 1 when the named agent
is running or a step failed.
"""

import sys

from ent import addVersionOption
from ent.cli import ArgumentParser
from ent.errors import EntError


def leftBehind(records, interfaces):
    """
    The TUN names in C{records} whose agent is gone (its TUN is not in
    C{interfaces}).
    """
    return sorted(name for name in records if name not in interfaces)


def cleanUp(name, record, records):
    """
    Remove the policy rules and routes, then the table, of the agent on C{name}.
    """
    from ent.hostconfig import netfilter
    from ent.hostconfig.routing import removePolicy

    if record.routeTable is not None:
        removePolicy(record.routeTable, name, records)
    netfilter.remove(name)


def main(argv=None):
    parser = ArgumentParser(
        prog="python -m ent cleanup",
        description="Remove the nftables table, policy rules and routes that killed agents left.",
    )
    parser.add_argument("--tun-name", help="only the agent that ran on this TUN (default: every stopped one)")
    addVersionOption(parser, "ent cleanup")
    args = parser.parse_args(argv)
    from pyroute2 import IPRoute

    from ent.hostconfig import netfilter

    try:
        records = netfilter.records()
        with IPRoute() as ipr:
            interfaces = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        if args.tun_name is not None:
            if args.tun_name in interfaces and args.tun_name in records:
                print(f"the agent on {args.tun_name} is running: stop it (SIGTERM) instead", file=sys.stderr)
                return 1
            names = [args.tun_name] if args.tun_name in records else []
        else:
            names = leftBehind(records, interfaces)
        for name in names:
            cleanUp(name, records[name], records)
            print(f"removed the rules the agent on {name} left (nftables table {netfilter.tableName(name)})")
    except EntError as e:
        print(f"cleanup failed: {e}", file=sys.stderr)
        return 1
    if not names:
        print("nothing left by a stopped agent")
    return 0


if __name__ == "__main__":
    sys.exit(main())

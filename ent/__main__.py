"""
C{python -m ent COMMAND}: ENT's commands that run without twistd.
"""

import sys

from ent import versionLine
from ent.cli import usageExit

COMMANDS = {
    "status": ("ent.observability.status", "summarise a running service from its metrics"),
    "certs": ("ent.legs.certs", "make a small CA and certificates for a test deployment"),
    "demo": ("ent.testing.demo", "run the whole tunnel in network namespaces"),
    "cleanup": (
        "ent.hostconfig.cleanup",
        "remove the rules a killed agent left (they keep captured traffic from leaking)",
    ),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-V", "--version"):
        print(versionLine("ent"))
        return 0
    if argv and argv[0] in ("-h", "--help"):
        print("usage: python -m ent [-V|--version] COMMAND [options]\n\ncommands:")
        for name, (_, help) in COMMANDS.items():
            print(f"  {name:<8}{help}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}" if argv else "no command"
        usageExit("python -m ent", f"error: {given}: choose one of {', '.join(COMMANDS)}")
    from importlib import import_module

    return import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())

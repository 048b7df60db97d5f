"""
The host configuration steps that need pyroute2, run in a short-lived child
process: the long-running agent then never loads pyroute2 (about 10 MB of
resident memory, a fifth of the agent's).

    python -m ent.hostconfig STEP JSON

Errors come back as the L{ent.errors} class and message the child raised.
"""

import json
import subprocess
import sys

from ent import errors


def _tun(spec):
    from ent.tun import configureTun

    configureTun(spec["name"], spec["address"], spec["prefixlen"], spec["mtu"])


def _policyUp(spec):
    from ent.routing import PolicyRoute, installPolicy, removePolicy

    try:
        installPolicy(PolicyRoute(spec["name"], tuple(spec["ports"]), spec["table"]))
    except errors.EntError:
        removePolicy(spec["table"])
        raise


def _policyDown(spec):
    from ent.routing import removePolicy

    removePolicy(spec["table"])


STEPS = {"tun": _tun, "policy-up": _policyUp, "policy-down": _policyDown}


def run(step, **spec):
    """
    Run C{step} in a child process; raise what it raised.
    """
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ent.hostconfig", step, json.dumps(spec)],
            capture_output=True, text=True, timeout=30,
        )
    except subprocess.TimeoutExpired:
        raise errors.StartupError(f"host configuration step {step!r} timed out")
    if result.returncode == 0:
        return
    try:
        reported = json.loads(result.stdout)
        cls = getattr(errors, reported["error"])
        if not (isinstance(cls, type) and issubclass(cls, errors.EntError)):
            raise TypeError(cls)
        error = cls.__new__(cls)
        Exception.__init__(error, reported["message"])
    except (ValueError, KeyError, TypeError, AttributeError):
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        error = errors.StartupError(f"host configuration step {step!r} failed: {detail}")
    raise error


def main(argv=None):
    step, spec = (argv or sys.argv[1:])
    try:
        STEPS[step](json.loads(spec))
    except errors.EntError as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())

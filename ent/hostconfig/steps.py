"""
The host configuration steps that need pyroute2, run in a short-lived child
process: the long-running agent then never loads pyroute2 (about 10 MB of
resident memory, a fifth of the agent's).

    python -m ent.hostconfig.steps STEP JSON

A step's result comes back as JSON; errors come back as the L{ent.errors}
class and message the child raised.
"""

import json
import subprocess
import sys

from ent import errors


def _tun(spec):
    from ent.hostconfig.interface import configureTun

    configureTun(spec["name"], spec["address"], spec["prefixlen"], spec["mtu"])


def _policyPlan(spec):
    """
    Check the agent against the others on this host before it configures
    anything; for a capture, choose its table and rule priority.
    """
    from ent.hostconfig.netfilter import records
    from ent.hostconfig.routing import claimPolicy

    policy = claimPolicy(spec["name"], spec["ports"], spec["table"], spec["gatewayPort"], records())
    return policy and {"table": policy.table, "priority": policy.priority}


def _policyUp(spec):
    from ent.hostconfig.netfilter import records
    from ent.hostconfig.routing import Capture, PolicyRoute, installPolicy

    captures = tuple(Capture(*capture) for capture in spec.get("captures", ()))
    policy = PolicyRoute(spec["name"], tuple(spec["ports"]), spec["table"], spec["priority"], captures)
    installPolicy(policy, spec.get("gatewayPort"), records())


def _policyDown(spec):
    from ent.hostconfig.netfilter import records
    from ent.hostconfig.routing import removePolicy

    removePolicy(spec["table"], spec["name"], records())


STEPS = {"tun": _tun, "policy-plan": _policyPlan, "policy-up": _policyUp, "policy-down": _policyDown}


def run(step, **spec):
    """
    Run C{step} in a child process; return its result, raise what it raised.
    """
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ent.hostconfig.steps", step, json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        raise errors.StartupError(f"host configuration step {step!r} timed out")
    if result.returncode == 0:
        return json.loads(result.stdout or "null")
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
    step, spec = argv or sys.argv[1:]
    try:
        result = STEPS[step](json.loads(spec))
    except errors.EntError as e:
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        return 3
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

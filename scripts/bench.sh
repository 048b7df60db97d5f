#!/usr/bin/env bash
# Set up this machine for ENT, add what the benchmark needs (OpenVPN, strace, iperf3,
# socat from Debian; matplotlib from PyPI), then run the benchmark in
# network namespaces. Writes bench/results.md and bench/results.png, bench/latency.md, and
# bench/scale.md (one gateway with many agents), bench/rootless.md and
# bench/userstacks.md (the rootless agent, user-space stacks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh openvpn strace passt slirp4netns
# Editable, as setup.sh installs it, so the venv keeps using this work tree.
if ! .venv/bin/python -c "import matplotlib" 2>/dev/null; then
    .venv/bin/pip install -q -e '.[test,bench]'
fi
.venv/bin/python -m bench.run "$@"
# Latency once more, five rounds of kernel, ENT and OpenVPN in turn: one
# run's figures move with whatever else the machine does (bench/latency.md).
.venv/bin/python -m bench.run --latency --rounds 5 --out bench
# The rootless agent (--stack user) beside the TUN agent at 0, 5 and 20 ms of
# added round trip, and libslirp against pasta (bench/rootless.md,
# bench/userstacks.md).
.venv/bin/python -m bench.rootless
.venv/bin/python -m bench.userstacks
# The scale rows: one gateway with 1, 100 and 1000 agents, and the routing
# cost against main's one-to-one relay (bench/scale.md).
exec .venv/bin/python -m bench.scale

#!/usr/bin/env bash
# Set up this machine for ENT, add what the benchmark needs (OpenVPN, iperf3,
# socat from Debian; matplotlib from PyPI), then run the benchmark in
# network namespaces. Writes bench/results.md and bench/results.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh openvpn
# Editable, as setup.sh installs it, so the venv keeps using this work tree.
if ! .venv/bin/python -c "import matplotlib" 2>/dev/null; then
    .venv/bin/pip install -q -e '.[test,bench]'
fi
exec .venv/bin/python -m bench.run "$@"

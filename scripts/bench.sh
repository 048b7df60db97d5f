#!/usr/bin/env bash
# Set up this machine for ENT, add what the benchmark needs (OpenVPN, iperf3,
# socat from Debian; matplotlib from PyPI), then run the benchmark in
# network namespaces. Writes bench/results.md and bench/results.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

packages=(openvpn iperf3 socat iputils-ping iproute2)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bench: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Editable, as setup.sh installs it, so the venv keeps using this work tree.
if ! .venv/bin/python -c "import matplotlib" 2>/dev/null; then
    .venv/bin/pip install -q -e '.[test,bench]'
fi
exec .venv/bin/python -m bench.run "$@"

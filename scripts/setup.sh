#!/usr/bin/env bash
# Everything ENT needs on a fresh Debian machine, as root: system packages,
# a virtual environment in .venv, and ENT installed into it (editable).
# Arguments name further Debian packages to install (the benchmark's).
# Also builds the real librats_tls the rats-tls tests run against
# (scripts/ratstls-build.sh; cmake and the dev packages below are for it).
# libslirp0 is the user-space TCP/IP stack of the rootless agent (--stack user).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(nftables iproute2 iputils-ping procps gcc libssl-dev python3 python3-venv python3-dev make iperf3 socat
          cmake patch pkg-config libcbor-dev libcurl4-openssl-dev libslirp0 "$@")
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The virtual environment is built on the distribution's Python, which Debian
# compiles with profile-guided and link-time optimisation: every packet costs
# each ENT process a pass through the interpreter, and a plain build (as
# pyenv makes by default) needs about a third more CPU for it (README,
# "Latency"). ENT_PYTHON names another interpreter.
python=${ENT_PYTHON:-/usr/bin/python3}
if [ -x .venv/bin/python ] && ! grep -qx "executable = $(readlink -f "$python")" .venv/pyvenv.cfg; then
    echo "setup: .venv was built on another Python; rebuilding it on $python"
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
if ! .venv/bin/python -c "import ent, twisted, pyroute2, hypothesis" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.ent-installed ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    touch .venv/.ent-installed
fi

bash scripts/ratstls-build.sh >/dev/null

#!/usr/bin/env bash
# Set up this machine for ENT, then run the whole test suite (as root: the
# privileged tests build network namespaces and must not be skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m twisted.trial "${@:-tests}"

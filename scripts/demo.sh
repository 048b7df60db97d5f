#!/usr/bin/env bash
# Set up this machine for ENT, then run the demo in network namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m ent demo "$@"

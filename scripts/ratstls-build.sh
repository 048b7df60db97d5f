#!/usr/bin/env bash
# Build the real upstream librats_tls (host mode, both released layouts) that
# scripts/test.sh runs the rats-tls tests against, into .build/rats-tls/
# (git-ignored), with ../shared/rats-tls/build.sh; only what is missing or
# out of date (a stamp records the sources and the output directory: the
# plugin directories are compiled into each library).
#   scripts/ratstls-build.sh          # prints NAME=PATH for ed65 and head
# $ENT_RATS_TLS_SHARED names another copy of shared/rats-tls (a worktree
# elsewhere).  Without one it builds nothing and says so; test.sh then fails
# the real-library runs under CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${ENT_RATS_TLS_SHARED:-../shared/rats-tls}
out=$PWD/.build/rats-tls

if [ ! -f "$shared/build.sh" ]; then
    echo "ratstls-build: $shared/build.sh not found: the real librats_tls cannot be built" >&2
    exit 0
fi
for n in ed65 head; do
    lib=$out/$n/lib/rats-tls/librats_tls.so
    stamp=$out/$n.stamp
    want=$( (echo "$out"; cat "$shared/build.sh" "$shared/rats-tls-$n.tar.gz" "$shared"/patches/*) | sha256sum)
    if [ ! -f "$lib" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "ratstls-build: building the real librats_tls $n (about a minute)" >&2
        rm -f "$stamp"
        bash "$shared/build.sh" "$out" "$n" >/dev/null
        echo "$want" >"$stamp"
    fi
    echo "$n=$lib"
done

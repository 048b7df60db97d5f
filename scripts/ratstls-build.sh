#!/usr/bin/env bash
# Build the real upstream librats_tls (host mode, both released layouts) that
# scripts/test.sh runs the rats-tls tests against, into .build/rats-tls/
# (git-ignored), with ../shared/rats-tls/build.sh; only what is missing or
# out of date (a stamp records the sources and the output directory: the
# plugin directories are compiled into each library).  Beside each library
# it builds the test-only ent_sim attester and verifier plugins
# (tests/ratstls_sim), compiled against that library's own headers (taken
# from its tarball), with a stamp of their own.
#   scripts/ratstls-build.sh          # prints NAME=PATH for ed65 and head
# $ENT_RATS_TLS_SHARED names another copy of shared/rats-tls (a worktree
# elsewhere).  Without one it builds nothing and says so; test.sh then fails
# the real-library runs under CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${ENT_RATS_TLS_SHARED:-../shared/rats-tls}
out=$PWD/.build/rats-tls
sim=$PWD/tests/ratstls_sim
tmp=

if [ ! -f "$shared/build.sh" ]; then
    echo "ratstls-build: $shared/build.sh not found: the real librats_tls cannot be built" >&2
    exit 0
fi
shared=$(cd "$shared" && pwd)

# build_sim NAME LIBDIR: the ent_sim plugins into LIBDIR/{attesters,verifiers}.
build_sim() {
    local n=$1 libdir=$2 hdr defs=()
    [ -n "${tmp:-}" ] || { tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; }
    hdr=$tmp/$n
    mkdir -p "$hdr"
    tar -xzf "$shared/rats-tls-$n.tar.gz" -C "$hdr" --strip-components=1 --wildcards '*/src/include/*'
    [ "$n" = ed65 ] || defs=(-DENT_SIM_V2025)
    for kind in attester verifier; do
        gcc -std=gnu11 -O2 -Wall -Wextra -fPIC -shared "${defs[@]}" \
            -I"$hdr/src/include" -I"$shared/sgx-headers" -I"$sim" \
            -o "$libdir/${kind}s/lib${kind}_ent_sim.so.tmp" "$sim/$kind.c" \
            -L"$libdir" -Wl,-rpath,"$libdir" -lrats_tls -lcrypto
        mv -f "$libdir/${kind}s/lib${kind}_ent_sim.so.tmp" "$libdir/${kind}s/lib${kind}_ent_sim.so"
    done
}

for n in ed65 head; do
    libdir=$out/$n/lib/rats-tls
    lib=$libdir/librats_tls.so
    stamp=$out/$n.stamp
    want=$( (echo "$out"; cat "$shared/build.sh" "$shared/rats-tls-$n.tar.gz" "$shared"/patches/*) | sha256sum)
    if [ ! -f "$lib" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "ratstls-build: building the real librats_tls $n (about a minute)" >&2
        rm -f "$stamp" "$out/$n.sim.stamp"
        bash "$shared/build.sh" "$out" "$n" >/dev/null
        echo "$want" >"$stamp"
    fi
    simstamp=$out/$n.sim.stamp
    simwant=$( (echo "$want"; cat "$sim"/*.c "$sim"/*.h "$shared"/sgx-headers/* "$0") | sha256sum)
    if [ ! -f "$libdir/attesters/libattester_ent_sim.so" ] || [ ! -f "$libdir/verifiers/libverifier_ent_sim.so" ] ||
        [ "$(cat "$simstamp" 2>/dev/null)" != "$simwant" ]; then
        echo "ratstls-build: building the ent_sim plugins for $n" >&2
        rm -f "$simstamp"
        build_sim "$n" "$libdir"
        echo "$simwant" >"$simstamp"
    fi
    echo "$n=$lib"
done

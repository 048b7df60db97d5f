#!/bin/sh
# Build the mock librats_tls.so for ENT's tests.
#
#   tests/ratstls_mock/build.sh OUTDIR [2025|2022]
#
# Produces OUTDIR/librats_tls.so (struct layout v2025 by default, or v2022)
# whose load-time constructor requires OUTDIR/rats-tls/{crypto-wrappers,
# tls-wrappers,attesters,verifiers}, and creates those directories with a
# marker file in each.  Needs gcc and the OpenSSL 3 headers (libssl-dev).
set -eu

usage() {
	echo "usage: $0 OUTDIR [2025|2022]" >&2
	exit 2
}

[ $# -ge 1 ] && [ $# -le 2 ] || usage
layout=${2:-2025}
case $layout in
2022 | 2025) ;;
*) usage ;;
esac

here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
case $out in
*\"* | *\\*)
	echo "$0: OUTDIR must not contain quotes or backslashes: $out" >&2
	exit 2
	;;
esac

CC=${CC:-gcc}
plugins="$out/rats-tls"

$CC -std=gnu11 -O2 -g -Wall -Wextra -fPIC -shared -fvisibility=hidden \
	-DRATS_LAYOUT_$layout "-DRATS_PLUGIN_DIR=\"$plugins\"" \
	-Wl,-soname,librats_tls.so -Wl,-z,defs \
	-o "$out/librats_tls.so.tmp" "$here/rats_tls_mock.c" -lssl -lcrypto -lpthread
mv -f "$out/librats_tls.so.tmp" "$out/librats_tls.so"

for kind in crypto-wrappers tls-wrappers attesters verifiers; do
	mkdir -p "$plugins/$kind"
	echo "placeholder: the mock librats_tls.so only checks that this directory is not empty" \
		>"$plugins/$kind/MOCK-PLUGIN"
done
echo "built $out/librats_tls.so (layout v$layout, plugins in $plugins)"

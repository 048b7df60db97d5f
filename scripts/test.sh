#!/usr/bin/env bash
# Set up this machine for ENT, then run the whole test suite (as root: the
# privileged tests build network namespaces and must not be skipped).
# The whole suite runs against the mock librats_tls; after it, the rats-tls
# tests run again against each real build (scripts/ratstls-build.sh), one
# trial process per build: two builds in one process kill it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
status=0
.venv/bin/python -m twisted.trial "${@:-tests}" || status=$?
[ $# -eq 0 ] || exit $status

libs=$(bash scripts/ratstls-build.sh)
if [ -z "$libs" ]; then
    if [ "${CI:-}" != true ]; then
        echo "test: no ../shared/rats-tls: the rats-tls tests ran against the mock only" >&2
        exit $status
    fi
    # CI must not pass without the real libraries: run against where they
    # should be, which fails every test with a message saying so.
    libs="ed65=$PWD/.build/rats-tls/ed65/lib/rats-tls/librats_tls.so
head=$PWD/.build/rats-tls/head/lib/rats-tls/librats_tls.so"
fi
for entry in $libs; do
    name=${entry%%=*}
    layout=v2025
    [ "$name" != ed65 ] || layout=v2022
    echo "test: the rats-tls tests against the real librats_tls $name ($layout)"
    ENT_TEST_RATS_TLS_LIB=${entry#*=} ENT_TEST_RATS_TLS_LAYOUT=$layout \
        .venv/bin/python -m twisted.trial --temp-directory="_trial_temp.rats-$name" \
        tests.test_ratstls_binding tests.test_ratstransport tests.test_ratstls_tunnel \
        tests.test_ratstls_stress tests.test_ratstls_evidence tests.test_ratsaccept \
        tests.test_policy_attested || status=1
done
exit $status

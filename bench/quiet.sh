#!/usr/bin/env bash
# The figures the per-unit and workers goals want from a quiet machine (bench/README.md), in one
# run of a few minutes (with 3 rounds, 2 min 20 s on the shared 2-core machine; 5 rounds here):
# each benchmark's output goes to OUT/NAME.txt, a line per benchmark to the terminal. Runs
# where DCMTK is not installed (the bulk C-STORE rows are left out: --megabytes 0), with
# python3 holding medgate's dependencies and haproxy on PATH.
#
#   bash bench/quiet.sh OUT            the figures
#   bash bench/quiet.sh OUT smoke      each benchmark once, small (checks the script, not speed)
#
# Each benchmark is bounded (timeout), so that one that hangs costs its bound, not the run;
# timeout's SIGTERM stops what it started too (bench.common.Lab), so the next one runs alone.
set -uo pipefail
out=${1:?usage: bash bench/quiet.sh OUT [smoke]}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if [ "${2:-}" = smoke ]; then
    n=1 rounds=1 limit=300
else
    n=10 rounds=5 limit=180
fi

run() {
    local name=$1
    shift
    echo "== $name: python3 $*"
    local started=$SECONDS
    timeout "$limit" python3 "$@" >"$out/$name.txt" 2>&1
    echo "   exit $? after $((SECONDS - started)) s; $(grep -h -E 'medgate / lean|medgate / haproxy' "$out/$name.txt" | tr -s ' ' | paste -sd ';' -)"
}

run hl7 bench/hl7.py --messages $((300 * n)) --connections 20 --rounds $rounds --floor  # 1 and 20
run hl7-64 bench/hl7.py --messages $((640 * n)) --connections 64 --rounds $rounds --floor \
    --workers 1,2,4,8
run tls bench/tls.py --megabytes 0 --messages $((200 * n)) --rounds $rounds --floor
run dicom bench/dicom.py --megabytes 0 --associations $((60 * n)) --clients 3 --rounds $rounds \
    --floor --workers 1,2,4,8
run xds bench/xds.py --queries $((200 * n)) --connections 4 --megabytes $((2 * n)) \
    --rounds $rounds --floor

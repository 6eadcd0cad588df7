#!/usr/bin/env bash
# Compares two builds of bench-engine on this machine, alternating runs so that both see the
# same noise: prints, per run, the three ratios issue #21 asks for (durable ingest ÷ skeleton,
# command round trip ÷ two-commit floor, 64 in flight ÷ the floor's 64 in flight).
#
#   git worktree add /tmp/before <rev>
#   (cd /tmp/before && CARGO_TARGET_DIR=/tmp/before-target cargo build --release -p callbus-tests --bin bench-engine)
#   cargo build --release -p callbus-tests --bin bench-engine
#   bash scripts/ab-bench-engine.sh /tmp/before-target/release/bench-engine target/release/bench-engine [runs] [--quick]
set -euo pipefail
a=$1
b=$2
runs=${3:-5}
mode=${4:---quick}
out=$(mktemp -d)
for i in $(seq 1 "$runs"); do
    for bin in "$a" "$b"; do
        "$bin" $mode 2>/dev/null > "$out/run.log"
        awk -F'|' -v b="$bin" '
            /engine \/ skeleton/ { ing = $3 }
            /round trip to hold_requested, callbus up, p50/ { rt = $3 }
            /hold\/unhold commands completed with 64 in flight, callbus up/ { par = $3 }
            /floor of a command round trip with two commits \(request/ { fl = $3 }
            /floor with two commits, 64 in flight/ { fp = $3 }
            END { printf "%s  ingest %.2f  round trip %.2fx (%.3f ms)  64 in flight %.2f\n", b, ing, rt / fl, rt, par / fp }
        ' "$out/run.log"
    done
done
rm -rf "$out"

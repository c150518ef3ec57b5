#!/usr/bin/env bash
# A/B of the foreground read tail under writeback between tiercache-perf builds (the read
# rows of bench-migration.sh, alternating builds round by round so each pair shares its
# minutes of this noisy machine). Per round and build: fill 1 GiB of dirty data into a
# fresh set, QD1 4K randread for 5 s with writeback idle, with the rate controller, and
# during a drain (--drain-during); prints each run's p99 ratio to its own idle run, the
# blocks written back, and the tail guard's state.
#
# Usage: scripts/ab-read-tail.sh ROUNDS NAME=PATH/TO/tiercache-perf [NAME=... ...]
# Env:   BENCH_DIR (default /work/tc-migbench; not tmpfs), MODES ("rate drain"), OUT.
set -euo pipefail
ROUNDS=${1:?rounds}
shift
[[ $# -ge 1 ]] || { echo "usage: $0 ROUNDS NAME=PERF_BINARY ..." >&2; exit 2; }
D=${BENCH_DIR:-/work/tc-migbench}
MODES=${MODES:-"rate drain"}
CACHE=$D/mig-cache.dat
BACKING=$D/mig-backing.dat
OUT=${OUT:-$D/ab-read-tail-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$D" "$OUT"
echo "results in $OUT" >&2
[[ -f $CACHE ]] || dd if=/dev/zero of="$CACHE" bs=1M count=2048 oflag=direct status=none
fresh() { rm -f "$1" && sync && sleep 3 && truncate -s "$2" "$1"; }
for r in $(seq 1 "$ROUNDS"); do
    for nb in "$@"; do
        name=${nb%%=*}
        perf=${nb#*=}
        run() { # label, args...
            local label=$1
            shift
            timeout 600 taskset -c 0 "$perf" --cores 1 --json "$@" >"$OUT/$name-$label-r$r.json"
        }
        common=(--cache "$CACHE" --backing "$BACKING" --writeback-low-pct 1 -w randread -o 4k -q 1 -t 5 --seed "$r")
        fresh "$BACKING" 1025M
        run fill --cache "$CACHE" --backing "$BACKING" --cache-format --seq-cutoff 0 --writeback-low-pct 1 \
            --writeback-percent 100 -w write -o 128k -q 32 --io-count 8192 --seed "$r"
        run idle "${common[@]}" --migration-core 0 --writeback-percent 100
        for m in $MODES; do
            case $m in
            rate) run rate "${common[@]}" --migration-core 0 ;;
            drain) run drain "${common[@]}" --migration-core 0 --drain-during ;;
            *) echo "unknown mode $m" >&2; exit 2 ;;
            esac
        done
        python3 - "$OUT" "$name" "$r" "$MODES" <<'PY'
import json, sys
out, name, r, modes = sys.argv[1:]
load = lambda k: json.load(open(f"{out}/{name}-{k}-r{r}.json"))
idle = load("idle")["total"]["latency_us"]["p99"]
for m in modes.split():
    d = load(m)
    p99 = d["total"]["latency_us"]["p99"]
    wb = d["cache"]["counters"]["writeback_blocks"]
    g = d["cache"].get("tail_guard") or {}
    print(f"{name} round {r} {m}: p99 {p99:.1f} / idle {idle:.1f} = {p99 / idle:.2f}x; "
          f"{wb:,} blocks written back ({wb * 4 / 1024 / d['elapsed_s']:.1f} MiB/s); "
          f"guard baseline {g.get('baseline_read_p99_us')} us over {g.get('intervals_baseline')} intervals, window {g.get('window')}, pace {g.get('pace_us')} us")
PY
    done
done | tee "$OUT/summary.txt"

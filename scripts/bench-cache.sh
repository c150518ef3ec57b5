#!/usr/bin/env bash
# Cache engine benchmarks: tiercache-perf on a cached bdev (cache set on a 2 GiB file, backing
# file behind a delay bdev standing in for an HDD) vs fio on the raw cache file.
#
#   (a) 4K randwrite QD32, writeback: a burst that fits the log (IO_COUNT writes, below the
#       writeback watermark) and a sustained run of RUNTIME s (the log fills; writeback to
#       the 5 ms backing device sets the pace) vs fio --rw=randwrite on the raw cache file.
#   (b) 4K randread of cached data: a 1 GiB volume written sequentially once, then randread
#       over it (the set is loaded from the file each run) vs fio --rw=randread on the file.
#   (c) FLUSH-heavy: 4K randwrite QD32 with a FLUSH every 8 writes (FLUSH_IO_COUNT writes)
#       vs fio --fdatasync=8 on the raw cache file (same number of writes).
#   (d) index RAM per cached block (from the runs' JSON) and recovery time of a full 1 GiB
#       cache (engine/examples/recovery_bench.rs).
#
# I/O runs on core $CORE, main/helper threads on $MAIN_CORE (taskset). Tools alternate
# within each round (reversed on even rounds); medians of $RUNS with min-max.
#
# Environment: BENCH_DIR (default /work/tc-bench; not tmpfs), RUNTIME (s, default 8), RUNS
# (default 3), IO_COUNT (default 300000), FLUSH_IO_COUNT (default 150000), CORE, MAIN_CORE,
# BACKING_DELAY (default 5000,20000), CARGO_TARGET_DIR (default /work/target-cachebench),
# SKIP_BUILD=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="${BENCH_DIR:-/work/tc-bench}"
RUNTIME="${RUNTIME:-8}"
RUNS="${RUNS:-3}"
IO_COUNT="${IO_COUNT:-300000}"
FLUSH_IO_COUNT="${FLUSH_IO_COUNT:-150000}"
CORE="${CORE:-1}"
MAIN_CORE="${MAIN_CORE:-0}"
BACKING_DELAY="${BACKING_DELAY:-5000,20000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-cachebench}"
PERF="$CARGO_TARGET_DIR/release/tiercache-perf"
RECOVERY="$CARGO_TARGET_DIR/release/examples/recovery_bench"
CACHE="$BENCH_DIR/cache.dat"
BACKING_BIG="$BENCH_DIR/backing-16g.dat"
BACKING_1G="$BENCH_DIR/backing-1g.dat"
CACHE_BYTES=$((2 * 1024 * 1024 * 1024))

log() { printf '%s\n' "$*" >&2; }

if ! command -v fio >/dev/null 2>&1; then
    log "installing fio"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null
fi
for tool in taskset python3; do
    command -v "$tool" >/dev/null 2>&1 || { log "missing $tool"; exit 1; }
done

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    (cd "$ROOT" && cargo build --release -q -p tiercache-perf &&
        cargo build --release -q -p tiercache-engine --example recovery_bench)
fi

mkdir -p "$BENCH_DIR"
FSTYPE="$(df --output=fstype "$BENCH_DIR" | tail -1 | tr -d ' ')"
if [[ "$FSTYPE" == tmpfs || "$FSTYPE" == ramfs ]]; then
    log "$BENCH_DIR is on $FSTYPE: pick a directory on a real disk (BENCH_DIR=...)"
    exit 1
fi
if [[ ! -f "$CACHE" || "$(stat -c %s "$CACHE")" != "$CACHE_BYTES" ]]; then
    log "writing $CACHE (2 GiB, fully allocated: fio and the cache see written extents only)"
    dd if=/dev/zero of="$CACHE" bs=1M count=2048 oflag=direct status=none
fi
# Backing files are sparse: only the header and writeback touch them. A formatted set
# refuses a backing file whose header names another set, so each --cache-format run gets a
# fresh one.
fresh() { rm -f "$1" && truncate -s "$2" "$1"; }

OUT="${OUT:-$BENCH_DIR/results-cache-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
log "results in $OUT"

{
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "kernel: $(uname -r)"
    echo "filesystem: $FSTYPE on $(df --output=source "$BENCH_DIR" | tail -1) ($BENCH_DIR)"
    echo "fio: $(fio --version)"
    echo "commit: $(cd "$ROOT" && git rev-parse --short HEAD) (+ working tree)"
    echo "runs: $RUNS; runtime ${RUNTIME}s; burst $IO_COUNT writes; flush-heavy $FLUSH_IO_COUNT writes; backing delay $BACKING_DELAY us"
    echo "I/O on core $CORE, main threads on core $MAIN_CORE"
} >"$OUT/machine.txt"

CACHED=(--cache "$CACHE" --backing-delay-us "$BACKING_DELAY")

tc_run() { # name, args...
    local name="$1"
    shift
    timeout 300 taskset -c "$MAIN_CORE" "$PERF" --cores "$CORE" --json "$@" >"$OUT/$name.json"
}

fio_run() { # name, args...
    local name="$1"
    shift
    timeout 300 taskset -c "$MAIN_CORE" fio --name=job --cpus_allowed="$CORE" --numjobs=1 \
        --norandommap --randrepeat=0 --lat_percentiles=1 --output-format=json \
        --filename="$CACHE" --ioengine=io_uring --direct=1 --bs=4k --iodepth=32 "$@" >"$OUT/$name.json"
}

# (a) + (c): every tiercache run formats the set (fio overwrites the file in between).
# SKIP_WRITES=1 (with OUT=an earlier results directory) redoes only (b) and (d).
for run in $(seq 1 "$RUNS"); do
    [[ "${SKIP_WRITES:-0}" == 1 ]] && break
    order=(tc fio)
    if ((run % 2 == 0)); then order=(fio tc); fi
    for test in burst sustained flush; do
        log "run $run: randwrite $test"
        for tool in "${order[@]}"; do
            case $tool/$test in
            tc/*) fresh "$BACKING_BIG" 16G ;;&
            tc/burst) tc_run "tc-burst-run$run" "${CACHED[@]}" --backing "$BACKING_BIG" --cache-format \
                -w randwrite -o 4k -q 32 --io-count "$IO_COUNT" --seed "$run" ;;
            fio/burst) fio_run "fio-burst-run$run" --rw=randwrite --number_ios="$IO_COUNT" ;;
            tc/sustained) tc_run "tc-sustained-run$run" "${CACHED[@]}" --backing "$BACKING_BIG" --cache-format \
                -w randwrite -o 4k -q 32 -t "$RUNTIME" --seed "$run" ;;
            fio/sustained) fio_run "fio-sustained-run$run" --rw=randwrite --time_based --runtime="$RUNTIME" ;;
            tc/flush) tc_run "tc-flush-run$run" "${CACHED[@]}" --backing "$BACKING_BIG" --cache-format \
                -w randwrite -o 4k -q 32 --flush-every 8 --io-count "$FLUSH_IO_COUNT" --seed "$run" ;;
            fio/flush) fio_run "fio-flush-run$run" --rw=randwrite --fdatasync=8 --number_ios="$FLUSH_IO_COUNT" ;;
            esac
        done
    done
done

# (b) Fill the 1 GiB volume once: every block written exactly once by 32 slots each walking
# its own region (verify's write pass; 32 interleaved streams, so the engine's sequential
# cutoff does not send them around the cache; < 75% of the log, so no writeback), then each
# round loads the set and randreads it.
log "filling the 1 GiB cached volume"
fresh "$BACKING_1G" 1G
tc_run "tc-fill" "${CACHED[@]}" --backing "$BACKING_1G" --cache-format -w verify --verify-pass write \
    -o 4k -q 32 --io-count $(((1024 - 1) * 256)) --seed 0
for run in $(seq 1 "$RUNS"); do
    log "run $run: randread of cached data"
    order=(tc fio)
    if ((run % 2 == 0)); then order=(fio tc); fi
    for tool in "${order[@]}"; do
        case $tool in
        tc) tc_run "tc-read-run$run" "${CACHED[@]}" --backing "$BACKING_1G" -w randread -o 4k -q 32 \
            -t "$RUNTIME" --seed "$run" ;;
        fio) fio_run "fio-read-run$run" --rw=randread --time_based --runtime="$RUNTIME" ;;
        esac
    done
done

# (d) Recovery of a full 1 GiB cache.
for run in $(seq 1 "$RUNS"); do
    log "run $run: recovery of a full 1 GiB cache"
    timeout 600 taskset -c "$MAIN_CORE" "$RECOVERY" --dir "$BENCH_DIR" --cache-mib 1024 --segment-kib 512 \
        --seed "$run" --core "$CORE" --json >"$OUT/recovery-run$run.json"
done

python3 - "$OUT" "$RUNS" <<'PY' | tee "$OUT/summary.md"
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])

def load(name):
    with open(f"{out}/{name}.json") as f:
        return json.load(f)

def tc(name):
    d = load(name)
    t = d["total"]
    return {"iops": t["iops"], "avg": t["latency_us"]["avg"], "p99": t["latency_us"]["p99"],
            "errors": t["errors"], "cache": d.get("cache"), "flush": d["flush"]}

def fio(name, op):
    j = load(name)["jobs"][0][op]
    lat = j["lat_ns"]
    return {"iops": j["iops"], "avg": lat["mean"] / 1000, "p99": lat["percentile"]["99.000000"] / 1000}

def med(xs):
    return statistics.median(xs), min(xs), max(xs)

def fmt(xs, digits=0):
    m, lo, hi = med(xs)
    f = f"{{:,.{digits}f}}"
    return f"{f.format(m)} ({f.format(lo)}–{f.format(hi)})"

rows = []
tests = [("4K randwrite QD32, burst (fits the log)", "burst", "write"),
         ("4K randwrite QD32, sustained (log fills, writeback)", "sustained", "write"),
         ("4K randwrite QD32, FLUSH every 8", "flush", "write"),
         ("4K randread QD32 of cached data", "read", "read")]
print("| test | tool | IOPS | avg lat µs | p99 lat µs | IOPS vs fio |")
print("|---|---|---|---|---|---|")
notes = []
for label, key, op in tests:
    t = [tc(f"tc-{key}-run{r}") for r in range(1, runs + 1)]
    f = [fio(f"fio-{key}-run{r}", op) for r in range(1, runs + 1)]
    ratio = statistics.median([x["iops"] for x in t]) / statistics.median([x["iops"] for x in f])
    print(f"| {label} | tiercache-perf (cached bdev) | {fmt([x['iops'] for x in t])} | {fmt([x['avg'] for x in t], 1)} | {fmt([x['p99'] for x in t], 1)} | **{ratio:.2f}×** |")
    print(f"| {label} | fio io_uring direct, raw cache file | {fmt([x['iops'] for x in f])} | {fmt([x['avg'] for x in f], 1)} | {fmt([x['p99'] for x in f], 1)} | 1.00× |")
    for r, x in enumerate(t, 1):
        c = x["cache"]["counters"]
        notes.append(f"{key} run {r}: errors {x['errors']}, hits {c['read_hit_blocks']}, misses {c['read_miss_blocks']}, "
                     f"segments written {c['segments_written']} ({c['blocks_per_segment_write']} blocks each), "
                     f"writeback blocks {c['writeback_blocks']}, flushes {x['flush']['count']} (avg {x['flush']['avg_us']} µs), "
                     f"setup {x['cache']['setup_s']} s ({x['cache']['opened_by']}), free segments after {x['cache']['free_segments']}")
print()
ram = tc("tc-read-run1")["cache"]["index_ram"]
print(f"Index RAM (2 GiB cache, 512 KiB segments): {ram['slot_arrays_bytes'] + ram['segment_table_bytes']:,} bytes for {ram['slots']:,} slots = "
      f"**{ram['bytes_per_slot']:.2f} B per slot = {ram['bytes_per_cached_4k']:.2f} B per cached 4 KiB block**")
rec = [load(f"recovery-run{r}") for r in range(1, runs + 1)]
print()
print("| recovery of a full 1 GiB cache | median (min–max) |")
print("|---|---|")
print(f"| `cache::load` seconds | {fmt([x['load']['secs'] for x in rec], 3)} |")
print(f"| segments replayed | {fmt([x['load']['segments_replayed'] for x in rec])} of {rec[0]['nr_segments']} |")
print(f"| records replayed | {fmt([x['load']['records_replayed'] for x in rec])} |")
print(f"| log fill before the load | {fmt([x['fill']['log_fill_pct'] for x in rec], 1)} % |")
b = [x["breakdown"] for x in rec]
print(f"| header reads, one at a time (as load does) / QD16 | {fmt([x['header_reads_qd1_secs'] for x in b], 3)} / {fmt([x['header_reads_qd16_secs'] for x in b], 3)} s |")
print(f"| whole-segment reads, one at a time (as load does) / QD16 | {fmt([x['segment_reads_qd1_secs'] for x in b], 3)} / {fmt([x['segment_reads_qd16_secs'] for x in b], 3)} s |")
print(f"| crc32c of the same bytes in memory | {fmt([x['crc32c_per_4k_block_secs'] for x in b], 3)} s |")
print(f"| index RAM per cached 4 KiB block (1 GiB set) | {rec[0]['index_ram']['bytes_per_cached_4k_block']:.2f} B |")
print()
print("Per-run cache counters:")
print()
for n in notes:
    print(f"- {n}")
PY

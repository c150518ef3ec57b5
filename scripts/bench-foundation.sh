#!/usr/bin/env bash
# Foundation benchmarks: tiercache-perf vs fio on the same file, core and settings.
#
#   (a) 4K randread / randwrite at QD 1 and QD 32 on one 2 GiB file (O_DIRECT, io_uring):
#       tiercache-perf --uring (busy-poll, the default) and tiercache-perf --no-busy-poll
#       --idle-threshold-us 0 (sleeps in io_uring_enter like fio) vs fio --ioengine=io_uring
#       --direct=1.
#   (b) 4K randread QD 128 on a null device: tiercache-perf --null vs fio --ioengine=null.
#   (c) CPU used by an idle reactor set over 10 s (`tiercache serve` if it exists, else
#       `tiercache-perf --idle-check 10`).
#
# Every measured process runs its I/O on core $CORE (default 1); main/helper threads are
# kept on $MAIN_CORE (default 0) with taskset. Runs are sequential (never co-run) and the
# tools alternate within each round, so slow drift of a noisy machine hits both alike.
# Reports the median of $RUNS runs with min-max, and the ratios vs fio.
#
# Environment: BENCH_DIR (default /work/tc-bench; must not be tmpfs), RUNTIME (s, default 8),
# RUNS (default 3), CORE, MAIN_CORE, CARGO_TARGET_DIR (default /work/target-perf),
# SKIP_BUILD=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="${BENCH_DIR:-/work/tc-bench}"
RUNTIME="${RUNTIME:-8}"
RUNS="${RUNS:-3}"
CORE="${CORE:-1}"
MAIN_CORE="${MAIN_CORE:-0}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-perf}"
PERF="$CARGO_TARGET_DIR/release/tiercache-perf"
FILE="$BENCH_DIR/foundation.dat"
FILE_BYTES=$((2 * 1024 * 1024 * 1024))

log() { printf '%s\n' "$*" >&2; }

if ! command -v fio >/dev/null 2>&1; then
    log "installing fio"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null
fi
for tool in taskset python3; do
    command -v "$tool" >/dev/null 2>&1 || { log "missing $tool"; exit 1; }
done

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    (cd "$ROOT" && cargo build --release -q -p tiercache-perf)
fi

mkdir -p "$BENCH_DIR"
FSTYPE="$(df --output=fstype "$BENCH_DIR" | tail -1 | tr -d ' ')"
if [[ "$FSTYPE" == tmpfs || "$FSTYPE" == ramfs ]]; then
    log "$BENCH_DIR is on $FSTYPE: pick a directory on a real disk (BENCH_DIR=...)"
    exit 1
fi
if [[ ! -f "$FILE" || "$(stat -c %s "$FILE")" != "$FILE_BYTES" ]]; then
    log "writing $FILE (2 GiB, fully allocated: no unwritten extents to read as zeros)"
    dd if=/dev/zero of="$FILE" bs=1M count=2048 oflag=direct status=none
fi

OUT="$BENCH_DIR/results-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$OUT"
log "results in $OUT"

{
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "kernel: $(uname -r)"
    echo "filesystem: $FSTYPE on $(df --output=source "$BENCH_DIR" | tail -1) ($BENCH_DIR)"
    echo "fio: $(fio --version)"
    echo "runtime: ${RUNTIME}s x $RUNS runs, I/O on core $CORE, main threads on core $MAIN_CORE"
} >"$OUT/machine.txt"

tc_run() { # name, args...
    local name="$1"
    shift
    timeout $((RUNTIME + 60)) taskset -c "$MAIN_CORE" "$PERF" --cores "$CORE" --json -t "$RUNTIME" "$@" >"$OUT/$name.json"
}

fio_run() { # name, args...
    local name="$1"
    shift
    timeout $((RUNTIME + 60)) taskset -c "$MAIN_CORE" fio --name=job --cpus_allowed="$CORE" --numjobs=1 \
        --time_based --runtime="$RUNTIME" --norandommap --randrepeat=0 --lat_percentiles=1 \
        --output-format=json "$@" >"$OUT/$name.json"
}

# (a) uring file
for run in $(seq 1 "$RUNS"); do
    for wl in randread randwrite; do
        for qd in 1 32; do
            tag="$wl-qd$qd-run$run"
            log "run $run: $wl qd $qd"
            order=(tc tcsleep fio)
            if ((run % 2 == 0)); then order=(fio tcsleep tc); fi
            for tool in "${order[@]}"; do
                case $tool in
                tc) tc_run "tc-$tag" --uring "$FILE" --block-size 4096 -w "$wl" -o 4k -q "$qd" --seed "$run" ;;
                tcsleep) tc_run "tcsleep-$tag" --uring "$FILE" --block-size 4096 -w "$wl" -o 4k -q "$qd" --seed "$run" \
                    --no-busy-poll --idle-threshold-us 0 ;;
                fio) fio_run "fio-$tag" --filename="$FILE" --ioengine=io_uring --direct=1 --rw="$wl" --bs=4k \
                    --iodepth="$qd" ;;
                esac
            done
        done
    done
done

# (b) null
for run in $(seq 1 "$RUNS"); do
    log "run $run: null randread qd 128"
    tc_run "tc-null-qd128-run$run" --null 2G -w randread -o 4k -q 128 --seed "$run"
    fio_run "fio-null-qd128-run$run" --ioengine=null --size=2G --rw=randread --bs=4k --iodepth=128
done

# (c) idle CPU
DAEMON="$ROOT/target/release/tiercache"
for run in $(seq 1 "$RUNS"); do
    log "run $run: idle CPU over 10 s"
    if [[ -x "$DAEMON" ]] && "$DAEMON" serve --help >/dev/null 2>&1; then
        taskset -c "$CORE" "$DAEMON" serve >"$OUT/daemon-run$run.log" 2>&1 &
        pid=$!
        sleep 2
        if kill -0 "$pid" 2>/dev/null; then
            hz=$(getconf CLK_TCK)
            t0=$(awk '{print $14+$15}' "/proc/$pid/stat")
            sleep 10
            t1=$(awk '{print $14+$15}' "/proc/$pid/stat")
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            python3 -c "import json; print(json.dumps({'source': 'tiercache serve', 'wall_s': 10.0, 'cpu_pct_of_one_core': ($t1 - $t0) / $hz / 10.0 * 100}))" \
                >"$OUT/idle-run$run.json"
            continue
        fi
        wait "$pid" 2>/dev/null || true
        log "tiercache serve exited early (see $OUT/daemon-run$run.log); using --idle-check"
    fi
    taskset -c "$MAIN_CORE" "$PERF" --idle-check 10 --cores "$CORE" --json >"$OUT/idle-run$run.json"
done

python3 - "$OUT" "$RUNS" <<'PY' | tee "$OUT/summary.md"
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])

def load(name):
    with open(f"{out}/{name}.json") as f:
        return json.load(f)

def tc(name):
    t = load(name)["total"]
    return t["iops"], t["latency_us"]["avg"], t["latency_us"]["p99"]

def fio(name, op):
    j = load(name)["jobs"][0][op]
    return j["iops"], j["lat_ns"]["mean"] / 1000, j["lat_ns"]["percentile"]["99.000000"] / 1000

def med(xs):
    return statistics.median(xs), min(xs), max(xs)

def fmt(m, digits=0):
    return f"{m[0]:,.{digits}f} ({m[1]:,.{digits}f}–{m[2]:,.{digits}f})"

print(open(f"{out}/machine.txt").read())
print("| test | tool | IOPS median (min–max) | avg lat µs | p99 lat µs | IOPS vs fio | p99 vs fio |")
print("|---|---|---|---|---|---|---|")
rows = [(wl, qd) for wl in ("randread", "randwrite") for qd in (1, 32)]
for wl, qd in rows:
    op = "read" if wl == "randread" else "write"
    f = [fio(f"fio-{wl}-qd{qd}-run{r}", op) for r in range(1, runs + 1)]
    fi, fa, fp = med([x[0] for x in f]), med([x[1] for x in f]), med([x[2] for x in f])
    for tool, label in (("tc", "tiercache-perf (busy-poll)"), ("tcsleep", "tiercache-perf (--no-busy-poll --idle-threshold-us 0)")):
        t = [tc(f"{tool}-{wl}-qd{qd}-run{r}") for r in range(1, runs + 1)]
        ti, ta, tp = med([x[0] for x in t]), med([x[1] for x in t]), med([x[2] for x in t])
        print(f"| 4K {wl} QD{qd} uring | {label} | {fmt(ti)} | {fmt(ta, 1)} | {fmt(tp, 1)} | {ti[0] / fi[0]:.2f}× | {tp[0] / fp[0]:.2f}× |")
    print(f"| 4K {wl} QD{qd} uring | fio io_uring direct | {fmt(fi)} | {fmt(fa, 1)} | {fmt(fp, 1)} | 1.00× | 1.00× |")
t = [tc(f"tc-null-qd128-run{r}") for r in range(1, runs + 1)]
f = [fio(f"fio-null-qd128-run{r}", "read") for r in range(1, runs + 1)]
ti, fi = med([x[0] for x in t]), med([x[0] for x in f])
tp, fp = med([x[2] for x in t]), med([x[2] for x in f])
print(f"| 4K randread QD128 null | tiercache-perf --null | {fmt(ti)} | {fmt(med([x[1] for x in t]), 2)} | {fmt(tp, 2)} | {ti[0] / fi[0]:.2f}× | {tp[0] / fp[0]:.2f}× |")
print(f"| 4K randread QD128 null | fio --ioengine=null | {fmt(fi)} | {fmt(med([x[1] for x in f]), 2)} | {fmt(fp, 2)} | 1.00× | 1.00× |")
idle = [load(f"idle-run{r}") for r in range(1, runs + 1)]
m = med([i["cpu_pct_of_one_core"] for i in idle])
src = idle[0].get("source", "tiercache-perf --idle-check 10")
print(f"\nIdle CPU ({src}, 10 s): {m[0]:.2f}% of one core (min {m[1]:.2f}%, max {m[2]:.2f}%), target < 2%")
PY

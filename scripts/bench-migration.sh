#!/usr/bin/env bash
# Migration and policy benchmarks of the cache engine (docs/benchmarks.md, "Migration and
# policy"): tiercache-perf on a cached bdev (cache set on one file, backing file with no
# delay: an idle disk) against a plain LRU simulation and fio on the backing file.
#
#   (1) hit ratio: a seeded trace (zipf THETA over TRACE_BLOCKS blocks, and the same with a
#       full scan after every SCAN_EVERY draws) replayed through the cached bdev with a log
#       sized to hold ~10% of the working set, vs an LRU of 10% of the working set over the
#       identical trace (tiercache-perf --gen-trace / --trace / --lru-sim).
#   (2) writeback throughput: DIRTY_MIB of dirty data (written sequentially, sequential
#       cutoff off), then CacheSet::request_drain timed until no dirty block is left
#       (--drain), vs fio sequential write of the same amount to the same (fresh) file.
#   (3) 4K randread QD$READ_QD p99 over cached dirty data with writeback running vs without
#       (writeback watermark at 1% and writeback_percent 100: it does not start). Two ways
#       of running: the rate controller with the default knobs (50% dirty > the 10%
#       target: a PD-controlled rate with the latency guard), and a drain (--drain-during:
#       unthrottled).
#   (4) sustained 4K randwrite QD32 with the cache full of dirty data (an unmeasured
#       prefill in the same process, --prefill-ios) vs fio randwrite on the backing file
#       alone; the cache file on the same disk, then the cache on a RAM device.
#
# I/O on core $CORE, main/helper threads on $MAIN_CORE (taskset). Medians of $RUNS with
# min-max; cached/fio order alternates between rounds where the pair is independent.
#
# Environment: BENCH_DIR (default /work/tc-migbench; not tmpfs), RUNS (3), CORE (1),
# MAIN_CORE (0), CARGO_TARGET_DIR (default /work/target-migbench), SKIP_BUILD=1, OUT,
# TRACE_BLOCKS (65536), TRACE_ACCESSES (300000), SCAN_EVERY (100000), THETA (0.9),
# DIRTY_MIB (1024), READ_TIME (5), READ_QD (1), WRITE_TIME (10), WB_BACKING_MIB (4096).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_DIR="${BENCH_DIR:-/work/tc-migbench}"
RUNS="${RUNS:-3}"
CORE="${CORE:-1}"
MAIN_CORE="${MAIN_CORE:-0}"
TRACE_BLOCKS="${TRACE_BLOCKS:-65536}"
TRACE_ACCESSES="${TRACE_ACCESSES:-300000}"
SCAN_EVERY="${SCAN_EVERY:-100000}"
THETA="${THETA:-0.9}"
DIRTY_MIB="${DIRTY_MIB:-1024}"
READ_TIME="${READ_TIME:-5}"
READ_QD="${READ_QD:-1}"
WRITE_TIME="${WRITE_TIME:-10}"
WB_BACKING_MIB="${WB_BACKING_MIB:-4096}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/target-migbench}"
PERF="$CARGO_TARGET_DIR/release/tiercache-perf"
CACHE="$BENCH_DIR/mig-cache.dat"
SMALL_CACHE="$BENCH_DIR/mig-cache-small.dat"
BACKING="$BENCH_DIR/mig-backing.dat"
CACHE_MIB=2048
# (1): 10% of the working set. The log holds 31 blocks per 128 KiB segment (one header
# block); with the writeback watermark at 5% the engine keeps ~5% of the segments free plus
# one open segment, so SMALL_SEGMENTS is chosen to leave ~CAP blocks live in the log
# (checked: `cached_blocks` in each run's JSON, shown in the summary).
CAP=$((TRACE_BLOCKS / 10))
SMALL_SEGMENTS=$(((CAP / 31 + 2) * 100 / 95 + 1))
SMALL_CACHE_BYTES=$(((1 << 20) + SMALL_SEGMENTS * 128 * 1024))

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
if [[ ! -f "$CACHE" || "$(stat -c %s "$CACHE")" != $((CACHE_MIB << 20)) ]]; then
    log "writing $CACHE ($CACHE_MIB MiB, fully allocated)"
    dd if=/dev/zero of="$CACHE" bs=1M count="$CACHE_MIB" oflag=direct status=none
fi
if [[ ! -f "$SMALL_CACHE" || "$(stat -c %s "$SMALL_CACHE")" != "$SMALL_CACHE_BYTES" ]]; then
    rm -f "$SMALL_CACHE"
    dd if=/dev/zero of="$SMALL_CACHE" bs=128K count=$((SMALL_CACHE_BYTES / 131072)) oflag=direct status=none
fi
# Backing files are sparse and fresh for every formatted set (a new set refuses a backing
# file whose header names another set); fio gets a fresh one of the same size too.
# Deleting a file a run filled keeps the disk busy for a few seconds after rm returns
# (fio measured 21k instead of 53k IOPS right after one): settle before the next run.
fresh() { rm -f "$1" && sync && sleep 3 && truncate -s "$2" "$1"; }

OUT="${OUT:-$BENCH_DIR/results-migration-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
log "results in $OUT"
{
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "kernel: $(uname -r)"
    echo "filesystem: $FSTYPE on $(df --output=source "$BENCH_DIR" | tail -1) ($BENCH_DIR)"
    echo "fio: $(fio --version)"
    echo "commit: $(cd "$ROOT" && git rev-parse --short HEAD)"
    echo "runs: $RUNS; trace: zipf $THETA over $TRACE_BLOCKS blocks, $TRACE_ACCESSES draws, scan every $SCAN_EVERY; LRU/cache $CAP blocks (log: $SMALL_SEGMENTS x 128 KiB segments)"
    echo "drain: $DIRTY_MIB MiB; reads: ${READ_TIME}s QD$READ_QD; sustained writes: ${WRITE_TIME}s on a $WB_BACKING_MIB MiB backing file"
    echo "I/O on core $CORE, main threads on core $MAIN_CORE"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$OUT/machine.txt"

tc_run() { # name, args...
    local name="$1"
    shift
    timeout 600 taskset -c "$MAIN_CORE" "$PERF" --cores "$CORE" --json "$@" >"$OUT/$name.json"
}
fio_run() { # name, file, args...
    local name="$1" file="$2"
    shift 2
    timeout 300 taskset -c "$MAIN_CORE" fio --name=job --cpus_allowed="$CORE" --numjobs=1 --filename="$file" \
        --ioengine=io_uring --direct=1 --norandommap --randrepeat=0 --lat_percentiles=1 --output-format=json \
        "$@" >"$OUT/$name.json"
}

VOL_MIB=$((TRACE_BLOCKS * 4 / 1024))
DIRTY_IOS=$((DIRTY_MIB * 8)) # 128 KiB writes
READ_VOL_MIB=$((DIRTY_MIB))
for run in $(seq 1 "$RUNS"); do
    # (1) Hit ratio: one trace per seed, replayed at QD8 (submission in trace order).
    for kind in zipf scan; do
        scan=()
        [[ $kind == scan ]] && scan=(--trace-scan-every "$SCAN_EVERY")
        "$PERF" --gen-trace "$OUT/trace-$kind-run$run.txt" --trace-blocks "$TRACE_BLOCKS" \
            --trace-accesses "$TRACE_ACCESSES" "${scan[@]}" --zipf "$THETA" --seed "$run" >/dev/null
        log "run $run: hit ratio, $kind trace"
        fresh "$BACKING" $((VOL_MIB + 1))M
        tc_run "hit-$kind-run$run" --cache "$SMALL_CACHE" --backing "$BACKING" --cache-format --segment-size 128k \
            --writeback-low-pct 5 -w randread -o 4k -q 8 --trace "$OUT/trace-$kind-run$run.txt" --lru-sim "$CAP" \
            --seed "$run"
        rm -f "$OUT/trace-$kind-run$run.txt"
    done

    # (2) Drain DIRTY_MIB of sequentially written dirty data vs fio sequential write.
    order=(tc fio)
    if ((run % 2 == 0)); then order=(fio tc); fi
    for tool in "${order[@]}"; do
        log "run $run: writeback drain, $tool"
        fresh "$BACKING" $((DIRTY_MIB + 1))M
        case $tool in
        tc) tc_run "drain-run$run" --cache "$CACHE" --backing "$BACKING" --cache-format --seq-cutoff 0 \
            -w write -o 128k -q 32 --io-count "$DIRTY_IOS" --drain --seed "$run"
            # The same with the cache on its own (RAM) device, as NVMe in front of an HDD:
            # writeback against the backing device alone, migration on its own core.
            fresh "$BACKING" $((DIRTY_MIB + 1))M
            tc_run "drain-ram-run$run" --cache "malloc:${CACHE_MIB}M" --backing "$BACKING" --cache-format \
                --migration-core "$MAIN_CORE" --seq-cutoff 0 -w write -o 128k -q 32 --io-count "$DIRTY_IOS" --drain \
                --seed "$run" ;;
        fio) fio_run "fio-seqwrite-run$run" "$BACKING" --rw=write --bs=1M --iodepth=16 --size="${DIRTY_MIB}M" \
            --end_fsync=1 ;;
        esac
    done

    # (3) Randread of cached dirty data, without then with writeback running.
    log "run $run: randread with/without writeback"
    fresh "$BACKING" $((READ_VOL_MIB + 1))M
    tc_run "readfill-run$run" --cache "$CACHE" --backing "$BACKING" --cache-format --seq-cutoff 0 \
        --writeback-low-pct 1 --writeback-percent 100 -w write -o 128k -q 32 --io-count $((READ_VOL_MIB * 8)) \
        --seed "$run"
    # Migration on its own core (as configured in a deployment: background cores apart
    # from the I/O reactors); the disk is still shared.
    M=(--migration-core "$MAIN_CORE")
    tc_run "read-idle-run$run" --cache "$CACHE" --backing "$BACKING" "${M[@]}" --writeback-low-pct 1 \
        --writeback-percent 100 -w randread -o 4k -q "$READ_QD" -t "$READ_TIME" --seed "$run"
    tc_run "read-rate-run$run" --cache "$CACHE" --backing "$BACKING" "${M[@]}" --writeback-low-pct 1 \
        -w randread -o 4k -q "$READ_QD" -t "$READ_TIME" --seed "$run"
    tc_run "read-wb-run$run" --cache "$CACHE" --backing "$BACKING" "${M[@]}" --writeback-low-pct 1 --drain-during \
        -w randread -o 4k -q "$READ_QD" -t "$READ_TIME" --seed "$run"

    # (4) Sustained randwrite with the log full of dirty data vs the backing file alone.
    for tool in "${order[@]}"; do
        log "run $run: sustained randwrite, $tool"
        fresh "$BACKING" $((WB_BACKING_MIB + 1))M
        case $tool in
        tc)
            # Prefill (unmeasured, same process): as many random writes as the log has
            # blocks, which leaves it as dirty as the engine lets it get (the dirty cutoff,
            # default 70%). Cache file on the same disk, then on a RAM device (a separate
            # fast device, as deployed; this machine has one disk).
            tc_run "wsus-run$run" --cache "$CACHE" --backing "$BACKING" --cache-format --migration-core "$MAIN_CORE" \
                -w randwrite -o 4k -q 32 -t "$WRITE_TIME" --prefill-ios $((CACHE_MIB * 256)) --seed "$run"
            fresh "$BACKING" $((WB_BACKING_MIB + 1))M
            tc_run "wsus-ram-run$run" --cache "malloc:${CACHE_MIB}M" --backing "$BACKING" --cache-format \
                --migration-core "$MAIN_CORE" -w randwrite -o 4k -q 32 -t "$WRITE_TIME" \
                --prefill-ios $((CACHE_MIB * 256)) --seed "$run"
            ;;
        fio) fio_run "fio-randwrite-run$run" "$BACKING" --rw=randwrite --bs=4k --iodepth=32 --time_based \
            --runtime="$WRITE_TIME" --size="${WB_BACKING_MIB}M" ;;
        esac
    done
done
rm -f "$BACKING"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/machine.txt"

python3 - "$OUT" "$RUNS" <<'PY' | tee "$OUT/summary.md"
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
R = range(1, runs + 1)

def load(name):
    with open(f"{out}/{name}.json") as f:
        return json.load(f)

def med(xs):
    return statistics.median(xs)

def fmt(xs, d=0):
    f = f"{{:,.{d}f}}"
    return f"{f.format(med(xs))} ({f.format(min(xs))}–{f.format(max(xs))})"

def verdict(ok):
    return "met" if ok else "**missed**"

print("| benchmark | tiercache | baseline | ratio | target |")
print("|---|---|---|---|---|")
notes = []
for kind, label in [("zipf", f"hit ratio, zipf"), ("scan", "hit ratio, zipf + full scans")]:
    docs = [load(f"hit-{kind}-run{r}") for r in R]
    eng = [d["cache"]["engine_hit_pct"] for d in docs]
    lru = [d["trace"]["lru"]["hit_pct"] for d in docs]
    diff = [e - l for e, l in zip(eng, lru)]
    target = "≥ LRU" if kind == "zipf" else "clearly > LRU"
    ok = med(diff) >= 0 if kind == "zipf" else med(diff) >= 5
    print(f"| {label} (% of reads) | {fmt(eng, 1)} | LRU {fmt(lru, 1)} | {med(diff):+.1f} pts ({min(diff):+.1f}…{max(diff):+.1f}) | {target}: {verdict(ok)} |")
    for r, d in zip(R, docs):
        e, c = d["cache"]["engine"], d["cache"]
        notes.append(f"hit {kind} run {r}: {d['trace']['entries']:,} reads, {d['total']['iops']:,.0f} IOPS, engine hits {e['read_hits']:,} / misses {e['read_misses']:,} "
                     f"(partial {e['read_partial_hits']}), promotions {e['promotions']:,} (stale {e['promotions_stale']}), seq bypasses {e['seq_bypasses']:,}, "
                     f"segments reclaimed {e['segments_reclaimed']}, live blocks after {c['cached_blocks']:,} of {c['nr_segments']} segments, LRU {d['trace']['lru']['capacity_blocks']:,} blocks")

dr = [load(f"drain-run{r}")["cache"]["drain"] for r in R]
fw = [load(f"fio-seqwrite-run{r}")["jobs"][0] for r in R]
# fio bandwidth including end_fsync: bytes / job runtime
fio_mib = [j["write"]["io_bytes"] / (1 << 20) / (j["job_runtime"] / 1000) for j in fw]
tc_mib = [d["mib_per_s"] for d in dr]
ratio = med(tc_mib) / med(fio_mib)
print(f"| writeback drain to an idle backing file, cache on the same disk (MiB/s) | {fmt(tc_mib)} | fio seq write 1M QD16 {fmt(fio_mib)} | {ratio:.2f}× | (device-bound: reads + writes share one disk) |")
ram_mib = [load(f"drain-ram-run{r}")["cache"]["drain"]["mib_per_s"] for r in R]
ratio = med(ram_mib) / med(fio_mib)
print(f"| writeback drain to an idle backing file, cache on a RAM device (MiB/s) | {fmt(ram_mib)} | fio seq write 1M QD16 {fmt(fio_mib)} | {ratio:.2f}× | ≥ 0.8×: {verdict(ratio >= 0.8)} |")
for r, d in zip(R, dr):
    extra = ""
    if "backing_dev" in d:
        b, c = d["backing_dev"], d["cache_dev"]
        extra = (f"; backing: {b['writes']:,} writes ({b['write_bytes'] / max(1, b['writes']) / 1024:.0f} KiB avg), {b['flushes']:,} flushes; "
                 f"cache: {c['reads']:,} reads ({c['read_bytes'] / max(1, c['reads']) / 1024:.0f} KiB avg), {c['flushes']:,} flushes, {c['writes']:,} writes")
    notes.append(f"drain run {r}: {d['dirty_blocks_before']:,} dirty blocks, {d['written_back_blocks']:,} written back in {d['secs']} s{extra}")

def p(doc, q):
    return doc["total"]["latency_us"][q]

ri = [load(f"read-idle-run{r}") for r in R]
p99i = [p(d, "p99") for d in ri]
for key, label in [("rate", "rate controller, default knobs"), ("wb", "drain (unthrottled)")]:
    rw = [load(f"read-{key}-run{r}") for r in R]
    p99w = [p(d, "p99") for d in rw]
    # Each round's idle run is its own baseline (the idle p99 moves by 1.5x between rounds
    # on this machine): the verdict is on the median of the per-round ratios; the ratio of
    # the two medians is shown too.
    paired = [w / i for w, i in zip(p99w, p99i)]
    ratio = med(paired)
    print(f"| 4K randread QD1 p99 µs, writeback running: {label} | {fmt(p99w, 1)} | writeback idle {fmt(p99i, 1)} | {ratio:.2f}× per round ({min(paired):.2f}…{max(paired):.2f}; ratio of medians {med(p99w) / med(p99i):.2f}×) | ≤ 1.5×: {verdict(ratio <= 1.5)} |")
    def hitp99(d):
        pl = d["cache"].get("path_latency_us") or {}
        return pl.get("read_hit", {}).get("p99_us")
    hi, hw = [hitp99(d) for d in ri], [hitp99(d) for d in rw]
    if None not in hi + hw:
        ratio = med(hw) / med(hi)
        print(f"| … read **hits** only (engine path histogram), p99 µs: {label} | {fmt(hw)} | writeback idle {fmt(hi)} | {ratio:.2f}× | |")
    miss = [d["cache"]["engine"]["read_misses"] / max(1, d["total"]["reads"]) * 100 for d in rw]
    print(f"| … reads that missed, %: {label} | {fmt(miss, 1)} | writeback idle {fmt([d['cache']['engine']['read_misses'] / max(1, d['total']['reads']) * 100 for d in ri], 1)} | | |")
    for r, a, b in zip(R, ri, rw):
        wb = b["cache"]["counters"]["writeback_blocks"]
        notes.append(f"read {key} run {r}: idle {a['total']['iops']:,.0f} IOPS avg {p(a,'avg')} p50 {p(a,'p50')} p99 {p(a,'p99')} µs (hits {a['cache']['engine']['read_hits']:,}, misses {a['cache']['engine']['read_misses']}, written back {a['cache']['counters']['writeback_blocks']}); "
                     f"with writeback {b['total']['iops']:,.0f} IOPS avg {p(b,'avg')} p50 {p(b,'p50')} p99 {p(b,'p99')} p99.9 {p(b,'p99_9')} µs; "
                     f"{wb:,} blocks written back during the {b['elapsed_s']:.1f} s job ({wb * 4 / 1024 / b['elapsed_s']:.1f} MiB/s), dirty after {b['cache']['dirty_blocks']:,}, decision at the end {b['cache']['writeback_decision']}")

ws = [load(f"wsus-run{r}") for r in R]
wr = [load(f"wsus-ram-run{r}") for r in R]
fr = [load(f"fio-randwrite-run{r}")["jobs"][0]["write"] for r in R]
fio_iops = [j["iops"] for j in fr]
for label, runs in (("cache file on the same disk", ws), ("cache on a RAM device", wr)):
    tc_iops = [d["total"]["iops"] for d in runs]
    ratio = med(tc_iops) / med(fio_iops)
    print(f"| sustained 4K randwrite QD32, cache full of dirty data, {label} (IOPS) | {fmt(tc_iops)} | fio randwrite on the backing file {fmt(fio_iops)} | {ratio:.2f}× | ≥ 1×: {verdict(ratio >= 1)} |")
for r, d, j in [(r, d, j) for r, d, j in zip(R, ws, fr)] + [(f"{r} (RAM cache)", d, j) for r, d, j in zip(R, wr, fr)]:
    c = d["cache"]
    e = c["engine"]
    k = c["counters"]
    notes.append(f"sustained run {r}: backing {k['backing_dev']['writes']:,} writes, {k['backing_dev']['flushes']:,} flushes; cache {k['cache_dev']['reads']:,} reads, {k['cache_dev']['flushes']:,} flushes, {k['cache_dev']['log_writes']:,} segment writes")
    notes.append(f"sustained run {r}: avg {p(d,'avg')} p99 {p(d,'p99')} max {d['total']['latency_us'].get('max')} µs; free segments after {c['free_segments']} of {c['nr_segments']}, "
                 f"writeback {e['writeback_blocks']:,} blocks ({e['writeback_blocks'] / d['elapsed_s']:,.0f}/s), space waits {e['space_waits']:,}, writes around the full/cut-off cache {e['full_bypasses']:,}, dirty after {c['dirty_blocks']:,}; "
                 f"fio avg {j['lat_ns']['mean']/1000:.1f} p99 {j['lat_ns']['percentile']['99.000000']/1000:.1f} µs")
print()
for n in notes:
    print(f"- {n}")
PY

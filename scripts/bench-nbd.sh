#!/usr/bin/env bash
# NBD server benchmark: the same fio jobs (ioengine=nbd) against
#   tiercache/malloc   tiercache exporting a malloc bdev (examples/nbd_bench_server)
#   tiercache/cached   tiercache exporting a write-back cached bdev (cache + backing on malloc;
#                      the cache bdev written once before formatting: no first-touch faults)
#   nbdkit/memory      nbdkit -f memory 1G
#   qemu-nbd/file      qemu-nbd on a raw file on the root filesystem (page cache)
# Server pinned to core 0, fio to core 1. tiercache runs with IDLE_US (default 0): its reactor
# sleeps in io_uring_enter as soon as it has nothing to do, instead of polling for 1 ms. Workloads: 4K randread / randwrite at QD 32,
# 128K sequential read / write at QD 32, each with JOBS client connections (fio numjobs,
# every job its own NBD connection at QD 32, all on FIO_CORE; default "1 4": one client
# connection, then four). Each (server, workload, jobs) is run RUNS times;
# reported: median IOPS (min–max), server CPU per I/O = Δ(utime+stime) of the
# server process (all threads, /proc/PID/stat) / I/Os completed, and client CPU per I/O =
# the busy time of FIO_CORE (/proc/stat: everything but idle and iowait) / I/Os completed
# (near 1e6/IOPS µs: the client's core is saturated, and the IOPS are the client's limit).
# TRANSPORT=unix serves every server on a Unix socket instead of TCP on 127.0.0.1.
#
# Usage: scripts/bench-nbd.sh [RUNTIME_SECONDS=5] [RUNS=3]
# Env:   SERVER_CORE (0), FIO_CORE (1), SIZE_MIB (1024), OUT (results file, markdown),
#        IDLE_US (0: tiercache reactor idle threshold in µs), SERVERS (the server list),
#        JOBS (client connections per run, a list: "1 4"), WORKLOADS ("randread:4k ..."),
#        BENCH_BIN (a prebuilt nbd_bench_server, e.g. of an older commit; default: build it),
#        TRANSPORT (tcp or unix; default tcp)
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME=${1:-5}
RUNS=${2:-3}
SERVER_CORE=${SERVER_CORE:-0}
FIO_CORE=${FIO_CORE:-1}
SIZE_MIB=${SIZE_MIB:-1024}
OUT=${OUT:-/tmp/bench-nbd-results.md}
IDLE_US=${IDLE_US:-0}
JOBS=${JOBS:-"1 4"}
TRANSPORT=${TRANSPORT:-tcp}
case "$TRANSPORT" in tcp | unix) ;; *) echo "TRANSPORT must be tcp or unix" >&2; exit 2 ;; esac
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-nbdsrv}
WORK=$(mktemp -d /tmp/bench-nbd.XXXXXX)
SERVER_PID=""

cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

for t in fio nbdkit qemu-nbd taskset python3 nbdinfo; do
  command -v "$t" >/dev/null || { echo "missing $t (see scripts/test.sh for the packages)" >&2; exit 1; }
done

if [ -z "${BENCH_BIN:-}" ]; then
  echo "== building the bench server (release)"
  cargo build --release -q -p tiercache-nbd --example nbd_bench_server
  BENCH_BIN="$CARGO_TARGET_DIR/release/examples/nbd_bench_server"
fi

PORT=10900
wait_ready() { # uri
  for _ in $(seq 1 100); do
    nbdinfo --size "$1" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server at $1 did not come up" >&2
  exit 1
}

sock_path() { echo "$WORK/nbd.$PORT.sock"; }
listen_arg() { if [ "$TRANSPORT" = unix ]; then echo "unix:$(sock_path)"; else echo "127.0.0.1:$PORT"; fi; }
uri_for() { # export name
  if [ "$TRANSPORT" = unix ]; then echo "nbd+unix:///$1?socket=$(sock_path)"; else echo "nbd://127.0.0.1:$PORT/$1"; fi
}

start_server() { # name -> sets SERVER_PID, URI
  PORT=$((PORT + 1))
  case "$1" in
    tiercache/malloc)
      # stdin: a fifo nobody writes to, so the server runs until killed.
      mkfifo "$WORK/stdin.$PORT"
      taskset -c "$SERVER_CORE" "$BENCH_BIN" --listen "$(listen_arg)" --cores "$SERVER_CORE" \
        --size-mib "$SIZE_MIB" --idle-threshold-us "$IDLE_US" --name bench <"$WORK/stdin.$PORT" >"$WORK/server.log" 2>&1 &
      SERVER_PID=$!
      exec 9>"$WORK/stdin.$PORT"
      URI=$(uri_for bench) ;;
    tiercache/cached)
      mkfifo "$WORK/stdin.$PORT"
      taskset -c "$SERVER_CORE" "$BENCH_BIN" --listen "$(listen_arg)" --cores "$SERVER_CORE" \
        --size-mib "$SIZE_MIB" --idle-threshold-us "$IDLE_US" --cached --name bench <"$WORK/stdin.$PORT" >"$WORK/server.log" 2>&1 &
      SERVER_PID=$!
      exec 9>"$WORK/stdin.$PORT"
      URI=$(uri_for bench) ;;
    nbdkit/memory)
      if [ "$TRANSPORT" = unix ]; then where=(-U "$(sock_path)"); else where=(-i 127.0.0.1 -p "$PORT"); fi
      taskset -c "$SERVER_CORE" nbdkit -f "${where[@]}" memory "${SIZE_MIB}M" >"$WORK/server.log" 2>&1 &
      SERVER_PID=$!
      URI=$(uri_for "") ;;
    qemu-nbd/file)
      rm -f "$WORK/disk.raw"
      truncate -s "${SIZE_MIB}M" "$WORK/disk.raw"
      if [ "$TRANSPORT" = unix ]; then where=(-k "$(sock_path)"); else where=(-b 127.0.0.1 -p "$PORT"); fi
      taskset -c "$SERVER_CORE" qemu-nbd -f raw -x bench "${where[@]}" -t -e 16 \
        "$WORK/disk.raw" >"$WORK/server.log" 2>&1 &
      SERVER_PID=$!
      URI=$(uri_for bench) ;;
  esac
  wait_ready "$URI"
}

stop_server() {
  exec 9>&- 2>/dev/null || true
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Busy ticks of one core: user nice system irq softirq steal (not idle, not iowait).
core_ticks() { awk -v c="cpu$1" '$1 == c {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }

# fio_run uri rw bs jobs -> prints "iops ios" (all jobs together)
fio_run() {
  taskset -c "$FIO_CORE" fio --name=bench --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth=32 \
    --numjobs="$4" --group_reporting --size="${SIZE_MIB}m" --time_based --runtime="$RUNTIME" \
    --output-format=json >"$WORK/fio.json" 2>/dev/null
  python3 - "$WORK/fio.json" "$2" <<'EOF'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.find('{'):])["jobs"][0]
assert j["error"] == 0, j["error"]
d = j["read"] if "read" in sys.argv[2] else j["write"]
print(d["iops"], d["total_ios"])
EOF
}

WORKLOADS=${WORKLOADS:-"randread:4k randwrite:4k read:128k write:128k"}
SERVERS=${SERVERS:-"tiercache/malloc nbdkit/memory qemu-nbd/file tiercache/cached"}
TICK_HZ=$(getconf CLK_TCK)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
: >"$WORK/raw.tsv"
for s in $SERVERS; do
  echo "== $s"
  start_server "$s"
  # Precondition: write the whole export once so reads return real data.
  taskset -c "$FIO_CORE" fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1m --iodepth=8 \
    --size="${SIZE_MIB}m" >/dev/null 2>&1
  for w in $WORKLOADS; do
    rw=${w%%:*}; bs=${w##*:}
    for j in $JOBS; do
      for r in $(seq 1 "$RUNS"); do
        c0=$(cpu_ticks "$SERVER_PID"); f0=$(core_ticks "$FIO_CORE")
        read -r iops ios < <(fio_run "$URI" "$rw" "$bs" "$j")
        c1=$(cpu_ticks "$SERVER_PID"); f1=$(core_ticks "$FIO_CORE")
        us=$(python3 -c "print(($c1 - $c0) * 1e6 / $TICK_HZ / max(1, $ios))")
        cus=$(python3 -c "print(($f1 - $f0) * 1e6 / $TICK_HZ / max(1, $ios))")
        printf '%s\t%s %s QD32 x%s\t%s\t%s\t%s\t%s\n' "$s" "$rw" "$bs" "$j" "$r" "$iops" "$us" "$cus" | tee -a "$WORK/raw.tsv"
      done
    done
  done
  stop_server
done

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$WORK/raw.tsv" "$OUT" "$RUNTIME" "$RUNS" "$LOAD_START" "$LOAD_END" "$TRANSPORT" <<'EOF'
import statistics, sys, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
data = collections.OrderedDict()
for s, w, r, iops, us, cus in rows:
    data.setdefault(w, collections.OrderedDict()).setdefault(s, []).append((float(iops), float(us), float(cus)))
out = []
out.append(f"fio runtime {sys.argv[3]} s, {sys.argv[4]} runs per cell: median (min–max); "
           f"transport {sys.argv[7]}; load average at start {sys.argv[5]}, at end {sys.argv[6]}\n")
out.append("| workload (xN: client connections) | server | IOPS | server CPU µs/I/O | client core µs/I/O |")
out.append("|---|---|---|---|---|")
for w, servers in data.items():
    for s, v in servers.items():
        i = [x[0] for x in v]; c = [x[1] for x in v]; f = [x[2] for x in v]
        out.append(f"| {w} | {s} | {statistics.median(i):,.0f} ({min(i):,.0f}–{max(i):,.0f}) | "
                   f"{statistics.median(c):.2f} ({min(c):.2f}–{max(c):.2f}) | "
                   f"{statistics.median(f):.2f} ({min(f):.2f}–{max(f):.2f}) |")
for w, servers in data.items():
    if "tiercache/malloc" in servers and "nbdkit/memory" in servers:
        a = statistics.median(x[0] for x in servers["tiercache/malloc"])
        b = statistics.median(x[0] for x in servers["nbdkit/memory"])
        out.append(f"\n{w}: tiercache/malloc / nbdkit memory IOPS = {a / b:.2f}×")
text = "\n".join(out) + "\n"
open(sys.argv[2], "w").write(text)
print(text)
EOF
echo "results in $OUT"

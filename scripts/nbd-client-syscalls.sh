#!/usr/bin/env bash
# The syscalls fio's nbd engine (libnbd) makes per I/O against one NBD server, over a Unix
# socket: what the client's core pays for whichever server answers it. Server on core 0,
# fio (one job, QD 32, 4 s after a sequential fill) on core 1, counted with perf's syscall
# tracepoints (which slow fio: the IOPS printed are below an untraced run's).
#
# Usage: scripts/nbd-client-syscalls.sh SERVER RW BS
#   SERVER: tiercache (examples/nbd_bench_server on a malloc bdev) or nbdkit (memory 1G)
#   e.g.    scripts/nbd-client-syscalls.sh tiercache randwrite 4k
# Env: BENCH_BIN (a prebuilt nbd_bench_server; default: build it into CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
S=${1:?server: tiercache or nbdkit} RW=${2:?rw, e.g. randread} BS=${3:?bs, e.g. 4k}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-nbdsrv}
for t in fio nbdkit perf taskset python3; do
  command -v "$t" >/dev/null || { echo "missing $t" >&2; exit 1; }
done
WORK=$(mktemp -d /tmp/nbd-client-syscalls.XXXXXX)
SOCK=$WORK/nbd.sock
SP=""
cleanup() {
  exec 9>&- 2>/dev/null || true
  if [ -n "$SP" ]; then kill "$SP" 2>/dev/null || true; wait "$SP" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
case "$S" in
  tiercache)
    if [ -z "${BENCH_BIN:-}" ]; then
      cargo build --release -q -p tiercache-nbd --example nbd_bench_server
      BENCH_BIN="$CARGO_TARGET_DIR/release/examples/nbd_bench_server"
    fi
    # The server runs until its stdin closes.
    mkfifo "$WORK/stdin"
    taskset -c 0 "$BENCH_BIN" --cores 0 --size-mib 1024 --idle-threshold-us 0 --listen "unix:$SOCK" \
      <"$WORK/stdin" >"$WORK/server.log" 2>&1 &
    SP=$!
    exec 9>"$WORK/stdin"
    URI="nbd+unix:///bench?socket=$SOCK"
    ;;
  nbdkit)
    taskset -c 0 nbdkit -f -U "$SOCK" memory 1024M &
    SP=$!
    URI="nbd+unix:///?socket=$SOCK"
    ;;
  *) echo "SERVER must be tiercache or nbdkit" >&2; exit 2 ;;
esac
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
[ -S "$SOCK" ] || { echo "server did not start" >&2; exit 1; }
taskset -c 1 fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1m --iodepth=8 --size=1024m \
  --output-format=terse >/dev/null
EVENTS=recvfrom,sendto,sendmsg,recvmsg,poll,ppoll,read,write
perf stat -x, -o "$WORK/stat.csv" \
  -e "$(echo "$EVENTS" | sed 's/\([a-z]*\)/syscalls:sys_enter_\1/g'),raw_syscalls:sys_enter" -- \
  taskset -c 1 fio --name=b --ioengine=nbd --uri="$URI" --rw="$RW" --bs="$BS" --iodepth=32 --size=1024m \
  --time_based --runtime=4 --output-format=json >"$WORK/fio.json"
python3 - "$WORK/fio.json" "$WORK/stat.csv" "$S $RW $BS" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
job = json.loads(t[t.index('{'):])['jobs'][0]
ios = job['read']['total_ios'] + job['write']['total_ios']
iops = job['read']['iops'] + job['write']['iops']
print(f"{sys.argv[3]}: {iops:,.0f} IOPS, fio's syscalls per I/O:")
for line in open(sys.argv[2]):
    f = line.strip().split(',')
    if len(f) < 3 or not f[0].replace('.', '').isdigit():
        continue
    n = float(f[0]) / ios
    if n >= 0.001:
        print(f"  {f[2].split(':')[-1].replace('sys_enter_', ''):<12} {n:.3f}")
PY

#!/usr/bin/env bash
# A short coverage-guided fuzz run (libFuzzer via cargo-fuzz) of every parser that takes
# untrusted input: the NBD handshake, NBD requests, the JSON-RPC decoder. Part of
# scripts/test.sh. cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP enables them on the
# stable toolchain these machines have.
#   scripts/fuzz-smoke.sh [SECONDS_PER_TARGET]   (default 15)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-15}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install --locked cargo-fuzz >/dev/null
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for t in nbd_handshake nbd_request jsonrpc_decode; do
  echo "== fuzz $t for ${secs}s"
  mkdir -p "corpus/$t"
  cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 2>&1 | tail -3
done
echo "fuzz smoke: no crash in 3 targets"

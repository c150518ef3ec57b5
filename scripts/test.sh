#!/usr/bin/env bash
# The whole test suite. Installs what the tests need when it is missing (Debian packages via
# apt-get), then: rustfmt check, clippy with warnings as errors, every test of the workspace.
# Usage: scripts/test.sh            (from anywhere inside the checkout)
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
want() { command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2"); }
want fio fio
want nbdkit nbdkit
want nbdinfo libnbd-bin
want nbdcopy libnbd-bin
want nbdfuse nbdfuse
want qemu-img qemu-utils
want qemu-io qemu-utils
want mkfs.xfs xfsprogs
want mkfs.ext4 e2fsprogs
want fusermount3 fuse3
# Debian's python3-libnbd lives in the system interpreter (a pyenv python3 may come first).
py=/usr/bin/python3; [ -x "$py" ] || py=python3
"$py" -c 'import nbd' >/dev/null 2>&1 || need_pkgs+=(python3-libnbd)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing test dependencies: ${need_pkgs[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(printf '%s\n' "${need_pkgs[@]}" | sort -u) >/dev/null
  else
    echo "missing test dependencies (install them, or run as root): ${need_pkgs[*]}" >&2
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace --profile ci 2>&1 | tee /tmp/tiercache-test.log
echo "== fuzz smoke (cargo-fuzz, 15 s per target)"
scripts/fuzz-smoke.sh 15
# One closing line for the whole run (cargo prints one summary per test binary).
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' /tmp/tiercache-test.log | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' /tmp/tiercache-test.log | awk '{s+=$1} END {print s+0}')
echo "tests: ${passed} passed, ${failed} failed"

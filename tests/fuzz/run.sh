#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 20 s each) from a corpus seeded with
# docs/test-vectors.json; fails on the first crash, leaving the input in tests/fuzz/artifacts/.
# Needs a nightly toolchain (rustup toolchain install nightly) and cargo-fuzz (installed here when
# missing: cargo install cargo-fuzz --locked).
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-20}
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "tests/fuzz/run.sh: needs a nightly toolchain (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz (crates.io, about a minute)"
  cargo install cargo-fuzz --locked --quiet
fi
python3 tests/fuzz/seed.py
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' tests/fuzz/Cargo.toml | grep -v '^courtside-fuzz$')
echo "== building the fuzz targets (nightly, address sanitizer)"
cargo +nightly fuzz build --fuzz-dir tests/fuzz
# One target: its log in tests/fuzz/target/, its summary printed; non-zero on a crash.
fuzz_one() {
  local target=$1
  mkdir -p "tests/fuzz/corpus/$target" tests/fuzz/target
  local log="tests/fuzz/target/$target.log"
  local status=0
  cargo +nightly fuzz run --fuzz-dir tests/fuzz "$target" "tests/fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -max_len=65536 >"$log" 2>&1 || status=$?
  echo "== fuzz $target (${seconds} s): $(grep -E '^Done' "$log" || echo 'no summary')"
  grep -E 'panicked|ERROR|SUMMARY|artifact' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    echo "fuzz $target: crashed (input in tests/fuzz/artifacts/$target/; log $log)" >&2
  fi
  return "$status"
}
# Two targets at a time (one per core), each still for its whole time.
set -- $targets
failed=0
while [ $# -gt 0 ]; do
  fuzz_one "$1" & first=$!
  second=""
  if [ $# -gt 1 ]; then fuzz_one "$2" & second=$!; fi
  wait "$first" || failed=1
  if [ -n "$second" ]; then wait "$second" || failed=1; fi
  shift; [ $# -gt 0 ] && shift
  if [ "$failed" -ne 0 ]; then exit 1; fi
done
echo "fuzz: every target ran ${seconds} s without a crash"

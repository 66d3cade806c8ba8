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
for target in $targets; do
  echo "== fuzz $target (${seconds} s)"
  mkdir -p "tests/fuzz/corpus/$target"
  log="tests/fuzz/target/$target.log"
  mkdir -p tests/fuzz/target
  status=0
  cargo +nightly fuzz run --fuzz-dir tests/fuzz "$target" "tests/fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -max_len=65536 >"$log" 2>&1 || status=$?
  grep -E '^Done|panicked|ERROR|SUMMARY|artifact' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    echo "fuzz $target: crashed (input in tests/fuzz/artifacts/$target/; log $log)" >&2
    exit 1
  fi
done
echo "fuzz: every target ran ${seconds} s without a crash"

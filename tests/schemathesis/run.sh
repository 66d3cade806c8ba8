#!/usr/bin/env bash
# Runs schemathesis (every check, bounded in time) against a debug build of the server, driven by
# docs/openapi.yaml: answers must be the documented statuses, headers and bodies. Installs
# schemathesis from PyPI when it is missing. Usage: tests/schemathesis/run.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${1:-90}
if ! command -v schemathesis >/dev/null 2>&1; then
  echo "== installing schemathesis (PyPI)"
  python3 -m pip install --quiet schemathesis 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages schemathesis
fi
cargo build --quiet --locked -p courtside
token="schemathesis-$RANDOM$RANDOM"
log=$(mktemp)
# The publish rate per address is lifted: every generated request comes from 127.0.0.1.
target/debug/courtside serve --http 127.0.0.1:0 --wt 127.0.0.1:0 --publish-token "$token" \
  --publish-rate-per-ip 0 --log-format json --log-level warn,courtside=info 2>"$log" &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
addr=""
for _ in $(seq 1 100); do
  addr=$(sed -n 's/.*"http":"\([0-9.:]*\)".*/\1/p' "$log" | head -1)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$log" >&2; echo "the server did not start" >&2; exit 1; }
# /ws is left out: its 101 switches to the WebSocket protocol, and its upgrade headers are token
# lists compared without case (RFC 9110 §7.8), which a schema pattern cannot state exactly; the
# integration tests (tests/integration/limits.rs, upgrade refusals) cover it with a real client.
echo "== schemathesis against http://$addr (${seconds} s, every check)"
schemathesis --config-file tests/schemathesis/schemathesis.toml run docs/openapi.yaml \
  --url "http://$addr" -H "Authorization: Bearer $token" --checks all --exclude-path /ws \
  --max-examples 30 --seed 14 --max-time "$seconds" --no-color

#!/usr/bin/env bash
# The test command (README.md): installs what the tests need when it is missing, then runs the
# template test of deploy/, the Rust suites (cargo test, which starts real redis-server
# processes), the JavaScript client's unit tests and the headless-Chromium tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests need: Chromium (browser tests), redis-server and redis-cli (cluster tests),
# PyYAML and zip (docs/openapi.yaml; deploy/'s template test and its runbook's step 2), and venv
# (aioquic's environment, below).
missing=()
if ! command -v chromium >/dev/null 2>&1 && [ -z "${CHROMIUM:-}" ]; then missing+=(chromium); fi
if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then missing+=(redis-server); fi
if ! python3 -c 'import yaml' >/dev/null 2>&1; then missing+=(python3-yaml); fi
if ! command -v zip >/dev/null 2>&1; then missing+=(zip); fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then missing+=(python3-venv); fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing ${missing[*]} (Debian packages, about a minute)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "tests/run.sh: the tests need ${missing[*]}: install them (apt-get install ${missing[*]}), or set CHROMIUM=/path/to/chrome" >&2
    exit 1
  fi
fi
if ! command -v node >/dev/null 2>&1; then
  echo "tests/run.sh: the JavaScript tests need Node.js 18 or later" >&2
  exit 1
fi
if [ ! -d tests/browser/node_modules/playwright-core ] || [ ! -d tests/browser/node_modules/typescript ] \
  || [ ! -d tests/browser/node_modules/fossil-delta ]; then
  echo "== installing playwright-core, typescript and fossil-delta (npm)"
  npm ci --prefix tests/browser --no-audit --no-fund --loglevel=error
fi

# aioquic: an HTTP/3 client that follows RFC 9114, for the WebTransport refusals (PyPI), in a
# virtual environment of its own under target/ (as deploy/check.sh installs its tools).
h3venv=target/h3client-venv
if ! "$h3venv/bin/python" -c 'import aioquic' >/dev/null 2>&1; then
  echo "== installing aioquic (PyPI) into $h3venv"
  python3 -m venv "$h3venv"
  "$h3venv/bin/pip" install --quiet --disable-pip-version-check aioquic==1.7.2
fi

echo "== docs/openapi.yaml parses"
python3 -c 'import sys, yaml; yaml.safe_load(open("docs/openapi.yaml"))' || { echo "docs/openapi.yaml is not valid YAML" >&2; exit 1; }

echo "== deploy/: the template's scaling policies, alarms, scheduled actions and options (no AWS account)"
(cd deploy && python3 -m unittest test_template)

echo "== cargo test"
cargo test --workspace "$@"

echo "== JavaScript: client codec and headless Chromium"
cargo build --quiet
node --test fallback/test/ tests/browser/

echo "== HTTP/3 (aioquic, RFC 9114): a session and the WebTransport refusals on both engines"
"$h3venv/bin/python" tests/h3client/refusals.py quinn proto

#!/usr/bin/env bash
# Runs every scenario at the sizes bench/README.md reports, Courtside and Socket.IO side by side,
# and writes the JSON results and CDF plots to bench/results/latest/. About 40 minutes on 2 vCPU.
# Usage: bench/run-all.sh [extra courtside-bench flags, e.g. --no-peer]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p courtside -p courtside-bench
bench=target/release/courtside-bench
out=bench/results/latest
mkdir -p "$out"
run() { local name=$1; shift; echo "== $name: $*"; "$bench" "$@" --json "$out/$name.json" "${EXTRA[@]}" | tee "$out/$name.txt"; }
EXTRA=("$@")
# The floor holds both ends of each socket: 9,900 is as close to 10,000 as 20,000 files allow.
for n in 1000 5000 9900; do run "floor-$n" floor --sockets "$n"; done
run fanout fanout --clients 1000,5000,10000 --rates 5,20,50 --seconds 5
run fanout-websocket fanout --clients 1000,5000,10000 --rates 5,20,50 --seconds 5 --wt-share 0
run saturday saturday --fans 5000 --seconds 30
run saturday-websocket saturday --fans 5000 --seconds 30 --wt-share 0
# The same Saturday with Courtside's states over the stream until a session sees loss.
COURTSIDE_WT_STATE_DATAGRAMS=after-loss run saturday-after-loss saturday --fans 5000 --seconds 30
run connect-storm connect-storm --clients 5000 --within 5
run connect-storm-20k connect-storm --clients 20000 --within 20 --wt-share 0.5
run soak soak --fans 2000 --seconds 120
# Past the rooms' 10-minute event history, so the RSS trend can level off; Courtside alone.
run soak-12min soak --fans 2000 --seconds 720 --no-peer
run cluster cluster --clients 3000 --rate 5 --seconds 10
# A bracket update's cost: full states, deltas, permessage-deflate and both, on both transports,
# beside Socket.IO plain and with perMessageDeflate at 1,024 (issue 23).
run bracket bracket --clients 1000 --publishes 63 --rate 5

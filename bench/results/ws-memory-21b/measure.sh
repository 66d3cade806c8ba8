#!/bin/bash
# measure.sh: the burst generator of ../ws-memory-21 (gen.js, run.sh) against the before and after
# builds, alternating, ROUNDS rounds of concurrency 5000 then 256; each line is one run.
# BEFORE and AFTER are release binaries; the after build logs its trims (courtside::memory=debug).
set -u
cd "$(dirname "$0")"
ROUNDS=${ROUNDS:-3}
for round in $(seq 1 "$ROUNDS"); do
  for conc in 5000 256; do
    for build in before after; do
      bin=$BEFORE; [ "$build" = after ] && bin=$AFTER
      line=$(COURTSIDE_LOG=info,courtside::memory=debug bash ../ws-memory-21/run.sh "$bin" 5000 "$conc" deflate 2>&1 | tail -1)
      trims=$(grep -c "gave freed heap" /tmp/docsgen-srv.log)
      trim=$(grep "gave freed heap" /tmp/docsgen-srv.log | sed 's/.*after a burst of connections //' | tr '\n' ';')
      echo "$build round=$round conc=$conc $line trims=$trims $trim"
      sleep 2
    done
  done
done

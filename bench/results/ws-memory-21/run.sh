#!/bin/bash
# run.sh BIN N CONC [nodeflate] [extra server args...]
BIN=$1; N=$2; CONC=$3; DEF=$4; shift 4
PORT=$((3910 + RANDOM % 80))
$BIN serve --http 127.0.0.1:$PORT --publish-token x --max-connections 60000 ${LIMITS---max-connections-per-ip 1000000 --connection-rate-per-ip 0} "$@" > /tmp/docsgen-srv.log 2>&1 &
SPID=$!
sleep 1.5
node "$(dirname "$0")/gen.js" ws://127.0.0.1:$PORT/ws $N $SPID $CONC $DEF 2>&1 | sort | uniq -c | sed 's/^ *1 //'
kill $SPID; wait $SPID 2>/dev/null

#!/usr/bin/env bash
# Handover benchmark (issue 8): how long a worker takes to move IDLE idle
# WebSocket connections to its replacement on a rolling reload, and the echo
# latency p99 active users see before, during and after that reload.
#
#   scripts/bench_handover.sh            # IDLE=10000 ACTIVE=50 PORT=9611
#
# Runs the release `echo` example with one worker (so every connection
# moves), `loadgen idle` holding IDLE connections and `loadgen echo` with
# ACTIVE connections in three windows. Prints the figures and the log lines.
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE=${IDLE:-10000}
ACTIVE=${ACTIVE:-50}
PORT=${PORT:-9611}
cargo build --release --quiet --example echo --example loadgen
ulimit -n 20000 2>/dev/null || true
DIR=$(mktemp -d)
ECHO=target/release/examples/echo
LG=target/release/examples/loadgen
URL="ws://127.0.0.1:$PORT/"
$ECHO --port "$PORT" --workers 1 --set max_conn=30000 --set max_wait_time=10 \
  --set log_file="$DIR/echo.log" --set pid_file="$DIR/echo.pid" --set log_level=info &
MASTER=$!
trap 'kill $MASTER 2>/dev/null; wait $MASTER 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 100); do [ -s "$DIR/echo.pid" ] && break; sleep 0.1; done
$LG idle --url "$URL" --conns "$IDLE" --hold 60 --src-ips 127.0.0.2-127.0.0.3 > "$DIR/idle.out" 2>&1 &
IDLE_PID=$!
for _ in $(seq 600); do grep -q HOLDING "$DIR/idle.out" && break; sleep 0.1; done
grep HOLDING "$DIR/idle.out"
p99() { sed -n 's/^RESULT //p' "$1" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["p99_us"], "us p99,", r["msgs_per_s"], "msg/s")'; }
$LG echo --url "$URL" --conns "$ACTIVE" --warmup 1 --duration 3 > "$DIR/before.out" 2>&1
$LG echo --url "$URL" --conns "$ACTIVE" --warmup 1 --duration 4 > "$DIR/during.out" 2>&1 &
ECHO_PID=$!
sleep 2
T0=$(date +%s%N)
kill -USR1 "$MASTER"
wait $ECHO_PID
$LG echo --url "$URL" --conns "$ACTIVE" --warmup 1 --duration 3 > "$DIR/after.out" 2>&1
echo "before:  $(p99 "$DIR/before.out")"
echo "during:  $(p99 "$DIR/during.out")   (window includes the reload)"
echo "after:   $(p99 "$DIR/after.out")"
grep -E "handed [0-9]+ connections over|adopted [0-9]+ connections" "$DIR/echo.log" | sed 's/^/log: /'
kill -INT $IDLE_PID 2>/dev/null || true
wait $IDLE_PID 2>/dev/null || true
sed -n 's/^RESULT /idle: /p' "$DIR/idle.out"
echo "reload signal sent at $(( (T0 / 1000000) % 100000 )) ms (clock mod 100 s)"

#!/usr/bin/env bash
# The demo cluster (the README's run command): a Route with 2 workers on a
# private Redis, IM servers registering with it, and what the registry shows
# as they come and go. Loopback only; everything is cleaned up on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
cargo build --release --quiet --bin swocloud --example seed_client

work=$(mktemp -d)
port_of() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
REDIS_PORT=$(port_of); ROUTE_PORT=$(port_of)
pids=()
cleanup() {
  [ -f "$work/route.pid" ] && target/release/swocloud stop -c "$work/route.toml" >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" --daemonize yes --logfile "$work/redis.log"
until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.05; done

cat > "$work/route.toml" <<TOML
host = "127.0.0.1"
port = $ROUTE_PORT
worker_num = 2
pid_file = "$work/route.pid"
log_file = "$work/route.log"
redis_url = "redis://127.0.0.1:$REDIS_PORT"
heartbeat_check_interval = 1.0
heartbeat_idle_time = 3.0
TOML

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say "start the Route (swocloud start -d)"
target/release/swocloud start -d -c "$work/route.toml"
target/release/swocloud status -c "$work/route.toml"

say "two IM servers register (the seed's register frame)"
for i in 1 2; do
  target/release/examples/seed_client --url "ws://127.0.0.1:$ROUTE_PORT/" --name "IM_$i" --ip "127.0.0.$((i+1))" --port 9000 > "$work/im$i.out" &
  pids+=($!)
done
sleep 1
head -n1 "$work"/im*.out
say "redis-cli SMEMBERS im_server (the seed's key, the seed's encoding)"
redis-cli -p "$REDIS_PORT" smembers im_server
say "GET /api/servers"
curl -s "http://127.0.0.1:$ROUTE_PORT/api/servers"; echo

say "IM_1 dies (SIGKILL): the Route removes it at once"
kill -9 "${pids[0]}"; sleep 0.3
redis-cli -p "$REDIS_PORT" smembers im_server

say "IM_2 freezes (SIGSTOP): removed after heartbeat_idle_time"
kill -STOP "${pids[1]}"; sleep 4.5
redis-cli -p "$REDIS_PORT" smembers im_server | sed 's/^$/(empty)/'
kill -CONT "${pids[1]}" 2>/dev/null || true

say "rolling reload (swocloud reload), then status"
target/release/swocloud reload -c "$work/route.toml"; sleep 1
target/release/swocloud status -c "$work/route.toml"

say "stop"
target/release/swocloud stop -c "$work/route.toml"
tail -n 5 "$work/route.log"

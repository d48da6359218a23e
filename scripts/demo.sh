#!/usr/bin/env bash
# The demo cluster (the README's run command): a private Redis, a Route with
# 2 workers and two IM servers (2 workers each, on 127.0.0.2 and 127.0.0.3),
# users chatting across servers, a message from "any program" through the
# HTTP API (curl and PHP), a message waiting in an offline user's inbox, a
# group, an IM server dying and its users moving, a rolling reload, and a
# clean stop. Loopback only; everything is cleaned up on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
echo "building (release)…"
cargo build --release --quiet --bins --example chat_user --example seed_client

B=target/release
SECRET=demo-secret
work=$(mktemp -d)
source scripts/lib.sh
ROUTE_PORT=$(free_port); IM0_PORT=$(free_port 127.0.0.2); IM1_PORT=$(free_port 127.0.0.3)
cleanup() {
  for c in "$work"/im0.toml "$work"/im1.toml; do [ -f "$c" ] && $B/swocloud-im stop -c "$c" >/dev/null 2>&1 || true; done
  [ -f "$work/route.toml" ] && $B/swocloud stop -c "$work/route.toml" >/dev/null 2>&1 || true
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

start_private_redis "$work"

cat > "$work/route.toml" <<TOML
host = "127.0.0.1"
port = $ROUTE_PORT
worker_num = 2
pid_file = "$work/route.pid"
log_file = "$work/route.log"
redis_url = "redis://127.0.0.1:$REDIS_PORT"
auth_secret = "$SECRET"
heartbeat_check_interval = 1.0
heartbeat_idle_time = 3.0
TOML
for i in 0 1; do
  port_var="IM${i}_PORT"
  cat > "$work/im$i.toml" <<TOML
host = "127.0.0.$((i + 2))"
port = ${!port_var}
worker_num = 2
pid_file = "$work/im$i.pid"
log_file = "$work/im$i.log"
redis_url = "redis://127.0.0.1:$REDIS_PORT"
route_url = "ws://127.0.0.1:$ROUTE_PORT/"
service_name = "IM_$i"
auth_secret = "$SECRET"
TOML
done

say "start the Route and two IM servers (start -d returns once each serves)"
$B/swocloud start -d -c "$work/route.toml"
$B/swocloud-im start -d -c "$work/im0.toml"
$B/swocloud-im start -d -c "$work/im1.toml"
sleep 0.5
$B/swocloud status -c "$work/route.toml"

say "the registry: redis-cli SMEMBERS im_server (the seed's key and encoding)"
redis-cli -p "$REDIS_PORT" smembers im_server

say "users ask /route, connect, and chat across servers"
U="$B/examples/chat_user --route 127.0.0.1:$ROUTE_PORT --secret $SECRET"
$U --uid alice --send bob:"hi bob" --send carol:"hi carol" --listen-ms 2500 &
$U --uid bob --send alice:"hello alice" --listen-ms 2500 &
$U --uid carol --send alice:"hey" --send bob:"yo" --listen-ms 2500 &
sleep 1.2
say "any program: POST /api/send with curl and with PHP, GET /api/online"
curl -s -X POST -H 'Content-Type: application/json' -d '{"uid":"bob","data":"from curl"}' "http://127.0.0.1:$ROUTE_PORT/api/send"; echo
php examples/clients/send.php "http://127.0.0.1:$ROUTE_PORT" carol "from php"
php examples/clients/send.php "http://127.0.0.1:$ROUTE_PORT" nobody "lost?"
curl -s "http://127.0.0.1:$ROUTE_PORT/api/online?uid=alice"; echo
wait

say "verifiable delivery: the message for 'nobody' waits in its inbox; nobody connects now and gets it after welcome"
$U --uid nobody --listen-ms 600
curl -s "http://127.0.0.1:$ROUTE_PORT/api/message?uid=nobody&seq=1"; echo

say "groups: alice and bob join 'team' (the API); one group message goes once to each IM server holding members"
$U --uid alice --listen-ms 1500 &
$U --uid bob --listen-ms 1500 &
sleep 0.5
for u in alice bob; do
  curl -s -X POST -H 'Content-Type: application/json' -d "{\"group\":\"team\",\"uid\":\"$u\"}" "http://127.0.0.1:$ROUTE_PORT/api/groups/join"; echo
done
sleep 0.3
curl -s -X POST -H 'Content-Type: application/json' -d '{"group":"team","data":"standup in 5"}' "http://127.0.0.1:$ROUTE_PORT/api/groups/send"; echo
wait

say "IM_0 dies (SIGKILL of its whole tree): the Route drops it at once"
pkill_tree() { local p=$1; for c in $(pgrep -P "$p"); do pkill_tree "$c"; done; kill -9 "$p" 2>/dev/null || true; }
pkill_tree "$(cat "$work/im0.pid")"; rm -f "$work/im0.pid"
sleep 0.3
redis-cli -p "$REDIS_PORT" smembers im_server
$U --uid dave --listen-ms 200

say "rolling reload of the Route (SIGUSR1): new worker pids, same master and manager"
$B/swocloud reload -c "$work/route.toml"; sleep 1
$B/swocloud status -c "$work/route.toml"

say "metrics (excerpt)"
curl -s "http://127.0.0.1:$ROUTE_PORT/metrics" | grep -E '^swocloud_(route_registrations|route_removals|worker_restarts|reloads|connections_open)' || true

say "stop everything"
$B/swocloud-im stop -c "$work/im1.toml"
$B/swocloud stop -c "$work/route.toml"
echo; echo "Route log (last lines):"; tail -n 6 "$work/route.log"

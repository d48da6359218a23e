#!/usr/bin/env bash
# scripts/bench_slow_redis.sh: how the cluster answers while Redis is slow
# (issue 11). A private redis-server behind a fault proxy
# (examples/fault_proxy.rs) that holds every request SLOW_DELAY_MS before
# Redis sees it; a Route (1 worker) and two IM servers (2 workers each) use
# the proxy. examples/slow_probe.rs connects SLOW_IDLE idle users to IM_0
# and alternates GET /health on the Route with a WebSocket ping on an idle
# user, for SLOW_SECONDS with Redis fast, then SLOW_SECONDS with it slow.
# Each phase prints `RESULT phase {json}`: p50/p99/max (ms) and failures.
#
# Environment (defaults in brackets):
#   SLOW_DELAY_MS [300] SLOW_SECONDS [10] SLOW_IDLE [50]
#   SLOW_ROUTE_BIN [target/release/swocloud] SLOW_IM_BIN [target/release/swocloud-im]
#     (point both at another build for a before/after run)
#   BENCH_OUT [target/bench]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SLOW_DELAY_MS=${SLOW_DELAY_MS:-300}
SLOW_SECONDS=${SLOW_SECONDS:-10}
SLOW_IDLE=${SLOW_IDLE:-50}
ROUTE=${SLOW_ROUTE_BIN:-target/release/swocloud}
IM=${SLOW_IM_BIN:-target/release/swocloud-im}
BENCH_OUT=${BENCH_OUT:-target/bench}
log() { printf '[bench-slow-redis %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
mkdir -p "$BENCH_OUT"
WORK=$(mktemp -d)
REDIS_PORT=""
PROXY_PID=""
cleanup() {
    exec 7>&- 2>/dev/null || true
    [[ -n $PROXY_PID ]] && kill "$PROXY_PID" 2>/dev/null || true
    for c in im1 im0; do
        [[ -f $WORK/$c.pid ]] && timeout 20 "$IM" stop -c "$WORK/$c.toml" >/dev/null 2>&1 || true
    done
    [[ -f $WORK/route.pid ]] && timeout 20 "$ROUTE" stop -c "$WORK/route.toml" >/dev/null 2>&1 || true
    [[ -n $REDIS_PORT ]] && redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"
cargo build --release --quiet --bin swocloud --bin swocloud-im --example fault_proxy --example slow_probe
start_private_redis "$WORK" || die "the private Redis did not start"
mkfifo "$WORK/proxy.ctl"
target/release/examples/fault_proxy --upstream "127.0.0.1:$REDIS_PORT" \
    --listen-file "$WORK/proxy.addr" <"$WORK/proxy.ctl" >/dev/null 2>"$WORK/proxy.log" &
PROXY_PID=$!
exec 7>"$WORK/proxy.ctl"
for _ in $(seq 100); do [[ -s $WORK/proxy.addr ]] && break; sleep 0.05; done
PROXY=$(cat "$WORK/proxy.addr")
RPORT=$(free_port)
cat >"$WORK/route.toml" <<TOML
host = "127.0.0.1"
port = $RPORT
worker_num = 1
pid_file = "$WORK/route.pid"
log_file = "$WORK/route.log"
log_level = "warn"
redis_url = "redis://$PROXY"
heartbeat_check_interval = 1.0
heartbeat_idle_time = 3.0
TOML
timeout 30 "$ROUTE" start -d -c "$WORK/route.toml" || die "the Route did not start"
IM0=""
for i in 0 1; do
    host="127.0.0.$((i + 2))"
    port=$(free_port "$host")
    cat >"$WORK/im$i.toml" <<TOML
host = "$host"
port = $port
worker_num = 2
pid_file = "$WORK/im$i.pid"
log_file = "$WORK/im$i.log"
log_level = "warn"
redis_url = "redis://$PROXY"
route_url = "ws://127.0.0.1:$RPORT/"
service_name = "IM_$i"
TOML
    timeout 30 "$IM" start -d -c "$WORK/im$i.toml" || die "IM_$i did not start"
    [[ $i == 0 ]] && IM0="ws://$host:$port/"
done
members() { redis-cli -p "$REDIS_PORT" scard im_server; }
for _ in $(seq 100); do [[ $(members) == 2 ]] && break; sleep 0.1; done
[[ $(members) == 2 ]] || die "the IM servers did not register"
probe() { # PHASE
    target/release/examples/slow_probe --route "127.0.0.1:$RPORT" --im "$IM0" \
        --idle "$SLOW_IDLE" --seconds "$SLOW_SECONDS" --uid-prefix "$1" | sed -n "s/^RESULT /RESULT $1 /p"
}
echo "pass" >&7
probe fast | tee "$BENCH_OUT/slow-redis-fast.txt"
echo "delay $SLOW_DELAY_MS" >&7
probe slow | tee "$BENCH_OUT/slow-redis-slow.txt"
log "registered IM servers after the slow phase: $(members) (2 expected)"
echo "pass" >&7

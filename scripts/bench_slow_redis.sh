#!/usr/bin/env bash
# scripts/bench_slow_redis.sh: how the cluster answers while Redis is slow
# (issue 11). A private redis-server behind a fault proxy
# (examples/fault_proxy.rs) that holds every request SLOW_DELAY_MS before
# Redis sees it; a Route (1 worker) and two IM servers (2 workers each) use
# the proxy. examples/slow_probe.rs connects SLOW_IDLE idle users to IM_0
# (while Redis is fast) and alternates GET /health on the Route with a
# WebSocket ping on an idle user, for SLOW_SECONDS with Redis fast, then
# SLOW_SECONDS with it slow, then SLOW_SECONDS fast again; it switches the
# proxy itself at each phase. Each phase prints `RESULT phase {json}`:
# p50/p99/max (ms) and failures. The registry (`im_server`, read from Redis
# directly) is sampled every 0.2 s: its minimum size during the run and the
# Route's log lines about dropped servers are printed at the end.
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
SLOW_LABEL=${SLOW_LABEL:-}
log() { printf '[bench-slow-redis %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
mkdir -p "$BENCH_OUT"
WORK=$(mktemp -d)
REDIS_PORT=""
PROXY_PID=""
SAMPLER_PID=""
cleanup() {
    [[ -n $SAMPLER_PID ]] && kill "$SAMPLER_PID" 2>/dev/null || true
    # The servers first: a proxy gone before them would log a lost Redis.
    for c in im1 im0; do
        [[ -f $WORK/$c.pid ]] && timeout 20 "$IM" stop -c "$WORK/$c.toml" >/dev/null 2>&1 || true
    done
    [[ -f $WORK/route.pid ]] && timeout 20 "$ROUTE" stop -c "$WORK/route.toml" >/dev/null 2>&1 || true
    exec 7>&- 2>/dev/null || true
    [[ -n $PROXY_PID ]] && kill "$PROXY_PID" 2>/dev/null || true
    [[ -n $REDIS_PORT ]] && redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    for c in route im0 im1; do cp "$WORK/$c.log" "$BENCH_OUT/${SLOW_LABEL}slow-redis-$c.log" 2>/dev/null || true; done
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
route_heartbeat = 1.0
TOML
    timeout 30 "$IM" start -d -c "$WORK/im$i.toml" || die "IM_$i did not start"
    [[ $i == 0 ]] && IM0="ws://$host:$port/"
done
members() { redis-cli -p "$REDIS_PORT" scard im_server; }
for _ in $(seq 100); do [[ $(members) == 2 ]] && break; sleep 0.1; done
[[ $(members) == 2 ]] || die "the IM servers did not register"
log "cluster up (Route $ROUTE, IM $IM); Redis behind the proxy at $PROXY"
(
    while :; do
        printf '%s %s\n' "$(date +%s.%N)" "$(members 2>/dev/null || echo '?')"
        sleep 0.2
    done
) >"$WORK/members.txt" &
SAMPLER_PID=$!
echo "pass" >&7
target/release/examples/slow_probe --route "127.0.0.1:$RPORT" --im "$IM0" \
    --idle "$SLOW_IDLE" --seconds "$SLOW_SECONDS" --uid-prefix "${SLOW_LABEL}p" \
    --ctl "$WORK/proxy.ctl" --phase fast=pass --phase "slow=delay $SLOW_DELAY_MS" \
    --phase after=pass | sed -n "s/^RESULT /RESULT /p" | tee "$BENCH_OUT/${SLOW_LABEL}slow-redis.txt"
kill "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=""
log "registered IM servers (SCARD im_server, sampled every 0.2 s): min $(awk '$2 ~ /^[0-9]+$/ {print $2}' "$WORK/members.txt" | sort -n | head -1), now $(members) (2 expected)"
log "Route log lines about silent or dropped servers: $(grep -ciE 'silent|dropp|reap|expired' "$WORK/route.log" || true)"
grep -iE 'silent|dropp|reap|expired' "$WORK/route.log" | head -5 | sed 's/^/    /' >&2 || true

#!/usr/bin/env bash
# scripts/bench_cluster.sh: the user path through a whole cluster (issue 5).
#
# Starts a private redis-server, a Route (`swocloud start -d`, 2 workers, on
# 127.0.0.1) and two IM servers (`swocloud-im start -d`, 2 workers each, on
# 127.0.0.2 and 127.0.0.3, registered with the Route, no auth_secret), then
# for each repeat runs one loadgen process that connects CLUSTER_USERS users
# directly to the two IM servers, alternating (`ws://ip:port/?uid=U`, source
# addresses spread over 127.0.0.10-127.0.0.29), and measures:
#   api-send  POST /api/send {"uid","data":{"t":ns}} on the Route →
#             the user's socket reads {"from":"api","data":…}
#   u2u       a user on IM_0 sends {"to":U2,"data":{"t":ns}} to a user on IM_1
# each with at most CLUSTER_WINDOW messages in flight (saturation), and once
# more at a fixed CLUSTER_LOW_RATE msg/s (latency at moderate load): sent
# and received messages/s, end-to-end latency p50/p99, losses.
# Prints `RESULT {json}` lines and a summary; everything it started is
# stopped on exit.
#
# Environment (defaults in brackets):
#   CLUSTER_USERS [10000] CLUSTER_DURATION [10] CLUSTER_WARMUP [2]
#   CLUSTER_WINDOW [64] CLUSTER_HTTP_CONNS [16] CLUSTER_SENDERS [64]
#   CLUSTER_REPEATS [3] CLUSTER_LOW_RATE [1000] (0: skip the paced runs)
#   CLUSTER_IM_BIN [target/release/swocloud-im]: the IM server binary (A/B runs)
#   BENCH_OUT [target/bench]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

CLUSTER_USERS=${CLUSTER_USERS:-10000}
CLUSTER_DURATION=${CLUSTER_DURATION:-10}
CLUSTER_WARMUP=${CLUSTER_WARMUP:-2}
CLUSTER_WINDOW=${CLUSTER_WINDOW:-64}
CLUSTER_HTTP_CONNS=${CLUSTER_HTTP_CONNS:-16}
CLUSTER_SENDERS=${CLUSTER_SENDERS:-64}
CLUSTER_REPEATS=${CLUSTER_REPEATS:-3}
CLUSTER_LOW_RATE=${CLUSTER_LOW_RATE:-1000}
BENCH_OUT=${BENCH_OUT:-target/bench}

LOADGEN=target/release/examples/loadgen
ROUTE=target/release/swocloud
IM=${CLUSTER_IM_BIN:-target/release/swocloud-im}

log() { printf '[bench-cluster %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
command -v python3 >/dev/null || die "python3 is needed"
command -v redis-server >/dev/null || die "redis-server is needed (scripts/setup.sh)"

mkdir -p "$BENCH_OUT"
WORK=$(mktemp -d)
REDIS_PORT=""
LG_PID=""
cleanup() {
    [[ -n $LG_PID ]] && kill -TERM "$LG_PID" 2>/dev/null || true
    local c
    for c in im1 im0 route; do
        if [[ -f $WORK/$c.pid ]]; then
            if [[ $c == route ]]; then
                timeout 20 "$ROUTE" stop -c "$WORK/$c.toml" >/dev/null 2>&1 || true
            else
                timeout 20 "$IM" stop -c "$WORK/$c.toml" >/dev/null 2>&1 || true
            fi
        fi
        cp "$WORK/$c.log" "$BENCH_OUT/cluster-$c.log" 2>/dev/null || true
    done
    [[ -n $REDIS_PORT ]] && redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'trap - INT TERM; log "interrupted"; exit 130' INT TERM

# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

log "building"
cargo build --release --quiet --bin swocloud --bin swocloud-im --example loadgen

start_private_redis "$WORK" || die "the private Redis did not start"

RPORT=$(free_port)
cat >"$WORK/route.toml" <<TOML
host = "127.0.0.1"
port = $RPORT
worker_num = 2
pid_file = "$WORK/route.pid"
log_file = "$WORK/route.log"
log_level = "warn"
redis_url = "redis://127.0.0.1:$REDIS_PORT"
TOML
timeout 30 "$ROUTE" start -d -c "$WORK/route.toml" || die "the Route did not start"

IM_URLS=()
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
redis_url = "redis://127.0.0.1:$REDIS_PORT"
route_url = "ws://127.0.0.1:$RPORT/"
service_name = "IM_$i"
max_conn = 20000
heartbeat_idle_time = 600
TOML
    timeout 30 "$IM" start -d -c "$WORK/im$i.toml" || die "IM_$i did not start"
    IM_URLS+=("ws://$host:$port/")
done
count() { curl -s "http://127.0.0.1:$RPORT/api/servers" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])'; }
for _ in $(seq 100); do [[ $(count) == 2 ]] && break; sleep 0.1; done
[[ $(count) == 2 ]] || die "the IM servers did not register"
IMS=$(
    IFS=,
    echo "${IM_URLS[*]}"
)
log "cluster up: Route 127.0.0.1:$RPORT, IM servers $IMS, Redis $REDIS_PORT"

RESULTS="$WORK/results.txt"
: >"$RESULTS"
run() { # MODE RATE LABEL
    local mode=$1 rate=$2 label=$3 logf="$BENCH_OUT/loadgen-cluster-$3.log" line
    log "$label: $mode, $CLUSTER_USERS users, window $CLUSTER_WINDOW, rate cap $rate"
    timeout $((CLUSTER_DURATION + CLUSTER_WARMUP + 150)) "$LOADGEN" "$mode" --ims "$IMS" \
        --route "http://127.0.0.1:$RPORT" --users "$CLUSTER_USERS" --uid-prefix "${label}_" \
        --src-ips 127.0.0.10-127.0.0.29 --window "$CLUSTER_WINDOW" \
        --http-conns "$CLUSTER_HTTP_CONNS" --senders "$CLUSTER_SENDERS" --rate "$rate" \
        --duration "$CLUSTER_DURATION" --warmup "$CLUSTER_WARMUP" >"$logf" 2>&1 &
    LG_PID=$!
    wait "$LG_PID" || log "loadgen exited with $? (log: $logf)"
    LG_PID=""
    grep -v '^RESULT\|^MEASURE' "$logf" | sed 's/^/    /' >&2 || true
    line=$(sed -n 's/^RESULT //p' "$logf")
    [[ -n $line ]] && echo "$mode $rate $line" >>"$RESULTS"
    sleep 1 # let the servers forget the users
}
for r in $(seq "$CLUSTER_REPEATS"); do
    run api-send 0 "api$r"
    run u2u 0 "u2u$r"
done
if [[ $CLUSTER_LOW_RATE != 0 ]]; then
    run api-send "$CLUSTER_LOW_RATE" apilow
    run u2u "$CLUSTER_LOW_RATE" u2ulow
fi
log "Route /metrics after the runs (errors, drops):"
curl -s "http://127.0.0.1:$RPORT/metrics" | grep -E '^swocloud_[a-z_]*(error|drop|dropped|slow|fail|overflow|refused)[a-z_]* ' | sed 's/^/    /' >&2 || true

python3 - "$RESULTS" <<'PY' | tee "$BENCH_OUT/summary-cluster.txt"
import json, statistics, sys
rows = {}
for l in open(sys.argv[1]):
    mode, rate, js = l.split(" ", 2)
    rows.setdefault((mode, float(rate)), []).append(json.loads(js))
def ms(xs):
    return f"median {statistics.median(xs):.0f} (min {min(xs):.0f}, max {max(xs):.0f}, n={len(xs)})"
for (mode, rate), rs in sorted(rows.items()):
    print(f"{mode} {'saturation (window)' if rate == 0 else f'paced at {rate:.0f} msg/s'}:")
    for k in ("sent_per_s", "received_per_s", "p50_us", "p99_us", "max_us", "lost", "errors"):
        print(f"  {k:15} {ms([r[k] for r in rs])}")
print("RESULT " + json.dumps({f"{m}@{r:.0f}": rs for (m, r), rs in rows.items()}))
PY
log "logs in $BENCH_OUT/"

#!/usr/bin/env bash
# scripts/bench_im_idle.sh: what an idle *user* costs an IM server (issue
# 17 asks for the IM figure beside the echo example's). A private
# redis-server and one IM server (`swocloud-im start -d`, IM_WORKERS
# workers, on 127.0.0.2, no Route: its link keeps redialling a closed port,
# which costs nothing measurable); loadgen idle holds IM_USERS users with
# distinct uids (`?uid=u{n}`) in IM_PER_PROC-connection processes. The
# server's RSS (summed over its process tree) is read before the users
# connect and while they are held: bytes per user above that baseline.
# IM_BIN picks the IM server binary (a before/after run: point it at an
# older build). Prints `RESULT {json}`.
#
# Environment (defaults in brackets):
#   IM_USERS [19000] IM_PER_PROC [9500] IM_WORKERS [2]
#   IM_BIN [target/release/swocloud-im] BENCH_OUT [target/bench]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
IM_USERS=${IM_USERS:-19000}
IM_PER_PROC=${IM_PER_PROC:-9500}
IM_WORKERS=${IM_WORKERS:-2}
IM=${IM_BIN:-target/release/swocloud-im}
BENCH_OUT=${BENCH_OUT:-target/bench}
LOADGEN=target/release/examples/loadgen
log() { printf '[bench-im-idle %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
mkdir -p "$BENCH_OUT"
WORK=$(mktemp -d)
REDIS_PORT=""
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    [[ -f $WORK/im.pid ]] && timeout 20 "$IM" stop -c "$WORK/im.toml" >/dev/null 2>&1 || true
    [[ -n $REDIS_PORT ]] && redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"
[[ -n ${IM_SKIP_BUILD:-} ]] || cargo build --release --quiet --bin swocloud-im --example loadgen
start_private_redis "$WORK" || die "the private Redis did not start"
PORT=$(free_port 127.0.0.2)
DEAD=$(free_port)
cat >"$WORK/im.toml" <<TOML
host = "127.0.0.2"
port = $PORT
worker_num = $IM_WORKERS
pid_file = "$WORK/im.pid"
log_file = "$WORK/im.log"
log_level = "warn"
redis_url = "redis://127.0.0.1:$REDIS_PORT"
route_url = "ws://127.0.0.1:$DEAD/"
service_name = "IM_idle"
max_conn = 20000
max_conn_per_ip = 0
heartbeat_idle_time = 600
TOML
timeout 30 "$IM" start -d -c "$WORK/im.toml" || die "the IM server did not start"
all_rss() {
    local m mgr; m=$(cat "$WORK/im.pid")
    mgr=$(pgrep -P "$m" | head -1)
    { ps -o rss= -p "$m"; ps -o rss= -p "$mgr"; ps -o rss= --ppid "$mgr"; } | awk '{s+=$1} END {print s}'
}
sleep 1 # let the workers settle (baseline)
BASE=$(all_rss)
log "baseline RSS ${BASE} KiB; connecting $IM_USERS users"
n=0; i=0
while ((n < IM_USERS)); do
    k=$((IM_USERS - n < IM_PER_PROC ? IM_USERS - n : IM_PER_PROC))
    src="127.0.0.$((40 + i))"
    "$LOADGEN" idle --url "ws://127.0.0.2:$PORT/?uid=p${i}u{n}" --src-ips "$src" --conns "$k" \
        --hold 60 >"$WORK/lg$i.log" 2>&1 &
    PIDS+=($!)
    n=$((n + k)); i=$((i + 1))
done
for f in "$WORK"/lg*.log; do
    for _ in $(seq 600); do grep -q '^HOLDING' "$f" && break; sleep 0.1; done
done
held=$(grep -h '^HOLDING' "$WORK"/lg*.log | awk '{s+=$2} END {print s}')
sleep 2
HELD=$(all_rss)
per=$(( (HELD - BASE) * 1024 / (held > 0 ? held : 1) ))
log "held $held users: RSS ${HELD} KiB, ${per} B per user above the baseline"
echo "RESULT {\"users\":$held,\"baseline_kib\":$BASE,\"held_kib\":$HELD,\"bytes_per_user\":$per,\"bin\":\"$IM\"}" | tee "$BENCH_OUT/im-idle.txt"

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
#   CLUSTER_ROUTE_BIN [target/release/swocloud]: the Route binary (A/B runs)
#   CLUSTER_LABEL [""]: a prefix for the log and summary files (A/B runs)
#   CLUSTER_ROUTE_MSG_RATE [unset: the Route's default, 20000]: the Route's
#     max_messages_per_second (0: no limit). It applies to every WebSocket,
#     the IM servers' links included: one IM server forwarding more than
#     that many messages a second has its link closed with 1008 (and the
#     frames over the limit are dropped), so u2u saturation past 20,000
#     msg/s needs it raised
#   CLUSTER_INBOX [true]: the inbox setting of the Route and both IM
#     servers (false: the fire-and-forget path, to measure what storing
#     every message costs; scripts/bench_inbox.sh runs both)
#   CLUSTER_REPLAY [10000]: with the inbox on, after the runs, queue this
#     many messages for one offline user through /api/send, then time its
#     connect until the last one arrived (tests/node/bench_replay.mjs;
#     0: skip)
#   BENCH_OUT [target/bench]
#
# Redis commands per delivered message: `INFO commandstats` is sampled
# before and after each run and at the loadgen's MEASURE_START/MEASURE_END
# markers; the `calls` delta (every command but our own INFO) divided by
# the messages received is printed per run, for the whole run (connecting
# 10,000 users and their presence writes included) and for the measured
# window only (the message path plus whatever periodic work fell into it,
# e.g. the IM servers' presence refresh: HSET + EXPIRE per user every 10 s),
# with the top commands, and the window's HGETALL + HMGET + PUBLISH (the
# commands a message itself can cost) per message.
# u2u senders are users; the IM server closes a user sending more than
# max_messages_per_second (200) with 1008, so u2u saturation is capped at
# CLUSTER_REDIS: single (a private redis-server, the default), cluster (a
# private 3-master, 3-replica Redis Cluster, sharded pub/sub) or
# cluster-classic (the same with classic PUBLISH/SUBSCRIBE).
# CLUSTER_SENDERS x 200 msg/s: use CLUSTER_SENDERS=256 to measure past
# 12,800 msg/s. api-send has CLUSTER_HTTP_CONNS requests in flight at most.
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
CLUSTER_INBOX=${CLUSTER_INBOX:-true}
CLUSTER_REPLAY=${CLUSTER_REPLAY:-10000}
BENCH_OUT=${BENCH_OUT:-target/bench}

LOADGEN=target/release/examples/loadgen
ROUTE=${CLUSTER_ROUTE_BIN:-target/release/swocloud}
CLUSTER_LABEL=${CLUSTER_LABEL:-}
CLUSTER_REDIS=${CLUSTER_REDIS:-single}
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
REDIS_CLUSTER_PORTS=()
LG_PID=""
cleanup() {
    [[ -n $LG_PID ]] && kill -TERM "$LG_PID" 2>/dev/null || true
    declare -F bench_cluster_down >/dev/null && bench_cluster_down "$WORK" "$ROUTE" "$IM" "$BENCH_OUT" "${CLUSTER_LABEL}cluster-"
    [[ -n $REDIS_PORT ]] && redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    declare -F stop_private_redis_cluster >/dev/null && stop_private_redis_cluster
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'trap - INT TERM; log "interrupted"; exit 130' INT TERM

# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

log "building"
cargo build --release --quiet --bin swocloud --bin swocloud-im --example loadgen

case $CLUSTER_REDIS in
single) start_private_redis "$WORK" || die "the private Redis did not start" ;;
cluster | cluster-classic)
    start_private_redis_cluster "$WORK" || die "the private Redis Cluster did not start"
    [[ $CLUSTER_REDIS == cluster-classic ]] && REDIS_SETTINGS="$REDIS_SETTINGS
redis_cluster_pubsub = \"classic\""
    ;;
*) die "CLUSTER_REDIS must be single, cluster or cluster-classic" ;;
esac

bench_cluster_up "$WORK" "$ROUTE" "$IM" "inbox = $CLUSTER_INBOX
${CLUSTER_ROUTE_MSG_RATE:+max_messages_per_second = $CLUSTER_ROUTE_MSG_RATE}" "inbox = $CLUSTER_INBOX" || die "the cluster did not start"
log "cluster up: Route 127.0.0.1:$RPORT ($ROUTE), IM servers $IMS ($IM), Redis $CLUSTER_REDIS ${REDIS_PORT:-${REDIS_MASTER_PORTS[*]}}"

# Redis commands per message: `INFO commandstats` snapshots (on a cluster,
# of every master, summed), and the CPU every Redis process used (`INFO
# cpu`, masters and replicas: classic pub/sub costs on every node).
snap() {
    local p
    : >"$1"
    if [[ $CLUSTER_REDIS == single ]]; then
        redis-cli -p "$REDIS_PORT" INFO commandstats >>"$1" 2>/dev/null || :
        redis-cli -p "$REDIS_PORT" INFO cpu >>"$1" 2>/dev/null || :
    else
        for p in "${REDIS_MASTER_PORTS[@]}"; do
            redis-cli -p "$p" INFO commandstats >>"$1" 2>/dev/null || :
        done
        for p in "${REDIS_CLUSTER_PORTS[@]}"; do
            redis-cli -p "$p" INFO cpu >>"$1" 2>/dev/null || :
        done
    fi
}
watch_markers() { # LOGFILE: copies loadgen's output, snapshots at its markers
    local l
    while IFS= read -r l; do
        printf '%s\n' "$l" >>"$1"
        case $l in
        MEASURE_START) snap "$WORK/cs-ms" ;;
        MEASURE_END) snap "$WORK/cs-me" ;;
        esac
    done
}

RESULTS="$WORK/results.txt"
: >"$RESULTS"
run() { # MODE RATE LABEL
    local mode=$1 rate=$2 label=$3 logf="$BENCH_OUT/${CLUSTER_LABEL}loadgen-cluster-$3.log" line
    log "$label: $mode, $CLUSTER_USERS users, window $CLUSTER_WINDOW, rate cap $rate"
    : >"$logf"
    rm -f "$WORK/cs-ms" "$WORK/cs-me"
    snap "$WORK/cs-before"
    timeout $((CLUSTER_DURATION + CLUSTER_WARMUP + 150)) "$LOADGEN" "$mode" --ims "$IMS" \
        --route "http://127.0.0.1:$RPORT" --users "$CLUSTER_USERS" --uid-prefix "${label}_" \
        --src-ips 127.0.0.10-127.0.0.29 --window "$CLUSTER_WINDOW" \
        --http-conns "$CLUSTER_HTTP_CONNS" --senders "$CLUSTER_SENDERS" --rate "$rate" \
        --duration "$CLUSTER_DURATION" --warmup "$CLUSTER_WARMUP" > >(watch_markers "$logf") 2>&1 &
    LG_PID=$!
    wait "$LG_PID" || log "loadgen exited with $? (log: $logf)"
    LG_PID=""
    sleep 0.2 # the marker watcher has copied the last lines
    snap "$WORK/cs-after"
    grep -v '^RESULT\|^MEASURE' "$logf" | sed 's/^/    /' >&2 || true
    line=$(sed -n 's/^RESULT //p' "$logf")
    if [[ -n $line ]]; then
        line=$(python3 - "$WORK" "$line" <<'PY'
import json, sys
work, res = sys.argv[1], json.loads(sys.argv[2])
def load(name):
    out = {}
    try:
        for l in open(f"{work}/{name}"):
            if l.startswith("cmdstat_"):
                k, v = l.strip()[8:].split(":", 1)
                out[k] = out.get(k, 0) + int(dict(x.split("=") for x in v.split(","))["calls"])
            elif l.startswith(("used_cpu_sys:", "used_cpu_user:")):
                # Redis CPU seconds, summed over the nodes (as µs).
                k, v = l.strip().split(":", 1)
                out["cpu_us"] = out.get("cpu_us", 0) + int(float(v) * 1e6)
    except OSError:
        return None
    return out
def delta(a, b):
    if a is None or b is None:
        return None
    d = {k: b.get(k, 0) - a.get(k, 0) for k in b if k != "info"}
    return {k: v for k, v in d.items() if v > 0}
def cpu(d, msgs):
    return round(d.pop("cpu_us", 0) / msgs, 2) if d is not None and msgs else None
# The commands a message can cost (presence lookup, server details, relay);
# the rest is periodic (presence refresh, lease renewals) or per connection.
PATH = ("hgetall", "hmget", "publish")
def put(tag, d, msgs):
    if d is None:
        return
    res[f"redis_cpu_us_per_msg_{tag}"] = cpu(d, msgs)
    total = sum(d.values())
    path = sum(d.get(k, 0) for k in PATH)
    res[f"redis_calls_{tag}"] = total
    res[f"redis_per_msg_{tag}"] = round(total / msgs, 4) if msgs else None
    res[f"redis_path_per_msg_{tag}"] = round(path / msgs, 4) if msgs else None
    res[f"redis_top_{tag}"] = dict(sorted(d.items(), key=lambda kv: -kv[1])[:6])
put("run", delta(load("cs-before"), load("cs-after")), res.get("received", 0))
put("window", delta(load("cs-ms"), load("cs-me")),
    round(res.get("received_per_s", 0) * res.get("duration_s", 0)))
print(json.dumps(res))
PY
)
        python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print("    Redis commands: run %s (%s per received message, top %s); window %s (%s per message, HGETALL+HMGET+PUBLISH %s per message, top %s)" % tuple(r.get(k) for k in ("redis_calls_run","redis_per_msg_run","redis_top_run","redis_calls_window","redis_per_msg_window","redis_path_per_msg_window","redis_top_window")))' "$line" >&2 || true
        echo "$mode $rate $line" >>"$RESULTS"
    fi
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
if [[ $CLUSTER_INBOX == true && $CLUSTER_REPLAY != 0 ]]; then
    log "replay: $CLUSTER_REPLAY messages queued for an offline user, then its connect"
    line=$(node tests/node/bench_replay.mjs "http://127.0.0.1:$RPORT" "replay_$$" "$CLUSTER_REPLAY" | sed -n 's/^RESULT //p')
    log "replay: $line"
    [[ -n $line ]] && echo "replay 0 $line" >>"$RESULTS"
fi
log "Route /metrics after the runs (errors, drops):"
curl -s "http://127.0.0.1:$RPORT/metrics" | grep -E '^swocloud_[a-z_]*(error|drop|dropped|slow|fail|overflow|refused)[a-z_]* ' | sed 's/^/    /' >&2 || true

python3 - "$RESULTS" <<'PY' | tee "$BENCH_OUT/${CLUSTER_LABEL}summary-cluster.txt"
import json, statistics, sys
rows = {}
for l in open(sys.argv[1]):
    mode, rate, js = l.split(" ", 2)
    rows.setdefault((mode, float(rate)), []).append(json.loads(js))
def ms(xs):
    return f"median {statistics.median(xs):.0f} (min {min(xs):.0f}, max {max(xs):.0f}, n={len(xs)})"
for (mode, rate), rs in sorted(rows.items()):
    if mode == "replay":
        r = rs[0]
        print(f"replay: {r['messages']} queued messages received in {r['replay_ms']:.0f} ms"
              f" ({r['per_s']:.0f} msg/s) after connect; queued at {r['fill_per_s']:.0f} msg/s")
        continue
    print(f"{mode} {'saturation (window)' if rate == 0 else f'paced at {rate:.0f} msg/s'}:")
    for k in ("sent_per_s", "received_per_s", "p50_us", "p99_us", "max_us", "lost", "errors"):
        print(f"  {k:15} {ms([r[k] for r in rs])}")
    xs = [r["redis_path_per_msg_window"] for r in rs if r.get("redis_path_per_msg_window") is not None]
    if xs:
        print(f"  redis/msg path   median {statistics.median(xs):.4f} (min {min(xs):.4f}, max {max(xs):.4f}, n={len(xs)})"
              " (window; HGETALL+HMGET+PUBLISH only)")
    for tag in ("run", "window"):
        xs = [r[f"redis_per_msg_{tag}"] for r in rs if r.get(f"redis_per_msg_{tag}") is not None]
        if xs:
            print(f"  redis/msg {tag:6} median {statistics.median(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"
                  f"; top (last run) {rs[-1].get(f'redis_top_{tag}')}")
print("RESULT " + json.dumps({f"{m}@{r:.0f}": rs for (m, r), rs in rows.items()}))
PY
log "logs in $BENCH_OUT/"

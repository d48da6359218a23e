#!/usr/bin/env bash
# scripts/bench_capacity.sh: the capacity model's measurements (issue 13).
# On a private 3-master, 3-replica Redis Cluster (sharded pub/sub), a
# Route and two IM servers (lib.sh's bench_cluster_up) go through one
# event at a time while `INFO commandstats` of every master is read before
# and after: Redis commands (calls, counting those a Lua script makes) and
# Redis CPU (usec) per event, split into the master of the registry's slot
# (`{im_server}`) and the others. scripts/capacity_model.py turns them into
# per-event costs and extrapolates them to a deployment (CAP_* below).
#
# Phases: idle (nothing but the daemons, CAP_IDLE_S); register, heartbeat
# and unregister (CAP_SERVERS fake IM servers: loadgen register); /route
# (loadgen http, one uid); connect (with the checks 1 s and 5 s after),
# CAP_CONNECTED_S connected and disconnect (CAP_USERS users, one message a
# second between them); user→user sends and /api/send
# (paced at CAP_RATE msg/s); group join and group send (CAP_GROUP
# members, CAP_GROUP_MSGS sends).
# CAP_ROUTE_EXTRA and CAP_IM_EXTRA are settings lines for the daemons
# (e.g. CAP_IM_EXTRA="presence_refresh = 60").
# Output: $BENCH_OUT/${CAP_LABEL}capacity.json and the model's table
# ($BENCH_OUT/summary-${CAP_LABEL}capacity.txt).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BENCH_OUT=${BENCH_OUT:-target/bench}
CAP_IDLE_S=${CAP_IDLE_S:-10}
CAP_SERVERS=${CAP_SERVERS:-100}
CAP_HB_S=${CAP_HB_S:-12}
CAP_USERS=${CAP_USERS:-2000}
CAP_RATE=${CAP_RATE:-2000}
CAP_SEND_S=${CAP_SEND_S:-5}
CAP_CONNECTED_S=${CAP_CONNECTED_S:-20}
CAP_GROUP=${CAP_GROUP:-1000}
CAP_GROUP_MSGS=${CAP_GROUP_MSGS:-200}
ROUTE=target/release/swocloud
IM=target/release/swocloud-im
LG=target/release/examples/loadgen

log() { printf '[bench-capacity %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
command -v redis-server >/dev/null || die "redis-server is needed (scripts/setup.sh)"
mkdir -p "$BENCH_OUT"
WORK=$(mktemp -d)
REDIS_CLUSTER_PORTS=()
REDIS_PORT=""
LG_PID=""
cleanup() {
    [[ -n $LG_PID ]] && kill -TERM "$LG_PID" 2>/dev/null || true
    declare -F bench_cluster_down >/dev/null && bench_cluster_down "$WORK" "$ROUTE" "$IM" "$BENCH_OUT" capacity-
    declare -F stop_private_redis_cluster >/dev/null && stop_private_redis_cluster
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'trap - INT TERM; log "interrupted"; exit 130' INT TERM
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

log "building"
cargo build --release --quiet --bin swocloud --bin swocloud-im --example loadgen
start_private_redis_cluster "$WORK" || die "the private Redis Cluster did not start"
bench_cluster_up "$WORK" "$ROUTE" "$IM" "${CAP_ROUTE_EXTRA:-}" "${CAP_IM_EXTRA:-}" || die "the cluster did not start"
REGISTRY_PORT=$(python3 - "${REDIS_MASTER_PORTS[0]}" <<'PY'
import subprocess, sys
port = sys.argv[1]
slot = int(subprocess.check_output(["redis-cli", "-p", port, "CLUSTER", "KEYSLOT", "im_server"]))
for line in subprocess.check_output(["redis-cli", "-p", port, "CLUSTER", "NODES"], text=True).splitlines():
    f = line.split()
    if "master" not in f[2]:
        continue
    for r in f[8:]:
        a, _, b = r.partition("-")
        if a.isdigit() and int(a) <= slot <= int(b or a):
            print(f[1].split(":")[1].split("@")[0])
PY
)
# The one uid /route is asked for and the one group are placed on the same
# master, not the registry's: the third master carries only spread load
# (many users' keys), which is what the registry's master carries beside
# the registry (capacity_model.py takes the difference).
read -r ONE_UID ONE_GROUP PLAIN_PORT < <(python3 - "$REGISTRY_PORT" "${REDIS_MASTER_PORTS[@]}" <<'PY'
import subprocess, sys
registry, masters = sys.argv[1], sys.argv[2:]
owner = {}
for line in subprocess.check_output(["redis-cli", "-p", registry, "CLUSTER", "NODES"], text=True).splitlines():
    f = line.split()
    if "master" in f[2]:
        for r in f[8:]:
            a, _, b = r.partition("-")
            if a.isdigit():
                owner[(int(a), int(b or a))] = f[1].split(":")[1].split("@")[0]
def node(key):
    slot = int(subprocess.check_output(["redis-cli", "-p", registry, "CLUSTER", "KEYSLOT", key]))
    return next(p for (a, b), p in owner.items() if a <= slot <= b)
x = next(p for p in masters if p != registry)
y = next(p for p in masters if p not in (registry, x))
uid = next(f"cap{i}" for i in range(1000) if node(f"{{cap{i}}}") == x)
group = next(f"capgroup{i}" for i in range(1000) if node(f"{{capgroup{i}}}") == x)
print(uid, group, y)
PY
)
log "up: Route 127.0.0.1:$RPORT, IM servers $IMS, masters ${REDIS_MASTER_PORTS[*]} (registry slot on $REGISTRY_PORT; $ONE_UID and $ONE_GROUP on another; $PLAIN_PORT spread load only)"

PHASES="$WORK/phases.jsonl"
: >"$PHASES"
N=0
# snap: every master's INFO commandstats into $WORK/snap<N>.<port>; echoes N.
snap() {
    local p
    N=$((N + 1))
    for p in "${REDIS_MASTER_PORTS[@]}"; do
        redis-cli -p "$p" INFO commandstats >"$WORK/snap$N.$p"
    done
}
# phase NAME COUNT UNIT FROM TO SECONDS: one event's figures, from snapshot
# FROM to TO (SECONDS long: the idle rate is taken off).
phase() {
    printf '{"name":"%s","count":%s,"unit":"%s","from":%s,"to":%s,"seconds":%s}\n' "$@" >>"$PHASES"
}
# wait_line FILE PATTERN: until PATTERN is in FILE (loadgen's output).
wait_line() {
    for _ in $(seq 1200); do
        grep -q "$2" "$1" 2>/dev/null && return 0
        [[ -n $LG_PID ]] && ! kill -0 "$LG_PID" 2>/dev/null && grep -q "$2" "$1" && return 0
        sleep 0.05
    done
    die "no '$2' in $1: $(tail -3 "$1")"
}
now() { date +%s.%N; }
result() { grep '^RESULT ' "$1" | tail -1 | cut -c8-; }

log "idle ${CAP_IDLE_S}s"
snap; a=$N; t=$(now); sleep "$CAP_IDLE_S"; snap
phase idle 1 "second" "$a" "$N" "$(python3 -c "print($(now)-$t)")"

log "register $CAP_SERVERS fake IM servers, heartbeat ${CAP_HB_S}s (ping 3 s, as route_heartbeat)"
out=$WORK/register.out
snap; a=$N; t0=$(now)
"$LG" register --url "ws://127.0.0.1:$RPORT/" --count "$CAP_SERVERS" --first 100 \
    --ping-ms 3000 --hold "$CAP_HB_S" >"$out" 2>&1 &
LG_PID=$!
wait_line "$out" "^REGISTERED"
snap; b=$N; t1=$(now)
wait_line "$out" "RESULT"
snap; c=$N; t2=$(now)
wait "$LG_PID" || true
LG_PID=""
sleep 3
snap; d=$N; t3=$(now)
phase register "$CAP_SERVERS" "registration" "$a" "$b" "$(python3 -c "print($t1-$t0)")"
phase heartbeat "$(python3 -c "print($CAP_SERVERS*($t2-$t1)/3)")" "heartbeat (3 s)" "$b" "$c" "$(python3 -c "print($t2-$t1)")"
phase unregister "$CAP_SERVERS" "registration closed" "$c" "$d" "$(python3 -c "print($t3-$t2)")"

log "/route"
out=$WORK/route.out
snap; a=$N; t0=$(now)
"$LG" http --url "http://127.0.0.1:$RPORT/route?uid=$ONE_UID" --conns 4 --duration 3 --warmup 0 >"$out" 2>&1
snap
phase route "$(result "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')" "lookup" "$a" "$N" "$(python3 -c "print($(now)-$t0)")"

# users: connect, then paced sends; the snapshots bracket each part.
# users NAME MODE RATE SECONDS [EXTRA...]
users() {
    local name=$1 mode=$2 rate=$3 secs=$4 a b c d t0 t1 t2 t3 sent
    shift 4
    out=$WORK/$name.out
    snap; a=$N; t0=$(now)
    "$LG" "$mode" --ims "$IMS" --users "$CAP_USERS" --uid-prefix "$name" --rate "$rate" \
        --duration "$secs" --warmup 0 "$@" >"$out" 2>&1 &
    LG_PID=$!
    wait_line "$out" "users up"
    # A connection is checked 1 s and 5 s after it opens: that is the
    # connect's cost, so the idle part starts 6 s later.
    [[ $name == idle_users ]] && sleep 6
    snap; b=$N; t1=$(now)
    if [[ $name == idle_users ]]; then
        sleep "$CAP_CONNECTED_S"
    else
        wait_line "$out" "received.*msg/s"
    fi
    snap; c=$N; t2=$(now)
    wait "$LG_PID" || true
    LG_PID=""
    sleep 3
    snap; d=$N; t3=$(now)
    sent=$(result "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["sent"])')
    [[ $name == idle_users ]] && {
        phase connect "$CAP_USERS" "connection" "$a" "$b" "$(python3 -c "print($t1-$t0)")"
        phase users_idle "$(python3 -c "print($CAP_USERS*($t2-$t1))")" "user-second connected (1 msg/s in all)" "$b" "$c" "$(python3 -c "print($t2-$t1)")"
        phase disconnect "$CAP_USERS" "disconnection" "$c" "$d" "$(python3 -c "print($t3-$t2)")"
    }
    [[ $name != idle_users ]] && phase "$name" "$sent" "message" "$b" "$c" "$(python3 -c "print($t2-$t1)")"
    return 0
}
log "$CAP_USERS users: connect, ${CAP_CONNECTED_S}s connected, disconnect"
users idle_users u2u 1 "$((CAP_CONNECTED_S + 8))" --senders 1
log "user→user at $CAP_RATE msg/s"
users send u2u "$CAP_RATE" "$CAP_SEND_S" --senders 64
log "/api/send at $CAP_RATE msg/s"
users api_send api-send "$CAP_RATE" "$CAP_SEND_S" --route "http://127.0.0.1:$RPORT"

log "group of $CAP_GROUP members, $CAP_GROUP_MSGS sends"
out=$WORK/group.out
snap; a=$N
"$LG" group --route "http://127.0.0.1:$RPORT" --ims "$IMS" --users "$CAP_GROUP" --group "$ONE_GROUP" \
    --messages "$CAP_GROUP_MSGS" --window 4 >"$out" 2>&1 &
LG_PID=$!
wait_line "$out" "members up"
snap; b=$N; t1=$(now)
wait_line "$out" "joins answered"
snap; c=$N; t2=$(now)
wait_line "$out" "MEASURE_START"
snap; d=$N; t3=$(now)
wait_line "$out" "MEASURE_END"
snap; e=$N; t4=$(now)
wait "$LG_PID" || true
LG_PID=""
g=$(result "$out")
phase group_join "$CAP_GROUP" "join" "$b" "$c" "$(python3 -c "print($t2-$t1)")"
phase group_send "$(echo "$g" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["group_sends_total"]-r["warmup_messages"])')" "group message ($CAP_GROUP members)" "$d" "$e" "$(python3 -c "print($t4-$t3)")"

python3 - "$WORK" "$PHASES" "$REGISTRY_PORT" "$PLAIN_PORT" "${REDIS_MASTER_PORTS[@]}" >"$BENCH_OUT/${CAP_LABEL:-}capacity.json" <<'PY'
import json, sys
work, phases, registry, plain, masters = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
def stats(n, port):
    out = {}
    for line in open(f"{work}/snap{n}.{port}"):
        if line.startswith("cmdstat_"):
            name, _, rest = line.strip()[8:].partition(":")
            kv = dict(x.split("=") for x in rest.split(","))
            out[name] = (int(kv["calls"]), int(kv["usec"]))
    return out
def delta(a, b, port):
    sa, sb = stats(a, port), stats(b, port)
    return {k: (v[0] - sa.get(k, (0, 0))[0], v[1] - sa.get(k, (0, 0))[1])
            for k, v in sb.items() if v[0] - sa.get(k, (0, 0))[0] > 0}
# INFO commandstats itself is counted: one per master per snapshot.
rows = []
for line in open(phases):
    p = json.loads(line)
    per = {}
    for port in masters:
        d = delta(p["from"], p["to"], port)
        # Not the daemons': the snapshots themselves, and the replicas' acks.
        for own in ("info", "replconf"):
            d.pop(own, None)
        per["registry" if port == registry else "plain" if port == plain else "single_keys"] = d
    p["masters"] = per
    rows.append(p)
print(json.dumps({"registry_port": registry, "plain_port": plain, "masters": masters, "phases": rows}, indent=1))
PY
python3 scripts/capacity_model.py "$BENCH_OUT/${CAP_LABEL:-}capacity.json" | tee "$BENCH_OUT/summary-${CAP_LABEL:-}capacity.txt"

#!/usr/bin/env bash
# scripts/soak.sh: a bounded soak of the IM cluster on loopback. Starts a
# private Redis, a Route (2 workers) and two IM servers (2 workers each,
# on 127.0.0.2 and 127.0.0.3), drives them with examples/im_users.rs
# (thousands of users routing, chatting and reconnecting), samples the RSS,
# open fds and connection counts of every swocloud process every
# SOAK_SAMPLE seconds, and fails if any daemon's figure grows without
# bound: last third's average > first third's × 1.5 + slack.
#
# Environment (defaults in brackets):
#   SOAK_SECONDS [600]  SOAK_USERS [2000]  SOAK_SAMPLE [5]
#   SOAK_EVERY [2] seconds between a user's messages
#   SOAK_LIFETIME [30] longest connection lifetime before a reconnect
#   SOAK_OUT [target/soak]: samples.csv, logs, summary.txt
# Not run by CI (minutes long); run it by hand: SOAK_SECONDS=120 scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SOAK_SECONDS:-600}
USERS=${SOAK_USERS:-2000}
SAMPLE=${SOAK_SAMPLE:-5}
OUT=${SOAK_OUT:-target/soak}
SECRET=soak-secret
rm -rf "$OUT"; mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

cargo build -q --bins --example im_users
BIN=$(pwd)/target/debug
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

PIDS=()
DIRS=()
cleanup() {
    for d in "${DIRS[@]}"; do
        [ -f "$d/pid" ] && kill -KILL -- $(cat "$d/pid") $(pgrep -P "$(cat "$d/pid")" 2>/dev/null) 2>/dev/null || true
    done
    # Workers are grandchildren of each master: kill what is left by config path.
    for d in "${DIRS[@]}"; do
        for p in $(grep -lz -- "$d/s.toml" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3 || true); do
            kill -KILL "$p" 2>/dev/null || true
        done
    done
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

RPORT=$(free_port 127.0.0.1)
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no >"$OUT/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

start() { # name bin host extra; sets ADDR
    local d="$OUT/$1" port; port=$(free_port "$3")
    mkdir -p "$d"; DIRS+=("$d")
    printf 'host = "%s"\nport = %s\npid_file = "%s/pid"\nlog_file = "%s/log"\nredis_url = "redis://127.0.0.1:%s/"\nauth_secret = "%s"\nworker_num = 2\n%b' \
        "$3" "$port" "$d" "$d" "$RPORT" "$SECRET" "$4" >"$d/s.toml"
    "$BIN/$2" start -d -c "$d/s.toml" >/dev/null
    ADDR="$3:$port"
}
start route swocloud 127.0.0.1 ""
ROUTE=$ADDR
start im0 swocloud-im 127.0.0.2 "route_url = \"ws://$ROUTE/\"\nservice_name = \"IM_0\"\n"
start im1 swocloud-im 127.0.0.3 "route_url = \"ws://$ROUTE/\"\nservice_name = \"IM_1\"\n"
for _ in $(seq 100); do
    n=$(curl -s "http://$ROUTE/api/servers" | python3 -c "import json,sys;print(json.load(sys.stdin)['count'])" 2>/dev/null || echo 0)
    [ "$n" = 2 ] && break; sleep 0.1
done
echo "soak: Route $ROUTE, 2 IM servers, $USERS users, ${SECS}s, samples every ${SAMPLE}s → $OUT"

"$BIN/examples/im_users" --route "$ROUTE" --secret "$SECRET" --users "$USERS" --duration "$SECS" \
    --every "${SOAK_EVERY:-2}" --lifetime "${SOAK_LIFETIME:-30}" >"$OUT/users.log" 2>&1 &
LOAD=$!; PIDS+=($LOAD)

echo "t,daemon,procs,rss_kib,fds,conns" >"$OUT/samples.csv"
t0=$(date +%s)
while kill -0 "$LOAD" 2>/dev/null; do
    t=$(( $(date +%s) - t0 ))
    for d in "${DIRS[@]}"; do
        name=$(basename "$d"); procs=0; rss=0; fds=0
        for p in $(grep -lz -- "$d/s.toml" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3 || true); do
            # Threads can show up too: count each process once.
            [ "$(awk '/^Tgid/{print $2}' "/proc/$p/status" 2>/dev/null || true)" = "$p" ] || continue
            r=$(awk '/VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null || true)
            f=$(ls "/proc/$p/fd" 2>/dev/null | wc -l || true)
            procs=$((procs+1)); rss=$((rss+${r:-0})); fds=$((fds+f))
        done
        conns=$("$BIN/$( [ "$name" = route ] && echo swocloud || echo swocloud-im)" status --json -c "$d/s.toml" 2>/dev/null \
            | python3 -c "import json,sys
d=json.load(sys.stdin); print(sum(w.get('connections',0) for w in d.get('workers',[])))" 2>/dev/null || echo -1)
        echo "$t,$name,$procs,$rss,$fds,$conns" >>"$OUT/samples.csv"
    done
    sleep "$SAMPLE"
done
wait "$LOAD" || true
tail -1 "$OUT/users.log"

python3 - "$OUT/samples.csv" <<'PY' | tee "$OUT/summary.txt"
import csv, sys, collections
rows = list(csv.DictReader(open(sys.argv[1])))
by = collections.defaultdict(list)
for r in rows: by[r["daemon"]].append(r)
bad = []
slack = {"rss_kib": 20 * 1024, "fds": 200, "conns": 500}
print(f"{'daemon':8} {'metric':8} {'first3':>10} {'last3':>10} {'max':>10} verdict")
for name, rs in sorted(by.items()):
    n = len(rs)
    if n < 3:
        print(f"{name}: only {n} samples"); continue
    for m in ("rss_kib", "fds", "conns"):
        v = [float(r[m]) for r in rs if float(r[m]) >= 0]
        if len(v) < 3: continue
        k = len(v) // 3
        first, last = sum(v[:k]) / k, sum(v[-k:]) / k
        ok = last <= first * 1.5 + slack[m]
        print(f"{name:8} {m:8} {first:10.0f} {last:10.0f} {max(v):10.0f} {'ok' if ok else 'GROWS'}")
        if not ok: bad.append(f"{name} {m}")
    procs = {r["procs"] for r in rs}
    print(f"{name:8} procs    {sorted(procs)}")
print("FAIL: " + ", ".join(bad) if bad else "PASS: nothing grows without bound")
sys.exit(1 if bad else 0)
PY

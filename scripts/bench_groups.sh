#!/usr/bin/env bash
# scripts/bench_groups.sh: one big group over two IM servers (issue 14).
#
# Starts a private redis-server, a Route (`swocloud start -d`, 2 workers, on
# 127.0.0.1) and two IM servers (`swocloud-im start -d`, 2 workers each,
# max_conn 20000, on 127.0.0.2 and 127.0.0.3, no auth_secret), as
# scripts/bench_cluster.sh does, then runs `loadgen group` once:
#   GROUP_USERS members connect to the IM servers (alternating, source
#   addresses over 127.0.0.10-127.0.0.29) and join one fresh group through
#   the Route; once the Route counts them all online, GROUP_MESSAGES
#   `POST /api/groups/send` with at most GROUP_WINDOW in flight (a message
#   is complete when every member has it): deliveries/s, the API call to
#   the last member (p50/p99/max), lost frames; then, in the same run, one
#   `POST /api/send` to each of GROUP_SAMPLE of the same members
#   (GROUP_HTTP_CONNS in flight): the time until all arrived, deliveries/s.
# Internal messages per group send: both IM servers'
# swocloud_im_group_messages_received_total before and after the run,
# divided by the group sends (warm-up included); it must equal the IM
# servers holding members (2), and each server must have got every send.
# Redis commands per send: `INFO commandstats` at the loadgen's markers
# (MEASURE_START/MEASURE_END around the measured group sends,
# SEND_START/SEND_END around the one-by-one sends; the loadgen pauses
# --settle-ms after each), the `calls` delta per send, all of it and without
# the IM servers' background work that falls into the windows whatever is
# sent: the presence refresh (HSET + EXPIRE per user every 10 s) and the
# inbox check sweep (HMGET per connection every inbox_check_interval, 30 s).
# The per-command table shows what is left: a group send's script
# (EVALSHA + SCARD, HGET x2, HINCRBY, XADD, PEXPIRE, HGETALL), plus one
# XRANGE per local member whenever an IM server receives group messages
# out of gseq order (two Route workers store and relay concurrently; each
# member's feed then reads the gap from the stream: GROUP_WINDOW=1 has none).
# Prints a summary and one `RESULT {json}` line; everything it started is
# stopped on exit.
#
# Environment (defaults in brackets):
#   GROUP_USERS [10000] GROUP_MESSAGES [200] GROUP_WINDOW [4]
#   GROUP_HTTP_CONNS [16] GROUP_SAMPLE [0: every member] GROUP_THREADS [1]
#   GROUP_IM_BIN [target/release/swocloud-im]
#   GROUP_ROUTE_BIN [target/release/swocloud]
#   BENCH_OUT [target/bench]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

GROUP_USERS=${GROUP_USERS:-10000}
GROUP_MESSAGES=${GROUP_MESSAGES:-200}
GROUP_WINDOW=${GROUP_WINDOW:-4}
GROUP_HTTP_CONNS=${GROUP_HTTP_CONNS:-16}
GROUP_SAMPLE=${GROUP_SAMPLE:-0}
GROUP_THREADS=${GROUP_THREADS:-1}
BENCH_OUT=${BENCH_OUT:-target/bench}

LOADGEN=target/release/examples/loadgen
ROUTE=${GROUP_ROUTE_BIN:-target/release/swocloud}
IM=${GROUP_IM_BIN:-target/release/swocloud-im}

log() { printf '[bench-groups %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
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
    declare -F bench_cluster_down >/dev/null && bench_cluster_down "$WORK" "$ROUTE" "$IM" "$BENCH_OUT" "groups-"
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

bench_cluster_up "$WORK" "$ROUTE" "$IM" || die "the cluster did not start"
log "cluster up: Route 127.0.0.1:$RPORT ($ROUTE), IM servers $IMS ($IM), Redis $REDIS_PORT"

# Each IM server's group-message counter, one line each.
im_counters() {
    local hp
    for hp in "${IM_HP[@]}"; do
        curl -s "http://$hp/metrics" | awk '$1 == "swocloud_im_group_messages_received_total" { print $2; f = 1 } END { if (!f) print "nan" }'
    done
}
snap() { redis-cli -p "$REDIS_PORT" INFO commandstats >"$1" 2>/dev/null || : >"$1"; }
watch_markers() { # LOGFILE: copies loadgen's output, snapshots at its markers
    local l
    while IFS= read -r l; do
        printf '%s\n' "$l" >>"$1"
        case $l in
        MEASURE_START) snap "$WORK/cs-gs" ;;
        MEASURE_END) snap "$WORK/cs-ge" ;;
        SEND_START) snap "$WORK/cs-ss" ;;
        SEND_END) snap "$WORK/cs-se" ;;
        esac
    done
}

LOGF="$BENCH_OUT/loadgen-groups.log"
: >"$LOGF"
im_counters >"$WORK/im-before"
log "group: $GROUP_USERS members, $GROUP_MESSAGES messages, window $GROUP_WINDOW; then one /api/send each"
timeout 900 "$LOADGEN" --threads "$GROUP_THREADS" group --ims "$IMS" \
    --route "http://127.0.0.1:$RPORT" --users "$GROUP_USERS" --uid-prefix "g$$_" \
    --group "bench_$$" --src-ips 127.0.0.10-127.0.0.29 --messages "$GROUP_MESSAGES" \
    --window "$GROUP_WINDOW" --http-conns "$GROUP_HTTP_CONNS" --sample "$GROUP_SAMPLE" \
    > >(watch_markers "$LOGF") 2>&1 &
LG_PID=$!
wait "$LG_PID" || log "loadgen exited with $? (log: $LOGF)"
LG_PID=""
sleep 0.3 # the marker watcher has copied the last lines
im_counters >"$WORK/im-after"
grep -v '^RESULT\|^MEASURE\|^SEND_' "$LOGF" | sed 's/^/    /' >&2 || true
line=$(sed -n 's/^RESULT //p' "$LOGF")
[[ -n $line ]] || die "no RESULT from the loadgen (log: $LOGF)"

python3 - "$WORK" "$line" <<'PY' | tee "$BENCH_OUT/summary-groups.txt"
import json, sys
work, res = sys.argv[1], json.loads(sys.argv[2])
def nums(name):
    return [float(x) for x in open(f"{work}/{name}").read().split()]
before, after = nums("im-before"), nums("im-after")
delta = [int(a - b) for a, b in zip(after, before)]
sends = res["group_sends_total"]
holding = res["ims"]  # every IM server holds members (they alternate)
per_send = sum(delta) / sends if sends else float("nan")
ok = sends > 0 and all(d == sends for d in delta) and per_send == holding
res["internal"] = {"im_delta": delta, "group_sends": sends, "per_send": per_send,
                   "servers_holding_members": holding, "check": "ok" if ok else "FAILED"}
def load(name):
    out = {}
    try:
        for l in open(f"{work}/{name}"):
            if l.startswith("cmdstat_"):
                k, v = l.strip()[8:].split(":", 1)
                out[k] = int(dict(x.split("=") for x in v.split(","))["calls"])
    except OSError:
        return None
    return out
# The IM servers' background work (presence refresh, inbox check sweep) is
# no part of a send; it is shown apart.
REFRESH = ("hset", "expire", "hmget")
def redis(tag, a, b, n):
    a, b = load(a), load(b)
    if a is None or b is None or not n:
        return
    d = {k: b.get(k, 0) - a.get(k, 0) for k in b if k != "info"}
    d = {k: v for k, v in d.items() if v > 0}
    total = sum(d.values())
    rest = total - sum(d.get(k, 0) for k in REFRESH)
    res[f"redis_{tag}"] = {
        "calls": total, "per_send": round(total / n, 3),
        "per_send_without_background": round(rest / n, 3),
        "per_send_by_command": {k: round(v / n, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])},
    }
redis("group", "cs-gs", "cs-ge", res["grp"]["sends_ok"])
redis("one_by_one", "cs-ss", "cs-se", res["one_by_one"]["sent_ok"])
g, o, i = res["grp"], res["one_by_one"], res["internal"]
print(f"group of {res['users']} members over {res['ims']} IM servers "
      f"(joins {res['joins_per_s']:.0f}/s, all online {res['ready_s']:.1f} s after the first join):")
print(f"  {g['messages']} group sends, window {res['window']}: {g['deliveries_per_s']:.0f} deliveries/s "
      f"({g['deliveries']} in {g['elapsed_s']:.2f} s, {g['messages_per_s']:.1f} messages/s)")
print(f"  API call -> last member: p50 {g['p50_us']/1e3:.1f} ms, p99 {g['p99_us']/1e3:.1f} ms, "
      f"max {g['max_us']/1e3:.1f} ms; the API's answer p50 {g['api_answer_p50_us']/1e3:.1f} ms")
print(f"  lost {g['lost']} of {g['expected']}, duplicates {g['duplicates']}, complete {g['complete']}/{g['sends_ok']}")
print(f"  internal messages per group send: {i['per_send']:g} (IM servers' counters +{i['im_delta']} over "
      f"{i['group_sends']} sends, warm-up included; servers holding members: {i['servers_holding_members']}; "
      f"the answers' servers {g['servers_min']}..{g['servers_max']}): {i['check']}")
print(f"one by one: {o['messages']} x POST /api/send, {res['http_conns']} in flight: all {o['received']} "
      f"arrived in {o['elapsed_s']:.2f} s, {o['deliveries_per_s']:.0f} deliveries/s, "
      f"p50 {o['p50_us']/1e3:.1f} ms, p99 {o['p99_us']/1e3:.1f} ms, lost {o['lost']}")
print(f"group vs one by one: {res['group_vs_one_by_one']:.1f}x the deliveries/s; one group message reaches "
      f"every member in {g['p50_us']/1e3:.1f} ms (p50), {o['messages']} single sends take {o['elapsed_s']*1e3:.0f} ms")
for tag, what in (("group", "group send"), ("one_by_one", "/api/send")):
    r = res.get(f"redis_{tag}")
    if r:
        top = dict(list(r["per_send_by_command"].items())[:8])
        print(f"  Redis per {what}: {r['per_send']} commands ({r['per_send_without_background']} without the "
              f"IM servers' background HSET/EXPIRE/HMGET); {top}")
print(f"  errors {res['errors']}")
print("RESULT " + json.dumps(res))
PY
grep -q '"check": "ok"' "$BENCH_OUT/summary-groups.txt" || die "internal messages per group send != IM servers holding members"
log "logs in $BENCH_OUT/"

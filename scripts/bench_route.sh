#!/usr/bin/env bash
# scripts/bench_route.sh: the Route's registry figures (issue 4).
#
# Starts a private redis-server and a Route (`swocloud start -d`, 2 workers,
# 127.0.0.1, free ports, temp dir), registers ROUTE_IMS fake IM servers
# (`loadgen register`: one WebSocket each, the seed's register frame, pings),
# then, in the same run:
#   1. throughput: `GET /api/servers` (the worker's cache) against
#      `GET /api/servers?fresh=1` (a Redis read per request), ROUTE_REPEATS
#      times each, alternating, with `loadgen http` (keep-alive, ROUTE_CONNS
#      connections, ROUTE_DURATION s): requests/s, latency, the ratio;
#   2. failure detection, ROUTE_FAIL_REPEATS times each: a registered
#      `seed_client` process is SIGKILLed (or SIGSTOPped) and the time until
#      its entry leaves `SMEMBERS im_server` is measured (Redis polled every
#      2 ms).
#   3. /route at the HTTP limit (issue 16), for each balancer and each
#      server count in ROUTE_LIMIT_COUNTS, on a Route of its own (2 workers)
#      with that many fake IM servers registered (`loadgen register`, at
#      most ROUTE_LIMIT_PER_LOADGEN per process, for the fd limit):
#      `GET /health` (the worker's plain HTTP ceiling) against
#      `GET /route?uid=u<n>` with a different uid per request, alternating,
#      ROUTE_LIMIT_REPEATS times; requests/s, p99, the ratio. With
#      ROUTE_BASE=<a worktree of other code, e.g. main> the same runs are
#      made on that code's `swocloud` too (built with the same target dir,
#      so only the crate itself is rebuilt), for a before/after ratio.
# Prints `RESULT {json}` lines and a summary; everything it started is
# stopped on exit. A benchmark: it fails only on broken plumbing.
#
#   ROUTE_PARTS ["registry route"]: "registry" runs parts 1 and 2, "route"
#     part 3.
#   ROUTE_LIMIT_COUNTS ["100 10000"] ROUTE_LIMIT_BALANCERS ["least_loaded
#   round_robin consistent_hash"] ROUTE_LIMIT_CONNS [50]
#   ROUTE_LIMIT_DURATION [5] ROUTE_LIMIT_REPEATS [1]
#   ROUTE_LIMIT_PER_LOADGEN [2500] ROUTE_LIMIT_SETTLE [3] (seconds after
#   the registrations before measuring) ROUTE_BASE [unset]
#
# Environment (defaults in brackets):
#   ROUTE_IMS [100] ROUTE_CONNS [32] ROUTE_DURATION [10] ROUTE_WARMUP [1]
#   ROUTE_REPEATS [3] ROUTE_FAIL_REPEATS [5]
#   ROUTE_HB_INTERVAL [1.0] ROUTE_HB_IDLE [3.0]: the Route's
#     heartbeat_check_interval / heartbeat_idle_time (the clients ping every
#     ROUTE_PING_MS [1000] ms)
#   BENCH_OUT [target/bench]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

ROUTE_IMS=${ROUTE_IMS:-100}
ROUTE_CONNS=${ROUTE_CONNS:-32}
ROUTE_DURATION=${ROUTE_DURATION:-10}
ROUTE_WARMUP=${ROUTE_WARMUP:-1}
ROUTE_REPEATS=${ROUTE_REPEATS:-3}
ROUTE_FAIL_REPEATS=${ROUTE_FAIL_REPEATS:-5}
ROUTE_HB_INTERVAL=${ROUTE_HB_INTERVAL:-1.0}
ROUTE_HB_IDLE=${ROUTE_HB_IDLE:-3.0}
ROUTE_PING_MS=${ROUTE_PING_MS:-1000}
BENCH_OUT=${BENCH_OUT:-target/bench}

ROUTE_PARTS=${ROUTE_PARTS:-registry route}
ROUTE_LIMIT_COUNTS=${ROUTE_LIMIT_COUNTS:-100 10000}
ROUTE_LIMIT_BALANCERS=${ROUTE_LIMIT_BALANCERS:-least_loaded round_robin consistent_hash}
ROUTE_LIMIT_CONNS=${ROUTE_LIMIT_CONNS:-50}
ROUTE_LIMIT_DURATION=${ROUTE_LIMIT_DURATION:-5}
ROUTE_LIMIT_REPEATS=${ROUTE_LIMIT_REPEATS:-1}
ROUTE_LIMIT_PER_LOADGEN=${ROUTE_LIMIT_PER_LOADGEN:-2500}
ROUTE_LIMIT_SETTLE=${ROUTE_LIMIT_SETTLE:-3}
ROUTE_BASE=${ROUTE_BASE:-}
part() { [[ " $ROUTE_PARTS " == *" $1 "* ]]; }

LOADGEN=target/release/examples/loadgen
SEED=target/release/examples/seed_client
ROUTE=target/release/swocloud

log() { printf '[bench-route %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
command -v python3 >/dev/null || die "python3 is needed"
command -v redis-server >/dev/null || die "redis-server is needed (scripts/setup.sh)"

mkdir -p "$BENCH_OUT"
WORK=$(mktemp -d)
REDIS_PORT=""
REG_PID=""
LIMIT_REG_PIDS=()
cleanup() {
    [[ -n $REG_PID ]] && kill -TERM "$REG_PID" 2>/dev/null || true
    for p in "${LIMIT_REG_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    if [[ -f $WORK/limit.pid && -n ${LIMIT_BIN:-} ]]; then
        timeout 20 "$LIMIT_BIN" stop -c "$WORK/limit.toml" >/dev/null 2>&1 || true
    fi
    if [[ -f $WORK/route.pid ]]; then
        timeout 20 "$ROUTE" stop -c "$WORK/route.toml" >/dev/null 2>&1 || true
    fi
    [[ -n $REDIS_PORT ]] && redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
    [[ -n $REG_PID ]] && wait "$REG_PID" 2>/dev/null || true
    cp "$WORK/route.log" "$BENCH_OUT/route-bench-route.log" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'trap - INT TERM; log "interrupted"; exit 130' INT TERM

# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

if [[ -n $ROUTE_BASE ]] && part route; then
    mkdir -p target/bench-base
    if [[ -x $ROUTE_BASE/target/release/swocloud ]]; then
        log "the base: $ROUTE_BASE/target/release/swocloud ($(git -C "$ROUTE_BASE" log --oneline -1))"
        cp "$ROUTE_BASE/target/release/swocloud" target/bench-base/swocloud
    else
        log "building the base ($ROUTE_BASE: $(git -C "$ROUTE_BASE" log --oneline -1))"
        cargo build --release --quiet --manifest-path "$ROUTE_BASE/Cargo.toml" \
            --target-dir "$ROOT/target" --bin swocloud
        cp target/release/swocloud target/bench-base/swocloud
    fi
fi
log "building ($(git log --oneline -1))"
cargo build --release --quiet --bin swocloud --example loadgen --example seed_client

start_private_redis "$WORK" || die "the private Redis did not start"

if part registry; then
PORT=$(free_port)
cat >"$WORK/route.toml" <<TOML
host = "127.0.0.1"
port = $PORT
worker_num = 2
pid_file = "$WORK/route.pid"
log_file = "$WORK/route.log"
log_level = "warn"
redis_url = "redis://127.0.0.1:$REDIS_PORT"
heartbeat_check_interval = $ROUTE_HB_INTERVAL
heartbeat_idle_time = $ROUTE_HB_IDLE
# 100 fake IM servers register from one address: lift the per-IP cap (32).
max_registrations_per_ip = 1000
TOML
log "Route on 127.0.0.1:$PORT (2 workers), Redis on $REDIS_PORT; settings:"
sed 's/^/    /' "$WORK/route.toml" >&2
timeout 30 "$ROUTE" start -d -c "$WORK/route.toml" || die "the Route did not start"

timeout $((ROUTE_REPEATS * 2 * (ROUTE_DURATION + 10) + ROUTE_FAIL_REPEATS * 60 + 120)) \
    "$LOADGEN" register --url "ws://127.0.0.1:$PORT/" --count "$ROUTE_IMS" \
    --ping-ms "$ROUTE_PING_MS" --hold 100000 >"$WORK/register.log" 2>&1 &
REG_PID=$!
for _ in $(seq 300); do grep -q '^REGISTERED' "$WORK/register.log" && break; sleep 0.1; done
grep -q "^REGISTERED $ROUTE_IMS\$" "$WORK/register.log" || {
    cat "$WORK/register.log" >&2
    die "the $ROUTE_IMS registrations did not all succeed"
}
count() { curl -s "http://127.0.0.1:$PORT/api/servers$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])'; }
for _ in $(seq 50); do [[ $(count "") == "$ROUTE_IMS" ]] && break; sleep 0.1; done
log "registered: cache says $(count ""), Redis says $(count "?fresh=1"), SCARD $(redis-cli -p "$REDIS_PORT" scard im_server)"
log "answer size: $(curl -s "http://127.0.0.1:$PORT/api/servers" | wc -c) bytes"

# --- 1. throughput ----------------------------------------------------------
RESULTS="$WORK/results.txt"
: >"$RESULTS"
run_http() { # LABEL PATH
    local line
    line=$(timeout $((ROUTE_DURATION + 60)) "$LOADGEN" http --url "http://127.0.0.1:$PORT$2" \
        --conns "$ROUTE_CONNS" --duration "$ROUTE_DURATION" --warmup "$ROUTE_WARMUP" |
        tee -a "$BENCH_OUT/loadgen-route-http.log" | sed -n 's/^RESULT //p')
    [[ -n $line ]] || die "no result for $2"
    echo "$1 $line" >>"$RESULTS"
    log "  $1: $line"
}
for r in $(seq "$ROUTE_REPEATS"); do
    log "throughput, repeat $r/$ROUTE_REPEATS"
    run_http cached "/api/servers"
    run_http fresh "/api/servers?fresh=1"
done

# --- 2. failure detection ---------------------------------------------------
log "failure detection: $ROUTE_FAIL_REPEATS x SIGKILL, $ROUTE_FAIL_REPEATS x SIGSTOP"
python3 - "$REDIS_PORT" "$PORT" "$SEED" "$ROUTE_FAIL_REPEATS" "$ROUTE_PING_MS" >>"$RESULTS" <<'PY'
import json, os, signal, socket, subprocess, sys, time

redis_port, route_port, seed, repeats, ping_ms = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
sock = socket.create_connection(("127.0.0.1", int(redis_port)))
rf = sock.makefile("rb")

def smembers(key):
    sock.sendall(f"*2\r\n$8\r\nSMEMBERS\r\n${len(key)}\r\n{key}\r\n".encode())
    head = rf.readline()
    assert head[:1] == b"*", head
    out = []
    for _ in range(int(head[1:])):
        n = int(rf.readline()[1:])
        out.append(rf.read(n + 2)[:-2].decode())
    return out

def present(port):
    needle = f'"port":{port}'
    return any(needle in m for m in smembers("im_server"))

def trial(sig, k):
    port = 30000 + k
    p = subprocess.Popen([seed, "--url", f"ws://127.0.0.1:{route_port}/", "--name", f"FAIL_{k}",
                          "--ip", "127.0.0.250", "--port", str(port), "--ping-ms", ping_ms],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not present(port):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        time.sleep(0.3 + 0.37 * k % 1.0)  # kill at varied phases of the sweep
        t0 = time.monotonic()
        os.kill(p.pid, sig)
        deadline = t0 + 60
        while present(port):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.002)
        return time.monotonic() - t0
    finally:
        try:
            os.kill(p.pid, signal.SIGKILL)
            os.kill(p.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        p.wait()

for name, sig in (("sigkill", signal.SIGKILL), ("sigstop", signal.SIGSTOP)):
    times = []
    for k in range(repeats):
        t = trial(sig, k + (100 if sig == signal.SIGSTOP else 0))
        print(f"  {name} trial {k + 1}: {'timeout' if t is None else f'{t * 1000:.0f} ms'}", file=sys.stderr)
        times.append(t)
    ok = sorted(t for t in times if t is not None)
    res = {"mode": name, "trials": repeats, "timeouts": repeats - len(ok),
           "ms": [round(t * 1000) for t in times if t is not None],
           "median_ms": round(ok[len(ok) // 2] * 1000) if ok else None,
           "max_ms": round(ok[-1] * 1000) if ok else None}
    print(f"{name} {json.dumps(res)}")
PY

# --- summary ----------------------------------------------------------------
python3 - "$RESULTS" "$ROUTE_HB_INTERVAL" "$ROUTE_HB_IDLE" "$ROUTE_PING_MS" <<'PY' | tee "$BENCH_OUT/summary-route.txt"
import json, statistics, sys
rows = [l.split(" ", 1) for l in open(sys.argv[1]) if l.strip()]
res = {}
for k, v in rows:
    res.setdefault(k, []).append(json.loads(v))
c = [r["requests_per_s"] for r in res["cached"]]
f = [r["requests_per_s"] for r in res["fresh"]]
ratios = [a / b for a, b in zip(c, f)]
def ms(xs):
    return f"median {statistics.median(xs):.0f} (min {min(xs):.0f}, max {max(xs):.0f})"
print(f"GET /api/servers (cache)      req/s: {ms(c)}  p99 us: {[r['p99_us'] for r in res['cached']]}  errors: {sum(r['errors'] for r in res['cached'])}")
print(f"GET /api/servers?fresh=1      req/s: {ms(f)}  p99 us: {[r['p99_us'] for r in res['fresh']]}  errors: {sum(r['errors'] for r in res['fresh'])}")
print(f"ratio cache/fresh (per repeat): {[round(r, 2) for r in ratios]} median {statistics.median(ratios):.2f}")
for m in ("sigkill", "sigstop"):
    r = res[m][0]
    print(f"{m} -> removed from SMEMBERS im_server: {r['ms']} ms; median {r['median_ms']} ms, max {r['max_ms']} ms, timeouts {r['timeouts']}")
print(f"settings: heartbeat_check_interval {sys.argv[2]} s, heartbeat_idle_time {sys.argv[3]} s, client ping every {sys.argv[4]} ms")
print("RESULT " + json.dumps({"cached_rps": c, "fresh_rps": f, "ratios": [round(r, 2) for r in ratios],
                             "sigkill": res["sigkill"][0], "sigstop": res["sigstop"][0]}))
PY
fi

# --- 3. /route at the HTTP limit (issue 16) ---------------------------------
# limit_run LABEL BIN BALANCER COUNT: a Route of BIN with COUNT fake IM
# servers; /health and /route alternating; results to $LIMIT_RESULTS.
limit_run() {
    local label=$1 bin=$2 balancer=$3 count=$4 port first n i reg total line
    LIMIT_BIN=$bin
    redis-cli -p "$REDIS_PORT" flushall >/dev/null
    port=$(free_port)
    # Fake servers ping every 5 s; the sweep runs every 10 s (the same
    # settings for both codes: a base from before the non-blocking Redis
    # client makes one blocking call per held server per sweep).
    cat >"$WORK/limit.toml" <<TOML
host = "127.0.0.1"
port = $port
worker_num = 2
pid_file = "$WORK/limit.pid"
log_file = "$WORK/limit.log"
log_level = "warn"
redis_url = "redis://127.0.0.1:$REDIS_PORT"
heartbeat_check_interval = 10.0
heartbeat_idle_time = 30.0
balancer = "$balancer"
max_conn = 20000
max_conn_per_ip = 20000
max_registrations_per_ip = 20000
TOML
    timeout 60 "$bin" start -d -c "$WORK/limit.toml" || die "$label: the Route did not start"
    LIMIT_REG_PIDS=()
    for ((first = 0; first < count; first += ROUTE_LIMIT_PER_LOADGEN)); do
        n=$((count - first < ROUTE_LIMIT_PER_LOADGEN ? count - first : ROUTE_LIMIT_PER_LOADGEN))
        : >"$WORK/limit-reg-$first.log" # exists before the child opens it
        "$LOADGEN" register --url "ws://127.0.0.1:$port/" --count "$n" --first "$first" \
            --ping-ms 5000 --hold 100000 >"$WORK/limit-reg-$first.log" 2>&1 &
        LIMIT_REG_PIDS+=($!)
    done
    local t0=$SECONDS
    while :; do
        total=0 reg=0
        for f in "$WORK"/limit-reg-*.log; do
            line=$(sed -n 's/^REGISTERED //p' "$f" 2>/dev/null || true)
            [[ -n $line ]] && reg=$((reg + 1)) total=$((total + line))
        done
        ((reg == ${#LIMIT_REG_PIDS[@]})) && break
        ((SECONDS - t0 > 300)) && die "$label: registrations did not finish"
        sleep 0.5
    done
    ((total == count)) || die "$label: $total of $count registrations succeeded"
    # Both workers' caches list them (/metrics answers from either; the
    # /api/servers answer at 10,000 servers exceeds buffer_output_size).
    local seen=0
    for _ in $(seq 600); do
        if curl -s "http://127.0.0.1:$port/metrics" | grep -qx "swocloud_route_im_servers $count"; then
            seen=$((seen + 1))
            ((seen >= 6)) && break
        fi
        sleep 0.1
    done
    log "$label $balancer $count: registered in $((SECONDS - t0)) s; SCARD $(redis-cli -p "$REDIS_PORT" scard im_server)"
    # Let the registration burst's aftermath (cache re-reads, first sweep)
    # pass before measuring.
    sleep "$ROUTE_LIMIT_SETTLE"
    for r in $(seq "$ROUTE_LIMIT_REPEATS"); do
        for ep in health route; do
            local path=/health
            [[ $ep == route ]] && path='/route?uid=u{n}'
            line=$(timeout $((ROUTE_LIMIT_DURATION + 60)) "$LOADGEN" http --url "http://127.0.0.1:$port$path" \
                --conns "$ROUTE_LIMIT_CONNS" --duration "$ROUTE_LIMIT_DURATION" --warmup 1 |
                tee -a "$BENCH_OUT/loadgen-route-limit.log" | sed -n 's/^RESULT //p')
            [[ -n $line ]] || die "$label: no result for $path"
            echo "$label $balancer $count $ep $line" >>"$LIMIT_RESULTS"
            log "  $label $balancer n=$count $ep (repeat $r): $line"
        done
    done
    curl -s "http://127.0.0.1:$port/route?uid=probe" >"$BENCH_OUT/route-limit-answer-$label.json" || true
    sleep 0.2 # one flush of the uid records
    log "  uid records in Redis: $(redis-cli -p "$REDIS_PORT" eval "return #redis.call('keys', 'im_route:*')" 0)"
    timeout 30 "$bin" stop -c "$WORK/limit.toml" >/dev/null 2>&1 || true
    for p in "${LIMIT_REG_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${LIMIT_REG_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    LIMIT_REG_PIDS=()
    cp "$WORK/limit.log" "$BENCH_OUT/route-limit-$label-$balancer-$count.log" 2>/dev/null || true
    rm -f "$WORK"/limit-reg-*.log
}

if part route; then
    [[ -n ${REDIS_PORT:-} ]] || start_private_redis "$WORK" || die "the private Redis did not start"
    LIMIT_RESULTS="$WORK/limit-results.txt"
    : >"$LIMIT_RESULTS"
    for count in $ROUTE_LIMIT_COUNTS; do
        for balancer in $ROUTE_LIMIT_BALANCERS; do
            limit_run after "$ROUTE" "$balancer" "$count"
            if [[ -n $ROUTE_BASE ]]; then
                limit_run before target/bench-base/swocloud "$balancer" "$count"
            fi
        done
    done
    python3 - "$LIMIT_RESULTS" "$ROUTE_LIMIT_CONNS" "$ROUTE_LIMIT_DURATION" <<'PY' | tee "$BENCH_OUT/summary-route-limit.txt"
import json, statistics, sys
rows = {}
for l in open(sys.argv[1]):
    if not l.strip():
        continue
    label, bal, count, ep, js = l.split(" ", 4)
    rows.setdefault((label, bal, int(count), ep), []).append(json.loads(js))
med = lambda rs, k: statistics.median(r[k] for r in rs)
out = []
print(f"loadgen http --conns {sys.argv[2]} --duration {sys.argv[3]} (1 thread), 2 Route workers")
print("| code | balancer | servers | /health req/s | /route req/s | /route ÷ /health | /route p99 | errors |")
print("|---|---|---|---|---|---|---|---|")
for (label, bal, count, ep) in sorted(k for k in rows if k[3] == "route"):
    h, r = rows[(label, bal, count, "health")], rows[(label, bal, count, "route")]
    hr, rr = med(h, "requests_per_s"), med(r, "requests_per_s")
    p99 = med(r, "p99_us")
    errs = sum(x["errors"] for x in r)
    ratio = rr / hr if hr else 0
    print(f"| {label} | {bal} | {count} | {hr:.0f} | {rr:.0f} | {ratio:.2f} | {p99 / 1000:.2f} ms | {errs} |")
    out.append({"code": label, "balancer": bal, "servers": count, "health_rps": hr, "route_rps": rr,
                "ratio": round(ratio, 3), "route_p99_us": p99, "errors": errs})
for (label, bal, count, ep) in sorted(k for k in rows if k[0] == "after" and k[3] == "route"):
    b = rows.get(("before", bal, count, "route"))
    if b:
        a = med(rows[(label, bal, count, "route")], "requests_per_s")
        print(f"after / before, {bal}, {count} servers: /route req/s x{a / max(med(b, 'requests_per_s'), 1):.1f}")
print("RESULT " + json.dumps(out))
PY
fi
log "logs in $BENCH_OUT/"

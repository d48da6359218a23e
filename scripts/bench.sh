#!/usr/bin/env bash
# scripts/bench.sh: compares swocloud's echo server ("ours") with a
# tokio-tungstenite echo server ("peer") under the same loopback load, and
# prints a table of figures with ours/peer ratios. A benchmark, not a test:
# it never fails on slow figures, only on broken plumbing.
#
# It owns: building the release examples, starting each server on a free
# port, driving it with examples/loadgen/, sampling the server process
# tree's CPU time (/proc/PID/stat utime+stime) and RSS (/proc/PID/status
# VmRSS), and cleaning every process it started (trap on exit).
#
# Modes (BENCH_MODES, default "echo idle storm"):
#   echo   BENCH_CONNS connections, one BENCH_SIZE-byte message in flight each,
#          BENCH_WARMUP + BENCH_DURATION seconds: msgs/s, server CPU seconds
#          and msgs per CPU-second over the measured window, p50/p99 latency.
#   idle   BENCH_IDLE connections held open by several loadgen processes
#          (BENCH_IDLE_PER_PROC each, each with its own 127.0.0.x source
#          range): server RSS per connection above the pre-connection
#          baseline. The peer is one process and so capped at
#          BENCH_IDLE_PEER_MAX; ours is also measured at that same count.
#   storm  BENCH_STORM handshakes, BENCH_STORM_CONC in flight: handshakes/s.
#   large  the echo mode with large binary messages: for each size of
#          BENCH_LARGE_SIZES, BENCH_LARGE_CONNS connections with one message
#          in flight each: msgs/s and server CPU microseconds per message
#          (issue 17's goal: ours <= 0.8x the peer's).
#   deflate ours only (the peer has no permessage-deflate): BENCH_DEFLATE_CONNS
#          connections echo BENCH_DEFLATE_SIZE-byte chat-like JSON, compressed
#          (websocket_compression=true, loadgen --compress) and not: server
#          CPU microseconds per message and bytes on the wire per message.
#
# Environment (defaults in brackets; BENCH_QUICK=1 makes everything tiny):
#   BENCH_CONNS [1000] BENCH_SIZE [64] BENCH_DURATION [10] BENCH_WARMUP [2]
#   BENCH_IDLE [50000] BENCH_IDLE_PEER_MAX [18000] BENCH_IDLE_PER_PROC [12500]
#   BENCH_HOLD [120]: max seconds each idle loadgen holds (it is stopped as
#     soon as RSS is measured)
#   BENCH_STORM [20000] BENCH_STORM_CONC [200]
#   BENCH_LARGE_SIZES ["65536 1048576"] BENCH_LARGE_CONNS [4]
#   BENCH_LARGE_DURATION [BENCH_DURATION]
#   BENCH_WORKERS [2]: ours --workers / peer --threads for echo and storm
#   BENCH_IDLE_WORKERS [4]: ours --workers for idle (keep each process under
#     ~18,000 fds; the limit is 20,000 per process)
#   BENCH_LOADGEN_THREADS [1]: tokio threads of each loadgen
#   BENCH_OURS_CMD ["target/release/examples/echo --port {port} --workers {workers}
#     --set max_conn=20000"]
#   BENCH_PEER_CMD ["target/release/examples/tokio_echo --port {port} --threads {workers}"]
#     ({port} and {workers} are substituted; ours is skipped if its program
#     is missing, so e.g. BENCH_OURS_CMD set to the peer's command tests the
#     plumbing)
#   BENCH_OUT [target/bench]: logs and summary.txt
#   BENCH_SKIP_BUILD [0]: 1 runs the binaries as they are (e.g. to compare
#     builds of two commits through BENCH_OURS_CMD)
#   BENCH_LOADGEN [target/release/examples/loadgen]
#
# Usage: scripts/bench.sh            # full run, a few minutes
#        BENCH_QUICK=1 scripts/bench.sh   # smoke check, under a minute
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

QUICK=${BENCH_QUICK:-0}
q() { if [[ $QUICK == 1 ]]; then echo "$2"; else echo "$1"; fi; }

BENCH_CONNS=${BENCH_CONNS:-$(q 1000 50)}
BENCH_SIZE=${BENCH_SIZE:-64}
BENCH_DURATION=${BENCH_DURATION:-$(q 10 2)}
BENCH_WARMUP=${BENCH_WARMUP:-$(q 2 0.5)}
BENCH_IDLE=${BENCH_IDLE:-$(q 50000 2000)}
BENCH_IDLE_PEER_MAX=${BENCH_IDLE_PEER_MAX:-$(q 18000 1000)}
BENCH_IDLE_PER_PROC=${BENCH_IDLE_PER_PROC:-$(q 12500 1000)}
BENCH_HOLD=${BENCH_HOLD:-$(q 120 20)}
BENCH_STORM=${BENCH_STORM:-$(q 20000 1000)}
BENCH_STORM_CONC=${BENCH_STORM_CONC:-$(q 200 50)}
BENCH_WORKERS=${BENCH_WORKERS:-2}
BENCH_IDLE_WORKERS=${BENCH_IDLE_WORKERS:-4}
BENCH_LOADGEN_THREADS=${BENCH_LOADGEN_THREADS:-1}
BENCH_LARGE_SIZES=${BENCH_LARGE_SIZES:-65536 1048576}
BENCH_LARGE_CONNS=${BENCH_LARGE_CONNS:-4}
BENCH_LARGE_DURATION=${BENCH_LARGE_DURATION:-$BENCH_DURATION}
BENCH_DEFLATE_CONNS=${BENCH_DEFLATE_CONNS:-50}
BENCH_DEFLATE_SIZE=${BENCH_DEFLATE_SIZE:-1024}
BENCH_MODES=${BENCH_MODES:-echo idle storm}
DEFAULT_OURS_CMD='target/release/examples/echo --port {port} --workers {workers} --set max_conn=20000'
DEFAULT_PEER_CMD='target/release/examples/tokio_echo --port {port} --threads {workers}'
BENCH_OURS_CMD=${BENCH_OURS_CMD:-$DEFAULT_OURS_CMD}
BENCH_PEER_CMD=${BENCH_PEER_CMD:-$DEFAULT_PEER_CMD}
BENCH_OUT=${BENCH_OUT:-target/bench}

LOADGEN=${BENCH_LOADGEN:-target/release/examples/loadgen}
CLK_TCK=$(getconf CLK_TCK)
FD_LIMIT_PER_PROC=18000

mkdir -p "$BENCH_OUT"
SUMMARY="$BENCH_OUT/summary.txt"

log() { printf '[bench %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v python3 >/dev/null || die "python3 is needed (free ports, JSON)"

# ---------------------------------------------------------------------------
# Process bookkeeping and cleanup
# ---------------------------------------------------------------------------

SERVER_PID=""
LOADGEN_PIDS=()

# All descendants of $1 (not $1 itself), parents first.
descendants() {
    local table frontier=("$1") next p c
    table=$(ps -e -o pid=,ppid=)
    while ((${#frontier[@]})); do
        next=()
        for p in "${frontier[@]}"; do
            for c in $(awk -v p="$p" '$2 == p { print $1 }' <<<"$table"); do
                echo "$c"
                next+=("$c")
            done
        done
        frontier=("${next[@]+"${next[@]}"}")
    done
}

# $1 and all its descendants.
tree() { echo "$1"; descendants "$1"; }

kill_tree() {
    local root=$1 pids
    pids=$(tree "$root")
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 30); do
        kill -0 "$root" 2>/dev/null || break
        sleep 0.1
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    wait "$root" 2>/dev/null || true
}

cleanup() {
    local p
    # Each loadgen runs under timeout(1), which passes TERM on to it.
    for p in "${LOADGEN_PIDS[@]+"${LOADGEN_PIDS[@]}"}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    if [[ -n $SERVER_PID ]]; then
        kill_tree "$SERVER_PID"
        SERVER_PID=""
    fi
}
trap cleanup EXIT
trap 'trap - INT TERM; log "interrupted"; exit 130' INT TERM

# ---------------------------------------------------------------------------
# Measurements from /proc
# ---------------------------------------------------------------------------

# utime+stime in clock ticks, summed over the live process tree of $1.
cpu_ticks() {
    local total=0 p stat f
    for p in $(tree "$1"); do
        stat=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        # Fields after the ")" closing the command name start at field 3, so
        # utime (field 14) and stime (15) are at indexes 11 and 12.
        read -r -a f <<<"${stat##*) }"
        total=$((total + f[11] + f[12]))
    done
    echo "$total"
}

# VmRSS in KiB, summed over the live process tree of $1.
rss_kb() {
    local total=0 p kb
    for p in $(tree "$1"); do
        kb=$(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null) || continue
        total=$((total + ${kb:-0}))
    done
    echo "$total"
}

# Largest number of open fds of any process in the tree of $1.
max_fds() {
    local max=0 p n
    for p in $(tree "$1"); do
        n=$(find "/proc/$p/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
        ((n > max)) && max=$n
    done
    echo "$max"
}

# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

# json_get JSON KEY: a field of a RESULT object ("" if absent).
json_get() {
    python3 -c 'import json, sys; v = json.loads(sys.argv[1]).get(sys.argv[2], ""); print(v)' "$1" "$2"
}

# calc EXPR: float arithmetic; prints n/a when an operand is missing or a
# division by zero happens.
calc() {
    python3 -c '
import sys
try:
    v = eval(sys.argv[1], {"__builtins__": {}, "int": int, "round": round})
    print(f"{v:.2f}" if isinstance(v, float) else v)
except Exception:
    print("n/a")' "$1"
}

# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------

# server_cmd WHICH PORT WORKERS: the command line for ours or peer.
server_cmd() {
    local tpl
    if [[ $1 == ours ]]; then tpl=$BENCH_OURS_CMD; else tpl=$BENCH_PEER_CMD; fi
    tpl=${tpl//\{port\}/$2}
    echo "${tpl//\{workers\}/$3}"
}

have_server() {
    local cmd prog
    cmd=$(server_cmd "$1" 0 1)
    prog=${cmd%% *}
    [[ -x $prog ]] || command -v "$prog" >/dev/null 2>&1
}

# start_server WHICH WORKERS LABEL: starts it on a free port and waits until
# the port accepts connections. Sets SERVER_PID and PORT.
start_server() {
    local which=$1 workers=$2 label=$3 cmd logf
    PORT=$(free_port)
    cmd=$(server_cmd "$which" "$PORT" "$workers")
    logf="$BENCH_OUT/server-$label.log"
    log "starting $which: $cmd"
    # shellcheck disable=SC2086
    $cmd >"$logf" 2>&1 &
    SERVER_PID=$!
    # Our echo writes its pid file once every worker serves (the master
    # binds the listeners first, so an accepted connection proves less).
    local pidf=""
    [[ $which == ours && $cmd == target/release/examples/echo* ]] &&
        pidf="${TMPDIR:-/tmp}/swocloud-echo-$PORT.pid"
    for _ in $(seq 150); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && { [[ -z $pidf ]] || [[ -s $pidf ]]; }; then
            sleep 0.2 # let every worker finish starting
            return 0
        fi
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    tail -n 20 "$logf" >&2 || true
    die "$which did not accept connections on port $PORT (log: $logf)"
}

stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    kill_tree "$SERVER_PID"
    SERVER_PID=""
}

# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------

declare -A V # V[which|metric] = value

put() { V["$1|$2"]=$3; }
get() { echo "${V["$1|$2"]:-n/a}"; }

# ---------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------

# bench_echo WHICH [CONNS SIZE DURATION KEY EXTRA...]: the closed-loop echo
# load; metrics are named KEY_rate, KEY_cpu, … (KEY defaults to "echo").
bench_echo() {
    local which=$1 conns=${2:-$BENCH_CONNS} size=${3:-$BENCH_SIZE} dur=${4:-$BENCH_DURATION}
    local key=${5:-echo}
    shift $(($# < 5 ? $# : 5))
    local url fd lg_pid line cpu0="" cpu1="" json="" logf secs
    start_server "$which" "$BENCH_WORKERS" "$key-$which"
    url="ws://127.0.0.1:$PORT/"
    logf="$BENCH_OUT/loadgen-$key-$which.log"
    secs=$(calc "int($BENCH_WARMUP + $dur + 60)")
    log "$key vs $which: $conns conns x ${size} B, ${BENCH_WARMUP}s warm-up + ${dur}s"
    exec {fd}< <(exec timeout "$secs" "$LOADGEN" --threads "$BENCH_LOADGEN_THREADS" "${LG_MODE:-echo}" \
        --url "$url" --conns "$conns" --size "$size" \
        --duration "$dur" --warmup "$BENCH_WARMUP" "$@" 2>&1)
    lg_pid=$!
    LOADGEN_PIDS+=("$lg_pid")
    : >"$logf"
    # Read with a timeout so that a trapped INT/TERM is handled within a
    # second (bash defers traps while a plain read blocks).
    local partial="" rc
    while :; do
        rc=0
        IFS= read -r -t 1 -u "$fd" line || rc=$?
        if ((rc > 128)); then # timed out, maybe mid-line
            partial+=$line
            continue
        fi
        line=$partial$line
        partial=""
        ((rc == 0)) || [[ -n $line ]] || break # EOF
        echo "$line" >>"$logf"
        case $line in
        MEASURE_START) cpu0=$(cpu_ticks "$SERVER_PID") ;;
        MEASURE_END) cpu1=$(cpu_ticks "$SERVER_PID") ;;
        RESULT\ *) json=${line#RESULT } ;;
        *) log "  $line" ;;
        esac
        ((rc == 0)) || break
    done
    exec {fd}<&-
    wait "$lg_pid" || log "loadgen exited with $? (log: $logf)"
    stop_server
    if [[ -z $json || -z $cpu0 || -z $cpu1 ]]; then
        log "$key vs $which: no result (log: $logf)"
        return 0
    fi
    local msgs cpu_s
    msgs=$(json_get "$json" msgs)
    cpu_s=$(calc "($cpu1 - $cpu0) / $CLK_TCK")
    put "$which" "${key}_rate" "$(json_get "$json" msgs_per_s)"
    put "$which" "${key}_cpu" "$cpu_s"
    put "$which" "${key}_per_cpu" "$(calc "round($msgs / $cpu_s)")"
    put "$which" "${key}_us_per_msg" "$(calc "round($cpu_s * 1e6 / $msgs, 1)")"
    put "$which" "${key}_p50" "$(json_get "$json" p50_us)"
    put "$which" "${key}_p99" "$(json_get "$json" p99_us)"
    put "$which" "${key}_p999" "$(json_get "$json" p999_us)"
    put "$which" "${key}_errors" "$(json_get "$json" errors)"
    put "$which" "${key}_wire_in" "$(json_get "$json" wire_in_per_msg)"
    put "$which" "${key}_wire_out" "$(json_get "$json" wire_out_per_msg)"
}

# bench_deflate: ours with compression on (key deflate_on) and off
# (deflate_off); the results are stored under ours and shown side by side.
bench_deflate() {
    local saved=$BENCH_OURS_CMD
    BENCH_OURS_CMD="$saved --set websocket_compression=true"
    LG_MODE=deflate bench_echo ours "$BENCH_DEFLATE_CONNS" "$BENCH_DEFLATE_SIZE" "$BENCH_DURATION" deflate_on --compress
    BENCH_OURS_CMD=$saved
    LG_MODE=deflate bench_echo ours "$BENCH_DEFLATE_CONNS" "$BENCH_DEFLATE_SIZE" "$BENCH_DURATION" deflate_off
}

# bench_idle WHICH WORKERS CONNS KEY: holds CONNS connections and records
# per-connection RSS under metric names suffixed with KEY.
bench_idle() {
    local which=$1 workers=$2 conns=$3 key=$4
    local nproc per i left n base logf pids=() logs=() held rss max_fd
    if ((conns / workers > FD_LIMIT_PER_PROC)); then
        log "warning: $conns conns over $workers server process(es) exceeds ~$FD_LIMIT_PER_PROC fds each"
    fi
    start_server "$which" "$workers" "idle-$which-$conns"
    sleep 0.5
    base=$(rss_kb "$SERVER_PID")
    nproc=$(((conns + BENCH_IDLE_PER_PROC - 1) / BENCH_IDLE_PER_PROC))
    ((nproc * 2 + 1 <= 254)) || die "too many idle loadgen processes ($nproc)"
    log "idle vs $which: $conns conns from $nproc loadgen process(es), baseline RSS ${base} KiB"
    left=$conns
    for ((i = 0; i < nproc; i++)); do
        n=$((left / (nproc - i)))
        left=$((left - n))
        logf="$BENCH_OUT/loadgen-idle-$which-$conns-$i.log"
        # Two source addresses per process: ~56k ephemeral ports for it.
        timeout $((BENCH_HOLD + 120)) "$LOADGEN" --threads "$BENCH_LOADGEN_THREADS" idle \
            --url "ws://127.0.0.1:$PORT/" --conns "$n" --hold "$BENCH_HOLD" \
            --src-ips "127.0.0.$((2 + 2 * i))-127.0.0.$((3 + 2 * i))" >"$logf" 2>&1 &
        pids+=("$!")
        logs+=("$logf")
        LOADGEN_PIDS+=("$!")
    done
    # Wait until every loadgen holds its connections (or died).
    local deadline=$((SECONDS + 110)) ready
    while :; do
        ready=0
        for ((i = 0; i < nproc; i++)); do
            if grep -q '^HOLDING' "${logs[i]}" || ! kill -0 "${pids[i]}" 2>/dev/null; then
                ready=$((ready + 1))
            fi
        done
        ((ready == nproc)) && break
        ((SECONDS < deadline)) || {
            log "idle: timed out waiting for HOLDING"
            break
        }
        sleep 0.2
    done
    sleep "$(q 2 0.5)" # let the server settle
    rss=$(rss_kb "$SERVER_PID")
    max_fd=$(max_fds "$SERVER_PID")
    held=0
    for logf in "${logs[@]}"; do
        n=$(awk '/^HOLDING/ { print $2 }' "$logf")
        held=$((held + ${n:-0}))
        { grep -E '^ +error' "$logf" || true; } | head -n 3 | while IFS= read -r line; do log "  $line"; done
    done
    log "idle vs $which: $held/$conns held, RSS ${rss} KiB, max fds/process $max_fd"
    # Done measuring: stop the loadgens now rather than after BENCH_HOLD.
    for i in "${pids[@]}"; do kill -TERM "$i" 2>/dev/null || true; done
    for i in "${pids[@]}"; do wait "$i" 2>/dev/null || true; done
    stop_server
    put "$which" "idle_held_$key" "$held/$conns"
    put "$which" "idle_base_$key" "$base"
    put "$which" "idle_rss_$key" "$rss"
    put "$which" "idle_fds_$key" "$max_fd"
    put "$which" "idle_per_conn_$key" "$(calc "round(($rss - $base) * 1024 / $held)")"
}

bench_storm() {
    local which=$1 logf json cpu0 cpu1
    start_server "$which" "$BENCH_WORKERS" "storm-$which"
    logf="$BENCH_OUT/loadgen-storm-$which.log"
    log "storm vs $which: $BENCH_STORM handshakes, $BENCH_STORM_CONC in flight"
    cpu0=$(cpu_ticks "$SERVER_PID")
    # Sources of their own: every handshake leaves a TIME_WAIT socket on the
    # client side (it closes first), and after the idle mode's ~86,000
    # connections one address ran out of ephemeral ports (EADDRNOTAVAIL).
    timeout 300 "$LOADGEN" --threads "$BENCH_LOADGEN_THREADS" storm --url "ws://127.0.0.1:$PORT/" \
        --src-ips 127.0.0.200-127.0.0.203 \
        --total "$BENCH_STORM" --concurrency "$BENCH_STORM_CONC" >"$logf" 2>&1 &
    LOADGEN_PIDS+=("$!")
    wait "$!" || log "loadgen exited with $? (log: $logf)"
    cpu1=$(cpu_ticks "$SERVER_PID")
    stop_server
    { grep -v '^RESULT' "$logf" || true; } | while IFS= read -r line; do log "  $line"; done
    json=$(sed -n 's/^RESULT //p' "$logf")
    [[ -n $json ]] || {
        log "storm vs $which: no result (log: $logf)"
        return 0
    }
    put "$which" storm_rate "$(json_get "$json" handshakes_per_s)"
    put "$which" storm_failed "$(json_get "$json" failed)"
    put "$which" storm_p99 "$(json_get "$json" p99_us)"
    put "$which" storm_cpu "$(calc "($cpu1 - $cpu0) / $CLK_TCK")"
}

# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

# row LABEL METRIC [-]: one table line; "-" leaves the ratio out.
row() {
    local label=$1 metric=$2 a b ratio="-"
    a=$(get ours "$metric")
    b=$(get peer "$metric")
    if [[ ${3:-} != - ]]; then
        ratio=$(calc "$a / $b")
        [[ $ratio == n/a ]] || ratio="${ratio}x"
    fi
    printf '%-40s %14s %14s %9s\n' "$label" "$a" "$b" "$ratio"
}

report() {
    printf '\n%-40s %14s %14s %9s\n' "metric" "ours" "tokio peer" "ours/peer"
    printf '%.0s-' {1..80}
    echo
    if [[ " $BENCH_MODES " == *" echo "* ]]; then
        echo "echo: $BENCH_CONNS conns, ${BENCH_SIZE} B, ${BENCH_DURATION}s, workers/threads $BENCH_WORKERS"
        row "  messages/s" echo_rate
        row "  server CPU seconds" echo_cpu
        row "  messages per server CPU-second" echo_per_cpu
        row "  latency p50 (us)" echo_p50
        row "  latency p99 (us)" echo_p99
        row "  latency p99.9 (us)" echo_p999
        row "  errors" echo_errors
    fi
    if [[ " $BENCH_MODES " == *" idle "* ]]; then
        echo "idle: ours with $BENCH_IDLE_WORKERS workers; peer is one process"
        if [[ $IDLE_PEER != "$BENCH_IDLE" ]]; then
            row "  held at $BENCH_IDLE (ours only)" idle_held_full -
            row "  RSS per conn (bytes) at $BENCH_IDLE" idle_per_conn_full
            row "  RSS total (KiB) at $BENCH_IDLE" idle_rss_full
            row "  max fds per process at $BENCH_IDLE" idle_fds_full
        fi
        row "  held at $IDLE_PEER" idle_held_same -
        row "  RSS per conn (bytes) at $IDLE_PEER" idle_per_conn_same
        row "  RSS total (KiB) at $IDLE_PEER" idle_rss_same
        row "  baseline RSS (KiB)" idle_base_same
        row "  max fds per process at $IDLE_PEER" idle_fds_same
    fi
    if [[ " $BENCH_MODES " == *" large "* ]]; then
        local sz
        for sz in $BENCH_LARGE_SIZES; do
            echo "large: $BENCH_LARGE_CONNS conns, ${sz} B binary, ${BENCH_LARGE_DURATION}s, workers/threads $BENCH_WORKERS"
            row "  messages/s" "large${sz}_rate"
            row "  server CPU us per message" "large${sz}_us_per_msg"
            row "  latency p50 (us)" "large${sz}_p50"
            row "  errors" "large${sz}_errors"
        done
    fi
    if [[ " $BENCH_MODES " == *" deflate "* ]]; then
        echo "deflate: ours only, $BENCH_DEFLATE_CONNS conns, ${BENCH_DEFLATE_SIZE} B chat-like JSON (columns: compressed, not)"
        local m
        for m in rate us_per_msg wire_in wire_out; do
            printf '%-40s %14s %14s %9s\n' "  $m" "$(get ours "deflate_on_$m")" "$(get ours "deflate_off_$m")" \
                "$(calc "$(get ours "deflate_on_$m") / $(get ours "deflate_off_$m")")x"
        done
    fi
    if [[ " $BENCH_MODES " == *" storm "* ]]; then
        echo "storm: $BENCH_STORM handshakes, $BENCH_STORM_CONC in flight"
        row "  handshakes/s" storm_rate
        row "  failures" storm_failed
        row "  handshake p99 (us)" storm_p99
        row "  server CPU seconds" storm_cpu
    fi
}

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

if [[ ${BENCH_SKIP_BUILD:-0} == 1 ]]; then
    log "BENCH_SKIP_BUILD=1: using the binaries as they are"
else
    log "building release examples"
    cargo build --release --quiet --example loadgen --example tokio_echo
fi
if [[ ${BENCH_SKIP_BUILD:-0} != 1 && $BENCH_OURS_CMD == "$DEFAULT_OURS_CMD" ]]; then
    if [[ -f examples/echo.rs ]]; then
        cargo build --release --quiet --example echo || log "warning: building examples/echo.rs failed"
    fi
fi

SERVERS=(peer)
if have_server ours; then
    SERVERS=(ours peer)
else
    log "our server is not available: '$(server_cmd ours PORT N)' not found (examples/echo.rs not on this branch yet?); running the tokio peer only"
fi

IDLE_PEER=$((BENCH_IDLE < BENCH_IDLE_PEER_MAX ? BENCH_IDLE : BENCH_IDLE_PEER_MAX))

for mode in $BENCH_MODES; do
    case $mode in
    echo) for s in "${SERVERS[@]}"; do bench_echo "$s"; done ;;
    storm) for s in "${SERVERS[@]}"; do bench_storm "$s"; done ;;
    deflate) have_server ours && bench_deflate ;;
    large)
        for sz in $BENCH_LARGE_SIZES; do
            for s in "${SERVERS[@]}"; do
                bench_echo "$s" "$BENCH_LARGE_CONNS" "$sz" "$BENCH_LARGE_DURATION" "large$sz" --binary
            done
        done
        ;;
    idle)
        for s in "${SERVERS[@]}"; do
            if [[ $s == ours ]]; then
                if [[ $IDLE_PEER != "$BENCH_IDLE" ]]; then
                    bench_idle ours "$BENCH_IDLE_WORKERS" "$BENCH_IDLE" full
                fi
                bench_idle ours "$BENCH_IDLE_WORKERS" "$IDLE_PEER" same
            else
                bench_idle peer "$BENCH_WORKERS" "$IDLE_PEER" same
            fi
        done
        ;;
    *) die "unknown mode '$mode' in BENCH_MODES" ;;
    esac
done

report | tee "$SUMMARY"
log "logs and summary in $BENCH_OUT/"

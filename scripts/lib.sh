# Shared helpers for the project's scripts (sourced, not run): loopback
# ports and a private, throw-away Redis.

# free_port [HOST]: a TCP port free on HOST (default 127.0.0.1) a moment ago.
free_port() {
    python3 -c 'import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "${1:-127.0.0.1}"
}

# start_private_redis DIR: a redis-server on a free loopback port that keeps
# nothing on disk, its files in DIR; sets REDIS_PORT and waits until it
# answers. The caller stops it (redis-cli -p "$REDIS_PORT" shutdown nosave).
start_private_redis() {
    REDIS_PORT=$(free_port)
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$1" --daemonize yes --logfile "$1/redis.log"
    for _ in $(seq 100); do
        redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "redis-server on port $REDIS_PORT did not answer" >&2
    return 1
}

# start_private_redis_cluster DIR: a Redis Cluster of 3 masters and 3
# replicas on free loopback ports below 55536 (each node's bus port, +10000,
# free too), its files in DIR, nothing on disk; waits until every node says
# cluster_state:ok. Sets REDIS_CLUSTER_PORTS (all six), REDIS_MASTER_PORTS
# and REDIS_SETTINGS (the `redis_cluster = [...]` settings line). The caller
# stops them (stop_private_redis_cluster).
start_private_redis_cluster() {
    local dir=$1 p i addrs=() urls=()
    REDIS_CLUSTER_PORTS=()
    for i in 1 2 3 4 5 6; do
        while :; do
            p=$(free_port)
            ((p < 55536)) && python3 -c 'import socket,sys; s=socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1])))' $((p + 10000)) 2>/dev/null && break
        done
        mkdir -p "$dir/node$p"
        redis-server --port "$p" --bind 127.0.0.1 --save "" --appendonly no \
            --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
            --dir "$dir/node$p" --daemonize yes --logfile "$dir/node$p/redis.log"
        REDIS_CLUSTER_PORTS+=("$p")
        addrs+=("127.0.0.1:$p")
        urls+=("\"redis://127.0.0.1:$p\"")
    done
    for p in "${REDIS_CLUSTER_PORTS[@]}"; do
        for _ in $(seq 100); do
            redis-cli -p "$p" ping >/dev/null 2>&1 && break
            sleep 0.05
        done
    done
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1 || { cat "$dir/create.log" >&2; return 1; }
    for p in "${REDIS_CLUSTER_PORTS[@]}"; do
        for _ in $(seq 200); do
            redis-cli -p "$p" cluster info 2>/dev/null | grep -q 'cluster_state:ok' && break
            sleep 0.05
        done
    done
    REDIS_MASTER_PORTS=()
    for p in "${REDIS_CLUSTER_PORTS[@]}"; do
        [[ $(redis-cli -p "$p" role | head -1) == master ]] && REDIS_MASTER_PORTS+=("$p")
    done
    REDIS_SETTINGS="redis_cluster = [$(IFS=,; echo "${urls[*]}")]"
}

# stop_private_redis_cluster: stops what start_private_redis_cluster started.
stop_private_redis_cluster() {
    local p
    for p in "${REDIS_CLUSTER_PORTS[@]}"; do
        redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true
    done
}

# The benchmarks' cluster (bench_cluster.sh, bench_groups.sh): a Route
# (2 workers, on 127.0.0.1) and two IM servers (2 workers each, on
# 127.0.0.2 and 127.0.0.3, max_conn 20000) under WORK, on the private Redis
# at REDIS_PORT, started with the binaries ROUTE and IM (`start -d`), every
# IM server registered before it returns. ROUTE_EXTRA and IM_EXTRA are
# settings lines for their configs. Sets RPORT, IM_URLS (ws:// URLs),
# IM_HP (host:port) and IMS (the URLs, comma-separated). REDIS_SETTINGS,
# when set, replaces the redis_url line (a Redis Cluster, a Sentinel).
# Usage: bench_cluster_up WORK ROUTE IM [ROUTE_EXTRA] [IM_EXTRA]
bench_cluster_up() {
  local work=$1 route=$2 im=$3 route_extra=${4:-} im_extra=${5:-} i host port redis_line
  redis_line="redis_url = \"redis://127.0.0.1:$REDIS_PORT\""
  [[ -n ${REDIS_SETTINGS:-} ]] && redis_line=$REDIS_SETTINGS
  RPORT=$(free_port)
  cat >"$work/route.toml" <<TOML
host = "127.0.0.1"
port = $RPORT
worker_num = 2
pid_file = "$work/route.pid"
log_file = "$work/route.log"
log_level = "warn"
$redis_line
$route_extra
TOML
  timeout 30 "$route" start -d -c "$work/route.toml" || { echo "the Route did not start" >&2; return 1; }
  IM_URLS=()
  IM_HP=()
  for i in 0 1; do
    host="127.0.0.$((i + 2))"
    port=$(free_port "$host")
    cat >"$work/im$i.toml" <<TOML
host = "$host"
port = $port
worker_num = 2
pid_file = "$work/im$i.pid"
log_file = "$work/im$i.log"
log_level = "warn"
$redis_line
route_url = "ws://127.0.0.1:$RPORT/"
service_name = "IM_$i"
max_conn = 20000
heartbeat_idle_time = 600
$im_extra
TOML
    timeout 30 "$im" start -d -c "$work/im$i.toml" || { echo "IM_$i did not start" >&2; return 1; }
    IM_URLS+=("ws://$host:$port/")
    IM_HP+=("$host:$port")
  done
  local n=0
  for _ in $(seq 100); do
    n=$(curl -s "http://127.0.0.1:$RPORT/api/servers" | python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])' 2>/dev/null || echo 0)
    [[ $n == 2 ]] && break
    sleep 0.1
  done
  [[ $n == 2 ]] || { echo "the IM servers did not register" >&2; return 1; }
  IMS=$(IFS=,; echo "${IM_URLS[*]}")
}

# Stops what bench_cluster_up started under WORK and keeps the daemons'
# logs as OUT/PREFIX<name>.log.
# Usage: bench_cluster_down WORK ROUTE IM OUT PREFIX
bench_cluster_down() {
  local work=$1 route=$2 im=$3 out=$4 prefix=$5 c
  for c in im1 im0 route; do
    if [[ -f $work/$c.pid ]]; then
      if [[ $c == route ]]; then
        timeout 20 "$route" stop -c "$work/$c.toml" >/dev/null 2>&1 || true
      else
        timeout 20 "$im" stop -c "$work/$c.toml" >/dev/null 2>&1 || true
      fi
    fi
    cp "$work/$c.log" "$out/$prefix$c.log" 2>/dev/null || true
  done
}

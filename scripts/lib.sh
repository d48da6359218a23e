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

#!/usr/bin/env bash
# scripts/bench_redis_cluster.sh: swocloud on a Redis Cluster (issue 13).
# Runs scripts/bench_cluster.sh (a Route, two IM servers, 10,000 users:
# /api/send and user→user at saturation, then paced) on a single private
# redis-server, on a private 3-master, 3-replica Redis Cluster with sharded
# pub/sub, and on the same cluster with classic pub/sub, REDIS_ROUNDS times
# in turn, in the same run; prints the medians and the ratios (cluster ÷
# single; classic ÷ sharded): messages/s, p99, and Redis CPU µs per
# message summed over every Redis process (the cost of pub/sub: classic
# PUBLISH is copied to every node of the cluster).
# Environment: REDIS_ROUNDS [1], plus bench_cluster.sh's.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BENCH_OUT=${BENCH_OUT:-target/bench}
REDIS_ROUNDS=${REDIS_ROUNDS:-1}
export CLUSTER_ROUTE_MSG_RATE=${CLUSTER_ROUTE_MSG_RATE:-0}
export CLUSTER_REPLAY=${CLUSTER_REPLAY:-0}
export BENCH_OUT
mkdir -p "$BENCH_OUT"
for r in $(seq "$REDIS_ROUNDS"); do
    for m in single cluster cluster-classic; do
        CLUSTER_REDIS=$m CLUSTER_LABEL="$m$r-" bash scripts/bench_cluster.sh
    done
done
python3 - "$BENCH_OUT" "$REDIS_ROUNDS" <<'PY' | tee "$BENCH_OUT/summary-redis-cluster.txt"
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def load(label):
    rows = {}
    for r in range(1, rounds + 1):
        for l in open(f"{out}/{label}{r}-summary-cluster.txt"):
            if l.startswith("RESULT "):
                for k, v in json.loads(l[7:]).items():
                    rows.setdefault(k, []).extend(v)
    return rows
runs = {m: load(m) for m in ("single", "cluster", "cluster-classic")}
def med(rows, k, f):
    vals = [r[f] for r in rows.get(k, []) if r.get(f) is not None]
    return statistics.median(vals) if vals else None
fields = ("received_per_s", "p50_us", "p99_us", "redis_cpu_us_per_msg_window", "redis_per_msg_window")
print("medians over every run; ratios cluster ÷ single and classic ÷ sharded (both on the cluster):")
for k in sorted(set(runs["single"]) & set(runs["cluster"])):
    for f in fields:
        s, c, cc = (med(runs[m], k, f) for m in ("single", "cluster", "cluster-classic"))
        ratio = lambda a, b: f"{a / b:5.2f}" if a is not None and b else "  n/a"
        fmt = lambda v: f"{v:10.1f}" if v is not None else "       n/a"
        print(f"  {k:14} {f:28} single {fmt(s)}  cluster {fmt(c)}  classic {fmt(cc)}  cluster/single {ratio(c, s)}  classic/sharded {ratio(cc, c)}")
PY

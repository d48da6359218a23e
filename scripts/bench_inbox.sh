#!/usr/bin/env bash
# scripts/bench_inbox.sh: what verifiable delivery costs (issue 12).
# Runs scripts/bench_cluster.sh with the inbox off (fire and forget, the
# earlier path), then on (every message stored in the recipient's Redis
# stream before it is accepted), INBOX_ROUNDS times alternating, on the
# same machine in the same run; prints both summaries and the ratios
# (inbox ÷ no inbox) of the medians: messages/s received and p99, at
# saturation and paced; and the replay figure (10,000 queued messages).
# Environment: INBOX_ROUNDS [1], plus bench_cluster.sh's (CLUSTER_USERS,
# CLUSTER_REPEATS, …; CLUSTER_ROUTE_MSG_RATE defaults to 0 here so that
# the Route's per-link limit does not cap u2u saturation).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BENCH_OUT=${BENCH_OUT:-target/bench}
INBOX_ROUNDS=${INBOX_ROUNDS:-1}
export CLUSTER_ROUTE_MSG_RATE=${CLUSTER_ROUTE_MSG_RATE:-0}
export BENCH_OUT
mkdir -p "$BENCH_OUT"
for r in $(seq "$INBOX_ROUNDS"); do
    CLUSTER_INBOX=false CLUSTER_LABEL="noinbox$r-" bash scripts/bench_cluster.sh
    CLUSTER_INBOX=true CLUSTER_LABEL="inbox$r-" bash scripts/bench_cluster.sh
done
python3 - "$BENCH_OUT" "$INBOX_ROUNDS" <<'PY' | tee "$BENCH_OUT/summary-inbox.txt"
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
off, on = load("noinbox"), load("inbox")
print("inbox on ÷ inbox off (medians over every run of both):")
for k in sorted(set(off) & set(on)):
    for f in ("received_per_s", "p50_us", "p99_us"):
        a = statistics.median(r[f] for r in off[k])
        b = statistics.median(r[f] for r in on[k])
        print(f"  {k:14} {f:15} off {a:9.0f}  on {b:9.0f}  ratio {b / a:5.2f}" if a else f"  {k} {f}: no data")
for r in on.get("replay@0", []):
    print(f"replay: {r['messages']} queued messages in {r['replay_ms']:.0f} ms ({r['per_s']:.0f} msg/s)")
PY

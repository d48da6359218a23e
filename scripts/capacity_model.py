#!/usr/bin/env python3
"""The capacity model (issue 13): per-event Redis costs measured by
scripts/bench_capacity.sh, extrapolated to a deployment.

Input: capacity.json (phases with every master's INFO commandstats delta:
`registry`, the master of the `{im_server}` slot; `single_keys`, the one
that holds the one uid /route was asked for and the one group; `plain`,
the third). For each phase the idle rate (the daemons' own background
work, measured first) is taken off per master; what the registry's master
carries beyond `plain` is the `{im_server}` slot's own load (the registry
is one hash tag, so one shard carries it whatever the cluster's size); the
rest is spread over every slot in a deployment (per-user keys, presence
partitions, and many groups' keys).

The deployment is set by the environment: CAP_M_USERS (1,000,000 connected
users), CAP_M_IMS (50 IM servers), CAP_M_ROUTES (10 Route nodes),
CAP_M_SHARDS (6), CAP_M_SESSION_S (1,800: a connection's mean life, so
users/1,800 connects and disconnects a second, each after one /route),
CAP_M_U2U_PER_USER_H (30 messages a user sends an hour), CAP_M_API_SEND
(2,000 /api/send a second), CAP_M_GROUP_SENDS (20 group sends a second, to
groups as large as the measured one).
"""
import json
import os
import sys


def env(name, default):
    return float(os.environ.get(name, default))


doc = json.load(open(sys.argv[1]))
phases = {p["name"]: p for p in doc["phases"]}
keys = list(phases["idle"]["masters"])  # registry, single_keys, plain


def totals(d):
    return sum(v[0] for v in d.values()), sum(v[1] for v in d.values())


idle = phases["idle"]
idle_rate = {k: tuple(x / idle["seconds"] for x in totals(idle["masters"][k])) for k in keys}


def cost(name):
    """Per unit: (commands, usec) in all, and (commands, usec) of the
    registry slot alone; the top commands."""
    p = phases[name]
    net = {}
    for k in keys:
        c, u = totals(p["masters"][k])
        if name != "idle":
            c -= idle_rate[k][0] * p["seconds"]
            u -= idle_rate[k][1] * p["seconds"]
        net[k] = (max(c, 0.0), max(u, 0.0))
    # The registry's commands beyond the plain master's; their time at the
    # registry master's own µs per command (a difference of times would
    # turn the machine's noise into load when multiplied by a million).
    hot_c = max(net["registry"][0] - net["plain"][0], 0.0)
    per_call = net["registry"][1] / net["registry"][0] if net["registry"][0] else 0.0
    hot = (hot_c, hot_c * per_call)
    spread = tuple(sum(net[k][i] for k in keys) - hot[i] for i in (0, 1))
    n = max(p["count"], 1e-9)
    top = {}
    for k in keys:
        for cmd, (c, _) in p["masters"][k].items():
            top[cmd] = top.get(cmd, 0) + c
    top = sorted(top.items(), key=lambda x: -x[1])[:4]
    return {
        "unit": p["unit"],
        "count": p["count"],
        "all": ((spread[0] + hot[0]) / n, (spread[1] + hot[1]) / n),
        "hot": (hot[0] / n, hot[1] / n),
        "spread": (spread[0] / n, spread[1] / n),
        "top": ", ".join(f"{c} {v / n:.2g}" for c, v in top),
    }


events = ["register", "heartbeat", "unregister", "route", "connect", "disconnect",
          "users_idle", "send", "api_send", "group_join", "group_send", "idle"]
costs = {e: cost(e) for e in events if e in phases}

print("Per event (idle rate taken off; commands include those Lua scripts make;")
print("usec is Redis's own command time, without I/O and parsing):")
print(f"  {'event':12} {'per':44} {'n':>8} {'commands':>9} {'on {im_server}':>15} {'usec':>8}  top commands per event")
for e, c in costs.items():
    print(f"  {e:12} {c['unit']:44} {c['count']:8.0f} {c['all'][0]:9.2f} {c['hot'][0]:15.2f} {c['all'][1]:8.1f}  {c['top']}")

U = env("CAP_M_USERS", 1_000_000)
IMS = env("CAP_M_IMS", 50)
ROUTES = env("CAP_M_ROUTES", 10)
SHARDS = env("CAP_M_SHARDS", 6)
SESSION = env("CAP_M_SESSION_S", 1800)
U2U = env("CAP_M_U2U_PER_USER_H", 30) * U / 3600
API = env("CAP_M_API_SEND", 2000)
GROUPS = env("CAP_M_GROUP_SENDS", 20)
churn = U / SESSION
rates = {
    "heartbeat": IMS / 3.0,
    "route": churn,
    "connect": churn,
    "disconnect": churn,
    "users_idle": U,
    "send": U2U,
    "api_send": API,
    "group_send": GROUPS,
    # The measured idle second is one Route and two IM servers' own work.
    "idle": (ROUTES + IMS) / 3.0,
}
print()
print(f"Deployment: {U:,.0f} users, {IMS:.0f} IM servers, {ROUTES:.0f} Route nodes, {SHARDS:.0f} shards;")
print(f"  {churn:,.0f} connects and disconnects/s (sessions of {SESSION:.0f} s, one /route each), "
      f"{U2U:,.0f} user→user msg/s, {API:,.0f} /api/send/s, {GROUPS:.0f} group sends/s")
print(f"  {'event':12} {'events/s':>10} {'commands/s':>12} {'Redis usec/s':>13}")
spread_c = spread_u = hot_c = hot_u = 0.0
for e, r in rates.items():
    if e not in costs:
        continue
    c = costs[e]
    spread_c += r * c["spread"][0]
    spread_u += r * c["spread"][1]
    hot_c += r * c["hot"][0]
    hot_u += r * c["hot"][1]
    print(f"  {e:12} {r:10,.0f} {r * c['all'][0]:12,.0f} {r * c['all'][1]:13,.0f}")
avg_c, avg_u = spread_c / SHARDS, spread_u / SHARDS
print(f"  {'all':12} {'':>10} {spread_c + hot_c:12,.0f} {spread_u + hot_u:13,.0f}")
print()
print(f"Per shard ({SHARDS:.0f}): {avg_c:,.0f} commands/s and {avg_u / 1e4:.1f}% of a core in Redis's own command time;")
print(f"  the shard holding {{im_server}}: {avg_c + hot_c:,.0f} commands/s, {(avg_u + hot_u) / 1e4:.1f}% of a core "
      f"({hot_c:,.0f} commands/s of registry work on top).")
print("RESULT " + json.dumps({
    "per_event": {e: {"commands": round(c["all"][0], 3), "hot_slot_commands": round(c["hot"][0], 3),
                      "usec": round(c["all"][1], 2)} for e, c in costs.items()},
    "per_shard_commands": round(avg_c), "hot_shard_commands": round(avg_c + hot_c),
    "per_shard_usec_per_s": round(avg_u), "hot_shard_usec_per_s": round(avg_u + hot_u),
}))

// Replay speed (scripts/bench_cluster.sh): queues N messages for an offline
// user through the Route's POST /api/send (32 requests in flight), then
// connects it (GET /route → its IM server) and times, from the moment the
// WebSocket is open, until the N-th stored message arrived; checks every
// seq 1..N came once, in order.
//   node bench_replay.mjs ROUTE_HTTP_URL UID N
// Prints RESULT {"messages","replay_ms","per_s","fill_per_s"}.
import WebSocket from "ws";

const [route, uid, nArg] = process.argv.slice(2);
const n = Number(nArg);
if (!route || !uid || !(n > 0)) {
  console.error("usage: node bench_replay.mjs ROUTE_HTTP_URL UID N");
  process.exit(2);
}

const t0 = performance.now();
let next = 0;
async function sender() {
  while (next < n) {
    const i = ++next;
    const r = await fetch(`${route}/api/send`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ uid, data: { i } }),
    });
    const body = await r.json();
    if (r.status !== 200) throw new Error(`send ${i}: ${r.status} ${JSON.stringify(body)}`);
  }
}
await Promise.all(Array.from({ length: 32 }, sender));
const fillMs = performance.now() - t0;

const where = await (await fetch(`${route}/route?uid=${encodeURIComponent(uid)}`)).json();
const ws = new WebSocket(where.url);
let opened = 0;
let last = 0;
ws.on("open", () => { opened = performance.now(); });
ws.on("message", (raw) => {
  const f = JSON.parse(raw.toString());
  if (f.seq === undefined || f.from === undefined) return; // welcome
  if (f.seq !== last + 1) {
    console.error(`out of order: got seq ${f.seq} after ${last}`);
    process.exit(1);
  }
  last = f.seq;
  if (last === n) {
    const ms = performance.now() - opened;
    console.log("RESULT " + JSON.stringify({
      messages: n,
      replay_ms: Math.round(ms * 10) / 10,
      per_s: Math.round(n / (ms / 1000)),
      fill_per_s: Math.round(n / (fillMs / 1000)),
    }));
    ws.close();
    process.exit(0);
  }
});
ws.on("error", (e) => { console.error(`websocket: ${e.message}`); process.exit(1); });
setTimeout(() => { console.error(`timeout: ${last} of ${n}`); process.exit(1); }, 120000);

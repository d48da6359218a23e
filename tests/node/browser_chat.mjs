// The browser driver for tests/browser.rs: headless Chromium (Debian's
// package) through playwright-core opens the Route's chat page for two
// users, who chat while the test SIGKILLs the IM server of one of them.
//
// Usage: node browser_chat.mjs ROUTE_ADDR UID_A TOKEN_A UID_B TOKEN_B OUT_DIR
//
// Talks to the test in lines. stdout:
//   SERVERS <json {a,b}>   where each page first connected (serviceNames)
//   KILL <serviceName>     kill this IM server now (the test answers on stdin)
//   SCREENSHOT <path>      a picture of both pages
//   RESULT <json>          what each page posted and its window.chat
// stdin: `killed` once the server is dead. Diagnostics go to stderr.
import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';
import path from 'node:path';

const [route, uidA, tokenA, uidB, tokenB, outDir] = process.argv.slice(2);
const BEFORE = 4; // messages each side sends before the kill
const DURING = 6; // sent while the kill happens (one every 40 ms)
const AFTER = 4; // sent once the server is dead
const WAIT = 30000; // ms for any one step

const say = (line) => process.stdout.write(`${line}\n`);
const log = (...a) => console.error('[browser_chat]', ...a);
const stdin = createInterface({ input: process.stdin });
const lines = stdin[Symbol.asyncIterator]();
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox'],
});
try {
  await run();
} finally {
  await browser.close();
  stdin.close();
}

async function run() {
  // One context per user: their own storage, as two people would have.
  const open = async (uid, token, peer) => {
    const ctx = await browser.newContext({ viewport: { width: 560, height: 720 } });
    const page = await ctx.newPage();
    page.on('console', (m) => log(`${uid} console:`, m.text()));
    page.on('pageerror', (e) => log(`${uid} page error:`, e.message));
    const q = new URLSearchParams({ uid, token, peer });
    await page.goto(`http://${route}/chat?${q}`);
    await page.waitForFunction(() => window.chat?.state === 'open', null, { timeout: WAIT });
    return page;
  };
  // In turn, so that the Route's balancer spreads them over the servers.
  const a = await open(uidA, tokenA, uidB);
  const b = await open(uidB, tokenB, uidA);
  const where = async (p) => p.evaluate(() => window.chat.serviceName);
  const first = { a: await where(a), b: await where(b) };
  say(`SERVERS ${JSON.stringify(first)}`);

  const posted = { a: [], b: [] };
  const post = async (side, page, uid, n) => {
    const text = `${uid} says ${posted[side].length + 1} (${n})`;
    posted[side].push(text);
    await page.evaluate((t) => window.chat.post(t), text);
  };
  // Until `page` has shown `count` messages from `from`.
  const delivered = (page, from, count) => page.waitForFunction(
    ([f, c]) => window.chat.shown.filter((m) => m.from === f).length >= c,
    [from, count], { timeout: WAIT },
  );

  for (let i = 0; i < BEFORE; i++) {
    await post('a', a, uidA, 'before');
    await post('b', b, uidB, 'before');
  }
  await delivered(b, uidA, BEFORE);
  await delivered(a, uidB, BEFORE);
  log('before the kill: delivered');

  // Kill B's server while both keep sending.
  const victim = first.b;
  await post('a', a, uidA, 'during');
  await post('b', b, uidB, 'during');
  const sending = (async () => {
    for (let i = 1; i < DURING; i++) {
      await sleep(40); // pacing: sends spread over the kill
      await post('a', a, uidA, 'during');
      await post('b', b, uidB, 'during');
    }
  })();
  say(`KILL ${victim}`);
  const answer = await lines.next();
  if (answer.value?.trim() !== 'killed') throw new Error(`expected "killed", got ${answer.value}`);
  await sending;
  for (let i = 0; i < AFTER; i++) {
    await post('a', a, uidA, 'after');
    await post('b', b, uidB, 'after');
  }

  // B reconnects by itself to the survivor; everything arrives.
  await b.waitForFunction(
    (dead) => window.chat.state === 'open' && window.chat.serviceName !== dead,
    victim, { timeout: WAIT },
  );
  log('B reconnected');
  const idle = (page) => page.waitForFunction(() => window.chat.outbox.length === 0, null, { timeout: WAIT });
  // Everything posted is confirmed and shown on the other page; on a
  // timeout the RESULT line tells the test what was missing.
  const everything = () => Promise.all([
    delivered(b, uidA, posted.a.length), delivered(a, uidB, posted.b.length), idle(a), idle(b),
  ]).catch(async (e) => {
    say(`RESULT ${JSON.stringify(await result(a, b, posted, first, e.message))}`);
    throw e;
  });
  await everything();
  // A last message each way: a duplicate of any earlier one, had the
  // cluster sent one, arrives before it (each stream is ordered).
  await post('a', a, uidA, 'last');
  await post('b', b, uidB, 'last');
  await everything();

  const shot = async (page, name) => {
    const file = path.join(outDir, `${name}.png`);
    // The message list scrolls inside the page: make the window tall
    // enough to show all of it.
    const height = await page.evaluate(() => {
      const log = document.getElementById('log');
      return document.body.scrollHeight - log.clientHeight + log.scrollHeight;
    });
    await page.setViewportSize({ width: 560, height: Math.max(720, height) });
    await page.screenshot({ path: file });
    say(`SCREENSHOT ${file}`);
  };
  await shot(a, uidA);
  await shot(b, uidB);
  say(`RESULT ${JSON.stringify(await result(a, b, posted, first, null))}`);
}

async function result(a, b, posted, first, error) {
  const view = (p) => p.evaluate(() => {
    const { outbox, post, ...c } = window.chat;
    return { ...c, outbox: outbox.map((m) => m.text) };
  });
  return { first, posted, a: await view(a), b: await view(b), error };
}

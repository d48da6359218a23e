/**
 * swocloud's JavaScript client: an ES module with no build step, for
 * browsers and Node >= 20 (Node 20 has `fetch` but no global `WebSocket`:
 * pass the `ws` package's constructor as `WebSocket`).
 *
 * It asks the Route where to connect (`GET /route`) and keeps the user's
 * stream verifiable: each stored message has a per-user `seq`, gap-free
 * within an `epoch`; the client processes each seq once (drops any seq <=
 * the last processed), acks cumulatively and in batches (`{"ack":N}`),
 * resumes after a reconnect with `&since=N&epoch=E`, and on `resync`
 * (history lost or trimmed) adopts the new epoch, restarts at seq 0 and
 * emits `resync`: the application reloads from its own source of truth.
 * It reconnects by itself (jittered exponential backoff, the same server
 * first, then `/route` again) and follows a draining server's `reconnect`.
 * The resume point lives in memory, and in `storage` (getItem/setItem, e.g.
 * `localStorage`) under `swocloud:<uid>` when given, written per message.
 *
 * @example
 * import { SwocloudClient } from '/client/swocloud.js';
 * const c = new SwocloudClient({ uid: 'alice', token, storage: localStorage });
 * c.on('message', (m) => show(m.from, m.data, m.seq));
 * c.on('resync', () => reloadHistory());
 * c.connect();
 * const { id, seq } = await c.send('bob', 'hi');
 *
 * @module swocloud
 */

/** An error from the server or the client, with a machine-readable code. */
export class SwocloudError extends Error {
  /**
   * @param {string} code the server's (`bad_request`, `unavailable`, …) or the client's:
   *   `disconnected`/`timeout` (no confirmation came: maybe stored, maybe not),
   *   `not_connected` (nothing sent), `closed` (close() called), `route` (the Route refused).
   * @param {string} message a human-readable explanation
   * @param {string} [ref] the send's ref, when the error answers one
   */
  constructor(code, message, ref) {
    super(message);
    this.name = 'SwocloudError';
    this.code = code;
    this.ref = ref;
  }
}

/**
 * @typedef {object} ClientOptions
 * @property {string} uid the user's id
 * @property {string} [token] the user's token for `/route` (when the Route has `auth_secret`)
 * @property {string} [routeUrl] the Route's base URL (`http://host:port`); default `''`: same origin
 * @property {number} [ackEvery=32] ack after this many processed messages
 * @property {number} [ackDelay=100] or this many ms after the first unacked one
 * @property {number} [sendTimeout=10000] ms to wait for a send's confirmation (0: forever)
 * @property {number} [backoffMin=200] first reconnect delay, ms (doubles per failure)
 * @property {number} [backoffMax=5000] reconnect delay cap, ms
 * @property {number} [routeAfter=1] failed attempts at a known server before asking `/route` again
 * @property {{getItem(k:string):string|null, setItem(k:string,v:string):void}} [storage] for the resume point
 * @property {typeof WebSocket} [WebSocket] constructor (default: the global one)
 * @property {typeof fetch} [fetch] function (default: the global one)
 */

/**
 * A message as delivered to `message` listeners.
 * @typedef {object} Message
 * @property {string} from sender uid (`api` for the HTTP API's default)
 * @property {*} data the payload (any JSON)
 * @property {number} [seq] per-user sequence number; absent for broadcasts
 * @property {string} [id] the server's message id; absent for broadcasts
 */

/**
 * Client states (the `state` event): `idle`, `routing` (asking `/route`), `connecting`, `open`,
 * `waiting` (backing off), `closed` (close() was called, or the Route refused the user).
 * @typedef {'idle'|'routing'|'connecting'|'open'|'waiting'|'closed'} State
 */

const EVENTS = ['message', 'resync', 'welcome', 'sent', 'error', 'state'];
const DEFAULTS = {
  token: '', routeUrl: '', ackEvery: 32, ackDelay: 100, sendTimeout: 10000,
  backoffMin: 200, backoffMax: 5000, routeAfter: 1, storage: null,
};

/** One user's connection to a swocloud cluster. */
export class SwocloudClient {
  /** @param {ClientOptions} opts */
  constructor(opts) {
    if (!opts || !opts.uid) throw new TypeError('SwocloudClient: uid is required');
    const o = { ...DEFAULTS, ...opts };
    this.uid = String(o.uid);
    this.token = o.token;
    this.routeUrl = o.routeUrl.replace(/\/+$/, '');
    for (const k of ['ackEvery', 'ackDelay', 'sendTimeout', 'backoffMin', 'backoffMax', 'routeAfter', 'storage']) this[k] = o[k];
    this._WS = opts.WebSocket ?? globalThis.WebSocket;
    this._fetch = opts.fetch ?? globalThis.fetch?.bind(globalThis);
    if (!this._WS) throw new TypeError('SwocloudClient: no WebSocket: pass opts.WebSocket');
    if (!this._fetch) throw new TypeError('SwocloudClient: no fetch: pass opts.fetch');
    this.state = /** @type {State} */ ('idle');
    this.epoch = /** @type {string|null} */ (null); // the epoch of `seq`, null until the server names one
    this.seq = 0; // the last seq processed in `epoch`
    this.serviceName = /** @type {string|null} */ (null); // the IM server last routed to; null after a drain hint
    this.duplicates = 0; // messages dropped as already processed
    this._listeners = new Map(EVENTS.map((e) => [e, new Set()]));
    this._ws = null;
    this._url = null; // a known server's URL (uid and token included), or null: ask /route
    this._fails = 0; // attempts in a row that ended before a welcome or a message
    this._served = false; // this socket got a welcome or a message
    this._timer = null; // the backoff timer
    this._acked = 0; // the last seq acked to the server
    this._ackTimer = null;
    this._pending = new Map(); // ref -> {resolve, reject, timer}
    this._refs = 0; // refs made up by send()
    this._welcomeResync = false; // the welcome just resynced: skip the resync frame that follows
    this._load();
  }

  /**
   * Adds a listener: `message` (Message), `resync` ({epoch, reason}:
   * `epoch`, `trimmed`, or `ahead`: our seq was past the server's),
   * `welcome` (the welcome frame), `sent` ({ref, id, seq, epoch}), `error`
   * (SwocloudError: protocol errors and failed attempts), `state` (State).
   * @param {string} event
   * @param {(arg: any) => void} fn
   * @returns {() => void} a function that removes the listener
   */
  on(event, fn) {
    const set = this._listeners.get(event);
    if (!set) throw new TypeError(`SwocloudClient: unknown event ${event}`);
    set.add(fn);
    return () => set.delete(fn);
  }

  /** Starts connecting (and reconnecting, until close()). */
  connect() {
    if (this.state === 'idle' || this.state === 'closed') this._attempt();
  }

  /**
   * Sends `data` to user `to`. Resolves with `{id, seq, epoch}` (its place in
   * `to`'s stream) once the server stored it; rejects with a SwocloudError: the
   * server's error for it, `not_connected` (nothing sent), or
   * `disconnected`/`timeout` (no confirmation came: maybe stored, maybe
   * not). Retry with the same `opts.ref`: the server stores a repeat of a
   * ref it still holds once, and confirms it with the first copy's seq.
   * @param {string} to
   * @param {*} data any JSON
   * @param {{ref?: string}} [opts]
   * @returns {Promise<{id: string, seq: number, epoch: string}>}
   */
  send(to, data, opts = {}) {
    const ref = opts.ref ?? `${this.uid}.${Date.now().toString(36)}.${++this._refs}`;
    const refuse = (code, why) => Promise.reject(new SwocloudError(code, why, ref));
    if (!this._ws || this.state !== 'open') return refuse('not_connected', 'not connected');
    if (this._pending.has(ref)) return refuse('bad_request', `ref ${ref} is already pending`);
    return new Promise((resolve, reject) => {
      const p = { resolve, reject, timer: null };
      if (this.sendTimeout > 0) {
        p.timer = setTimeout(() => this._settle(ref, new SwocloudError(
          'timeout', `no confirmation in ${this.sendTimeout} ms`, ref)), this.sendTimeout);
      }
      this._pending.set(ref, p);
      this._ws.send(JSON.stringify({ to: String(to), data, ref }));
    });
  }

  /** Stops: acks what was processed, closes the socket, rejects pending sends. */
  close() {
    clearTimeout(this._timer);
    this._flushAck();
    this._drop('closed', 'the client was closed');
    this._setState('closed');
  }

  /** One attempt: a known server's URL, or `/route` first. */
  async _attempt() {
    this._timer = null;
    let url = this._url;
    if (!url) {
      this._setState('routing');
      try {
        url = await this._route();
      } catch (e) {
        if (this.state === 'closed') return;
        this._emit('error', e);
        if (e instanceof SwocloudError && e.code === 'route') return this.close();
        this._fails++;
        return this._retry();
      }
      if (this.state === 'closed') return;
      this._url = url;
    }
    this._open(url);
  }

  /** `GET /route`: resolves with the IM server's URL. 4xx is final. */
  async _route() {
    const q = new URLSearchParams({ uid: this.uid, ...(this.token && { token: this.token }) });
    const r = await this._fetch(`${this.routeUrl}/route?${q}`, { cache: 'no-store' });
    const body = await r.json().catch(() => ({}));
    const why = `/route answered ${r.status}: ${body.error?.message ?? ''}`;
    if (r.status >= 400 && r.status < 500) throw new SwocloudError('route', why);
    if (!r.ok || !body.url) throw new SwocloudError(body.error?.code ?? 'unavailable', why);
    this.serviceName = body.serviceName ?? null;
    return body.url;
  }

  /** Opens the socket to `url`, resuming when an epoch is known. */
  _open(url) {
    this._setState('connecting');
    // Nothing processed in this epoch: no resume point (the server starts
    // past the user's last ack).
    const full = this.epoch && this.seq > 0
      ? `${url}&since=${this.seq}&epoch=${encodeURIComponent(this.epoch)}` : url;
    let ws;
    try {
      ws = new this._WS(full);
    } catch (e) {
      this._emit('error', new SwocloudError('connect', String(e?.message ?? e)));
      this._url = null;
      this._fails++;
      return this._retry();
    }
    this._ws = ws;
    this._served = false;
    ws.onopen = () => {
      this._acked = 0; // the welcome acks a resumed position
      this._setState('open');
    };
    ws.onmessage = (ev) => this._frame(ev.data);
    ws.onerror = () => {}; // onclose follows and decides
    ws.onclose = () => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._cancelAck();
      this._failPending('disconnected', 'the connection closed before the server confirmed');
      // Refused (token, storage unavailable, resume point) or unreachable: back off, ask /route.
      if (!this._served && ++this._fails >= this.routeAfter) this._url = null;
      this._retry();
    };
  }

  /** Waits the backoff delay, then attempts again. */
  _retry() {
    if (this.state === 'closed') return;
    this._setState('waiting');
    const cap = Math.min(this.backoffMax, this.backoffMin * 2 ** Math.min(this._fails, 16));
    const delay = this._fails === 0 ? Math.random() * this.backoffMin : cap / 2 + Math.random() * cap / 2;
    this._timer = setTimeout(() => this._attempt(), delay);
  }

  /** Handles one text frame from the IM server. */
  _frame(text) {
    let f = null;
    try { f = JSON.parse(String(text)); } catch { /* reported below */ }
    if (f === null || typeof f !== 'object') {
      return this._emit('error', new SwocloudError('bad_json', 'the server sent a frame that is not a JSON object'));
    }
    const resyncNext = this._welcomeResync;
    this._welcomeResync = false;
    if (f.method === 'welcome') return this._welcome(f);
    if (f.method === 'resync') {
      if (!(resyncNext && f.epoch === this.epoch)) this._resync(f.epoch, f.reason ?? 'epoch');
      return;
    }
    if (f.method === 'reconnect') return this._drain(f.url ?? null);
    if (typeof f.sent === 'string') {
      const stored = { id: f.id, seq: f.seq, epoch: f.epoch };
      this._settle(f.sent, null, stored);
      return this._emit('sent', { ref: f.sent, ...stored });
    }
    if (f.error) {
      const e = new SwocloudError(f.error.code ?? 'error', f.error.message ?? '', f.ref);
      if (typeof f.ref === 'string' && this._pending.has(f.ref)) return this._settle(f.ref, e);
      return this._emit('error', e);
    }
    if (typeof f.from === 'string' && 'data' in f) return this._message(f);
  }

  /**
   * The first frame: adopts the epoch. A different epoch than ours is a
   * resync (the frame that follows is then skipped); a seq past the
   * server's last is one too (the server refuses that resume point). A
   * resumed position is acked at once: the server trims unacked history.
   */
  _welcome(f) {
    this._served = true;
    this._fails = 0;
    const epoch = f.epoch == null ? null : String(f.epoch);
    if (this.epoch && epoch && epoch !== this.epoch) {
      this._resync(epoch, 'epoch');
      this._welcomeResync = true;
    } else if (this.epoch && epoch && f.seq < this.seq) {
      this._resync(epoch, 'ahead');
    } else if (epoch && !this.epoch) {
      this.epoch = epoch;
      this._save();
    }
    this._emit('welcome', f);
    this._flushAck();
  }

  /** Adopts `epoch`, restarts at seq 0 and tells the application. */
  _resync(epoch, reason) {
    this.epoch = epoch == null ? null : String(epoch);
    this.seq = 0;
    this._acked = 0;
    this._cancelAck();
    this._save();
    this._emit('resync', { epoch: this.epoch, reason });
  }

  /** A delivered message: deduped by seq, processed, then acked (batched). */
  _message(f) {
    this._served = true;
    this._fails = 0;
    const m = { from: f.from, data: f.data };
    if (typeof f.seq !== 'number') return this._emit('message', m); // a broadcast
    if (f.seq <= this.seq) return void this.duplicates++;
    this._emit('message', { ...m, seq: f.seq, id: f.id });
    this.seq = f.seq;
    this._save();
    if (this.seq - this._acked >= this.ackEvery) this._flushAck();
    else if (!this._ackTimer) this._ackTimer = setTimeout(() => this._flushAck(), this.ackDelay);
  }

  /** Sends `{"ack": seq, "epoch": epoch}` when something is unacked (the
   * epoch makes an ack sent just before a `resync` harmless). */
  _flushAck() {
    this._cancelAck();
    if (this.seq <= this._acked || !this._ws || this.state !== 'open') return;
    try {
      this._ws.send(JSON.stringify({ ack: this.seq, epoch: this.epoch }));
      this._acked = this.seq;
    } catch { /* the close handler reconnects; since= acks on resume */ }
  }

  /** A draining server's hint: reconnect now, to `url` or through /route. */
  _drain(url) {
    this._flushAck();
    this._url = url;
    this.serviceName = null; // the hint names no server: unknown until the next /route
    this._fails = 0;
    this._drop('disconnected', 'the server is draining');
    this._attempt();
  }

  _cancelAck() {
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
  }

  /** Closes the socket without reconnecting; pending sends fail with `code`. */
  _drop(code, message) {
    const ws = this._ws;
    this._ws = null;
    this._failPending(code, message);
    if (!ws) return;
    ws.onclose = ws.onmessage = ws.onerror = ws.onopen = null;
    try { ws.close(1000); } catch { /* already closed */ }
  }

  /** Resolves (or, with `err`, rejects) the pending send `ref`. */
  _settle(ref, err, value) {
    const p = this._pending.get(ref);
    if (!p) return;
    this._pending.delete(ref);
    clearTimeout(p.timer);
    return err ? p.reject(err) : p.resolve(value);
  }

  _failPending(code, message) {
    for (const ref of [...this._pending.keys()]) this._settle(ref, new SwocloudError(code, message, ref));
  }

  _setState(s) {
    if (this.state !== s) this._emit('state', (this.state = s));
  }

  _emit(event, arg) {
    for (const fn of [...this._listeners.get(event)]) {
      try { fn(arg); } catch (e) {
        if (event !== 'error') this._emit('error', new SwocloudError('listener', String(e?.stack ?? e)));
      }
    }
  }

  /** Reads the resume point from `storage`; `_save` writes it. */
  _load() {
    if (!this.storage) return;
    try {
      const saved = JSON.parse(this.storage.getItem(`swocloud:${this.uid}`) ?? 'null');
      if (typeof saved?.epoch === 'string' && Number.isInteger(saved.seq)) ({ epoch: this.epoch, seq: this.seq } = saved);
    } catch { /* unreadable: start afresh */ }
  }

  _save() {
    if (!this.storage) return;
    try {
      this.storage.setItem(`swocloud:${this.uid}`, JSON.stringify({ epoch: this.epoch, seq: this.seq }));
    } catch { /* full or forbidden: memory only */ }
  }
}

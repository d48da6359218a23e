// A real permessage-deflate peer for tests/frames.rs: Node's `ws` client
// (the same extension offer browsers send) against a swocloud echo worker.
// Usage: node deflate_echo.mjs ws://127.0.0.1:PORT/ [takeover|no-takeover]
// Prints one JSON line: the negotiated extension and, per message size,
// whether the echo came back byte for byte.
import WebSocket from 'ws';

const [url, mode = 'no-takeover'] = process.argv.slice(2);
const takeover = mode === 'takeover';
const sizes = [0, 125, 126, 1024, 65535, 65536, 1 << 20];
const ws = new WebSocket(url, {
  perMessageDeflate: {
    clientNoContextTakeover: !takeover,
    serverNoContextTakeover: !takeover,
    threshold: 0,
  },
  maxPayload: 4 << 20,
});
const results = [];
let negotiated = '';
ws.on('upgrade', (res) => { negotiated = res.headers['sec-websocket-extensions'] || ''; });
const timer = setTimeout(() => { console.log(JSON.stringify({ error: 'timeout', results })); process.exit(2); }, 20000);

function payload(n, i) {
  // Chat-like, compressible text; varied so messages differ.
  let s = '';
  while (s.length < n) s += `{"from":"user-${i}","text":"message ${s.length} about the meeting"},`;
  return s.slice(0, n);
}

ws.on('open', () => {
  let i = 0;
  const next = () => {
    if (i === sizes.length) {
      clearTimeout(timer);
      const total = sizes.reduce((a, b) => a + b, 0);
      // Bytes the server sent on the socket (handshake included), against
      // the payload it echoed: well below it only if frames were compressed.
      console.log(JSON.stringify({ extensions: negotiated, bytesRead: ws._socket.bytesRead, total, results }));
      ws.close(1000);
      return;
    }
    const sent = payload(sizes[i], i);
    ws.once('message', (data, isBinary) => {
      results.push({ size: sizes[i], ok: !isBinary && data.toString() === sent });
      i += 1;
      next();
    });
    ws.send(sent);
  };
  next();
});
ws.on('error', (e) => { clearTimeout(timer); console.log(JSON.stringify({ error: String(e), results })); process.exit(1); });

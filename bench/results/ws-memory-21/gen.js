// A docs-only WebSocket load generator: N clients connect to ws://HOST/ws, subscribe with an id,
// wait for `subscribed`; then RSS of the server PID is read.
const WebSocket = require(process.env.WS_MODULE || '../../peers/socketio/node_modules/ws');
const fs = require('fs');
const [url, n, pid, conc, deflate] = [process.argv[2], +process.argv[3], process.argv[4], +(process.argv[5]||n), process.argv[6] !== 'nodeflate'];
const rss = () => +fs.readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmRSS:\s+(\d+)/)[1] * 1024;
const socks = [];
let done = 0, inflight = 0, next = 0;
const before = rss();
function one(i) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, { perMessageDeflate: deflate });
    ws.on('open', () => ws.send(JSON.stringify({ type: 'subscribe', room: 'game:1', id: 1 })));
    ws.on('message', (m) => { if (String(m).includes('"subscribed"')) resolve(); });
    ws.on('error', (e) => { console.error('err', e.message); resolve(); });
    socks.push(ws);
  });
}
(async () => {
  const all = [];
  let running = 0;
  for (let i = 0; i < n; i++) {
    while (running >= conc) await new Promise(r => setTimeout(r, 1));
    running++;
    all.push(one(i).then(() => running--));
  }
  await Promise.all(all);
  await new Promise(r => setTimeout(r, 1000));
  const after = rss();
  console.log(JSON.stringify({ n, conc, deflate, before, after, per_conn: (after - before) / n }));
  process.exit(0);
})();

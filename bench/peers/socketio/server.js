// The original design: Socket.IO 4 on Node with the same room semantics as Courtside (join a
// room; states and events broadcast to it), WebSocket transport only, the old options.
// POST /publish {"room","event":"state"|"event","data"} broadcasts; prints {"port":N} when ready.
// With REDIS_URL, rooms are shared through @socket.io/redis-adapter (the old design's cluster).
// With PER_MESSAGE_DEFLATE_THRESHOLD, permessage-deflate as the old design configured it.
import { createServer } from 'node:http';
import { Server } from 'socket.io';

const port = Number(process.argv[2] ?? process.env.PORT ?? 0);
const http = createServer((req, res) => {
  if (req.method === 'POST' && req.url === '/publish') {
    let body = '';
    req.on('data', (chunk) => { body += chunk; });
    req.on('end', () => {
      try {
        const { room, event, data } = JSON.parse(body);
        io.to(room).emit(event, data);
        res.writeHead(200, { 'content-type': 'application/json' }).end('{"ok":true}');
      } catch (e) {
        res.writeHead(400).end(String(e));
      }
    });
    return;
  }
  res.writeHead(404).end();
});
const io = new Server(http, {
  transports: ['websocket'],
  pingInterval: 25000,
  pingTimeout: 60000,
  maxHttpBufferSize: 1e6,
  serveClient: false,
  // The original design's compression (ADR-022): permessage-deflate for messages of at least
  // PER_MESSAGE_DEFLATE_THRESHOLD bytes (1024 there) when the client offers it; off without it.
  perMessageDeflate: process.env.PER_MESSAGE_DEFLATE_THRESHOLD
    ? { threshold: Number(process.env.PER_MESSAGE_DEFLATE_THRESHOLD) }
    : false,
});
if (process.env.REDIS_URL) {
  const { createAdapter } = await import('@socket.io/redis-adapter');
  const { createClient } = await import('redis');
  const pub = createClient({ url: process.env.REDIS_URL });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  io.adapter(createAdapter(pub, sub));
}
io.on('connection', (socket) => {
  socket.on('join', (room) => { socket.join(room); socket.emit('joined', room); });
  socket.on('leave', (room) => socket.leave(room));
});
// A listen backlog of 4,096 as Courtside's, so a connect storm compares servers, not kernel queues.
http.listen(port, '127.0.0.1', 4096, () => {
  console.log(JSON.stringify({ port: http.address().port }));
});
process.on('SIGTERM', () => process.exit(0));

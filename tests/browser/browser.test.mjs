// Headless Chromium against the real binary: the page served by the edge connects with
// WebTransport (certificate hash), falls back to WebSocket where WebTransport is missing or its
// UDP port is silent, and reconnects by itself when the server goes away.
// Run by tests/run.sh after `cargo build`; COURTSIDE_BIN and CHROMIUM override the paths.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import dgram from 'node:dgram';
import net from 'node:net';
import { createHmac } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const BIN = process.env.COURTSIDE_BIN ?? fileURLToPath(new URL('../../target/debug/courtside', import.meta.url));
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const TOKEN = 'browser-test-token';
const HANG = 30_000;

const servers = [];
const browsers = [];
after(async () => {
  for (const b of browsers) await b.close().catch(() => {});
  for (const s of servers) s.child.kill('SIGKILL');
});

/** Starts `courtside serve` on loopback ports and resolves with its addresses. */
function startServer(extra = []) {
  const args = ['serve', '--publish-token', TOKEN, '--log-format', 'json', ...extra];
  if (!extra.includes('--http')) args.push('--http', '127.0.0.1:0');
  if (!extra.includes('--wt') && !extra.includes('--no-wt')) args.push('--wt', '127.0.0.1:0');
  const child = spawn(BIN, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  const server = { child, logs: [] };
  servers.push(server);
  const wantWt = !extra.includes('--no-wt');
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start: ${server.logs.join('\n')}`)), HANG);
    child.on('exit', (code) => reject(new Error(`server exited with ${code}: ${server.logs.join('\n')}`)));
    createInterface({ input: child.stderr }).on('line', (line) => {
      server.logs.push(line);
      try {
        const record = JSON.parse(line);
        if (record.http) server.http = record.http;
        if (record.wt) server.wt = record.wt;
      } catch { /* not JSON */ }
      if (server.http && (server.wt || !wantWt)) {
        clearTimeout(timer);
        resolve(server);
      }
    });
  });
}

function stopServer(server) {
  return new Promise((resolve) => {
    server.child.once('exit', resolve);
    server.child.kill('SIGTERM');
  });
}

async function publish(server, room, kind, data) {
  const path = kind === 'state' ? 'state' : 'events';
  const res = await fetch(`http://${server.http}/v1/rooms/${room}/${path}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify(data),
  });
  const text = await res.text();
  assert.equal(res.status, 200, text);
  return JSON.parse(text);
}

async function launch(extraArgs = []) {
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', ...extraArgs],
  });
  browsers.push(browser);
  return browser;
}

/** In the page: a second client from the served module, recording what it receives. */
async function subscribeInPage(page, room, options = {}) {
  return page.evaluate(async ({ room, options }) => {
    const { connect, certHash, webtransportPort } = window.courtside;
    window.received = [];
    window.subscribedCount = 0;
    window.disconnects = [];
    const onDisconnect = (info) => window.disconnects.push({ ...info, transport: window.testClient?.lastTransport });
    const client = await connect(location.origin, { certHash, webtransportPort, reconnectInitialMs: 100, onDisconnect, ...options });
    client.lastTransport = client.transport;
    client.subscribe(room, {
      onSubscribed: () => { window.subscribedCount += 1; },
      onState: (data, meta) => window.received.push({ kind: 'state', data, version: meta.version, transport: meta.transport }),
      onEvent: (data, meta) => window.received.push({ kind: 'event', data, seq: meta.seq, id: meta.id, transport: meta.transport }),
    });
    window.testClient = client;
    return client.transport;
  }, { room, options });
}

async function receiveStateAndEvent(page, server, room) {
  await page.waitForFunction(() => window.subscribedCount >= 1, null, { timeout: HANG });
  await publish(server, room, 'state', { home: 42, away: 40 });
  await publish(server, room, 'event', { kind: 'advance', team: 301 });
  await page.waitForFunction(() => window.received.length >= 2, null, { timeout: HANG });
  const received = await page.evaluate(() => window.received);
  assert.deepEqual(received.find((r) => r.kind === 'state')?.data, { home: 42, away: 40 });
  assert.deepEqual(received.find((r) => r.kind === 'event')?.data, { kind: 'advance', team: 301 });
  return received;
}

test('a page from http://127.0.0.1 connects with WebTransport and receives a state and an event', async () => {
  const server = await startServer();
  const browser = await launch();
  const page = await browser.newPage();
  await page.goto(`http://${server.http}/`);
  await page.waitForFunction(() => window.courtside?.client, null, { timeout: HANG });
  assert.equal(await page.evaluate(() => window.courtside.client.transport), 'webtransport');
  assert.equal(await page.textContent('#transport'), 'webtransport');
  assert.equal(await subscribeInPage(page, 'test:browser'), 'webtransport');
  const received = await receiveStateAndEvent(page, server, 'test:browser');
  assert.ok(received.every((r) => r.transport === 'webtransport'));
});

/** The value of `series` (a name and its labels, as the server writes them) now; `undefined`
 *  when /metrics has no such series (absent is not 0). */
async function metric(server, series) {
  const text = await (await fetch(`http://${server.http}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${series} `));
  if (line === undefined) return undefined;
  const value = Number(line.slice(series.length + 1).split(' ')[0]);
  assert.ok(Number.isFinite(value), `${series}: not a number in ${JSON.stringify(line)}`);
  return value;
}

/** Polls `check` until it returns something other than undefined, failing with `what` after HANG. */
async function eventually(what, check) {
  const deadline = Date.now() + HANG;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (Date.now() > deadline) throw new Error(`never happened within ${HANG} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test('state datagrams name their room by alias, and Chromium acknowledges them in batches', async () => {
  const server = await startServer(['--wt-state-datagrams', 'always']);
  const browser = await launch();
  const page = await browser.newPage();
  await page.goto(`http://${server.http}/`);
  await page.waitForFunction(() => window.courtside?.client, null, { timeout: HANG });
  assert.equal(await subscribeInPage(page, 'test:alias'), 'webtransport');
  await page.waitForFunction(() => window.subscribedCount >= 1, null, { timeout: HANG });
  // The first state after subscribing goes on the stream; the rest as datagrams by alias.
  for (let n = 1; n <= 6; n++) await publish(server, 'test:alias', 'state', { n });
  await page.waitForFunction(() => window.received.some((r) => r.version === 6), null, { timeout: HANG });
  await eventually('the server received acknowledgements of state datagrams', async () => {
    const acks = await metric(server, 'courtside_repair_acks_total');
    return acks >= 1 ? acks : undefined;
  });
  const received = await page.evaluate(() => window.received.filter((r) => r.kind === 'state').map((r) => r.data.n));
  assert.deepEqual(received, [...received].sort((a, b) => a - b), 'versions only go up');
  assert.equal(received.at(-1), 6);
});

test('Chromium negotiates permessage-deflate: a large state arrives compressed and intact, its large command goes compressed', async () => {
  const server = await startServer(['--no-wt']);
  // A TCP relay between the page's WebSocket and the server that counts the bytes each way.
  const counted = { fromServer: 0, fromPage: 0 };
  const relay = net.createServer((page) => {
    const upstream = net.connect(Number(server.http.split(':').pop()), '127.0.0.1');
    page.on('data', (chunk) => { counted.fromPage += chunk.length; });
    upstream.on('data', (chunk) => { counted.fromServer += chunk.length; });
    page.pipe(upstream);
    upstream.pipe(page);
    page.on('error', () => upstream.destroy());
    upstream.on('error', () => page.destroy());
  });
  await new Promise((resolve) => relay.listen(0, '127.0.0.1', resolve));
  try {
    const browser = await launch();
    const page = await browser.newPage();
    await page.goto(`http://${server.http}/`);
    const extensions = await page.evaluate(async (port) => {
      const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`);
      window.deflateMessages = [];
      ws.onmessage = (m) => window.deflateMessages.push(m.data);
      await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = reject; });
      ws.send(JSON.stringify({ type: 'subscribe', room: 'bracket:deflate' }));
      window.deflateWs = ws;
      return ws.extensions;
    }, relay.address().port);
    assert.equal(extensions, 'permessage-deflate; server_no_context_takeover; client_no_context_takeover');
    await page.waitForFunction(() => window.deflateMessages.some((m) => JSON.parse(m).type === 'subscribed'), null, { timeout: HANG });

    const matches = Array.from({ length: 64 }, (_, m) => ({
      id: m, round: 1 + Math.floor(m / 32), status: m < 5 ? 4 : 2,
      opponent1: { id: 2 * m, score: m % 7, result: 'win' }, opponent2: { id: 2 * m + 1, score: m % 5, result: 'loss' },
    }));
    const bracket = { stage: 'Phoenix U12 Gold', matches };
    const before = counted.fromServer;
    await publish(server, 'bracket:deflate', 'state', bracket);
    await page.waitForFunction(() => window.deflateMessages.some((m) => JSON.parse(m).type === 'state'), null, { timeout: HANG });
    const text = (await page.evaluate(() => window.deflateMessages)).find((m) => JSON.parse(m).type === 'state');
    assert.deepEqual(JSON.parse(text).data, bracket);
    const wire = counted.fromServer - before;
    assert.ok(wire * 3 < text.length, `the ${text.length}-byte state took ${wire} bytes on the wire`);

    // The page's own large command: Chromium compresses it, the server inflates it.
    const sentBefore = counted.fromPage;
    await page.evaluate(() => window.deflateWs.send(JSON.stringify({ type: 'ping', pad: 'a'.repeat(20000) })));
    await page.waitForFunction(() => window.deflateMessages.some((m) => JSON.parse(m).type === 'pong'), null, { timeout: HANG });
    const sent = counted.fromPage - sentBefore;
    assert.ok(sent < 2000, `a 20 KB command took ${sent} bytes on the wire`);
  } finally {
    relay.close();
  }
});

test('a silent WebTransport page is closed with 4002, and reads the code from the session close', async () => {
  const server = await startServer(['--idle-timeout', '3s', '--ping-interval', '1s']);
  const browser = await launch();
  const page = await browser.newPage();
  await page.goto(`http://${server.http}/`);
  await page.waitForFunction(() => window.courtside?.client, null, { timeout: HANG });
  // This client pings every 25 s, so it is silent for the server's 3 s idle timeout.
  assert.equal(await subscribeInPage(page, 'test:close', { reconnectInitialMs: 60000 }), 'webtransport');
  const code = await page.evaluate(async () => {
    const { certHash, webtransportPort } = window.courtside;
    const bytes = new Uint8Array(certHash.match(/../g).map((h) => parseInt(h, 16)));
    const wt = new WebTransport(`https://127.0.0.1:${webtransportPort}/wt`, { serverCertificateHashes: [{ algorithm: 'sha-256', value: bytes }] });
    await wt.ready;
    const stream = await wt.createBidirectionalStream();
    const writer = stream.writable.getWriter();
    await writer.write(new Uint8Array([1, 3])); // a ping, framed: the first message
    // Chromium reads a close code only from the session's CLOSE_WEBTRANSPORT_SESSION capsule.
    const info = await wt.closed;
    return info;
  });
  assert.deepEqual(code, { closeCode: 4002, reason: 'idle timeout' });
  await page.waitForFunction(() => window.disconnects.length >= 1, null, { timeout: HANG });
  const [first] = await page.evaluate(() => window.disconnects);
  assert.equal(first.transport, 'webtransport', JSON.stringify(first));
  assert.equal(first.code, 4002, JSON.stringify(first));
});

test('an insecure origin has no WebTransport: the same page falls back to WebSocket', async () => {
  const server = await startServer();
  const port = server.http.split(':')[1];
  const browser = await launch(['--host-resolver-rules=MAP insecure.test 127.0.0.1']);
  const page = await browser.newPage();
  await page.goto(`http://insecure.test:${port}/`);
  await page.waitForFunction(() => window.courtside?.client, null, { timeout: HANG });
  assert.equal(await page.evaluate(() => typeof WebTransport), 'undefined');
  assert.equal(await page.evaluate(() => window.courtside.client.transport), 'websocket');
  assert.equal(await subscribeInPage(page, 'test:fallback'), 'websocket');
  await receiveStateAndEvent(page, server, 'test:fallback');
});

test('a silent WebTransport port costs the deadline, not the idle timeout, then WebSocket works', async () => {
  const server = await startServer(['--no-wt']);
  const silent = dgram.createSocket('udp4');
  await new Promise((resolve) => silent.bind(0, '127.0.0.1', resolve));
  after(() => silent.close());
  const browser = await launch();
  const page = await browser.newPage();
  await page.goto(`http://${server.http}/`);
  await page.waitForFunction(() => window.courtside?.client, null, { timeout: HANG });
  const transport = await subscribeInPage(page, 'test:silent', {
    webtransportUrl: `https://127.0.0.1:${silent.address().port}/wt`,
    webtransportTimeoutMs: 500,
  });
  assert.equal(transport, 'websocket');
  await receiveStateAndEvent(page, server, 'test:silent');
});

test('the client reconnects by itself, resubscribes, and accepts the restarted room (new epoch)', async () => {
  const first = await startServer(['--drain-timeout', '2s']);
  const browser = await launch();
  const page = await browser.newPage();
  await page.goto(`http://${first.http}/`);
  await page.waitForFunction(() => window.courtside?.client, null, { timeout: HANG });
  await subscribeInPage(page, 'test:restart', { transports: ['websocket'] });
  await page.waitForFunction(() => window.subscribedCount >= 1, null, { timeout: HANG });
  for (let i = 1; i <= 3; i++) await publish(first, 'test:restart', 'state', { n: i });
  await page.waitForFunction(() => window.received.some((r) => r.version === 3), null, { timeout: HANG });

  await stopServer(first);
  const second = await startServer(['--http', first.http, '--drain-timeout', '2s']);
  await page.waitForFunction(() => window.subscribedCount >= 2, null, { timeout: HANG });
  // Version 1 of the new epoch is newer data, not a stale duplicate of version 1.
  await publish(second, 'test:restart', 'state', { n: 'after restart' });
  await page.waitForFunction(() => window.received.some((r) => r.data?.n === 'after restart'), null, { timeout: HANG });
});

/** A redis-server on a free loopback port; `restart()` brings it back empty on the same port. */
async function startRedis() {
  const port = await new Promise((resolve) => {
    const probe = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
  const redis = { port, url: `redis://127.0.0.1:${port}` };
  const spawnIt = async () => {
    redis.child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
    servers.push({ child: redis.child });
    for (let i = 0; ; i++) {
      const up = await new Promise((resolve) => {
        const socket = net.connect(port, '127.0.0.1', () => { socket.end(); resolve(true); });
        socket.on('error', () => resolve(false));
      });
      if (up) return;
      if (i > 1000) throw new Error('redis-server did not start');
      await new Promise((r) => setTimeout(r, 10));
    }
  };
  redis.kill = () => new Promise((resolve) => { redis.child.once('exit', resolve); redis.child.kill('SIGKILL'); });
  redis.restart = spawnIt;
  await spawnIt();
  return redis;
}

async function publishAccepted(server, room, data) {
  const res = await fetch(`http://${server.http}/v1/rooms/${room}/events`, {
    method: 'POST',
    headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
    body: JSON.stringify(data),
  });
  const body = await res.json();
  assert.ok(res.status === 200 || res.status === 202, JSON.stringify(body));
  assert.match(body.id, /^[0-9a-f]{16}$/);
}

async function healthyOnRedis(server) {
  await eventually(`${server.http} is on Redis with an empty outbox`, async () => {
    const health = await (await fetch(`http://${server.http}/health`)).json();
    return health.registry?.status === 'ok' && health.registry?.outbox === 0 ? true : undefined;
  });
}

test('across a node kill and a Redis restart, the page gets every event once', async () => {
  const redis = await startRedis();
  const nodeArgs = (id) => ['--redis', redis.url, '--node-id', id, '--node-heartbeat', '200ms', '--no-wt'];
  const a = await startServer(nodeArgs('a'));
  const b = await startServer(nodeArgs('b'));
  const browser = await launch();
  const page = await browser.newPage();
  await page.goto(`http://${a.http}/`);
  await page.waitForFunction(() => window.courtside?.client, null, { timeout: HANG });
  await subscribeInPage(page, 'bracket:9', { transports: ['websocket'] });
  await page.waitForFunction(() => window.subscribedCount >= 1, null, { timeout: HANG });
  let n = 0;
  const publishSome = async (server, count) => { for (let i = 0; i < count; i++) await publishAccepted(server, 'bracket:9', { n: ++n }); };
  await publishSome(b, 10);

  // The page's node dies; a replacement comes up behind the same address (the load balancer).
  // SIGKILL, and wait until it is gone: its port is free only then.
  await new Promise((resolve) => { a.child.once('exit', resolve); a.child.kill('SIGKILL'); });
  await publishSome(b, 10);
  const a2 = await startServer(['--http', a.http, ...nodeArgs('a2')]);
  await page.waitForFunction(() => window.subscribedCount >= 2, null, { timeout: HANG });
  await publishSome(b, 5);

  // Redis dies; both nodes accept publishes alone; it comes back empty. First the page has
  // what was published so far: an event b (which does not hold the room) had Redis number and
  // that is still on its way to a2 through pub/sub when Redis dies is lost with the empty
  // restart, since no node holds it: a known gap this test leaves out (closing it needs the
  // publishing node to keep its recent publishes of rooms it does not hold).
  await page.waitForFunction((total) => new Set(window.received.map((r) => r.data.n)).size >= total, n, { timeout: HANG });
  await redis.kill();
  await publishSome(b, 10);
  await publishSome(a2, 5);
  await redis.restart();
  await healthyOnRedis(a2);
  await healthyOnRedis(b);
  await publishSome(a2, 5);

  await page.waitForFunction((total) => new Set(window.received.map((r) => r.data.n)).size >= total, n, { timeout: HANG })
    .catch(async (e) => {
      const seen = await page.evaluate(() => window.received.map((r) => `${r.data.n}@${r.seq}`));
      const logs = [a2, b].map((s) => s.logs.filter((l) => !l.includes('"DEBUG"')).slice(-15).join('\n'));
      throw new Error(`${e.message}; received ${seen.join(' ')}; logs:\n${logs.join('\n---\n')}`);
    });
  const taken = await page.evaluate(() => window.received.filter((r) => r.kind === 'event').map((r) => r.data.n));
  assert.equal(taken.length, n, `every event once, none twice: ${taken}`);
  assert.deepEqual([...taken].sort((x, y) => x - y), Array.from({ length: n }, (_, i) => i + 1));
});

/** An HS256 JWT, as the platform's backend would sign it. */
function jwt(secret, claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const body = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

test('a page with a token reads its own user room and is refused another', async () => {
  const secret = 'browser-jwt-secret';
  const server = await startServer(['--jwt-secret', secret]);
  const browser = await launch();
  const page = await browser.newPage();
  await page.goto(`http://${server.http}/`);
  await page.waitForFunction(() => window.courtside?.client, null, { timeout: HANG });
  const token = jwt(secret, { sub: '55', exp: Math.floor(Date.now() / 1000) + 600 });
  const transport = await page.evaluate(async (token) => {
    const { connect, certHash, webtransportPort } = window.courtside;
    window.mine = [];
    window.refusals = [];
    window.authed = null;
    const client = await connect(location.origin, {
      certHash, webtransportPort, getToken: async () => token, onAuthed: (m) => { window.authed = m; },
    });
    client.subscribe('user:55', {
      onSubscribed: () => { window.subscribedMine = true; },
      onEvent: (data) => window.mine.push(data),
    });
    client.subscribe('user:56', { onError: (e) => window.refusals.push(e), onEvent: () => window.mine.push('leak') });
    return client.transport;
  }, token);
  assert.equal(transport, 'webtransport');
  await page.waitForFunction(() => window.subscribedMine && window.refusals.length === 1, null, { timeout: HANG });
  // Another user's event first: had it leaked, it would arrive before this page's own.
  await publish(server, 'user:56', 'event', { note: 'not yours' });
  await publish(server, 'user:55', 'event', { note: 'game moved to 3pm' });
  await page.waitForFunction(() => window.mine.length >= 1, null, { timeout: HANG });
  const seen = await page.evaluate(() => ({ mine: window.mine, refusals: window.refusals, authed: window.authed }));
  assert.equal(seen.authed.sub, '55');
  assert.equal(seen.refusals[0].code, 109);
  assert.equal(seen.refusals[0].name, 'forbidden');
  assert.deepEqual(seen.mine, [{ note: 'game moved to 3pm' }]);
});

test('the demo page shows live games of a simulated Saturday', async () => {
  const server = await startServer(['--demo', '--demo-speed', '20']);
  const browser = await launch();
  const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  await page.goto(`http://${server.http}/?league=3`);
  await page.waitForSelector('.game', { timeout: HANG });
  await page.waitForFunction(() => Number(document.getElementById('updates').textContent) >= 2, null, { timeout: HANG });
  assert.equal(await page.textContent('#transport'), 'webtransport');
  const cards = await page.$$('.game');
  assert.ok(cards.length >= 3, `${cards.length} games shown`);
  if (process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT });
});

test('the demo page shows its league\'s bracket live, results, named leagues and a followed team first', async () => {
  // Two hundred times real time: a bracket game (32 minutes of play) ends within seconds.
  const server = await startServer(['--demo', '--demo-speed', '200']);
  const browser = await launch();
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  await page.goto(`http://${server.http}/?league=3`);
  await page.waitForFunction(() => document.querySelectorAll('#bracket .match').length === 15, null, { timeout: HANG });
  assert.match(await page.textContent('#bracket-title'), /Mesa 10U Boys playoffs #1/);
  const initiallyCompleted = await page.$$eval('#bracket .match.completed', (m) => m.length);
  // A result arrives as a new bracket state; the page re-renders it: one more match is
  // completed, its winner shows in the next round, and the notification names the round.
  await page.waitForFunction((before) => document.querySelectorAll('#bracket .match.completed').length > before,
    initiallyCompleted, { timeout: HANG });
  const winners = await page.$$eval('#bracket .match.completed .side.win span:first-child', (s) => s.map((e) => e.textContent.replace(/^\d+\. /, '')));
  const laterRounds = await page.$$eval('#bracket .round:not(:first-child) .side.known span:first-child', (s) => s.map((e) => e.textContent));
  assert.ok(winners.some((w) => laterRounds.includes(w)), `a winner (${winners}) in a later round (${laterRounds})`);
  await page.waitForFunction(() => [...document.querySelectorAll('#events li')].some((li) => / beat .* (on to the | win the .* playoffs)/.test(li.textContent)), null, { timeout: HANG });
  // A Saturday a fan recognises: leagues by name, finished games listed, notifications with
  // their time, and a team to follow (its game first, starred).
  await page.waitForFunction(() => document.querySelector('#league option[value="3"]').textContent === 'Mesa 10U Boys', null, { timeout: HANG });
  await page.waitForSelector('#results li', { timeout: HANG });
  assert.match(await page.textContent('#events li time'), /\d\d:\d\d:\d\d/);
  const lastCard = page.locator('#games .game').last();
  const team = await lastCard.locator('.team .name').first().textContent();
  await lastCard.locator('.team .name').first().click();
  await page.waitForFunction((name) => document.getElementById('following').textContent.includes(name), team, { timeout: HANG });
  assert.equal(await page.locator('#games .game').first().locator('.team.followed .name').textContent(), team);
  if (process.env.BRACKET_SCREENSHOT) await page.screenshot({ path: process.env.BRACKET_SCREENSHOT });
});

test('the operations page shows the node as /metrics does, and nothing without credentials', async () => {
  const server = await startServer(['--demo', '--demo-speed', '20']);
  const browser = await launch();
  // Without credentials: 401 with the challenge that makes a browser ask, and no page (a
  // headless browser with nothing to answer it with fails the navigation instead).
  const refused = await fetch(`http://${server.http}/ops`);
  assert.equal(refused.status, 401);
  assert.match(refused.headers.get('www-authenticate') ?? '', /^Basic realm=/);
  assert.ok(!(await refused.text()).includes('Courtside operations'));
  const anonymous = await (await browser.newContext()).newPage();
  await assert.rejects(anonymous.goto(`http://${server.http}/ops`), /ERR_INVALID_AUTH_CREDENTIALS/);
  // A fan on the demo page beside it, and the operator answering the login prompt with the token.
  const fan = await browser.newPage();
  await fan.goto(`http://${server.http}/?league=3`);
  await fan.waitForFunction(() => window.courtside?.client, null, { timeout: HANG });
  const operator = await browser.newContext({
    httpCredentials: { username: 'ops', password: TOKEN },
    viewport: { width: 1280, height: 1100 },
  });
  const page = await operator.newPage();
  const response = await page.goto(`http://${server.http}/ops`);
  assert.equal(response.status(), 200);
  const shown = (id) => page.textContent(`#${id}`).then((t) => Number(t.replace(/,/g, '')));
  // The page's figures and the exposition's agree (read until both hold still the same value;
  // not the room count, which the demo moves every second as games end and new ones begin).
  await eventually('the page shows the connections and subscriptions /metrics counts', async () => {
    const onPage = [await shown('connections-websocket'), await shown('connections-webtransport'), await shown('subscriptions')];
    const exposed = [
      await metric(server, 'courtside_connections{transport="websocket"}'),
      await metric(server, 'courtside_connections{transport="webtransport"}'),
      await metric(server, 'courtside_subscriptions'),
    ];
    // The fan's one connection (WebTransport, or WebSocket if it fell back on a loaded machine).
    return onPage[0] + onPage[1] === 1 && JSON.stringify(onPage) === JSON.stringify(exposed) ? true : undefined;
  });
  await page.waitForFunction(() => Number(document.getElementById('publishes-per-s').textContent) > 0, null, { timeout: HANG });
  await page.waitForSelector('#busiest tbody tr', { timeout: HANG });
  await page.waitForSelector('#nodes tbody tr[data-id="local"]', { timeout: HANG });
  assert.equal(await page.textContent('#registry-status'), 'ok');
  assert.equal(await page.textContent('#error'), '');
  if (process.env.OPS_SCREENSHOT) await page.screenshot({ path: process.env.OPS_SCREENSHOT, fullPage: true });
});

/** The platform's own page, on its own origin: it imports the client from the edge and fetches
 *  the certificate hash there, as fallback/README.md shows ("A page on another origin"). */
const PLATFORM_PAGE = `<!doctype html>
<meta charset="utf-8">
<title>platform page</title>
<script type="module">
  const edge = new URLSearchParams(location.search).get('edge');
  window.outcome = (async () => {
    const { connect } = await import(\`\${edge}/courtside.js\`);
    const hash = await (await fetch(\`\${edge}/v1/cert-hash\`)).json();
    const client = await connect(edge, { certHash: hash.sha256, webtransportPort: hash.port });
    window.received = [];
    window.subscribed = false;
    client.subscribe('game:cross', {
      onSubscribed: () => { window.subscribed = true; },
      onState: (data, meta) => window.received.push({ data, transport: meta.transport }),
    });
    return { transport: client.transport };
  })().catch((e) => ({ error: String(e) }));
</script>`;

/** A static server on a loopback port of its own, serving PLATFORM_PAGE for any path. */
async function startPlatformSite() {
  const http = await import('node:http');
  const site = http.createServer((req, res) => {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(PLATFORM_PAGE);
  });
  await new Promise((resolve) => site.listen(0, '127.0.0.1', resolve));
  after(() => site.close());
  return site.address().port;
}

test('a page on another origin imports the client from the edge and reaches WebTransport; an origin outside --allowed-origins cannot', async () => {
  const port = await startPlatformSite();
  // Two origins on loopback: the page at http://localhost:PORT, the edge at http://127.0.0.1:EDGE.
  const server = await startServer(['--allowed-origins', `http://localhost:${port}`]);
  const edge = `http://${server.http}`;
  const browser = await launch(['--host-resolver-rules=MAP localhost 127.0.0.1']);
  const page = await browser.newPage();
  await page.goto(`http://localhost:${port}/?edge=${encodeURIComponent(edge)}`);
  const outcome = await page.evaluate(() => window.outcome);
  assert.deepEqual(outcome, { transport: 'webtransport' });
  await page.waitForFunction(() => window.subscribed, null, { timeout: HANG });
  await publish(server, 'game:cross', 'state', { home: 7, away: 3 });
  await page.waitForFunction(() => window.received.length >= 1, null, { timeout: HANG });
  assert.deepEqual(await page.evaluate(() => window.received), [{ data: { home: 7, away: 3 }, transport: 'webtransport' }]);

  // The same page from http://127.0.0.1:PORT, an origin the edge does not list: the browser
  // withholds the module (no Access-Control-Allow-Origin), so the import itself fails.
  const refused = await browser.newPage();
  await refused.goto(`http://127.0.0.1:${port}/?edge=${encodeURIComponent(edge)}`);
  const refusedOutcome = await refused.evaluate(() => window.outcome);
  assert.match(refusedOutcome.error ?? '', /TypeError/, JSON.stringify(refusedOutcome));
});

/** A bracket-sized state (over the 1,024-byte delta threshold) whose match `step % 40` changed. */
function bracketState(step) {
  const match = Array.from({ length: 40 }, (_, id) => ({
    id, round_id: id >> 3, status: id === step % 40 ? 4 : 2,
    opponent1: { id: id * 2, score: id === step % 40 ? 60 + step : null },
    opponent2: { id: id * 2 + 1, score: id === step % 40 ? 50 + step : null },
  }));
  return { stage: [{ id: 0, name: 'Saturday Playoffs', type: 'single_elimination' }], match };
}

/** The room's state `data` as the server holds it, byte for byte (written before `last_seq`). */
async function stateText(server, room) {
  const body = await (await fetch(`http://${server.http}/v1/rooms/${room}`)).text();
  return body.slice(body.indexOf('"data":') + 7, body.indexOf('},"last_seq"'));
}

for (const [transport, serverArgs, clientOptions] of [
  ['webtransport', ['--wt-state-datagrams', 'always'], {}],
  ['websocket', [], { transports: ['websocket'] }],
]) {
  test(`a delta subscriber in Chromium over ${transport} gets every state whole and ends on the room's state byte for byte`, async () => {
    const server = await startServer(serverArgs);
    const room = `bracket:${transport}`;
    await publish(server, room, 'state', bracketState(0));
    const browser = await launch();
    const page = await browser.newPage();
    await page.goto(`http://${server.http}/`);
    await page.waitForFunction(() => window.courtside?.client, null, { timeout: HANG });
    const used = await page.evaluate(async ({ room, options }) => {
      const { connect, certHash, webtransportPort } = window.courtside;
      window.states = [];
      window.deltas = 0;
      const client = await connect(location.origin, { certHash, webtransportPort, ...options });
      const dispatch = client.dispatch.bind(client);
      client.dispatch = (m, viaDatagram) => { if (m.type === 'delta') window.deltas += 1; dispatch(m, viaDatagram); };
      client.subscribe(room, { delta: true, onState: (data, meta) => window.states.push({ version: meta.version, data }) });
      window.deltaClient = client;
      return client.transport;
    }, { room, options: clientOptions });
    assert.equal(used, transport);
    for (let step = 1; step <= 15; step++) {
      await page.waitForFunction((v) => window.states.at(-1)?.version >= v, step, { timeout: HANG });
      await publish(server, room, 'state', bracketState(step));
    }
    await page.waitForFunction(() => window.states.at(-1)?.version >= 16, null, { timeout: HANG });
    const { last, text, deltas } = await page.evaluate((room) => ({
      last: window.states.at(-1), text: window.deltaClient.rooms.get(room).text, deltas: window.deltas,
    }), room);
    assert.deepEqual(last.data, bracketState(15));
    assert.equal(text, await stateText(server, room));
    assert.ok(deltas > 0, `deltas: ${deltas}`);
    await page.evaluate(() => window.deltaClient.close());
  });
}

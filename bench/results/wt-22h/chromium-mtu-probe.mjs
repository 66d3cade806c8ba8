// Scratch (not committed): does Chromium probe for a larger MTU? A UDP relay records the sizes
// of the datagrams Chromium sends to the server.
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import dgram from 'node:dgram';
import { chromium } from 'playwright-core';

const BIN = process.env.COURTSIDE_BIN;
const child = spawn(BIN, ['serve', '--publish-token', 't', '--log-format', 'json', '--http', '127.0.0.1:0', '--wt', '127.0.0.1:0'], { stdio: ['ignore', 'ignore', 'pipe'] });
const srv = await new Promise((resolve) => {
  const s = {};
  createInterface({ input: child.stderr }).on('line', (line) => {
    try { const r = JSON.parse(line); if (r.http) s.http = r.http; if (r.wt) s.wt = r.wt; } catch {}
    if (s.http && s.wt) resolve(s);
  });
});
const [host, port] = srv.wt.split(':');
const relay = dgram.createSocket('udp4');
const upstream = dgram.createSocket('udp4');
let client = null;
const sizes = [];
relay.on('message', (msg, rinfo) => { client = rinfo; sizes.push(msg.length); upstream.send(msg, Number(port), host); });
upstream.on('message', (msg) => { if (client) relay.send(msg, client.port, client.address); });
await new Promise((r) => relay.bind(0, '127.0.0.1', r));
await new Promise((r) => upstream.bind(0, '127.0.0.1', r));
const relayPort = relay.address().port;
const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args: ['--no-sandbox', '--disable-gpu'] });
const page = await browser.newPage();
await page.goto(`http://${srv.http}/`);
await page.waitForFunction(() => window.courtside?.certHash, null, { timeout: 30000 });
const result = await page.evaluate(async (relayPort) => {
  const { certHash } = window.courtside;
  const bytes = new Uint8Array(certHash.match(/../g).map((h) => parseInt(h, 16)));
  const wt = new WebTransport(`https://127.0.0.1:${relayPort}/wt`, { serverCertificateHashes: [{ algorithm: 'sha-256', value: bytes }] });
  await wt.ready;
  const stream = await wt.createBidirectionalStream();
  const writer = stream.writable.getWriter();
  for (let i = 0; i < 40; i++) { await writer.write(new Uint8Array([1, 3])); await new Promise((r) => setTimeout(r, 250)); }
  return { maxDatagramSize: wt.datagrams.maxDatagramSize };
}, relayPort);
console.log(JSON.stringify({ bin: BIN, result, datagrams: sizes.length, largest: Math.max(...sizes), over1200: sizes.filter((s) => s > 1200).length, sizes: sizes.filter((s) => s >= 1200) }));
await browser.close();
child.kill('SIGKILL');
relay.close(); upstream.close();

// Delta states in the JavaScript client (docs/PROTOCOL.md, "Delta states"): the fossil codec
// against the shared vectors and npm `fossil-delta` (installed into tests/browser/ by
// tests/run.sh), and the client applying deltas over a WebSocket, asking for the whole state
// when one cannot be applied. Run: node --test fallback/test/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { applyDelta, applyTextDelta, connect } from '../courtside.js';
import { applyDelta as npmApplyDelta } from '../../tests/browser/node_modules/fossil-delta/fossil-delta.js';

const vectors = JSON.parse(readFileSync(fileURLToPath(new URL('../../docs/test-vectors.json', import.meta.url)), 'utf8'));
const utf8 = (s) => new TextEncoder().encode(s);
const text = (b) => new TextDecoder().decode(b);

// The server's deltas are fossil deltas from a search that looks further for long matches than
// fossil's delta_create (npm createDelta), so their bytes may differ: what both must do is apply.
test('fossil vectors: courtside.js and npm fossil-delta both apply them', () => {
  assert.ok(vectors.fossil.length >= 3);
  for (const v of vectors.fossil) {
    assert.equal(text(applyDelta(utf8(v.base), utf8(v.delta))), v.target, v.name);
    assert.equal(text(npmApplyDelta(utf8(v.base), utf8(v.delta))), v.target, v.name);
    assert.equal(applyTextDelta(v.base, v.delta), v.target, v.name);
  }
});

test('bad fossil deltas throw, never apply', () => {
  for (const v of vectors.fossil_bad) {
    assert.throws(() => applyDelta(utf8(v.base), utf8(v.delta)), RangeError, v.name);
  }
  const good = vectors.fossil[0];
  for (let cut = 0; cut < good.delta.length; cut++) {
    assert.throws(() => applyTextDelta(good.base, good.delta.slice(0, cut)), RangeError, `cut at ${cut}`);
  }
  for (const bad of ['', '\n', '5', '5\n5@0', '5\n9@0,', '5\n5:ab', '5\n5?', '2\n1:a0;', '~~~~~~~~~~\n0;']) {
    assert.throws(() => applyTextDelta('0123456789abcdefghijklmnopqrstuvwxyz', bad), RangeError, JSON.stringify(bad));
  }
});

class FakeWebSocket {
  static opened = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    FakeWebSocket.opened.push(this);
    queueMicrotask(() => this.onopen?.());
  }
  send(t) { this.sent.push(JSON.parse(t)); }
  close() { this.closed = true; }
}

const stateFrame = (room, version, data) => `{"type":"state","room":"${room}","version":${version},"ts":1,"data":${data}}`;
const deltaFrame = (room, version, base, delta) =>
  JSON.stringify({ type: 'delta', room, version, base, ts: 2, delta });

test('a delta subscriber gets every state whole, and asks for the whole state when a delta does not apply', async () => {
  const saved = globalThis.WebSocket;
  globalThis.WebSocket = FakeWebSocket;
  FakeWebSocket.opened = [];
  const [v] = vectors.fossil;
  const room = 'bracket:77';
  const states = [];
  const logs = [];
  try {
    const client = await connect('http://edge.test', { transports: ['websocket'], log: (l) => logs.push(l) });
    client.subscribe(room, { delta: true, onState: (data, meta) => states.push([meta.version, data]) });
    const [socket] = FakeWebSocket.opened;
    assert.deepEqual(socket.sent, [{ type: 'subscribe', room, id: 1, delta: 'fossil' }]);
    const deliver = (frame) => socket.onmessage({ data: frame });
    deliver('{"type":"subscribed","room":"bracket:77","epoch":"e1","version":7,"seq":4,"id":1}');
    deliver(stateFrame(room, 7, v.base));
    deliver(deltaFrame(room, 8, 7, v.delta));
    assert.deepEqual(states.map(([version]) => version), [7, 8]);
    assert.deepEqual(states[1][1], JSON.parse(v.target));
    assert.equal(client.rooms.get(room).text, v.target, 'the held text is the target, byte for byte');
    // An old or repeated delta is dropped quietly.
    deliver(deltaFrame(room, 8, 7, v.delta));
    assert.equal(socket.sent.length, 1);
    // A delta against a version this client does not hold: nothing reaches the page, and the
    // client subscribes again with its since and epoch (no event missed), once.
    deliver(deltaFrame(room, 10, 9, v.delta));
    deliver(deltaFrame(room, 11, 10, v.delta));
    assert.equal(states.length, 2);
    assert.deepEqual(socket.sent.slice(1), [{ type: 'subscribe', room, id: 2, delta: 'fossil', since: 4, epoch: 'e1' }]);
    assert.ok(logs.some((l) => l.includes('asking for the whole state')), logs.join('; '));
    // The answer: subscribed, then the state whole; deltas apply again after it.
    deliver('{"type":"subscribed","room":"bracket:77","epoch":"e1","version":11,"seq":4,"recovered":true,"id":2}');
    deliver(stateFrame(room, 11, v.base));
    deliver(deltaFrame(room, 12, 11, v.delta));
    assert.deepEqual(states.map(([version]) => version), [7, 8, 11, 12]);
    assert.deepEqual(states[3][1], JSON.parse(v.target));
    // A delta at the right version that fails its checksum (a wrong base): asks again.
    const [, , wrong] = vectors.fossil;
    deliver(deltaFrame(room, 13, 12, wrong.delta));
    assert.equal(states.length, 4);
    assert.equal(socket.sent.at(-1).id, 3);
    assert.ok(logs.some((l) => l.includes("checksum does not match")), logs.join('; '));
    client.close();
  } finally {
    globalThis.WebSocket = saved;
  }
});

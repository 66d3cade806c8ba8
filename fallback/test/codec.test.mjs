// The JavaScript client's codec against the shared test vectors (docs/test-vectors.json),
// the same file the Rust codec is tested against. Run: node --test fallback/test/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import {
  encodeClientMessage, decodeServerMessage, encodeFrame, FrameDecoder, connect,
} from '../courtside.js';

const vectors = JSON.parse(readFileSync(fileURLToPath(new URL('../../docs/test-vectors.json', import.meta.url)), 'utf8'));
const hex = (bytes) => Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
const unhex = (s) => Uint8Array.from(s.match(/../g) ?? [], (h) => parseInt(h, 16));

test('client messages encode to the vectors', () => {
  const client = vectors.webtransport.messages.filter((v) => v.from === 'client');
  assert.ok(client.length >= 5);
  for (const v of client) assert.equal(hex(encodeClientMessage(v.message)), v.hex, v.name);
});

test('server messages decode from the vectors', () => {
  const server = vectors.webtransport.messages.filter((v) => v.from === 'server');
  assert.ok(server.length >= 10);
  for (const v of server) assert.deepEqual(decodeServerMessage(unhex(v.hex)), v.message, v.name);
});

test('server messages with an optional trailing field written as absent decode as left off', () => {
  const server = vectors.webtransport.accepted.filter((v) => v.from === 'server');
  assert.ok(server.length >= 1);
  for (const v of server) assert.deepEqual(decodeServerMessage(unhex(v.hex)), v.message, v.name);
});

test('stream framing matches the vectors, fed in any chunks', () => {
  for (const v of vectors.webtransport.framing) {
    const messages = v.messages_hex.map(unhex);
    const stream = messages.map(encodeFrame).reduce((a, b) => new Uint8Array([...a, ...b]), new Uint8Array());
    assert.equal(hex(stream), v.stream_hex, v.name);
    for (const chunk of [1, 2, 7, stream.length]) {
      const decoder = new FrameDecoder();
      const out = [];
      for (let i = 0; i < stream.length; i += chunk) out.push(...decoder.push(stream.subarray(i, i + chunk)));
      assert.deepEqual(out.map(hex), v.messages_hex, `${v.name}, chunks of ${chunk}`);
    }
  }
});

test('malformed server messages throw instead of returning garbage', () => {
  assert.throws(() => decodeServerMessage(unhex('7f')));
  assert.throws(() => decodeServerMessage(unhex('20')));
  assert.throws(() => decodeServerMessage(unhex('1200')));
  assert.throws(() => decodeServerMessage(unhex('1101ff')));
  assert.throws(() => new FrameDecoder(10).push(unhex('ff01')));
});

test('large numbers survive the varint', () => {
  const m = { type: 'subscribe', room: 'a', since: 2 ** 53 - 1 };
  const bytes = encodeClientMessage(m);
  assert.equal(bytes[0], 0x01);
  assert.throws(() => encodeClientMessage({ type: 'subscribe', room: 'a', since: -1 }));
});

/** A stand-in for the browser's WebSocket: opens at once, records what is sent, and lets the
 *  test deliver text frames through `onmessage` as a real socket would. */
class FakeWebSocket {
  static opened = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    FakeWebSocket.opened.push(this);
    queueMicrotask(() => this.onopen?.());
  }
  send(text) { this.sent.push(JSON.parse(text)); }
  close() { this.closed = true; }
}

test('every WebSocket vector, received on a WebSocket, reaches the application whole', async () => {
  const saved = globalThis.WebSocket;
  globalThis.WebSocket = FakeWebSocket;
  const types = new Set();
  try {
    for (const v of vectors.websocket) {
      const expected = JSON.parse(v.text);
      types.add(expected.type);
      const seen = [];
      const logs = [];
      FakeWebSocket.opened = [];
      const client = await connect('http://edge.test', {
        transports: ['websocket'],
        reconnectInitialMs: 0,
        onAuthed: (m) => seen.push(m),
        onError: (m) => seen.push(m),
        log: (line) => logs.push(line),
      });
      if (expected.room !== undefined) {
        client.subscribe(expected.room, {
          onSubscribed: (m) => seen.push(m),
          onState: (data, meta) => seen.push({ type: 'state', room: meta.room, version: meta.version, ts: meta.ts, data }),
          onEvent: (data, meta) => seen.push({ type: 'event', room: meta.room, seq: meta.seq, id: meta.id, ts: meta.ts, data }),
          onError: (m) => seen.push(m),
        });
      }
      const [socket] = FakeWebSocket.opened;
      socket.onmessage({ data: v.text });
      switch (expected.type) {
        case 'state':
        case 'event':
        case 'error':
        case 'authed':
          assert.deepEqual(seen, [expected], v.name);
          break;
        case 'subscribed': {
          assert.deepEqual(seen, [expected], v.name);
          // Without an id of ours it is a notice: the room goes on from its numbers.
          const room = client.rooms.get(expected.room);
          assert.deepEqual({ epoch: room.epoch, version: room.version, seq: room.seq },
            { epoch: expected.epoch, version: expected.version, seq: expected.seq }, v.name);
          break;
        }
        case 'delta': {
          // No base held on this fresh subscription: nothing reaches the application, and the
          // client asks for the whole state by subscribing again (PROTOCOL.md, "Delta states").
          assert.deepEqual(seen, [], v.name);
          const resubscribes = socket.sent.filter((m) => m.type === 'subscribe' && m.room === expected.room);
          assert.equal(resubscribes.length, 2, v.name);
          break;
        }
        case 'reconnect':
          assert.deepEqual(seen, [], v.name);
          assert.ok(logs.some((l) => l.includes(`(${expected.reason})`)), `${v.name}: ${logs}`);
          // It drops this socket and opens another, from a timer of delay 0 (reconnectInitialMs)
          // set before this one, so run first.
          await new Promise((resolve) => setTimeout(resolve, 0));
          assert.ok(socket.closed, v.name);
          assert.equal(FakeWebSocket.opened.length, 2, v.name);
          break;
        default:
          assert.fail(`add the WebSocket vector type ${expected.type} to this test`);
      }
      if (expected.type === 'authed') assert.deepEqual(client.authed, { sub: expected.sub, exp: expected.exp });
      client.close();
    }
  } finally {
    globalThis.WebSocket = saved;
  }
  assert.deepEqual([...types].sort(), ['authed', 'delta', 'error', 'event', 'reconnect', 'state', 'subscribed']);
});

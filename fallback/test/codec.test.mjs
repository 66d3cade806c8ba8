// The JavaScript client's codec against the shared test vectors (docs/test-vectors.json),
// the same file the Rust codec is tested against. Run: node --test fallback/test/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import {
  encodeClientMessage, decodeServerMessage, encodeFrame, FrameDecoder,
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

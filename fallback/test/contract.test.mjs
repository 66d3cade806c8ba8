// The client's side of docs/PROTOCOL.md ("Event identity", "After each subscribed"), without
// sockets: messages are handed to the client as its connection would, and `fetch` answers as
// the HTTP API does. Run: node --test fallback/test/
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CourtsideClient } from '../courtside.js';

/** A client subscribed to `room`, recording what its handlers receive. */
function subscribed(room, extra) {
  const client = new CourtsideClient('http://edge.test', {});
  const sent = [];
  client.connection = { name: 'websocket', send: async (m) => { sent.push(m); } };
  const events = [];
  const failures = [];
  const handlers = {
    onEvent: (data, meta) => events.push(`${data.n}@${meta.seq}`),
    onRecoveryFailed: (m) => failures.push(m),
  };
  if (extra !== undefined) Object.assign(handlers, extra);
  client.subscribe(room, handlers);
  return { client, sent, events, failures };
}

const event = (room, seq, id, n) => ({ type: 'event', room, seq, id, ts: 1, data: JSON.stringify({ n }) });

test('an event whose id is held is dropped, whatever its seq; a notice sets the numbers', () => {
  const { client, sent, events } = subscribed('bracket:1');
  client.dispatch({ type: 'subscribed', room: 'bracket:1', epoch: 'E', version: 0, seq: 0, id: sent[0].id });
  client.dispatch(event('bracket:1', 1, 'a', 1));
  client.dispatch(event('bracket:1', 2, 'b', 2));
  // An outage's local epoch: the node numbers on from 2.
  client.dispatch({ type: 'subscribed', room: 'bracket:1', epoch: 'L', version: 0, seq: 2, recovered: true });
  client.dispatch(event('bracket:1', 3, 'c', 3));
  // Back on the shared epoch: the same event again under another number is not taken twice.
  client.dispatch({ type: 'subscribed', room: 'bracket:1', epoch: 'E', version: 0, seq: 5, recovered: true });
  client.dispatch(event('bracket:1', 6, 'c', 3));
  client.dispatch(event('bracket:1', 7, 'd', 4));
  assert.deepEqual(events, ['1@1', '2@2', '3@3', '4@7']);
});

test('recovery that failed refetches the history and hands it over before the live events', async () => {
  const calls = [];
  let answer;
  const answered = new Promise((resolve) => { answer = resolve; });
  globalThis.fetch = async (url) => {
    calls.push(url);
    await answered;
    return {
      ok: true,
      json: async () => ({
        room: 'bracket:2', epoch: 'F', last_seq: 3,
        events: [
          { seq: 1, id: 'x', ts: 1, data: { n: 10 } },
          { seq: 2, id: 'held', ts: 1, data: { n: 11 } },
          { seq: 3, id: 'y', ts: 1, data: { n: 12 } },
        ],
      }),
    };
  };
  const { client, sent, events, failures } = subscribed('bracket:2', { since: 40, epoch: 'E' });
  client.rooms.get('bracket:2').ids.add('held');
  assert.equal(sent[0].since, 40);
  // The room was re-created meanwhile: another epoch, recovery fails.
  client.dispatch({ type: 'subscribed', room: 'bracket:2', epoch: 'F', version: 0, seq: 3, recovered: false, id: sent[0].id });
  client.dispatch(event('bracket:2', 4, 'z', 13)); // live, while the refetch runs
  assert.deepEqual(events, []);
  answer();
  await new Promise((resolve) => setTimeout(resolve, 0));
  await new Promise((resolve) => setTimeout(resolve, 0));
  assert.deepEqual(calls, ['http://edge.test/v1/rooms/bracket%3A2/events?since=0'], 'another epoch: from 0');
  assert.deepEqual(events, ['10@1', '12@3', '13@4']);
  assert.equal(failures.length, 1);
});

test('a failed recovery in the same epoch refetches from the since it sent', async () => {
  const calls = [];
  globalThis.fetch = async (url) => { calls.push(url); return { ok: false, status: 410, json: async () => ({}) }; };
  const { client, sent, events } = subscribed('bracket:3', { since: 7, epoch: 'E' });
  client.dispatch({ type: 'subscribed', room: 'bracket:3', epoch: 'E', version: 0, seq: 900, recovered: false, id: sent[0].id });
  client.dispatch(event('bracket:3', 901, 'k', 1));
  await new Promise((resolve) => setTimeout(resolve, 0));
  await new Promise((resolve) => setTimeout(resolve, 0));
  assert.deepEqual(calls, ['http://edge.test/v1/rooms/bracket%3A3/events?since=7']);
  assert.deepEqual(events, ['1@901'], 'gone (410): the live stream goes on');
});

// Courtside browser client: WebTransport first, WebSocket fallback, one API for both.
// One ES module, no dependencies, no build step. Protocol: docs/PROTOCOL.md.

/** Defaults for `connect`; every one can be overridden in its options. */
export const DEFAULTS = Object.freeze({
  /** Give up on WebTransport and fall back to WebSocket after this long. */
  webtransportTimeoutMs: 1000,
  /** WebTransport port when the origin is plain http (development); https origins use their own port. */
  webtransportPort: 4433,
  /** Transports to try, in order. */
  transports: ['webtransport', 'websocket'],
  /** Reconnection backoff: first delay, cap; each delay is multiplied by a random 0.5 to 1.5. */
  reconnectInitialMs: 500,
  reconnectMaxMs: 30000,
  /** Over WebTransport, a ping this often: the server closes a session silent for 60 s (4002). */
  webtransportPingMs: 25000,
  /** Acknowledgements of state datagrams wait this long to go out together, in one datagram. */
  ackDelayMs: 5,
  /** With `getToken`, a fresh token is asked for this long before the current one expires. */
  tokenRefreshMarginMs: 30000,
  /** Event ids remembered per room, to drop an event delivered again under another number. */
  eventIdMemory: 2048,
});

/** Acknowledgements per `acks` datagram at most (each takes 2 to 12 bytes). */
const ACKS_PER_DATAGRAM = 64;

// ---------------------------------------------------------------------------------------------
// Binary protocol (WebTransport): type byte, then fields in postcard's format.

export const MessageType = Object.freeze({
  SUBSCRIBE: 0x01, UNSUBSCRIBE: 0x02, PING: 0x03, ACK: 0x04, ACKS: 0x05, AUTH: 0x06, HELLO: 0x07,
  SUBSCRIBED: 0x10, UNSUBSCRIBED: 0x11, PONG: 0x12, ERROR: 0x13, RECONNECT: 0x14, CLOSE: 0x15, ALIAS: 0x16,
  AUTHED: 0x17, WELCOME: 0x18,
  STATE: 0x20, EVENT: 0x21, STATE_BY_ALIAS: 0x22, DELTA: 0x23, DELTA_BY_ALIAS: 0x24,
});

const utf8Encoder = new TextEncoder();
const utf8Decoder = new TextDecoder('utf-8', { fatal: true });

class Writer {
  constructor() { this.bytes = []; }
  u8(b) { this.bytes.push(b & 0xff); return this; }
  varint(n) {
    if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`not an unsigned integer: ${n}`);
    do {
      let byte = n % 128;
      n = Math.floor(n / 128);
      if (n > 0) byte |= 0x80;
      this.bytes.push(byte);
    } while (n > 0);
    return this;
  }
  string(s) {
    const b = utf8Encoder.encode(s);
    this.varint(b.length);
    for (const x of b) this.bytes.push(x);
    return this;
  }
  option(value, write) {
    if (value === undefined || value === null) return this.u8(0);
    this.u8(1);
    write.call(this, value);
    return this;
  }
  finish() { return Uint8Array.from(this.bytes); }
}

class Reader {
  constructor(bytes) { this.bytes = bytes; this.pos = 0; }
  u8() {
    if (this.pos >= this.bytes.length) throw new RangeError('message ends early');
    return this.bytes[this.pos++];
  }
  varint() {
    let n = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      const b = this.u8();
      n += (b & 0x7f) * scale;
      if ((b & 0x80) === 0) return n;
      scale *= 128;
    }
    throw new RangeError('varint too long');
  }
  string() {
    const len = this.varint();
    if (this.pos + len > this.bytes.length) throw new RangeError('message ends early');
    const s = utf8Decoder.decode(this.bytes.subarray(this.pos, this.pos + len));
    this.pos += len;
    return s;
  }
  bool() {
    const b = this.u8();
    if (b > 1) throw new RangeError('bad bool');
    return b === 1;
  }
  option(read) { return this.u8() === 0 ? undefined : read.call(this); }
  end() { if (this.pos !== this.bytes.length) throw new RangeError('trailing bytes'); }
}

/** Encodes a client message ({type: 'subscribe'|'unsubscribe'|'ping'|'hello'|'auth'|'ack'|'acks', ...}). */
export function encodeClientMessage(m) {
  const w = new Writer();
  switch (m.type) {
    case 'subscribe':
      w.u8(MessageType.SUBSCRIBE).string(m.room).option(m.since, w.varint).option(m.epoch, w.string);
      // `id` and then `delta` are trailing optional fields: absent, the message ends before
      // them; with `delta`, `id` is written too (`00` when absent).
      if (m.delta !== undefined && m.delta !== null) w.option(m.id, w.varint).option(m.delta, w.string);
      else if (m.id !== undefined && m.id !== null) w.option(m.id, w.varint);
      return w.finish();
    case 'unsubscribe':
      return w.u8(MessageType.UNSUBSCRIBE).string(m.room).finish();
    case 'ping':
      return w.u8(MessageType.PING).finish();
    case 'hello':
      return w.u8(MessageType.HELLO).finish();
    case 'auth':
      return w.u8(MessageType.AUTH).string(m.token).finish();
    case 'ack':
      return w.u8(MessageType.ACK).string(m.room).varint(m.version).finish();
    case 'acks':
      w.u8(MessageType.ACKS).varint(m.acks.length);
      for (const a of m.acks) w.varint(a.alias).varint(a.version);
      return w.finish();
    default:
      throw new TypeError(`unknown client message type ${m.type}`);
  }
}

/** Decodes a server message. `data` of state and event stays JSON text. */
export function decodeServerMessage(bytes) {
  const r = new Reader(bytes);
  const type = r.u8();
  let m;
  switch (type) {
    case MessageType.SUBSCRIBED: {
      m = { type: 'subscribed', room: r.string(), epoch: r.string(), version: r.varint(), seq: r.varint() };
      const recovered = r.option(r.bool);
      if (recovered !== undefined) m.recovered = recovered;
      // A trailing optional field: the id of the subscribe this answers.
      if (r.pos < r.bytes.length) {
        const id = r.option(r.varint);
        if (id !== undefined) m.id = id;
      }
      break;
    }
    case MessageType.UNSUBSCRIBED: m = { type: 'unsubscribed', room: r.string() }; break;
    case MessageType.PONG: m = { type: 'pong' }; break;
    case MessageType.ERROR: {
      m = { type: 'error', code: r.varint(), name: r.string(), message: r.string() };
      const room = r.option(r.string);
      if (room !== undefined) m.room = room;
      break;
    }
    case MessageType.RECONNECT: m = { type: 'reconnect', reason: r.string() }; break;
    case MessageType.CLOSE: m = { type: 'close', code: r.varint(), reason: r.string() }; break;
    case MessageType.STATE:
      m = { type: 'state', room: r.string(), version: r.varint(), ts: r.varint(), data: r.string() };
      break;
    case MessageType.EVENT:
      m = { type: 'event', room: r.string(), seq: r.varint(), ts: r.varint(), data: r.string(), id: r.string() };
      break;
    case MessageType.ALIAS: m = { type: 'alias', room: r.string(), alias: r.varint() }; break;
    case MessageType.AUTHED: m = { type: 'authed', sub: r.string(), exp: r.varint() }; break;
    case MessageType.WELCOME:
      m = { type: 'welcome', state_datagrams: r.string(), datagrams: r.bool(), max_datagram: r.varint() };
      break;
    case MessageType.STATE_BY_ALIAS:
      m = { type: 'state', alias: r.varint(), version: r.varint(), ts: r.varint(), data: r.string() };
      break;
    case MessageType.DELTA:
      m = { type: 'delta', room: r.string(), version: r.varint(), base: r.varint(), ts: r.varint(), delta: r.string() };
      break;
    case MessageType.DELTA_BY_ALIAS:
      m = { type: 'delta', alias: r.varint(), version: r.varint(), base: r.varint(), ts: r.varint(), delta: r.string() };
      break;
    default:
      throw new RangeError(`unknown server message type 0x${type.toString(16)}`);
  }
  r.end();
  return m;
}

// ---------------------------------------------------------------------------------------------
// Fossil deltas (PROTOCOL.md, "Delta states"): the format of Fossil's delta.c, as npm
// `fossil-delta` and the server make it. Applying only; every step is checked.

const FOSSIL_DIGITS = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~';
const FOSSIL_VALUE = new Int8Array(128).fill(-1);
for (let i = 0; i < 64; i++) FOSSIL_VALUE[FOSSIL_DIGITS.charCodeAt(i)] = i;

function fossilChecksum(bytes) {
  let sum = 0;
  const whole = bytes.length - (bytes.length % 4);
  for (let i = 0; i < whole; i += 4) {
    sum = (sum + ((bytes[i] << 24) | (bytes[i + 1] << 16) | (bytes[i + 2] << 8) | bytes[i + 3])) >>> 0;
  }
  let tail = 0;
  for (let i = whole, shift = 24; i < bytes.length; i++, shift -= 8) tail |= bytes[i] << shift;
  return (sum + (tail >>> 0)) >>> 0;
}

/** Applies a fossil delta (bytes) to `base` (bytes); throws on any malformed or mismatched
 *  delta (a wrong base fails the checksum). At most `maxLength` bytes of output. */
export function applyDelta(base, delta, maxLength = 16 * 1024 * 1024) {
  let pos = 0;
  const int = () => {
    let v = 0;
    const start = pos;
    while (pos < delta.length && delta[pos] < 128 && FOSSIL_VALUE[delta[pos]] >= 0) {
      v = v * 64 + FOSSIL_VALUE[delta[pos++]];
      if (v > Number.MAX_SAFE_INTEGER / 64) throw new RangeError('delta number too large');
    }
    if (pos === start && pos >= delta.length) throw new RangeError('delta ends too early');
    return v;
  };
  const byte = () => {
    if (pos >= delta.length) throw new RangeError('delta ends too early');
    return delta[pos++];
  };
  const limit = int();
  if (byte() !== 0x0a) throw new RangeError('delta size not ended by a newline');
  if (limit > maxLength) throw new RangeError('delta output too large');
  const out = new Uint8Array(limit);
  let total = 0;
  for (;;) {
    const cnt = int();
    switch (byte()) {
      case 0x40: { // '@': copy from the base
        const offset = int();
        if (byte() !== 0x2c) throw new RangeError('copy not ended by a comma');
        if (total + cnt > limit) throw new RangeError('delta writes more than its size');
        if (offset + cnt > base.length) throw new RangeError('delta copies past the end of its base');
        out.set(base.subarray(offset, offset + cnt), total);
        total += cnt;
        break;
      }
      case 0x3a: { // ':': literal bytes
        if (total + cnt > limit) throw new RangeError('delta writes more than its size');
        if (pos + cnt > delta.length) throw new RangeError('delta ends too early');
        out.set(delta.subarray(pos, pos + cnt), total);
        pos += cnt;
        total += cnt;
        break;
      }
      case 0x3b: // ';': the checksum of the output
        if (total !== limit) throw new RangeError('delta output does not match its size');
        if (cnt !== fossilChecksum(out)) throw new RangeError("delta's checksum does not match: wrong base");
        return out;
      default:
        throw new RangeError('unknown delta operator');
    }
  }
}

/** A state's JSON text after `delta` (text) is applied to `base` (text). */
export function applyTextDelta(base, delta) {
  return utf8Decoder.decode(applyDelta(utf8Encoder.encode(base), utf8Encoder.encode(delta)));
}

/** Prefixes a message with its length (LEB128), as on the control stream. */
export function encodeFrame(message) {
  const header = new Writer().varint(message.length).finish();
  const out = new Uint8Array(header.length + message.length);
  out.set(header);
  out.set(message, header.length);
  return out;
}

/** Splits a byte stream into length-prefixed frames. */
export class FrameDecoder {
  constructor(maxFrame = 16 * 1024 * 1024) { this.buf = new Uint8Array(0); this.maxFrame = maxFrame; }
  push(chunk) {
    const joined = new Uint8Array(this.buf.length + chunk.length);
    joined.set(this.buf);
    joined.set(chunk, this.buf.length);
    this.buf = joined;
    const frames = [];
    for (;;) {
      let len = 0, scale = 1, i = 0, complete = false;
      while (i < this.buf.length && i < 10) {
        const b = this.buf[i++];
        len += (b & 0x7f) * scale;
        scale *= 128;
        if ((b & 0x80) === 0) { complete = true; break; }
      }
      if (!complete) break;
      if (len > this.maxFrame) throw new RangeError(`frame of ${len} bytes is too large`);
      if (this.buf.length < i + len) break;
      frames.push(this.buf.slice(i, i + len));
      this.buf = this.buf.slice(i + len);
    }
    return frames;
  }
}

// ---------------------------------------------------------------------------------------------
// Transports: each opens, sends commands, and calls `onMessage(m, viaDatagram)` with messages
// in the JSON form (state and event `data` as JSON text), and `onClose(info)` once.

function hexToBytes(hex) {
  const clean = hex.replace(/[^0-9a-fA-F]/g, '');
  const out = new Uint8Array(clean.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(clean.substr(i * 2, 2), 16);
  return out;
}

class WebTransportConnection {
  constructor(url, certHash, options, handlers) {
    this.name = 'webtransport';
    this.options = options;
    this.handlers = handlers;
    this.closed = false;
    const wtOptions = {};
    if (certHash) wtOptions.serverCertificateHashes = [{ algorithm: 'sha-256', value: hexToBytes(certHash) }];
    this.wt = new WebTransport(url, wtOptions);
    this.pendingDatagrams = [];
    this.ready = false;
    /** alias -> room, and room -> alias, from the server's `alias` notices. */
    this.roomOfAlias = new Map();
    this.aliasOfRoom = new Map();
    /** alias -> newest version held, waiting to be acknowledged in one datagram. */
    this.pendingAcks = new Map();
    this.ackTimer = null;
    // Chromium drops datagrams that are not read at once: read from construction on.
    this.readDatagrams();
    this.datagramWriter = null;
  }

  async open() {
    await this.wt.ready;
    this.datagramWriter = this.wt.datagrams.writable.getWriter();
    const stream = await this.wt.createBidirectionalStream();
    this.writer = stream.writable.getWriter();
    this.readStream(stream.readable);
    this.wt.closed.then(
      (info) => this.finish({ code: info?.closeCode, reason: info?.reason }),
      (error) => this.finish({ error: String(error) }),
    );
    // The server expects the control stream to carry a first message promptly, and some
    // message at least every minute after that.
    await this.send({ type: 'ping' });
    this.keepalive = setInterval(() => this.send({ type: 'ping' }).catch(() => {}), this.options.webtransportPingMs);
    this.ready = true;
    for (const m of this.pendingDatagrams.splice(0)) this.onDatagram(m);
  }

  async readDatagrams() {
    try {
      const reader = this.wt.datagrams.readable.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        let m;
        try { m = decodeServerMessage(value); } catch { continue; }
        if (this.ready) this.onDatagram(m); else this.pendingDatagrams.push(m);
      }
    } catch { /* the session ended */ }
  }

  /** A state datagram names its room by alias; one whose alias is not known yet is dropped. */
  onDatagram(m) {
    if (m.alias !== undefined) {
      const room = this.roomOfAlias.get(m.alias);
      if (room === undefined) return;
      m.room = room;
      delete m.alias;
    }
    this.handlers.onMessage(m, true);
  }

  async readStream(readable) {
    const decoder = new FrameDecoder();
    try {
      const reader = readable.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const frame of decoder.push(value)) {
          const m = decodeServerMessage(frame);
          if (m.type === 'alias') {
            this.roomOfAlias.set(m.alias, m.room);
            this.aliasOfRoom.set(m.room, m.alias);
            continue;
          }
          // The server's last word before it closes: the same code and reason as its close.
          if (m.type === 'close') this.closeInfo = { code: m.code, reason: m.reason };
          this.handlers.onMessage(m, false);
        }
      }
    } catch { /* the session ended */ }
    // The session's own close (WebTransport.closed, with the code) usually follows at once.
    await Promise.race([this.wt.closed.catch(() => {}), new Promise((r) => setTimeout(r, 1000))]);
    this.finish(this.closeInfo ?? {});
  }

  async send(m) {
    await this.writer.write(encodeFrame(encodeClientMessage(m)));
  }

  /** Acknowledges a state datagram; acks made within `ackDelayMs` go out in one datagram. */
  ack(room, version) {
    const alias = this.aliasOfRoom.get(room);
    if (!this.datagramWriter || alias === undefined) return;
    this.pendingAcks.set(alias, Math.max(version, this.pendingAcks.get(alias) ?? 0));
    if (this.ackTimer === null) this.ackTimer = setTimeout(() => this.flushAcks(), this.options.ackDelayMs);
  }

  flushAcks() {
    this.ackTimer = null;
    const acks = Array.from(this.pendingAcks, ([alias, version]) => ({ alias, version }));
    this.pendingAcks.clear();
    for (let i = 0; i < acks.length; i += ACKS_PER_DATAGRAM) {
      const message = encodeClientMessage({ type: 'acks', acks: acks.slice(i, i + ACKS_PER_DATAGRAM) });
      this.datagramWriter?.write(message).catch(() => {});
    }
  }

  close() {
    this.closed = true;
    this.stopTimers();
    try { this.wt.close({ closeCode: 0, reason: 'client closed' }); } catch { /* already closed */ }
  }

  stopTimers() {
    clearInterval(this.keepalive);
    clearTimeout(this.ackTimer);
    this.ackTimer = null;
  }

  finish(info) {
    if (this.finished) return;
    this.finished = true;
    this.stopTimers();
    this.handlers.onClose(info);
  }
}

/** The text of a state frame's `data`, byte for byte: the server writes it last
 *  (`...,"data":DATA}`), so it runs from the first `,"data":` to the closing brace. */
function stateDataText(frame) {
  const at = frame.indexOf(',"data":');
  if (at < 0 || !frame.endsWith('}')) return undefined;
  return frame.slice(at + 8, -1);
}

class WebSocketConnection {
  constructor(url, handlers) {
    this.name = 'websocket';
    this.handlers = handlers;
    this.ws = new WebSocket(url);
  }

  open() {
    return new Promise((resolve, reject) => {
      this.ws.onopen = () => resolve();
      this.ws.onerror = () => reject(new Error('websocket failed'));
      this.ws.onclose = (e) => {
        reject(new Error(`websocket closed (${e.code})`));
        this.finish({ code: e.code, reason: e.reason });
      };
      this.ws.onmessage = (e) => {
        let m;
        try { m = JSON.parse(e.data); } catch { return; }
        // Keep `data` as JSON text, as over WebTransport: for a state, the publisher's bytes,
        // which the server writes last in the frame (a delta applies to exactly those).
        if (m.type === 'state' && 'data' in m) m.data = stateDataText(e.data) ?? JSON.stringify(m.data);
        else if (m.type === 'event' && 'data' in m) m.data = JSON.stringify(m.data);
        this.handlers.onMessage(m, false);
      };
    });
  }

  async send(m) { this.ws.send(JSON.stringify(m)); }

  ack() {}

  close() { try { this.ws.close(1000, 'client closed'); } catch { /* already closed */ } }

  finish(info) {
    if (this.finished) return;
    this.finished = true;
    this.handlers.onClose(info);
  }
}

// ---------------------------------------------------------------------------------------------
// The client.

function deriveUrls(origin, options) {
  const base = new URL(origin);
  const secure = base.protocol === 'https:';
  const wtPort = options.webtransportPort ?? (secure ? (base.port || '443') : DEFAULTS.webtransportPort);
  return {
    webtransport: options.webtransportUrl ?? `https://${base.hostname}:${wtPort}/wt`,
    websocket: options.websocketUrl ?? `${secure ? 'wss' : 'ws'}://${base.host}/ws`,
    http: (options.httpUrl ?? base.origin).replace(/\/$/, ''),
  };
}

function withTimeout(promise, ms, onTimeout) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => { onTimeout?.(); reject(new Error(`timed out after ${ms} ms`)); }, ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/**
 * Connects to a Courtside edge. `origin` is its HTTP origin (for example `location.origin`).
 * Options: certHash (hex SHA-256 from /v1/cert-hash, for development certificates),
 * webtransportUrl, websocketUrl, httpUrl (the HTTP API's origin, for refetching after a failed
 * recovery; default `origin`), webtransportPort, webtransportTimeoutMs, transports,
 * reconnectInitialMs, reconnectMaxMs, eventIdMemory, onTransport(name), onDisconnect(info), log(message).
 * Resolves once a transport is open; rejects if none could be opened.
 */
export async function connect(origin, options = {}) {
  const client = new CourtsideClient(origin, options);
  await client.start();
  return client;
}

/** The ids of a room's most recent events, to drop one delivered again (a bounded set). */
export class RecentIds {
  constructor(limit = 2048) { this.limit = limit; this.set = new Set(); }
  /** Adds `id`; false if it was already there. */
  add(id) {
    if (this.set.has(id)) return false;
    this.set.add(id);
    if (this.set.size > this.limit) this.set.delete(this.set.values().next().value);
    return true;
  }
}

export class CourtsideClient {
  constructor(origin, options = {}) {
    this.options = { ...DEFAULTS, ...options };
    this.urls = deriveUrls(origin, options);
    /** room name -> { handlers, epoch, version, seq, confirmed, ids } */
    this.rooms = new Map();
    this.connection = null;
    this.closedByUser = false;
    this.attempt = 0;
    this.webtransportFailed = false;
    this.reconnectTimer = null;
  }

  /** `"webtransport"` or `"websocket"` (null while disconnected). */
  get transport() { return this.connection ? this.connection.name : null; }

  log(message) { this.options.log?.(message); }

  async start() {
    this.connection = await this.open();
    this.attempt = 0;
    this.options.onTransport?.(this.connection.name);
    await this.authenticate();
  }

  /** Sends `auth` with the token (`options.getToken()` asked each time, else `options.token`),
   *  before any subscribe on a new connection: commands are handled in order (PROTOCOL.md, "Tokens"). */
  async authenticate() {
    let token = this.options.token;
    if (this.options.getToken) {
      try { token = await this.options.getToken(); } catch (e) { this.log(`getToken failed: ${e.message ?? e}`); }
    }
    if (token) await this.connection?.send({ type: 'auth', token }).catch(() => {});
  }

  async open() {
    const errors = [];
    for (const name of this.options.transports) {
      if (name === 'webtransport') {
        if (typeof WebTransport === 'undefined') { errors.push('WebTransport is not available'); continue; }
        if (this.webtransportFailed && this.attempt % 5 !== 0) continue;
        let conn;
        try {
          conn = new WebTransportConnection(this.urls.webtransport, this.options.certHash, this.options, this.handlersFor(() => conn));
          await withTimeout(conn.open(), this.options.webtransportTimeoutMs, () => conn.close());
          this.webtransportFailed = false;
          return conn;
        } catch (e) {
          conn?.close();
          this.webtransportFailed = true;
          errors.push(`webtransport: ${e.message ?? e}`);
          this.log(`WebTransport unavailable (${e.message ?? e}); falling back`);
        }
      } else if (name === 'websocket') {
        let conn;
        try {
          conn = new WebSocketConnection(this.urls.websocket, this.handlersFor(() => conn));
          await conn.open();
          return conn;
        } catch (e) {
          errors.push(`websocket: ${e.message ?? e}`);
        }
      }
    }
    throw new Error(`no transport could connect: ${errors.join('; ')}`);
  }

  handlersFor(connection) {
    return {
      onMessage: (m, viaDatagram) => { if (connection() === this.connection) this.dispatch(m, viaDatagram); },
      onClose: (info) => { if (connection() === this.connection) this.lost(info); },
    };
  }

  /** Subscribes to `room`. Handlers: onState(data, meta), onEvent(data, meta), onSubscribed(info),
   *  onRecoveryFailed(info), onError(error). `since`: recover events after this sequence.
   *  `delta: true`: the server may send states as deltas, which this client applies: onState
   *  still receives every state whole (PROTOCOL.md, "Delta states"). */
  subscribe(room, handlers = {}) {
    const entry = {
      handlers, epoch: handlers.epoch, version: 0, seq: handlers.since ?? 0, since: handlers.since, confirmed: false,
      ids: new RecentIds(this.options.eventIdMemory), delta: handlers.delta === true,
      /** The held state's JSON text, byte for byte: the base of the next delta. */
      text: undefined,
    };
    this.rooms.set(room, entry);
    this.sendSubscribe(room, entry);
  }

  unsubscribe(room) {
    if (!this.rooms.delete(room)) return;
    this.connection?.send({ type: 'unsubscribe', room }).catch(() => {});
  }

  close() {
    this.closedByUser = true;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.refreshTimer);
    this.connection?.close();
    this.connection = null;
  }

  sendSubscribe(room, entry) {
    entry.confirmed = false;
    // Every subscribe carries an id, echoed in the `subscribed` that answers it.
    this.nextRequestId = (this.nextRequestId ?? 0) + 1;
    entry.requestId = this.nextRequestId;
    const m = { type: 'subscribe', room, id: entry.requestId };
    if (entry.delta) m.delta = 'fossil';
    entry.sentSince = undefined;
    if (entry.seq > 0 || entry.since !== undefined) {
      m.since = entry.seq;
      entry.sentSince = entry.seq;
      if (entry.epoch) m.epoch = entry.epoch;
    }
    this.connection?.send(m).catch(() => {});
  }

  dispatch(m, viaDatagram) {
    const entry = m.room !== undefined ? this.rooms.get(m.room) : undefined;
    switch (m.type) {
      case 'subscribed': {
        if (!entry) return;
        // PROTOCOL.md, "After each subscribed": the reply to our subscribe carries its id;
        // anything else is a notice.
        const reply = m.id !== undefined && m.id === entry.requestId;
        const sameEpoch = entry.epoch === m.epoch;
        const sentSince = entry.sentSince;
        if (reply && m.recovered === true) {
          // The events after `since` follow, in this epoch.
        } else if (reply) {
          if (entry.epoch !== m.epoch) entry.version = 0; // the state that follows is newer
          entry.seq = m.seq;
        } else {
          // A notice: a new epoch and the numbers the room goes on from; after one with
          // `recovered: false` the newest state follows, whatever its version.
          entry.version = m.recovered === false ? 0 : m.version;
          entry.seq = m.seq;
        }
        entry.epoch = m.epoch;
        entry.confirmed = true;
        // The server starts the room afresh too: its next state comes whole.
        entry.text = undefined;
        entry.handlers.onSubscribed?.(m);
        if (m.recovered === false) {
          entry.handlers.onRecoveryFailed?.(m);
          // What the history still keeps, from our `since` in the same epoch, else from 0.
          this.refetch(m.room, entry, reply && sameEpoch && sentSince !== undefined ? sentSince : 0);
        }
        return;
      }
      case 'state': {
        // Datagrams for a room not yet confirmed on this connection are ignored; the server
        // repairs them (PROTOCOL.md, "Loss repair").
        if (!entry || (viaDatagram && !entry.confirmed)) return;
        if (m.version > entry.version || (m.version === entry.version && entry.text === undefined)) {
          // The held text is the next delta's base (also a repeat of the version held, after a
          // `subscribed` let the text go).
          entry.text = m.data;
          entry.awaitingWhole = false;
        }
        if (m.version > entry.version) {
          entry.version = m.version;
          entry.handlers.onState?.(JSON.parse(m.data), { room: m.room, version: m.version, ts: m.ts, transport: this.transport });
        }
        if (viaDatagram) this.connection?.ack(m.room, entry.version);
        return;
      }
      case 'delta': {
        if (!entry || (viaDatagram && !entry.confirmed)) return;
        if (m.version <= entry.version) {
          if (viaDatagram) this.connection?.ack(m.room, entry.version);
          return;
        }
        let text;
        if (entry.text !== undefined && m.base === entry.version) {
          try { text = applyTextDelta(entry.text, m.delta); } catch (e) { this.log(`delta for ${m.room} failed: ${e.message}`); }
        }
        if (text === undefined) {
          // A datagram may overtake the stream message that brings its base: drop it, the
          // server repairs it. On the stream it cannot be applied at all: ask for the whole state.
          if (!viaDatagram) this.requestWholeState(m.room, entry);
          return;
        }
        this.dispatch({ type: 'state', room: m.room, version: m.version, ts: m.ts, data: text }, viaDatagram);
        return;
      }
      case 'event': {
        if (!entry) return;
        // Live events wait while a refetch runs, to come after what it brings.
        if (entry.held) { entry.held.push(m); return; }
        if (m.seq <= entry.seq) return;
        entry.seq = m.seq;
        this.takeEvent(entry, m, JSON.parse(m.data), this.transport);
        return;
      }
      case 'error': {
        const target = entry?.handlers.onError ?? this.options.onError;
        target?.(m);
        return;
      }
      case 'pong':
        this.pongWaiters?.shift()?.();
        return;
      case 'authed': {
        this.authed = { sub: m.sub, exp: m.exp };
        this.options.onAuthed?.(m);
        clearTimeout(this.refreshTimer);
        if (this.options.getToken) {
          // A new token before this one expires; the server closes with 4003 otherwise.
          const delay = Math.max(1000, m.exp * 1000 - Date.now() - this.options.tokenRefreshMarginMs);
          this.refreshTimer = setTimeout(() => this.authenticate(), delay);
        }
        return;
      }
      case 'reconnect':
        this.log(`server asked to reconnect (${m.reason})`);
        this.reconnectSoon(Math.random() * this.options.reconnectInitialMs);
        return;
      default:
        return;
    }
  }

  /** A delta could not be applied (PROTOCOL.md, "Delta states"): subscribes again, with the
   *  `since` and epoch held, so no event is missed; the reply's `subscribed` is followed by the
   *  room's state, whole. Deltas are ignored until it arrives. */
  requestWholeState(room, entry) {
    if (entry.awaitingWhole) return;
    entry.awaitingWhole = true;
    entry.text = undefined;
    this.log(`asking for the whole state of ${room}`);
    this.sendSubscribe(room, entry);
  }

  /** Hands an event to the room's handler unless its id is held already (PROTOCOL.md, "Event
   *  identity"): the same event under another number is dropped. */
  takeEvent(entry, m, data, transport) {
    if (m.id !== undefined && !entry.ids.add(m.id)) return;
    entry.handlers.onEvent?.(data, { room: m.room, seq: m.seq, id: m.id, ts: m.ts, transport });
  }

  /** Recovery failed (PROTOCOL.md, "After each subscribed"): fetches what the room's history
   *  still keeps after `since` and hands over, in order, the events whose id is not held, before
   *  the live events that arrive meanwhile. A 410 (gone) or a failed fetch hands over nothing. */
  async refetch(room, entry, since) {
    if (entry.held) return;
    entry.held = [];
    try {
      // Page by page while `more` (docs/openapi.yaml), a bounded number of pages.
      for (let pages = 0; pages < 50; pages++) {
        const response = await fetch(`${this.urls.http}/v1/rooms/${encodeURIComponent(room)}/events?since=${since}`);
        if (!response.ok) break;
        const body = await response.json();
        if (body.epoch !== entry.epoch) break;
        for (const e of body.events) {
          if (e.seq > entry.seq) entry.seq = e.seq;
          this.takeEvent(entry, { room, seq: e.seq, id: e.id, ts: e.ts }, e.data, 'http');
        }
        if (!body.more || body.last_seq <= since) break;
        since = body.last_seq;
      }
    } catch (e) {
      this.log(`refetching ${room} failed: ${e.message ?? e}`);
    }
    const held = entry.held;
    entry.held = null;
    for (const m of held) this.dispatch(m, false);
  }

  lost(info) {
    this.connection = null;
    this.options.onDisconnect?.(info);
    if (!this.closedByUser) this.reconnectSoon(this.backoff());
  }

  backoff() {
    const base = Math.min(this.options.reconnectMaxMs, this.options.reconnectInitialMs * 2 ** this.attempt);
    return base * (0.5 + Math.random());
  }

  reconnectSoon(delay) {
    if (this.closedByUser || this.reconnectTimer) return;
    const old = this.connection;
    this.connection = null;
    old?.close();
    this.reconnectTimer = setTimeout(async () => {
      this.reconnectTimer = null;
      this.attempt += 1;
      try {
        this.connection = await this.open();
      } catch (e) {
        this.log(`reconnect failed: ${e.message}`);
        this.reconnectSoon(this.backoff());
        return;
      }
      this.attempt = 0;
      this.options.onTransport?.(this.connection.name);
      await this.authenticate();
      for (const [room, entry] of this.rooms) this.sendSubscribe(room, entry);
    }, delay);
  }

  /** Measures a round trip over the current transport (resolves with milliseconds). */
  async ping() {
    if (!this.connection) throw new Error('not connected');
    const start = performance.now();
    const pong = new Promise((resolve) => { this.pongWaiters = [...(this.pongWaiters ?? []), resolve]; });
    await this.connection.send({ type: 'ping' });
    await pong;
    return performance.now() - start;
  }
}

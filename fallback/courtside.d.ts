// Types of courtside.js, the Courtside browser client (README.md beside this file is its API).
// fallback/test/package.test.mjs checks that this file declares every export of the module and
// nothing else; tests/browser type-checks a consumer against it with tsc --strict.

/** A transport the client can use. */
export type TransportName = 'webtransport' | 'websocket';

/** Where a state or event came from: a transport, or the HTTP refetch after a failed recovery. */
export type DeliveryTransport = TransportName | 'http';

/** The defaults of `connect`'s options. */
export declare const DEFAULTS: Readonly<{
  webtransportTimeoutMs: number;
  webtransportPort: number;
  transports: TransportName[];
  reconnectInitialMs: number;
  reconnectMaxMs: number;
  webtransportPingMs: number;
  ackDelayMs: number;
  tokenRefreshMarginMs: number;
  eventIdMemory: number;
}>;

/** The server's answer to a subscribe, or a notice (docs/PROTOCOL.md, "After each subscribed"). */
export interface Subscribed {
  type: 'subscribed';
  room: string;
  epoch: string;
  version: number;
  seq: number;
  recovered?: boolean;
  id?: number;
}

/** An error reply (docs/PROTOCOL.md has every code). */
export interface ErrorReply {
  type: 'error';
  code: number;
  name: string;
  message: string;
  room?: string;
}

/** An accepted token (`auth`). */
export interface Authed {
  type: 'authed';
  sub: string;
  /** Expiry, in seconds since the epoch. */
  exp: number;
}

export interface StateMeta {
  room: string;
  version: number;
  /** When it was published, in milliseconds since the epoch. */
  ts: number;
  transport: DeliveryTransport | null;
}

export interface EventMeta {
  room: string;
  seq: number;
  id?: string;
  ts: number;
  transport: DeliveryTransport | null;
}

export interface DisconnectInfo {
  /** The server's close code, when it sent one (both transports). */
  code?: number;
  reason?: string;
}

/** A room's handlers, and where to resume it from. `S` and `E` are the types of its published states and events (JSON values). */
export interface RoomHandlers<S = unknown, E = unknown> {
  onState?(data: S, meta: StateMeta): void;
  onEvent?(data: E, meta: EventMeta): void;
  onSubscribed?(info: Subscribed): void;
  /** Some missed events may be gone for good (a `recovered: false`). */
  onRecoveryFailed?(info: Subscribed): void;
  onError?(error: ErrorReply): void;
  /** Recover the events after this sequence. */
  since?: number;
  /** The epoch `since` belongs to. */
  epoch?: string;
  /** Take the room's large states as fossil deltas, applied by the client: `onState` still
   *  receives every state whole (docs/PROTOCOL.md, "Delta states"). */
  delta?: boolean;
}

export interface ConnectOptions {
  /** Hex SHA-256 of a self-signed development certificate (`GET /v1/cert-hash`). */
  certHash?: string;
  webtransportUrl?: string;
  webtransportPort?: number;
  websocketUrl?: string;
  webtransportTimeoutMs?: number;
  transports?: TransportName[];
  reconnectInitialMs?: number;
  reconnectMaxMs?: number;
  webtransportPingMs?: number;
  ackDelayMs?: number;
  /** The HTTP API's origin, for the refetch after a failed recovery (default: `origin`). */
  httpUrl?: string;
  /** A JWT sent with `auth` on every (re)connection. */
  token?: string;
  /** Asked for a token on every (re)connection and before the current one expires. */
  getToken?(): string | undefined | Promise<string | undefined>;
  tokenRefreshMarginMs?: number;
  onAuthed?(info: Authed): void;
  eventIdMemory?: number;
  onTransport?(name: TransportName): void;
  onDisconnect?(info: DisconnectInfo): void;
  onError?(error: ErrorReply): void;
  log?(message: string): void;
}

/** Connects to an edge; `origin` is its HTTP origin. Resolves once a transport is open. */
export declare function connect(origin: string, options?: ConnectOptions): Promise<CourtsideClient>;

export declare class CourtsideClient {
  constructor(origin: string, options?: ConnectOptions);
  /** The transport in use, `null` while reconnecting. */
  readonly transport: TransportName | null;
  start(): Promise<void>;
  subscribe<S = unknown, E = unknown>(room: string, handlers?: RoomHandlers<S, E>): void;
  unsubscribe(room: string): void;
  /** Closes for good (no reconnection). */
  close(): void;
  /** Resolves with the round-trip time in milliseconds. */
  ping(): Promise<number>;
}

/** The ids of a room's most recent events, to drop one delivered again (a bounded set). */
export declare class RecentIds {
  constructor(limit?: number);
  /** Adds `id`; false if it was already there. */
  add(id: string): boolean;
}

// The binary codec (docs/PROTOCOL.md, checked against docs/test-vectors.json).

export declare const MessageType: Readonly<{
  SUBSCRIBE: 0x01;
  UNSUBSCRIBE: 0x02;
  PING: 0x03;
  ACK: 0x04;
  ACKS: 0x05;
  AUTH: 0x06;
  HELLO: 0x07;
  SUBSCRIBED: 0x10;
  UNSUBSCRIBED: 0x11;
  PONG: 0x12;
  ERROR: 0x13;
  RECONNECT: 0x14;
  CLOSE: 0x15;
  ALIAS: 0x16;
  AUTHED: 0x17;
  WELCOME: 0x18;
  STATE: 0x20;
  EVENT: 0x21;
  STATE_BY_ALIAS: 0x22;
  DELTA: 0x23;
  DELTA_BY_ALIAS: 0x24;
}>;

export type ClientMessage =
  | { type: 'subscribe'; room: string; since?: number; epoch?: string; id?: number | null; delta?: 'fossil' }
  | { type: 'unsubscribe'; room: string }
  | { type: 'ping' }
  | { type: 'hello' }
  | { type: 'auth'; token: string }
  | { type: 'ack'; room: string; version: number }
  | { type: 'acks'; acks: { alias: number; version: number }[] };

/** A decoded server message; `data` of a state or an event stays JSON text. */
export type ServerMessage =
  | Subscribed
  | { type: 'unsubscribed'; room: string }
  | { type: 'pong' }
  | ErrorReply
  | { type: 'reconnect'; reason: string }
  | { type: 'close'; code: number; reason: string }
  | { type: 'state'; room: string; version: number; ts: number; data: string }
  | { type: 'state'; alias: number; version: number; ts: number; data: string }
  | { type: 'event'; room: string; seq: number; ts: number; data: string; id: string }
  | { type: 'alias'; room: string; alias: number }
  | { type: 'delta'; room: string; version: number; base: number; ts: number; delta: string }
  | { type: 'delta'; alias: number; version: number; base: number; ts: number; delta: string }
  | { type: 'welcome'; state_datagrams: 'always' | 'after-loss'; datagrams: boolean; max_datagram: number }
  | Authed;

export declare function encodeClientMessage(message: ClientMessage): Uint8Array;
export declare function decodeServerMessage(bytes: Uint8Array): ServerMessage;
/** Prefixes a message with its length (LEB128), as on the control stream. */
export declare function encodeFrame(message: Uint8Array): Uint8Array;
/** Applies a fossil delta to `base` (docs/PROTOCOL.md, "Delta states"); throws a `RangeError`
 *  on a malformed delta or a wrong base (its checksum). At most `maxLength` bytes of output. */
export declare function applyDelta(base: Uint8Array, delta: Uint8Array, maxLength?: number): Uint8Array;
/** A state's JSON text after the delta (text) is applied to `base` (text). */
export declare function applyTextDelta(base: string, delta: string): string;

/** Splits a byte stream into length-prefixed frames. */
export declare class FrameDecoder {
  constructor(maxFrame?: number);
  /** The complete frames the bytes so far hold. */
  push(chunk: Uint8Array): Uint8Array[];
}

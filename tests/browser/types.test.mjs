// The client's types (fallback/courtside.d.ts) as a site that bundles the package sees them:
// a consumer resolves `courtside-client` through fallback/package.json's exports and compiles
// with tsc --strict; lines marked @ts-expect-error must be refused, so loose types fail too.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, symlinkSync, writeFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const FALLBACK = fileURLToPath(new URL('../../fallback', import.meta.url));
const TSC = fileURLToPath(new URL('./node_modules/typescript/bin/tsc', import.meta.url));

const CONSUMER = `
import { connect, DEFAULTS, encodeClientMessage, decodeServerMessage, FrameDecoder } from 'courtside-client';
import type { CourtsideClient, StateMeta, EventMeta, TransportName } from 'courtside-client';

interface Score { home: number; away: number }
interface Play { text: string }

const client: CourtsideClient = await connect('https://live.example.org', {
  webtransportUrl: 'https://wt.example.org/wt',
  getToken: async () => 'jwt',
  onTransport: (name: TransportName) => console.log(name),
  onDisconnect: (info) => console.log(info.code, info.reason),
});
client.subscribe<Score, Play>('game:1', {
  onState: (score, meta: StateMeta) => console.log(score.home + score.away + meta.version),
  onEvent: (play, meta: EventMeta) => console.log(play.text, meta.seq),
  onRecoveryFailed: (info) => console.log(info.recovered === false, info.epoch),
  since: 3,
});
const transport: TransportName | null = client.transport;
const rtt: number = await client.ping();
const timeout: number = DEFAULTS.webtransportTimeoutMs;
const bytes: Uint8Array = encodeClientMessage({ type: 'subscribe', room: 'game:1', since: 3 });
const message = decodeServerMessage(bytes);
if (message.type === 'error') console.log(message.code, message.name);
const frames: Uint8Array[] = new FrameDecoder().push(bytes);
console.log(transport, rtt, timeout, frames.length);
client.close();

// @ts-expect-error: not a client message
encodeClientMessage({ type: 'publish', room: 'game:1' });
// @ts-expect-error: the certificate hash is hex text
void connect('https://live.example.org', { certHash: 42 });
// @ts-expect-error: a state's data is the room's type
client.subscribe<Score>('game:1', { onState: (score) => score.clock.toUpperCase() });
`;

test('a TypeScript site compiles against the package with tsc --strict', () => {
  const dir = mkdtempSync(join(tmpdir(), 'courtside-types-'));
  try {
    mkdirSync(join(dir, 'node_modules'));
    symlinkSync(FALLBACK, join(dir, 'node_modules', 'courtside-client'), 'dir');
    writeFileSync(join(dir, 'site.ts'), CONSUMER);
    writeFileSync(join(dir, 'tsconfig.json'), JSON.stringify({
      compilerOptions: {
        strict: true, noEmit: true, target: 'es2022', module: 'esnext', moduleResolution: 'bundler',
        lib: ['es2022', 'dom'], types: [], skipLibCheck: false,
      },
      files: ['site.ts'],
    }));
    let output = '';
    try {
      output = execFileSync(process.execPath, [TSC, '-p', dir], { encoding: 'utf8' });
    } catch (e) {
      assert.fail(`tsc refused the consumer:\n${e.stdout}${e.stderr}`);
    }
    assert.equal(output.trim(), '');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

// The package (package.json, courtside.d.ts): what a site that bundles the client gets. The
// types are checked against the module here by name; tests/browser/types.test.mjs compiles a
// consumer against them with tsc --strict.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import * as client from '../courtside.js';

const here = (path) => fileURLToPath(new URL(`../${path}`, import.meta.url));
const pkg = JSON.parse(readFileSync(here('package.json'), 'utf8'));

test('package.json exports the module and its types, and ships both', () => {
  assert.equal(pkg.type, 'module');
  assert.deepEqual(pkg.exports['.'], { types: './courtside.d.ts', default: './courtside.js' });
  assert.equal(pkg.main, './courtside.js');
  assert.equal(pkg.types, './courtside.d.ts');
  for (const file of pkg.files) assert.ok(existsSync(here(file)), `${file} is in "files" but missing`);
  assert.ok(pkg.files.includes('courtside.js') && pkg.files.includes('courtside.d.ts'));
  // The package's version is the edge's (Cargo.toml): one release of both.
  const cargo = readFileSync(here('../Cargo.toml'), 'utf8');
  const version = cargo.match(/^\[package\][^[]*?^version = "([^"]+)"/m)?.[1];
  assert.equal(pkg.version, version);
});

test('courtside.d.ts declares every export of courtside.js, and nothing it does not export', () => {
  const types = readFileSync(here('courtside.d.ts'), 'utf8');
  const declared = [...types.matchAll(/^export declare (?:const|function|class) (\w+)/gm)].map((m) => m[1]);
  assert.deepEqual([...declared].sort(), Object.keys(client).sort());
});

// The CommonJS build loads with require() and exposes the same API as the ES modules.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createRequire } from "node:module";
import * as esm from "../../dist/esm/index.js";

test("CommonJS build: same exports as the ES modules", () => {
  const cjs = createRequire(import.meta.url)("../../dist/cjs/index.js");
  assert.deepEqual(Object.keys(cjs).sort(), Object.keys(esm).sort());
  assert.equal(typeof cjs.Client, "function");
  assert.equal(cjs.backoffDelay(0, 500, 20000, () => 1), 1000);
});

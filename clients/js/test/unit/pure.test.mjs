// Pure logic: backoff windows, JWT expiry and refresh scheduling, close-code policy, positions.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  backoffDelay,
  backoffCap,
  jwtExpiryMs,
  jwtClaims,
  tokenExpired,
  refreshDelayMs,
  closePolicy,
  LocalClose,
  PositionTracker,
  parseFrame,
} from "../../dist/esm/index.js";
import { fakeJwt } from "./fakes.mjs";

test("backoff: full jitter over [min, min(max, min*2^(n+1))], floor 500 ms, ceiling 20 s", () => {
  const windows = [1000, 2000, 4000, 8000, 16000, 20000, 20000];
  windows.forEach((cap, n) => {
    assert.equal(backoffDelay(n, 500, 20000, () => 0), 500, `attempt ${n} floor`);
    assert.equal(backoffDelay(n, 500, 20000, () => 1), cap, `attempt ${n} cap`);
    assert.equal(backoffCap(n, 500, 20000), cap);
  });
  // Huge attempt counts neither overflow nor exceed the ceiling.
  assert.equal(backoffDelay(10_000, 500, 20000, () => 1), 20000);
  assert.equal(backoffDelay(-3, 500, 20000, () => 1), 1000);
  // Draws fall inside the window and spread over it.
  const draws = Array.from({ length: 2000 }, () => backoffDelay(3, 500, 20000));
  assert.ok(draws.every((d) => d >= 500 && d <= 8000));
  assert.ok(Math.min(...draws) < 1500 && Math.max(...draws) > 7000, "spread over the window");
});

test("jwt: exp read from the payload without verification; unreadable tokens have none", () => {
  const t = fakeJwt({ sub: "alice", exp: 2_000_000_000, name: "Zoë" });
  assert.equal(jwtExpiryMs(t), 2_000_000_000_000);
  assert.equal(jwtClaims(t).name, "Zoë", "UTF-8 payloads decode");
  assert.equal(jwtExpiryMs("not-a-jwt"), undefined);
  assert.equal(jwtExpiryMs("a.b.c"), undefined);
  assert.equal(jwtExpiryMs(fakeJwt({ sub: "x" })), undefined);
  assert.equal(jwtExpiryMs(fakeJwt({ exp: "soon" })), undefined);
});

test("jwt: a token is expired for connecting when less than minValidity remains", () => {
  const now = 1_000_000_000_000;
  const t = fakeJwt({ exp: now / 1000 + 10 });
  assert.equal(tokenExpired(t, now, 5000), false);
  assert.equal(tokenExpired(t, now + 5001, 5000), true);
  assert.equal(tokenExpired(fakeJwt({ sub: "no exp" }), now, 5000), false, "unknown expiry: the relay decides");
});

test("refresh: at 80% of the remaining lifetime, at least 5 s before expiry", () => {
  const now = 1_000_000;
  assert.equal(refreshDelayMs(now + 600_000, now), 480_000);
  assert.equal(refreshDelayMs(now + 20_000, now), 15_000, "5 s margin wins over 80%");
  assert.equal(refreshDelayMs(now + 4_000, now), 0, "less than the margin left: now");
  assert.equal(refreshDelayMs(now - 1, now), 0);
  assert.equal(refreshDelayMs(undefined, now), undefined);
});

test("close codes: what the client does for each", () => {
  const p = (c) => closePolicy(c);
  for (const c of [1000, 1001, 1006, 1009, 1011, 1012, 1013, 4000, 4008, 4503, LocalClose.DeadLink, LocalClose.ConnectTimeout, 4999]) {
    assert.equal(p(c).reconnect, true, `${c} reconnects`);
    assert.equal(p(c).newToken, false, `${c} keeps the token`);
  }
  assert.deepEqual(
    { r: p(1008).reconnect, t: p(1008).newToken, a: p(1008).authFailure },
    { r: true, t: true, a: false },
  );
  assert.deepEqual({ r: p(4401).reconnect, t: p(4401).newToken, a: p(4401).authFailure }, { r: true, t: true, a: true });
  assert.equal(p(4403).reconnect, false);
  assert.deepEqual({ r: p(4100).reconnect, t: p(4100).newToken }, { r: true, t: true });
  assert.equal(p(4101).reconnect, false);
  assert.deepEqual({ r: p(4409).reconnect, t: p(4409).newToken }, { r: false, t: true });
  assert.equal(p(4029).minAttempt, 3);
  assert.equal(p(4503).retryAfterMs, 1000, "the smallest Retry-After of a 503");
  assert.equal(p(1006).retryAfterMs, 0);
  assert.equal(p(LocalClose.TokenRefresh).immediate, true);
});

test("positions: duplicates never delivered twice, gaps detected through prev", () => {
  const pos = new PositionTracker();
  assert.equal(pos.judge(undefined, undefined), "deliver", "plain channel");
  pos.subscribed({ epoch: "e1", seq: 10 }, undefined);
  assert.deepEqual(pos.since(), { epoch: "e1", seq: 10 });
  assert.equal(pos.judge(12, 10), "deliver");
  pos.delivered(12);
  assert.equal(pos.judge(12, 10), "duplicate");
  assert.equal(pos.judge(7, 3), "duplicate");
  assert.equal(pos.judge(20, 15), "gap", "prev 15 was never delivered");
  assert.equal(pos.judge(20, 12), "deliver", "stream sequence jumps across subjects are no gap");
  assert.equal(pos.judge(20, 0), "deliver", "first message on the subject");
});

test("positions: subscribe ok with and without recovery", () => {
  const pos = new PositionTracker();
  assert.equal(pos.subscribed({ epoch: "e1", seq: 5 }, undefined), false);
  pos.delivered(9);
  // Resume accepted: the position stays where delivery stopped.
  assert.equal(pos.subscribed({ epoch: "e1", seq: 30, recovered: true }, { epoch: "e1", seq: 9 }), true);
  assert.equal(pos.seq, 9);
  // Resume refused: start from the relay's current position.
  assert.equal(pos.subscribed({ epoch: "e1", seq: 30, recovered: false }, { epoch: "e1", seq: 9 }), false);
  assert.equal(pos.seq, 30);
  // A new epoch is never a recovery, whatever the flag says.
  assert.equal(pos.subscribed({ epoch: "e2", seq: 3, recovered: true }, { epoch: "e1", seq: 30 }), false);
  assert.deepEqual(pos.since(), { epoch: "e2", seq: 3 });
  // A plain channel forgets positions.
  pos.subscribed({}, undefined);
  assert.equal(pos.since(), undefined);
});

test("frames: non-JSON and non-objects are ignored", () => {
  assert.equal(parseFrame("nope"), undefined);
  assert.equal(parseFrame("[1]"), undefined);
  assert.equal(parseFrame('{"no":"type"}'), undefined);
  assert.equal(parseFrame('{"type":"future","x":1}').type, "future");
});

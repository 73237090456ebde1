// The client's state machine with a fake clock and a fake WebSocket: reconnect and backoff,
// drain turns, close-code handling, tokens, dead links, request queueing, resubscribe, resume.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Client, WsrelayError, LocalClose, webSocketTransport } from "../../dist/esm/index.js";
import { FakeClock, fakeWebSocketClass, fakeJwt, fakeTransports, flush } from "./fakes.mjs";

function setup(opts = {}) {
  const clock = new FakeClock();
  const WS = fakeWebSocketClass();
  const events = [];
  const tokens = [];
  let tokenSeq = 0;
  const getToken =
    opts.getToken === null
      ? undefined
      : opts.getToken ??
        (async () => {
          const t = fakeJwt({ sub: "alice", n: ++tokenSeq, exp: Math.floor(clock.now() / 1000) + (opts.tokenLifetimeS ?? 600) });
          tokens.push(t);
          return t;
        });
  const client = new Client({
    url: "ws://relay.test/ws",
    WebSocket: WS,
    clock,
    random: opts.random ?? (() => 0.5),
    pingIntervalMs: 0, // dead-link detection has its own test
    ...(getToken ? { getToken } : {}),
    ...opts.client,
  });
  for (const name of ["state", "connecting", "connected", "disconnected", "error", "drain", "token", "dropped"])
    client.on(name, (e) => events.push({ name, ...e }));
  const sockets = () => WS.all;
  const last = () => WS.all[WS.all.length - 1];
  const named = (name) => events.filter((e) => e.name === name);
  return { clock, WS, client, events, tokens, sockets, last, named };
}

async function connected(t, welcome) {
  t.client.connect();
  await t.clock.advance(0);
  t.last().accept(welcome);
  await flush();
  assert.equal(t.client.state, "connected");
  return t.last();
}

test("connect: token offered as subprotocol, states connecting -> connected, welcome surfaced", async () => {
  const t = setup();
  t.client.connect();
  assert.equal(t.client.state, "connecting");
  await t.clock.advance(0);
  const ws = t.last();
  assert.deepEqual(ws.protocols, ["wsrelay.v1", "bearer." + t.tokens[0]]);
  assert.equal(ws.url, "ws://relay.test/ws");
  ws.accept({ maxMessageBytes: 1024 });
  assert.equal(t.client.state, "connected");
  const c = t.named("connected")[0];
  assert.deepEqual(
    { transport: c.transport, max: c.maxMessageBytes, reconnected: c.reconnected },
    { transport: "websocket", max: 1024, reconnected: false },
  );
  assert.deepEqual(t.named("state").map((e) => e.state), ["connecting", "connected"]);
});

test("resume: a lost connection is named in ?resume= on the next one, not after the app or the relay ended it", async () => {
  const t = setup();
  await connected(t, { connection: "relay-0/17" });
  assert.equal(t.named("connected")[0].connection, "relay-0/17");
  assert.equal(t.named("connected")[0].resumed, undefined, "no resume was asked");
  t.last().serverClose(1006, "", false);
  await t.clock.advance(t.named("disconnected").at(-1).delayMs);
  assert.equal(t.last().url, "ws://relay.test/ws?resume=relay-0%2F17");
  t.last().accept({ connection: "relay-1/3", resumed: true });
  assert.deepEqual(
    { connection: t.named("connected").at(-1).connection, resumed: t.named("connected").at(-1).resumed },
    { connection: "relay-1/3", resumed: true },
  );
  // The next one names the last welcomed connection, replacing the parameter.
  t.last().serverClose(1012, "restart");
  await t.clock.advance(30000);
  assert.equal(t.last().url, "ws://relay.test/ws?resume=relay-1%2F3");
  t.last().accept({ connection: "relay-1/4", resumed: false });
  // The app disconnects: its next connect() is a new connection.
  t.client.disconnect();
  t.client.connect();
  await t.clock.advance(0);
  assert.equal(t.last().url, "ws://relay.test/ws");
  t.last().accept({ connection: "relay-1/5" });
  // The backend closed it for good (4101): a later connect() is a new connection too.
  t.last().serverClose(4101, "disconnected");
  assert.equal(t.client.state, "disconnected");
  t.client.connect();
  await t.clock.advance(0);
  assert.equal(t.last().url, "ws://relay.test/ws");
});

test("anonymous: no token and no getToken offers only wsrelay.v1", async () => {
  const t = setup({ getToken: null });
  t.client.connect();
  await t.clock.advance(0);
  assert.deepEqual(t.last().protocols, ["wsrelay.v1"]);
});

test("publish: resolved by ok, rejected by error with code and reason", async () => {
  const t = setup();
  const ws = await connected(t);
  const p1 = t.client.publish("chat.1", { hi: 1 });
  const f1 = ws.last("publish");
  assert.deepEqual({ ...f1, id: undefined }, { type: "publish", channel: "chat.1", payload: { hi: 1 }, id: undefined });
  const p2 = t.client.publishText("orders.1", "raw");
  const f2 = ws.last("publish");
  assert.equal(f2.text, "raw");
  assert.notEqual(f1.id, f2.id);
  ws.push({ type: "ok", id: f1.id });
  ws.push({ type: "error", id: f2.id, code: 403, reason: "no binding allows publish on orders.1" });
  assert.deepEqual(await p1, {});
  await assert.rejects(p2, (e) => e instanceof WsrelayError && e.code === 403 && /no binding/.test(e.reason));
});

test("requests: queued while connecting (bounded), flushed on welcome; not_connected when stopped; timeout", async () => {
  const t = setup({ client: { maxQueuedRequests: 2, requestTimeoutMs: 5000 } });
  await assert.rejects(t.client.publish("a", 1), (e) => e.code === "not_connected");
  t.client.connect();
  const q1 = t.client.publish("a", 1);
  const q2 = t.client.publish("a", 2);
  await assert.rejects(t.client.publish("a", 3), (e) => e.code === "queue_full");
  await t.clock.advance(0);
  const ws = t.last();
  assert.equal(ws.sent.length, 0, "nothing sent before welcome");
  ws.accept();
  assert.deepEqual(ws.ofType("publish").map((f) => f.payload), [1, 2]);
  ws.ok("publish");
  ws.push({ type: "ok", id: ws.ofType("publish")[0].id });
  await q1;
  await q2;
  const slow = assert.rejects(t.client.publish("a", 4), (e) => e.code === "timeout");
  await t.clock.advance(5000);
  await slow;
});

test("requests in flight when the connection drops are rejected as disconnected (never resent)", async () => {
  const t = setup();
  const ws = await connected(t);
  const p = t.client.publish("a", 1);
  ws.serverClose(1006, "", false);
  await assert.rejects(p, (e) => e.code === "disconnected");
  await t.clock.advance(30_000);
  t.last().accept();
  assert.equal(t.last().ofType("publish").length, 0);
});

test("too big: a frame above the relay's maxMessageBytes is rejected without being sent", async () => {
  const t = setup();
  const ws = await connected(t, { maxMessageBytes: 100 });
  await assert.rejects(t.client.publish("a", "x".repeat(200)), (e) => e.code === "too_big");
  assert.equal(ws.ofType("publish").length, 0);
});

test("reconnect: full-jitter backoff grows per failed open; a lost welcomed session starts it over", async () => {
  const t = setup({ random: () => 1 }); // always the top of the window
  await connected(t);
  t.last().serverClose(1006, "", false);
  const delays = [t.named("disconnected")[0].delayMs];
  for (let i = 0; i < 6; i++) {
    await t.clock.advance(delays[delays.length - 1]);
    t.last().serverClose(1006, "", false); // refused before the upgrade
    delays.push(t.named("disconnected").at(-1).delayMs);
  }
  assert.deepEqual(delays, [1000, 2000, 4000, 8000, 16000, 20000, 20000]);
  assert.deepEqual(t.named("connecting").map((e) => e.attempt), [0, 0, 1, 2, 3, 4, 5, 6]);
  // After a welcomed session the backoff starts over, even after that long run of failures.
  // Sessions that keep ending within stableConnectionMs (10 s) in a row start one step higher
  // each (the first connection above was the first such session, this is the second)...
  await t.clock.advance(20000);
  t.last().accept();
  await t.clock.advance(5000);
  t.last().serverClose(1011, "internal");
  assert.equal(t.named("disconnected").at(-1).delayMs, 2000);
  assert.equal(t.named("connecting").at(-1).attempt, 1);
  await t.clock.advance(2000);
  t.last().accept();
  await t.clock.advance(100);
  t.last().serverClose(1011, "internal");
  assert.equal(t.named("disconnected").at(-1).delayMs, 4000, "the third short session in a row");
  // ...one that lasted 10 s ends the run: the first step again.
  await t.clock.advance(4000);
  t.last().accept();
  await t.clock.advance(10000);
  t.last().serverClose(1011, "internal");
  assert.equal(t.named("disconnected").at(-1).delayMs, 1000);
  assert.equal(t.named("connecting").at(-1).attempt, 0);
  await t.clock.advance(1000);
  t.last().accept();
  assert.equal(t.named("connected").at(-1).reconnected, true);
  // A short session after a stable one is the first of a new run: the first step too.
  await t.clock.advance(3000);
  t.last().serverClose(1006, "", false);
  assert.equal(t.named("connecting").at(-1).attempt, 0);
});

test("drain: reconnect at the relay's turn (1012), never before it", async () => {
  const t = setup({ random: () => 0.5 });
  const ws = await connected(t);
  ws.push({ type: "drain", reconnectAfterMs: 3000 });
  assert.deepEqual(t.named("drain").map((e) => [e.reconnectAfterMs, e.reason]), [[3000, "shutdown"]]);
  await t.clock.advance(3000);
  ws.serverClose(1012, "service restart");
  const d = t.named("disconnected").at(-1);
  assert.equal(d.code, 1012);
  assert.equal(d.delayMs, 500, "the turn has come: only the client's jitter (0.5 x 1000 ms)");
  assert.equal(t.named("connecting").at(-1).reason, "drain");
  const n = t.sockets().length;
  await t.clock.advance(499);
  assert.equal(t.sockets().length, n);
  await t.clock.advance(1);
  assert.equal(t.sockets().length, n + 1);
});

test("drain: a connection lost before its turn still waits for the turn", async () => {
  const t = setup({ random: () => 0 });
  const ws = await connected(t);
  ws.push({ type: "drain", reconnectAfterMs: 8000 });
  await t.clock.advance(1000);
  ws.serverClose(1006, "", false); // the relay died early
  assert.equal(t.named("disconnected").at(-1).delayMs, 7000);
  const n = t.sockets().length;
  await t.clock.advance(6999);
  assert.equal(t.sockets().length, n, "not before the turn");
  await t.clock.advance(1);
  assert.equal(t.sockets().length, n + 1);
});

test("drain for a rebalance: the reason reaches the app, and the client reconnects (and resumes) at its turn", async () => {
  const t = setup({ random: () => 0 });
  const ws = await connected(t, { connection: "relay-0/5" });
  ws.push({ type: "drain", reconnectAfterMs: 2000, reason: "rebalance" });
  assert.deepEqual(t.named("drain").map((e) => [e.reconnectAfterMs, e.reason]), [[2000, "rebalance"]]);
  await t.clock.advance(2000);
  ws.serverClose(1012, "rebalancing");
  const d = t.named("disconnected").at(-1);
  assert.equal(d.code, 1012);
  const n = t.sockets().length;
  await t.clock.advance(d.delayMs);
  assert.equal(t.sockets().length, n + 1);
  assert.equal(t.last().url, "ws://relay.test/ws?resume=relay-0%2F5", "names the connection it had");
});

test("1008 (token expired): getToken is called again before reconnecting", async () => {
  const t = setup({ client: { refreshToken: false } });
  const ws = await connected(t);
  assert.equal(t.tokens.length, 1);
  ws.serverClose(1008, "token expired");
  await t.clock.advance(t.named("disconnected").at(-1).delayMs);
  assert.equal(t.tokens.length, 2, "a new token even though the old one looks valid locally");
  assert.deepEqual(t.last().protocols, ["wsrelay.v1", "bearer." + t.tokens[1]]);
});

test("expired token: getToken before connecting; without getToken the client stops and reports", async () => {
  const t = setup({ getToken: null, client: { token: fakeJwt({ exp: 1 }) } });
  t.client.connect();
  await t.clock.advance(0);
  assert.equal(t.sockets().length, 0);
  assert.equal(t.client.state, "disconnected");
  assert.equal(t.named("error")[0].kind, "token");

  const t2 = setup({ client: { token: fakeJwt({ exp: 1 }) } });
  await connected(t2);
  assert.equal(t2.tokens.length, 1);
  assert.deepEqual(t2.last().protocols, ["wsrelay.v1", "bearer." + t2.tokens[0]]);
});

test("getToken failing or returning an expired token: reported, retried with backoff", async () => {
  let calls = 0;
  const clockRef = {};
  const t = setup({
    getToken: async () => {
      calls++;
      if (calls === 1) throw new Error("auth server down");
      if (calls === 2) return fakeJwt({ exp: 1 });
      return fakeJwt({ exp: Math.floor(clockRef.c.now() / 1000) + 600 });
    },
  });
  clockRef.c = t.clock;
  t.client.connect();
  await t.clock.advance(0);
  assert.equal(t.named("error").length, 1);
  assert.equal(t.client.state, "connecting");
  await t.clock.advance(t.named("connecting").at(-1).delayMs);
  await t.clock.advance(t.named("connecting").at(-1).delayMs);
  assert.equal(calls, 3);
  assert.equal(t.named("error").length, 2);
  assert.equal(t.sockets().length, 1);
});

test("4403 is terminal: no reconnect until the app calls connect()", async () => {
  const t = setup();
  t.client.connect();
  await t.clock.advance(0);
  t.last().serverClose(4403, "origin not allowed");
  assert.equal(t.client.state, "disconnected");
  assert.equal(t.named("disconnected")[0].willReconnect, false);
  assert.equal(t.named("error")[0].error.code, 4403);
  await t.clock.advance(60000);
  assert.equal(t.sockets().length, 1);
  t.client.connect();
  await t.clock.advance(0);
  assert.equal(t.sockets().length, 2);
});

test("4401: a new token before each retry, stop after maxAuthFailures and report", async () => {
  const t = setup();
  t.client.connect();
  await t.clock.advance(0);
  for (let i = 0; i < 3; i++) {
    t.last().serverClose(4401, "invalid token");
    await t.clock.advance(t.named("disconnected").at(-1).delayMs ?? 0);
  }
  assert.equal(t.tokens.length, 3, "getToken before each try");
  assert.equal(t.sockets().length, 3);
  assert.equal(t.client.state, "disconnected");
  assert.equal(t.named("error").at(-1).error.code, 4401);
});

test("repeated handshake failures (browsers see 1006 for HTTP 401) fetch a new token after every 3rd", async () => {
  const t = setup();
  t.client.connect();
  await t.clock.advance(0);
  for (let i = 0; i < 7; i++) {
    t.last().serverClose(1006, "", false);
    await t.clock.advance(t.named("disconnected").at(-1).delayMs);
  }
  assert.equal(t.sockets().length, 8);
  assert.equal(t.tokens.length, 3, "the first token, then one before the 4th and the 7th tries");
  assert.deepEqual(t.sockets()[3].protocols[1], "bearer." + t.tokens[1]);
  assert.deepEqual(t.sockets()[6].protocols[1], "bearer." + t.tokens[2]);
});

test("4029 (publish flood): a harder first backoff step", async () => {
  const t = setup({ random: () => 1 });
  const ws = await connected(t);
  ws.serverClose(4029, "flood");
  assert.equal(t.named("disconnected").at(-1).delayMs, 8000, "attempt 3: 0.5-8 s");
});

test("dead link: ping after pingIntervalMs of silence, reconnect when nothing comes within pongTimeoutMs", async () => {
  const t = setup({ client: { pingIntervalMs: 1000, pongTimeoutMs: 500 } });
  const ws = await connected(t);
  // Frames keep the link alive without pings.
  for (let i = 0; i < 5; i++) {
    await t.clock.advance(600);
    ws.push({ type: "message", channel: "nobody", payload: 1 });
  }
  assert.equal(ws.ofType("ping").length, 0);
  // Silence: a ping at 1000 ms, answered by a pong: still alive.
  await t.clock.advance(1000);
  assert.equal(ws.ofType("ping").length, 1);
  ws.push({ type: "pong", id: null });
  await t.clock.advance(500);
  assert.equal(t.client.state, "connected");
  // Silence again, no pong: dead at last frame (the pong) + interval + timeout.
  await t.clock.advance(999);
  assert.equal(t.client.state, "connected");
  assert.equal(ws.ofType("ping").length, 2);
  await t.clock.advance(1);
  assert.equal(ws.closedWith.code, LocalClose.DeadLink);
  const d = t.named("disconnected").at(-1);
  assert.equal(d.code, LocalClose.DeadLink);
  assert.equal(d.willReconnect, true);
});

test("connect timeout: no welcome within connectTimeoutMs", async () => {
  const t = setup({ client: { connectTimeoutMs: 2000 } });
  t.client.connect();
  await t.clock.advance(0);
  await t.clock.advance(2000);
  assert.equal(t.last().closedWith.code, LocalClose.ConnectTimeout);
  assert.equal(t.client.state, "connecting");
});

test("in-band refresh: before expiry, a refresh frame with a new token; ok keeps the connection", async () => {
  const t = setup({ tokenLifetimeS: 100 });
  const ws = await connected(t);
  await t.clock.advance(79_999);
  assert.equal(ws.ofType("refresh").length, 0);
  await t.clock.advance(1);
  const r = ws.last("refresh");
  assert.equal(r.token, t.tokens[1]);
  ws.ok("refresh");
  await flush();
  assert.equal(t.named("token").length, 1);
  assert.equal(t.named("token")[0].inBand, true);
  // And again, 80% into the new token's life.
  await t.clock.advance(80_000);
  assert.equal(ws.ofType("refresh").length, 2);
  ws.ok("refresh");
  await flush();
  assert.equal(t.named("token").length, 2);
  assert.equal(t.sockets().length, 1, "one connection throughout");
});

test("in-band refresh refused (400: relay without refresh, 403: other identity): reconnect with the new token", async () => {
  for (const code of [400, 403]) {
    const t = setup({ tokenLifetimeS: 100 });
    const ws = await connected(t);
    await t.clock.advance(80_000);
    const r = ws.last("refresh");
    ws.push({ type: "error", id: r.id, code, reason: "nope" });
    await flush();
    assert.equal(ws.closedWith.code, LocalClose.TokenRefresh);
    assert.equal(t.named("connecting").at(-1).delayMs, 0);
    await t.clock.advance(0);
    assert.deepEqual(t.last().protocols, ["wsrelay.v1", "bearer." + r.token]);
    assert.equal(t.tokens.length, 2, "the refreshed token is used, not another");
  }
});

test("in-band refresh refused with 401: reconnect and ask getToken again", async () => {
  const t = setup({ tokenLifetimeS: 100 });
  const ws = await connected(t);
  await t.clock.advance(80_000);
  ws.push({ type: "error", id: ws.last("refresh").id, code: 401, reason: "invalid token" });
  await flush();
  await t.clock.advance(0);
  assert.equal(t.tokens.length, 3);
  assert.deepEqual(t.last().protocols, ["wsrelay.v1", "bearer." + t.tokens[2]]);
});

test("subscriptions: resubscribed after a reconnect; resubscribed/recovered surfaced", async () => {
  const t = setup();
  const ws = await connected(t);
  const got = [];
  const sub = t.client.subscribe("me.notify", { onMessage: (m) => got.push(m.data) });
  const states = [];
  sub.on("state", (e) => states.push(e.state));
  const subscribed = [];
  sub.on("subscribed", (c) => subscribed.push(c));
  assert.equal(sub.state, "subscribing");
  ws.ok("subscribe");
  assert.equal(sub.state, "subscribed");
  ws.push({ type: "message", channel: "me.notify", payload: { n: 1 } });
  ws.serverClose(1006, "", false);
  assert.equal(sub.state, "subscribing");
  await t.clock.advance(5000);
  const ws2 = t.last();
  ws2.accept();
  assert.equal(ws2.last("subscribe").channel, "me.notify");
  assert.equal(ws2.last("subscribe").since, undefined, "a plain channel has no position");
  ws2.ok("subscribe");
  ws2.push({ type: "message", channel: "me.notify", text: "two" });
  ws2.push({ type: "message", channel: "me.notify", base64: "/wAQ" });
  assert.deepEqual(got.slice(0, 2), [{ n: 1 }, "two"]);
  assert.deepEqual([...got[2]], [0xff, 0x00, 0x10]);
  assert.deepEqual(states, ["subscribed", "subscribing", "subscribed"]);
  assert.deepEqual(subscribed.map((c) => [c.resubscribed, c.recovered, c.resumable]), [
    [false, false, false],
    [true, false, false],
  ]);
  await assert.doesNotReject(sub.ready());
  assert.throws(() => t.client.subscribe("me.notify"), /already subscribed/);
});

test("subscriptions: subscribe refused (403) ends it with the code; 503 retried with backoff", async () => {
  const t = setup();
  const ws = await connected(t);
  const denied = t.client.subscribe("admin.x");
  const ready = denied.ready();
  const f = ws.last("subscribe");
  ws.push({ type: "error", id: f.id, code: 403, reason: "forbidden" });
  await assert.rejects(ready, (e) => e.code === 403);
  assert.equal(denied.state, "unsubscribed");
  assert.equal(t.client.getSubscription("admin.x"), undefined);

  const later = t.client.subscribe("orders.1");
  ws.push({ type: "error", id: ws.last("subscribe").id, code: 503, reason: "NATS unavailable" });
  assert.equal(later.state, "subscribing");
  const before = ws.ofType("subscribe").length;
  await t.clock.advance(1000);
  assert.equal(ws.ofType("subscribe").length, before + 1);
  ws.ok("subscribe");
  assert.equal(later.state, "subscribed");
});

test("subscriptions: unsubscribe sends unsubscribe and stops delivery", async () => {
  const t = setup();
  const ws = await connected(t);
  const got = [];
  const sub = t.client.subscribe("a.b", { onMessage: (m) => got.push(m.data) });
  ws.ok("subscribe");
  sub.unsubscribe();
  assert.equal(ws.last("unsubscribe").channel, "a.b");
  ws.ok("unsubscribe");
  ws.push({ type: "message", channel: "a.b", payload: 1 });
  assert.deepEqual(got, []);
  assert.equal(sub.state, "unsubscribed");
  // The channel can be subscribed again.
  t.client.subscribe("a.b");
});

test("relay-ended subscriptions: 'unavailable' resubscribes with backoff, other reasons end it", async () => {
  const t = setup();
  const ws = await connected(t);
  const a = t.client.subscribe("a");
  ws.ok("subscribe");
  const b = t.client.subscribe("b");
  ws.ok("subscribe");
  const ended = [];
  b.on("unsubscribed", (c) => ended.push(c));
  ws.push({ type: "unsubscribed", channel: "a", reason: "unavailable" });
  ws.push({ type: "unsubscribed", channel: "b", reason: "binding removed" });
  assert.equal(a.state, "subscribing");
  assert.equal(b.state, "unsubscribed");
  assert.deepEqual(ended, [{ reason: "binding removed", byRelay: true }]);
  await t.clock.advance(1000);
  assert.equal(ws.last("subscribe").channel, "a");
  ws.ok("subscribe");
  assert.equal(a.state, "subscribed");
});

test("server-side subscriptions: surfaced as a Subscription, never sent or resubscribed by the client, given again after a reconnect", async () => {
  const t = setup();
  const ws = await connected(t);
  const seen = [];
  const got = [];
  t.client.on("subscribed", (e) => {
    seen.push({ channel: e.channel, byServer: e.byServer, resubscribed: e.resubscribed, state: e.subscription.state });
    if (!e.resubscribed) e.subscription.on("message", (m) => got.push(m.data));
  });
  ws.push({ type: "subscribed", channel: "users.42.feed", byServer: true });
  const sub = t.client.getSubscription("users.42.feed");
  assert.ok(sub && sub.byServer);
  assert.equal(sub.state, "subscribed");
  ws.push({ type: "message", channel: "users.42.feed", payload: 1 });
  assert.deepEqual(got, [1]);
  assert.equal(ws.ofType("subscribe").length, 0, "the client never sends a subscribe for it");
  // The app cannot end it, nor subscribe to it a second time.
  assert.throws(() => sub.unsubscribe(), /server-side subscription/);
  assert.equal(ws.ofType("unsubscribe").length, 0);
  assert.throws(() => t.client.subscribe("users.42.feed"), /already subscribed/);
  // A reconnect: no subscribe sent; the welcome names it, its subscribed frame brings it back.
  const states = [];
  sub.on("state", (e) => states.push(e.state));
  ws.serverClose(1006, "", false);
  await t.clock.advance(5000);
  const ws2 = t.last();
  ws2.accept({ serverChannels: ["users.42.feed"] });
  assert.equal(sub.state, "subscribing");
  assert.equal(ws2.ofType("subscribe").length, 0, "not resubscribed by the client");
  ws2.push({ type: "subscribed", channel: "users.42.feed", byServer: true });
  ws2.push({ type: "message", channel: "users.42.feed", payload: 2 });
  assert.equal(t.client.getSubscription("users.42.feed"), sub, "the same Subscription");
  assert.deepEqual(got, [1, 2]);
  assert.deepEqual(states, ["subscribing", "subscribed"]);
  assert.deepEqual(seen, [
    { channel: "users.42.feed", byServer: true, resubscribed: false, state: "subscribed" },
    { channel: "users.42.feed", byServer: true, resubscribed: true, state: "subscribed" },
  ]);
  // The backend ends it: unsubscribed, reason server.
  const ended = [];
  sub.on("unsubscribed", (c) => ended.push(c));
  ws2.push({ type: "unsubscribed", channel: "users.42.feed", reason: "server" });
  assert.deepEqual(ended, [{ reason: "server", byRelay: true }]);
  assert.equal(t.client.getSubscription("users.42.feed"), undefined);
});

test("server-side subscriptions: ended while away (not in the welcome); one of the app's taken over; a relay's end not retried", async () => {
  const t = setup();
  const ws = await connected(t);
  // The app's own subscription, taken over by the backend: the same Subscription, byServer now.
  const own = t.client.subscribe("rooms.1");
  ws.ok("subscribe");
  ws.push({ type: "subscribed", channel: "rooms.1", byServer: true });
  assert.equal(t.client.getSubscription("rooms.1"), own);
  assert.ok(own.byServer);
  ws.push({ type: "subscribed", channel: "feed", byServer: true, epoch: "E", seq: 4 });
  const feed = t.client.getSubscription("feed");
  assert.deepEqual(feed.position, { epoch: "E", seq: 4 });
  const ended = [];
  own.on("unsubscribed", (c) => ended.push(["rooms.1", c.reason]));
  feed.on("unsubscribed", (c) => ended.push(["feed", c.reason]));
  // The relay lost its NATS subscription: a server-side one is not the client's to retry.
  ws.push({ type: "unsubscribed", channel: "rooms.1", reason: "unavailable" });
  await t.clock.advance(5000);
  assert.equal(ws.ofType("subscribe").length, 1, "only the app's first subscribe");
  assert.deepEqual(ended, [["rooms.1", "unavailable"]]);
  // The backend ended "feed" while the client was away: the next welcome does not name it.
  ws.serverClose(1006, "", false);
  await t.clock.advance(5000);
  t.last().accept();
  assert.deepEqual(ended, [["rooms.1", "unavailable"], ["feed", "server"]]);
  assert.equal(t.client.getSubscription("feed"), undefined);
  assert.equal(t.last().ofType("subscribe").length, 0);
});

test("dropped: surfaced on the client and, when named, on the subscription", async () => {
  const t = setup();
  const ws = await connected(t);
  const sub = t.client.subscribe("c");
  ws.ok("subscribe");
  const d = [];
  sub.on("dropped", (e) => d.push(e.count));
  ws.push({ type: "dropped", count: 3, channel: "c" });
  ws.push({ type: "dropped", count: 2 });
  assert.deepEqual(d, [3]);
  assert.deepEqual(t.named("dropped").map((e) => e.count), [3, 2]);
});

test("resume: since sent on resubscribe, recovered surfaced, replayed duplicates dropped", async () => {
  const t = setup();
  const ws = await connected(t);
  const got = [];
  const ctxs = [];
  const sub = t.client.subscribe("orders.7", { onMessage: (m) => got.push(m.seq), onSubscribed: (c) => ctxs.push(c) });
  assert.equal(ws.last("subscribe").since, undefined);
  ws.ok("subscribe", { epoch: "E", seq: 100 });
  ws.push({ type: "message", channel: "orders.7", payload: 1, seq: 105, prev: 100 });
  ws.push({ type: "message", channel: "orders.7", payload: 2, seq: 109, prev: 105 });
  ws.serverClose(1006, "", false);
  await t.clock.advance(5000);
  const ws2 = t.last();
  ws2.accept();
  assert.deepEqual(ws2.last("subscribe").since, { epoch: "E", seq: 109 });
  ws2.ok("subscribe", { epoch: "E", seq: 120, recovered: true });
  // The replay overlaps what was delivered: 109 must not come twice.
  ws2.push({ type: "message", channel: "orders.7", payload: 2, seq: 109, prev: 105 });
  ws2.push({ type: "message", channel: "orders.7", payload: 3, seq: 115, prev: 109 });
  ws2.push({ type: "message", channel: "orders.7", payload: 4, seq: 120, prev: 115 });
  ws2.push({ type: "message", channel: "orders.7", payload: 4, seq: 120, prev: 115 });
  assert.deepEqual(got, [105, 109, 115, 120]);
  assert.equal(sub.duplicatesDropped, 2);
  assert.deepEqual(sub.position, { epoch: "E", seq: 120 });
  assert.deepEqual(ctxs.map((c) => [c.resumable, c.recovering, c.recovered, c.resubscribed, c.seq]), [
    [true, false, false, false, 100],
    [true, true, true, true, 109],
  ]);
  // Not recovered (position too old, or a new epoch): surfaced, position moves to the relay's.
  ws2.serverClose(1006, "", false);
  await t.clock.advance(5000);
  const ws3 = t.last();
  ws3.accept();
  ws3.ok("subscribe", { epoch: "F", seq: 3, recovered: false });
  assert.deepEqual([ctxs.at(-1).recovered, ctxs.at(-1).epoch, ctxs.at(-1).seq], [false, "F", 3]);
});

test("resume: a relay that refuses since (400) gets a plain subscribe; a gap triggers a resync", async () => {
  const t = setup();
  const ws = await connected(t);
  const got = [];
  const sub = t.client.subscribe("o", { since: { epoch: "E", seq: 5 }, onMessage: (m) => got.push(m.seq) });
  const f = ws.last("subscribe");
  assert.deepEqual(f.since, { epoch: "E", seq: 5 });
  ws.push({ type: "error", id: f.id, code: 400, reason: "unknown field `since`" });
  assert.equal(ws.last("subscribe").since, undefined);
  ws.ok("subscribe", { epoch: "E", seq: 10 });
  ws.push({ type: "message", channel: "o", payload: 0, seq: 11, prev: 10 });
  // prev 14 was never seen: resync from 11 (unsubscribe, subscribe since).
  ws.push({ type: "message", channel: "o", payload: 0, seq: 15, prev: 14 });
  assert.equal(sub.state, "subscribing");
  assert.equal(ws.last("unsubscribe").channel, "o");
  assert.deepEqual(ws.last("subscribe").since, { epoch: "E", seq: 11 });
  ws.ok("unsubscribe");
  ws.ok("subscribe", { epoch: "E", seq: 15, recovered: true });
  ws.push({ type: "message", channel: "o", payload: 0, seq: 14, prev: 11 });
  ws.push({ type: "message", channel: "o", payload: 0, seq: 15, prev: 14 });
  assert.deepEqual(got, [11, 14, 15]);
});

test("disconnect(): closes with 1000, no reconnect, queued requests rejected; connect() resubscribes", async () => {
  const t = setup();
  const ws = await connected(t);
  t.client.subscribe("x");
  ws.ok("subscribe");
  t.client.disconnect();
  assert.equal(ws.closedWith.code, 1000);
  assert.equal(t.client.state, "disconnected");
  assert.equal(t.named("disconnected").at(-1).willReconnect, false);
  await t.clock.advance(60000);
  assert.equal(t.sockets().length, 1);
  t.client.connect();
  await t.clock.advance(0);
  t.last().accept();
  assert.equal(t.last().last("subscribe").channel, "x");
});

test("a frame type the SDK does not know is ignored", async () => {
  const t = setup();
  const ws = await connected(t);
  ws.push({ type: "presence", who: ["a"] });
  ws.onmessage({ data: "not json" });
  assert.equal(t.client.state, "connected");
  assert.equal(t.named("error").length, 0);
});

// ---- the transport fallback (issue 22, item 13) -------------------------------------------

/** A client on the two fake transports; `fail()` fails the open in progress (1006). */
function setupFallback() {
  const f = fakeTransports(webSocketTransport);
  const t = setup({ random: () => 1, client: { transports: f.transports } });
  const lastOf = (C) => C.all[C.all.length - 1];
  const current = () => (f.opened.at(-1) === "sse" ? lastOf(f.SSE) : lastOf(f.WS));
  return { ...t, ...f, current, fail: () => current().serverClose(1006, "", false) };
}

test("fallback: a relay that is down fails the SSE probe too: back to WebSocket, never stuck on SSE", async () => {
  const t = setupFallback();
  t.client.connect();
  await t.clock.advance(0);
  t.current().accept();
  t.current().serverClose(1006, "", false); // the relay went away
  // Down: every open fails. After 2 WebSocket failures SSE is tried at once; it fails too.
  for (let i = 0; i < 9; i++) {
    await t.clock.advance(t.named("disconnected").at(-1).delayMs);
    t.fail();
  }
  assert.deepEqual(t.opened, ["websocket", "websocket", "websocket", "sse", "websocket", "websocket", "sse", "websocket", "websocket", "sse"]);
  const ds = t.named("disconnected");
  assert.deepEqual(
    ds.slice(2, 4).map((d) => d.delayMs),
    [0, 4000],
    "the probe at once; after its failure the backoff goes on from the step of the failure that triggered it",
  );
  assert.deepEqual(t.named("connecting").filter((c) => c.reason === "fallback").length, 3);
  // Up again: the next open is a WebSocket one.
  await t.clock.advance(ds.at(-1).delayMs);
  assert.equal(t.opened.at(-1), "websocket");
  t.current().accept();
  assert.equal(t.named("connected").at(-1).transport, "websocket");
  assert.equal(t.client.transport, "websocket");
});

test("fallback: SSE used only where it works and WebSocket fails; a lost session tries WebSocket first", async () => {
  const t = setupFallback();
  t.client.connect();
  await t.clock.advance(0);
  t.fail(); // WebSocket blocked...
  await t.clock.advance(t.named("disconnected").at(-1).delayMs);
  t.fail();
  await t.clock.advance(0); // ...SSE at once, and it works
  assert.deepEqual(t.opened, ["websocket", "websocket", "sse"]);
  t.current().accept();
  assert.equal(t.named("connected").at(-1).transport, "sse");
  // The session ends (drain, restart, a POST that reached another pod): WebSocket first,
  // one try only now that SSE has worked where it failed, then SSE at once.
  await t.clock.advance(60_000);
  t.current().serverClose(1012, "service restart");
  await t.clock.advance(t.named("disconnected").at(-1).delayMs);
  assert.equal(t.opened.at(-1), "websocket");
  t.fail();
  assert.equal(t.named("disconnected").at(-1).delayMs, 0);
  await t.clock.advance(0);
  assert.equal(t.opened.at(-1), "sse");
  t.current().accept();
  // WebSocket unblocked: after the next lost session it is used again, and the fallback needs
  // two WebSocket failures again.
  await t.clock.advance(60_000);
  t.current().serverClose(1006, "", false);
  await t.clock.advance(t.named("disconnected").at(-1).delayMs);
  assert.equal(t.opened.at(-1), "websocket");
  t.current().accept();
  assert.equal(t.named("connected").at(-1).transport, "websocket");
  await t.clock.advance(60_000);
  t.current().serverClose(1006, "", false);
  await t.clock.advance(t.named("disconnected").at(-1).delayMs);
  t.fail();
  await t.clock.advance(t.named("disconnected").at(-1).delayMs);
  assert.deepEqual(t.opened.slice(-2), ["websocket", "websocket"]);
  assert.equal(t.named("connected").length, 3);
});

test("fallback: a relay refusal over WebSocket (4401) is not a failed open of the transport", async () => {
  const t = setupFallback();
  t.client.connect();
  await t.clock.advance(0);
  for (let i = 0; i < 2; i++) {
    t.current().serverClose(4401, "invalid token");
    await t.clock.advance(t.named("disconnected").at(-1).delayMs);
  }
  assert.deepEqual(t.opened, ["websocket", "websocket", "websocket"]);
});

test("a WebSocket constructor that throws: error, then disconnected (1006, willReconnect), like any failed connection", async () => {
  let calls = 0;
  const Throwing = function () {
    calls++;
    throw new Error("blocked by policy");
  };
  const t = setup({ client: { WebSocket: Throwing } });
  t.client.connect();
  await t.clock.advance(0);
  assert.equal(calls, 1);
  const [e] = t.named("error");
  assert.equal(e.kind, "transport");
  assert.match(e.error.reason, /websocket unavailable: Error: blocked by policy/);
  const ds = t.named("disconnected");
  assert.equal(ds.length, 1, "disconnected fires for the failed connection");
  assert.deepEqual(
    { code: ds[0].code, wasClean: ds[0].wasClean, willReconnect: ds[0].willReconnect, delayMs: ds[0].delayMs },
    { code: 1006, wasClean: false, willReconnect: true, delayMs: 750 },
  );
  assert.match(ds[0].reason, /blocked by policy/);
  assert.ok(t.events.indexOf(e) < t.events.indexOf(ds[0]), "error first, then disconnected");
  assert.equal(t.client.state, "connecting");
  await t.clock.advance(750);
  assert.equal(calls, 2);
  assert.equal(t.named("disconnected").length, 2);
});

// ---- subscription tokens, backend data, appCode (issue 25) --------------------------------

/** A client with getSubscriptionToken; `subTokens` records each token it handed out. */
function setupSubTokens(opts = {}) {
  const subTokens = [];
  let n = 0;
  const t = setup({
    ...opts,
    client: {
      getSubscriptionToken: async (channel) => {
        if (opts.failSubToken?.(channel)) throw new Error("token endpoint down");
        const claims = { sub: "alice", channel, n: ++n, exp: Math.floor(t.clock.now() / 1000) + (opts.subTokenLifetimeS ?? 100) };
        const tok = fakeJwt(claims);
        subTokens.push({ channel, token: tok, claims });
        return tok;
      },
      ...opts.client,
    },
  });
  t.subTokens = subTokens;
  return t;
}

test("subscription token: fetched per channel and sent with subscribe; a subscription's own getToken or token wins", async () => {
  const t = setupSubTokens();
  const ws = await connected(t);
  t.client.subscribe("orders.42");
  assert.equal(ws.ofType("subscribe").length, 0, "not before the token is there");
  await flush();
  const f = ws.last("subscribe");
  assert.deepEqual({ channel: f.channel, token: f.token }, { channel: "orders.42", token: t.subTokens[0].token });
  assert.equal(t.subTokens[0].channel, "orders.42");

  const own = [];
  t.client.subscribe("rooms.7", { getToken: async (ch) => (own.push(ch), fakeJwt({ sub: "alice", channel: ch, exp: 2e9 })) });
  t.client.subscribe("me.notify", { getToken: async () => null }); // a binding without authorize.token
  const given = fakeJwt({ sub: "alice", channel: "feed.1", exp: 2e9 });
  t.client.subscribe("feed.1", { token: given });
  await flush();
  assert.deepEqual(own, ["rooms.7"]);
  const byChannel = Object.fromEntries(ws.ofType("subscribe").map((s) => [s.channel, s.token]));
  assert.equal(byChannel["rooms.7"], fakeJwt({ sub: "alice", channel: "rooms.7", exp: 2e9 }));
  assert.equal("me.notify" in byChannel && byChannel["me.notify"], undefined, "null: no token field");
  assert.equal(byChannel["feed.1"], given, "a valid given token is used without asking");
  assert.equal(t.subTokens.length, 1, "the client-level function only for the subscription without its own");
});

test("subscription token: refreshed with subrefresh on the connection token's schedule; token event; and again", async () => {
  const t = setupSubTokens({ tokenLifetimeS: 10_000, subTokenLifetimeS: 100 });
  const ws = await connected(t);
  const sub = t.client.subscribe("orders.42");
  await flush();
  ws.ok("subscribe");
  const tokenEvents = [];
  sub.on("token", (e) => tokenEvents.push(e));
  // refreshDelayMs: 80% of 100 s.
  await t.clock.advance(79_999);
  assert.equal(ws.ofType("subrefresh").length, 0);
  await t.clock.advance(1);
  const r = ws.last("subrefresh");
  assert.deepEqual({ channel: r.channel, token: r.token }, { channel: "orders.42", token: t.subTokens[1].token });
  assert.equal(typeof r.id, "number");
  ws.ok("subrefresh");
  await flush();
  assert.deepEqual(tokenEvents, [{ expiresAt: t.subTokens[1].claims.exp * 1000 }]);
  await t.clock.advance(80_000);
  assert.equal(ws.ofType("subrefresh").length, 2);
  assert.equal(ws.last("subrefresh").token, t.subTokens[2].token);
  ws.ok("subrefresh");
  await flush();
  assert.equal(tokenEvents.length, 2);
  assert.equal(ws.ofType("subscribe").length, 1, "one subscribe throughout");
  assert.equal(sub.state, "subscribed");
  assert.equal(ws.ofType("refresh").length, 0, "the connection token is not refreshed for it");
});

test("subscription token: resubscribe after a reconnect reuses a valid token, asks anew for one about to expire", async () => {
  const t = setupSubTokens({ tokenLifetimeS: 10_000, subTokenLifetimeS: 100 });
  const ws = await connected(t);
  t.client.subscribe("orders.42");
  await flush();
  ws.ok("subscribe");
  ws.serverClose(1006, "", false);
  await t.clock.advance(t.named("disconnected").at(-1).delayMs);
  const ws2 = t.last();
  ws2.accept();
  await flush();
  assert.equal(ws2.last("subscribe").token, t.subTokens[0].token, "still valid: no token request per subscription on a fleet restart");
  assert.equal(t.subTokens.length, 1);
  ws2.ok("subscribe");
  // 96 s into its life (4 s left, below tokenMinValidityMs) the connection drops just before
  // the subrefresh would have run: the resubscribe asks for a new token.
  await t.clock.advance(79_000 - t.named("disconnected").at(-1).delayMs);
  ws2.serverClose(1006, "", false);
  await t.clock.advance(17_000);
  t.last().accept();
  await flush();
  assert.equal(t.subTokens.length, 2);
  assert.equal(t.last().last("subscribe").token, t.subTokens[1].token);
});

test("unsubscribed 'expired': a new token and a subscribe again, resuming from the last position", async () => {
  const t = setupSubTokens({ client: { refreshToken: false } });
  const ws = await connected(t);
  const sub = t.client.subscribe("feed.1");
  const reasons = [];
  sub.on("subscribing", (e) => reasons.push(e.reason));
  const subscribed = [];
  sub.on("subscribed", (c) => subscribed.push(c));
  await flush();
  ws.ok("subscribe", { epoch: "e1", seq: 10 });
  ws.push({ type: "message", channel: "feed.1", payload: 1, seq: 11, prev: 10 });
  ws.push({ type: "unsubscribed", channel: "feed.1", reason: "expired" });
  assert.equal(sub.state, "subscribing");
  await flush();
  const again = ws.last("subscribe");
  assert.equal(ws.ofType("subscribe").length, 2);
  assert.equal(again.token, t.subTokens[1].token, "a new token, not the expired one");
  assert.deepEqual(again.since, { epoch: "e1", seq: 11 });
  ws.ok("subscribe", { epoch: "e1", seq: 11, recovered: true });
  assert.deepEqual(reasons, ["expired"], "(the first, \"subscribe\", came before the listener)");
  assert.deepEqual(subscribed.map((c) => [c.resubscribed, c.recovered]), [[false, false], [true, true]]);
  assert.equal(ws.ofType("subrefresh").length, 0, "refreshToken: false");
});

test("'expired' with a token that cannot be had: retried with backoff, at most maxAuthFailures, then ended", async () => {
  let down = false;
  const t = setupSubTokens({ failSubToken: () => down, random: () => 1 });
  const ws = await connected(t);
  const sub = t.client.subscribe("orders.42");
  const errors = [];
  sub.on("error", (e) => errors.push(e.reason));
  const ended = [];
  sub.on("unsubscribed", (e) => ended.push(e));
  await flush();
  ws.ok("subscribe");
  down = true;
  ws.push({ type: "unsubscribed", channel: "orders.42", reason: "expired" });
  await flush();
  assert.equal(errors.length, 1);
  assert.match(errors[0], /getSubscriptionToken\(orders\.42\) failed: Error: token endpoint down/);
  assert.equal(sub.state, "subscribing");
  // Backoff (random 1: the top of the window): 1 s, then 2 s; the third failure ends it.
  await t.clock.advance(999);
  assert.equal(errors.length, 1);
  await t.clock.advance(1);
  assert.equal(errors.length, 2);
  await t.clock.advance(2000);
  assert.equal(errors.length, 3);
  assert.equal(sub.state, "unsubscribed");
  assert.equal(ended.length, 1);
  assert.equal(ended[0].byRelay, false);
  assert.match(ended[0].reason, /token endpoint down/);
  assert.equal(t.client.getSubscription("orders.42"), undefined);
  assert.equal(ws.ofType("subscribe").length, 1, "nothing sent without a token");
  await t.clock.advance(60_000);
  assert.equal(errors.length, 3, "no retry after it ended");
});

test("subscribe refused with 401: a new token and a retry; one that works resets the count", async () => {
  const t = setupSubTokens({ random: () => 0 });
  const ws = await connected(t);
  const sub = t.client.subscribe("orders.42");
  await flush();
  ws.push({ type: "error", id: ws.last("subscribe").id, code: 401, reason: "invalid subscription token" });
  assert.equal(sub.state, "subscribing");
  await t.clock.advance(500);
  assert.equal(ws.ofType("subscribe").length, 2);
  assert.equal(ws.last("subscribe").token, t.subTokens[1].token);
  ws.ok("subscribe");
  assert.equal(sub.state, "subscribed");
});

test("subscribe refused with 403 by a backend (appCode): ended with code and appCode; 'forbidden' ends a live one", async () => {
  const t = setupSubTokens();
  const ws = await connected(t);
  const denied = t.client.subscribe("orders.43");
  const ready = denied.ready();
  const ended = [];
  denied.on("unsubscribed", (e) => ended.push(e));
  await flush();
  ws.push({ type: "error", id: ws.last("subscribe").id, code: 403, reason: "not your order", appCode: 4040 });
  await assert.rejects(ready, (e) => e instanceof WsrelayError && e.code === 403 && e.appCode === 4040 && e.reason === "not your order");
  assert.deepEqual(ended, [{ reason: "not your order", code: 403, appCode: 4040, byRelay: true }]);
  assert.equal(t.named("error").at(-1).error.appCode, 4040);

  const live = t.client.subscribe("orders.42");
  await flush();
  ws.ok("subscribe");
  const liveEnded = [];
  live.on("unsubscribed", (e) => liveEnded.push(e));
  ws.push({ type: "unsubscribed", channel: "orders.42", reason: "forbidden" });
  assert.deepEqual(liveEnded, [{ reason: "forbidden", byRelay: true }]);
  assert.equal(live.state, "unsubscribed");
  await t.clock.advance(200_000);
  assert.equal(ws.ofType("subrefresh").length, 0, "no subrefresh for an ended subscription");
  assert.equal(ws.ofType("subscribe").length, 2, "and no subscribe again");
});

test("subrefresh refused: reported (kind subrefresh); the subscription runs on; getSubscriptionToken failures retried while time is left", async () => {
  let down = false;
  const t = setupSubTokens({ tokenLifetimeS: 10_000, subTokenLifetimeS: 100, failSubToken: () => down });
  const ws = await connected(t);
  const sub = t.client.subscribe("orders.42");
  await flush();
  ws.ok("subscribe");
  await t.clock.advance(80_000);
  ws.push({ type: "error", id: ws.last("subrefresh").id, code: 401, reason: "invalid subscription token" });
  await flush();
  const e = t.named("error").at(-1);
  assert.deepEqual([e.kind, e.error.code], ["subrefresh", 401]);
  assert.equal(sub.state, "subscribed");
  assert.equal(t.client.state, "connected", "a refused subscription token does not touch the connection");

  // A new subscription whose token source fails at refresh time: retried (min(5 s, half the
  // time left)), and once it works the subrefresh goes out.
  const other = t.client.subscribe("orders.44");
  await flush();
  ws.ok("subscribe");
  down = true;
  await t.clock.advance(80_000);
  assert.equal(t.named("error").at(-1).kind, "subrefresh");
  assert.match(t.named("error").at(-1).error.reason, /token endpoint down/);
  const before = ws.ofType("subrefresh").length;
  down = false;
  await t.clock.advance(5_000);
  assert.equal(ws.ofType("subrefresh").length, before + 1);
  assert.equal(ws.last("subrefresh").channel, "orders.44");
  assert.equal(other.state, "subscribed");
});

test("a token that arrives after its subscription ended or its connection closed is not used", async () => {
  let release;
  const t = setup({
    client: { getSubscriptionToken: () => new Promise((r) => (release = r)) },
  });
  const ws = await connected(t);
  const sub = t.client.subscribe("orders.42");
  await flush();
  sub.unsubscribe();
  release(fakeJwt({ sub: "alice", channel: "orders.42", exp: 2e9 }));
  await flush();
  assert.equal(ws.ofType("subscribe").length, 0);
  assert.equal(ws.ofType("unsubscribe").length, 0, "nothing to unsubscribe: no subscribe went out");

  t.client.subscribe("orders.43");
  await flush();
  ws.serverClose(1006, "", false);
  release(fakeJwt({ sub: "alice", channel: "orders.43", exp: 2e9 }));
  await flush();
  assert.equal(ws.ofType("subscribe").length, 0, "not on the old connection");
});

test("backend data: welcome.data in connected and client.server, the subscribe ok's data in subscribed; publish token and appCode", async () => {
  const t = setup();
  const ws = await connected(t, { data: { plan: "pro" } });
  assert.deepEqual(t.named("connected")[0].data, { plan: "pro" });
  assert.deepEqual(t.client.server.data, { plan: "pro" });
  const sub = t.client.subscribe("orders.42");
  ws.ok("subscribe", { data: { status: "shipped" } });
  assert.deepEqual((await sub.ready()).data, { status: "shipped" });
  const plain = t.client.subscribe("me.notify");
  ws.ok("subscribe");
  assert.equal("data" in (await plain.ready()), false);

  const p = t.client.publish("orders.42", { x: 1 }, { token: "sub.tok.en" });
  assert.equal(ws.last("publish").token, "sub.tok.en");
  ws.push({ type: "error", id: ws.last("publish").id, code: 403, reason: "order closed", appCode: 4009 });
  await assert.rejects(p, (e) => e.code === 403 && e.appCode === 4009);
  const q = t.client.publishText("chat.1", "hi");
  assert.equal("token" in ws.last("publish"), false);
  ws.push({ type: "error", id: ws.last("publish").id, code: 403, reason: "no binding" });
  await assert.rejects(q, (e) => e.code === 403 && e.appCode === undefined);
});

test("refresh failures, connection and subscription alike: a throwing function is retried while time is left; a token that expires no later is not sent", async () => {
  // Connection token, 100 s: refresh at 80 s; getToken throws; retried at min(5 s, left / 2).
  let mode = "ok";
  let n = 0;
  const t = setup({
    getToken: async () => {
      if (mode === "throw" && n > 0) throw new Error("idp down");
      const exp = mode === "same" ? first : Math.floor(t.clock.now() / 1000) + 100;
      n++;
      return fakeJwt({ sub: "alice", n, exp });
    },
  });
  const first = Math.floor(t.clock.now() / 1000) + 100;
  const ws = await connected(t);
  mode = "throw";
  await t.clock.advance(80_000);
  let e = t.named("error").at(-1);
  assert.deepEqual([e.kind, e.error.code], ["refresh", "token"]);
  assert.match(e.error.reason, /getToken failed: Error: idp down/);
  assert.equal(ws.ofType("refresh").length, 0);
  mode = "same"; // a token with the same exp: nothing newer
  await t.clock.advance(5_000);
  e = t.named("error").at(-1);
  assert.match(e.error.reason, /getToken returned no token that expires later than the current one/);
  assert.equal(ws.ofType("refresh").length, 0, "not sent");
  assert.equal(t.named("error").length, 2);
  assert.equal(t.client.state, "connected");

  // The same two outcomes for a subscription token, by the same code.
  let subMode = "ok";
  let subFirst;
  let subN = 0;
  const s = setup({ tokenLifetimeS: 10_000 });
  const sws = await connected(s);
  s.client.subscribe("orders.42", {
    getToken: async (channel) => {
      if (subMode === "throw") throw new Error("down");
      const exp = subMode === "same" ? subFirst : Math.floor(s.clock.now() / 1000) + 100;
      subFirst ??= exp;
      return fakeJwt({ sub: "alice", channel, exp, n: ++subN });
    },
  });
  await flush();
  sws.ok("subscribe");
  subMode = "throw";
  await s.clock.advance(80_000);
  assert.match(s.named("error").at(-1).error.reason, /getSubscriptionToken\(orders\.42\) failed: Error: down/);
  subMode = "same";
  await s.clock.advance(5_000);
  assert.match(s.named("error").at(-1).error.reason, /getSubscriptionToken\(orders\.42\) returned no token that expires later/);
  assert.deepEqual(s.named("error").map((x) => x.kind), ["subrefresh", "subrefresh"]);
  assert.equal(sws.ofType("subrefresh").length, 0);
});

test("refreshTokenNow(): sends a new token even when it expires no later (new claims); not the same token again", async () => {
  let claims = { rooms: ["1", "2"] };
  const exp = Math.floor(Date.now() / 1000) + 600; // every token: the same exp
  const t = setup({ getToken: async () => fakeJwt({ sub: "alice", exp, ...claims }) });
  const ws = await connected(t);
  claims = { rooms: ["1"] };
  const p = t.client.refreshTokenNow();
  await flush();
  const r = ws.last("refresh");
  assert.ok(r, "sent: the app asked for it (the relay re-checks subscriptions under the new claims)");
  assert.equal(r.token, fakeJwt({ sub: "alice", exp, rooms: ["1"] }));
  ws.ok("refresh");
  await p;
  assert.equal(t.named("token").length, 1);
  // The same token again: nothing to send.
  await assert.rejects(t.client.refreshTokenNow(), (e) => e.code === "token" && /no new token/.test(e.reason));
  assert.equal(ws.ofType("refresh").length, 1);
});

test("4503 (storm control, capacity, draining): never back before the relay's Retry-After (1 s), then the jittered backoff on top", async () => {
  // random 0: the backoff's own draw is its floor (500 ms), so the delay shows the 1 s added.
  const t = setup({ random: () => 0 });
  const ws = await connected(t);
  // A welcomed connection lost: the first try goes out after the usual first step.
  ws.serverClose(1006, "", false);
  await t.clock.advance(t.named("disconnected").at(-1).delayMs);
  // The neighbour refuses it after the upgrade: storm control's 4503 (no welcome).
  const delays = [];
  for (let i = 0; i < 4; i++) {
    t.last().serverClose(4503, "too many new connections, retry later");
    const d = t.named("disconnected").at(-1);
    assert.equal(d.code, 4503);
    assert.equal(d.willReconnect, true);
    delays.push(d.delayMs);
    // Not a moment before the delay.
    const before = t.sockets().length;
    await t.clock.advance(d.delayMs - 1);
    assert.equal(t.sockets().length, before, "no try before the delay");
    await t.clock.advance(1);
    assert.equal(t.sockets().length, before + 1);
  }
  assert.deepEqual(delays, [1500, 1500, 1500, 1500], "1 s + the backoff's floor");
  // The reason text does not change the delay: any 4503 waits the same.
  const u = setup({ random: () => 1 });
  await connected(u);
  u.last().serverClose(1006, "", false);
  await u.clock.advance(u.named("disconnected").at(-1).delayMs);
  const windows = [];
  for (const reason of ["too many new connections, retry later", "relay at capacity, retry later", "", "relay draining, retry later"]) {
    u.last().serverClose(4503, reason);
    windows.push(u.named("disconnected").at(-1).delayMs);
    await u.clock.advance(windows.at(-1));
  }
  assert.deepEqual(windows, [1000 + 2000, 1000 + 4000, 1000 + 8000, 1000 + 16000], "the backoff grows under the floor");
});

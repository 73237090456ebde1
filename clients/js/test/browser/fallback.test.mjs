// In headless Chromium against a real relay and nats-server: refusals the page can read
// (`auth.refuseAfterUpgrade`: 4401 with its reason, then getToken; 4403 stops), the SSE +
// POST fallback when the page's WebSocket is blocked (subscribe, receive, publish with ok),
// when the fallback is chosen and left (only where SSE works and WebSocket fails; WebSocket
// first again after a lost session; not for a relay that is down), and SSE's POST queue
// (bounded; a request rejected while it waits is never sent). Same needs and skip rules as
// browser.test.mjs.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import {
  chromiumBin,
  killAll,
  launchBrowser,
  natsBin,
  natsClient,
  pageApi,
  relayBin,
  sleep,
  startNats,
  startPageServer,
  startRelay,
  startService,
  waitFor,
} from "./harness.mjs";

const missing = [!relayBin() && "the relay binary", !natsBin() && "nats-server", !chromiumBin() && "chromium"].filter(
  Boolean,
);
if (missing.length && process.env.WSRELAY_REQUIRE_BROWSER === "1")
  throw new Error(`browser tests need ${missing.join(", ")}`);
const skip = missing.length ? `missing ${missing.join(", ")}` : false;

describe("refusals after the upgrade and the SSE fallback, in headless Chromium", { skip }, () => {
  let nats, nc, pages, browser;

  before(async () => {
    nats = await startNats();
    nc = await natsClient(nats.port);
    pages = await startPageServer();
    browser = await launchBrowser();
  });

  after(async () => {
    await browser?.close();
    nc?.close();
    pages?.close();
    nats?.stop();
    killAll();
  });

  /** A fresh page; `blockWebSocket`: the page's WebSocket constructor throws. */
  async function newPage(blockWebSocket = false) {
    const page = await browser.context.newPage();
    page.on("pageerror", (e) => console.error("page error:", e));
    if (blockWebSocket)
      await page.addInitScript(() => {
        window.WebSocket = function () {
          throw new Error("WebSocket blocked by the test");
        };
      });
    await page.goto(pages.origin + "/");
    await page.waitForFunction(() => window.T?.ready === true, null, { timeout: 20_000 });
    return { page, api: pageApi(page) };
  }

  test("an invalid token is refused with 4401 and its reason, and getToken is called again", async () => {
    // Every token the page's server signs names audience "wsrelay": this relay wants another.
    const relay = await startRelay({
      natsUrl: nats.url,
      origin: pages.origin,
      name: "refuse401",
      auth: { refuseAfterUpgrade: true },
      jwt: { audiences: ["another-audience"] },
    });
    const { page, api } = await newPage();
    try {
      const before = pages.tokenRequests.length;
      await api.open("r401", `ws://127.0.0.1:${relay.port}/ws`, "alice", {
        options: { minReconnectDelayMs: 100, maxReconnectDelayMs: 300 },
      });
      const ds = await api.waitLog("three 4401 refusals", "r401", "disconnected", 3, 20_000);
      for (const d of ds) {
        assert.equal(d.code, 4401, JSON.stringify(d));
        assert.equal(d.reason, "invalid token");
      }
      assert.equal(ds[2].willReconnect, false, "stops after maxAuthFailures (3)");
      assert.equal(pages.tokenRequests.length - before, 3, "getToken before each of the 3 tries");
      assert.equal(await relay.metric('wsrelay_connections_refused_total{reason="invalid_token"}'), 3);
      assert.equal(await relay.metric("wsrelay_connections"), 0);
      assert.equal((await api.log("r401", "connected")).length, 0);
    } finally {
      await api.closeClient("r401");
      await page.close();
      await relay.kill();
    }
  });

  test("a foreign origin is refused with 4403 and the client stops", async () => {
    const relay = await startRelay({
      natsUrl: nats.url,
      origin: "https://app.example",
      name: "refuse403",
      auth: { refuseAfterUpgrade: true },
    });
    const { page, api } = await newPage();
    try {
      await api.open("r403", `ws://127.0.0.1:${relay.port}/ws`, "alice");
      const [d] = await api.waitLog("the 4403 refusal", "r403", "disconnected", 1, 20_000);
      assert.equal(d.code, 4403);
      assert.equal(d.reason, "origin not allowed");
      assert.equal(d.willReconnect, false);
      await new Promise((r) => setTimeout(r, 1500));
      assert.equal((await api.log("r403", "disconnected")).length, 1, "no retry");
      assert.equal(await relay.metric('wsrelay_connections_refused_total{reason="origin"}'), 1);
    } finally {
      await api.closeClient("r403");
      await page.close();
      await relay.kill();
    }
  });

  test("WebSocket blocked: the SDK falls back to SSE + POST, receives and publishes", async () => {
    const relay = await startRelay({ natsUrl: nats.url, origin: pages.origin, name: "sse" });
    const { page, api } = await newPage(true);
    try {
      await api.open("sse", `ws://127.0.0.1:${relay.port}/ws`, "sam", {
        options: { minReconnectDelayMs: 100, maxReconnectDelayMs: 300 },
      });
      const [c] = await api.waitLog("connected over SSE", "sse", "connected", 1, 20_000);
      assert.equal(c.transport, "sse");
      // Each thrown constructor is a failed connection: error, then disconnected (1006).
      const failed = await api.log("sse", "disconnected");
      assert.equal(failed.length, 2, "fallbackAfterFailures (2) WebSocket failures, then SSE");
      for (const d of failed) {
        assert.deepEqual([d.code, d.wasClean, d.willReconnect], [1006, false, true]);
        assert.match(d.reason, /websocket unavailable: .*WebSocket blocked by the test/);
        assert.ok(d.at <= c.at);
      }
      assert.equal(failed[1].delayMs, 0, "SSE tried at once after the second failure");
      assert.equal((await api.log("sse", "error")).filter((e) => e.errorKind === "transport").length, 2);
      assert.equal(c.anonymous, false, "authenticated by the token in the query");
      assert.equal(await page.evaluate(() => window.T.clients.sse.transport), "sse");
      assert.equal(await relay.metric("wsrelay_connections"), 1, "a session is a connection");

      await page.evaluate(() => window.subscribeChannel("sse", "me.notify"));
      await api.waitSubscribed("sse", "me.notify", 1);
      for (const payload of [{ hello: "over sse" }, "plain text", { n: 3 }]) {
        const n = (await api.messages("sse", "me.notify")).length;
        nc.publish("users.sam.notify", payload);
        await nc.flush();
        await waitFor("the message over SSE", 10_000, async () => (await api.messages("sse", "me.notify")).length > n);
      }
      assert.deepEqual(await api.messages("sse", "me.notify"), [{ hello: "over sse" }, "plain text", { n: 3 }]);

      const onNats = await nc.subscribe("chat.sse");
      const oks = [];
      for (let i = 0; i < 5; i++) oks.push(api.publish("sse", "chat.sse", { i }));
      for (const r of await Promise.all(oks)) assert.deepEqual(r, { ok: true, result: {} });
      await waitFor("5 publishes on NATS", 5000, () => onNats.length === 5);
      assert.deepEqual(
        onNats.map((m) => JSON.parse(m.payload).i),
        [0, 1, 2, 3, 4],
        "POSTs keep the frames' order",
      );
      const denied = await api.publish("sse", "orders.1", { x: 1 });
      assert.equal(denied.code, 403);
      assert.equal((await api.log("sse", "disconnected")).length, 2, "no disconnect since the two failures");
    } finally {
      await api.closeClient("sse");
      await waitFor("the session closed", 5000, async () => (await relay.metric("wsrelay_connections")) === 0);
      await page.close();
      await relay.kill();
    }
  });

  /** The `kind` events of `client` from `since` (ms) on. */
  const eventsSince = async (api, client, kind, since) => (await api.log(client, kind)).filter((e) => e.at >= since);

  test("a relay that is down (a restart) does not move a WebSocket page to SSE: it comes back over WebSocket, the backoff starts over", async () => {
    const relay = await startRelay({ natsUrl: nats.url, origin: pages.origin, name: "down" });
    const svc = await startService([relay]);
    const { page, api } = await newPage();
    try {
      await api.open("down", `ws://127.0.0.1:${svc.port}/ws`, "dora", {
        options: { minReconnectDelayMs: 1000, maxReconnectDelayMs: 4000, stableConnectionMs: 2000 },
      });
      const [c0] = await api.waitLog("connected", "down", "connected", 1, 20_000);
      assert.equal(c0.transport, "websocket");
      await api.subscribe("down", "me.notify");
      await api.waitSubscribed("down", "me.notify", 1);
      await sleep(Math.max(0, c0.at + 2500 - Date.now())); // a stable session (stableConnectionMs)

      // The relay goes away: no ready backend, established connections cut.
      const downAt = Date.now();
      svc.setBackends([]);
      svc.dropConnections();
      // The loss, then three failed opens: WebSocket twice, then SSE at once (the probe), which
      // fails too: the relay is down, not the WebSocket blocked.
      const ds = await api.waitLog("4 disconnects", "down", "disconnected", 4, 30_000, (d) => d.at >= downAt);
      assert.equal(
        await page.evaluate(() => window.T.clients.down.transport),
        "websocket",
        "after the failed probe the next attempt is a WebSocket",
      );
      assert.deepEqual(
        svc.seen.filter((x) => x.at >= downAt).map((x) => x.kind).slice(0, 3),
        ["websocket", "websocket", "sse"],
      );
      assert.equal(ds[2].delayMs, 0, "the SSE probe right after the second WebSocket failure");

      // Back (as a restarted relay turns Ready): the page reconnects over WebSocket.
      const upAt = Date.now();
      svc.setBackends([relay]);
      const [c1] = await waitFor("reconnected", 30_000, async () => {
        const cs = await eventsSince(api, "down", "connected", downAt);
        return cs.length ? cs : undefined;
      });
      assert.equal(c1.transport, "websocket");
      assert.equal((await eventsSince(api, "down", "connected", downAt)).length, 1);
      assert.equal(
        svc.seen.filter((x) => x.at >= upAt && x.kind !== "websocket").length,
        0,
        "no SSE stream or POST once the relay was back",
      );
      await api.waitSubscribed("down", "me.notify", 2);
      console.log(`relay down ${upAt - downAt} ms; reconnected over WebSocket ${c1.at - upAt} ms after it was back`);

      // That session is lost soon after a run of failures: the first retry is at the first
      // backoff step (1-2 s), not where the failed opens had left the backoff.
      const lostAt = Date.now();
      svc.dropConnections();
      const [retry] = await waitFor("the reconnect", 10_000, async () => {
        const cs = await eventsSince(api, "down", "connecting", lostAt);
        return cs.length ? cs : undefined;
      });
      assert.equal(retry.attempt, 0);
      assert.ok(retry.delayMs >= 1000 && retry.delayMs <= 2000, `first retry after ${retry.delayMs} ms`);
      const [c2] = await waitFor("reconnected again", 20_000, async () => {
        const cs = await eventsSince(api, "down", "connected", lostAt);
        return cs.length ? cs : undefined;
      });
      assert.equal(c2.transport, "websocket");
      console.log(`session lost after a run of failures: reconnected in ${c2.at - lostAt} ms (retry delay ${retry.delayMs} ms)`);
    } finally {
      await api.closeClient("down");
      await page.close();
      svc.close();
      await relay.kill();
    }
  });

  test("WebSocket blocked on the way, SSE open: falls back; after a lost session tries WebSocket first and uses it once it passes", async () => {
    const relay = await startRelay({ natsUrl: nats.url, origin: pages.origin, name: "blocked" });
    const svc = await startService([relay], { blockWebSocket: true });
    const { page, api } = await newPage();
    const kinds = (since) => svc.seen.filter((x) => x.at >= since && x.kind !== "post").map((x) => x.kind);
    try {
      const t0 = Date.now();
      await api.open("blk", `ws://127.0.0.1:${svc.port}/ws`, "bert", {
        options: { minReconnectDelayMs: 200, maxReconnectDelayMs: 1000 },
      });
      const [c0] = await api.waitLog("connected over SSE", "blk", "connected", 1, 20_000);
      assert.equal(c0.transport, "sse");
      assert.deepEqual(kinds(t0), ["websocket", "websocket", "sse"]);
      await api.subscribe("blk", "me.notify");
      await api.waitSubscribed("blk", "me.notify", 1);

      // The session is lost, WebSocket still blocked: one WebSocket try, then SSE at once.
      const t1 = Date.now();
      svc.dropConnections();
      const [c1] = await waitFor("reconnected", 20_000, async () => {
        const cs = await eventsSince(api, "blk", "connected", t1);
        return cs.length ? cs : undefined;
      });
      assert.equal(c1.transport, "sse");
      assert.deepEqual(kinds(t1), ["websocket", "sse"], "WebSocket first, one try since SSE has worked where it failed");
      await api.waitSubscribed("blk", "me.notify", 2);

      // WebSocket passes again: the next lost session goes back to it for good.
      svc.blockWebSocket = false;
      const t2 = Date.now();
      svc.dropConnections();
      const [c2] = await waitFor("reconnected", 20_000, async () => {
        const cs = await eventsSince(api, "blk", "connected", t2);
        return cs.length ? cs : undefined;
      });
      assert.equal(c2.transport, "websocket");
      assert.deepEqual(kinds(t2), ["websocket"]);
      assert.equal(await page.evaluate(() => window.T.clients.blk.transport), "websocket");
      await api.waitSubscribed("blk", "me.notify", 3);
      const onNats = await nc.subscribe("chat.blk");
      assert.deepEqual(await api.publish("blk", "chat.blk", { over: "websocket" }), { ok: true, result: {} });
      await waitFor("the publish on NATS", 5000, () => onNats.length === 1);
    } finally {
      await api.closeClient("blk");
      await page.close();
      svc.close();
      await relay.kill();
    }
  });

  describe("SSE's POST queue while the relay does not answer (SIGSTOP)", () => {
    let relay, page, api;
    before(async () => {
      relay = await startRelay({ natsUrl: nats.url, origin: pages.origin, name: "stall" });
      ({ page, api } = await newPage(true));
    });
    after(async () => {
      relay?.signal("SIGCONT");
      await page?.close();
      await relay?.kill();
    });

    /** Connects `name` over SSE and returns what NATS sees on `subject`. */
    async function sseClient(name, subject, options) {
      await api.open(name, `ws://127.0.0.1:${relay.port}/ws`, name, { options: { pingIntervalMs: 0, ...options } });
      const [c] = await api.waitLog("connected over SSE", name, "connected", 1, 20_000);
      assert.equal(c.transport, "sse");
      return nc.subscribe(subject);
    }
    /** Starts publishes in the page without waiting; their results land in window.T.results. */
    const startPublishes = (name, channel, ns) =>
      page.evaluate(
        ([c, ch, list]) => {
          window.T.results ??= {};
          for (const n of list)
            window.publish(c, ch, { n }).then((r) => (window.T.results[`${c}:${n}`] = { ...r, at: Date.now() }));
        },
        [name, channel, ns],
      );
    const results = (name, ns) =>
      page.evaluate(([c, list]) => list.map((n) => window.T.results?.[`${c}:${n}`] ?? null), [name, ns]);

    test("a publish rejected with timeout while it waits for its POST is never sent afterwards", async () => {
      const onNats = await sseClient("stale", "chat.stale", { requestTimeoutMs: 1500 });
      assert.deepEqual(await api.publish("stale", "chat.stale", { n: 0 }), { ok: true, result: {} });
      relay.signal("SIGSTOP");
      try {
        // 1's POST starts and hangs; 2 and 3 wait behind it. All three time out.
        await startPublishes("stale", "chat.stale", [1, 2, 3]);
        const rs = await waitFor("three timeouts", 15_000, async () => {
          const r = await results("stale", [1, 2, 3]);
          return r.every(Boolean) ? r : undefined;
        });
        for (const r of rs) assert.equal(r.code, "timeout", JSON.stringify(r));
      } finally {
        relay.signal("SIGCONT");
      }
      // POSTs go in order: once 4 is on NATS, whatever the queue still held has gone out.
      assert.deepEqual(await api.publish("stale", "chat.stale", { n: 4 }), { ok: true, result: {} });
      await waitFor("4 on NATS", 10_000, () => onNats.some((m) => JSON.parse(m.payload).n === 4));
      // 1's POST had started before its timeout (its outcome is unknown, as documented);
      // 2 and 3 were withdrawn when they were rejected.
      assert.deepEqual(onNats.map((m) => JSON.parse(m.payload).n), [0, 1, 4]);
      await api.closeClient("stale");
    });

    test("the queue holds maxQueuedRequests requests: one more is rejected at once with queue_full", async () => {
      const onNats = await sseClient("bound", "chat.bound", { requestTimeoutMs: 20_000, maxQueuedRequests: 2 });
      relay.signal("SIGSTOP");
      let rs;
      try {
        // 1 in its POST, 2 and 3 in the queue (full), 4 refused.
        await startPublishes("bound", "chat.bound", [1, 2, 3]);
        await sleep(300);
        const t = Date.now();
        await startPublishes("bound", "chat.bound", [4]);
        const [r4] = await waitFor("4 refused", 5000, async () => {
          const r = await results("bound", [4]);
          return r[0] ? r : undefined;
        });
        assert.equal(r4.code, "queue_full");
        assert.match(r4.reason, /2 requests already wait to be POSTed/);
        assert.ok(r4.at - t < 5000);
        assert.deepEqual(await results("bound", [1, 2, 3]), [null, null, null], "the others still wait");
      } finally {
        relay.signal("SIGCONT");
      }
      rs = await waitFor("1-3 settled", 15_000, async () => {
        const r = await results("bound", [1, 2, 3]);
        return r.every(Boolean) ? r : undefined;
      });
      for (const r of rs) assert.equal(r.ok, true, JSON.stringify(r));
      await waitFor("1-3 on NATS", 10_000, () => onNats.length === 3);
      assert.deepEqual(onNats.map((m) => JSON.parse(m.payload).n), [1, 2, 3]);
      await api.closeClient("bound");
    });
  });
});

// In headless Chromium against a real relay and nats-server: refusals the page can read
// (`auth.refuseAfterUpgrade`: 4401 with its reason, then getToken; 4403 stops), and the SSE +
// POST fallback when the page's WebSocket is blocked (subscribe, receive, publish with ok).
// Same needs and skip rules as browser.test.mjs.
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
  startNats,
  startPageServer,
  startRelay,
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
      assert.equal((await api.log("sse", "disconnected")).length, 0);
    } finally {
      await api.closeClient("sse");
      await waitFor("the session closed", 5000, async () => (await relay.metric("wsrelay_connections")) === 0);
      await page.close();
      await relay.kill();
    }
  });
});

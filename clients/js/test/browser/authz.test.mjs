// Subscription tokens (docs/protocol.md section 3, `authorize.token`) in headless Chromium
// against a real relay and nats-server, over WebSocket and over the SSE + POST fallback: a
// subscribe without a subscription token is refused with 403, one with a token receives; a
// short-lived token is replaced with `subrefresh` before its `exp` and the subscription keeps
// receiving past it (while a client that does not refresh is ended with `expired` by the relay
// and subscribes again with a new token); a publish on the binding needs a token too; and a
// connection `refresh` whose new claims no longer allow a subscription (a CEL rule) ends it
// with `forbidden`, for good, while the others go on.
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

// Lifetime of the short subscription tokens, in seconds: the SDK refreshes at 80% of the time
// left but at least 5 s before exp, so an 8 s token (7-8 s left when issued, exp is in whole
// seconds) is replaced after 2-3 s.
const SHORT_TTL = 8;

describe("subscription tokens (authorize.token) in headless Chromium against a real relay", { skip }, () => {
  let nats, nc, pages, browser, relay;

  before(async () => {
    nats = await startNats();
    nc = await natsClient(nats.port);
    pages = await startPageServer();
    browser = await launchBrowser();
    relay = await startRelay({
      natsUrl: nats.url,
      origin: pages.origin,
      name: "authz",
      bindings: [
        { channel: "secure.{id}", subject: "secure.{id}", direction: "both", authorize: { token: {} } },
        { channel: "rooms.{room}", subject: "rooms.{room}", direction: "subscribe", authorize: { rule: "vars.room in claims.rooms" } },
      ],
    });
  });

  after(async () => {
    await browser?.close();
    nc?.close();
    pages?.close();
    nats?.stop();
    killAll();
  });

  /** A fresh page; `sse`: its WebSocket constructor throws, so the SDK falls back to SSE + POST. */
  async function newPage(sse) {
    const page = await browser.context.newPage();
    page.on("pageerror", (e) => console.error("page error:", e));
    if (sse)
      await page.addInitScript(() => {
        window.WebSocket = function () {
          throw new Error("WebSocket blocked by the test");
        };
      });
    await page.goto(pages.origin + "/");
    await page.waitForFunction(() => window.T?.ready === true, null, { timeout: 20_000 });
    return { page, api: pageApi(page) };
  }

  /** Publishes on NATS and waits for the page to receive it. */
  async function roundTrip(api, client, channel, payload, ms = 10_000) {
    const before = (await api.messages(client, channel)).length;
    nc.publish(channel, payload);
    await nc.flush();
    const got = await waitFor(`${client} to receive ${JSON.stringify(payload)} on ${channel}`, ms, async () => {
      const m = await api.messages(client, channel);
      return m.length > before ? m : undefined;
    });
    assert.deepEqual(got.at(-1), payload);
  }

  const url = () => `ws://127.0.0.1:${relay.port}/ws`;
  const fast = { minReconnectDelayMs: 100, maxReconnectDelayMs: 300 };

  for (const transport of ["websocket", "sse"]) {
    test(`${transport}: without a subscription token 403; with one subscribed and receiving`, async () => {
      const { page, api } = await newPage(transport === "sse");
      const name = `${transport}-basic`;
      try {
        await api.open(name, url(), "alice", { subTokenTtl: 600, options: fast });
        const [c] = await api.waitLog("connected", name, "connected", 1, 20_000);
        assert.equal(c.transport, transport);

        await api.subscribe(name, "secure.1", { noToken: true });
        const [refused] = await api.waitLog("the refusal", name, "sub-unsubscribed", 1, 10_000, (e) => e.channel === "secure.1");
        assert.equal(refused.code, 403);
        assert.equal(refused.byRelay, true);
        assert.match(refused.reason, /subscription token/);

        const asked = pages.subTokenRequests.length;
        await api.subscribe(name, "secure.2");
        await api.waitSubscribed(name, "secure.2", 1);
        assert.deepEqual(
          pages.subTokenRequests.slice(asked).map((r) => [r.sub, r.channel]),
          [["alice", "secure.2"]],
          "one subscription token, for that channel",
        );
        await roundTrip(api, name, "secure.2", { n: 1 });
        // (On the SSE page the two blocked WebSocket attempts before it are `disconnected` too.)
        assert.equal((await api.log(name, "disconnected")).filter((d) => d.at >= c.at).length, 0);
      } finally {
        await api.closeClient(name);
        await page.close();
      }
    });

    test(`${transport}: a short-lived subscription token is refreshed with subrefresh; messages arrive past its exp`, async () => {
      const { page, api } = await newPage(transport === "sse");
      const name = `${transport}-refresh`;
      const control = `${transport}-norefresh`;
      try {
        await api.open(name, url(), "bob", { subTokenTtl: SHORT_TTL, options: fast });
        // The control does not refresh (connection token 600 s): the relay must end its
        // subscription at the token's exp, which shows the expiry is enforced.
        await api.open(control, url(), "carol", { subTokenTtl: SHORT_TTL, options: { ...fast, refreshToken: false } });
        await api.waitLog("connected", name, "connected", 1, 20_000);
        await api.waitLog("connected", control, "connected", 1, 20_000);
        const asked = pages.subTokenRequests.length;
        await api.subscribe(name, "secure.10");
        await api.subscribe(control, "secure.11");
        await api.waitSubscribed(name, "secure.10", 1);
        await api.waitSubscribed(control, "secure.11", 1);
        const first = pages.subTokenRequests.slice(asked).find((r) => r.channel === "secure.10");
        const firstControl = pages.subTokenRequests.slice(asked).find((r) => r.channel === "secure.11");
        await roundTrip(api, name, "secure.10", { before: "exp" });

        // Past the first token's exp (plus a second for the relay's timer).
        await waitFor("the first subscription token to expire", 20_000, () => Date.now() > first.exp * 1000 + 1000, 100);
        await roundTrip(api, name, "secure.10", { after: "exp" });
        const tokens = await api.log(name, "sub-token");
        assert.ok(tokens.length >= 1, `subrefresh accepted (${tokens.length} token events)`);
        assert.ok(tokens[0].expiresAt > first.exp * 1000, "the new token expires later");
        // (The first `subscribing`, reason "subscribe", is emitted before the page listens.)
        assert.deepEqual(
          (await api.log(name, "sub-subscribing")).filter((e) => e.channel === "secure.10").map((e) => e.reason),
          [],
          "never subscribing again: no expiry, no resubscribe",
        );
        assert.equal((await api.subscribedCtx(name, "secure.10")).length, 1);
        assert.deepEqual(await api.log(name, "sub-error"), []);

        // The control was ended with `expired` at its token's exp and subscribed again with a new token.
        const [again] = await api.waitLog("the control's expiry", control, "sub-subscribing", 1, 20_000, (e) => e.reason === "expired");
        assert.ok(again.at >= firstControl.exp * 1000 - 1000, "not before its token's exp");
        const subs = await api.waitSubscribed(control, "secure.11", 2);
        assert.equal(subs[1].resubscribed, true);
        await roundTrip(api, control, "secure.11", { control: "again" });
        assert.equal((await api.log(control, "sub-token")).length, 0, "the control never sent subrefresh");
        console.log(
          `${transport}: ${tokens.length} subrefresh in ${Math.round((Date.now() - first.at) / 1000)} s; ` +
            `control expired ${again.at - firstControl.exp * 1000} ms after its exp and resubscribed`,
        );
      } finally {
        await api.closeClient(name);
        await api.closeClient(control);
        await page.close();
      }
    });
  }

  for (const transport of ["websocket", "sse"]) {
    test(`${transport}: a refresh whose claims drop a room ends that subscription with 'forbidden'; the others go on`, async () => {
      const { page, api } = await newPage(transport === "sse");
      const name = `${transport}-rooms`;
      try {
        await api.open(name, url(), "erin", { claims: { rooms: ["1", "2"] }, options: fast });
        await api.waitLog("connected", name, "connected", 1, 20_000);
        await api.subscribe(name, "rooms.1");
        await api.subscribe(name, "rooms.2");
        await api.subscribe(name, "rooms.3");
        await api.waitSubscribed(name, "rooms.1", 1);
        await api.waitSubscribed(name, "rooms.2", 1);
        const [refused] = await api.waitLog("rooms.3 refused", name, "sub-unsubscribed", 1, 10_000, (e) => e.channel === "rooms.3");
        assert.deepEqual([refused.code, refused.reason], [403, "denied by rule"]);
        await roundTrip(api, name, "rooms.2", { room: 2 });

        await api.setClaims(name, { rooms: ["1"] });
        assert.deepEqual(await api.refreshNow(name), { ok: true });
        const [ended] = await api.waitLog("rooms.2 forbidden", name, "sub-unsubscribed", 1, 10_000, (e) => e.channel === "rooms.2");
        assert.deepEqual([ended.reason, ended.byRelay], ["forbidden", true]);
        await roundTrip(api, name, "rooms.1", { room: 1, after: "refresh" });
        const before = (await api.messages(name, "rooms.2")).length;
        nc.publish("rooms.2", { room: 2, after: "refresh" });
        await nc.flush();
        await roundTrip(api, name, "rooms.1", { room: 1, fence: true }); // published after it: rooms.2's would have come
        assert.equal((await api.messages(name, "rooms.2")).length, before, "nothing more on rooms.2");
        assert.deepEqual(
          (await api.log(name, "sub-subscribing")).filter((e) => e.channel === "rooms.2"),
          [],
          "not subscribed again",
        );
        assert.equal((await api.log(name, "connected")).length, 1, "one connection throughout");
      } finally {
        await api.closeClient(name);
        await page.close();
      }
    });
  }

  test("publish on a binding with authorize.token: 403 without a token, ok with one", async () => {
    const { page, api } = await newPage(false);
    const name = "publisher";
    try {
      await api.open(name, url(), "dave", { options: fast });
      await api.waitLog("connected", name, "connected", 1, 20_000);
      const onNats = await nc.subscribe("secure.20");
      const denied = await api.publish(name, "secure.20", { n: 0 });
      assert.equal(denied.ok, false);
      assert.equal(denied.code, 403);
      const ok = await api.publish(name, "secure.20", { n: 1 }, { subTokenTtl: 60 });
      assert.deepEqual(ok, { ok: true, result: {} });
      await waitFor("the publish on NATS", 5000, () => onNats.length === 1);
      assert.equal(onNats[0].payload, '{"n":1}');
    } finally {
      await api.closeClient(name);
      await page.close();
    }
  });
});

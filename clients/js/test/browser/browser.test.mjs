// End to end in a real browser: headless Debian Chromium loads a page that uses the built SDK
// against real wsrelay processes (target/debug/wsrelay) and a real nats-server, through a TCP
// front that routes new connections to a ready relay like a Kubernetes Service.
//
// Needs: the relay binary (cargo build -p wsrelay --bin wsrelay, or WSRELAY_BIN), nats-server
// (make tools, or NATS_SERVER_BIN) and /usr/bin/chromium (make deps, or CHROMIUM). Without them
// the suite is skipped, unless WSRELAY_REQUIRE_BROWSER=1 (make client-js) makes that a failure.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import {
  chromiumBin,
  httpStatus,
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

const missing = [
  !relayBin() && "the relay binary (cargo build -p wsrelay --bin wsrelay, or WSRELAY_BIN)",
  !natsBin() && "nats-server (make tools, or NATS_SERVER_BIN)",
  !chromiumBin() && "chromium (make deps, or CHROMIUM)",
].filter(Boolean);
if (missing.length && process.env.WSRELAY_REQUIRE_BROWSER === "1")
  throw new Error(`browser tests need ${missing.join(", ")}`);
const skip = missing.length ? `missing ${missing.join(", ")}` : false;

describe("@wsrelay/client in headless Chromium against real relays and NATS", { skip }, () => {
  let nats, nc, pages, browser, page;

  before(async () => {
    nats = await startNats();
    nc = await natsClient(nats.port);
    pages = await startPageServer();
    browser = await launchBrowser();
    page = await browser.context.newPage();
    page.on("pageerror", (e) => console.error("page error:", e));
    await page.goto(pages.origin + "/");
    await page.waitForFunction(() => window.T?.ready === true, null, { timeout: 20_000 });
  });

  after(async () => {
    await browser?.close();
    nc?.close();
    pages?.close();
    nats?.stop();
    killAll();
  });

  // ---- helpers on the page's record ----
  const api = (name) => (...args) => pageApi(page)[name](...args);
  const [log, messages, waitLog, waitSubscribed, waitMessages, open, subscribe, publish, closeClient, positions, stats] = [
    "log", "messages", "waitLog", "waitSubscribed", "waitMessages", "open", "subscribe", "publish", "closeClient",
    "positions", "stats",
  ].map(api);

  /** Publishes on NATS and waits for the page to receive it (the subscription is in place). */
  async function roundTrip(client, subject, channel, payload, ms = 10_000) {
    const before = (await messages(client, channel)).length;
    nc.publish(subject, payload);
    await nc.flush();
    const got = await waitFor(`${client} to receive ${JSON.stringify(payload)}`, ms, async () => {
      const m = await messages(client, channel);
      return m.length > before ? m : undefined;
    });
    assert.deepEqual(got[got.length - 1], payload);
  }
  const wsUrl = (svc) => `ws://127.0.0.1:${svc.port}/ws`;

  test("connects with a JWT, receives its NATS messages only, publish settles with ok / 403", async () => {
    const relay = await startRelay({ natsUrl: nats.url, origin: pages.origin, name: "basic" });
    const svc = await startService([relay]);
    try {
      await open("basic", wsUrl(svc), "alice");
      const [c] = await waitLog("connected", "basic", "connected", 1, 20_000);
      assert.equal(c.transport, "websocket");
      assert.equal(c.anonymous, false, "authenticated by the token in Sec-WebSocket-Protocol");
      assert.equal(c.maxMessageBytes, 65536);
      await subscribe("basic", "me.notify");
      await waitSubscribed("basic", "me.notify", 1);
      nc.publish("users.bob.notify", { not: "yours" });
      await roundTrip("basic", "users.alice.notify", "me.notify", { hello: "browser" });
      await roundTrip("basic", "users.alice.notify", "me.notify", "plain text");
      assert.deepEqual(await messages("basic", "me.notify"), [{ hello: "browser" }, "plain text"]);

      const onNats = await nc.subscribe("chat.room1");
      const ok = await publish("basic", "chat.room1", { n: 1 });
      assert.deepEqual(ok, { ok: true, result: {} });
      await waitFor("the publish on NATS", 5000, () => onNats.length === 1);
      assert.equal(onNats[0].payload, '{"n":1}');

      const denied = await publish("basic", "orders.1", { x: 1 });
      assert.equal(denied.ok, false);
      assert.equal(denied.code, 403);
      assert.match(denied.reason, /.+/);
      assert.equal((await log("basic", "disconnected")).length, 0);
    } finally {
      await closeClient("basic");
      svc.close();
      await relay.kill();
    }
  });

  test("relay killed (SIGKILL) and restarted: reconnects and resubscribes by itself", async () => {
    const a = await startRelay({ natsUrl: nats.url, origin: pages.origin, name: "kill" });
    const svc = await startService([a]);
    try {
      await open("kill", wsUrl(svc), "kate");
      await subscribe("kill", "me.notify");
      await waitSubscribed("kill", "me.notify", 1);
      await roundTrip("kill", "users.kate.notify", "me.notify", { before: "kill" });

      await a.kill();
      const [d] = await waitLog("disconnected after SIGKILL", "kill", "disconnected", 1, 10_000);
      assert.equal(d.code, 1006);
      assert.equal(d.willReconnect, true);
      const a2 = await startRelay({
        natsUrl: nats.url,
        origin: pages.origin,
        name: "kill",
        port: a.port,
        adminPort: a.adminPort,
      });
      svc.setBackends([a2]);
      try {
        const subs = await waitSubscribed("kill", "me.notify", 2, 30_000);
        assert.equal(subs[1].resubscribed, true);
        assert.equal(subs[1].recovered, false, "a plain channel cannot recover: the app is told");
        await roundTrip("kill", "users.kate.notify", "me.notify", { after: "restart" });
        const connected = await log("kill", "connected");
        assert.equal(connected.at(-1).reconnected, true);
        assert.equal(connected.at(-1).transport, "websocket", "a restart does not move the page to SSE");
      } finally {
        await closeClient("kill");
        await a2.kill();
      }
    } finally {
      svc.close();
      await a.kill();
    }
  });

  test("drain (SIGTERM): reconnects at the relay's turn, not before, to another relay", async () => {
    const a = await startRelay({ natsUrl: nats.url, origin: pages.origin, name: "drain-a", graceSeconds: 4 });
    const b = await startRelay({ natsUrl: nats.url, origin: pages.origin, name: "drain-b" });
    const svc = await startService([a, b]);
    try {
      await open("drain", wsUrl(svc), "dana");
      await subscribe("drain", "me.notify");
      await waitSubscribed("drain", "me.notify", 1);
      assert.deepEqual(svc.routed, ["drain-a"]);
      await roundTrip("drain", "users.dana.notify", "me.notify", { n: 1 });

      a.signal("SIGTERM");
      const [drain] = await waitLog("the drain frame", "drain", "drain", 1, 10_000);
      assert.ok(drain.reconnectAfterMs >= 0 && drain.reconnectAfterMs <= 0.7 * 4000 + 100, JSON.stringify(drain));
      const [closed] = await waitLog("the 1012 close", "drain", "disconnected", 1, 10_000);
      assert.equal(closed.code, 1012);
      // The relay closed at the announced turn and the client did not leave before it.
      assert.ok(
        closed.at >= drain.at + drain.reconnectAfterMs - 250,
        `closed ${closed.at - drain.at} ms after the drain frame, turn ${drain.reconnectAfterMs} ms`,
      );
      const connecting = (await log("drain", "connecting")).filter((e) => e.at >= drain.at);
      assert.equal(connecting[0]?.reason, "drain");
      assert.ok(connecting[0].delayMs <= 1000, "only the client's jitter after the turn");

      const subs = await waitSubscribed("drain", "me.notify", 2, 15_000);
      assert.equal(subs[1].resubscribed, true);
      assert.equal(svc.routed.at(-1), "drain-b", "the Service sent the new connection to the other relay");
      await roundTrip("drain", "users.dana.notify", "me.notify", { n: 2 });
      const exit = await Promise.race([a.exited, sleep(15_000).then(() => "still running")]);
      assert.deepEqual(exit, { code: 0, signal: null }, "the drained relay exits 0");
    } finally {
      await closeClient("drain");
      svc.close();
      await a.kill();
      await b.kill();
    }
  });

  test("token expiry (1008): getToken is called again and the connection comes back", async () => {
    const relay = await startRelay({ natsUrl: nats.url, origin: pages.origin, name: "expiry" });
    const svc = await startService([relay]);
    try {
      const before = pages.tokenRequests.filter((r) => r.sub === "erin").length;
      await open("exp", wsUrl(svc), "erin", { ttl: 7, options: { refreshToken: false } });
      await subscribe("exp", "me.notify");
      await waitSubscribed("exp", "me.notify", 1);
      const [d] = await waitLog("the 1008 close at expiry", "exp", "disconnected", 1, 15_000);
      assert.equal(d.code, 1008);
      await waitSubscribed("exp", "me.notify", 2, 15_000);
      const tokens = pages.tokenRequests.filter((r) => r.sub === "erin").length - before;
      assert.equal(tokens, 2, "one token per connection: getToken before the first and after 1008");
      await roundTrip("exp", "users.erin.notify", "me.notify", { fresh: "token" });
    } finally {
      await closeClient("exp");
      svc.close();
      await relay.kill();
    }
  });

  test("token refresh before expiry: in band, and the connection outlives the first token", async () => {
    const relay = await startRelay({ natsUrl: nats.url, origin: pages.origin, name: "refresh" });
    const svc = await startService([relay]);
    try {
      const before = pages.tokenRequests.filter((r) => r.sub === "rita").length;
      await open("refresh", wsUrl(svc), "rita", { ttl: 8 });
      await subscribe("refresh", "me.notify");
      await waitSubscribed("refresh", "me.notify", 1);
      // The first token's `exp` is at most this (signed in the second after the request).
      const first = pages.tokenRequests.filter((r) => r.sub === "rita")[before];
      const firstExpMs = (Math.floor(first.at / 1000) + 8 + 1) * 1000;
      // The refresh is due 3 s in (8 s token: 80% of the life, at least 5 s before expiry),
      // and must be in band: the relay implements the `refresh` frame.
      const outcome = await waitFor("a refresh outcome", 15_000, async () => {
        const ok = await log("refresh", "token");
        const err = (await log("refresh", "error")).filter((e) => e.errorKind === "refresh");
        return ok[0] ?? err[0];
      });
      assert.equal(outcome.kind, "token", JSON.stringify(outcome));
      assert.equal(outcome.inBand, true, JSON.stringify(outcome));
      // A refresh that did not move the relay's expiry would close the connection with 1008
      // at the first token's `exp`: wait until well past it (the relay's leeway is 0 here).
      while (Date.now() < firstExpMs + 2000) await sleep(200);
      assert.ok((await log("refresh", "token")).length >= 2, "refreshed again in band");
      assert.equal((await log("refresh", "connected")).length, 1, "one connection throughout");
      assert.deepEqual(await log("refresh", "disconnected"), []);
      // The relay's own count: no connection of this relay ended at a token's expiry.
      const metrics = (await httpStatus(relay.adminPort, "/metrics", 5000))?.body ?? "";
      const expired = metrics.split("\n").find((l) => l.startsWith('wsrelay_connections_closed_total{reason="token_expired"}'));
      assert.equal(Number(expired?.split(" ").pop() ?? 0), 0, expired);
      await roundTrip("refresh", "users.rita.notify", "me.notify", { still: "here" });
    } finally {
      await closeClient("refresh");
      svc.close();
      await relay.kill();
    }
  });

  test("dead link (relay stopped with SIGSTOP): detected within ping interval + timeout, reconnects elsewhere", async () => {
    const a = await startRelay({ natsUrl: nats.url, origin: pages.origin, name: "stop-a" });
    const b = await startRelay({ natsUrl: nats.url, origin: pages.origin, name: "stop-b" });
    const svc = await startService([a, b]);
    const pingIntervalMs = 1000;
    const pongTimeoutMs = 1000;
    try {
      await open("dead", wsUrl(svc), "dave", { options: { pingIntervalMs, pongTimeoutMs } });
      await subscribe("dead", "me.notify");
      await waitSubscribed("dead", "me.notify", 1);
      await roundTrip("dead", "users.dave.notify", "me.notify", { alive: 1 });
      const stoppedAt = Date.now();
      a.signal("SIGSTOP");
      const [d] = await waitLog("dead-link detection", "dead", "disconnected", 1, 10_000);
      assert.equal(d.code, 4901, JSON.stringify(d));
      const window = pingIntervalMs + pongTimeoutMs;
      assert.ok(d.at - stoppedAt <= window + 500, `detected after ${d.at - stoppedAt} ms (window ${window} ms)`);
      await waitSubscribed("dead", "me.notify", 2, 15_000);
      assert.equal(svc.routed.at(-1), "stop-b");
      await roundTrip("dead", "users.dave.notify", "me.notify", { alive: 2 });
    } finally {
      await closeClient("dead");
      svc.close();
      a.signal("SIGCONT");
      await a.kill();
      await b.kill();
    }
  });
  // ---- resumable channels (docs/protocol.md section 8): a JetStream nats-server of their own ----

  // 200 kept per channel: a full replay must fit in a connection's send queue (256 by default).
  const HISTORY = { stream: "CLIENTJS_FEED", maxMessages: 200, maxAgeSeconds: 300 };

  /**
   * What the page delivered on `channel` is exactly 1..n, once each, in order, with an unbroken
   * position chain (each `prev` the `seq` before it, `seq` increasing), and the SDK had no
   * duplicate to drop. Returns the figures for the test's diagnostic.
   */
  async function assertExactlyOnceInOrder(client, channel, n) {
    const got = await messages(client, channel);
    const pos = await positions(client, channel);
    const st = await stats(client, channel);
    const want = Array.from({ length: n }, (_, i) => i + 1);
    const lost = want.filter((x) => !got.includes(x));
    const dup = got.length - new Set(got).size;
    assert.deepEqual(lost, [], `lost ${lost.length} of ${n}`);
    assert.equal(dup, 0, `${dup} duplicates`);
    assert.deepEqual(got, want, "every message once, in publish order");
    assert.equal(pos.length, n, "every message carried its position");
    for (let i = 1; i < pos.length; i++) {
      assert.ok(pos[i].seq > pos[i - 1].seq, `seq ${pos[i].seq} after ${pos[i - 1].seq}`);
      assert.equal(pos[i].prev, pos[i - 1].seq, `message ${i + 1}: prev ${pos[i].prev}, last ${pos[i - 1].seq}`);
    }
    assert.equal(st.duplicatesDropped, 0, "the relay sent no message twice (none for the SDK to drop)");
    return { messages: got.length, lost: lost.length, duplicates: dup, transport: st.transport };
  }

  test("resumable channel, relay killed (SIGKILL) while messages are published: resumes with recovered: true, nothing missed", async (t) => {
    const js = await startNats({ jetstream: true });
    const jc = await natsClient(js.port);
    const a = await startRelay({ natsUrl: js.url, origin: pages.origin, name: "resume-kill", history: HISTORY });
    const svc = await startService([a]);
    let a2;
    let n = 0;
    const publishN = async (k) => {
      for (let i = 0; i < k; i++) jc.publish("feed.1", ++n);
      await jc.flush();
    };
    try {
      await open("rk", wsUrl(svc), "rosa");
      await subscribe("rk", "feed.1");
      const [first] = await waitSubscribed("rk", "feed.1", 1);
      assert.equal(first.resumable, true, JSON.stringify(first));
      assert.equal(typeof first.epoch, "string");
      await publishN(10);
      await waitMessages("rk", "feed.1", 10);

      await a.kill();
      const killedAt = Date.now();
      const [d] = await waitLog("disconnected after SIGKILL", "rk", "disconnected", 1, 10_000);
      assert.equal(d.code, 1006);
      assert.equal(d.willReconnect, true);
      // Published while no relay runs: only the stream keeps them.
      await publishN(20);
      assert.equal((await messages("rk", "feed.1")).length, 10);

      a2 = await startRelay({ natsUrl: js.url, origin: pages.origin, name: "resume-kill", port: a.port, adminPort: a.adminPort, history: HISTORY });
      const upAt = Date.now();
      svc.setBackends([a2]);
      const subs = await waitSubscribed("rk", "feed.1", 2, 30_000);
      const resumedAt = Date.now();
      assert.equal(subs[1].resubscribed, true);
      assert.equal(subs[1].recovering, true, "resubscribed with since");
      assert.equal(subs[1].recovered, true, "the relay replayed what was missed and said so");
      assert.equal(subs[1].epoch, first.epoch, "the same stream life");
      await waitMessages("rk", "feed.1", 30, 10_000);
      await publishN(10); // live again
      await waitMessages("rk", "feed.1", 40, 10_000);
      await sleep(500); // a late duplicate or stray message would show now
      const f = await assertExactlyOnceInOrder("rk", "feed.1", 40);
      t.diagnostic(
        `SIGKILL: ${f.messages} messages (20 while down), lost ${f.lost}, duplicates ${f.duplicates}, ` +
          `transport ${f.transport}; resumed ${resumedAt - killedAt} ms after the kill, ${resumedAt - upAt} ms after the relay was ready again`,
      );
    } finally {
      await closeClient("rk");
      svc.close();
      await a.kill();
      await a2?.kill();
      jc.close();
      js.stop();
    }
  });

  test("resumable channel through a drain (SIGTERM) with a steady publisher: moves to the other relay, recovered: true, nothing missed", async (t) => {
    const js = await startNats({ jetstream: true });
    const jc = await natsClient(js.port);
    const a = await startRelay({ natsUrl: js.url, origin: pages.origin, name: "resume-drain-a", history: HISTORY, graceSeconds: 3 });
    const b = await startRelay({ natsUrl: js.url, origin: pages.origin, name: "resume-drain-b", history: HISTORY });
    const svc = await startService([a, b]);
    let n = 0;
    let publisher;
    try {
      await open("rd", wsUrl(svc), "ruth");
      await subscribe("rd", "feed.2");
      const [first] = await waitSubscribed("rd", "feed.2", 1);
      assert.equal(first.resumable, true);
      assert.deepEqual(svc.routed, ["resume-drain-a"]);
      // One message every 25 ms from now until 20 after the resubscribe (at most 600: 15 s).
      let stopAt = 600;
      const published = new Promise((resolve) => {
        publisher = setInterval(() => {
          if (n >= stopAt) {
            clearInterval(publisher);
            jc.flush().then(resolve, resolve);
            return;
          }
          jc.publish("feed.2", ++n);
        }, 25);
      });
      await waitMessages("rd", "feed.2", 20);
      a.signal("SIGTERM");
      const [closed] = await waitLog("the 1012 close", "rd", "disconnected", 1, 10_000);
      assert.equal(closed.code, 1012);
      const subs = await waitSubscribed("rd", "feed.2", 2, 15_000);
      const resumedAt = Date.now();
      stopAt = n + 20;
      assert.equal(subs[1].recovering, true);
      assert.equal(subs[1].recovered, true);
      assert.equal(svc.routed.at(-1), "resume-drain-b");
      await Promise.race([published, sleep(15_000)]);
      assert.ok(n === stopAt, `the publisher stopped at ${n}, not ${stopAt}`);
      await waitMessages("rd", "feed.2", n, 15_000);
      await sleep(500);
      const f = await assertExactlyOnceInOrder("rd", "feed.2", n);
      t.diagnostic(
        `drain: ${f.messages} messages at 40/s, lost ${f.lost}, duplicates ${f.duplicates}, transport ${f.transport}; ` +
          `resubscribed on the other relay ${resumedAt - closed.at} ms after the 1012`,
      );
    } finally {
      clearInterval(publisher);
      await closeClient("rd");
      svc.close();
      await a.kill();
      await b.kill();
      jc.close();
      js.stop();
    }
  });
});

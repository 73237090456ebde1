// Presence (docs/protocol.md section 10) in headless Chromium against real relays sharing one
// registry (a JetStream KV bucket on a nats-server of the test's own): members across relays,
// one member for two connections of one user, no leave/join pair when a relay is SIGKILLed
// and its clients move to the other relay, and a leave after the grace.
// Otherwise the same needs and skip rules as browser.test.mjs.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import {
  chromiumBin,
  killAll,
  launchBrowser,
  natsBin,
  pageApi,
  relayBin,
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

const LEASE_S = 3;
const GRACE_S = 2;
const CH = "rooms.1";

describe("presence in headless Chromium against real relays and a shared registry", { skip }, () => {
  let nats, pages, browser, page, p;

  before(async () => {
    nats = await startNats({ jetstream: true });
    pages = await startPageServer();
    browser = await launchBrowser();
    page = await browser.context.newPage();
    page.on("pageerror", (e) => console.error("page error:", e));
    await page.goto(pages.origin + "/");
    await page.waitForFunction(() => window.T?.ready === true, null, { timeout: 20_000 });
    p = pageApi(page);
  });

  after(async () => {
    await browser?.close();
    pages?.close();
    nats?.stop();
    killAll();
  });

  const relay = (name) =>
    startRelay({
      natsUrl: nats.url,
      origin: pages.origin,
      name,
      registry: { bucket: "client-js-presence", leaseSeconds: LEASE_S },
      bindings: [
        {
          channel: "rooms.{room}",
          subject: "rooms.{room}",
          direction: "both",
          presence: { info: ["claims.name"], leaveGraceSeconds: GRACE_S },
        },
      ],
    });
  const since = (events, at) => events.filter((e) => e.at >= at);
  const members = async (client) => (await p.presenceOf(client, CH)).members.map((m) => [m.key, m.info.name]).sort();

  test("members across relays; two tabs are one member; a relay SIGKILLed makes no leave/join pair; a leave after the grace", async () => {
    const a = await relay("pres-a");
    const b = await relay("pres-b");
    const svcA = await startService([a]);
    const svcB = await startService([b, a]); // to b while it is ready, then to a
    const url = (svc) => `ws://127.0.0.1:${svc.port}/ws`;
    try {
      await p.open("alice", url(svcA), "alice", { claims: { name: "Alice" } });
      await p.subscribe("alice", CH, { presence: true });
      await p.waitPresence("alice's first list", "alice", CH, "presence", 1);
      assert.deepEqual(await members("alice"), [["alice", "Alice"]], "the snapshot holds the subscriber itself");

      // Bob, on the other relay: each sees the other.
      await p.open("bob", url(svcB), "bob", { claims: { name: "Bob" } });
      await p.subscribe("bob", CH, { presence: true });
      const [bobFirst] = (await p.waitPresence("bob's first list", "bob", CH, "presence", 1)).filter((e) => e.kind === "presence");
      assert.deepEqual(bobFirst.keys, ["alice", "bob"]);
      assert.equal(bobFirst.initial, true);
      const aliceEv = await p.waitPresence("alice to see bob join", "alice", CH, "join", 1);
      assert.deepEqual(aliceEv.filter((e) => e.kind === "join").map((e) => [e.key, e.info.name]), [["bob", "Bob"]]);

      // A second tab of alice's, on relay b: the same member, no join anywhere.
      await p.open("alice2", url(svcB), "alice", { claims: { name: "Alice" } });
      await p.subscribe("alice2", CH, { presence: true });
      await p.waitPresence("alice2's first list", "alice2", CH, "presence", 1);
      // The counts say the relays saw the third connection (occupancy: at most one a second).
      await waitFor("alice's occupancy to count 3 connections", 10_000, async () =>
        (await p.presenceEvents("alice", CH)).some((e) => e.kind === "occupancy" && e.clients === 3),
      );
      const joins = async (c) => (await p.presenceEvents(c, CH)).filter((e) => e.kind === "join").map((e) => e.key);
      assert.deepEqual(await joins("alice"), ["bob"], "no join for alice's second connection");
      assert.deepEqual(await joins("bob"), [], "nor at bob's");

      // SIGKILL relay b: bob and alice2 reconnect through svcB to relay a, within the grace.
      const killedAt = Date.now();
      await b.kill();
      await p.waitPresence("bob's list after the reconnect", "bob", CH, "presence", 2, 20_000);
      // Relay a purges b's entries (the lease expires) and counts 3 connections again.
      await waitFor("alice's occupancy to count 3 after b's entries are gone", (LEASE_S + GRACE_S) * 1000 + 15_000, async () =>
        since(await p.presenceEvents("alice", CH), killedAt).some((e) => e.kind === "occupancy" && e.clients === 3),
      );
      const aliceAfter = since(await p.presenceEvents("alice", CH), killedAt).filter((e) => e.kind === "join" || e.kind === "leave");
      assert.deepEqual(aliceAfter, [], "no leave/join pair for bob (nor for alice's moved tab)");
      const bobAfter = since(await p.presenceEvents("bob", CH), killedAt);
      assert.deepEqual(
        bobAfter.filter((e) => e.kind !== "occupancy").map((e) => [e.kind, e.keys ?? e.key, e.initial]),
        [["presence", ["alice", "bob"], false]],
        "the resync's snapshot overlaps the old list: no join, no leave",
      );
      assert.deepEqual(await members("bob"), [["alice", "Alice"], ["bob", "Bob"]]);

      // Bob leaves for good: alice sees it after the grace.
      const leftAt = Date.now();
      await p.closeClient("bob");
      const ev = await p.waitPresence("alice to see bob leave", "alice", CH, "leave", 1, GRACE_S * 1000 + 15_000);
      const leave = ev.find((e) => e.kind === "leave");
      assert.deepEqual([leave.key, leave.info.name], ["bob", "Bob"]);
      assert.ok(leave.at - leftAt >= GRACE_S * 1000 - 250, `the leave came ${leave.at - leftAt} ms after bob closed`);
      assert.deepEqual(await members("alice"), [["alice", "Alice"]]);
    } finally {
      for (const c of ["alice", "alice2", "bob"]) await p.closeClient(c);
      svcA.close();
      svcB.close();
      await a.kill();
      await b.kill();
    }
  });
});

// The protocol extensions the relay does not serve yet, in a real browser: headless Chromium
// runs the built SDK against a scripted relay (test/browser/wsserver.mjs) that sends exactly
// the frames and close codes documented for them: 4401 / 4403 after the upgrade, resume
// positions (seq, prev, epoch, since, recovered), `unsubscribed` with a reason, `dropped` with a
// channel, the in-band `refresh`, and subscription tokens (`subrefresh`, `expired`,
// `forbidden`, the backend's `data` and `appCode`), and presence (a paged snapshot, join /
// leave / occupancy, a reconnect's snapshot overlapping the old list). When the relay implements them, browser.test.mjs gets the
// same cases against the real thing; until then these pin the client's side of the contract.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { chromiumBin, launchBrowser, pageApi, sleep, startPageServer, waitFor } from "./harness.mjs";
import { startScriptedRelay } from "./wsserver.mjs";

const missing = !chromiumBin();
if (missing && process.env.WSRELAY_REQUIRE_BROWSER === "1") throw new Error("browser tests need chromium (make deps, or CHROMIUM)");

describe("@wsrelay/client in headless Chromium against a scripted relay (protocol extensions)", { skip: missing && "chromium missing" }, () => {
  let pages, browser, page, relay, p;

  before(async () => {
    pages = await startPageServer();
    relay = await startScriptedRelay();
    browser = await launchBrowser();
    page = await browser.context.newPage();
    page.on("pageerror", (e) => console.error("page error:", e));
    await page.goto(pages.origin + "/");
    await page.waitForFunction(() => window.T?.ready === true, null, { timeout: 20_000 });
    p = pageApi(page);
  });

  after(async () => {
    await browser?.close();
    relay?.close();
    pages?.close();
  });

  const tokensFor = (sub) => pages.tokenRequests.filter((r) => r.sub === sub).length;
  const msg = (channel, n, prev) => ({ type: "message", channel, payload: { n }, seq: n, prev });

  test("4403 after the upgrade: the app sees the code and reason, and the client stops", async () => {
    await p.open("forbidden", relay.url, "fay");
    const c = await relay.accept();
    assert.deepEqual(c.protocols.slice(0, 1), ["wsrelay.v1"]);
    assert.ok(c.token, "the token travels as bearer.<jwt>");
    c.close(4403, "origin not allowed");
    const [d] = await p.waitLog("the close", "forbidden", "disconnected", 1, 10_000);
    assert.deepEqual([d.code, d.reason, d.willReconnect], [4403, "origin not allowed", false]);
    const [e] = await p.waitLog("the error", "forbidden", "error", 1, 5000);
    assert.deepEqual([e.errorKind, e.error.code], ["closed", 4403]);
    await sleep(1500);
    assert.equal(relay.connections(), 0, "no retry");
  });

  test("4401: getToken before each retry, stop after maxAuthFailures (3) and report", async () => {
    const before = tokensFor("ian");
    await p.open("unauth", relay.url, "ian");
    for (let i = 0; i < 3; i++) {
      const c = await relay.accept(5000);
      c.close(4401, "invalid token");
    }
    const [e] = await p.waitLog("the final error", "unauth", "error", 1, 10_000);
    assert.equal(e.error.code, 4401);
    assert.equal(tokensFor("ian") - before, 3, "a new token for each attempt");
    const d = await p.log("unauth", "disconnected");
    assert.deepEqual(d.map((x) => x.willReconnect), [true, true, false]);
    await sleep(1500);
    assert.equal(relay.connections(), 0, "stopped");
  });

  test("resume: since on resubscribe, replay without duplicates, recovered surfaced; unavailable, dropped, gap, new epoch, ended", async () => {
    const ch = "orders.7";
    await p.open("resume", relay.url, "rae");
    const c1 = await relay.accept();
    c1.welcome();
    await p.subscribe("resume", ch);
    const s1 = await c1.nextOfType("subscribe");
    assert.equal(s1.since, undefined);
    c1.send({ type: "ok", id: s1.id, epoch: "E1", seq: 10 });
    c1.send(msg(ch, 11, 10));
    c1.send(msg(ch, 12, 11));
    await p.waitMessages("resume", ch, 2);

    // A drain: the relay closes at the turn, the client comes back with its position.
    c1.send({ type: "drain", reconnectAfterMs: 300 });
    await sleep(300);
    c1.close(1012, "service restart");
    const c2 = await relay.accept();
    c2.welcome();
    const s2 = await c2.nextOfType("subscribe");
    assert.deepEqual(s2.since, { epoch: "E1", seq: 12 });
    c2.send({ type: "ok", id: s2.id, epoch: "E1", seq: 14, recovered: true });
    c2.send(msg(ch, 12, 11)); // the replay overlaps what was delivered
    c2.send(msg(ch, 13, 12));
    c2.send(msg(ch, 14, 13));
    await p.waitMessages("resume", ch, 4);
    let ctx = await p.waitSubscribed("resume", ch, 2);
    assert.deepEqual(
      ctx.map((c) => [c.resumable, c.recovering, c.recovered, c.resubscribed, c.epoch]),
      [
        [true, false, false, false, "E1"],
        [true, true, true, true, "E1"],
      ],
    );

    // A named dropped notice.
    c2.send({ type: "dropped", channel: ch, count: 2 });
    const [dropped] = await p.waitLog("the dropped notice", "resume", "dropped", 1, 5000);
    assert.deepEqual([dropped.count, dropped.channel], [2, ch]);

    // The relay lost its NATS subscription: transient, the client resubscribes from 14.
    c2.send({ type: "unsubscribed", channel: ch, reason: "unavailable" });
    const s3 = await c2.nextOfType("subscribe", 5000);
    assert.deepEqual(s3.since, { epoch: "E1", seq: 14 });
    c2.send({ type: "ok", id: s3.id, epoch: "E1", seq: 14, recovered: true });
    await p.waitSubscribed("resume", ch, 3);

    // A gap on live delivery (prev 18 never seen): resync from 14.
    c2.send(msg(ch, 20, 18));
    const u = await c2.nextOfType("unsubscribe", 5000);
    const s4 = await c2.nextOfType("subscribe", 5000);
    assert.equal(u.channel, ch);
    assert.deepEqual(s4.since, { epoch: "E1", seq: 14 });
    c2.send({ type: "ok", id: u.id });
    c2.send({ type: "ok", id: s4.id, epoch: "E1", seq: 20, recovered: true });
    c2.send(msg(ch, 18, 14));
    c2.send(msg(ch, 20, 18));
    const got = await p.waitMessages("resume", ch, 6);
    assert.deepEqual(got.map((m) => m.n), [11, 12, 13, 14, 18, 20], "each once, in order");

    // Connection lost, and the stream was recreated meanwhile: not recovered, new epoch.
    c2.close(1011, "internal error");
    const c3 = await relay.accept();
    c3.welcome();
    const s5 = await c3.nextOfType("subscribe");
    assert.deepEqual(s5.since, { epoch: "E1", seq: 20 });
    c3.send({ type: "ok", id: s5.id, epoch: "E2", seq: 3, recovered: false });
    ctx = await p.waitSubscribed("resume", ch, 5);
    assert.deepEqual([ctx[4].recovered, ctx[4].resubscribed, ctx[4].epoch, ctx[4].seq], [false, true, "E2", 3]);
    c3.send(msg(ch, 4, 3));
    assert.deepEqual((await p.waitMessages("resume", ch, 7)).at(-1), { n: 4 });

    // The binding was removed: the subscription ends, no resubscribe.
    c3.send({ type: "unsubscribed", channel: ch, reason: "binding removed" });
    const [end] = await p.waitLog("the end", "resume", "sub-unsubscribed", 1, 5000);
    assert.deepEqual([end.reason, end.byRelay], ["binding removed", true]);
    await sleep(1200);
    assert.equal(c3.frames.filter((f) => f.type === "subscribe").length, 1);
    await p.closeClient("resume");
  });

  test("in-band token refresh twice on one connection; a refused one (403) reconnects with the new token", async () => {
    await p.open("inband", relay.url, "ina", { ttl: 7 });
    const c = await relay.accept();
    c.welcome();
    const seen = [c.token];
    for (let i = 0; i < 2; i++) {
      // 80% of the life but at least 5 s before expiry: about 2 s into a 7 s token.
      const r = await c.nextOfType("refresh", 8000);
      assert.ok(r.token && !seen.includes(r.token), "a new token each time");
      seen.push(r.token);
      c.send({ type: "ok", id: r.id });
    }
    const tokens = await p.waitLog("two in-band refreshes", "inband", "token", 2, 5000);
    assert.ok(tokens.every((t) => t.inBand === true));
    assert.equal((await p.log("inband", "connected")).length, 1, "one connection throughout");
    assert.equal(relay.connections(), 0);

    const r3 = await c.nextOfType("refresh", 8000);
    c.send({ type: "error", id: r3.id, code: 403, reason: "the token names another identity" });
    const c2 = await relay.accept();
    assert.equal(c2.token, r3.token, "reconnected with the refreshed token");
    const d = await p.waitLog("the deliberate close", "inband", "disconnected", 1, 5000);
    assert.equal(d[0].code, 4903);
    c2.welcome();
    await waitFor("connected again", 5000, async () => (await p.log("inband", "connected")).length === 2);
    await p.closeClient("inband");
  });
  test("subscription tokens, backend data and appCode: the frames of docs/protocol.md sections 2-3", async () => {
    const claims = (jwt) => JSON.parse(atob(jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
    const asked = pages.subTokenRequests.length;
    await p.open("authz", relay.url, "zoe", { subTokenTtl: 7 });
    const c = await relay.accept();
    c.welcome({ data: { plan: "pro" } });
    const [conn] = await p.waitLog("connected", "authz", "connected", 1, 5000);
    assert.deepEqual(conn.data, { plan: "pro" }, "welcome.data reaches the app");

    // subscribe carries a token for that channel; the ok's data reaches `subscribed`.
    await p.subscribe("authz", "orders.42");
    const s1 = await c.nextOfType("subscribe");
    assert.deepEqual([claims(s1.token).channel, claims(s1.token).sub], ["orders.42", "zoe"]);
    c.send({ type: "ok", id: s1.id, data: { status: "shipped" } });
    const [ctx] = await p.waitSubscribed("authz", "orders.42", 1);
    assert.deepEqual(ctx.data, { status: "shipped" });

    // subrefresh before its exp (about 2 s into a 7 s token), with a token that expires later.
    const r = await c.nextOfType("subrefresh", 8000);
    assert.equal(r.channel, "orders.42");
    assert.ok(claims(r.token).exp > claims(s1.token).exp);
    c.send({ type: "ok", id: r.id });
    const [tok] = await p.waitLog("the token event", "authz", "sub-token", 1, 5000);
    assert.equal(tok.expiresAt, claims(r.token).exp * 1000);

    // expired: a new token and a subscribe again.
    const before = pages.subTokenRequests.length;
    c.send({ type: "unsubscribed", channel: "orders.42", reason: "expired" });
    const s2 = await c.nextOfType("subscribe", 5000);
    assert.equal(s2.channel, "orders.42");
    // (Compared by requests: a token signed within the same second as the last is the same string.)
    assert.equal(pages.subTokenRequests.length - before, 1, "a token fetched anew");
    assert.ok(claims(s2.token).exp >= claims(r.token).exp);
    c.send({ type: "ok", id: s2.id });
    const subs = await p.waitSubscribed("authz", "orders.42", 2);
    assert.equal(subs[1].resubscribed, true);
    const reasons = (await p.log("authz", "sub-subscribing")).map((e) => e.reason);
    assert.deepEqual(reasons, ["expired"], "(the first, \"subscribe\", is emitted before the page listens)");

    // A backend's deny with its own code: 403 and appCode on the subscription's end.
    await p.subscribe("authz", "orders.43");
    const s3 = await c.nextOfType("subscribe");
    c.send({ type: "error", id: s3.id, code: 403, reason: "not your order", appCode: 4040 });
    const [denied] = await p.waitLog("the deny", "authz", "sub-unsubscribed", 1, 5000, (e) => e.channel === "orders.43");
    assert.deepEqual([denied.code, denied.appCode, denied.reason, denied.byRelay], [403, 4040, "not your order", true]);

    // forbidden (after a connection refresh): the subscription ends for good.
    c.send({ type: "unsubscribed", channel: "orders.42", reason: "forbidden" });
    const [gone] = await p.waitLog("the end", "authz", "sub-unsubscribed", 1, 5000, (e) => e.channel === "orders.42");
    assert.deepEqual([gone.reason, gone.byRelay], ["forbidden", true]);
    await sleep(1500);
    assert.equal(c.frames.filter((f) => f.type === "subscribe").length, 3, "no subscribe after forbidden");
    assert.equal(c.frames.filter((f) => f.type === "subrefresh").length, 1, "no subrefresh for an ended subscription");
    assert.deepEqual(
      pages.subTokenRequests.slice(asked).map((q) => q.channel),
      ["orders.42", "orders.42", "orders.42", "orders.43"],
      "subscribe, subrefresh, after expired; and the other channel",
    );
    await p.closeClient("authz");
  });
  test("presence: a paged snapshot, live join / leave / occupancy, a reconnect resync with overlap (no duplicate join, no leave/join pair)", async () => {
    const ch = "rooms.7";
    const member = (key, clients = 1) => ({ key, info: { name: key.toUpperCase() }, clients });
    await p.open("pres", relay.url, "alice");
    const c1 = await relay.accept();
    c1.welcome();
    await p.subscribe("pres", ch, { presence: true });
    const s1 = await c1.nextOfType("subscribe");
    assert.equal(s1.presence, true);
    // A snapshot in two pages; bob joins (already paged: folded in, not reported) while the
    // second page is asked.
    c1.send({ type: "ok", id: s1.id, presence: { members: [member("alice", 2), member("bob")], clients: 4, users: 3, complete: false, next: "bob" } });
    const r1 = await c1.nextOfType("presence");
    assert.deepEqual([r1.channel, r1.after], [ch, "bob"]);
    c1.send({ type: "join", channel: ch, member: { key: "dave", info: { name: "DAVE" } } });
    c1.send({ type: "ok", id: r1.id, presence: { members: [member("carol"), member("dave")], clients: 5, users: 4, complete: true } });
    let ev = await p.waitPresence("the first list", "pres", ch, "presence", 1);
    assert.deepEqual(ev.map((e) => [e.kind, e.keys ?? e.key, e.initial]), [["presence", ["alice", "bob", "carol", "dave"], true]]);
    // Live.
    c1.send({ type: "join", channel: ch, member: { key: "erin", info: { name: "ERIN" } } });
    c1.send({ type: "leave", channel: ch, member: { key: "bob", info: { name: "BOB" } } });
    c1.send({ type: "occupancy", channel: ch, clients: 5, users: 4, events: true });
    ev = await p.waitPresence("the occupancy", "pres", ch, "occupancy", 1);
    assert.deepEqual(ev.slice(1).map((e) => [e.kind, e.key ?? e.users]), [["join", "erin"], ["leave", "bob"], ["occupancy", 4]]);
    let view = await p.presenceOf("pres", ch);
    assert.deepEqual(view.members.map((m) => m.key).sort(), ["alice", "carol", "dave", "erin"]);
    assert.deepEqual(view.occupancy, { clients: 5, users: 4, events: true });
    assert.equal(view.synced, true);

    // The relay goes away; meanwhile carol left and frank joined; alice, dave, erin stayed.
    c1.close(1011, "internal error");
    const c2 = await relay.accept();
    c2.welcome();
    const s2 = await c2.nextOfType("subscribe");
    assert.equal(s2.presence, true);
    c2.send({ type: "ok", id: s2.id, presence: { members: [member("alice", 1), member("dave")], clients: 4, users: 4, complete: false, next: "dave" } });
    const r2 = await c2.nextOfType("presence");
    assert.equal(r2.after, "dave");
    c2.send({ type: "ok", id: r2.id, presence: { members: [member("erin"), member("frank")], clients: 4, users: 4, complete: true } });
    ev = await p.waitPresence("the second list", "pres", ch, "presence", 2);
    const after = ev.slice(4);
    assert.deepEqual(after.map((e) => [e.kind, e.key ?? e.keys, e.initial]), [
      ["leave", "carol", undefined],
      ["join", "frank", undefined],
      ["presence", ["alice", "dave", "erin", "frank"], false],
    ]);
    view = await p.presenceOf("pres", ch);
    assert.deepEqual(view.members.map((m) => [m.key, m.clients]), [["alice", 1], ["dave", 1], ["erin", 1], ["frank", 1]]);
    await p.closeClient("pres");
  });
});

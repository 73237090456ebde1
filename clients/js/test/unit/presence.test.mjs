// Presence (docs/protocol.md section 10) with a fake clock and a fake WebSocket: the relay's side
// sends exactly the frames the protocol documents (a subscribe's `ok` with `presence`, `presence`
// pages, `join` / `leave` / `occupancy`), and the tests assert the member map and the events.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Client, PresenceTracker, compareKeys } from "../../dist/esm/index.js";
import { FakeClock, fakeWebSocketClass, flush } from "./fakes.mjs";

function setup(client = {}) {
  const clock = new FakeClock();
  const WS = fakeWebSocketClass();
  const c = new Client({
    url: "ws://relay.test/ws",
    WebSocket: WS,
    clock,
    random: () => 0.5,
    pingIntervalMs: 0,
    token: null,
    ...client,
  });
  const errors = [];
  c.on("error", (e) => errors.push(e));
  return { clock, WS, client: c, errors, last: () => WS.all[WS.all.length - 1] };
}

async function connected(t) {
  t.client.connect();
  await t.clock.advance(0);
  t.last().accept();
  await flush();
  return t.last();
}

/** Records a subscription's presence events, in order, as [name, key] (or [name, ...] for the rest). */
function record(sub) {
  const log = [];
  sub.on("join", (m) => log.push(["join", m.key]));
  sub.on("leave", (m) => log.push(["leave", m.key]));
  sub.on("occupancy", (o) => log.push(["occupancy", o.clients, o.users, o.events]));
  sub.on("presence", (p) => log.push(["presence", [...p.members.keys()], p.initial]));
  sub.on("error", (e) => log.push(["error", e.code]));
  return log;
}

const m = (key, clients = 1, info = {}) => ({ key, info, clients });
const page = (members, extra = {}) => ({
  members,
  clients: members.reduce((n, x) => n + x.clients, 0),
  users: members.length,
  complete: true,
  ...extra,
});
const keys = (sub) => [...sub.presence().keys()];

test("presence: subscribe sends presence: true; the snapshot fills presence() and occupancy(); live join, leave, occupancy", async () => {
  const t = setup();
  const ws = await connected(t);
  const plain = t.client.subscribe("chat.lobby");
  assert.equal(ws.last("subscribe").presence, undefined, "a plain subscribe does not ask");
  ws.ok("subscribe");
  const sub = t.client.subscribe("rooms.7", { presence: true });
  const log = record(sub);
  const s = ws.last("subscribe");
  assert.equal(s.presence, true);
  assert.equal(sub.presenceSynced, false);
  assert.equal(sub.presence().size, 0, "empty until the snapshot");
  ws.push({
    type: "ok",
    id: s.id,
    presence: page([m("alice", 2, { name: "Alice" }), m("bob", 1, { name: "Bob" })]),
  });
  assert.equal(sub.state, "subscribed");
  assert.equal(sub.presenceSynced, true);
  assert.deepEqual(keys(sub), ["alice", "bob"]);
  assert.deepEqual(sub.presence().get("alice"), { key: "alice", info: { name: "Alice" }, clients: 2 });
  assert.deepEqual(sub.occupancy(), { clients: 3, users: 2, events: undefined }, "a snapshot does not say events");
  assert.deepEqual(log, [["presence", ["alice", "bob"], true]], "the first list is one event, not a join per member");
  assert.equal(ws.ofType("presence").length, 0, "a complete snapshot needs no page");

  ws.push({ type: "join", channel: "rooms.7", member: { key: "carol", info: { name: "Carol" } } });
  ws.push({ type: "join", channel: "rooms.7", member: { key: "carol", info: { name: "Carol" } } }); // a second one: not reported
  ws.push({ type: "leave", channel: "rooms.7", member: { key: "bob", info: { name: "Bob" } } });
  ws.push({ type: "leave", channel: "rooms.7", member: { key: "nobody", info: {} } }); // not a member: not reported
  ws.push({ type: "occupancy", channel: "rooms.7", clients: 3, users: 2, events: true });
  ws.push({ type: "join", channel: "chat.lobby", member: { key: "x", info: {} } }); // not a presence subscription
  ws.push({ type: "join", channel: "elsewhere", member: { key: "x", info: {} } }); // not subscribed
  assert.deepEqual(log.slice(1), [
    ["join", "carol"],
    ["leave", "bob"],
    ["occupancy", 3, 2, true],
  ]);
  assert.deepEqual(keys(sub), ["alice", "carol"]);
  assert.deepEqual(sub.presence().get("carol"), { key: "carol", info: { name: "Carol" }, clients: 1 });
  assert.deepEqual(sub.occupancy(), { clients: 3, users: 2, events: true });
  assert.equal(plain.presence().size, 0);
  assert.throws(() => sub.presence().set("mallory", {}), "the map the app gets is read-only");
  assert.deepEqual(t.errors, []);
});

test("presence: an incomplete snapshot is paged (after: next, limit) until complete; events meanwhile are folded in", async () => {
  const t = setup();
  const ws = await connected(t);
  assert.throws(() => t.client.subscribe("rooms.big", { presence: true, presencePageSize: 1001 }), RangeError);
  assert.throws(() => t.client.subscribe("rooms.big", { presence: true, presencePageSize: 0 }), RangeError);
  const sub = t.client.subscribe("rooms.big", { presence: true, presencePageSize: 2 });
  const log = record(sub);
  const s = ws.last("subscribe");
  ws.push({ type: "ok", id: s.id, presence: page([m("a"), m("b")], { complete: false, next: "b", clients: 6, users: 6 }) });
  const p1 = ws.last("presence");
  assert.deepEqual({ ...p1, id: undefined }, { type: "presence", channel: "rooms.big", after: "b", limit: 2, id: undefined });
  assert.equal(sub.presenceSynced, false);
  assert.equal(sub.presence().size, 0, "not shown before it is whole");
  // While paging: z joins (beyond the pages so far), a leaves (already paged), y joins and leaves.
  ws.push({ type: "join", channel: "rooms.big", member: { key: "z", info: { n: 26 } } });
  ws.push({ type: "leave", channel: "rooms.big", member: { key: "a", info: {} } });
  ws.push({ type: "join", channel: "rooms.big", member: { key: "y", info: {} } });
  ws.push({ type: "leave", channel: "rooms.big", member: { key: "y", info: {} } });
  ws.push({ type: "occupancy", channel: "rooms.big", clients: 6, users: 6, events: true });
  ws.push({ type: "ok", id: p1.id, presence: page([m("c"), m("d")], { complete: false, next: "d", clients: 6, users: 6 }) });
  const p2 = ws.last("presence");
  assert.deepEqual([p2.after, p2.limit], ["d", 2]);
  assert.notEqual(p2.id, p1.id);
  ws.push({ type: "ok", id: p2.id, presence: page([m("e"), m("z", 2)], { clients: 6, users: 5 }) });
  assert.equal(ws.ofType("presence").length, 2, "complete: no more pages");
  assert.deepEqual(keys(sub).sort(), ["b", "c", "d", "e", "z"]);
  assert.equal(sub.presence().get("z").clients, 2, "the page's count wins over the join's");
  assert.equal(sub.presenceSynced, true);
  assert.deepEqual(log, [
    ["occupancy", 6, 6, true],
    ["presence", ["b", "c", "d", "e", "z"], true],
  ]);
  assert.deepEqual(sub.occupancy(), { clients: 6, users: 5, events: true }, "the last page's counts");
  // Live again after the list is whole.
  ws.push({ type: "leave", channel: "rooms.big", member: { key: "c", info: {} } });
  assert.deepEqual(log.at(-1), ["leave", "c"]);
});

test("presence: a reconnect's snapshot replaces the list: join only for new keys, leave for gone ones, nothing for members in both", async () => {
  const t = setup();
  const ws = await connected(t);
  const sub = t.client.subscribe("rooms.1", { presence: true });
  const log = record(sub);
  ws.push({ type: "ok", id: ws.last("subscribe").id, presence: page([m("alice"), m("bob"), m("carol")]) });
  ws.push({ type: "join", channel: "rooms.1", member: { key: "erin", info: {} } });
  assert.deepEqual(keys(sub), ["alice", "bob", "carol", "erin"]);
  log.length = 0;

  ws.serverClose(1006, "", false);
  assert.equal(sub.state, "subscribing");
  assert.equal(sub.presenceSynced, false);
  assert.deepEqual(keys(sub), ["alice", "bob", "carol", "erin"], "while down: the list as it was");
  await t.clock.advance(5000);
  const ws2 = t.last();
  ws2.accept();
  const s2 = ws2.last("subscribe");
  assert.equal(s2.presence, true, "the resubscribe asks again");
  // Meanwhile alice left and dave joined; bob, carol and erin are in both lists (bob moved
  // relays within his leave grace: the relay sends no pair, and neither may the SDK).
  ws2.push({ type: "ok", id: s2.id, presence: page([m("bob", 0), m("carol")], { complete: false, next: "carol", users: 4 }) });
  ws2.push({ type: "join", channel: "rooms.1", member: { key: "aaron", info: {} } }); // within what is paged: kept
  ws2.push({ type: "leave", channel: "rooms.1", member: { key: "erin", info: {} } });
  ws2.push({ type: "join", channel: "rooms.1", member: { key: "erin", info: {} } }); // erin reloaded her page
  assert.deepEqual(log, [], "nothing reported while the new list is built");
  assert.deepEqual(keys(sub), ["alice", "bob", "carol", "erin"]);
  const p = ws2.last("presence");
  assert.equal(p.after, "carol");
  ws2.push({ type: "ok", id: p.id, presence: page([m("dave"), m("erin")], { users: 5 }) });
  assert.deepEqual(keys(sub).sort(), ["aaron", "bob", "carol", "dave", "erin"]);
  assert.deepEqual(log, [
    ["leave", "alice"],
    ["join", "aaron"],
    ["join", "dave"],
    ["presence", [...sub.presence().keys()], false],
  ]);
  const joins = log.filter((e) => e[0] === "join").map((e) => e[1]).sort();
  assert.deepEqual(joins, ["aaron", "dave"], "no join for bob, carol or erin");
  assert.equal(sub.presenceSynced, true);
  assert.equal(sub.presence().get("bob").clients, 0, "in his leave grace");
});

test("presence: a resync after a gap (unsubscribe, subscribe since) takes the new snapshot the same way", async () => {
  const t = setup();
  const ws = await connected(t);
  const sub = t.client.subscribe("rooms.h", { presence: true });
  const log = record(sub);
  ws.push({ type: "ok", id: ws.last("subscribe").id, epoch: "E", seq: 10, presence: page([m("a"), m("b")]) });
  ws.push({ type: "message", channel: "rooms.h", payload: 1, seq: 11, prev: 10 });
  ws.push({ type: "message", channel: "rooms.h", payload: 2, seq: 15, prev: 14 }); // a hole: resync
  const s2 = ws.last("subscribe");
  assert.deepEqual([s2.since, s2.presence], [{ epoch: "E", seq: 11 }, true]);
  ws.push({ type: "join", channel: "rooms.h", member: { key: "late", info: {} } }); // the old subscription's
  ws.ok("unsubscribe");
  ws.push({ type: "ok", id: s2.id, epoch: "E", seq: 15, recovered: true, presence: page([m("b"), m("c")]) });
  assert.deepEqual(keys(sub), ["b", "c"]);
  assert.deepEqual(log.slice(1), [["leave", "a"], ["join", "c"], ["presence", ["b", "c"], false]]);
});

test("presence: above maxMembersWithEvents (events: false) the list is as last paged; fetchPresence() pages it again; events on again: paged by itself", async () => {
  const t = setup();
  const ws = await connected(t);
  const sub = t.client.subscribe("stadium", { presence: true });
  const log = record(sub);
  ws.push({ type: "ok", id: ws.last("subscribe").id, presence: page([m("a"), m("b")]) });
  ws.push({ type: "occupancy", channel: "stadium", clients: 900, users: 850, events: false });
  assert.deepEqual(sub.occupancy(), { clients: 900, users: 850, events: false });
  assert.deepEqual(keys(sub), ["a", "b"], "not kept up to date: as last paged");
  log.length = 0;

  const fetched = sub.fetchPresence();
  const again = sub.fetchPresence(); // joins the paging under way
  const f1 = ws.last("presence");
  assert.equal(f1.after, undefined, "from the first key");
  assert.equal(ws.ofType("presence").length, 1, "one paging for both calls");
  ws.push({ type: "ok", id: f1.id, presence: page([m("b"), m("c")], { complete: false, next: "c", clients: 900, users: 850 }) });
  const f2 = ws.last("presence");
  assert.equal(f2.after, "c");
  ws.push({ type: "ok", id: f2.id, presence: page([m("d")], { clients: 901, users: 851 }) });
  const list = await fetched;
  assert.equal(await again, list);
  assert.deepEqual([...list.keys()], ["b", "c", "d"]);
  assert.deepEqual(log, [["leave", "a"], ["join", "c"], ["join", "d"], ["presence", ["b", "c", "d"], false]]);
  assert.deepEqual(sub.occupancy(), { clients: 901, users: 851, events: false });
  log.length = 0;

  // Below the threshold again: the list missed the changes made without events, so the SDK
  // pages it again by itself.
  const n = ws.ofType("presence").length;
  ws.push({ type: "occupancy", channel: "stadium", clients: 150, users: 140, events: true });
  assert.equal(ws.ofType("presence").length, n + 1);
  ws.push({ type: "join", channel: "stadium", member: { key: "e", info: {} } }); // folded into that list
  ws.push({ type: "ok", id: ws.last("presence").id, presence: page([m("c"), m("d"), m("e")]) });
  assert.deepEqual(log, [["occupancy", 150, 140, true], ["leave", "b"], ["join", "e"], ["presence", ["c", "d", "e"], false]]);
  ws.push({ type: "occupancy", channel: "stadium", clients: 151, users: 141, events: true });
  assert.equal(ws.ofType("presence").length, n + 1, "on to on: no paging");
});

test("presence: a page refused with 503 is asked again after a backoff; other refusals are reported and fetchPresence() rejects", async () => {
  const t = setup();
  const ws = await connected(t);
  const sub = t.client.subscribe("rooms.2", { presence: true });
  const log = record(sub);
  ws.push({ type: "ok", id: ws.last("subscribe").id, presence: page([m("a")], { complete: false, next: "a" }) });
  const p1 = ws.last("presence");
  ws.push({ type: "error", id: p1.id, code: 503, reason: "presence unavailable" });
  assert.equal(ws.ofType("presence").length, 1);
  await t.clock.advance(750); // backoff step 0 with random 0.5: 750 ms
  const p2 = ws.last("presence");
  assert.notEqual(p2.id, p1.id);
  assert.equal(p2.after, "a", "the same page again");
  ws.push({ type: "ok", id: p2.id, presence: page([m("b")]) });
  assert.deepEqual(keys(sub), ["a", "b"]);
  assert.deepEqual(t.errors, []);

  const fetched = sub.fetchPresence();
  ws.push({ type: "error", id: ws.last("presence").id, code: 400, reason: "the channel's binding has no presence" });
  await assert.rejects(fetched, (e) => e.code === 400);
  assert.deepEqual(log.at(-1), ["error", 400]);
  assert.deepEqual(t.errors.map((e) => [e.kind, e.error.code]), [["presence", 400]]);
  assert.deepEqual(keys(sub), ["a", "b"], "the old list stays");
  assert.equal(sub.presenceSynced, true, "and live events still keep it");

  // Three 503 in a row after the first: given up, reported.
  const gaveUp = assert.rejects(sub.fetchPresence(), (e) => e.code === 503);
  for (let i = 0; i < 4; i++) {
    ws.push({ type: "error", id: ws.last("presence").id, code: 503, reason: "presence unavailable" });
    await t.clock.advance(5000); // past the backoff (750, 1250, 2250 ms), before the request timeout
  }
  await gaveUp;
  assert.equal(ws.ofType("presence").length, 2 + 1 + 4, "4 tries of that page");
});

test("presence: a connection lost while paging drops that paging (its late replies too); the resubscribe's snapshot takes over", async () => {
  const t = setup();
  const ws = await connected(t);
  const sub = t.client.subscribe("rooms.3", { presence: true });
  const log = record(sub);
  ws.push({ type: "ok", id: ws.last("subscribe").id, presence: page([m("a")]) });
  const waiting = sub.fetchPresence();
  const stale = ws.last("presence");
  ws.serverClose(1006, "", false);
  await t.clock.advance(5000);
  const ws2 = t.last();
  ws2.accept();
  ws2.push({ type: "ok", id: stale.id, presence: page([m("stale")]) }); // an id of the old connection: not ours
  ws2.push({ type: "ok", id: ws2.last("subscribe").id, presence: page([m("a"), m("b")]) });
  assert.deepEqual([...(await waiting).keys()], ["a", "b"], "fetchPresence() resolves with the resubscribe's list");
  assert.equal(ws2.ofType("presence").length, 0);
  assert.deepEqual(log.slice(1), [["join", "b"], ["presence", ["a", "b"], false]]);
  // Stopped: waiting calls reject, new ones too; unsubscribed likewise.
  const w2 = sub.fetchPresence();
  t.client.disconnect();
  await assert.rejects(w2, (e) => e.code === "not_connected");
  await assert.rejects(sub.fetchPresence(), (e) => e.code === "not_connected");
  sub.unsubscribe();
  await assert.rejects(sub.fetchPresence(), (e) => e.code === "unsubscribed");
});

test("presence: fetchPresence() on a plain subscription reads the list once (no events keep it)", async () => {
  const t = setup();
  const ws = await connected(t);
  const sub = t.client.subscribe("rooms.4");
  const pending = sub.fetchPresence(); // before the ok: sent once subscribed
  assert.equal(ws.ofType("presence").length, 0);
  ws.ok("subscribe");
  const r = ws.last("presence");
  assert.equal(r.channel, "rooms.4");
  ws.push({ type: "ok", id: r.id, presence: page([m("x", 1, { name: "X" })]) });
  assert.deepEqual([...(await pending).values()], [{ key: "x", info: { name: "X" }, clients: 1 }]);
  ws.push({ type: "join", channel: "rooms.4", member: { key: "y", info: {} } });
  assert.deepEqual(keys(sub), ["x"], "a plain subscription gets no events (and ignores stray ones)");
});

test("presence: a page that does not advance, or an ok without presence, ends the paging with an error", async () => {
  const t = setup();
  const ws = await connected(t);
  const sub = t.client.subscribe("rooms.5", { presence: true });
  ws.push({ type: "ok", id: ws.last("subscribe").id, presence: page([m("b")], { complete: false, next: "b" }) });
  ws.push({ type: "ok", id: ws.last("presence").id, presence: page([], { complete: false, next: "a" }) });
  assert.equal(ws.ofType("presence").length, 1, "not asked again: it would never end");
  assert.deepEqual(t.errors.map((e) => [e.kind, e.error.code]), [["presence", 400]]);
  const f = sub.fetchPresence();
  ws.ok("presence");
  await assert.rejects(f, (e) => e.code === 400 && /without presence/.test(e.reason));
});

test("presence (pure): keys in UTF-8 byte order; a page is the truth for its range; joins and leaves fold into a build", () => {
  assert.ok(compareKeys("a", "b") < 0 && compareKeys("b", "a") > 0 && compareKeys("a", "a") === 0);
  assert.ok(compareKeys("a", "ab") < 0);
  // U+FFFD sorts below U+1F600 in UTF-8 (EF BF BD < F0 9F 98 80), above it in UTF-16 code units.
  assert.ok("\u{1F600}" < "\uFFFD", "JavaScript's order differs");
  assert.ok(compareKeys("\uFFFD", "\u{1F600}") < 0);
  const sorted = ["\u{1F600}", "z", "\uFFFD", "é", "A"].sort(compareKeys);
  assert.deepEqual(sorted, ["A", "z", "é", "\uFFFD", "\u{1F600}"]);
  assert.deepEqual(
    sorted.map((k) => Buffer.from(k)),
    [...sorted].map((k) => Buffer.from(k)).sort(Buffer.compare),
  );

  const p = new PresenceTracker();
  p.begin();
  assert.equal(p.page(undefined, { members: [{ key: "b", info: {}, clients: 1 }], clients: 1, users: 1, complete: false, next: "b" }), "b");
  p.join("k", {}); // beyond b: the page covering k decides
  p.join("a", {}); // within what was paged: kept
  assert.equal(p.page("b", { members: [{ key: "m", info: {}, clients: 1 }], clients: 3, users: 3, complete: false, next: "m" }), "m");
  assert.equal(p.page("m", { members: [], clients: 3, users: 3, complete: true }), undefined);
  const d = p.finish();
  assert.deepEqual([...p.members.keys()].sort(), ["a", "b", "m"]);
  assert.equal(d.initial, true);
  assert.throws(() => {
    p.begin();
    p.page("m", { members: [], clients: 0, users: 0, complete: false, next: "m" });
  }, /does not advance/);
});

// The browser test against a gateway's Service on a cluster: run by e2e/tests/browser.rs (make
// e2e), which creates the gateway (a binding with history), runs this script, and disrupts the
// relay pods when told to. Headless Debian Chromium loads test/browser/page.html, which uses the
// built SDK (dist/esm), connects through the Service with a JWT and subscribes to a resumable
// channel while this script publishes on NATS at a steady rate (with WSRELAY_E2E_SSE=1, a second
// page whose WebSocket is blocked does the same over SSE + POST). Each round: the script prints
// `DISRUPT <i>` once the page is subscribed and receiving, and the test answers `DISRUPTED <i>`
// on stdin after it killed or deleted the relay pod holding the connection; the page must
// reconnect by itself and resume with `recovered: true`. At the end every published message
// must have arrived once, in order, with an unbroken position chain. The last line is
// `FIGURES {json}`; the exit code is 0 only when everything held.
//
// Not part of `npm test` (the name does not match *.test.mjs): it needs a cluster. Env:
//   WSRELAY_E2E_URL       the gateway's WebSocket URL through its Service (ws://10.96.x.y:80/ws)
//   WSRELAY_E2E_HMAC_KEY  the HS256 key the gateway verifies tokens with (iss https://issuer.test, aud wsrelay)
//   WSRELAY_E2E_NATS_URL  where this script publishes (nats://127.0.0.1:14222)
//   WSRELAY_E2E_SUBJECT   the NATS subject behind WSRELAY_E2E_CHANNEL
//   WSRELAY_E2E_CHANNEL   the resumable channel the page subscribes to
//   WSRELAY_E2E_ROUNDS    how many disruptions (default 1)
//   WSRELAY_E2E_SSE       1: a second page whose WebSocket is blocked subscribes too, over the
//                         SSE fallback (the Service has sessionAffinity: None: its POSTs may
//                         reach any relay pod, which forwards them to the session's); it also
//                         publishes PUBLISHES messages before the first disruption and as many
//                         after the last, on WSRELAY_E2E_PUB_CHANNEL (NATS subject
//                         WSRELAY_E2E_PUB_SUBJECT), and counts its POSTs: none may be refused
//                         with 404, and at least 2 * PUBLISHES are made
import assert from "node:assert/strict";
import { createInterface } from "node:readline";
import { launchBrowser, natsClient, pageApi, sleep, startPageServer, waitFor } from "./harness.mjs";

const env = (k, d) => {
  const v = process.env[k] ?? d;
  if (v === undefined) throw new Error(`${k} is not set (this script is run by e2e/tests/browser.rs)`);
  return v;
};
const url = env("WSRELAY_E2E_URL");
env("WSRELAY_E2E_HMAC_KEY"); // read by the harness, which signs the page's tokens with it
const natsUrl = new URL(env("WSRELAY_E2E_NATS_URL"));
const subject = env("WSRELAY_E2E_SUBJECT");
const channel = env("WSRELAY_E2E_CHANNEL");
const rounds = Number(env("WSRELAY_E2E_ROUNDS", "1"));
const sse = env("WSRELAY_E2E_SSE", "0") === "1";
const pubChannel = sse ? env("WSRELAY_E2E_PUB_CHANNEL") : undefined;
const pubSubject = sse ? env("WSRELAY_E2E_PUB_SUBJECT") : undefined;
/** Messages the SSE page publishes before the first disruption, and again after the last. */
const PUBLISHES = 100;
/** Messages a second, and how many after the last resume before stopping. */
const RATE = 20;
const TAIL = 20;
const MAX_MESSAGES = 4000; // 200 s at RATE: the publisher stops by itself whatever happens

const out = (line) => process.stdout.write(line + "\n");
const stdin = createInterface({ input: process.stdin });
const answers = [];
stdin.on("line", (l) => answers.push(l.trim()));

let browser, pages, nc, publisher;
let exitCode = 1;
try {
  nc = await natsClient(Number(natsUrl.port || 4222), natsUrl.hostname);
  pages = await startPageServer();
  browser = await launchBrowser();

  /** A page with one client subscribed to the channel; `blockWebSocket`: over SSE + POST. */
  async function openClient(name, sub, blockWebSocket) {
    const page = await browser.context.newPage();
    page.on("pageerror", (e) => console.error("page error:", e));
    if (blockWebSocket)
      await page.addInitScript(() => {
        window.WebSocket = function () {
          throw new Error("WebSocket blocked by the test");
        };
        // Every POST the SDK makes (it reads fetch when it opens a session), by status
        // (0: a network error).
        const realFetch = window.fetch.bind(window);
        window.__posts = { total: 0, byStatus: {} };
        const count = (status) => {
          window.__posts.total++;
          window.__posts.byStatus[status] = (window.__posts.byStatus[status] ?? 0) + 1;
        };
        window.fetch = async (input, init) => {
          const post = init?.method === "POST";
          try {
            const r = await realFetch(input, init);
            if (post) count(r.status);
            return r;
          } catch (e) {
            if (post) count(0);
            throw e;
          }
        };
      });
    await page.goto(pages.origin + "/");
    await page.waitForFunction(() => window.T?.ready === true, null, { timeout: 20_000 });
    const p = pageApi(page);
    await p.open(name, url, sub);
    const [connected] = await p.waitLog(`${name} connected through the Service`, name, "connected", 1, 30_000);
    assert.equal(connected.transport, blockWebSocket ? "sse" : "websocket", JSON.stringify(connected));
    await p.subscribe(name, channel);
    const [first] = await p.waitSubscribed(name, channel, 1, 30_000);
    assert.equal(first.resumable, true, `the channel is resumable: ${JSON.stringify(first)}`);
    return { name, page, p, first, transport: connected.transport, resumes: [] };
  }
  const clients = [await openClient("ws", "eve", false)];
  if (sse) clients.push(await openClient("sse", "sam", true));
  const sseClient = clients.find((c) => c.transport === "sse");
  const pubReceived = sse ? await nc.subscribe(pubSubject) : [];
  /** The SSE page publishes `PUBLISHES` messages, one POST each, numbered from `from`. */
  async function publishFromSse(from) {
    for (let k = from; k < from + PUBLISHES; k++) {
      const r = await sseClient.p.publish(sseClient.name, pubChannel, k);
      assert.equal(r.ok, true, `the SSE page's publish ${k}: ${JSON.stringify(r)}`);
    }
    await waitFor(`the SSE page's ${from + PUBLISHES - 1} publishes on NATS`, 30_000, () => pubReceived.length >= from + PUBLISHES - 1, 100);
  }
  if (sse) await publishFromSse(1);

  let n = 0;
  let stopAt = MAX_MESSAGES;
  const published = new Promise((resolve) => {
    publisher = setInterval(() => {
      if (n >= stopAt) {
        clearInterval(publisher);
        nc.flush().then(resolve, resolve);
        return;
      }
      nc.publish(subject, ++n);
    }, 1000 / RATE);
  });

  for (let i = 1; i <= rounds; i++) {
    const before = [];
    for (const c of clients) {
      await c.p.waitMessages(c.name, channel, n >= 10 ? n - 5 : 10, 30_000); // receiving live
      before.push((await c.p.log(c.name, "disconnected")).length);
    }
    out(`DISRUPT ${i}`);
    await waitFor(`the test to answer DISRUPTED ${i}`, 180_000, () => answers.includes(`DISRUPTED ${i}`), 100);
    for (const [k, c] of clients.entries()) {
      const { p, name } = c;
      const [d] = (await p.waitLog(`${name} disconnected in round ${i}`, name, "disconnected", before[k] + 1, 60_000)).slice(before[k]);
      const subs = await p.waitSubscribed(name, channel, i + 1, 90_000);
      const s = subs[i];
      const connectedNow = (await p.log(name, "connected")).at(-1);
      c.resumes.push({ round: i, code: d.code, reconnectMs: connectedNow.at - d.at, recovered: s.recovered, transport: connectedNow.transport });
      assert.equal(s.resubscribed, true);
      assert.equal(s.recovering, true, `${name}: resubscribed with since`);
      assert.equal(s.recovered, true, `${name}, round ${i}: recovered: true (${JSON.stringify(s)})`);
      assert.equal(s.epoch, c.first.epoch, "the same stream life");
      console.error(`round ${i}: ${name} (${connectedNow.transport}) disconnected with ${d.code}, connected again after ${connectedNow.at - d.at} ms, recovered: ${s.recovered}`);
    }
  }
  if (sse) await publishFromSse(PUBLISHES + 1);
  stopAt = n + TAIL;
  await Promise.race([published, sleep(30_000)]);
  assert.equal(n, stopAt, "the publisher finished");

  const figures = { messages: n, clients: [] };
  const failures = [];
  for (const c of clients) {
    const { p, name } = c;
    await p.waitMessages(name, channel, n, 60_000).catch(() => {}); // counted below either way
  }
  await sleep(1000); // a late duplicate would show now
  for (const c of clients) {
    const { p, name } = c;
    const got = await p.messages(name, channel);
    const pos = await p.positions(name, channel);
    const st = await p.stats(name, channel);
    const want = Array.from({ length: n }, (_, i) => i + 1);
    const lost = want.filter((x) => !got.includes(x)).length;
    const duplicates = got.length - new Set(got).size;
    const chainBreaks = pos.filter((q, i) => i > 0 && q.prev !== pos[i - 1].seq).length;
    figures.clients.push({ name, transport: c.transport, received: got.length, lost, duplicates, chainBreaks, sdkDroppedDuplicates: st.duplicatesDropped, resumes: c.resumes });
    if (lost) failures.push(`${name}: lost ${lost}`);
    if (duplicates) failures.push(`${name}: ${duplicates} duplicates`);
    if (got.join(",") !== want.join(",")) failures.push(`${name}: not 1..${n} in order`);
    if (pos.length !== n || chainBreaks) failures.push(`${name}: ${pos.length} positions, ${chainBreaks} chain breaks`);
    if (st.duplicatesDropped) failures.push(`${name}: the relays sent ${st.duplicatesDropped} messages twice`);
  }
  if (sse) {
    const posts = await sseClient.page.evaluate(() => window.__posts);
    const published = pubReceived.map((m) => Number(m.payload));
    figures.ssePosts = posts;
    figures.ssePublished = published.length;
    if (posts.byStatus[404]) failures.push(`sse: ${posts.byStatus[404]} POSTs refused with 404`);
    if (posts.total < 2 * PUBLISHES) failures.push(`sse: ${posts.total} POSTs, fewer than ${2 * PUBLISHES}`);
    const want = Array.from({ length: 2 * PUBLISHES }, (_, i) => i + 1);
    if (published.join(",") !== want.join(",")) failures.push(`sse: published ${published.length} messages, not 1..${2 * PUBLISHES} once in order`);
  }
  out(`FIGURES ${JSON.stringify(figures)}`);
  assert.deepEqual(failures, [], "every message once, in order, on every client");
  exitCode = 0;
} catch (e) {
  console.error(e);
} finally {
  clearInterval(publisher);
  stdin.close();
  await browser?.close();
  pages?.close();
  nc?.close();
}
process.exit(exitCode);

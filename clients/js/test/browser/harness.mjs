// The real parts of the browser test: nats-server, wsrelay processes (the built binary), a raw
// NATS client (the protocol is text), a TCP "Service" in front of the relays that routes new
// connections to a ready relay as kube-proxy would, a page server that also issues JWTs
// (HS256, signed here with node:crypto), and headless Debian Chromium driven by playwright-core.
// Everything listens on 127.0.0.1; every wait is bounded; every process is killed at the end.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer as createHttpServer, get as httpGet } from "node:http";
import { createServer as createNetServer, connect as netConnect } from "node:net";
import { tmpdir, homedir } from "node:os";
import { delimiter, dirname, extname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const pkgRoot = resolve(here, "../..");
const repoRoot = resolve(pkgRoot, "../..");

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `f` until it returns a truthy value, at most `ms`; returns that value or throws `what`. */
export async function waitFor(what, ms, f, every = 50) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(every);
  }
}

// ---- binaries ------------------------------------------------------------------------------

export function relayBin() {
  const p = process.env.WSRELAY_BIN ?? join(repoRoot, "target/debug/wsrelay");
  return existsSync(p) ? p : undefined;
}

export function natsBin() {
  if (process.env.NATS_SERVER_BIN) return process.env.NATS_SERVER_BIN;
  for (const dir of (process.env.PATH ?? "").split(delimiter)) {
    const p = join(dir, "nats-server");
    if (dir && existsSync(p)) return p;
  }
  const cache = process.env.WSRELAY_CACHE ?? join(homedir(), ".cache/wsrelay");
  const p = join(cache, "path/nats-server");
  return existsSync(p) ? p : undefined;
}

export function chromiumBin() {
  const p = process.env.CHROMIUM ?? "/usr/bin/chromium";
  return existsSync(p) ? p : undefined;
}

export async function freePort() {
  const srv = createNetServer();
  await new Promise((r) => srv.listen(0, "127.0.0.1", r));
  const { port } = srv.address();
  await new Promise((r) => srv.close(r));
  return port;
}

async function waitTcp(port, ms) {
  await waitFor(`127.0.0.1:${port} to listen`, ms, () =>
    new Promise((r) => {
      const s = netConnect(port, "127.0.0.1");
      s.once("connect", () => (s.destroy(), r(true)));
      s.once("error", () => r(false));
    }),
  );
}

/** GET http://127.0.0.1:port/path with a timeout: {status, body}, or undefined on error/timeout. */
export function httpStatus(port, path, timeoutMs = 500) {
  return new Promise((r) => {
    const req = httpGet({ host: "127.0.0.1", port, path, timeout: timeoutMs }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (c) => (body += c));
      res.on("end", () => r({ status: res.statusCode, body }));
    });
    req.on("timeout", () => (req.destroy(), r(undefined)));
    req.on("error", () => r(undefined));
  });
}

const workDir = mkdtempSync(join(tmpdir(), "wsrelay-client-js-"));
process.once("exit", () => rmSync(workDir, { recursive: true, force: true }));

const children = new Set();
function track(child) {
  children.add(child);
  child.once("exit", () => children.delete(child));
  return child;
}
/** Kills every process this harness started (SIGCONT first, for a stopped one). */
export function killAll() {
  for (const c of children) {
    try {
      c.kill("SIGCONT");
      c.kill("SIGKILL");
    } catch {
      /* gone */
    }
  }
}
process.once("exit", killAll);

// ---- NATS ----------------------------------------------------------------------------------

/** A nats-server on loopback; with `jetstream`, JetStream on and its store in a directory of its own. */
export async function startNats({ jetstream = false } = {}) {
  const port = await freePort();
  const args = ["-a", "127.0.0.1", "-p", String(port)];
  if (jetstream) args.push("-js", "-sd", join(workDir, `jetstream-${port}`));
  const child = track(spawn(natsBin(), args, { stdio: "ignore" }));
  await waitTcp(port, 10_000);
  return { port, url: `nats://127.0.0.1:${port}`, stop: () => child.kill("SIGKILL") };
}

/** A minimal NATS client over TCP: PUB, SUB, and flush by PING/PONG. */
export async function natsClient(port, host = "127.0.0.1") {
  const sock = netConnect(port, host);
  await new Promise((r, j) => (sock.once("connect", r), sock.once("error", j)));
  let buf = Buffer.alloc(0);
  const pongs = [];
  const subs = new Map();
  let sid = 0;
  sock.on("data", (d) => {
    buf = Buffer.concat([buf, d]);
    for (;;) {
      const eol = buf.indexOf("\r\n");
      if (eol < 0) return;
      const line = buf.subarray(0, eol).toString();
      if (line.startsWith("MSG ")) {
        const parts = line.split(" ");
        const size = Number(parts[parts.length - 1]);
        if (buf.length < eol + 2 + size + 2) return;
        const payload = buf.subarray(eol + 2, eol + 2 + size).toString();
        buf = buf.subarray(eol + 2 + size + 2);
        subs.get(parts[2])?.push({ subject: parts[1], payload });
        continue;
      }
      buf = buf.subarray(eol + 2);
      if (line === "PING") sock.write("PONG\r\n");
      else if (line === "PONG") pongs.shift()?.();
    }
  });
  sock.write('CONNECT {"verbose":false,"pedantic":false,"name":"client-js-test"}\r\n');
  const c = {
    publish(subject, payload) {
      const b = Buffer.from(typeof payload === "string" ? payload : JSON.stringify(payload));
      sock.write(`PUB ${subject} ${b.length}\r\n`);
      sock.write(Buffer.concat([b, Buffer.from("\r\n")]));
    },
    flush() {
      return new Promise((r, j) => {
        const t = setTimeout(() => j(new Error("NATS flush timed out")), 5000);
        pongs.push(() => (clearTimeout(t), r()));
        sock.write("PING\r\n");
      });
    },
    /** Subscribes; returns the array the messages land in. */
    async subscribe(subject) {
      const id = String(++sid);
      const got = [];
      subs.set(id, got);
      sock.write(`SUB ${subject} ${id}\r\n`);
      await c.flush();
      return got;
    },
    close: () => sock.destroy(),
  };
  await c.flush();
  return c;
}

// ---- JWT -----------------------------------------------------------------------------------

/** The HS256 key of the relays and the page's tokens (the e2e test names its gateway's). */
export const HMAC_SECRET = process.env.WSRELAY_E2E_HMAC_KEY ?? "client-js-test-secret-0123456789abcdef";
writeFileSync(join(workDir, "hmac.secret"), HMAC_SECRET);
const b64url = (s) => Buffer.from(s).toString("base64url");

export function signJwt(claims) {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac("sha256", HMAC_SECRET).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

/** A connection token; `extra`: more claims (e.g. `{ rooms: ["1"] }` for a binding's rule). */
export function token(sub, ttlSeconds, extra = {}) {
  const now = Math.floor(Date.now() / 1000);
  return signJwt({ ...extra, sub, iss: "https://issuer.test", aud: "wsrelay", iat: now, exp: now + ttlSeconds });
}

/** A subscription token (docs/protocol.md section 3, `authorize.token`) for one channel. */
export function subscriptionToken(sub, channel, ttlSeconds) {
  const now = Math.floor(Date.now() / 1000);
  return signJwt({ sub, channel, iss: "https://issuer.test", aud: "wsrelay", iat: now, exp: now + ttlSeconds });
}

// ---- relays --------------------------------------------------------------------------------


/**
 * Starts a relay (the real binary) on fixed ports so that it can be restarted on them.
 * `history` (e.g. `{stream: "FEED", maxMessages: 1000}`) adds the resumable binding
 * `feed.{id}` -> `feed.{id}` (docs/protocol.md section 8; NATS needs JetStream), and the
 * relay is ready only once its history stream is in place. `bindings` come first (e.g. one
 * with `authorize` or `presence`). `registry`: the config's registry section (presence needs it).
 */
export async function startRelay({ natsUrl, origin, port, adminPort, name = "relay", graceSeconds = 4, auth = {}, jwt = {}, history, bindings = [], registry }) {
  port ??= await freePort();
  adminPort ??= await freePort();
  const config = {
    listen: { client: `127.0.0.1:${port}`, admin: `127.0.0.1:${adminPort}`, path: "/ws" },
    nats: { urls: [natsUrl], name: `client-js-${name}` },
    auth: {
      jwt: {
        algorithms: ["HS256"],
        key: { hmacSecretFile: join(workDir, "hmac.secret") },
        issuer: "https://issuer.test",
        audiences: ["wsrelay"],
        leewaySeconds: 0,
        ...jwt,
      },
      // The subprotocol for WebSockets; the query parameter for the SSE fallback (EventSource
      // cannot set headers).
      tokenSources: [{ type: "subprotocol" }, { type: "query", name: "token" }],
      allowedOrigins: [origin],
      allowAnonymous: false,
      ...auth,
    },
    bindings: [
      ...bindings,
      { channel: "me.notify", subject: "users.{claims.sub}.notify", direction: "subscribe" },
      { channel: "chat.{room}", subject: "chat.{room}", direction: "both" },
      { channel: "orders.{id}", subject: "orders.{id}", direction: "subscribe" },
      ...(history ? [{ channel: "feed.{id}", subject: "feed.{id}", direction: "subscribe", history }] : []),
    ],
    limits: { pingIntervalSeconds: 5, idleTimeoutSeconds: 30 },
    drain: { gracePeriodSeconds: graceSeconds },
    ...(registry ? { registry } : {}),
  };
  const file = join(workDir, `${name}-${port}.json`);
  writeFileSync(file, JSON.stringify(config, null, 2));
  const logFile = join(workDir, `${name}-${port}.log`);
  const log = [];
  const child = track(spawn(relayBin(), ["run", "--config", file], { stdio: ["ignore", "ignore", "pipe"] }));
  child.stderr.setEncoding("utf8");
  child.stderr.on("data", (d) => log.push(d));
  const exited = new Promise((r) => child.once("exit", (code, signal) => r({ code, signal })));
  const relay = {
    name,
    port,
    adminPort,
    pid: child.pid,
    exited,
    log: () => log.join(""),
    signal: (s) => child.kill(s),
    kill: async () => {
      child.kill("SIGCONT");
      child.kill("SIGKILL");
      await exited;
    },
    ready: async () => (await httpStatus(adminPort, "/ready", 300))?.status === 200,
    metric: async (name) => {
      const r = await httpStatus(adminPort, "/metrics", 1000);
      const line = r?.body.split("\n").find((l) => l.startsWith(name + " ") || l.startsWith(name + "{"));
      return line === undefined ? undefined : Number(line.split(" ").pop());
    },
    logFile,
  };
  try {
    await waitFor(`${name} to be ready`, 20_000, async () => {
      if (child.exitCode !== null) throw new Error(`${name} exited: ${relay.log()}`);
      return relay.ready();
    });
    if (history)
      await waitFor(`${name}'s history stream`, 20_000, async () => (await relay.metric("wsrelay_history_streams_ready")) === 1);
  } catch (e) {
    await relay.kill();
    throw e;
  }
  return relay;
}

/**
 * A TCP front like a Kubernetes Service: each new connection goes to the first backend whose
 * /ready answers 200 within 300 ms (a draining, stopped or dead relay gets none); established
 * connections are left alone. Connections that find no ready backend are closed.
 *
 * It reads each connection's request head first, records what it is in `seen` (`websocket`:
 * an upgrade, `sse`: the event stream, `post`: a POST to a session) and, while
 * `blockWebSocket` is set, closes WebSocket upgrades as a proxy that does not pass them would
 * (the browser sees 1006) while the SSE stream and its POSTs go through.
 */
export async function startService(backends, { blockWebSocket = false } = {}) {
  const port = await freePort();
  const sockets = new Set();
  const routed = [];
  const seen = [];
  const svc = {
    port,
    routed,
    seen,
    blockWebSocket,
    setBackends(list) {
      backends = list;
    },
    /** Cuts every established connection (the clients see the relay go away). */
    dropConnections() {
      for (const s of sockets) s.destroy();
    },
    close: () => {
      for (const s of sockets) s.destroy();
      srv.close();
    },
  };
  const srv = createNetServer((client) => {
    sockets.add(client);
    client.on("close", () => sockets.delete(client));
    client.on("error", () => {});
    let head = Buffer.alloc(0);
    const onData = async (d) => {
      head = Buffer.concat([head, d]);
      // Browsers send the whole request head at once; wait for its end (bounded) to be sure.
      if (head.indexOf("\r\n\r\n") < 0 && head.length < 16_384) return;
      client.off("data", onData);
      client.pause();
      const text = head.toString("latin1");
      const kind = /^upgrade:\s*websocket/im.test(text)
        ? "websocket"
        : text.startsWith("POST ")
          ? "post"
          : /^GET [^ ]*\/sse[ ?]/.test(text)
            ? "sse"
            : "other";
      const blocked = kind === "websocket" && svc.blockWebSocket;
      seen.push({ kind, blocked, at: Date.now() });
      if (blocked) {
        client.destroy();
        return;
      }
      let target;
      for (const b of backends) {
        if (await b.ready()) {
          target = b;
          break;
        }
      }
      if (!target || client.destroyed) {
        client.destroy();
        return;
      }
      routed.push(target.name);
      const up = netConnect(target.port, "127.0.0.1");
      sockets.add(up);
      up.on("close", () => (sockets.delete(up), client.destroy()));
      client.on("close", () => up.destroy());
      up.on("error", () => {});
      up.once("connect", () => {
        up.write(head);
        client.pipe(up);
        up.pipe(client);
        client.resume();
      });
    };
    client.on("data", onData);
  });
  await new Promise((r) => srv.listen(port, "127.0.0.1", r));
  return svc;
}

// ---- the page ------------------------------------------------------------------------------

const types = { ".js": "text/javascript", ".map": "application/json", ".html": "text/html", ".ts": "text/plain" };

/**
 * Serves the page, the built SDK (dist/esm), `/token?sub=..&ttl=..` and
 * `/subtoken?sub=..&channel=..&ttl=..` (subscription tokens); counts the requests of both.
 * `staticDir`: other paths are files under it (an application's public directory).
 */
export async function startPageServer({ staticDir } = {}) {
  const port = await freePort();
  const tokenRequests = [];
  const subTokenRequests = [];
  const srv = createHttpServer((req, res) => {
    const url = new URL(req.url, `http://127.0.0.1:${port}`);
    if (url.pathname === "/subtoken") {
      const sub = url.searchParams.get("sub") ?? "alice";
      const channel = url.searchParams.get("channel") ?? "";
      const ttl = Number(url.searchParams.get("ttl") ?? "600");
      const tok = subscriptionToken(sub, channel, ttl);
      subTokenRequests.push({ sub, channel, ttl, at: Date.now(), exp: JSON.parse(Buffer.from(tok.split(".")[1], "base64url")).exp });
      res.writeHead(200, { "content-type": "text/plain", "cache-control": "no-store" });
      res.end(tok);
      return;
    }
    if (url.pathname === "/token") {
      const sub = url.searchParams.get("sub") ?? "alice";
      const ttl = Number(url.searchParams.get("ttl") ?? "600");
      const claims = JSON.parse(url.searchParams.get("claims") ?? "{}");
      tokenRequests.push({ sub, ttl, claims, at: Date.now() });
      res.writeHead(200, { "content-type": "text/plain", "cache-control": "no-store" });
      res.end(token(sub, ttl, claims));
      return;
    }
    if (url.pathname === "/") {
      res.writeHead(200, { "content-type": "text/html" });
      res.end(readFileSync(join(here, "page.html")));
      return;
    }
    if (url.pathname.startsWith("/dist/")) {
      const file = resolve(pkgRoot, "." + url.pathname);
      if (file.startsWith(join(pkgRoot, "dist")) && existsSync(file)) {
        res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream" });
        res.end(readFileSync(file));
        return;
      }
    }
    if (staticDir) {
      const file = resolve(staticDir, "." + url.pathname);
      if (file.startsWith(resolve(staticDir) + "/") && existsSync(file)) {
        res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream" });
        res.end(readFileSync(file));
        return;
      }
    }
    res.writeHead(404);
    res.end();
  });
  await new Promise((r) => srv.listen(port, "127.0.0.1", r));
  return { port, origin: `http://127.0.0.1:${port}`, tokenRequests, subTokenRequests, close: () => srv.close() };
}

/** Headless Debian Chromium with a fresh profile (never a downloaded browser). */
export async function launchBrowser() {
  const { chromium } = await import("playwright-core");
  const profile = mkdtempSync(join(tmpdir(), "wsrelay-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: chromiumBin(),
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-extensions",
    ],
    timeout: 60_000,
  });
  return {
    context,
    close: async () => {
      await context.close().catch(() => {});
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

/** Reading and driving test/browser/page.html from the test. */
export function pageApi(page) {
  const api = {
    log: (client, kind) =>
      page.evaluate(([c, k]) => window.T.log.filter((e) => e.client === c && e.kind === k), [client, kind]),
    messages: (client, channel) => page.evaluate((key) => window.T.messages[key] ?? [], `${client}:${channel}`),
    positions: (client, channel) => page.evaluate((key) => window.T.positions[key] ?? [], `${client}:${channel}`),
    stats: (client, channel) => page.evaluate(([c, ch]) => window.subscriptionStats(c, ch), [client, channel]),
    /** The presence events of a subscription (join, leave, occupancy, presence), in order. */
    presenceEvents: (client, channel) => page.evaluate((key) => window.T.presence[key] ?? [], `${client}:${channel}`),
    /** `presence()` (as member objects), `occupancy()` and `presenceSynced` of a subscription. */
    presenceOf: (client, channel) => page.evaluate(([c, ch]) => window.presenceOf(c, ch), [client, channel]),
    /** Waits for the `n`-th presence event of `kind`; returns the subscription's presence events. */
    waitPresence: (what, client, channel, kind, n, ms = 10_000) =>
      waitFor(what, ms, async () => {
        const es = await api.presenceEvents(client, channel);
        return es.filter((e) => e.kind === kind).length >= n ? es : undefined;
      }),
    subscribedCtx: (client, channel) => page.evaluate((key) => window.T.subscribed[key] ?? [], `${client}:${channel}`),
    waitLog: (what, client, kind, n, ms, pred = () => true) =>
      waitFor(what, ms, async () => {
        const es = (await api.log(client, kind)).filter(pred);
        return es.length >= n ? es : undefined;
      }),
    waitSubscribed: (client, channel, n, ms = 20_000) =>
      waitFor(`${client} subscribed to ${channel} (${n})`, ms, async () => {
        const cs = await api.subscribedCtx(client, channel);
        return cs.length >= n ? cs : undefined;
      }),
    waitMessages: (client, channel, n, ms = 10_000) =>
      waitFor(`${client} to receive ${n} messages on ${channel}`, ms, async () => {
        const m = await api.messages(client, channel);
        return m.length >= n ? m : undefined;
      }),
    open: (name, url, sub, opts = {}) =>
      page.evaluate(([n, u, s, o]) => window.openClient(n, { url: u, sub: s, ...o }), [name, url, sub, opts]),
    subscribe: (name, channel, opts = {}) =>
      page.evaluate(([n, c, o]) => window.subscribeChannel(n, c, o), [name, channel, opts]),
    publish: (name, channel, payload, opts = {}) =>
      page.evaluate(([n, c, p, o]) => window.publish(n, c, p, o), [name, channel, payload, opts]),
    closeClient: (name) => page.evaluate((n) => window.closeClient(n), name),
    /** The claims the page asks its token endpoint to add to the client's next tokens. */
    setClaims: (name, claims) => page.evaluate(([n, c]) => window.setClaims(n, c), [name, claims]),
    /** `client.refreshTokenNow()`: `{ ok }` or `{ ok: false, code, reason }`. */
    refreshNow: (name) => page.evaluate((n) => window.refreshNow(n), name),
  };
  return api;
}

// Test doubles for the client's unit tests: a clock whose time only moves when the test says,
// and a WebSocket whose "server side" the test drives. No network, no real timers.

export class FakeClock {
  constructor(start = 1_700_000_000_000) {
    this.t = start;
    this.timers = new Map();
    this.seq = 0;
  }
  now() {
    return this.t;
  }
  setTimeout(fn, ms) {
    const id = ++this.seq;
    this.timers.set(id, { at: this.t + Math.max(0, ms), fn, id });
    return id;
  }
  clearTimeout(id) {
    this.timers.delete(id);
  }
  /** Moves time forward by `ms`, running due timers in order (and the microtasks they queue). */
  async advance(ms) {
    const end = this.t + ms;
    for (let guard = 0; guard < 100_000; guard++) {
      await flush();
      let next;
      for (const t of this.timers.values()) if (t.at <= end && (!next || t.at < next.at || (t.at === next.at && t.id < next.id))) next = t;
      if (!next) break;
      this.timers.delete(next.id);
      this.t = next.at;
      next.fn();
    }
    this.t = end;
    await flush();
  }
  /** The delay until the earliest pending timer, or undefined. */
  nextDelay() {
    let min;
    for (const t of this.timers.values()) if (min === undefined || t.at < min) min = t.at;
    return min === undefined ? undefined : min - this.t;
  }
}

/** Lets promise callbacks (getToken, request settlement) run. */
export async function flush() {
  for (let i = 0; i < 5; i++) await new Promise((r) => setImmediate(r));
}

/** A WebSocket class whose instances the test controls; `FakeWebSocket.all` lists them. */
export function fakeWebSocketClass() {
  class FakeWebSocket {
    static all = [];
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.sent = [];
      this.closedWith = undefined;
      this.onopen = this.onmessage = this.onclose = this.onerror = null;
      FakeWebSocket.all.push(this);
    }
    send(text) {
      if (this.readyState !== 1) throw new Error("not open");
      this.sent.push(JSON.parse(text));
    }
    close(code, reason) {
      this.closedWith = { code, reason };
      this.readyState = 3;
    }
    // --- the relay's side ---
    accept(welcome = {}) {
      this.readyState = 1;
      this.onopen?.({});
      this.push({ type: "welcome", protocol: "wsrelay.v1", maxMessageBytes: 65536, anonymous: false, ...welcome });
    }
    push(frame) {
      this.onmessage?.({ data: JSON.stringify(frame) });
    }
    serverClose(code, reason = "", wasClean = true) {
      this.readyState = 3;
      this.onclose?.({ code, reason, wasClean });
    }
    last(type) {
      for (let i = this.sent.length - 1; i >= 0; i--) if (!type || this.sent[i].type === type) return this.sent[i];
      return undefined;
    }
    ofType(type) {
      return this.sent.filter((f) => f.type === type);
    }
    /** Answers the last request of `type` with ok (plus extra fields). */
    ok(type, extra = {}) {
      const f = this.last(type);
      this.push({ type: "ok", id: f.id, ...extra });
      return f;
    }
  }
  return FakeWebSocket;
}

/** An HS256-looking JWT (unsigned: the SDK never verifies) with the given claims. */
export function fakeJwt(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  return `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}.sig`;
}

/**
 * Two transports for the fallback rules: "websocket" and "sse", each a webSocketTransport over
 * its own fake socket class (the client sees only the name and the handlers). `opened` lists
 * the name of each transport in the order the client opened them.
 */
export function fakeTransports(webSocketTransport) {
  const WS = fakeWebSocketClass();
  const SSE = fakeWebSocketClass();
  const opened = [];
  const named = (name, ctor) => ({
    name,
    open(params, handlers) {
      opened.push(name);
      return webSocketTransport(ctor).open(params, handlers);
    },
  });
  return { WS, SSE, opened, transports: [named("websocket", WS), named("sse", SSE)] };
}

/**
 * Transports carry the protocol's text frames. The client talks to a transport only through
 * this interface: the WebSocket transport, and the Server-Sent-Events + HTTP POST fallback
 * (relay to client over an EventSource, client to relay over fetch POSTs, same frames, same
 * token) for networks that block WebSockets.
 */
import { WsrelayError } from "./errors.js";
import { PROTOCOL } from "./protocol.js";

export interface TransportHandlers {
  /** The transport is open (for WebSocket: the upgrade succeeded). The `welcome` frame follows. */
  onOpen(): void;
  /** One text frame from the relay. */
  onFrame(text: string): void;
  /** The transport closed (once). `code` follows WebSocket close codes; 1006 when none was received. */
  onClose(code: number, reason: string, wasClean: boolean): void;
}

export interface TransportParams {
  url: string;
  /** The JWT, or null for an anonymous connection. */
  token: string | null;
  /**
   * The client's current token (it changes with an in-band refresh). Transports that send
   * the token with every request (SSE's POSTs) read it here; default: `token`.
   */
  currentToken?: () => string | null;
  /**
   * A transport that queues frames (SSE: one POST at a time) holds at most this many requests
   * waiting to go out; default 100. The client passes its `maxQueuedRequests`.
   */
  maxQueuedRequests?: number;
}

export interface Transport {
  /**
   * Sends one text frame. `request`: a frame the app waits on (publish, ping, refresh).
   * A transport that queues frames (SSE) refuses a request when `maxQueuedRequests` requests
   * already wait, by throwing a `WsrelayError` with code `queue_full` (nothing is sent), and
   * returns a function that withdraws the frame while it still waits: the client calls it
   * when it rejects the request (timeout), so a rejected request is never sent afterwards.
   * Frames that are not requests (subscribe, unsubscribe, the heartbeat ping) are never
   * refused: the client's state bounds them.
   */
  send(text: string, request?: boolean): (() => void) | void;
  /**
   * Closes the transport. After this call no handler is called any more: the client has
   * already accounted for the close (it may be closing a dead link, whose close handshake
   * would never finish).
   */
  close(code: number, reason: string): void;
}

export interface TransportFactory {
  /** A short name surfaced to the app (`client.transport`, the `connected` event): "websocket", "sse". */
  readonly name: string;
  /** Starts opening; handlers are called asynchronously. Throws when the transport is unavailable here. */
  open(params: TransportParams, handlers: TransportHandlers): Transport;
}

/** A WebSocket constructor (the browser's, or a compatible one such as `ws` in Node). */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string; wasClean: boolean }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/**
 * The WebSocket transport. The token travels in `Sec-WebSocket-Protocol` (browsers cannot set
 * headers): the client offers `["wsrelay.v1", "bearer." + jwt]`, the relay selects `wsrelay.v1`
 * and never echoes the token. Anonymous connections offer `["wsrelay.v1"]`.
 */
export function webSocketTransport(ctor?: WebSocketConstructor): TransportFactory {
  return {
    name: "websocket",
    open(params, h) {
      const WS = ctor ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
      if (!WS) throw new Error("no WebSocket implementation: pass options.WebSocket");
      const protocols = params.token ? [PROTOCOL, "bearer." + params.token] : [PROTOCOL];
      const ws = new WS(params.url, protocols);
      let done = false;
      ws.onopen = () => {
        if (!done) h.onOpen();
      };
      ws.onmessage = (ev) => {
        if (done) return;
        if (typeof ev.data === "string") h.onFrame(ev.data);
        // The relay sends text frames only; anything else is ignored.
      };
      ws.onclose = (ev) => {
        if (done) return;
        done = true;
        h.onClose(ev.code, ev.reason, ev.wasClean);
      };
      // An error is always followed by a close event, which carries what the app may see.
      ws.onerror = () => {};
      return {
        send(text) {
          ws.send(text);
        },
        close(code, reason) {
          done = true;
          try {
            ws.close(code, reason);
          } catch {
            // already closed, or a code the implementation refuses: nothing left to do
          }
        },
      };
    },
  };
}

/** An EventSource constructor (the browser's). */
export interface EventSourceLike {
  onmessage: ((ev: { data: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  addEventListener(type: string, listener: (ev: { data: string }) => void): void;
  close(): void;
}
export type EventSourceConstructor = new (url: string, init?: { withCredentials?: boolean }) => EventSourceLike;

export interface SseTransportOptions {
  /** An EventSource constructor; default the global one. */
  EventSource?: EventSourceConstructor;
  /** A fetch function; default the global one. */
  fetch?: typeof fetch;
  /** Send cookies (the relay's cookie token source) on the stream and the POSTs. Default false. */
  withCredentials?: boolean;
}

/**
 * `url` with `resume=<connection>` in its query (docs/protocol.md section 1, *Resuming a
 * connection*), replacing one it has; both transports carry it (the SSE URL keeps the query).
 */
export function withResume(url: string, connection: string): string {
  try {
    const u = new URL(url);
    u.searchParams.set("resume", connection);
    return u.toString();
  } catch {
    // Not an absolute URL: appended as it is written.
    const hash = url.indexOf("#");
    const base = hash < 0 ? url : url.slice(0, hash);
    return base + (base.includes("?") ? "&" : "?") + "resume=" + encodeURIComponent(connection) + (hash < 0 ? "" : url.slice(hash));
  }
}

/**
 * The SSE URL of a relay's WebSocket URL: `wss://h/ws?x` -> `https://h/ws/sse?x`, with the
 * token as the `token` query parameter (EventSource cannot set headers; the relay must list
 * a `query` token source).
 */
export function sseUrl(wsUrl: string, token: string | null): URL {
  const u = new URL(wsUrl);
  if (u.protocol === "ws:") u.protocol = "http:";
  else if (u.protocol === "wss:") u.protocol = "https:";
  u.pathname = u.pathname.replace(/\/+$/, "") + "/sse";
  if (token) u.searchParams.set("token", token);
  return u;
}

/**
 * The fallback transport: Server-Sent Events from the relay (`GET <path>/sse`, the first
 * event names the session), one HTTP POST per frame to the relay (`POST <path>/sse/<session>`,
 * answered 202; the reply comes on the stream). POSTs go one at a time, so frames keep their
 * order. The token travels as a query parameter on both (no custom header: no CORS
 * preflight), so it can show in access logs of proxies on the way: see docs/client.md.
 * The relay's close arrives as a `close` event with the WebSocket close code.
 */
export function sseTransport(opts: SseTransportOptions = {}): TransportFactory {
  return {
    name: "sse",
    open(params, h) {
      const ES = opts.EventSource ?? (globalThis as { EventSource?: EventSourceConstructor }).EventSource;
      const doFetch = opts.fetch ?? (globalThis as { fetch?: typeof fetch }).fetch;
      if (!ES || !doFetch) throw new Error("no EventSource or fetch here");
      const current = params.currentToken ?? (() => params.token);
      // The SDK subscribes itself: no auto-subscriptions (docs/protocol.md section 9), which
      // would take the channels it subscribes to.
      const streamUrl = sseUrl(params.url, params.token);
      streamUrl.searchParams.set("autoSubscribe", "false");
      const es = new ES(streamUrl.toString(), { withCredentials: !!opts.withCredentials });
      let done = false;
      let postUrl: URL | undefined;
      // Frames waiting for their POST; `requests` counts the requests among them (the bound).
      const queue: { text: string; request: boolean }[] = [];
      const maxRequests = params.maxQueuedRequests ?? 100;
      let requests = 0;
      let posting = false;
      const finish = (code: number, reason: string, wasClean: boolean) => {
        if (done) return;
        done = true;
        es.close();
        h.onClose(code, reason, wasClean);
      };
      const pump = async () => {
        if (posting || done || !postUrl) return;
        posting = true;
        while (queue.length > 0 && !done) {
          const item = queue.shift()!;
          if (item.request) requests--;
          const u = new URL(postUrl);
          const t = current();
          if (t) u.searchParams.set("token", t);
          let status = 0;
          try {
            const r = await doFetch(u.toString(), {
              method: "POST",
              body: item.text,
              headers: { "content-type": "text/plain" },
              credentials: opts.withCredentials ? "include" : "same-origin",
              cache: "no-store",
            });
            status = r.status;
          } catch {
            status = 0;
          }
          // 413: the relay closes the session with 1009 on the stream; wait for it.
          if (status !== 202 && status !== 413) {
            finish(1006, `POST failed (${status || "network error"})`, false);
          }
        }
        posting = false;
      };
      es.addEventListener("session", (ev) => {
        if (done) return;
        try {
          const s = JSON.parse(ev.data) as { post: string };
          postUrl = new URL(s.post, sseUrl(params.url, null));
        } catch {
          finish(1006, "bad session event", false);
          return;
        }
        h.onOpen();
        void pump();
      });
      es.onmessage = (ev) => {
        if (!done) h.onFrame(ev.data);
      };
      es.addEventListener("close", (ev) => {
        let code = 1006;
        let reason = "";
        try {
          const c = JSON.parse(ev.data) as { code: number; reason: string };
          code = c.code;
          reason = c.reason;
        } catch {
          // keep 1006
        }
        finish(code, reason, true);
      });
      // A stream that fails or ends without a close event; EventSource would reconnect by
      // itself into a new session: the client reconnects instead, with its own backoff.
      es.onerror = () => finish(1006, "", false);
      return {
        send(text, request = false) {
          if (done) return;
          if (request && requests >= maxRequests)
            throw new WsrelayError(
              "queue_full",
              `${maxRequests} requests already wait to be POSTed (SSE sends one frame at a time)`,
            );
          const item = { text, request };
          queue.push(item);
          if (request) requests++;
          void pump();
          return () => {
            // Still waiting (not taken by a POST): drop it. Once its POST has started it is out.
            const i = queue.indexOf(item);
            if (i < 0) return;
            queue.splice(i, 1);
            if (item.request) requests--;
          };
        },
        close() {
          done = true;
          es.close();
        },
      };
    },
  };
}

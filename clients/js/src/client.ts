/**
 * The wsrelay client: one logical connection to a relay (a fleet behind one URL), kept open
 * across relay restarts, drains, network loss and token expiry, with subscriptions that
 * survive reconnects. docs/client.md describes the behaviour; the rules are here once.
 */
import { backoffDelay } from "./backoff.js";
import { closePolicy, LocalClose } from "./closecodes.js";
import { Emitter } from "./emitter.js";
import { WsrelayError } from "./errors.js";
import type { Position } from "./position.js";
import {
  decodeBase64,
  parseFrame,
  type ErrorFrame,
  type MessageFrame,
  type OccupancyFrame,
  type OkFrame,
  type PongFrame,
  type PresenceEventFrame,
  type PresencePage,
  type ServerFrame,
  type SubscribedFrame,
  type WelcomeFrame,
} from "./protocol.js";
import { PresenceProtocolError, type PresenceMember } from "./presence.js";
import {
  Subscription,
  type Message,
  type SubscriptionOptions,
  type SubscriptionOwner,
} from "./subscription.js";
import { RefreshTimer, refreshOnce } from "./refresh.js";
import { tokenExpired } from "./token.js";
import {
  sseTransport,
  webSocketTransport,
  withResume,
  type Transport,
  type TransportFactory,
  type WebSocketConstructor,
} from "./transport.js";

export type ClientState = "disconnected" | "connecting" | "connected";

/** Timers and time, injectable for tests. */
export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

const systemClock: Clock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
  clearTimeout: (h) => globalThis.clearTimeout(h as ReturnType<typeof setTimeout>),
};

export interface ClientOptions {
  /** The relay's WebSocket URL (`wss://relay.example/ws`), or a function called before each connection. */
  url: string | (() => string);
  /** A JWT to start with (optional when `getToken` is given; neither means anonymous). */
  token?: string | null;
  /**
   * Returns a JWT (or null for anonymous). Called before a connection when there is no token,
   * when the token expires within `tokenMinValidityMs`, after the relay said the token expired
   * or was refused (1008, 4401, repeated handshake failures), and before expiry for the in-band
   * refresh.
   */
  getToken?: () => Promise<string | null | undefined>;
  /**
   * Returns a subscription token for a channel (docs/protocol.md section 3, `authorize.token`),
   * or null for a channel whose binding takes none. Called for every subscription without
   * its own `getToken`: before its subscribe when it holds no token valid for more than
   * `tokenMinValidityMs`, before the token expires (sent as `subrefresh`), and after the relay
   * ended the subscription because the token expired or refused it (401).
   */
  getSubscriptionToken?: (channel: string) => Promise<string | null | undefined>;
  /** Backoff floor. Default 500 ms. */
  minReconnectDelayMs?: number;
  /** Backoff ceiling. Default 20 000 ms. */
  maxReconnectDelayMs?: number;
  /**
   * After a welcomed connection is lost, the backoff starts again from its first step; only
   * welcomed connections that keep ending sooner than this, in a row, start one step higher
   * each (a relay that accepts and then closes at once). Default 10 000 ms.
   */
  stableConnectionMs?: number;
  /** A connection must reach `welcome` within this time, else it is dropped and retried. Default 10 000 ms. */
  connectTimeoutMs?: number;
  /** Send a `ping` after this long without any frame from the relay; 0 disables dead-link detection. Default 15 000 ms. */
  pingIntervalMs?: number;
  /** After a `ping`, the link is dead when nothing arrives within this time. Default 10 000 ms. */
  pongTimeoutMs?: number;
  /** A publish (or ping, refresh) not answered within this time is rejected with `timeout`. Default 10 000 ms. */
  requestTimeoutMs?: number;
  /**
   * Requests made while (re)connecting wait in a queue of this size, and so many at most wait
   * for their POST on the SSE transport; beyond it they are rejected (`queue_full`). Default 100.
   */
  maxQueuedRequests?: number;
  /**
   * Refresh the token in band (`refresh` frame) before it expires, and each subscription token
   * (`subrefresh`). Default true (needs `getToken`, `getSubscriptionToken` or a subscription's `getToken`).
   */
  refreshToken?: boolean;
  /** A token expiring within this time is not used for a new connection. Default 5 000 ms. */
  tokenMinValidityMs?: number;
  /** After a drain, reconnect at the relay's turn plus a random delay up to this. Default 1 000 ms. */
  drainJitterMs?: number;
  /**
   * Consecutive 4401 refusals after which the client stops and reports; also, per
   * subscription, consecutive failures to get a usable subscription token (the function
   * threw, or the relay refused the token with 401) after which the subscription ends. Default 3.
   */
  maxAuthFailures?: number;
  /** After every this many consecutive connections that never reached `welcome`, call `getToken` before the next try (an HTTP 401 shows as 1006 in browsers). Default 3; 0 never. */
  newTokenAfterFailedOpens?: number;
  /** Transports in order of preference. Default: WebSocket, then SSE + POST where EventSource exists (browsers); WebSocket only elsewhere. */
  transports?: TransportFactory[];
  /**
   * Consecutive failed opens of the first transport after which the next one is tried, at
   * once, as a probe: the client stays on it only if it reaches `welcome` (or a refusal from
   * the relay), i.e. it works where the first failed; else the relay is down and the client
   * goes back to the first. A lost welcomed connection always starts again with the first
   * transport (one try, once a fallback has worked). Default 2.
   */
  fallbackAfterFailures?: number;
  /** Reconnect at once when the browser reports it is back online. Default true. */
  reconnectOnOnline?: boolean;
  /** A WebSocket constructor for environments without a global one (Node < 22: the `ws` package). */
  WebSocket?: WebSocketConstructor;
  /** @internal tests */
  clock?: Clock;
  /** @internal tests */
  random?: () => number;
}

export interface ConnectedContext {
  transport: string;
  protocol: string;
  maxMessageBytes: number;
  anonymous: boolean;
  /** Not the first connection of this client. */
  reconnected: boolean;
  /** This connection's id across the fleet (`welcome.connection`): what the backend's events and control service name. */
  connection?: string;
  /** The relay resumed the previous connection (`welcome.resumed`): the backend heard `Resumed`, not a disconnect and a connect. */
  resumed?: boolean;
  /** What the relay's connect step (`auth.connectRequest`) backend replied, when it sent any (`welcome.data`). */
  data?: unknown;
}

export interface DisconnectedContext {
  /** The close code (see docs/client.md for each); 1006 when the connection failed without one. */
  code: number;
  reason: string;
  wasClean: boolean;
  /** The client reconnects by itself (false: stopped until `connect()`). */
  willReconnect: boolean;
  /** When `willReconnect`: the delay before the next attempt. */
  delayMs?: number;
}

export interface ConnectingContext {
  /**
   * "connect" (the app called connect), "reconnect", "drain", "online", "token", "fallback"
   * (the next transport, tried at once after the previous one failed).
   */
  reason: string;
  /** The backoff step this attempt used. */
  attempt: number;
  /** Delay before the attempt starts. */
  delayMs: number;
}

export type ErrorKind =
  | "token"
  | "transport"
  | "refresh"
  | "closed"
  | "protocol"
  | "subscribe"
  | "subrefresh"
  | "presence";

export interface ClientEvents {
  state: { state: ClientState; previous: ClientState };
  connecting: ConnectingContext;
  connected: ConnectedContext;
  disconnected: DisconnectedContext;
  error: { kind: ErrorKind; error: WsrelayError };
  /**
   * The relay closes this connection with 1012 in `reconnectAfterMs` (it is shutting down, or, with
   * `reason: "rebalance"`, moving some clients to less loaded relays); the client reconnects then.
   */
  drain: { reconnectAfterMs: number; reason: string };
  /** A new token is in use. `inBand`: applied to the open connection by a `refresh` frame. */
  token: { inBand: boolean; expiresAt?: number };
  /** The relay dropped messages for this connection (slow consumer); `channel` when the relay names it. */
  dropped: { count: number; channel?: string };
  /**
   * The backend subscribed this user to a channel (a server-side subscription, docs/backend.md):
   * `subscription` receives its messages (attach handlers here, before the first one comes). Said
   * again after each reconnect (`resubscribed`), with the same `Subscription`. The client never
   * subscribes to it itself; it ends when the backend ends it (its `unsubscribed` event, reason
   * `server`).
   */
  subscribed: ServerSubscribedContext;
}

export interface ServerSubscribedContext {
  channel: string;
  byServer: true;
  subscription: Subscription;
  /** Not the first `subscribed` of this subscription (a reconnect). */
  resubscribed: boolean;
}

export interface PublishOptions {
  /**
   * A subscription token for the channel, for a binding with `authorize.token` (docs/protocol.md
   * section 3). Not needed while this client is subscribed to the channel: the relay uses the
   * subscription's token.
   */
  token?: string;
}

export interface PublishResult {
  /** The stored position, on a resumable channel whose relay acknowledges after storing. */
  seq?: number;
}

type Reply = OkFrame | PongFrame;

interface Pending {
  frame: Record<string, unknown>;
  resolve: (r: Reply) => void;
  reject: (e: WsrelayError) => void;
  timer: unknown;
  id?: number;
  /** Withdraws the frame from a transport that still holds it back (SSE's POST queue). */
  withdraw?: () => void;
}

interface Conn {
  transport: Transport | undefined;
  welcomed: boolean;
  factory: TransportFactory;
}

/** Tries of one presence page (the first included) when the relay answers 429 or 503, or not in time. */
const PRESENCE_PAGE_TRIES = 4;

function byteLength(s: string): number {
  return new TextEncoder().encode(s).length;
}

export class Client extends Emitter<ClientEvents> implements SubscriptionOwner {
  private readonly o: Required<
    Omit<
      ClientOptions,
      "token" | "getToken" | "getSubscriptionToken" | "WebSocket" | "clock" | "random" | "transports"
    >
  >;
  private readonly getToken: ClientOptions["getToken"];
  private readonly getSubscriptionToken: ClientOptions["getSubscriptionToken"];
  private readonly transports: TransportFactory[];
  private readonly clock: Clock;
  private readonly random: () => number;

  private _state: ClientState = "disconnected";
  private conn: Conn | undefined;
  private stopped = true;
  private generation = 0;
  private everConnected = false;

  private token: string | null | undefined;
  private needNewToken = false;

  private attempt = 0;
  private authFailures = 0;
  private failedOpens = 0;
  private transportIndex = 0;
  /** Consecutive failed opens of the first transport. */
  private transportFailures = 0;
  /** A fallback transport worked where the first failed (cleared when the first works again). */
  private fellBack = false;
  private welcomedAt = 0;
  /** Consecutive welcomed connections that ended within `stableConnectionMs`. */
  private shortSessions = 0;
  private drainAt: number | undefined;

  private reconnectTimer: unknown;
  private connectTimer: unknown;
  private pingTimer: unknown;
  private pongTimer: unknown;
  private readonly refreshTimer: RefreshTimer;
  private lastReceived = 0;
  private pingSentAt = 0;

  private nextId = 1;
  private readonly inflight = new Map<number, Pending>();
  private queue: Pending[] = [];
  private readonly subs = new Map<string, Subscription>();
  private readonly subRequests = new Map<number, Subscription>();
  private readonly ignoredReplies = new Set<number>();
  private welcome: WelcomeFrame | undefined;
  /** The connection named in `?resume=` at the next connect: the last welcomed one, until the app disconnects or the client stops. */
  private resumeFrom: string | undefined;
  private onlineListener: (() => void) | undefined;

  constructor(options: ClientOptions) {
    super();
    this.o = {
      url: options.url,
      minReconnectDelayMs: options.minReconnectDelayMs ?? 500,
      maxReconnectDelayMs: options.maxReconnectDelayMs ?? 20_000,
      stableConnectionMs: options.stableConnectionMs ?? 10_000,
      connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
      pingIntervalMs: options.pingIntervalMs ?? 15_000,
      pongTimeoutMs: options.pongTimeoutMs ?? 10_000,
      requestTimeoutMs: options.requestTimeoutMs ?? 10_000,
      maxQueuedRequests: options.maxQueuedRequests ?? 100,
      refreshToken: options.refreshToken ?? true,
      tokenMinValidityMs: options.tokenMinValidityMs ?? 5_000,
      drainJitterMs: options.drainJitterMs ?? 1_000,
      maxAuthFailures: options.maxAuthFailures ?? 3,
      newTokenAfterFailedOpens: options.newTokenAfterFailedOpens ?? 3,
      fallbackAfterFailures: options.fallbackAfterFailures ?? 2,
      reconnectOnOnline: options.reconnectOnOnline ?? true,
    };
    this.token = options.token;
    this.getToken = options.getToken;
    this.getSubscriptionToken = options.getSubscriptionToken;
    // Where the platform has EventSource (browsers), the SSE + POST transport follows the
    // WebSocket one: a network that blocks WebSockets gets the fallback by itself.
    const hasEventSource = typeof (globalThis as { EventSource?: unknown }).EventSource === "function";
    this.transports = options.transports?.length
      ? options.transports
      : hasEventSource
        ? [webSocketTransport(options.WebSocket), sseTransport()]
        : [webSocketTransport(options.WebSocket)];
    this.clock = options.clock ?? systemClock;
    this.random = options.random ?? Math.random;
    this.refreshTimer = new RefreshTimer(this.clock);
  }

  // ---- public API -------------------------------------------------------------------------

  get state(): ClientState {
    return this._state;
  }

  /** The name of the transport of the current (or last) connection: "websocket", "sse". */
  get transport(): string {
    return (this.conn?.factory ?? this.transports[this.transportIndex])!.name;
  }

  /** The relay's `welcome` of the current connection. */
  get server(): WelcomeFrame | undefined {
    return this.welcome;
  }

  /** Starts connecting (and keeps reconnecting). No effect unless disconnected. */
  connect(): void {
    if (this._state !== "disconnected") return;
    this.stopped = false;
    this.attempt = 0;
    this.shortSessions = 0;
    this.authFailures = 0;
    this.failedOpens = 0;
    this.transportIndex = 0;
    this.transportFailures = 0;
    this.listenOnline(true);
    this.scheduleConnect(0, "connect");
  }

  /**
   * Closes the connection (1000) and stops reconnecting. Subscriptions stay registered and
   * resubscribe on the next `connect()`; queued requests are rejected (`not_connected`).
   */
  disconnect(): void {
    this.stopped = true;
    // The app ended it: the backend hears it ended, not resumed.
    this.resumeFrom = undefined;
    this.generation++;
    this.listenOnline(false);
    this.clearTimer("reconnectTimer");
    const conn = this.conn;
    if (conn) {
      conn.transport?.close(1000, "client disconnect");
      this.closed(conn, 1000, "client disconnect", true);
    } else {
      this.failQueue("not_connected", "client disconnected");
      this.failPresenceWaiters("client disconnected");
      this.setState("disconnected");
    }
  }

  /**
   * Subscribes to a channel; the subscription is (re)sent on every connection until
   * `unsubscribe()`. Throws if this client already has a subscription to the channel.
   */
  subscribe(channel: string, options: SubscriptionOptions = {}): Subscription {
    if (this.subs.has(channel))
      throw new Error(`already subscribed to ${channel}: use getSubscription() or unsubscribe first`);
    const sub = new Subscription(this, channel, options, this.clock);
    this.subs.set(channel, sub);
    sub._subscribing("subscribe");
    if (this.conn?.welcomed) this.sendSubscribe(sub);
    return sub;
  }

  getSubscription(channel: string): Subscription | undefined {
    return this.subs.get(channel);
  }

  get subscriptions(): Subscription[] {
    return [...this.subs.values()];
  }

  /**
   * Publishes a JSON value; settles with the relay's `ok` (resolve) or `error` (reject, with
   * code, reason and, for a backend's deny, `appCode`).
   */
  async publish(channel: string, payload: unknown, options: PublishOptions = {}): Promise<PublishResult> {
    const token = options.token ? { token: options.token } : {};
    const ok = (await this.request({ type: "publish", channel, payload, ...token })) as OkFrame;
    return ok.seq !== undefined ? { seq: ok.seq } : {};
  }

  /** Publishes a string as the exact NATS payload (not JSON-encoded). */
  async publishText(channel: string, text: string, options: PublishOptions = {}): Promise<PublishResult> {
    const token = options.token ? { token: options.token } : {};
    const ok = (await this.request({ type: "publish", channel, text, ...token })) as OkFrame;
    return ok.seq !== undefined ? { seq: ok.seq } : {};
  }

  /** An application-level round trip; resolves with the time it took in ms. */
  async ping(): Promise<number> {
    const start = this.clock.now();
    await this.request({ type: "ping" });
    return this.clock.now() - start;
  }

  /**
   * Refreshes the token in band now (normally scheduled by itself before expiry): sends any
   * token from `getToken` other than the current one, also one that does not expire later,
   * e.g. with new claims (the relay then checks every subscription again under them, and ends
   * the ones no longer allowed with `forbidden`).
   */
  async refreshTokenNow(): Promise<void> {
    await this.refreshInBand(true);
  }

  // ---- connection -------------------------------------------------------------------------

  private setState(state: ClientState): void {
    const previous = this._state;
    if (previous === state) return;
    this._state = state;
    this.emit("state", { state, previous });
  }

  private clearTimer(name: "reconnectTimer" | "connectTimer" | "pingTimer" | "pongTimer"): void {
    if (this[name] !== undefined) {
      this.clock.clearTimeout(this[name]);
      this[name] = undefined;
    }
  }

  private listenOnline(on: boolean): void {
    const g = globalThis as {
      addEventListener?: (n: string, f: () => void) => void;
      removeEventListener?: (n: string, f: () => void) => void;
    };
    if (typeof g.addEventListener !== "function" || typeof g.removeEventListener !== "function") return;
    if (on && this.o.reconnectOnOnline && !this.onlineListener) {
      this.onlineListener = () => {
        // Back online while waiting out a backoff: try now (not while waiting for a drain turn).
        if (this._state === "connecting" && this.reconnectTimer !== undefined && this.drainAt === undefined) {
          this.clearTimer("reconnectTimer");
          this.attempt = 0;
          this.scheduleConnect(0, "online");
        }
      };
      g.addEventListener("online", this.onlineListener);
    } else if (!on && this.onlineListener) {
      g.removeEventListener("online", this.onlineListener);
      this.onlineListener = undefined;
    }
  }

  private scheduleConnect(delayMs: number, reason: string, step = 0): void {
    this.clearTimer("reconnectTimer");
    this.setState("connecting");
    this.emit("connecting", { reason, attempt: step, delayMs });
    const gen = this.generation;
    this.reconnectTimer = this.clock.setTimeout(() => {
      this.reconnectTimer = undefined;
      if (gen === this.generation && !this.stopped) void this.open(gen);
    }, delayMs);
  }

  /** Schedules the next attempt after a failure before any connection existed (token, transport). */
  private retryLater(reason: string): void {
    const step = this.attempt++;
    const delay = backoffDelay(step, this.o.minReconnectDelayMs, this.o.maxReconnectDelayMs, this.random);
    this.scheduleConnect(delay, reason, step);
  }

  private stop(kind: ErrorKind, error: WsrelayError): void {
    this.stopped = true;
    this.resumeFrom = undefined;
    this.generation++;
    this.listenOnline(false);
    this.clearTimer("reconnectTimer");
    this.emit("error", { kind, error });
    this.failQueue("not_connected", error.reason);
    this.failPresenceWaiters(error.reason);
    this.setState("disconnected");
  }

  /** The client stopped: fetchPresence() calls waiting for a resubscribe's list would wait until connect(). */
  private failPresenceWaiters(reason: string): void {
    for (const sub of this.subs.values()) sub._presenceSettle(new WsrelayError("not_connected", reason));
  }

  private async open(gen: number): Promise<void> {
    // 1. A token good enough to connect with.
    let token = this.token;
    const expired = typeof token === "string" && tokenExpired(token, this.clock.now(), this.o.tokenMinValidityMs);
    if (this.getToken && (this.needNewToken || token === undefined || expired)) {
      try {
        token = (await this.getToken()) ?? null;
      } catch (e) {
        if (gen !== this.generation || this.stopped) return;
        this.emit("error", { kind: "token", error: new WsrelayError("token", `getToken failed: ${String(e)}`) });
        this.retryLater("token");
        return;
      }
      if (gen !== this.generation || this.stopped) return;
      this.token = token;
      this.needNewToken = false;
      if (token && tokenExpired(token, this.clock.now(), this.o.tokenMinValidityMs)) {
        this.emit("error", { kind: "token", error: new WsrelayError("token", "getToken returned an expired token") });
        this.needNewToken = true;
        this.retryLater("token");
        return;
      }
    } else if (expired) {
      this.stop("token", new WsrelayError("token", "the token expired and no getToken is configured"));
      return;
    }

    // 2. The transport.
    const factory = this.transports[this.transportIndex]!;
    const base = typeof this.o.url === "function" ? this.o.url() : this.o.url;
    const url = this.resumeFrom !== undefined ? withResume(base, this.resumeFrom) : base;
    const conn: Conn = { transport: undefined, welcomed: false, factory };
    this.conn = conn;
    this.welcome = undefined;
    try {
      conn.transport = factory.open(
        {
          url,
          token: token ?? null,
          currentToken: () => this.token ?? null,
          maxQueuedRequests: this.o.maxQueuedRequests,
        },
        {
          onOpen: () => {},
          onFrame: (text) => this.frame(conn, text),
          onClose: (code, reason, wasClean) => this.closed(conn, code, reason, wasClean),
        },
      );
    } catch (e) {
      // A failed connection like any other (counted toward the fallback, reported by
      // `disconnected`, retried with backoff), after the `error` that says why.
      const reason = `${factory.name} unavailable: ${String(e)}`;
      this.emit("error", { kind: "transport", error: new WsrelayError("disconnected", reason) });
      this.closed(conn, 1006, reason, false);
      return;
    }
    this.connectTimer = this.clock.setTimeout(() => {
      this.connectTimer = undefined;
      this.abandon(conn, LocalClose.ConnectTimeout, `no welcome within ${this.o.connectTimeoutMs} ms`);
    }, this.o.connectTimeoutMs);
  }

  /**
   * A connection ended before `welcome`; `refused`: by a refusal the relay sent (4401, 4403,
   * 4503...), which proves the transport works. Returns true when the next transport is to be
   * tried at once: a probe of whether it works where this one failed. A relay that is down
   * fails every transport, so the client falls back only when the relay is reachable over the
   * fallback while the first transport fails.
   */
  private openFailed(refused: boolean): boolean {
    const i = this.transportIndex;
    if (refused) {
      if (i > 0) this.fellBack = true;
      return false;
    }
    if (this.transports.length < 2) return false;
    if (i === 0) {
      this.transportFailures++;
      // Once a fallback has worked, the first transport gets one try after a lost session.
      const threshold = this.fellBack ? 1 : this.o.fallbackAfterFailures;
      if (this.transportFailures < threshold) return false;
      this.transportFailures = 0;
      this.transportIndex = 1;
      return true;
    }
    if (i + 1 < this.transports.length) {
      this.transportIndex = i + 1;
      return true;
    }
    // Every transport failed: the relay is unreachable, not the first transport blocked.
    this.transportIndex = 0;
    this.transportFailures = 0;
    return false;
  }

  /** Drops a connection the client gave up on (dead link, timeout, deliberate reconnect). */
  private abandon(conn: Conn, code: number, reason: string): void {
    if (conn !== this.conn) return;
    conn.transport?.close(code, reason);
    this.closed(conn, code, reason, false);
  }

  private welcomed(conn: Conn, w: WelcomeFrame): void {
    if (conn.welcomed) return;
    conn.welcomed = true;
    this.clearTimer("connectTimer");
    this.welcome = w;
    this.resumeFrom = w.connection;
    this.welcomedAt = this.clock.now();
    this.failedOpens = 0;
    this.authFailures = 0;
    this.transportFailures = 0;
    this.fellBack = conn.factory !== this.transports[0];
    this.drainAt = undefined;
    const reconnected = this.everConnected;
    this.everConnected = true;
    this.setState("connected");
    this.emit("connected", {
      transport: conn.factory.name,
      protocol: w.protocol,
      maxMessageBytes: w.maxMessageBytes,
      anonymous: w.anonymous,
      reconnected,
      ...(w.connection !== undefined ? { connection: w.connection } : {}),
      ...(w.resumed !== undefined ? { resumed: w.resumed } : {}),
      ...(w.data !== undefined ? { data: w.data } : {}),
    });
    if (conn !== this.conn) return; // a listener disconnected
    this.startHeartbeat(conn);
    this.scheduleRefresh();
    const server = new Set(Array.isArray(w.serverChannels) ? w.serverChannels : []);
    for (const sub of [...this.subs.values()]) {
      if (sub._retryTimer !== undefined) {
        this.clock.clearTimeout(sub._retryTimer);
        sub._retryTimer = undefined;
      }
      if (sub._byServer) {
        // The relay subscribes it again (its `subscribed` frame follows), unless the backend
        // ended it while this client was away: then the welcome does not name it.
        if (!server.has(sub.channel)) this.relayUnsubscribed(sub.channel, "server");
        continue;
      }
      if (sub.state !== "unsubscribed") this.sendSubscribe(sub);
    }
    const queued = this.queue;
    this.queue = [];
    for (const p of queued) this.transmit(p);
  }

  private closed(conn: Conn, code: number, reason: string, wasClean: boolean): void {
    if (conn !== this.conn) return;
    this.conn = undefined;
    for (const t of ["connectTimer", "pingTimer", "pongTimer"] as const) this.clearTimer(t);
    this.refreshTimer.cancel();
    const wasWelcomed = conn.welcomed;
    let probe = false;
    if (wasWelcomed) {
      // A lost session starts over: the backoff from its first step (unless sessions keep
      // ending at once), the transports from the first (the relay may just have restarted;
      // a fallback is chosen again only if the first transport fails again).
      this.shortSessions =
        this.clock.now() - this.welcomedAt >= this.o.stableConnectionMs ? 0 : this.shortSessions + 1;
      this.attempt = Math.max(0, this.shortSessions - 1);
      this.transportIndex = 0;
      this.transportFailures = 0;
    } else {
      this.failedOpens++;
      // A refusal the relay sent (4401, 4403, 4503...) came through: the transport works.
      probe = this.openFailed(code >= 4000 && code < 4900);
    }
    for (const p of this.inflight.values()) {
      this.clock.clearTimeout(p.timer);
      p.reject(new WsrelayError("disconnected", `connection closed (${code}) before the reply`));
    }
    this.inflight.clear();
    this.subRequests.clear();
    this.ignoredReplies.clear();
    for (const sub of this.subs.values()) {
      sub._pendingId = undefined;
      sub._refresh.cancel();
      if (sub.state === "subscribed") sub._subscribing("disconnected");
    }

    if (this.stopped) {
      this.emit("disconnected", { code, reason, wasClean, willReconnect: false });
      this.failQueue("not_connected", "client disconnected");
      this.failPresenceWaiters("client disconnected");
      this.setState("disconnected");
      return;
    }

    const policy = closePolicy(code);
    if (policy.newToken) this.needNewToken = true;
    // Every N-th failed open in a row (not every one: during an outage of the relays, a crowd
    // of clients must not turn into a storm on the app's token endpoint).
    const n = this.o.newTokenAfterFailedOpens;
    if (!wasWelcomed && this.getToken && n > 0 && this.failedOpens % n === 0) this.needNewToken = true;
    let terminal = !policy.reconnect;
    if (policy.authFailure) {
      this.authFailures++;
      if (this.authFailures >= this.o.maxAuthFailures) terminal = true;
    }
    if (terminal) {
      this.emit("disconnected", { code, reason, wasClean, willReconnect: false });
      this.stop("closed", new WsrelayError(code, reason || `connection closed with ${code}`));
      return;
    }

    let delay: number;
    let why = "reconnect";
    let step = 0;
    if (this.drainAt !== undefined) {
      // The relay gave this connection a turn: reconnect at it, never before, plus a little jitter.
      delay = Math.max(0, this.drainAt - this.clock.now()) + Math.floor(this.random() * this.o.drainJitterMs);
      this.drainAt = undefined;
      why = "drain";
    } else if (policy.immediate) {
      delay = 0;
      why = "token";
    } else if (probe) {
      // Right after the failure, so that both transports meet the relay in the same state.
      delay = 0;
      why = "fallback";
      step = this.attempt;
    } else {
      step = Math.max(this.attempt, policy.minAttempt);
      this.attempt = step + 1;
      delay =
        policy.retryAfterMs + backoffDelay(step, this.o.minReconnectDelayMs, this.o.maxReconnectDelayMs, this.random);
    }
    this.emit("disconnected", { code, reason, wasClean, willReconnect: true, delayMs: delay });
    if (!this.stopped) this.scheduleConnect(delay, why, step);
  }

  // ---- dead-link detection ----------------------------------------------------------------

  private startHeartbeat(conn: Conn): void {
    this.lastReceived = this.clock.now();
    if (this.o.pingIntervalMs > 0) this.schedulePing(conn, this.o.pingIntervalMs);
  }

  private schedulePing(conn: Conn, delay: number): void {
    this.pingTimer = this.clock.setTimeout(() => {
      this.pingTimer = undefined;
      if (conn !== this.conn) return;
      const idle = this.clock.now() - this.lastReceived;
      if (idle < this.o.pingIntervalMs) {
        this.schedulePing(conn, this.o.pingIntervalMs - idle);
        return;
      }
      this.pingSentAt = this.clock.now();
      this.sendRaw(conn, { type: "ping" });
      this.pongTimer = this.clock.setTimeout(() => {
        this.pongTimer = undefined;
        if (conn !== this.conn) return;
        if (this.lastReceived >= this.pingSentAt) {
          const next = this.lastReceived + this.o.pingIntervalMs - this.clock.now();
          this.schedulePing(conn, Math.max(0, next));
          return;
        }
        this.abandon(
          conn,
          LocalClose.DeadLink,
          `no frame from the relay for ${this.clock.now() - this.lastReceived} ms`,
        );
      }, this.o.pongTimeoutMs);
    }, delay);
  }

  // ---- tokens -----------------------------------------------------------------------------

  private scheduleRefresh(): void {
    this.refreshTimer.cancel();
    if (!this.o.refreshToken || !this.getToken || !this.token) return;
    this.refreshTimer.before(this.token, () => void this.refreshInBand(false));
  }

  private async refreshInBand(byApp: boolean): Promise<void> {
    const conn = this.conn;
    const getToken = this.getToken;
    if (!conn?.welcomed || !getToken) {
      if (byApp) throw new WsrelayError("not_connected", "no open connection to refresh");
      return;
    }
    const r = await refreshOnce({
      source: "getToken",
      current: this.token,
      requireLater: !byApp,
      fetch: getToken,
      send: (token) => this.request({ type: "refresh", token }),
      live: () => conn === this.conn,
      now: () => this.clock.now(),
    });
    switch (r.kind) {
      case "ok":
        this.token = r.token;
        this.emit("token", { inBand: true, ...(r.expiresAt !== undefined ? { expiresAt: r.expiresAt } : {}) });
        this.scheduleRefresh();
        return;
      case "gone":
        if (r.token) this.token = r.token;
        return;
      case "fetch_failed":
        this.emit("error", { kind: "refresh", error: r.error });
        if (conn === this.conn && r.retryInMs !== undefined)
          this.refreshTimer.after(r.retryInMs, () => void this.refreshInBand(false));
        break;
      case "stale":
        // Nothing newer to offer: the relay closes with 1008 at expiry and the client then
        // asks getToken again before reconnecting.
        this.emit("error", { kind: "refresh", error: r.error });
        break;
      case "refused":
        // 401: the relay refuses the new token itself, so ask getToken again before connecting.
        // Otherwise (403: another identity; 400: a relay without in-band refresh; no reply)
        // connect anew with the new token.
        if (r.error.code === 401) {
          this.token = undefined;
          this.needNewToken = true;
        } else {
          this.token = r.token;
        }
        this.emit("error", { kind: "refresh", error: r.error });
        if (conn === this.conn)
          this.abandon(conn, LocalClose.TokenRefresh, `token refresh failed (${r.error.code}): reconnecting with a new token`);
        break;
    }
    if (byApp) throw r.error;
  }

  // ---- requests ---------------------------------------------------------------------------

  private request(frame: Record<string, unknown>): Promise<Reply> {
    return new Promise<Reply>((resolve, reject) => this.requestWith(frame, resolve, reject));
  }

  /**
   * A request whose outcome is handled synchronously, as the reply frame is read: before the
   * frames after it (presence pages must be applied before the joins and leaves that follow).
   */
  private requestWith(frame: Record<string, unknown>, resolve: (r: Reply) => void, reject: (e: WsrelayError) => void): void {
    if (this._state === "disconnected") {
      reject(new WsrelayError("not_connected", "the client is not connected (call connect())"));
      return;
    }
    const p: Pending = { frame, resolve, reject, timer: undefined };
    p.timer = this.clock.setTimeout(() => {
      if (p.id !== undefined) {
        this.inflight.delete(p.id);
        // Rejected: it must not go out later (SSE may still hold it in its POST queue).
        p.withdraw?.();
      } else this.queue = this.queue.filter((q) => q !== p);
      reject(new WsrelayError("timeout", `no reply within ${this.o.requestTimeoutMs} ms`));
    }, this.o.requestTimeoutMs);
    if (this.conn?.welcomed) {
      this.transmit(p);
    } else if (this.queue.length >= this.o.maxQueuedRequests) {
      this.clock.clearTimeout(p.timer);
      reject(new WsrelayError("queue_full", `${this.o.maxQueuedRequests} requests already wait for a connection`));
    } else {
      this.queue.push(p);
    }
  }

  private transmit(p: Pending): void {
    const conn = this.conn;
    if (!conn?.welcomed) {
      this.queue.push(p);
      return;
    }
    const id = this.nextId++;
    const text = JSON.stringify({ ...p.frame, id });
    const max = this.welcome?.maxMessageBytes;
    if (max && byteLength(text) > max) {
      this.clock.clearTimeout(p.timer);
      p.reject(new WsrelayError("too_big", `the frame is larger than the relay's maxMessageBytes (${max})`));
      return;
    }
    p.id = id;
    this.inflight.set(id, p);
    try {
      const withdraw = conn.transport?.send(text, true);
      if (withdraw) p.withdraw = withdraw;
    } catch (e) {
      if (e instanceof WsrelayError) {
        // Refused by the transport (SSE's POST queue is full): nothing was sent.
        this.inflight.delete(id);
        this.clock.clearTimeout(p.timer);
        p.reject(e);
      }
      // Anything else: the transport is closing, and its close rejects the request.
    }
  }

  private sendRaw(conn: Conn, frame: Record<string, unknown>): void {
    try {
      conn.transport?.send(JSON.stringify(frame));
    } catch {
      // the close event follows
    }
  }

  private failQueue(code: "not_connected", reason: string): void {
    const q = this.queue;
    this.queue = [];
    for (const p of q) {
      this.clock.clearTimeout(p.timer);
      p.reject(new WsrelayError(code, reason));
    }
  }

  // ---- frames -----------------------------------------------------------------------------

  private frame(conn: Conn, text: string): void {
    if (conn !== this.conn) return;
    this.lastReceived = this.clock.now();
    const f = parseFrame(text);
    if (!f) return;
    switch (f.type) {
      case "welcome":
        this.welcomed(conn, f);
        return;
      case "ok":
      case "error":
      case "pong":
        this.reply(f);
        return;
      case "message":
        this.message(f);
        return;
      case "dropped":
        this.emit("dropped", { count: f.count, ...(f.channel !== undefined ? { channel: f.channel } : {}) });
        if (f.channel !== undefined) this.subs.get(f.channel)?._emit("dropped", { count: f.count });
        return;
      case "unsubscribed":
        this.relayUnsubscribed(f.channel, f.reason);
        return;
      case "subscribed":
        this.serverSubscribed(f);
        return;
      case "drain":
        this.drainAt = this.clock.now() + Math.max(0, f.reconnectAfterMs);
        this.emit("drain", { reconnectAfterMs: f.reconnectAfterMs, reason: f.reason ?? "shutdown" });
        return;
      case "join":
      case "leave":
      case "occupancy":
        this.presenceFrame(f);
        return;
      default:
        // A frame type from a newer relay: ignored, as the protocol asks.
        return;
    }
  }

  private reply(f: OkFrame | ErrorFrame | PongFrame): void {
    const id = f.id;
    if (typeof id !== "number") {
      if (f.type === "error")
        this.emit("error", { kind: "protocol", error: new WsrelayError(f.code, f.reason, f.appCode) });
      return;
    }
    if (this.ignoredReplies.delete(id)) return;
    const sub = this.subRequests.get(id);
    if (sub) {
      this.subRequests.delete(id);
      this.subscribeReply(sub, id, f);
      return;
    }
    const p = this.inflight.get(id);
    if (!p) return;
    this.inflight.delete(id);
    this.clock.clearTimeout(p.timer);
    if (f.type === "error") p.reject(new WsrelayError(f.code, f.reason, f.appCode));
    else p.resolve(f);
  }

  // ---- subscriptions ----------------------------------------------------------------------

  /** The function that gives this subscription its tokens, if any. */
  private tokenSource(sub: Subscription): ((channel: string) => Promise<string | null | undefined>) | undefined {
    return sub._getToken ?? this.getSubscriptionToken;
  }

  /**
   * Sends a subscribe, with a subscription token when the subscription has a token source or
   * was given one. A token still valid for `tokenMinValidityMs` is reused (after a reconnect
   * too: a fleet restart must not become one token request per subscription at once);
   * otherwise the source is asked first.
   */
  private sendSubscribe(sub: Subscription): void {
    const conn = this.conn;
    if (!conn?.welcomed) return;
    const attempt = ++sub._attempt;
    sub._refresh.cancel();
    const source = this.tokenSource(sub);
    const cached = sub._token;
    if (!source || (cached && !tokenExpired(cached, this.clock.now(), this.o.tokenMinValidityMs))) {
      this.sendSubscribeFrame(conn, sub, cached);
      return;
    }
    const name = `getSubscriptionToken(${sub.channel})`;
    // Still the subscribe this token was asked for (not unsubscribed, not a newer attempt or connection).
    const wanted = () =>
      attempt === sub._attempt && conn === this.conn && this.subs.get(sub.channel) === sub && sub.state !== "unsubscribed";
    Promise.resolve()
      .then(() => source(sub.channel))
      .then(
        (token) => {
          if (!wanted()) return;
          if (token && tokenExpired(token, this.clock.now(), this.o.tokenMinValidityMs)) {
            this.subscribeTokenFailed(sub, new WsrelayError("token", `${name} returned an expired token`));
            return;
          }
          sub._token = token || undefined;
          this.sendSubscribeFrame(conn, sub, sub._token);
        },
        (e: unknown) => {
          if (wanted()) this.subscribeTokenFailed(sub, new WsrelayError("token", `${name} failed: ${String(e)}`));
        },
      );
  }

  private sendSubscribeFrame(conn: Conn, sub: Subscription, token: string | undefined): void {
    const since: Position | undefined = sub._position.since();
    const id = this.nextId++;
    sub._pendingId = id;
    sub._sentSince = since;
    this.subRequests.set(id, sub);
    this.sendRaw(conn, {
      type: "subscribe",
      id,
      channel: sub.channel,
      ...(since ? { since } : {}),
      ...(token ? { token } : {}),
      ...(sub._presenceWanted ? { presence: true } : {}),
    });
  }

  private subscribeReply(sub: Subscription, id: number, f: OkFrame | ErrorFrame | PongFrame): void {
    if (sub._pendingId !== id) return;
    sub._pendingId = undefined;
    if (sub.state === "unsubscribed" || this.subs.get(sub.channel) !== sub) return;
    const since = sub._sentSince;
    if (f.type === "ok" || (f.type === "error" && f.code === 409)) {
      const ok: OkFrame = f.type === "ok" ? f : { type: "ok", id };
      const recovered = sub._position.subscribed(ok, since);
      const resubscribed = sub._everSubscribed;
      sub._everSubscribed = true;
      sub._retryAttempt = 0;
      sub._tokenFailures = 0;
      const pos = sub._position;
      sub._subscribed({
        resumable: ok.epoch !== undefined,
        recovering: since !== undefined,
        recovered,
        resubscribed,
        ...(pos.epoch !== undefined ? { epoch: pos.epoch } : {}),
        ...(pos.seq !== undefined ? { seq: pos.seq } : {}),
        ...(ok.data !== undefined ? { data: ok.data } : {}),
      });
      // A listener may have unsubscribed.
      if (sub.state !== "subscribed" || this.subs.get(sub.channel) !== sub) return;
      this.scheduleSubRefresh(sub);
      if (ok.presence !== undefined) this.presenceBuild(sub, ok.presence);
      // No snapshot (a 409, or fetchPresence() calls waiting on a plain subscription): page it.
      else if (sub._presenceWanted || sub._presenceWaiters.length > 0) this.presenceBuild(sub, undefined);
      return;
    }
    if (f.type !== "error") return;
    if (since !== undefined && (f.code === 400 || f.code === 422)) {
      // The relay refused the position (a relay without history, or a position it cannot
      // read): subscribe from now on, and say so with recovered: false.
      sub._position.reset();
      this.sendSubscribe(sub);
      return;
    }
    if (f.code === 503) {
      this.retrySubscribe(sub, "retry");
      return;
    }
    const err = new WsrelayError(f.code, f.reason, f.appCode);
    if (f.code === 401 && this.tokenSource(sub)) {
      // The relay refused the subscription token (invalid, expired): ask for a new one.
      this.subscribeTokenFailed(sub, err);
      return;
    }
    this.endSubscription(sub, err, true);
  }

  /** Ends a subscription for good and reports `err` (a refused subscribe, or too many token failures). */
  private endSubscription(sub: Subscription, err: WsrelayError, byRelay: boolean): void {
    this.subs.delete(sub.channel);
    sub._refresh.cancel();
    if (sub._retryTimer !== undefined) {
      this.clock.clearTimeout(sub._retryTimer);
      sub._retryTimer = undefined;
    }
    sub._emit("error", err);
    this.emit("error", { kind: "subscribe", error: err });
    sub._ended({
      reason: err.reason,
      ...(typeof err.code === "number" ? { code: err.code } : {}),
      ...(err.appCode !== undefined ? { appCode: err.appCode } : {}),
      byRelay,
    });
  }

  /**
   * No usable subscription token (the source threw or gave an expired one, or the relay
   * refused it with 401): retry with a new one after a backoff, at most `maxAuthFailures` in a
   * row, then end the subscription.
   */
  private subscribeTokenFailed(sub: Subscription, err: WsrelayError): void {
    sub._token = undefined;
    sub._tokenFailures++;
    if (sub._tokenFailures >= this.o.maxAuthFailures) {
      this.endSubscription(sub, err, typeof err.code === "number");
      return;
    }
    sub._emit("error", err);
    this.emit("error", { kind: "subscribe", error: err });
    this.retrySubscribe(sub, "token");
  }

  private retrySubscribe(sub: Subscription, reason: "retry" | "unavailable" | "token"): void {
    sub._subscribing(reason);
    if (sub._retryTimer !== undefined) return;
    const delay = backoffDelay(sub._retryAttempt++, this.o.minReconnectDelayMs, this.o.maxReconnectDelayMs, this.random);
    sub._retryTimer = this.clock.setTimeout(() => {
      sub._retryTimer = undefined;
      if (sub.state !== "unsubscribed" && this.subs.get(sub.channel) === sub) this.sendSubscribe(sub);
    }, delay);
  }

  // ---- subscription tokens ----------------------------------------------------------------

  private scheduleSubRefresh(sub: Subscription): void {
    sub._refresh.cancel();
    if (!this.o.refreshToken || !this.tokenSource(sub) || !sub._token) return;
    sub._refresh.before(sub._token, () => void this.subRefresh(sub));
  }

  /** Sends `subrefresh` with a new token for a live subscription (the same path as the connection's `refresh`). */
  private async subRefresh(sub: Subscription): Promise<void> {
    const conn = this.conn;
    const source = this.tokenSource(sub);
    if (!conn?.welcomed || !source || sub.state !== "subscribed" || this.subs.get(sub.channel) !== sub) return;
    const attempt = sub._attempt;
    const live = () =>
      conn === this.conn && attempt === sub._attempt && this.subs.get(sub.channel) === sub && sub.state === "subscribed";
    const r = await refreshOnce({
      source: `getSubscriptionToken(${sub.channel})`,
      current: sub._token,
      requireLater: true,
      fetch: () => source(sub.channel),
      send: (token) => this.request({ type: "subrefresh", channel: sub.channel, token }),
      live,
      now: () => this.clock.now(),
    });
    switch (r.kind) {
      case "ok":
        sub._token = r.token;
        sub._emit("token", r.expiresAt !== undefined ? { expiresAt: r.expiresAt } : {});
        this.scheduleSubRefresh(sub);
        return;
      case "gone":
        return;
      case "fetch_failed":
        if (live() && r.retryInMs !== undefined) sub._refresh.after(r.retryInMs, () => void this.subRefresh(sub));
        break;
      case "stale":
      case "refused":
        // The subscription runs on until its token's exp; the relay then ends it with
        // `expired` and the client subscribes again with a new token.
        break;
    }
    sub._emit("error", r.error);
    this.emit("error", { kind: "subrefresh", error: r.error });
  }

  /** A server-side subscription (the backend's): a new `Subscription`, one the app had taken over, or one subscribed again after a reconnect. */
  private serverSubscribed(f: SubscribedFrame): void {
    if (typeof f.channel !== "string") return;
    let sub = this.subs.get(f.channel);
    if (!sub) {
      sub = new Subscription(this, f.channel, {}, this.clock);
      this.subs.set(f.channel, sub);
    }
    sub._byServer = true;
    // A subscribe of the app's own still in flight: its reply no longer matters.
    if (sub._pendingId !== undefined) this.subRequests.delete(sub._pendingId);
    sub._pendingId = undefined;
    sub._refresh.cancel();
    sub._token = undefined;
    if (sub._retryTimer !== undefined) {
      this.clock.clearTimeout(sub._retryTimer);
      sub._retryTimer = undefined;
    }
    const pos = sub._position;
    // A taken-over subscription goes on where it was (no position in the frame).
    if (f.epoch !== undefined) pos.subscribed({ epoch: f.epoch, ...(f.seq !== undefined ? { seq: f.seq } : {}) }, undefined);
    const resubscribed = sub._everSubscribed;
    sub._everSubscribed = true;
    sub._retryAttempt = 0;
    sub._subscribed({
      resumable: pos.epoch !== undefined,
      recovering: false,
      recovered: false,
      resubscribed,
      byServer: true,
      ...(pos.epoch !== undefined ? { epoch: pos.epoch } : {}),
      ...(pos.seq !== undefined ? { seq: pos.seq } : {}),
    });
    this.emit("subscribed", { channel: f.channel, byServer: true, subscription: sub, resubscribed });
  }

  private relayUnsubscribed(channel: string, reason: string): void {
    const sub = this.subs.get(channel);
    if (!sub) return;
    sub._pendingId = undefined;
    sub._refresh.cancel();
    // A server-side subscription is not the client's to subscribe again: whatever ended it
    // ends it here (the relay gives it again on the next connection while the backend keeps it).
    const own = !sub._byServer;
    if (own && reason === "unavailable") {
      // Transient (the relay lost its NATS subscription): resubscribe with backoff, resuming.
      this.retrySubscribe(sub, "unavailable");
      return;
    }
    if (own && reason === "expired" && this.tokenSource(sub)) {
      // The subscription token expired before a subrefresh replaced it: subscribe again at
      // once with a new token (resuming on a resumable channel). A token that cannot be had
      // is retried with backoff, boundedly (subscribeTokenFailed).
      sub._token = undefined;
      sub._subscribing("expired");
      this.sendSubscribe(sub);
      return;
    }
    this.subs.delete(channel);
    if (sub._retryTimer !== undefined) {
      this.clock.clearTimeout(sub._retryTimer);
      sub._retryTimer = undefined;
    }
    sub._ended({ reason, byRelay: true });
  }

  private message(f: MessageFrame): void {
    const sub = this.subs.get(f.channel);
    if (!sub || sub.state === "unsubscribed") return;
    const seq = typeof f.seq === "number" ? f.seq : undefined;
    const prev = typeof f.prev === "number" ? f.prev : undefined;
    const verdict = sub._position.judge(seq, prev);
    if (verdict === "duplicate") {
      sub._duplicates++;
      return;
    }
    if (verdict === "gap") {
      // A message on this channel was skipped. While a resume is under way the relay's replay
      // brings it; otherwise resync: unsubscribe and subscribe again from the last delivered
      // position (the relay processes the two in order).
      // A server-side subscription cannot be resynced by the client (the relay refuses its
      // unsubscribe): delivered, its `prev` shows the hole.
      if (!sub._byServer) {
        if (sub.state === "subscribed") this.resync(sub);
        return;
      }
    }
    sub._position.delivered(seq);
    let m: Message;
    if (f.base64 !== undefined) m = { channel: f.channel, data: decodeBase64(f.base64), format: "binary" };
    else if (f.text !== undefined) m = { channel: f.channel, data: f.text, format: "text" };
    else m = { channel: f.channel, data: f.payload, format: "json" };
    if (seq !== undefined) m.seq = seq;
    if (prev !== undefined) m.prev = prev;
    sub._emit("message", m);
  }

  private resync(sub: Subscription): void {
    const conn = this.conn;
    if (!conn?.welcomed) return;
    sub._subscribing("gap");
    const id = this.nextId++;
    this.ignoredReplies.add(id);
    this.sendRaw(conn, { type: "unsubscribe", id, channel: sub.channel });
    this.sendSubscribe(sub);
  }

  // ---- presence ---------------------------------------------------------------------------

  /**
   * Builds a subscription's member list: from a subscribe's snapshot (`first`), or by paging
   * from the first key; pages on with `presence` requests until complete. Events that arrive
   * meanwhile are folded into it; the completed list replaces the old one and what changed is
   * reported as join / leave, then `presence`.
   */
  private presenceBuild(sub: Subscription, first: PresencePage | undefined): void {
    const gen = sub._presence.begin();
    if (first !== undefined) this.presencePage(sub, gen, undefined, first);
    else this.presenceRequest(sub, gen, undefined, 0);
  }

  private presencePage(sub: Subscription, gen: number, after: string | undefined, page: PresencePage): void {
    let next: string | undefined;
    try {
      next = sub._presence.page(after, page);
    } catch (e) {
      if (!(e instanceof PresenceProtocolError)) throw e;
      this.presenceFailed(sub, new WsrelayError(400, `presence of ${sub.channel}: ${e.message}`));
      return;
    }
    if (next !== undefined) {
      this.presenceRequest(sub, gen, next, 0);
      return;
    }
    const diff = sub._presence.finish();
    for (const m of diff.left) sub._emit("leave", m);
    for (const m of diff.joined) sub._emit("join", m);
    // A listener may have unsubscribed or asked for another list.
    if (sub._presence.building() || sub.state !== "subscribed") return;
    sub._emit("presence", {
      members: sub._presence.members,
      occupancy: sub.occupancy() ?? { clients: 0, users: 0, events: undefined },
      initial: diff.initial,
    });
    sub._presenceSettle();
  }

  private presenceRequest(sub: Subscription, gen: number, after: string | undefined, failures: number): void {
    const live = () => sub._presence.building(gen) && this.subs.get(sub.channel) === sub && sub.state === "subscribed";
    const limit = sub._presencePageSize;
    this.requestWith(
      {
        type: "presence",
        channel: sub.channel,
        ...(after !== undefined ? { after } : {}),
        ...(limit !== undefined ? { limit } : {}),
      },
      (r) => {
        if (!live()) return;
        const page = (r as OkFrame).presence;
        if (page === undefined) {
          this.presenceFailed(sub, new WsrelayError(400, `presence of ${sub.channel}: an ok without presence`));
          return;
        }
        this.presencePage(sub, gen, after, page);
      },
      (err) => {
        if (!live()) return;
        // A page the relay could not give now (rate, registry unavailable, slow): the same
        // page again after a backoff, a few times. "disconnected" needs nothing: the
        // resubscribe brings a new snapshot.
        const transient = err.code === 429 || err.code === 503 || err.code === "timeout";
        if (err.code === "disconnected") return;
        if (!transient || failures + 1 >= PRESENCE_PAGE_TRIES) {
          this.presenceFailed(sub, err);
          return;
        }
        const delay = backoffDelay(failures, this.o.minReconnectDelayMs, this.o.maxReconnectDelayMs, this.random);
        this.clock.setTimeout(() => {
          if (live()) this.presenceRequest(sub, gen, after, failures + 1);
        }, delay);
      },
    );
  }

  /** A member list could not be completed: the old one stays, the waiting fetchPresence() calls reject. */
  private presenceFailed(sub: Subscription, err: WsrelayError): void {
    sub._presence.abandon(false);
    sub._presenceSettle(err);
    sub._emit("error", err);
    this.emit("error", { kind: "presence", error: err });
  }

  private presenceFrame(f: PresenceEventFrame | OccupancyFrame): void {
    if (typeof f.channel !== "string") return;
    const sub = this.subs.get(f.channel);
    // Frames of a subscription being replaced (reconnect, resync) describe a list its new
    // snapshot replaces.
    if (!sub || !sub._presenceWanted || sub.state !== "subscribed") return;
    if (f.type === "occupancy") {
      if (typeof f.clients !== "number" || typeof f.users !== "number") return;
      const { occupancy, resumed } = sub._presence.occupancyFrame(f);
      sub._emit("occupancy", occupancy);
      // Events were off (too many members) and are on again: the list missed what changed
      // meanwhile. Page it again (joins and leaves from now on are folded into it).
      if (resumed && sub._presenceWanted && !sub._presence.building() && sub.state === "subscribed")
        this.presenceBuild(sub, undefined);
      return;
    }
    const m = f.member;
    if (m === null || typeof m !== "object" || typeof m.key !== "string") return;
    const changed = f.type === "join" ? sub._presence.join(m.key, m.info) : sub._presence.leave(m.key, m.info);
    if (changed) sub._emit(f.type, changed);
  }

  /** @internal called by Subscription.fetchPresence() */
  _fetchPresence(sub: Subscription): Promise<ReadonlyMap<string, PresenceMember>> {
    if (sub.state === "unsubscribed" || this.subs.get(sub.channel) !== sub)
      return Promise.reject(new WsrelayError("unsubscribed", `not subscribed to ${sub.channel}`));
    if (this._state === "disconnected")
      return Promise.reject(new WsrelayError("not_connected", "the client is not connected (call connect())"));
    const p = new Promise<ReadonlyMap<string, PresenceMember>>((resolve, reject) =>
      sub._presenceWaiters.push({ resolve, reject }),
    );
    // While subscribing, the subscribe's ok starts the list; a paging under way is joined.
    if (sub.state === "subscribed" && !sub._presence.building()) this.presenceBuild(sub, undefined);
    return p;
  }

  /** @internal called by Subscription.unsubscribe() */
  _unsubscribe(sub: Subscription): void {
    if (sub.state === "unsubscribed") return;
    if (sub._byServer && this.subs.get(sub.channel) === sub)
      throw new Error(`${sub.channel} is a server-side subscription: the backend ends it`);
    sub._refresh.cancel();
    if (sub._retryTimer !== undefined) {
      this.clock.clearTimeout(sub._retryTimer);
      sub._retryTimer = undefined;
    }
    const active = sub.state === "subscribed" || sub._pendingId !== undefined;
    if (this.subs.get(sub.channel) === sub) this.subs.delete(sub.channel);
    sub._pendingId = undefined;
    const conn = this.conn;
    if (active && conn?.welcomed) {
      const id = this.nextId++;
      this.ignoredReplies.add(id);
      this.sendRaw(conn, { type: "unsubscribe", id, channel: sub.channel });
    }
    sub._ended({ reason: "unsubscribe", byRelay: false });
  }
}

export type { ServerFrame };

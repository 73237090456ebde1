/** A subscription to one channel, owned by a `Client`. */
import { Emitter } from "./emitter.js";
import { WsrelayError } from "./errors.js";
import { PositionTracker, type Position } from "./position.js";
import { PresenceTracker, type Occupancy, type PresenceMember } from "./presence.js";
import { RefreshTimer, type TimerClock } from "./refresh.js";

export type SubscriptionState = "unsubscribed" | "subscribing" | "subscribed";

/** A message delivered on a channel. */
export interface Message {
  channel: string;
  /** The payload: a JSON value (`format: "json"`), a string (`"text"`) or bytes (`"binary"`). */
  data: unknown;
  format: "json" | "text" | "binary";
  /** Position in the channel's stream (resumable channels only). */
  seq?: number;
  /** The previous position on the same channel (resumable channels only; 0 when none). */
  prev?: number;
}

export interface SubscribedContext {
  /** The channel keeps history: the relay reported an epoch and position. */
  resumable: boolean;
  /** This subscribe asked the relay to replay from the last delivered position (`since`). */
  recovering: boolean;
  /**
   * True when the relay replayed everything missed since the last delivered message: nothing
   * was lost. When `resubscribed` is true and `recovered` is false, messages published while
   * the subscription was down may be missing: refetch the state the channel describes.
   */
  recovered: boolean;
  /** Not the first subscribe of this subscription (a reconnect, a relay restart, a resync). */
  resubscribed: boolean;
  /** The channel's stream epoch and the position the subscription is at (resumable only). */
  epoch?: string;
  seq?: number;
  /**
   * What the binding's authorization backend (`authorize.request`) replied to this subscribe,
   * when it sent any (the `ok`'s `data`), e.g. the channel's current state.
   */
  data?: unknown;
  /** A server-side subscription: the backend subscribed this user (a `subscribed` frame), not the app. */
  byServer?: boolean;
}

export interface SubscribingContext {
  /**
   * "subscribe" (first time), "disconnected", "unavailable" (relay ended it, retrying), "gap"
   * (resyncing), "retry" (503), "expired" (its subscription token expired: subscribing again
   * with a new one), "token" (getting a subscription token failed, or the relay refused it
   * with 401: retrying with backoff).
   */
  reason: "subscribe" | "disconnected" | "unavailable" | "gap" | "retry" | "expired" | "token";
}

export interface UnsubscribedContext {
  /** "unsubscribe" when the app asked; otherwise the relay's reason or error. */
  reason: string;
  /** The relay's error code when a subscribe was refused (403, 422, 430, ...). */
  code?: number;
  /** The authorization backend's own code (4000-4999) when it denied the subscribe. */
  appCode?: number;
  /** The relay ended or refused the subscription (as opposed to the app). */
  byRelay: boolean;
}

export interface SubscriptionEvents {
  state: { state: SubscriptionState; previous: SubscriptionState };
  subscribing: SubscribingContext;
  subscribed: SubscribedContext;
  unsubscribed: UnsubscribedContext;
  message: Message;
  /** The relay dropped this many messages of this channel for this connection (slow consumer, `dropOldest`). */
  dropped: { count: number };
  /** The relay took a new subscription token for this subscription (`subrefresh`). */
  token: { expiresAt?: number };
  error: WsrelayError;
  /**
   * Presence (`presence: true`): a member joined the channel, live or found by a list paged
   * again (after a reconnect, `fetchPresence()`); never for a member the list already holds.
   */
  join: PresenceMember;
  /** Presence: a member left (after its leave grace), live or found gone by a list paged again. */
  leave: PresenceMember;
  /** Presence: the channel's counts changed (at most one a second). */
  occupancy: Occupancy;
  /** Presence: the member list is whole (after the subscribe's snapshot and its pages, a resubscribe, `fetchPresence()`). */
  presence: PresenceSync;
}

/** The `presence` event: the member list is complete. */
export interface PresenceSync {
  /** The whole list (the map `presence()` returns). */
  members: ReadonlyMap<string, PresenceMember>;
  occupancy: Occupancy;
  /**
   * The subscription's first complete list: its members were not reported one by one. Any
   * later list (a resubscribe, `fetchPresence()`) reports what changed as `join` / `leave`
   * events first.
   */
  initial: boolean;
}

export interface SubscriptionOptions {
  onMessage?: (m: Message) => void;
  onSubscribed?: (ctx: SubscribedContext) => void;
  onUnsubscribed?: (ctx: UnsubscribedContext) => void;
  onError?: (e: WsrelayError) => void;
  /** Resume from a position the app kept (e.g. across page loads): sent as `since` on the first subscribe. */
  since?: Position;
  /**
   * A subscription token to start with (a binding with `authorize.token`, docs/protocol.md
   * section 3). Used while it is valid; without `getToken` (here or the client's
   * `getSubscriptionToken`) it is never renewed and the subscription ends when it expires.
   */
  token?: string;
  /**
   * Returns a subscription token for this channel (null: none needed); overrides the client's
   * `getSubscriptionToken` for this subscription. Called as that one is.
   */
  getToken?: (channel: string) => Promise<string | null | undefined>;
  /**
   * Ask for the channel's presence (its binding must have a `presence` section, else the
   * subscribe is refused with 400): the members, kept up to date (`presence()`, events `join`,
   * `leave`, `occupancy`, `presence`). Default false.
   */
  presence?: boolean;
  /** Members per `presence` request when the list is paged (1 to 1000; default: the relay's, 100). */
  presencePageSize?: number;
}

/** What the client needs from a subscription's owner (internal). */
export interface SubscriptionOwner {
  _unsubscribe(sub: Subscription): void;
  _fetchPresence(sub: Subscription): Promise<ReadonlyMap<string, PresenceMember>>;
}

interface PresenceWaiter {
  resolve: (m: ReadonlyMap<string, PresenceMember>) => void;
  reject: (e: WsrelayError) => void;
}

export class Subscription extends Emitter<SubscriptionEvents> {
  readonly channel: string;
  private _state: SubscriptionState = "unsubscribed";
  private readonly owner: SubscriptionOwner;
  private lastSubscribed: SubscribedContext | undefined;

  /** @internal */ readonly _position = new PositionTracker();
  /** @internal id of the subscribe request in flight */ _pendingId: number | undefined;
  /** @internal the `since` that request carried */ _sentSince: Position | undefined;
  /** @internal */ _everSubscribed = false;
  /** @internal */ _retryAttempt = 0;
  /** @internal */ _retryTimer: unknown;
  /** @internal messages dropped as duplicates (seq at or below the last delivered) */ _duplicates = 0;
  /** @internal the subscription token in use (or to use next) */ _token: string | undefined;
  /** @internal this subscription's own token function */ readonly _getToken: SubscriptionOptions["getToken"];
  /** @internal counts subscribe attempts: a token fetched for an older one is not used */ _attempt = 0;
  /** @internal consecutive token failures (fetch failed, 401) */ _tokenFailures = 0;
  /** @internal the subrefresh timer */ readonly _refresh: RefreshTimer;
  /** @internal */ readonly _presence = new PresenceTracker();
  /** @internal subscribed with `presence: true` */ readonly _presenceWanted: boolean;
  /** @internal */ readonly _presencePageSize: number | undefined;
  /** @internal `fetchPresence()` calls waiting for the next complete list */ _presenceWaiters: PresenceWaiter[] = [];
  /** @internal the backend's (a `subscribed` frame): never sent by this client, never ended by it */ _byServer = false;

  /** @internal use `client.subscribe()` */
  constructor(owner: SubscriptionOwner, channel: string, opts: SubscriptionOptions, clock: TimerClock) {
    super();
    this.owner = owner;
    this.channel = channel;
    this._token = opts.token;
    this._getToken = opts.getToken;
    this._presenceWanted = opts.presence === true;
    const size = opts.presencePageSize;
    // The relay refuses any other limit (400), which would leave the list unpageable.
    if (size !== undefined && !(Number.isInteger(size) && size >= 1 && size <= 1000))
      throw new RangeError(`presencePageSize must be an integer from 1 to 1000, not ${String(size)}`);
    this._presencePageSize = size;
    this._refresh = new RefreshTimer(clock);
    if (opts.onMessage) this.on("message", opts.onMessage);
    if (opts.onSubscribed) this.on("subscribed", opts.onSubscribed);
    if (opts.onUnsubscribed) this.on("unsubscribed", opts.onUnsubscribed);
    if (opts.onError) this.on("error", opts.onError);
    if (opts.since) {
      this._position.epoch = opts.since.epoch;
      this._position.seq = opts.since.seq;
    }
  }

  get state(): SubscriptionState {
    return this._state;
  }

  /** The last position delivered on a resumable channel (keep it to resume after a page reload). */
  get position(): Position | undefined {
    return this._position.since();
  }

  /** Messages received more than once (replay overlapping live delivery) and not delivered again. */
  get duplicatesDropped(): number {
    return this._duplicates;
  }

  /**
   * The channel's members (`presence: true`), key to member: read-only, replaced whole when
   * the list is paged again. Empty until the first `presence` event. Kept up to date by
   * `join` / `leave` while `occupancy().events` is not false; above the binding's
   * `maxMembersWithEvents` the relay sends no `join` / `leave`, and this is the list as last
   * paged: call `fetchPresence()` to page it again. While the subscription is down
   * (reconnecting) it is the list as it was; the resubscribe's snapshot replaces it.
   */
  presence(): ReadonlyMap<string, PresenceMember> {
    return this._presence.members;
  }

  /** The channel's counts: from the last snapshot or page, then from `occupancy` frames. */
  occupancy(): Occupancy | undefined {
    const o = this._presence.occupancy;
    return o ? { ...o } : undefined;
  }

  /** A complete member list was built since the last (re)subscribe (false while reconnecting or paging). */
  get presenceSynced(): boolean {
    return this._presence.synced;
  }

  /**
   * Pages the member list again from the relay (`presence` requests) and resolves with it,
   * once complete; differences from the previous list are reported as `join` / `leave`, then
   * a `presence` event. Joins a paging already under way. Works on a subscription without
   * `presence: true` too (a one-off read: no events keep it up to date). Rejects when the
   * subscription ends first, the client is stopped, or a page fails (after retries of 429,
   * 503 and timeouts).
   */
  fetchPresence(): Promise<ReadonlyMap<string, PresenceMember>> {
    return this.owner._fetchPresence(this);
  }

  /**
   * A server-side subscription: the backend subscribed this user to the channel (the client's
   * `subscribed` event). The relay sends it again after every reconnect; only the backend ends
   * it (`unsubscribe()` throws).
   */
  get byServer(): boolean {
    return this._byServer;
  }

  /**
   * Stops the subscription (sends `unsubscribe` when the relay has it). Final: subscribe again
   * for a new one. Throws for a server-side subscription (`byServer`): the backend ends it.
   */
  unsubscribe(): void {
    this.owner._unsubscribe(this);
  }

  /**
   * Resolves when the subscription is (or becomes) subscribed; rejects when it ends first, or
   * after `timeoutMs` (default: no timeout).
   */
  ready(timeoutMs?: number): Promise<SubscribedContext> {
    if (this._state === "subscribed" && this.lastSubscribed) return Promise.resolve(this.lastSubscribed);
    if (this._state === "unsubscribed")
      return Promise.reject(new WsrelayError("unsubscribed", `not subscribed to ${this.channel}`));
    return new Promise((resolve, reject) => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const done = () => {
        offOk();
        offEnd();
        if (timer !== undefined) clearTimeout(timer);
      };
      const offOk = this.on("subscribed", (ctx) => {
        done();
        resolve(ctx);
      });
      const offEnd = this.on("unsubscribed", (ctx) => {
        done();
        reject(new WsrelayError(ctx.code ?? "unsubscribed", ctx.reason, ctx.appCode));
      });
      if (timeoutMs !== undefined)
        timer = setTimeout(() => {
          done();
          reject(new WsrelayError("timeout", `${this.channel} not subscribed within ${timeoutMs} ms`));
        }, timeoutMs);
    });
  }

  /** @internal */
  _setState(state: SubscriptionState): void {
    const previous = this._state;
    if (previous === state) return;
    this._state = state;
    // A member list is built, and kept, only while subscribed: a resubscribe brings a new one.
    if (previous === "subscribed") this._presence.abandon(true);
    if (state === "unsubscribed") {
      this._presence.abandon(true);
      this._presenceSettle(new WsrelayError("unsubscribed", `not subscribed to ${this.channel}`));
    }
    this.emit("state", { state, previous });
  }

  /** @internal */
  _subscribing(reason: SubscribingContext["reason"]): void {
    if (this._state === "subscribing" && reason !== "subscribe") return;
    this._setState("subscribing");
    this.emit("subscribing", { reason });
  }

  /** @internal */
  _subscribed(ctx: SubscribedContext): void {
    this.lastSubscribed = ctx;
    this._setState("subscribed");
    this.emit("subscribed", ctx);
  }

  /** @internal */
  _ended(ctx: UnsubscribedContext): void {
    this._setState("unsubscribed");
    this.emit("unsubscribed", ctx);
  }

  /** @internal resolves (no error) or rejects the `fetchPresence()` calls waiting */
  _presenceSettle(err?: WsrelayError): void {
    const waiters = this._presenceWaiters;
    this._presenceWaiters = [];
    for (const w of waiters) {
      if (err) w.reject(err);
      else w.resolve(this._presence.members);
    }
  }

  /** @internal */
  _emit<K extends keyof SubscriptionEvents>(name: K, e: SubscriptionEvents[K]): void {
    this.emit(name, e);
  }
}

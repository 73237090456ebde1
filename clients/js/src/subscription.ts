/** A subscription to one channel, owned by a `Client`. */
import { Emitter } from "./emitter.js";
import { WsrelayError } from "./errors.js";
import { PositionTracker, type Position } from "./position.js";
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
}

/** What the client needs from a subscription's owner (internal). */
export interface SubscriptionOwner {
  _unsubscribe(sub: Subscription): void;
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

  /** @internal use `client.subscribe()` */
  constructor(owner: SubscriptionOwner, channel: string, opts: SubscriptionOptions, clock: TimerClock) {
    super();
    this.owner = owner;
    this.channel = channel;
    this._token = opts.token;
    this._getToken = opts.getToken;
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

  /** Stops the subscription (sends `unsubscribe` when the relay has it). Final: subscribe again for a new one. */
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

  /** @internal */
  _emit<K extends keyof SubscriptionEvents>(name: K, e: SubscriptionEvents[K]): void {
    this.emit(name, e);
  }
}

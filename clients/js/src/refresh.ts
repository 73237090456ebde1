/**
 * In-band token refresh, one code path for the connection's token (`refresh`) and each
 * subscription token (`subrefresh`): when to refresh (a timer before `exp`), and one refresh
 * (ask the app for a token, check it is new, send it). What a failure means differs
 * (a refused connection token reconnects; a refused subscription token lets the subscription
 * run until it expires and then subscribes anew), so the caller reacts to the result.
 */
import { WsrelayError } from "./errors.js";
import { jwtExpiryMs, refreshDelayMs } from "./token.js";

/** The timer part of `Clock` (client.ts), kept here to avoid an import cycle. */
export interface TimerClock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

/** One timer that fires some time before a token expires. */
export class RefreshTimer {
  private handle: unknown;

  constructor(private readonly clock: TimerClock) {}

  /** Runs `fn` before `token` expires (`refreshDelayMs`); nothing for a token without `exp`. Replaces any earlier schedule. */
  before(token: string, fn: () => void): void {
    this.after(refreshDelayMs(jwtExpiryMs(token), this.clock.now()), fn);
  }

  /** Runs `fn` after `delayMs` (undefined: cancel only). Replaces any earlier schedule. */
  after(delayMs: number | undefined, fn: () => void): void {
    this.cancel();
    if (delayMs === undefined) return;
    this.handle = this.clock.setTimeout(() => {
      this.handle = undefined;
      fn();
    }, delayMs);
  }

  cancel(): void {
    if (this.handle !== undefined) {
      this.clock.clearTimeout(this.handle);
      this.handle = undefined;
    }
  }
}

export interface RefreshStep {
  /** What is refreshed, for messages: "getToken", "getSubscriptionToken(orders.42)". */
  source: string;
  /** The token in use now. */
  current: string | null | undefined;
  /**
   * Send only a token that expires later than `current` (the scheduled refresh: a token that
   * does not would be refreshed again at once). False (the app asked, e.g. for new claims):
   * any token other than `current`.
   */
  requireLater: boolean;
  /** Asks the app for a new token. */
  fetch(): Promise<string | null | undefined>;
  /** Sends the new token; resolves with the relay's `ok`, rejects with its error. */
  send(token: string): Promise<unknown>;
  /** False once the connection or subscription the refresh was started for is gone. */
  live(): boolean;
  now(): number;
}

export type RefreshResult =
  /** The relay took the new token. */
  | { kind: "ok"; token: string; expiresAt: number | undefined }
  /** The app's function threw; `retryInMs`: try again then (there is time left before `exp`). */
  | { kind: "fetch_failed"; error: WsrelayError; retryInMs: number | undefined }
  /** The app gave no token that expires later than the current one (or none other than it): nothing was sent. */
  | { kind: "stale"; error: WsrelayError }
  /** The relay refused the new token (its `error`), or the request failed (timeout, disconnected). */
  | { kind: "refused"; error: WsrelayError; token: string }
  /** The connection or subscription went away meanwhile; `token`: what the app returned. */
  | { kind: "gone"; token: string | undefined };

/** One in-band refresh: fetch, check, send. */
export async function refreshOnce(step: RefreshStep): Promise<RefreshResult> {
  const current = step.current;
  const oldExp = current ? jwtExpiryMs(current) : undefined;
  let next: string | null | undefined;
  try {
    next = await step.fetch();
  } catch (e) {
    // Try again while there is time; the relay's expiry (1008, or `unsubscribed` expired)
    // is the backstop.
    const left = oldExp !== undefined ? oldExp - step.now() : 0;
    return {
      kind: "fetch_failed",
      error: new WsrelayError("token", `${step.source} failed: ${String(e)}`),
      retryInMs: left > 2_000 ? Math.min(5_000, Math.floor(left / 2)) : undefined,
    };
  }
  if (!step.live()) return { kind: "gone", token: next ?? undefined };
  const newExp = next ? jwtExpiryMs(next) : undefined;
  if (!next || next === current)
    return { kind: "stale", error: new WsrelayError("token", `${step.source} returned no new token`) };
  if (step.requireLater && oldExp !== undefined && (newExp === undefined || newExp <= oldExp))
    return {
      kind: "stale",
      error: new WsrelayError("token", `${step.source} returned no token that expires later than the current one`),
    };
  try {
    await step.send(next);
  } catch (e) {
    return { kind: "refused", error: e instanceof WsrelayError ? e : new WsrelayError("token", String(e)), token: next };
  }
  if (!step.live()) return { kind: "gone", token: next };
  return { kind: "ok", token: next, expiresAt: newExp };
}

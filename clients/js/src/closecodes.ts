/**
 * What the client does when a connection closes, by close code. One table, used by the client
 * and documented in docs/client.md ("Close codes").
 */

/** Close codes the SDK uses itself when it closes a connection (a relay never sends them). */
export const LocalClose = {
  /** No frame from the relay within `pingIntervalMs + pongTimeoutMs`: the link is dead. */
  DeadLink: 4901,
  /** No `welcome` within `connectTimeoutMs` of starting the connection. */
  ConnectTimeout: 4902,
  /** The in-band token refresh failed: reconnecting with a fresh token. */
  TokenRefresh: 4903,
} as const;

export interface ClosePolicy {
  /** Reconnect by itself (false: stop until the app calls `connect()` again). */
  reconnect: boolean;
  /** Call `getToken()` before the next connection, whatever the cached token says. */
  newToken: boolean;
  /** Start the backoff at least at this attempt (a larger first delay). */
  minAttempt: number;
  /** Counts toward `maxAuthFailures` (consecutive refusals of the token). */
  authFailure: boolean;
  /** Reconnect at once, without a backoff delay (the close was the client's own, deliberate). */
  immediate: boolean;
  /**
   * Wait this long before the jittered backoff delay (added to it, so a crowd stays spread):
   * the relay's `Retry-After`, which a browser cannot read from a refused upgrade.
   */
  retryAfterMs: number;
}

const retry: ClosePolicy = {
  reconnect: true,
  newToken: false,
  minAttempt: 0,
  authFailure: false,
  immediate: false,
  retryAfterMs: 0,
};

export function closePolicy(code: number): ClosePolicy {
  switch (code) {
    case 1008: // the token expired (relay) or was refused (policy): fetch a new one
      return { ...retry, newToken: true };
    case 4100: // disconnected by the backend (control service): back with a fresh token
      return { ...retry, newToken: true };
    case 4101: // disconnected by the backend, for good: never back by itself
      return { ...retry, reconnect: false };
    case 4409: // the backend revoked the token: never back by itself (the app signs in again)
      return { ...retry, reconnect: false, newToken: true };
    case 4029: // publish flood: back off harder (first delay 0.5-8 s instead of 0.5-1 s)
      return { ...retry, minAttempt: 3 };
    case 4401: // handshake refused: token missing or invalid
      return { ...retry, newToken: true, authFailure: true };
    case 4403: // handshake refused: forbidden (origin, identity); retrying cannot help
      return { ...retry, reconnect: false };
    case 4429: // handshake refused: too many connections from this address or token subject
      return { ...retry, minAttempt: 3 };
    case 4503:
      // Handshake refused: too many new connections per second (storm control), relay at
      // capacity, draining, or without its keys or its authorization backend. Every such 503
      // carries `Retry-After` of at least 1 s: never back before it. The reason text does not
      // change the delay (texts are for people; the backoff grows with each refusal in a row).
      return { ...retry, retryAfterMs: 1000 };
    case LocalClose.TokenRefresh:
      return { ...retry, immediate: true };
    default:
      // 1000, 1001, 1006 (network, or a handshake refused with an HTTP status, which browsers
      // do not show), 1009, 1011, 1012 (drain), 1013, 4000 (idle), 4008 (slow consumer),
      // 4901, 4902, and anything unknown.
      return retry;
  }
}

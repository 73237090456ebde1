/**
 * Errors the SDK reports. `code` is the relay's numeric code when the relay answered
 * (400, 403, 404, 409, 422, 429, 430, 503, 401 for a refused token refresh), a close code
 * for errors about a closed connection, or one of the SDK's own string codes:
 *
 * | code | when |
 * |---|---|
 * | `"timeout"` | no reply within `requestTimeoutMs` |
 * | `"disconnected"` | the connection closed before the reply came: the outcome is unknown (a publish may have reached NATS) |
 * | `"not_connected"` | the client is stopped (`disconnect()`, never connected, or a terminal close) |
 * | `"queue_full"` | `maxQueuedRequests` requests are already waiting for a connection, or (SSE) for their POST |
 * | `"too_big"` | the frame is larger than the relay's `maxMessageBytes` (from `welcome`): not sent |
 * | `"token"` | `getToken()` (or a subscription token function) failed or gave no usable token |
 * | `"unsubscribed"` | the subscription ended before it was subscribed |
 */
export type ErrorCode =
  | number
  | "timeout"
  | "disconnected"
  | "not_connected"
  | "queue_full"
  | "too_big"
  | "token"
  | "unsubscribed";

export class WsrelayError extends Error {
  readonly code: ErrorCode;
  readonly reason: string;
  /**
   * The application's own code (4000-4999) when the relay's authorization backend denied the
   * request with one (docs/protocol.md section 3, `appCode`); the `code` is then 403.
   */
  readonly appCode?: number;

  constructor(code: ErrorCode, reason: string, appCode?: number) {
    super(`${String(code)}: ${reason}`);
    this.name = "WsrelayError";
    this.code = code;
    this.reason = reason;
    if (appCode !== undefined) this.appCode = appCode;
  }
}

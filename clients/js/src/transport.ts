/**
 * Transports carry the protocol's text frames. The client talks to a transport only through
 * this interface, so a Server-Sent-Events + HTTP POST transport (relay to client over an
 * EventSource, client to relay over fetch POSTs, same frames, same token) can be added next to
 * the WebSocket one without touching the connection logic.
 */
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
}

export interface Transport {
  /** Sends one text frame. */
  send(text: string): void;
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

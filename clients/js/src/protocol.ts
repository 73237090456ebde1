/** Frames of the wsrelay client protocol v1 (docs/protocol.md), with the additive extensions. */

export const PROTOCOL = "wsrelay.v1";

export type RequestId = number | string;

export interface WelcomeFrame {
  type: "welcome";
  protocol: string;
  maxMessageBytes: number;
  anonymous: boolean;
  /** What the connect step's backend (`auth.connectRequest`) replied, when it sent any. */
  data?: unknown;
}

export interface OkFrame {
  type: "ok";
  id: RequestId | null;
  /** subscribe on a resumable channel: the stream's epoch. */
  epoch?: string;
  /** subscribe: the channel's current position; publish on a resumable channel: the stored position. */
  seq?: number;
  /** subscribe with `since`: whether the gap was replayed. */
  recovered?: boolean;
  /** subscribe on a binding with `authorize.request`: what the backend replied, when it sent any. */
  data?: unknown;
}

export interface ErrorFrame {
  type: "error";
  id: RequestId | null;
  code: number;
  reason: string;
  /** The `code` (4000-4999) of an authorization backend's deny. */
  appCode?: number;
}

export interface PongFrame {
  type: "pong";
  id?: RequestId | null;
}

export interface MessageFrame {
  type: "message";
  channel: string;
  payload?: unknown;
  text?: string;
  base64?: string;
  seq?: number;
  prev?: number;
}

export interface DroppedFrame {
  type: "dropped";
  count: number;
  channel?: string;
}

export interface UnsubscribedFrame {
  type: "unsubscribed";
  channel: string;
  reason: string;
}

export interface DrainFrame {
  type: "drain";
  reconnectAfterMs: number;
}

export type ServerFrame =
  | WelcomeFrame
  | OkFrame
  | ErrorFrame
  | PongFrame
  | MessageFrame
  | DroppedFrame
  | UnsubscribedFrame
  | DrainFrame;

/** Parses one text frame; undefined for anything that is not a JSON object with a string `type`. */
export function parseFrame(text: string): ServerFrame | undefined {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    return undefined;
  }
  if (v === null || typeof v !== "object" || Array.isArray(v)) return undefined;
  const t = (v as { type?: unknown }).type;
  return typeof t === "string" ? (v as ServerFrame) : undefined;
}

/** Decodes standard base64 into bytes. */
export function decodeBase64(s: string): Uint8Array {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** Frames of the wsrelay client protocol v1 (docs/protocol.md), with the additive extensions. */

export const PROTOCOL = "wsrelay.v1";

export type RequestId = number | string;

export interface WelcomeFrame {
  type: "welcome";
  protocol: string;
  maxMessageBytes: number;
  anonymous: boolean;
  /** This connection's id across the fleet (`<relay>/<n>`); absent from relays before it. */
  connection?: string;
  /** Whether the connection named by `?resume=` was resumed (only when one was named). */
  resumed?: boolean;
  /** What the connect step's backend (`auth.connectRequest`) replied, when it sent any. */
  data?: unknown;
  /** The user's server-side subscriptions, each confirmed next by a `subscribed` frame (absent: none). */
  serverChannels?: string[];
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
  /** subscribe with `presence: true`, and a `presence` request: a page of the channel's members. */
  presence?: PresencePage;
}

/** One member of a channel's presence (docs/protocol.md section 10), as a page lists it. */
export interface PresenceMemberEntry {
  key: string;
  info: Record<string, unknown>;
  /** Its connections when the page was read (0 while it is in its leave grace). */
  clients: number;
}

/** The `presence` of an `ok`: a page of members in byte order of `key`, and the channel's counts. */
export interface PresencePage {
  members: PresenceMemberEntry[];
  /** Connections subscribed to the channel, on every relay. */
  clients: number;
  /** Members (distinct keys), those in their leave grace included. */
  users: number;
  /** Whether this page holds every member after the page's start; if not, `next` is where to go on. */
  complete: boolean;
  next?: string;
  /** Whether `join`/`leave` are being sent for the channel now. */
  events?: boolean;
}

/** `join` / `leave`: a member of a channel subscribed with `presence: true`. */
export interface PresenceEventFrame {
  type: "join" | "leave";
  channel: string;
  member: { key: string; info: Record<string, unknown> };
}

/** `occupancy`: a channel's counts changed (at most one a second); `events: false` while no join/leave is sent. */
export interface OccupancyFrame {
  type: "occupancy";
  channel: string;
  clients: number;
  users: number;
  events: boolean;
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

/** The backend subscribed this connection to a channel (a server-side subscription). */
export interface SubscribedFrame {
  type: "subscribed";
  channel: string;
  byServer: boolean;
  /** A resumable channel: its stream's epoch and current position. */
  epoch?: string;
  seq?: number;
}

export interface DrainFrame {
  type: "drain";
  reconnectAfterMs: number;
  /** "shutdown" (the relay stops) or "rebalance" (it holds more than its share); absent from relays before 2026-12. */
  reason?: string;
}

export type ServerFrame =
  | WelcomeFrame
  | OkFrame
  | ErrorFrame
  | PongFrame
  | MessageFrame
  | DroppedFrame
  | UnsubscribedFrame
  | SubscribedFrame
  | DrainFrame
  | PresenceEventFrame
  | OccupancyFrame;

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

/**
 * Per-subscription presence (docs/protocol.md section 10): the member list the app sees, and
 * the one being built from a subscribe's snapshot and the pages after it. Pure logic: the
 * client sends the requests and emits the events this decides.
 */
import type { OccupancyFrame, PresencePage } from "./protocol.js";

/** A member of a channel: one `key` (a user, whatever number of tabs), what the binding shows of it. */
export interface PresenceMember {
  readonly key: string;
  /** The claims the binding's `presence.info` names (`{ name: "Alice" }`); `{}` when none. */
  readonly info: Readonly<Record<string, unknown>>;
  /**
   * Its connections when the list was last paged (0 while it is in its leave grace). Events do
   * not carry counts: a member added by a `join` counts 1 until the list is paged again.
   */
  readonly clients: number;
}

/** A channel's counts. */
export interface Occupancy {
  /** Connections subscribed to the channel, on every relay. */
  clients: number;
  /** Members (distinct keys), those in their leave grace included. */
  users: number;
  /**
   * Whether the relay sends `join` / `leave` for the channel (false above the binding's
   * `maxMembersWithEvents`: the member list is then not kept up to date). `undefined` until an
   * `occupancy` frame said it: a snapshot does not carry it.
   */
  events: boolean | undefined;
}

/** What a completed list changed, relative to the list the app saw before it. */
export interface PresenceDiff {
  joined: PresenceMember[];
  left: PresenceMember[];
  /** The subscription's first complete list: no join per member is reported for it. */
  initial: boolean;
}

/**
 * Orders keys as the relay does: by the bytes of their UTF-8 encoding, which is code point
 * order. JavaScript's `<` compares UTF-16 code units, which puts astral characters (surrogate
 * pairs) below U+E000-U+FFFF; this does not.
 */
export function compareKeys(a: string, b: string): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) {
    const x = a.charCodeAt(i);
    const y = b.charCodeAt(i);
    if (x === y) continue;
    const sx = x >= 0xd800 && x <= 0xdfff;
    const sy = y >= 0xd800 && y <= 0xdfff;
    if (sx !== sy) return sx ? 1 : -1;
    return x - y;
  }
  return a.length - b.length;
}

function member(key: string, info: unknown, clients: number): PresenceMember {
  const i = info !== null && typeof info === "object" && !Array.isArray(info) ? (info as Record<string, unknown>) : {};
  return Object.freeze({ key, info: Object.freeze({ ...i }), clients });
}

/**
 * The member list the app gets: a `Map` whose `set`, `delete` and `clear` throw, so an app
 * cannot change by mistake what the SDK keeps. The tracker changes it through `Map.prototype`.
 */
class MemberMap extends Map<string, PresenceMember> {
  override set(_key: string, _value: PresenceMember): this {
    throw new TypeError("the presence member list is read-only");
  }
  override delete(_key: string): boolean {
    throw new TypeError("the presence member list is read-only");
  }
  override clear(): void {
    throw new TypeError("the presence member list is read-only");
  }
}
const put = (m: MemberMap, v: PresenceMember): void => void Map.prototype.set.call(m, v.key, v);
const remove = (m: MemberMap, key: string): boolean => Map.prototype.delete.call(m, key);

/** A page or frame that does not say what the protocol says it says. */
export class PresenceProtocolError extends Error {}

export class PresenceTracker {
  /** The list the app sees; replaced whole when a build completes, changed by live events. */
  members: ReadonlyMap<string, PresenceMember> = new MemberMap();
  occupancy: Occupancy | undefined;
  /** A complete list was built since the subscription's last (re)subscribe. */
  synced = false;
  private everSynced = false;
  /** The list being built (a snapshot and its pages), while one is. */
  private build: MemberMap | undefined;
  /** Keys a `join` added to the build: a later page covering them is their truth. */
  private joinedDuringBuild = new Set<string>();
  private gen = 0;

  /** Starts a new build (dropping one under way); returns its generation. */
  begin(): number {
    this.build = new MemberMap();
    this.joinedDuringBuild.clear();
    return ++this.gen;
  }

  /** Whether a build is under way (the one of generation `gen`, when given). */
  building(gen?: number): boolean {
    return this.build !== undefined && (gen === undefined || gen === this.gen);
  }

  /** Drops a build under way. `interrupted`: the subscription is down, the list is no longer kept. */
  abandon(interrupted: boolean): void {
    this.build = undefined;
    this.joinedDuringBuild.clear();
    this.gen++;
    if (interrupted) this.synced = false;
  }

  /**
   * Applies a page of members read after `after` (exclusive; undefined: from the first key).
   * The page is the truth, as of its arrival, for the keys from `after` to its `next` (to the
   * end when complete): events before it are folded in, so a key it lacks is gone. Returns the
   * key to page on from, or undefined when the list is complete.
   */
  page(after: string | undefined, p: PresencePage): string | undefined {
    const b = this.build;
    if (!b) return undefined;
    if (p === null || typeof p !== "object" || !Array.isArray(p.members))
      throw new PresenceProtocolError("a presence page without members");
    const complete = p.complete === true;
    const next = complete ? undefined : p.next;
    if (!complete && (typeof next !== "string" || (after !== undefined && compareKeys(next, after) <= 0)))
      throw new PresenceProtocolError(`an incomplete presence page whose next (${String(next)}) does not advance past ${String(after)}`);
    const inRange = (k: string) =>
      (after === undefined || compareKeys(k, after) > 0) && (next === undefined || compareKeys(k, next) <= 0);
    for (const k of this.joinedDuringBuild) {
      if (inRange(k)) {
        remove(b, k);
        this.joinedDuringBuild.delete(k);
      }
    }
    for (const m of p.members) {
      if (m === null || typeof m !== "object" || typeof m.key !== "string") continue;
      put(b, member(m.key, m.info, typeof m.clients === "number" ? m.clients : 0));
    }
    if (typeof p.clients === "number" && typeof p.users === "number")
      this.occupancy = {
        clients: p.clients,
        users: p.users,
        events: typeof p.events === "boolean" ? p.events : this.occupancy?.events,
      };
    return next;
  }

  /** Replaces the list with the completed build; returns what changed for the app. */
  finish(): PresenceDiff {
    const b = this.build ?? new MemberMap();
    const old = this.members;
    this.members = b;
    this.build = undefined;
    this.joinedDuringBuild.clear();
    this.gen++;
    this.synced = true;
    const initial = !this.everSynced;
    this.everSynced = true;
    if (initial) return { joined: [], left: [], initial };
    const joined = [...b.values()].filter((m) => !old.has(m.key));
    const left = [...old.values()].filter((m) => !b.has(m.key));
    return { joined, left, initial };
  }

  /**
   * A `join`: folded into a build under way (reported by its diff), else added to the list.
   * Returns the member to report, or undefined (folded, or already a member: no second join).
   */
  join(key: string, info: unknown): PresenceMember | undefined {
    const m = member(key, info, 1);
    if (this.build) {
      if (!this.build.has(key)) {
        put(this.build, m);
        this.joinedDuringBuild.add(key);
      }
      return undefined;
    }
    if (this.members.has(key)) return undefined;
    put(this.members as MemberMap, m);
    return m;
  }

  /** A `leave`: as `join`. Returns the member to report, or undefined (folded, or not a member). */
  leave(key: string, info: unknown): PresenceMember | undefined {
    if (this.build) {
      remove(this.build, key);
      this.joinedDuringBuild.delete(key);
      return undefined;
    }
    const had = this.members.get(key);
    if (!had) return undefined;
    remove(this.members as MemberMap, key);
    return info !== undefined ? member(key, info, 0) : member(key, had.info, 0);
  }

  /**
   * An `occupancy` frame. Returns the new counts and whether events have just resumed (they
   * were off: the list missed the changes made meanwhile and must be paged again).
   */
  occupancyFrame(f: OccupancyFrame): { occupancy: Occupancy; resumed: boolean } {
    const before = this.occupancy?.events;
    const events = typeof f.events === "boolean" ? f.events : before;
    this.occupancy = { clients: f.clients, users: f.users, events };
    return { occupancy: { ...this.occupancy }, resumed: before === false && events === true };
  }
}

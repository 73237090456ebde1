/**
 * Per-subscription position on a resumable channel: the epoch of the channel's stream and the
 * sequence of the last message delivered to the app. It decides, for each `message` frame
 * that carries `seq` / `prev`, whether to deliver it, drop it as a duplicate, or report a gap.
 */

export interface Position {
  epoch: string;
  seq: number;
}

/** What to do with a message frame. */
export type Verdict = "deliver" | "duplicate" | "gap";

export class PositionTracker {
  /** The epoch of the channel's stream, once a subscribe `ok` has told it. */
  epoch: string | undefined;
  /** The sequence of the last message delivered (or the position the relay said we are at). */
  seq: number | undefined;

  /**
   * Judges a message: without `seq` it is always delivered (plain channel). With `seq`: a
   * sequence at or below the last delivered one is a duplicate (replay overlapping live
   * delivery) and never delivered twice; a `prev` above the last delivered sequence means a
   * message on this channel was skipped (a gap). Delivering advances the position.
   */
  judge(seq: number | undefined, prev: number | undefined): Verdict {
    if (seq === undefined) return "deliver";
    if (this.seq !== undefined) {
      if (seq <= this.seq) return "duplicate";
      if (prev !== undefined && prev > this.seq) return "gap";
    }
    return "deliver";
  }

  /** Records a delivered message's sequence. */
  delivered(seq: number | undefined): void {
    if (seq !== undefined && (this.seq === undefined || seq > this.seq)) this.seq = seq;
  }

  /** The `since` to send on a resubscribe, when both epoch and sequence are known. */
  since(): Position | undefined {
    return this.epoch !== undefined && this.seq !== undefined
      ? { epoch: this.epoch, seq: this.seq }
      : undefined;
  }

  /**
   * Applies a subscribe `ok`. `sentSince` is the position the subscribe carried (if any).
   * Returns whether the relay recovered the gap (false when nothing was asked).
   */
  subscribed(
    ok: { epoch?: string; seq?: number; recovered?: boolean },
    sentSince: Position | undefined,
  ): boolean {
    if (ok.epoch === undefined) {
      // A plain channel (or a relay without history): no position to keep.
      this.epoch = undefined;
      this.seq = undefined;
      return false;
    }
    const recovered = sentSince !== undefined && ok.recovered === true && ok.epoch === sentSince.epoch;
    if (recovered) {
      // Replayed messages (before or after this ok) continue from where we were; keep the
      // furthest position delivered.
      this.epoch = ok.epoch;
      return true;
    }
    // A new subscription, a new epoch, or a position the relay no longer has: start from the
    // relay's current position. Anything at or below it is history the app must refetch.
    const sameEpoch = this.epoch === ok.epoch;
    this.epoch = ok.epoch;
    if (ok.seq !== undefined) {
      this.seq = sameEpoch && this.seq !== undefined && sentSince === undefined
        ? Math.max(this.seq, ok.seq)
        : ok.seq;
    } else if (!sameEpoch) {
      this.seq = undefined;
    }
    return false;
  }

  /** Forgets the position (the relay refused the `since`, or the app asked). */
  reset(): void {
    this.epoch = undefined;
    this.seq = undefined;
  }
}

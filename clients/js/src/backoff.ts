/**
 * Reconnect delays: exponential backoff with full jitter and a floor.
 *
 * Attempt `n` (0-based, counted since the backoff was last reset) waits a delay drawn
 * uniformly from `[min, min(max, min * 2^(n+1))]`. With the defaults (0.5 s, 20 s) that is
 * 0.5-1 s, 0.5-2 s, 0.5-4 s, 0.5-8 s, 0.5-16 s, then 0.5-20 s for every later attempt.
 * The floor keeps a client from hammering a relay that refuses it at once; the jitter over
 * the whole window spreads a crowd of clients that lost the same relay at the same moment.
 */
export function backoffDelay(
  attempt: number,
  minMs: number,
  maxMs: number,
  random: () => number = Math.random,
): number {
  const lo = Math.max(0, minMs);
  const hi = Math.max(lo, maxMs);
  // 2^31 is already far above any sane max; keep the exponent bounded.
  const exp = Math.min(Math.max(0, Math.floor(attempt)) + 1, 31);
  const cap = Math.min(hi, lo * 2 ** exp);
  const r = Math.min(Math.max(random(), 0), 1);
  return Math.round(lo + r * (cap - lo));
}

/** The upper bound of the window `backoffDelay` draws from for `attempt`. */
export function backoffCap(attempt: number, minMs: number, maxMs: number): number {
  return backoffDelay(attempt, minMs, maxMs, () => 1);
}

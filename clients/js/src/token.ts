/**
 * JWT helpers. The SDK never verifies a token (it has no key and needs none): it only reads
 * `exp` from the payload to know when to fetch a new one.
 */

function base64UrlDecode(s: string): string {
  let b64 = s.replace(/-/g, "+").replace(/_/g, "/");
  while (b64.length % 4 !== 0) b64 += "=";
  const bin = atob(b64);
  // The payload is UTF-8 JSON: decode the bytes, not the Latin-1 string atob gives.
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new TextDecoder().decode(bytes);
}

/** The token's payload (claims), or undefined when it is not a readable JWT. */
export function jwtClaims(token: string): Record<string, unknown> | undefined {
  const parts = token.split(".");
  if (parts.length !== 3 || parts[1] === undefined) return undefined;
  try {
    const v: unknown = JSON.parse(base64UrlDecode(parts[1]));
    return v !== null && typeof v === "object" && !Array.isArray(v)
      ? (v as Record<string, unknown>)
      : undefined;
  } catch {
    return undefined;
  }
}

/** `exp` of a JWT in milliseconds since the epoch, or undefined (no `exp`, not a JWT). */
export function jwtExpiryMs(token: string): number | undefined {
  const exp = jwtClaims(token)?.["exp"];
  return typeof exp === "number" && Number.isFinite(exp) ? exp * 1000 : undefined;
}

/**
 * True when the token should not be used for a new connection: it expires within
 * `minValidityMs`. A token whose expiry cannot be read is used as it is (the relay decides).
 */
export function tokenExpired(token: string, nowMs: number, minValidityMs: number): boolean {
  const exp = jwtExpiryMs(token);
  return exp !== undefined && exp - nowMs < minValidityMs;
}

/**
 * When to refresh a token in band, as a delay from now: at 80% of its remaining lifetime,
 * but at least `marginMs` (default 5 s) before it expires; 0 when that moment has passed.
 * Returns undefined when the expiry is unknown (no refresh scheduled).
 */
export function refreshDelayMs(
  expMs: number | undefined,
  nowMs: number,
  marginMs = 5000,
): number | undefined {
  if (expMs === undefined) return undefined;
  const remaining = expMs - nowMs;
  if (remaining <= 0) return 0;
  return Math.max(0, Math.floor(Math.min(remaining * 0.8, remaining - marginMs)));
}

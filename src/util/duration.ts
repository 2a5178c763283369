// Durations on the command line: "90s", "30m", "24h", "7d", "500ms", or plain seconds.

import { UsageError } from "../errors.js";

const UNITS: Record<string, number> = { ms: 1, s: 1000, "": 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** Parse a duration into milliseconds; throws UsageError naming `what`. */
export function parseDuration(text: string, what: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|)\s*$/.exec(text);
  if (!m) throw new UsageError(`${what} "${text}" is not a duration (examples: 90s, 30m, 24h, 7d)`);
  const ms = Number(m[1]) * UNITS[m[2]];
  if (!Number.isFinite(ms) || ms <= 0) throw new UsageError(`${what} must be positive`);
  return Math.round(ms);
}

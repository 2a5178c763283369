// One monotonic clock for every timestamp of the journal: milliseconds since the epoch with
// microsecond resolution (performance.timeOrigin + performance.now(), which does not jump with
// the wall clock), never repeating and never going backwards, also across restarts (seeded with
// the last timestamp found in the journal).

import { performance } from "node:perf_hooks";

let last = 0;

/** The next timestamp: strictly greater than every earlier one. */
export function journalNow(): number {
  const t = performance.timeOrigin + performance.now();
  last = t > last ? t : last + 0.001;
  return last;
}

/** Never hand out a timestamp at or below `ts` (the newest one already in the journal). */
export function seedJournalClock(ts: number): void {
  if (ts > last) last = ts;
}

// The journal's clock: every timestamp of the journal (before-images, bookmarks, the window) comes
// from here. A timestamp is the wall clock in milliseconds since the epoch, with microsecond
// resolution, because that is what `snap@<ISO-8601 time>` names; and it is strictly increasing,
// within a process and across restarts (seeded with the newest timestamp found in the journal), so
// that entries of all sessions order correctly.
//
// Notes on the design
// - Resolution: Date.now() has whole milliseconds, so the fraction comes from the monotonic clock:
//   t = anchor + performance.now(), the anchor mapping the monotonic clock onto the wall clock.
//   Both run at the same rate (NTP slews both), so the mapping holds until the wall clock is
//   *stepped*.
// - Following the wall clock: a step (settimeofday, an NTP step such as chrony's makestep at boot,
//   a host resumed after a suspend) moves the wall clock and not the monotonic one. Each reading
//   checks the mapped time against Date.now() and re-anchors when they differ by more than
//   STEP_MS. (Until 24 Nov the journal used the monotonic clock alone from process start: a proxy
//   started before the clock was set stamped the wrong time for the rest of its life, and snap@T
//   showed the volume at another time than T, or was refused as in the future.)
// - Never backwards: after a backward step the timestamps hold just above the time the wall clock
//   had reached (or the newest timestamp, if later), 1 µs apart, until the wall clock passes it. The journal keeps one timeline, and the writes
//   made while the clock catches up fall into the merge window being held. The wall times between
//   the new time and the old one pass twice, so snap@ one of them could mean either: the journal
//   records those ranges and refuses them (Journal.clockStepped).
// - Every step (more than STEP_MS) is reported to listeners, outside the caller's stack: the
//   journal records every step back (a merge window may be as short as 1 ms) and logs those of
//   REPORT_MS or more.

import { performance } from "node:perf_hooks";

/** A wall-clock step larger than this (ms) re-anchors the clock. */
export const STEP_MS = 5;
/** A wall-clock step this large (ms) or larger is logged. */
export const REPORT_MS = 1000;

/** A step of the wall clock: `by` ms (negative: backwards), seen at wall time `at`. */
export interface ClockStep {
  at: number;
  by: number;
  /** After a backward step: the timestamp the journal holds at until the wall clock reaches it. */
  holdUntil: number | null;
}

/** A journal clock over the given wall clock (ms) and monotonic clock (ms, fractional). */
export class JournalClock {
  private anchor: number;
  private last = 0;
  private readonly listeners = new Set<(s: ClockStep) => void>();

  constructor(
    private readonly wall: () => number = Date.now,
    private readonly mono: () => number = () => performance.now(),
  ) {
    this.anchor = wall() + 0.5 - mono();
  }

  /** The next timestamp: strictly greater than every earlier one. */
  now(): number {
    let m = this.mono();
    let t = this.anchor + m;
    const w = this.wall(); // the true wall time lies in [w, w + 1)
    if (t < w - STEP_MS || t > w + 1 + STEP_MS) {
      // A step, or only this thread preempted between the two readings (a loaded machine): read
      // both again, the wall clock between two monotonic readings close together, before taking
      // it for a step. A false step would re-anchor forward, then back: a range of time recorded
      // as passed twice, and snap@ in it refused.
      const again = this.paired();
      if (again !== null) {
        m = again.m;
        t = this.anchor + m;
        if (t >= again.w - STEP_MS && t <= again.w + 1 + STEP_MS) return this.stamp(t);
        return this.stepped(m, t, again.w);
      }
      return this.stepped(m, t, w);
    }
    return this.stamp(t);
  }

  /** The wall clock read between two monotonic readings less than a millisecond apart, or null. */
  private paired(): { m: number; w: number } | null {
    for (let i = 0; i < 4; i++) {
      const m0 = this.mono();
      const w = this.wall();
      const m1 = this.mono();
      if (m1 - m0 < 1) return { m: m0, w };
    }
    return null;
  }

  /** Re-anchor on the wall clock `w` (read with monotonic `m`), tell the listeners, stamp. */
  private stepped(m: number, t: number, w: number): number {
    const before = t; // the wall time just before the step
    const by = w + 0.5 - t;
    this.anchor = w + 0.5 - m;
    t = this.anchor + m;
    // Back: hold at the time the clock had reached (not at an older last stamp of an idle
    // journal), so that the journal's time stops where the wall clock left off.
    if (by < 0 && before > this.last) this.last = before;
    if (this.listeners.size > 0) {
      const step: ClockStep = { at: t, by, holdUntil: t <= this.last ? this.last : null };
      queueMicrotask(() => {
        for (const l of this.listeners) l(step);
      });
    }
    return this.stamp(t);
  }

  /** `t`, or just above the last stamp: never the same twice, never backwards. */
  private stamp(t: number): number {
    this.last = t > this.last ? t : this.last + 0.001;
    return this.last;
  }

  /** Never hand out a timestamp at or below `ts` (the newest one already in the journal). */
  seed(ts: number): void {
    if (ts > this.last) this.last = ts;
  }

  /** Hear about steps of the wall clock (more than STEP_MS). */
  onStep(l: (s: ClockStep) => void): () => void {
    this.listeners.add(l);
    return () => this.listeners.delete(l);
  }
}

const clock = new JournalClock();

/** The next timestamp of the process's journal clock. */
export function journalNow(): number {
  return clock.now();
}

/** Never hand out a timestamp at or below `ts` (the newest one already in the journal). */
export function seedJournalClock(ts: number): void {
  clock.seed(ts);
}

/** Hear about steps of the wall clock (see JournalClock.onStep). */
export function onClockStep(l: (s: ClockStep) => void): () => void {
  return clock.onStep(l);
}

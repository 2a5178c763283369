// src/pit/clock.ts driven with scripted wall and monotonic clocks: timestamps carry the wall
// clock's time with the monotonic clock's fraction, are strictly increasing, follow a forward step
// of the wall clock (which the monotonic clock does not see), hold at the time the wall clock had
// reached after a backward step (also when no timestamp was taken for a while) until it gets there
// again, and report steps of a second or more (not smaller ones) to listeners. Plus the process
// clock against Date.now().

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { JournalClock, journalNow, REPORT_MS, STEP_MS, type ClockStep } from "../../src/pit/clock.js";

/** A scripted pair of clocks: `wall` ms since the epoch (whole ms, as Date.now()), `mono` ms. */
function clocks(wall0: number) {
  const c = { wall: wall0, mono: 1000 };
  return {
    c,
    /** Both clocks advance by ms (as real time passing). */
    pass: (ms: number): void => {
      c.mono += ms;
      c.wall += ms;
    },
    clock: new JournalClock(
      () => Math.floor(c.wall),
      () => c.mono,
    ),
  };
}

const T0 = Date.UTC(2026, 10, 24, 10, 0, 0);

async function ticks(): Promise<void> {
  await new Promise((r) => setImmediate(r));
}

void describe("JournalClock", () => {
  void test("the wall clock's time, to the microsecond, strictly increasing", () => {
    const { clock, pass } = clocks(T0);
    const a = clock.now();
    assert.ok(Math.abs(a - T0) <= 1, `${a - T0}`);
    pass(0.25);
    const b = clock.now();
    assert.ok(b > a && Math.abs(b - a - 0.25) < 0.0011, `${b - a}`);
    // no time passed: still strictly later, by a microsecond
    const c = clock.now();
    assert.ok(c > b && c - b < 0.0011);
    pass(3_600_000);
    assert.ok(Math.abs(clock.now() - (T0 + 3_600_000.25)) <= 1);
  });

  void test("follows a forward step of the wall clock, and reports it", async () => {
    const { clock, c, pass } = clocks(T0);
    const steps: ClockStep[] = [];
    clock.onStep((s) => steps.push(s));
    clock.now();
    c.wall += 3_600_000; // set forward an hour; the monotonic clock does not see it
    pass(10);
    const t = clock.now();
    assert.ok(Math.abs(t - (T0 + 3_600_010)) <= 1, `off by ${t - (T0 + 3_600_010)} ms`);
    await ticks();
    assert.equal(steps.length, 1);
    assert.ok(Math.abs(steps[0].by - 3_600_000) <= 1);
    assert.equal(steps[0].holdUntil, null);
    pass(5);
    assert.ok(Math.abs(clock.now() - (T0 + 3_600_015)) <= 1);
    await ticks();
    assert.equal(steps.length, 1, "re-anchored once, not at every reading");
  });

  void test("holds after a backward step at the time the clock had reached, until it gets there again", async () => {
    const { clock, c, pass } = clocks(T0);
    const steps: ClockStep[] = [];
    clock.onStep((s) => steps.push(s));
    pass(60_000);
    const newest = clock.now();
    pass(10_000); // idle: no timestamp for 10 s
    c.wall -= 30_000; // then set back half a minute
    const reached = newest + 10_000; // where the wall clock had got to
    let prev = 0;
    for (let i = 0; i < 100; i++) {
      const t = clock.now();
      if (i === 0) assert.ok(Math.abs(t - reached) <= 1, `held at ${t - newest} ms after the newest stamp`);
      else assert.ok(t > prev && t - prev < 0.0011, "1 µs apart while held");
      prev = t;
    }
    await ticks();
    assert.equal(steps.length, 1);
    assert.ok(Math.abs(steps[0].by + 30_000) <= 1);
    assert.ok(steps[0].holdUntil !== null && Math.abs(steps[0].holdUntil - reached) <= 1);
    assert.ok(Math.abs(steps[0].at - (reached - 30_000)) <= 1, "the new wall time");
    pass(29_000);
    assert.ok(clock.now() - reached < 1, "still held 1 s before the clock catches up");
    pass(2_000);
    const t = clock.now();
    assert.ok(Math.abs(t - (reached + 1_000)) <= 1, "follows the wall clock again");
  });

  void test("small steps re-anchor and are reported (the journal records steps back); a step under STEP_MS is taken as rounding", async () => {
    const { clock, c, pass } = clocks(T0);
    const steps: ClockStep[] = [];
    clock.onStep((s) => steps.push(s));
    clock.now();
    c.wall += STEP_MS - 2;
    pass(1);
    const a = clock.now();
    assert.ok(Math.abs(a - (T0 + 1)) <= 1, "not re-anchored");
    c.wall += REPORT_MS / 2;
    pass(1);
    const b = clock.now();
    assert.ok(Math.abs(b - c.wall) <= 1, "re-anchored");
    await ticks();
    assert.equal(steps.length, 1, "a step over STEP_MS is reported, however small (a window may be 1 ms)");
    assert.ok(Math.abs(steps[0].by - REPORT_MS / 2) <= STEP_MS, `by ${steps[0].by}`); // with the rounding step before
  });

  void test("a thread preempted between its two readings is no step (nothing reported, no re-anchoring)", async () => {
    // Seen under load: the monotonic clock read, 20 ms of preemption, then the wall clock: a
    // forward "step", then a backward one at the next reading, recorded as time passed twice.
    const c = { wall: T0, mono: 1000 };
    let preempt = 0; // ms that pass right after the next monotonic reading
    const clock = new JournalClock(
      () => Math.floor(c.wall),
      () => {
        const m = c.mono;
        if (preempt > 0) {
          c.mono += preempt;
          c.wall += preempt;
          preempt = 0;
        }
        return m;
      },
    );
    const steps: ClockStep[] = [];
    clock.onStep((s) => steps.push(s));
    const a = clock.now();
    preempt = 20;
    const b = clock.now();
    const d = clock.now();
    await ticks();
    assert.deepEqual(steps, [], "no step reported");
    assert.ok(b > a && d > b);
    assert.ok(Math.abs(d - c.wall) <= 1, `${d - c.wall}`);
  });

  void test("seed: never at or below the newest timestamp of the journal", () => {
    const { clock } = clocks(T0);
    clock.seed(T0 + 10_000);
    const t = clock.now();
    assert.ok(t > T0 + 10_000 && t < T0 + 10_000 + 0.0011);
  });

  void test("the process clock is the wall clock", () => {
    for (let i = 0; i < 1000; i++) {
      const before = Date.now();
      const t = journalNow();
      const after = Date.now() + 1;
      assert.ok(t >= before - STEP_MS && t <= after + STEP_MS, `${t} not within [${before}, ${after}]`);
    }
  });
});

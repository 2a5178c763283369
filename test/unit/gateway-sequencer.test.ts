// src/gateway/sequencer.ts with scripted arrivals: in order, duplicates, out of order with
// overlapping ranges (the higher seq wins, across batches and inside one), the floor, generations,
// pruning, restart from a snapshot, and a seeded model check: random overlapping updates delivered
// in random batches, order and repetition must leave every byte to the highest seq that covers it.

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { Sequencer, type BatchPlan } from "../../src/gateway/sequencer.js";
import { FLAG_RESYNC, KIND, type UpdateRecord } from "../../src/gateway/records.js";

function w(seq: number, offset: number, length: number, period = 0): UpdateRecord {
  return { kind: KIND.WRITE, seq, period, offset, length, data: Buffer.alloc(length, seq & 0xff) };
}

function fresh(generation = 1): Sequencer {
  return new Sequencer({ generation, durableThrough: 0, floor: 0 });
}

/** Plan and commit a batch (as the gateway does after the writes succeed). */
function apply(s: Sequencer, records: UpdateRecord[]): BatchPlan {
  const plan = s.plan(records);
  s.commit(plan);
  return plan;
}

/** The written ranges of a plan as [seq, start, end] triples. */
function writes(plan: BatchPlan): [number, number, number][] {
  const out: [number, number, number][] = [];
  for (const u of plan.updates) {
    const r = u.record;
    if (u.pieces === null) out.push([r.seq, r.offset, r.offset + r.length]);
    else for (const p of u.pieces) out.push([r.seq, p.offset, p.offset + p.length]);
  }
  return out;
}

void describe("Sequencer", () => {
  void test("in order: every record whole, appliedThrough follows, nothing remembered", () => {
    const s = fresh();
    const plan = apply(s, [w(1, 0, 4096), w(2, 4096, 4096), w(3, 8192, 4096, 7)]);
    assert.equal(plan.duplicates, 0);
    assert.ok(plan.updates.every((u) => u.pieces === null));
    assert.equal(s.appliedThrough, 3);
    assert.equal(s.outOfOrder, 0);
    assert.equal(s.recentCount, 0);
    assert.equal(s.lastPeriod, 7);
    // Overlapping records in order: the later (higher) one is whole, the earlier loses the overlap.
    const p2 = apply(s, [w(4, 0, 8192), w(5, 4096, 8192)]);
    assert.deepEqual(writes(p2), [
      [4, 0, 4096],
      [5, 4096, 12288],
    ]);
    assert.equal(s.appliedThrough, 5);
  });

  void test("duplicates: resent seqs are counted, not applied", () => {
    const s = fresh();
    apply(s, [w(1, 0, 512), w(2, 0, 512)]);
    const again = apply(s, [w(1, 0, 512)]);
    assert.equal(again.updates.length, 0);
    assert.equal(again.duplicates, 1);
    const mixed = apply(s, [w(2, 0, 512), w(3, 0, 512)]);
    assert.equal(mixed.duplicates, 1);
    assert.deepEqual(writes(mixed), [[3, 0, 512]]);
    // A duplicate above a gap (already in "above") is a duplicate too.
    apply(s, [w(5, 0, 512)]);
    const dupAbove = apply(s, [w(5, 0, 512)]);
    assert.equal(dupAbove.duplicates, 1);
    assert.equal(s.appliedThrough, 3);
    assert.equal(s.outOfOrder, 1);
  });

  void test("out of order across batches: the higher seq keeps its bytes", () => {
    const s = fresh();
    apply(s, [w(3, 0, 8192)]);
    assert.equal(s.appliedThrough, 0);
    assert.equal(s.outOfOrder, 1);
    const p2 = apply(s, [w(2, 4096, 8192)]);
    assert.deepEqual(writes(p2), [[2, 8192, 12288]]);
    const p1 = apply(s, [w(1, 0, 16384)]);
    assert.deepEqual(writes(p1), [[1, 12288, 16384]]);
    assert.deepEqual(p1.updates[0].pieces, [{ offset: 12288, length: 4096, dataStart: 12288 }]);
    assert.equal(s.appliedThrough, 3);
    assert.equal(s.recentCount, 0, "everything at or below appliedThrough is forgotten");
  });

  void test("a late update fully covered by newer ones writes nothing but counts as applied", () => {
    const s = fresh();
    apply(s, [w(2, 0, 4096), w(3, 4096, 4096)]);
    const p = apply(s, [w(1, 1000, 5000)]);
    assert.equal(p.updates.length, 1);
    assert.deepEqual(p.updates[0].pieces, []);
    assert.equal(s.appliedThrough, 3);
  });

  void test("inside one batch: records in any order, each loses to the newer ones beside it", () => {
    const s = fresh();
    const p = apply(s, [w(3, 50, 100), w(1, 40, 20), w(2, 0, 100)]);
    // seq 1 [40,60) is covered by 2; seq 2 [0,100) loses [50,100) to 3; seq 3 whole.
    assert.deepEqual(
      p.updates.map((u) => u.record.seq),
      [1, 2, 3],
    );
    assert.deepEqual(writes(p), [
      [2, 0, 50],
      [3, 50, 150],
    ]);
    assert.equal(p.updates[1].pieces![0].dataStart, 0);
    assert.equal(s.appliedThrough, 3);
  });

  void test("a gap remembered across several batches, with a hole punched in the middle", () => {
    const s = fresh();
    apply(s, [w(1, 0, 100)]);
    apply(s, [w(3, 10, 10), w(5, 40, 10)]);
    apply(s, [w(6, 70, 10)]);
    assert.equal(s.recentCount, 3);
    // 2 and 4 arrive together: 2 [0,100) keeps only what 3, 4, 5 and 6 do not write; 4 [15,45)
    // loses [40,45) to 5 but not [15,20) to the older 3.
    const p = apply(s, [w(4, 15, 30), w(2, 0, 100)]);
    assert.deepEqual(writes(p), [
      [2, 0, 10],
      [2, 50, 70],
      [2, 80, 100],
      [4, 15, 40],
    ]);
    assert.equal(s.appliedThrough, 6);
    assert.equal(s.recentCount, 0);
  });

  void test("the plan does not change the state until commit (a failed batch is planned again the same)", () => {
    const s = fresh();
    apply(s, [w(2, 0, 10)]);
    const a = s.plan([w(1, 0, 20)]);
    const b = s.plan([w(1, 0, 20)]);
    assert.deepEqual(writes(a), writes(b));
    assert.equal(s.appliedThrough, 0);
    s.commit(b);
    assert.equal(s.appliedThrough, 2);
  });

  void test("floor: seqs below it count as done, late ones are duplicates", () => {
    const s = fresh();
    apply(s, [w(3, 0, 10)]);
    s.raiseFloor(3); // 1 and 2 abandoned
    assert.equal(s.appliedThrough, 3);
    assert.equal(s.recentCount, 0);
    const late = apply(s, [w(1, 0, 10), w(2, 0, 10)]);
    assert.equal(late.updates.length, 0);
    assert.equal(late.duplicates, 2);
    // A floor above a new gap: 12 applied, floor 10 -> appliedThrough 9, then 10 and 11 close it.
    apply(s, [w(12, 0, 10)]);
    s.raiseFloor(10);
    assert.equal(s.appliedThrough, 9);
    assert.equal(s.outOfOrder, 1);
    apply(s, [w(11, 5, 10)]);
    const p10 = apply(s, [w(10, 0, 20)]);
    assert.deepEqual(writes(p10), [[10, 15, 20]]);
    assert.equal(s.appliedThrough, 12);
    // A lower floor changes nothing.
    s.raiseFloor(4);
    assert.equal(s.floor, 10);
    assert.equal(s.appliedThrough, 12);
  });

  void test("floor: says whether it abandoned seqs under applied ones (a gap) or only after them", () => {
    const s = fresh();
    assert.equal(s.raiseFloor(1), "none", "nothing below 1");
    apply(s, [w(1, 0, 10), w(2, 0, 10)]);
    assert.equal(s.raiseFloor(3), "none", "1 and 2 arrived");
    assert.equal(s.raiseFloor(5), "abandoned", "3 and 4 never came, nothing after them applied");
    assert.equal(s.abandonedMax, 4);
    apply(s, [w(7, 0, 10), w(9, 0, 10)]);
    assert.equal(s.raiseFloor(9), "gap", "5, 6 and 8 abandoned under 7 and 9");
    assert.equal(s.abandonedMax, 8);
    assert.equal(s.appliedThrough, 9);
    apply(s, [{ ...w(10, 0, 10), flags: FLAG_RESYNC }, w(11, 0, 10)]);
    assert.equal(s.resyncMax, 10, "the highest RESYNC record applied");
    const again = new Sequencer({ generation: 1, durableThrough: 3, floor: 9 });
    assert.equal(again.abandonedMax, 0, "a floor from the state file abandons nothing now");
    assert.equal(s.checkGeneration(2), "reset");
    assert.deepEqual([s.abandonedMax, s.resyncMax], [0, 0]);
  });

  void test("generations: the same one from another process is reused; its snapshot keeps the process", () => {
    const s = new Sequencer({ generation: 3, durableThrough: 5, floor: 0 });
    assert.equal(s.checkGeneration(3, "aaaa"), "current", "an unknown process is adopted");
    assert.equal(s.checkGeneration(3, "aaaa"), "current");
    assert.equal(s.checkGeneration(3, null), "current", "a proxy that does not say is not checked");
    assert.equal(s.checkGeneration(3, "bbbb"), "reused");
    assert.equal(s.appliedThrough, 5, "a reused generation changes nothing");
    assert.deepEqual(s.snapshot(), { generation: 3, durableThrough: 5, floor: 0, incarnation: "aaaa" });
    assert.equal(s.checkGeneration(4, "bbbb"), "reset");
    assert.equal(s.incarnation, "bbbb");
    const again = new Sequencer(s.snapshot());
    assert.equal(again.checkGeneration(4, "cccc"), "reused", "after a restart of the gateway too");
  });

  void test("generations: a newer one resets, an older one is stale", () => {
    const s = fresh(5);
    apply(s, [w(1, 0, 10), w(2, 0, 10), w(4, 0, 10)]);
    s.raiseFloor(2);
    s.markDurable(2);
    assert.equal(s.checkGeneration(5), "current");
    assert.equal(s.checkGeneration(4), "stale");
    assert.equal(s.appliedThrough, 2, "a stale generation changes nothing");
    assert.equal(s.checkGeneration(6), "reset");
    assert.deepEqual(
      [s.generation, s.appliedThrough, s.durableThrough, s.floor, s.outOfOrder, s.recentCount],
      [6, 0, 0, 0, 0, 0],
    );
    const p = apply(s, [w(1, 0, 10)]);
    assert.equal(p.updates.length, 1, "seq 1 of the new generation is new");
    assert.equal(s.checkGeneration(5), "stale");
  });

  void test("restart from a snapshot: appliedThrough starts at durableThrough (or the floor)", () => {
    const s = new Sequencer({ generation: 3, durableThrough: 7, floor: 2 });
    assert.equal(s.appliedThrough, 7);
    assert.deepEqual(s.snapshot(), { generation: 3, durableThrough: 7, floor: 2 });
    const p = apply(s, [w(7, 0, 1), w(8, 0, 1)]);
    assert.equal(p.duplicates, 1);
    assert.equal(s.appliedThrough, 8);
    const t = new Sequencer({ generation: 3, durableThrough: 7, floor: 10 });
    assert.equal(t.appliedThrough, 9);
  });

  void test("markDurable never goes back", () => {
    const s = fresh();
    s.markDurable(5);
    s.markDurable(3);
    assert.equal(s.durableThrough, 5);
  });

  void test("pruning: remembered ranges go as appliedThrough passes them", () => {
    const s = fresh();
    for (let seq = 2; seq <= 1001; seq++) apply(s, [w(seq, (seq % 50) * 10, 10)]);
    assert.equal(s.recentCount, 1000);
    assert.equal(s.outOfOrder, 1000);
    apply(s, [w(1, 0, 500)]);
    assert.equal(s.appliedThrough, 1001);
    assert.equal(s.recentCount, 0);
    assert.equal(s.outOfOrder, 0);
  });
});

/** A small seeded PRNG (mulberry32). */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

void describe("Sequencer model check", () => {
  for (const seed of [1, 2, 3, 42, 1234]) {
    void test(`seed ${seed}: every byte ends with the highest seq that covers it`, () => {
      const r = rng(seed);
      const SPACE = 256;
      const N = 300;
      const updates: UpdateRecord[] = [];
      for (let seq = 1; seq <= N; seq++) {
        const off = Math.floor(r() * SPACE);
        const len = 1 + Math.floor(r() * Math.min(64, SPACE - off));
        updates.push(w(seq, off, len));
      }
      // Deliver in a locally shuffled order (like several connections), with repeats.
      const order: UpdateRecord[] = [];
      for (const u of updates) {
        order.push(u);
        if (r() < 0.2) order.push(updates[Math.floor(r() * updates.length)]);
      }
      for (let i = order.length - 1; i > 0; i--) {
        const j = Math.max(0, i - Math.floor(r() * 40));
        [order[i], order[j]] = [order[j], order[i]];
      }
      const s = fresh();
      const disk = new Int32Array(SPACE);
      const applied = new Set<number>();
      let at = 0;
      while (at < order.length) {
        const n = 1 + Math.floor(r() * 8);
        const batch: UpdateRecord[] = [];
        const inBatch = new Set<number>();
        while (batch.length < n && at < order.length) {
          const u = order[at++];
          if (inBatch.has(u.seq)) continue; // the parser refuses a seq twice in one batch
          inBatch.add(u.seq);
          batch.push(u);
        }
        const plan = s.plan(batch);
        for (const [seq, start, end] of writes(plan)) for (let b = start; b < end; b++) disk[b] = seq;
        s.commit(plan);
        for (const u of plan.updates) {
          assert.ok(!applied.has(u.record.seq), `seq ${u.record.seq} applied twice`);
          applied.add(u.record.seq);
        }
        for (let b = 0; b < SPACE; b++) {
          let want = 0;
          for (const seq of applied) {
            const u = updates[seq - 1];
            if (u.offset <= b && b < u.offset + u.length && seq > want) want = seq;
          }
          assert.equal(disk[b], want, `byte ${b} after batch ending at ${at}`);
        }
      }
      assert.equal(applied.size, N);
      assert.equal(s.appliedThrough, N);
      assert.equal(s.recentCount, 0);
    });
  }
});

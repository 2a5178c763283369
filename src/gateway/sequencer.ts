// The idempotency state of one source (one proxy) at the gateway: which of its updates are applied,
// and which parts of a late update must not be written because a newer update already has.
// Pure: no I/O. The gateway plans a batch, performs the writes, and commits the plan only when
// every write succeeded; batches of one source are serialized so nothing changes in between.
//
// Notes on the design
// - Sequence numbers start at 1 in every generation. The state of a generation is
//     appliedThrough A   every seq <= A is applied (or abandoned, below the floor)
//     above              the applied seqs > A (they arrived ahead of a gap)
//     floor F            seqs < F that have not arrived never will: A >= F - 1
//     recent             the ranges of the updates in `above`, sorted by seq
//   A update whose seq is <= A, in `above`, or below F is a duplicate: counted, not applied.
// - "Higher seq wins": a new update s must not overwrite bytes that an applied update s' > s wrote.
//   Any such s' is in `above` (s is new, so s > A, so s' > A), which is why `recent` can forget an
//   update as soon as A passes it: no update that could still arrive is older than A.
//   The same rule holds inside a batch: every record loses to the newer ones beside it.
//   plan() computes, for each new record, the parts of its range no newer update covers (a
//   painter's sweep over the candidates, O(n log n)); those parts are disjoint across the batch,
//   so the gateway may issue all of them at once, in any order.
// - In-order traffic (the common case: every new seq above everything in `recent`, records not
//   overlapping one another, whatever the order of their offsets) skips the sweep: each record is
//   written whole, and A simply advances.
// - Generations only grow. A newer generation resets the state; an older one is stale. The same
//   generation from another process of the source (its incarnation differs: a copy of the proxy's
//   state directory restored from a backup, or run twice) is "reused": its seqs would collide with
//   the ones already applied, so nothing of it is applied either.
// - durableThrough is set by the gateway after an fdatasync; after a restart A starts there.
// - For the secondary's consistency (gateway.ts): `resyncMax` is the highest seq applied from a
//   record flagged RESYNC, `abandonedMax` the highest seq a floor counted done without it ever
//   arriving. A floor that abandons seqs while later ones are applied ("above") leaves the
//   secondary holding writes without some that came before them: raiseFloor() says "gap".

import { FLAG_RESYNC, type UpdateRecord } from "./records.js";

/** A part of a record's range to write: `dataStart` is where it starts in the record's data. */
export interface Piece {
  offset: number;
  length: number;
  dataStart: number;
}

/** A new record of a batch, and what of it to write (null: the whole range). */
export interface PlannedUpdate {
  record: UpdateRecord;
  pieces: Piece[] | null;
}

/** What to do with a batch: the new records in seq order, and how many were duplicates. */
export interface BatchPlan {
  updates: PlannedUpdate[];
  duplicates: number;
}

/** The persistent part of a source's state. */
export interface SourceSnapshot {
  generation: number;
  durableThrough: number;
  floor: number;
  /** The process (X-Blockfork-Incarnation) that sent this generation; absent: not known. */
  incarnation?: string;
}

interface Recent {
  seq: number;
  start: number;
  end: number;
}

/** How a request's generation compares with the source's. */
export type GenerationCheck = "current" | "reset" | "stale" | "reused";

/** The idempotency state of one source. */
export class Sequencer {
  generation: number;
  /** The process that sends this generation (null: not known, e.g. an older proxy). */
  incarnation: string | null;
  appliedThrough = 0;
  durableThrough = 0;
  floor = 0;
  lastPeriod = 0;
  /** The highest seq of this generation applied from a record flagged RESYNC (0: none). */
  resyncMax = 0;
  /** The highest seq of this generation a floor counted done without it arriving (0: none). */
  abandonedMax = 0;
  private above = new Set<number>();
  private recent: Recent[] = [];

  constructor(init: SourceSnapshot) {
    this.generation = init.generation;
    this.incarnation = init.incarnation ?? null;
    this.durableThrough = init.durableThrough;
    this.appliedThrough = init.durableThrough;
    this.raiseFloor(init.floor);
    this.abandonedMax = 0; // what the floor passed over was abandoned in an earlier life
  }

  /** Applied updates waiting above a gap. */
  get outOfOrder(): number {
    return this.above.size;
  }

  /** Ranges remembered for "higher seq wins" (for tests and status). */
  get recentCount(): number {
    return this.recent.length;
  }

  /** The state to persist. */
  snapshot(): SourceSnapshot {
    const snap: SourceSnapshot = {
      generation: this.generation,
      durableThrough: this.durableThrough,
      floor: this.floor,
    };
    if (this.incarnation !== null) snap.incarnation = this.incarnation;
    return snap;
  }

  /**
   * Compare a request's generation (and the process sending it, when it says): a newer one resets
   * the state, an older one is stale, the same one from another process is reused.
   */
  checkGeneration(generation: number, incarnation: string | null = null): GenerationCheck {
    if (generation === this.generation) {
      if (incarnation === null) return "current";
      if (this.incarnation === null) this.incarnation = incarnation;
      return incarnation === this.incarnation ? "current" : "reused";
    }
    if (generation < this.generation) return "stale";
    this.generation = generation;
    this.incarnation = incarnation;
    this.appliedThrough = 0;
    this.durableThrough = 0;
    this.floor = 0;
    this.lastPeriod = 0;
    this.resyncMax = 0;
    this.abandonedMax = 0;
    this.above.clear();
    this.recent = [];
    return "reset";
  }

  /** True when `seq` needs no applying: applied already, or abandoned below the floor. */
  isDone(seq: number): boolean {
    return seq <= this.appliedThrough || seq < this.floor || this.above.has(seq);
  }

  /**
   * Every seq below `floor` that has not arrived never will: count them as done. Returns "gap"
   * when some of them were abandoned while a later seq is applied (the secondary then holds
   * writes without some that came before them), "abandoned" when seqs were abandoned with none
   * applied after them, "none" when nothing was abandoned.
   */
  raiseFloor(floor: number): "none" | "abandoned" | "gap" {
    if (floor <= this.floor) return "none";
    this.floor = floor;
    let result: "none" | "abandoned" | "gap" = "none";
    if (floor - 1 > this.appliedThrough) {
      // appliedThrough + 1 never arrived (advance() would have taken it), so it is abandoned, and
      // every seq in `above` is later than it.
      result = this.above.size > 0 ? "gap" : "abandoned";
      let last = floor - 1;
      while (this.above.has(last)) last--;
      if (last > this.abandonedMax) this.abandonedMax = last;
      this.appliedThrough = floor - 1;
      for (const s of this.above) if (s <= this.appliedThrough) this.above.delete(s);
      this.advance();
      this.prune();
    }
    return result;
  }

  /** Decide what of a batch to apply. `records` may be in any order; the state is not changed. */
  plan(records: readonly UpdateRecord[]): BatchPlan {
    let sorted = true;
    for (let i = 1; i < records.length; i++) {
      if (records[i].seq < records[i - 1].seq) {
        sorted = false;
        break;
      }
    }
    const ordered = sorted ? records : [...records].sort((a, b) => a.seq - b.seq);
    const fresh: UpdateRecord[] = [];
    for (const r of ordered) if (!this.isDone(r.seq)) fresh.push(r);
    const duplicates = ordered.length - fresh.length;
    if (fresh.length === 0) return { updates: [], duplicates };

    // Fast path: nothing newer is remembered, and the records do not overlap one another.
    const newer = this.recent.length > 0 && this.recent[this.recent.length - 1].seq > fresh[0].seq;
    if (!newer && !overlapping(fresh)) {
      return { updates: fresh.map((record) => ({ record, pieces: null })), duplicates };
    }
    return { updates: this.sweep(fresh), duplicates };
  }

  /** Mark a planned batch applied (after every write of it succeeded). */
  commit(plan: BatchPlan): void {
    for (const { record } of plan.updates) {
      const seq = record.seq;
      if (record.period > this.lastPeriod) this.lastPeriod = record.period;
      if ((record.flags ?? 0) & FLAG_RESYNC && seq > this.resyncMax) this.resyncMax = seq;
      if (seq === this.appliedThrough + 1) {
        this.appliedThrough = seq;
        this.advance();
      } else if (seq > this.appliedThrough && !this.above.has(seq)) {
        this.above.add(seq);
        this.insertRecent({ seq, start: record.offset, end: record.offset + record.length });
      }
    }
    this.prune();
  }

  /** An fdatasync that started when appliedThrough was `through` has completed. */
  markDurable(through: number): void {
    if (through > this.durableThrough) this.durableThrough = through;
  }

  private advance(): void {
    while (this.above.size > 0 && this.above.delete(this.appliedThrough + 1)) this.appliedThrough++;
  }

  private prune(): void {
    let k = 0;
    while (k < this.recent.length && this.recent[k].seq <= this.appliedThrough) k++;
    if (k > 0) this.recent.splice(0, k);
  }

  private insertRecent(r: Recent): void {
    const list = this.recent;
    if (list.length === 0 || list[list.length - 1].seq < r.seq) {
      list.push(r);
      return;
    }
    let lo = 0;
    let hi = list.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (list[mid].seq < r.seq) lo = mid + 1;
      else hi = mid;
    }
    list.splice(lo, 0, r);
  }

  /**
   * The visible parts of each fresh record when every candidate (fresh records and remembered
   * newer updates) is painted in seq order: at each point the highest seq covering it owns it.
   */
  private sweep(fresh: UpdateRecord[]): PlannedUpdate[] {
    const minSeq = fresh[0].seq;
    let lo = Infinity;
    let hi = -Infinity;
    for (const r of fresh) {
      if (r.offset < lo) lo = r.offset;
      if (r.offset + r.length > hi) hi = r.offset + r.length;
    }
    // Candidates: the fresh records (owner = index) and remembered newer updates that reach the
    // batch's span (owner = -1).
    const starts: number[] = [];
    const ends: number[] = [];
    const seqs: number[] = [];
    const owners: number[] = [];
    fresh.forEach((r, i) => {
      starts.push(r.offset);
      ends.push(r.offset + r.length);
      seqs.push(r.seq);
      owners.push(i);
    });
    for (let i = this.recent.length - 1; i >= 0 && this.recent[i].seq > minSeq; i--) {
      const c = this.recent[i];
      if (c.end <= lo || c.start >= hi) continue;
      starts.push(c.start);
      ends.push(c.end);
      seqs.push(c.seq);
      owners.push(-1);
    }
    const n = starts.length;
    const byStart = Array.from({ length: n }, (_, i) => i).sort((a, b) => starts[a] - starts[b]);
    const points = new Float64Array(2 * n);
    for (let i = 0; i < n; i++) {
      points[2 * i] = starts[i];
      points[2 * i + 1] = ends[i];
    }
    points.sort();

    const pieces: Piece[][] = fresh.map((): Piece[] => []);
    const heap = new MaxHeap(seqs);
    let k = 0;
    for (let p = 0; p < points.length - 1; p++) {
      const x = points[p];
      const next = points[p + 1];
      if (next === x) continue;
      while (k < n && starts[byStart[k]] <= x) heap.push(byStart[k++]);
      while (heap.size > 0 && ends[heap.top()] <= x) heap.pop();
      if (heap.size === 0) continue;
      const owner = owners[heap.top()];
      if (owner < 0) continue;
      const list = pieces[owner];
      const last = list[list.length - 1];
      if (last !== undefined && last.offset + last.length === x) last.length += next - x;
      else list.push({ offset: x, length: next - x, dataStart: x - fresh[owner].offset });
    }
    return fresh.map((record, i) => {
      const ps = pieces[i];
      const whole = ps.length === 1 && ps[0].offset === record.offset && ps[0].length === record.length;
      return { record, pieces: whole ? null : ps };
    });
  }
}

/**
 * Whether any two records' ranges overlap. Sequential traffic is checked in one pass; random
 * traffic (offsets out of order, the common case of 4K random writes) by sorting the offsets,
 * which is far cheaper than the sweep it avoids.
 */
function overlapping(records: readonly UpdateRecord[]): boolean {
  let ascending = true;
  for (let i = 1; i < records.length; i++) {
    if (records[i].offset < records[i - 1].offset + records[i - 1].length) {
      ascending = false;
      break;
    }
  }
  if (ascending) return false;
  // Coverage is at most 1 everywhere iff, with starts and ends sorted separately, each end is at or
  // before the next start (the k+1-th start comes after at least k ends). Typed arrays sort natively.
  const n = records.length;
  const starts = new Float64Array(n);
  const ends = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    starts[i] = records[i].offset;
    ends[i] = records[i].offset + records[i].length;
  }
  starts.sort();
  ends.sort();
  for (let k = 0; k + 1 < n; k++) if (ends[k] > starts[k + 1]) return true;
  return false;
}

/** A binary max-heap of candidate indices, ordered by their seq. */
class MaxHeap {
  private readonly items: number[] = [];
  constructor(private readonly key: readonly number[]) {}

  get size(): number {
    return this.items.length;
  }

  top(): number {
    return this.items[0];
  }

  push(i: number): void {
    const a = this.items;
    a.push(i);
    let c = a.length - 1;
    while (c > 0) {
      const p = (c - 1) >> 1;
      if (this.key[a[p]] >= this.key[a[c]]) break;
      [a[p], a[c]] = [a[c], a[p]];
      c = p;
    }
  }

  pop(): void {
    const a = this.items;
    const last = a.pop()!;
    if (a.length === 0) return;
    a[0] = last;
    let p = 0;
    for (;;) {
      const l = 2 * p + 1;
      const r = l + 1;
      let m = p;
      if (l < a.length && this.key[a[l]] > this.key[a[m]]) m = l;
      if (r < a.length && this.key[a[r]] > this.key[a[m]]) m = r;
      if (m === p) return;
      [a[p], a[m]] = [a[m], a[p]];
      p = m;
    }
  }
}

// src/pit/journal.ts driven directly (no NBD): Journal.open on a scratch directory, client sessions
// with needsImage/stage/commit, group commit (one record for everything staged in a tick), merge
// notes from other sessions, zero images, the index (timestamp order, firstAtOrAfter against a
// linear scan), window() and pointOf(), segment roll-over with small segments, retention by size
// and by age (files removed, the earliest point moved past the newest dropped entry), pinning by an
// open SnapshotView, bookmarks (validation, persistence, expiry), reopen (the same index, entry for
// entry, and the same data), a torn or corrupted tail of the last segment ignored on reopen, a stop
// recorded in the state file, and a journal of another block size refused. Commit rounds overlap
// (the next appends and syncs while one's fdatasync is in flight, at most 4 at once) and finish in
// order: held fdatasyncs released last-first wake nobody until the first one is done. Steps of
// the wall clock back: the range of time that passes twice is recorded, kept and capped.

import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import {
  closeSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { EntryIndex, Journal, segmentBytesFor, type JournalOptions } from "../../src/pit/journal.js";
import { journalNow, type ClockStep } from "../../src/pit/clock.js";
import {
  decodeRecord,
  decodeSegmentHeader,
  REC,
  RECORD_HEADER,
  SEGMENT_HEADER,
} from "../../src/pit/records.js";
import { SnapshotView } from "../../src/pit/snapshot.js";
import { MemoryVolume } from "../../src/volume/memory.js";
import { Logger } from "../../src/log.js";
import { BlockFile } from "../../src/blockio/index.js";
import { Gate } from "../helpers/gate.js";
import { probedTwice, watchProbes } from "../helpers/probes.js";

const BS = 4096;
const MiB = 1024 * 1024;
const VOLUME = 64 * MiB;
const SMALL_SEG = 64 * 1024; // room for one record of up to 14 data images

const dirs: string[] = [];
const open: Journal[] = [];
after(async () => {
  // A journal whose commit loop failed may never finish closing: do not let that keep the files.
  for (const j of open) {
    await Promise.race([j.close().catch(() => {}), new Promise((r) => setTimeout(r, 2000).unref())]);
  }
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

function scratch(): string {
  const d = mkdtempSync(join(tmpdir(), "bf-pit-journal-"));
  dirs.push(d);
  return d;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Wait (up to 2 s) until `cond` holds; fail saying `what` if it never does. */
async function until(what: string, cond: () => boolean): Promise<void> {
  for (let i = 0; i < 400 && !cond(); i++) await sleep(5);
  assert.ok(cond(), what);
}

/**
 * Hold the fdatasyncs of every BlockFile (segments included) that `hold(n)` picks (n: the call's
 * number, from 0) until the test releases their gates; the others pass. restore() puts the real
 * sync back and opens every gate.
 */
function holdSyncs(hold: (n: number) => boolean): {
  held: Gate[];
  peak: () => number;
  restore: () => void;
} {
  const held: Gate[] = [];
  let calls = 0;
  let inFlight = 0;
  let peak = 0;
  // eslint-disable-next-line @typescript-eslint/unbound-method -- called below with .call(this)
  const realSync = BlockFile.prototype.sync;
  BlockFile.prototype.sync = async function (this: BlockFile, full?: boolean): Promise<void> {
    const g = hold(calls++) ? new Gate() : null;
    if (g !== null) held.push(g);
    peak = Math.max(peak, ++inFlight);
    try {
      await g?.pass();
      await realSync.call(this, full);
    } finally {
      inFlight--;
    }
  };
  return {
    held,
    peak: () => peak,
    restore: () => {
      BlockFile.prototype.sync = realSync;
      for (const g of held) g.release();
    },
  };
}

/** Sleep until `margin` ms after the next window boundary of the journal clock. */
async function nextWindow(windowMs: number, margin = 5): Promise<void> {
  const now = journalNow();
  await sleep(Math.ceil(windowMs - (now % windowMs)) + margin);
}

interface Opened {
  j: Journal;
  dir: string;
  lines: string[];
}

async function openJournal(opts: Partial<JournalOptions> & { dir?: string } = {}): Promise<Opened> {
  const lines: string[] = [];
  const dir = opts.dir ?? scratch();
  const j = await Journal.open({
    volumeSize: VOLUME,
    log: Logger.create("debug", (l) => lines.push(l)),
    ...opts,
    dir,
  });
  open.push(j);
  return { j, dir, lines };
}

/** Every record of a segment file: type, count, and where it starts. */
function recordsOf(path: string): { type: number; count: number; at: number; size: number }[] {
  const b = readFileSync(path);
  const out: { type: number; count: number; at: number; size: number }[] = [];
  let at = SEGMENT_HEADER;
  for (;;) {
    const r = decodeRecord(b, at, BS);
    if (r === null) break;
    out.push({ type: r.type, count: r.count, at, size: r.size });
    at += r.size;
  }
  return out;
}

function segmentFiles(dir: string): string[] {
  return readdirSync(dir)
    .filter((f) => f.endsWith(".seg"))
    .sort();
}

/** Stage `blocks` (fresh data each) in `s` at the current time, remember the data, commit. */
async function commitImages(
  j: Journal,
  blocks: number[],
  opts: { zero?: boolean; label?: string } = {},
): Promise<Map<number, Buffer | null>> {
  const s = j.openSession(opts.label ?? "t");
  const data = new Map<number, Buffer | null>();
  for (const b of blocks) {
    const ts = journalNow();
    assert.ok(j.needsImage(b, ts, s), `block ${b} already imaged in this window`);
    const d = opts.zero ? null : randomBytes(BS);
    j.stage(s, b, ts, d);
    data.set(b, d);
  }
  await j.commit();
  j.closeSession(s);
  return data;
}

interface IndexCopy {
  ts: number[];
  block: number[];
  seg: number[];
  off: number[];
  sources: number[];
  first: number;
  length: number;
}

function copyIndex(j: Journal): IndexCopy {
  const x = j.index;
  const slice = (at: (i: number) => number): number[] =>
    Array.from({ length: x.length - x.first }, (_, k) => at(x.first + k));
  return {
    ts: slice((i) => x.tsAt(i)),
    block: slice((i) => x.blockAt(i)),
    seg: slice((i) => x.segAt(i)),
    off: slice((i) => x.offAt(i)),
    sources: slice((i) => x.sourcesAt(i)),
    first: x.first,
    length: x.length,
  };
}

async function image(j: Journal, i: number): Promise<Buffer> {
  const b = Buffer.alloc(BS, 0xa5);
  await j.readImage(i, b);
  return b;
}

void describe("Journal: opening, windows and points", () => {
  void test("a new journal has one segment with a valid header; points exist from the next window", async () => {
    const W = 300;
    const before = journalNow();
    const { j, dir } = await openJournal({ windowMs: W, segmentBytes: SMALL_SEG });
    const after_ = journalNow();
    assert.deepEqual(segmentFiles(dir), ["0000000001.seg"]);
    const path = join(dir, "0000000001.seg");
    assert.equal(statSync(path).size, SMALL_SEG, "segments are pre-allocated to segmentBytes");
    const h = decodeSegmentHeader(readFileSync(path).subarray(0, SEGMENT_HEADER));
    assert.ok(h, "the segment header does not decode");
    assert.equal(h.segment, 1);
    assert.equal(h.blockSize, BS);
    assert.equal(h.windowMs, W);
    assert.match(h.journalId, /^[0-9a-f]{16}$/);
    assert.ok(
      h.created >= before && h.created <= after_,
      `created ${h.created} not in [${before}, ${after_}]`,
    );
    assert.equal(j.segmentCount, 1);
    assert.equal(j.bytes, SEGMENT_HEADER);
    assert.equal(j.index.length, 0);
    assert.ok(j.running);

    const first = Math.ceil(h.created / W) * W;
    const w = j.window();
    assert.equal(w.windowMs, W);
    assert.equal(w.stopped, null);
    const now = journalNow();
    assert.ok(Math.abs(w.latest - now) < 50, `latest ${w.latest} is not now (${now})`);
    if (now < first) assert.equal(w.earliest, null, "no point exists before the first window boundary");
    await sleep(first - journalNow() + 10);
    assert.equal(j.window().earliest, first, "the first point is the first window start after creation");
    await j.close();
    assert.ok(existsSync(join(dir, "state")), "the state file is created at open");
    assert.equal(statSync(join(dir, "state")).size, 4096, "the state file is pre-allocated (4 KiB)");
  });

  void test("pointOf is the start of the merge window", async () => {
    const { j } = await openJournal({ windowMs: 250 });
    for (const [t, p] of [
      [0, 0],
      [249.999, 0],
      [250, 250],
      [1_763_000_000_123.5, 1_763_000_000_000],
      [1_763_000_000_250, 1_763_000_000_250],
      [1_763_000_000_499.999, 1_763_000_000_250],
    ]) {
      assert.equal(j.pointOf(t), p, `pointOf(${t})`);
    }
    const { j: j2 } = await openJournal();
    assert.equal(j2.windowMs, 1000, "the default merge window is 1 s");
    assert.equal(j2.pointOf(1_763_000_000_999), 1_763_000_000_000);
    await j.close();
    await j2.close();
  });
});

void describe("Journal: sessions, images and commits", () => {
  void test("needsImage for a change stamped before the window moved on: an image, and the newer window's marks stay", async () => {
    // A large change marks its blocks a slice at a time (filter.ts): a change stamped later, in
    // the next window, may have marked blocks in the meantime. Before, the late call took the
    // window back to the older one and emptied the map, so the newer window imaged its blocks twice.
    const W = 200;
    const { j } = await openJournal({ windowMs: W });
    await nextWindow(W);
    const a = j.openSession("a");
    const old = journalNow();
    j.endChange(j.beginChange(old));
    await nextWindow(W);
    const now = journalNow();
    j.endChange(j.beginChange(now));
    assert.equal(j.needsImage(5, now, a), true, "the first change of block 5 in the new window");
    assert.equal(j.needsImage(7, old, a), true, "a block of the older change needs its image");
    assert.equal(j.needsImage(7, old, a), true, "and is not marked (its window has ended)");
    assert.equal(j.needsImage(5, journalNow(), a), false, "block 5 is still imaged in the new window");
    j.forgetImages([5], 0, old); // the older change failing does not unmark the new window's blocks
    assert.equal(
      j.needsImage(5, journalNow(), a),
      false,
      "block 5 is still imaged after the old change failed",
    );
  });

  void test("needsImage: the first change of a block per window; other sessions become merge sources", async () => {
    const W = 1000;
    const { j, dir } = await openJournal({ windowMs: W });
    await nextWindow(W);
    const a = j.openSession("a");
    const b = j.openSession("b");
    assert.notEqual(a.slot, b.slot, "two live sessions share a slot");
    const t0 = journalNow();
    assert.equal(j.needsImage(5, t0, a), true, "the first change of block 5");
    assert.equal(j.needsImage(5, journalNow(), a), false, "block 5 again, same session, same window");
    assert.equal(a.merges.length, 0, "the same session is not a merge source of its own image");
    assert.equal(j.needsImage(5, journalNow(), b), false, "block 5 from another session, same window");
    assert.equal(j.needsImage(5, journalNow(), b), false, "and again");
    assert.equal(b.merges.length, 1, "one merge note per session and block in a window, not per write");
    assert.equal(b.merges[0].block, 5);
    assert.equal(b.merges[0].slot, b.slot);
    assert.equal(j.needsImage(6, journalNow(), b), true, "another block needs its own image");
    const old5 = randomBytes(BS);
    j.stage(a, 5, t0, old5);
    j.stage(b, 6, journalNow(), null);
    await j.commit();
    assert.equal(j.index.length, 2);
    const i5 = j.index.blockAt(0) === 5 ? 0 : 1;
    const i6 = 1 - i5;
    assert.equal(j.index.blockAt(i6), 6);
    assert.equal(
      j.index.sourcesAt(i5),
      (1 << a.slot) | (1 << b.slot),
      "block 5: both sessions are its sources",
    );
    assert.equal(j.index.sourcesAt(i6), 1 << b.slot);
    assert.ok(j.index.offAt(i5) >= SEGMENT_HEADER + RECORD_HEADER, "block 5 has data in the segment");
    assert.equal(j.index.offAt(i6), -1, "block 6 is a zero image");
    assert.deepEqual(await image(j, i5), old5);
    assert.deepEqual(await image(j, i6), Buffer.alloc(BS), "a zero image reads as zeroes");
    // The merge note is its own record after the images.
    const recs = recordsOf(join(dir, "0000000001.seg"));
    assert.deepEqual(
      recs.map((r) => [r.type, r.count]),
      [
        [REC.IMAGES, 2],
        [REC.MERGES, 1],
      ],
    );
    // The next window: block 5 needs a new image (its contents at that window's start).
    await nextWindow(W);
    assert.equal(j.needsImage(5, journalNow(), b), true, "a new window needs a new image of block 5");
    assert.equal(j.needsImage(5, journalNow(), a), false);
    j.closeSession(a);
    j.closeSession(b);
    await j.close();
  });

  void test("group commit: everything staged in one tick by several sessions is one record", async () => {
    const { j, dir } = await openJournal({ windowMs: 60_000 });
    const sessions = [j.openSession("s0"), j.openSession("s1"), j.openSession("s2")];
    const data = new Map<number, Buffer>();
    const commits: Promise<void>[] = [];
    for (let k = 0; k < 30; k++) {
      const s = sessions[k % 3];
      const block = 100 + k;
      const ts = journalNow();
      assert.ok(j.needsImage(block, ts, s));
      const d = randomBytes(BS);
      data.set(block, d);
      j.stage(s, block, ts, d);
      commits.push(j.commit());
    }
    await Promise.all(commits);
    const recs = recordsOf(join(dir, "0000000001.seg"));
    assert.deepEqual(
      recs.map((r) => [r.type, r.count]),
      [[REC.IMAGES, 30]],
      "30 commits in one tick should share one record",
    );
    assert.equal(j.index.length, 30);
    for (let i = 1; i < 30; i++)
      assert.ok(j.index.tsAt(i) > j.index.tsAt(i - 1), "entries in timestamp order");
    for (let i = 0; i < 30; i++) assert.deepEqual(await image(j, i), data.get(j.index.blockAt(i)));
    // Part of an image, at an offset within the block.
    const part = Buffer.alloc(1000);
    await j.readImage(3, part, 1234);
    assert.deepEqual(part, data.get(j.index.blockAt(3))!.subarray(1234, 2234));
    // A commit with nothing staged resolves and writes nothing.
    await j.commit();
    assert.equal(recordsOf(join(dir, "0000000001.seg")).length, 1);
    await j.close();
  });

  void test("commit rounds overlap (at most 4 fdatasyncs in flight) and finish in order", async () => {
    const { j } = await openJournal({ windowMs: 60_000 });
    const heard: [number, number][] = [];
    j.subscribe((a, b) => heard.push([a, b]));
    // Hold every fdatasync of the journal's segments until the test releases it.
    const syncs = holdSyncs(() => true);
    const held = syncs.held;
    try {
      const s = j.openSession("s");
      const woke: number[] = [];
      const heardWhenWoken: number[] = [];
      const commits: Promise<void>[] = [];
      const round = (k: number): void => {
        const ts = journalNow();
        assert.ok(j.needsImage(100 + k, ts, s));
        j.stage(s, 100 + k, ts, randomBytes(BS));
        commits.push(
          j.commit().then(() => {
            woke.push(k);
            heardWhenWoken.push(heard.length);
          }),
        );
      };
      for (let k = 0; k < 4; k++) {
        round(k);
        await until(
          `round ${k} reaches its fdatasync while the earlier ones are held`,
          () => held.length === k + 1,
        );
      }
      round(4);
      await sleep(50);
      assert.equal(held.length, 4, "a fifth round started with four in flight");
      assert.equal(syncs.peak(), 4);
      // The later rounds' fdatasyncs finish first: nobody may wake, nothing may be announced.
      for (const k of [3, 2, 1]) held[k].release();
      await sleep(50);
      assert.deepEqual(woke, [], "a round woke its writers before an earlier round was durable");
      assert.deepEqual(heard, []);
      held[0].release();
      await Promise.all(commits.slice(0, 4));
      assert.deepEqual(woke, [0, 1, 2, 3], "rounds must finish in the order they started");
      assert.deepEqual(heard, [
        [0, 1],
        [1, 2],
        [2, 3],
        [3, 4],
      ]);
      assert.deepEqual(
        heardWhenWoken,
        [1, 2, 3, 4],
        "writers woke before the listeners heard of their images",
      );
      // The fifth round starts once a slot is free.
      await until("the waiting round starts when one finishes", () => held.length === 5);
      held[4].release();
      await commits[4];
      assert.deepEqual(heard[4], [4, 5]);
      for (let i = 0; i < 5; i++) assert.equal(j.index.blockAt(i), 100 + i);
    } finally {
      syncs.restore();
    }
    await j.close();
  });

  void test("a listener that throws stops the journal; every commit still resolves, other listeners still hear", async () => {
    const { j, lines } = await openJournal({ windowMs: 60_000 });
    const heard: [number, number][] = [];
    j.subscribe(() => {
      throw new Error("cannot copy a lease");
    });
    j.subscribe((a, b) => heard.push([a, b]));
    const s = j.openSession("s");
    const commits: Promise<void>[] = [];
    for (let k = 0; k < 3; k++) {
      const ts = journalNow();
      assert.ok(j.needsImage(k, ts, s));
      j.stage(s, k, ts, randomBytes(BS));
      commits.push(j.commit());
      await sleep(1);
    }
    const outcome = await Promise.race([
      Promise.all(commits).then(() => "resolved"),
      sleep(5000).then(() => "hung"),
    ]);
    assert.equal(outcome, "resolved", "a commit never resolved after a listener threw");
    assert.equal(j.running, false, "the journal should stop");
    assert.deepEqual(heard[0], [0, heard[0][1]], "the other listener heard the first round");
    assert.deepEqual(heard[heard.length - 1], [-1, -1], "and the stop");
    assert.ok(
      lines.some((l) => /failed to follow the journal: cannot copy a lease/.test(l)),
      lines.join(""),
    );
    assert.ok(
      lines.some((l) => /JOURNAL STOPPED: cannot copy a lease/.test(l)),
      lines.join(""),
    );
    await j.commit(); // stopped: resolves at once
    await j.close();
  });

  void test(
    "one commit of 300,000 staged images (a 1.2 GiB trim) goes through",
    { timeout: 60_000 },
    async () => {
      const { j } = await openJournal({ windowMs: 60_000, volumeSize: 4 * 1024 * MiB });
      const s = j.openSession("big-trim");
      const N = 300_000;
      for (let b = 0; b < N; b++) {
        const ts = journalNow();
        assert.ok(j.needsImage(b, ts, s));
        j.stage(s, b, ts, null);
      }
      const crashed = new Promise<string>((resolve) =>
        process.once("unhandledRejection", (e) => resolve(String(e))),
      );
      const outcome = await Promise.race([
        j.commit().then(() => "committed"),
        crashed,
        sleep(20_000).then(() => "no answer in 20 s"),
      ]);
      assert.equal(outcome, "committed", "a commit of many staged images failed");
      assert.equal(j.index.length, N);
      await j.close();
    },
  );

  void test("zero images cost one table entry (24 bytes), no data", async () => {
    const { j } = await openJournal({ windowMs: 60_000 });
    const before = j.bytes;
    await commitImages(
      j,
      Array.from({ length: 1000 }, (_, i) => i * 3),
      { zero: true },
    );
    assert.equal(j.bytes - before, RECORD_HEADER + 24 * 1000);
    for (let i = 0; i < 1000; i++) assert.equal(j.index.offAt(i), -1);
    await j.close();
  });

  void test("subscribers hear the appended range after the commit", async () => {
    const { j } = await openJournal({ windowMs: 60_000 });
    const heard: [number, number][] = [];
    const unsubscribe = j.subscribe((a, b) => heard.push([a, b]));
    await commitImages(j, [1, 2, 3]);
    await commitImages(j, [4, 5]);
    unsubscribe();
    await commitImages(j, [6]);
    assert.deepEqual(heard, [
      [0, 3],
      [3, 5],
    ]);
    await j.close();
  });

  void test("index.firstAtOrAfter agrees with a linear scan", async () => {
    const { j } = await openJournal({ windowMs: 10 });
    // Timestamps in bursts with gaps (several windows), over four commits.
    for (let k = 0; k < 4; k++) {
      await commitImages(
        j,
        Array.from({ length: 50 }, (_, i) => k * 1000 + i),
        { zero: true },
      );
      await sleep(15);
    }
    const x = j.index;
    const ts = Array.from({ length: x.length }, (_, i) => x.tsAt(i));
    const linear = (t: number): number => {
      const i = ts.findIndex((v) => v >= t);
      return i < 0 ? ts.length : i;
    };
    const probes = [0, ts[0], ts[0] - 0.0005, ts[ts.length - 1], ts[ts.length - 1] + 1, Infinity];
    for (const v of ts) probes.push(v, v + 0.0005, j.pointOf(v), j.pointOf(v) + j.windowMs);
    for (const t of probes) assert.equal(x.firstAtOrAfter(t), linear(t), `firstAtOrAfter(${t})`);
    await j.close();
  });

  void test("segments roll over at segmentBytes; records never cross a segment", async () => {
    const { j, dir } = await openJournal({ windowMs: 60_000, segmentBytes: SMALL_SEG });
    // 10 images of 4 KiB per commit: one commit fills most of a 64 KiB segment.
    for (let k = 0; k < 5; k++) {
      await commitImages(
        j,
        Array.from({ length: 10 }, (_, i) => k * 10 + i),
      );
    }
    // One commit with more images than a segment holds is cut into records.
    await commitImages(
      j,
      Array.from({ length: 40 }, (_, i) => 500 + i),
    );
    const files = segmentFiles(dir);
    assert.equal(files.length, j.segmentCount);
    assert.ok(files.length >= 8, `expected at least 8 segments, found ${files.length}`);
    let entries = 0;
    for (const [k, f] of files.entries()) {
      const path = join(dir, f);
      const h = decodeSegmentHeader(readFileSync(path).subarray(0, SEGMENT_HEADER));
      assert.equal(h?.segment, k + 1, `${f} has a wrong segment number`);
      let end = SEGMENT_HEADER;
      for (const r of recordsOf(path)) {
        entries += r.count;
        end = r.at + r.size;
      }
      assert.ok(end <= SMALL_SEG, `${f}: records end at ${end}, past the segment size`);
    }
    assert.equal(entries, 90);
    assert.equal(j.index.length, 90);
    await j.close();
  });
});

void describe("Journal: appends past the written end", () => {
  void test("a segment of this process is appended to without probing its hole; a reopened one is probed", async () => {
    // See BlockFile.holesFrom: probing a record's partial last page zero-filled the hole into the
    // page cache for nothing. A segment reopened after a crash may hold a torn record past its
    // end, so there the probe stays.
    const { probes, stop } = watchProbes();
    try {
      const { j, dir } = await openJournal({ windowMs: 1000 });
      for (let round = 0; round < 12; round++)
        await commitImages(j, [round * 40, round * 40 + 1, round * 40 + 2]);
      assert.ok(probes.length > 0, "head pages were probed");
      assert.equal(probedTwice(probes).length, 0, "no record's last page was probed (it lies in the hole)");
      await j.close();
      open.splice(open.indexOf(j), 1);
      probes.length = 0;
      const again = await openJournal({ dir, windowMs: 1000 });
      for (let round = 0; round < 6; round++)
        await commitImages(again.j, [1000 + round * 40, 1001 + round * 40, 1002 + round * 40]);
      assert.ok(probedTwice(probes).length > 0, "the reopened segment's last pages are probed");
    } finally {
      stop();
    }
  });
});

void describe("EntryIndex: memory follows the retained entries", () => {
  void test("entries dropped by retention leave the arrays; numbers, values and searches stay", () => {
    const x = new EntryIndex();
    const n = 200_000;
    for (let i = 0; i < n; i++)
      x.push(1000 + i, i * 3, 1 + (i >> 16), i % 7 === 0 ? -1 : i * 4096, 1 << (i % 5));
    assert.equal(x.capacity, 4 * 65_536, "grows a chunk (64K entries) at a time");
    x.dropBelow(150_000);
    assert.equal(x.base, 131_072, "the chunks wholly dropped leave (the kept ones start at base)");
    assert.ok(x.capacity <= 131_072, `capacity ${x.capacity} for 50000 retained entries`);
    for (const i of [150_000, 150_001, 177_777, n - 1]) {
      assert.equal(x.tsAt(i), 1000 + i);
      assert.equal(x.blockAt(i), i * 3);
      assert.equal(x.segAt(i), 1 + (i >> 16));
      assert.equal(x.offAt(i), i % 7 === 0 ? -1 : i * 4096);
      assert.equal(x.sourcesAt(i), 1 << (i % 5));
    }
    assert.equal(x.firstAtOrAfter(0), 150_000, "nothing before the first retained entry");
    assert.equal(x.firstAtOrAfter(1000 + 180_000), 180_000);
    assert.equal(x.firstAtOrAfter(1e12), n);
    // Appending goes on with the next number, and a second drop moves the arrays again.
    assert.equal(x.push(1e9, 5, 9, 0, 1), n);
    assert.equal(x.tsAt(n), 1e9);
    x.dropBelow(190_000);
    assert.equal(x.base, 131_072, "no chunk wholly dropped");
    for (let i = 1; i <= 100_000; i++) x.push(1e9 + i, i, 9, 0, 1);
    x.dropBelow(n + 90_000);
    assert.equal(x.base, 262_144);
    assert.equal(x.tsAt(n + 90_000), 1e9 + 90_000);
    assert.equal(x.tsAt(n + 100_000), 1e9 + 100_000);
    assert.equal(x.firstAtOrAfter(0), n + 90_000);
    assert.equal(x.firstAtOrAfter(1e9 + 95_000), n + 95_000);
  });

  // Doubling flat arrays copied every entry at once: 120 ms with the event loop stalled at 4M
  // entries (a 16 GiB zero write over holes makes that many).
  void test("grows a chunk at a time, never copying what it holds", () => {
    const x = new EntryIndex();
    for (let i = 0; i < 300_000; i++) x.push(i, i, 1, -1, 1);
    assert.equal(x.capacity, 5 * 65_536, "room for one chunk past 300000 entries, not twice as many");
    assert.equal(x.blockAt(299_999), 299_999);
    assert.equal(x.firstAtOrAfter(123_456.5), 123_457);
  });
});

void describe("Journal: reopen and torn tails", () => {
  async function buildJournal(dir: string): Promise<{ data: Map<number, Buffer>; copy: IndexCopy }> {
    const W = 50;
    const { j } = await openJournal({ dir, windowMs: W, segmentBytes: SMALL_SEG });
    // Images with data, zero images and merge notes over several windows and segments.
    for (let k = 0; k < 6; k++) {
      const a = j.openSession("a");
      const b = j.openSession("b");
      for (let i = 0; i < 8; i++) {
        const block = (k * 7 + i) % 40;
        const ts = journalNow();
        if (j.needsImage(block, ts, a)) j.stage(a, block, ts, i % 3 === 0 ? null : randomBytes(BS));
        j.needsImage(block, journalNow(), b); // a merge source for the same block
      }
      await j.commit();
      j.closeSession(a);
      j.closeSession(b);
      await sleep(W + 5);
    }
    // The last record: images only (no merge notes after it).
    await commitImages(j, [41, 42, 43], { label: "last" });
    const data = new Map<number, Buffer>();
    for (let i = 0; i < j.index.length; i++) data.set(i, await image(j, i));
    const copy = copyIndex(j);
    assert.ok(
      copy.sources.some((s) => s !== 0 && (s & (s - 1)) !== 0),
      "some entries have two sources",
    );
    await j.close();
    return { data, copy };
  }

  void test("reopening rebuilds the same index, entry for entry, and the same images", async () => {
    const dir = scratch();
    const { data, copy } = await buildJournal(dir);
    const { j, lines } = await openJournal({ dir, windowMs: 50, segmentBytes: SMALL_SEG });
    const reopened = copyIndex(j);
    for (const k of ["first", "length", "ts", "block", "seg", "sources", "off"] as const) {
      assert.deepEqual(reopened[k], copy[k], `index.${k} differs between the live journal and its reopen`);
    }
    for (const [i, d] of data) assert.deepEqual(await image(j, i), d, `entry ${i} reads differently`);
    assert.ok(
      lines.some((l) => /journal: \d+ segments, \d+ entries, points in time from /.test(l)),
      `the reopen is not logged:\n${lines.join("")}`,
    );
    // New entries go on after the old ones, and the timestamps keep increasing.
    const more = await commitImages(j, [900, 901]);
    assert.equal(j.index.length, copy.length + 2);
    assert.ok(j.index.tsAt(copy.length) > j.index.tsAt(copy.length - 1));
    const all = copyIndex(j);
    await j.close();
    const { j: j2 } = await openJournal({ dir, windowMs: 50, segmentBytes: SMALL_SEG });
    assert.deepEqual(copyIndex(j2), all);
    assert.deepEqual(await image(j2, copy.length), more.get(j2.index.blockAt(copy.length)));
    await j2.close();
  });

  /** The last record of the last segment: its path, offset and size. */
  function lastRecord(dir: string): { path: string; at: number; size: number; count: number } {
    const files = segmentFiles(dir);
    for (let k = files.length - 1; k >= 0; k--) {
      const path = join(dir, files[k]);
      const recs = recordsOf(path);
      if (recs.length > 0) {
        assert.equal(k, files.length - 1, "the last segment holds records");
        const r = recs[recs.length - 1];
        return { path, at: r.at, size: r.size, count: r.count };
      }
    }
    throw new Error("no records");
  }

  for (const damage of ["truncated mid-record", "zeroed from mid-record", "a flipped byte"] as const) {
    void test(`a torn tail of the last segment (${damage}) is ignored on reopen`, async () => {
      const dir = scratch();
      await buildJournal(dir);
      // The reference is what a reopen of the intact journal finds on disk.
      const ref = await openJournal({ dir, windowMs: 50, segmentBytes: SMALL_SEG });
      const copy = copyIndex(ref.j);
      const data = new Map<number, Buffer>();
      for (let i = 0; i < copy.length; i++) data.set(i, await image(ref.j, i));
      await ref.j.close();
      const last = lastRecord(dir);
      assert.equal(last.count, 3, "the last record is the final commit of three images");
      assert.ok(last.size > 100);
      const cut = last.at + Math.floor(last.size / 2);
      if (damage === "truncated mid-record") truncateSync(last.path, cut);
      else {
        const fd = openSync(last.path, "r+");
        try {
          if (damage === "zeroed from mid-record")
            writeSync(fd, Buffer.alloc(last.at + last.size - cut), 0, undefined, cut);
          else {
            const one = Buffer.alloc(1);
            readSync(fd, one, 0, 1, cut);
            one[0] ^= 0x40;
            writeSync(fd, one, 0, 1, cut);
          }
        } finally {
          closeSync(fd);
        }
      }
      const keep = copy.length - last.count;
      const { j } = await openJournal({ dir, windowMs: 50, segmentBytes: SMALL_SEG });
      assert.equal(j.index.length, keep, "the torn record's entries must not be indexed");
      const c = copyIndex(j);
      for (const k of ["ts", "block", "seg", "off", "sources"] as const) {
        assert.deepEqual(c[k], copy[k].slice(0, keep), k);
      }
      for (let i = 0; i < keep; i++) assert.deepEqual(await image(j, i), data.get(i));
      // New commits overwrite the torn bytes; a second reopen sees old and new entries, intact.
      const more = await commitImages(j, [700, 701, 702]);
      const all = copyIndex(j);
      await j.close();
      const { j: j2 } = await openJournal({ dir, windowMs: 50, segmentBytes: SMALL_SEG });
      assert.deepEqual(copyIndex(j2), all);
      for (let i = keep; i < keep + 3; i++)
        assert.deepEqual(await image(j2, i), more.get(j2.index.blockAt(i)));
      await j2.close();
    });
  }

  void test("a torn tail stays out of the index when the next record begins a new segment", async () => {
    const dir = scratch();
    await buildJournal(dir);
    const ref = await openJournal({ dir, windowMs: 50, segmentBytes: SMALL_SEG });
    const copy = copyIndex(ref.j);
    await ref.j.close();
    // Tear the last record's data, leaving its header and entry table intact.
    const last = lastRecord(dir);
    const cut = last.at + Math.floor(last.size / 2);
    const fd = openSync(last.path, "r+");
    writeSync(fd, Buffer.alloc(last.at + last.size - cut), 0, undefined, cut);
    closeSync(fd);
    const keep = copy.length - last.count;
    const { j, lines } = await openJournal({ dir, windowMs: 50, segmentBytes: SMALL_SEG });
    assert.equal(j.index.length, keep);
    assert.ok(
      lines.some((l) =>
        /ends in a record torn by a crash at offset \d+ \(it never committed\): cleared/.test(l),
      ),
      `the torn tail is not reported:\n${lines.join("")}`,
    );
    // The next record does not fit in what is left of that segment: the segment is sealed as it
    // stands and the record goes to a new one.
    const segsBefore = segmentFiles(dir).length;
    const blocks = Array.from({ length: 14 }, (_, i) => 800 + i);
    const more = await commitImages(j, blocks);
    assert.equal(segmentFiles(dir).length, segsBefore + 1, "the 14-image record began a new segment");
    await j.close();
    // A sealed segment is indexed from its entry tables: the torn record must not be there.
    const { j: j2 } = await openJournal({ dir, windowMs: 50, segmentBytes: SMALL_SEG });
    assert.equal(j2.index.length, keep + blocks.length, "the torn record's entries came back as committed");
    const c = copyIndex(j2);
    for (const k of ["ts", "block", "seg", "off", "sources"] as const) {
      assert.deepEqual(c[k].slice(0, keep), copy[k].slice(0, keep), k);
    }
    for (let i = keep; i < keep + blocks.length; i++)
      assert.deepEqual(await image(j2, i), more.get(j2.index.blockAt(i)));
    await j2.close();
  });

  void test("a journal written with another block size is refused", async () => {
    const dir = scratch();
    const { j } = await openJournal({ dir });
    await commitImages(j, [1]);
    await j.close();
    await assert.rejects(openJournal({ dir, blockSize: 512 }), /uses 4096-byte blocks, this journal 512/);
  });

  void test("a segment with a damaged header is refused, not silently dropped", async () => {
    const dir = scratch();
    const { j } = await openJournal({ dir });
    await commitImages(j, [1]);
    await j.close();
    const fd = openSync(join(dir, "0000000001.seg"), "r+");
    writeSync(fd, Buffer.from("X"), 0, 1, 3);
    closeSync(fd);
    await assert.rejects(openJournal({ dir }), /no valid segment header/);
  });

  void test("a stop recorded in the state file: no point before the reopen is offered", async () => {
    const W = 100;
    const dir = scratch();
    const { j } = await openJournal({ dir, windowMs: W });
    await nextWindow(W);
    await commitImages(j, [1, 2, 3]);
    await j.close();
    // What the journal writes when it stops (disk full) and the process then dies.
    const st = Buffer.alloc(4096, 0x20);
    st.write(JSON.stringify({ stoppedAt: journalNow() - 5 }));
    writeFileSync(join(dir, "state"), st);
    await sleep(2 * W);
    const reopened = journalNow();
    const { j: j2, lines } = await openJournal({ dir, windowMs: W });
    const w = j2.window();
    const expected = Math.ceil(reopened / W) * W;
    if (w.earliest !== null) assert.ok(w.earliest >= expected, `earliest ${w.earliest} is before the reopen`);
    await sleep(expected + W - journalNow());
    assert.ok((j2.window().earliest ?? 0) >= expected, "points from before the reopen are offered");
    assert.ok(
      lines.some((l) => /warn .*it was stopped at/.test(l)),
      `the earlier stop is not logged:\n${lines.join("")}`,
    );
    await j2.close();
    const text = readFileSync(join(dir, "state"), "utf8").trim();
    assert.equal(statSync(join(dir, "state")).size, 4096);
    assert.ok(!/stoppedAt/.test(text), `the stop is still recorded after the reopen: ${text}`);
    // And it stays that way: a second reopen does not offer the points before the first one.
    const { j: j3 } = await openJournal({ dir, windowMs: W });
    assert.ok((j3.window().earliest ?? 0) >= expected, "a second reopen offers points before the stop");
    await j3.close();
  });

  void test("a newest segment left without a header by a crash is removed; other bad headers refuse", async () => {
    const dir = scratch();
    const { j } = await openJournal({ dir, segmentBytes: SMALL_SEG });
    await commitImages(j, [1, 2, 3]);
    const before = copyIndex(j);
    await j.close();
    // What newSegment leaves when killed between creating the file and syncing its header.
    const torn = join(dir, "0000000002.seg");
    writeFileSync(torn, Buffer.alloc(SMALL_SEG));
    const { j: j2, lines } = await openJournal({ dir, segmentBytes: SMALL_SEG });
    assert.deepEqual(copyIndex(j2), before, "the journal opens with the same index");
    assert.ok(!existsSync(torn), "the unborn segment is removed");
    assert.ok(
      lines.some((l) => /warn .*0000000002\.seg has no header and no records/.test(l)),
      lines.join(""),
    );
    await commitImages(j2, [4]); // and the journal goes on (it creates segment 2 when it needs one)
    await j2.close();
    // A short file (the crash came before the preallocation) is unborn too.
    const next = join(dir, `${String(segmentFiles(dir).length + 1).padStart(10, "0")}.seg`);
    writeFileSync(next, Buffer.alloc(100));
    const { j: j3 } = await openJournal({ dir, segmentBytes: SMALL_SEG });
    assert.ok(!existsSync(next));
    await j3.close();
    // A zeroed header in front of a record is damage, not a crash: refuse, saying what to do.
    const last = join(dir, segmentFiles(dir).at(-1)!);
    const fd = openSync(last, "r+");
    writeSync(fd, Buffer.alloc(SEGMENT_HEADER), 0, SEGMENT_HEADER, 0);
    closeSync(fd);
    assert.ok(recordsOf(last).length > 0, "the damaged segment holds records");
    await assert.rejects(
      openJournal({ dir, segmentBytes: SMALL_SEG }),
      /no valid segment header.*move .* aside/,
    );
    assert.ok(existsSync(last), "a damaged segment is not removed");
  });

  void test("a stop and restart: no later process start offers the points before the gap", async () => {
    const W = 100;
    const dir = scratch();
    const { j } = await openJournal({ dir, windowMs: W });
    await nextWindow(W);
    await commitImages(j, [1, 2, 3]);
    await nextWindow(W);
    const before = journalNow(); // an exact point, until the stop
    assert.ok((j.window().earliest ?? Infinity) <= j.pointOf(before));
    const internals = j as unknown as { stop(e: Error): void; tryRestart(t: NodeJS.Timeout): Promise<void> };
    internals.stop(Object.assign(new Error("No space left on device"), { code: "ENOSPC" }));
    assert.equal(j.running, false);
    const timer = setInterval(() => {}, 1e6);
    await internals.tryRestart(timer);
    clearInterval(timer);
    assert.equal(j.running, true, "the journal restarts");
    const restarted = journalNow();
    await sleep(2 * W);
    const w = j.window();
    assert.ok(w.earliest !== null && w.earliest >= restarted, "the restart moves the earliest point");
    await commitImages(j, [4]);
    await j.close();
    for (let n = 0; n < 2; n++) {
      const { j: j2 } = await openJournal({ dir, windowMs: W });
      const e = j2.window().earliest;
      assert.ok(e !== null && e > before, `reopen ${n + 1} offers ${e}: before the stop (${before})`);
      assert.ok(e >= w.earliest, `reopen ${n + 1}: earliest ${e} is before the restart's ${w.earliest}`);
      await j2.close();
    }
  });

  void test("segments are a sixteenth of --pit-max-bytes (4 to 64 MiB); a journal reopened with another segment size keeps every record", async () => {
    const MiB = 1024 * 1024;
    assert.equal(segmentBytesFor(10 * 1024 * MiB), 64 * MiB);
    assert.equal(segmentBytesFor(48 * MiB), 4 * MiB);
    assert.equal(segmentBytesFor(256 * MiB), 16 * MiB);
    const { j, dir } = await openJournal({ segmentBytes: MiB });
    const blocks = Array.from({ length: 200 }, (_, i) => i); // one record of about 800 KiB
    await commitImages(j, blocks);
    const n = j.index.length;
    await j.close();
    const again = await openJournal({ dir, segmentBytes: SMALL_SEG });
    assert.equal(again.j.index.length, n, "records larger than this process's segment size are kept");
  });

  void test("a restart offers the earliest point retention left, and the bookmarks from it", async () => {
    // Found by a power-cut hunt: a bookmark taken after the newest dropped entry but before the
    // oldest remaining segment was created was served, then silently refused after a restart
    // (recovery could only take the oldest segment's creation time).
    const W = 50;
    const opts = { windowMs: W, segmentBytes: SMALL_SEG, maxBytes: SMALL_SEG };
    const { j, dir } = await openJournal(opts);
    await nextWindow(W);
    await commitImages(
      j,
      Array.from({ length: 10 }, (_, i) => i),
    ); // segment 1
    await nextWindow(W);
    const b = j.mark("b");
    await sleep(3 * W);
    await commitImages(
      j,
      Array.from({ length: 10 }, (_, i) => 10 + i),
    ); // segment 2, created after b
    j.enforceRetention(); // over maxBytes: segment 1 goes
    assert.deepEqual(segmentFiles(dir), ["0000000002.seg"]);
    const live = j.window().earliest!;
    assert.ok(live <= b, `earliest ${live} after the bookmark ${b}`);
    assert.ok(j.listBookmarks().has("b"));
    await j.close();
    const again = await openJournal({ dir, ...opts });
    assert.equal(again.j.window().earliest, live, "the same earliest point after the restart");
    assert.equal(again.j.listBookmarks().get("b"), b, "the bookmark survives the restart");
  });

  void test("age retention passes an empty sealed segment (left by a stop and restart) instead of stopping at it", async () => {
    const W = 20;
    const { j, dir } = await openJournal({ windowMs: W, segmentBytes: SMALL_SEG, retentionMs: 100 });
    const internals = j as unknown as { stop(e: Error): void; tryRestart(t: NodeJS.Timeout): Promise<void> };
    internals.stop(Object.assign(new Error("No space left on device"), { code: "ENOSPC" }));
    const timer = setInterval(() => {}, 1e6);
    await internals.tryRestart(timer); // segment 1 is sealed empty, 2 takes the images
    clearInterval(timer);
    for (let i = 0; i < 40; i++) await commitImages(j, [i]); // several segments
    const before = segmentFiles(dir);
    assert.ok(before.length >= 3 && before[0] === "0000000001.seg", before.join(" "));
    await sleep(250);
    j.enforceRetention();
    const after = segmentFiles(dir);
    assert.ok(!after.includes("0000000001.seg"), `the empty segment is still there: ${after.join(" ")}`);
    assert.equal(after.length, 1, `segments past the age limit are dropped too: ${after.join(" ")}`);
  });

  void test("a stop the state file cannot record refuses changes (EIO) until it can: a restart must not offer the points it spoiled", async () => {
    // Found with a failing disk: the journal stopped, could not write its state file, writes went
    // on unjournaled, and after a restart snap@ a point before the stop served data written after.
    const dir = scratch();
    const { j, lines } = await openJournal({ dir });
    await commitImages(j, [1]);
    rmSync(join(dir, "state"));
    mkdirSync(join(dir, "state")); // the state file cannot be written now
    const internals = j as unknown as { stop(e: Error): void };
    internals.stop(Object.assign(new Error("fdatasync failed: EIO"), { code: "EIO" }));
    assert.equal(j.running, false);
    assert.equal(j.unjournaledRefusal()?.code, "EIO", "a change is refused while the stop is unrecorded");
    assert.ok(
      lines.some((l) => /JOURNAL STOPPED.*cannot record the stop.*REFUSED/.test(l)),
      lines.join(""),
    );
    rmSync(join(dir, "state"), { recursive: true });
    writeFileSync(join(dir, "state"), Buffer.alloc(4096, 0x20));
    assert.equal(j.unjournaledRefusal()?.code, "EIO", "retried at most once a second");
    await sleep(1100);
    assert.equal(j.unjournaledRefusal(), null, "recorded now: changes go on, unjournaled");
    assert.match(readFileSync(join(dir, "state"), "utf8"), /stoppedAt/);
    await j.close();
    const { j: j2 } = await openJournal({ dir });
    assert.equal(j2.window().earliest, null, "no point before the reopen is offered");
    await j2.close();
  });

  void test("a sealed segment's entries stamped after the next segment began are garbage, not indexed", async () => {
    const dir = scratch();
    const { j } = await openJournal({ dir, segmentBytes: SMALL_SEG, windowMs: 60_000 });
    await commitImages(j, [1, 2, 3]);
    await commitImages(
      j,
      Array.from({ length: 14 }, (_, k) => 10 + k),
    ); // rolls over to segment 2
    await j.close();
    const files = segmentFiles(dir);
    assert.ok(files.length >= 2, "two segments");
    // What a record torn when the journal stopped can hold: an entry stamped far in the future.
    const first = join(dir, files[0]);
    const rec = recordsOf(first)[0];
    assert.equal(rec.count, 3);
    const fd = openSync(first, "r+");
    const ts = Buffer.alloc(8);
    ts.writeDoubleLE(journalNow() + 3600_000);
    writeSync(fd, ts, 0, 8, rec.at + RECORD_HEADER + 24 * 2 + 8); // entry 2's timestamp
    closeSync(fd);
    const limit = journalNow();
    const { j: j2 } = await openJournal({ dir, segmentBytes: SMALL_SEG, windowMs: 60_000 });
    const x = copyIndex(j2);
    assert.ok(
      x.ts.every((t) => t < limit),
      `an entry stamped in the future was indexed: ${x.ts.join(",")}`,
    );
    await j2.close();
  });
});

void describe("Journal: retention", () => {
  /** Commit `n` single-segment batches (10 data images each), each in its own window. */
  async function fill(j: Journal, n: number, W: number, base = 0): Promise<void> {
    for (let k = 0; k < n; k++) {
      await commitImages(
        j,
        Array.from({ length: 10 }, (_, i) => base + k * 10 + i),
      );
      await sleep(W + 2);
    }
  }

  void test("by size: the oldest segments go, files and all; the earliest point moves past them", async () => {
    const W = 20;
    const maxBytes = 200 * 1024;
    const { j, dir, lines } = await openJournal({ windowMs: W, segmentBytes: SMALL_SEG, maxBytes });
    await fill(j, 12, W);
    const before = copyIndex(j);
    const earliestBefore = j.window().earliest!;
    assert.ok(j.bytes > maxBytes, "the test must overfill the journal");
    j.enforceRetention();
    assert.ok(j.bytes <= maxBytes, `${j.bytes} bytes left, over ${maxBytes}`);
    assert.ok(j.bytes > maxBytes - SMALL_SEG, `retention dropped more than needed (${j.bytes} bytes left)`);
    assert.equal(segmentFiles(dir).length, j.segmentCount, "dropped segment files are removed");
    const first = j.index.first;
    assert.ok(first > 0, "nothing dropped");
    assert.equal(
      j.index.segAt(first),
      Number(segmentFiles(dir)[0].slice(0, 10)),
      "index.first is the oldest segment's first entry",
    );
    let newestDropped = 0;
    for (let i = 0; i < first; i++) newestDropped = Math.max(newestDropped, before.ts[i]);
    const expected = Math.max(earliestBefore, Math.floor(newestDropped / W) * W + W);
    assert.equal(j.window().earliest, expected, "earliest point after dropping");
    for (let i = first; i < j.index.length; i++) assert.ok(j.index.tsAt(i) >= newestDropped);
    assert.ok(j.index.firstAtOrAfter(0) >= first, "searches never return dropped entries");
    await assert.rejects(j.readImage(0, Buffer.alloc(BS)), /dropped/);
    assert.ok(
      lines.some((l) => /journal: dropped segment 1; points in time from /.test(l)),
      lines.join(""),
    );
    await j.close();
  });

  void test("after a bookmark's cut, the earliest point is the end of the dropped window, and later bookmarks stay", async () => {
    const W = 1000;
    const { j } = await openJournal({
      windowMs: W,
      segmentBytes: SMALL_SEG,
      maxBytes: (SMALL_SEG * 3) / 4,
    });
    // A window g after the first point, entered late (600 ms in), so that a bookmark there plus W
    // lies well inside the next window.
    let g = 0;
    for (;;) {
      const now = journalNow();
      g = Math.floor(now / W) * W;
      const into = now - g;
      if (j.window().earliest !== null && g >= j.window().earliest! && into >= 600 && into < 700) break;
      await sleep(into < 600 ? 600 - into : W - into + 600);
    }
    j.mark("cut");
    await commitImages(
      j,
      Array.from({ length: 10 }, (_, i) => i),
    ); // segment 1: after the cut, window g
    await sleep(g + W + 100 - journalNow());
    const victim = j.mark("victim"); // in the next window, before cut + W
    assert.ok(victim > g + W && victim < j.listBookmarks().get("cut")! + W, "the test's timing is off");
    await commitImages(
      j,
      Array.from({ length: 10 }, (_, i) => 100 + i),
    ); // segment 2
    assert.equal(j.segmentCount, 2);
    j.enforceRetention();
    assert.equal(j.segmentCount, 1, "segment 1 dropped");
    assert.equal(
      j.window().earliest,
      g + W,
      "the earliest point is the end of the window segment 1 ended in",
    );
    assert.equal(j.listBookmarks().get("victim"), victim, "a bookmark after that point stays");
    assert.equal(j.listBookmarks().has("cut"), false, "the bookmark before it expired");
    await j.close();
  });

  void test("a segment whose fdatasync is still in flight is not dropped until it is done", async () => {
    const { j, dir } = await openJournal({ windowMs: 60_000, segmentBytes: SMALL_SEG, maxBytes: 1 });
    // Hold the first fdatasync from here on (round A's, of segment 1); the others pass.
    const syncs = holdSyncs((n) => n === 0);
    try {
      const s = j.openSession("s");
      const stage = (from: number): void => {
        for (let b = from; b < from + 10; b++) {
          const ts = journalNow();
          assert.ok(j.needsImage(b, ts, s));
          j.stage(s, b, ts, randomBytes(BS));
        }
      };
      stage(0);
      const a = j.commit();
      await until("round A never reached its fdatasync", () => syncs.held.length === 1);
      const held = syncs.held[0];
      assert.equal(held.waiting, 1, "round A never reached its fdatasync");
      // Round B does not fit segment 1: it rolls over to segment 2 while A still syncs segment 1.
      stage(10);
      const b = j.commit();
      await until("round B's records were not written", () => j.index.length >= 20);
      assert.equal(j.segmentCount, 2);
      assert.equal(j.index.length, 20, "round B's records were not written");
      j.enforceRetention();
      assert.deepEqual(
        segmentFiles(dir),
        ["0000000001.seg", "0000000002.seg"],
        "dropped a segment being synced",
      );
      held.release();
      await Promise.all([a, b]);
      assert.ok(j.running, "the journal stopped: a round's fdatasync failed");
      j.enforceRetention();
      assert.deepEqual(segmentFiles(dir), ["0000000002.seg"], "the synced segment is dropped once done");
    } finally {
      syncs.restore();
    }
    await j.close();
  });

  void test("by age: segments whose newest entry is older than the retention go", async () => {
    const W = 20;
    const R = 600;
    const { j, dir } = await openJournal({ windowMs: W, segmentBytes: SMALL_SEG, retentionMs: R });
    await fill(j, 4, W);
    const oldCount = j.index.length;
    await sleep(R + 200);
    await fill(j, 3, W, 1000);
    // Which segments are too old, from the index: newest entry per segment.
    const newest = new Map<number, number>();
    for (let i = 0; i < j.index.length; i++) {
      const s = j.index.segAt(i);
      newest.set(s, Math.max(newest.get(s) ?? 0, j.index.tsAt(i)));
    }
    const cutoff = journalNow() - R;
    const segs = [...newest.keys()].sort((a, b) => a - b);
    const old = segs.filter((s) => newest.get(s)! < cutoff - 100);
    const recent = segs.filter((s) => newest.get(s)! > cutoff + 100);
    assert.equal(old.length + recent.length, segs.length, "a segment's age is too close to the cutoff");
    assert.ok(old.length >= 3, `only ${old.length} old segments`);
    j.enforceRetention();
    const files = segmentFiles(dir).map((f) => Number(f.slice(0, 10)));
    for (const s of old) assert.ok(!files.includes(s), `segment ${s} is older than the retention but kept`);
    for (const s of recent) assert.ok(files.includes(s), `segment ${s} is recent but dropped`);
    assert.equal(j.index.first, oldCount, "the first kept entry is the first of the recent batches");
    await j.close();
  });

  /**
   * A journal of 3 + 5 single-segment batches, a view "late" at a point inside the fourth batch's
   * window (it needs segments 4.. only: pinnedSeg) and a view "early" at the earliest point.
   */
  async function twoViews(): Promise<{
    j: Journal;
    dir: string;
    lines: string[];
    point: number;
    late: SnapshotView;
    early: SnapshotView;
    pinnedSeg: number;
  }> {
    const W = 20;
    const { j, dir, lines } = await openJournal({ windowMs: W, segmentBytes: SMALL_SEG });
    const primary = new MemoryVolume(VOLUME);
    await sleep(W + 5);
    await fill(j, 3, W);
    const pointTs = journalNow();
    const point = j.pointOf(pointTs);
    await sleep(W - (pointTs % W) + 2);
    await fill(j, 5, W, 100);
    const late = new SnapshotView(j, primary, point, "late");
    late.open();
    const pinnedSeg = j.index.segAt(j.index.firstAtOrAfter(point));
    assert.ok(pinnedSeg >= 4, `pinned segment ${pinnedSeg}`);
    const early = new SnapshotView(j, primary, j.window().earliest!, "early");
    early.open();
    return { j, dir, lines, point, late, early, pinnedSeg };
  }

  void test("an open snapshot view holds back the age limit; closing it lets retention go on", async () => {
    const { j, dir, lines, point, late, early, pinnedSeg } = await twoViews();
    (j as unknown as { o: { retentionMs: number } }).o.retentionMs = 1; // every sealed segment is too old
    j.enforceRetention();
    assert.equal(segmentFiles(dir)[0], "0000000001.seg", "a segment the early view reads was dropped");
    assert.ok(
      lines.some((l) => /retention waits for an open snapshot \(segment 1\)/.test(l)),
      lines.join(""),
    );
    await early.close();
    j.enforceRetention();
    const files = segmentFiles(dir).map((f) => Number(f.slice(0, 10)));
    assert.equal(files[0], pinnedSeg, "retention should stop exactly at the late view's first segment");
    // The late view still reads its images: block 100 was first overwritten after its point.
    const b = Buffer.alloc(BS);
    await late.read(b, 100 * BS);
    const i = j.index.firstAtOrAfter(point);
    const want = Buffer.alloc(BS);
    for (let k = i; k < j.index.length; k++) {
      if (j.index.blockAt(k) === 100) {
        await j.readImage(k, want);
        break;
      }
    }
    assert.deepEqual(b, want);
    await late.close();
    j.enforceRetention();
    assert.equal(j.segmentCount, 1, "only the newest segment is left");
    await j.close();
  });

  void test("over --pit-max-bytes, the open snapshots that hold the oldest segment are revoked (reads fail with EIO), once their reads in flight are done", async () => {
    const { j, dir, lines, late, early, pinnedSeg } = await twoViews();
    // A read of the early view in flight on the pool when it is revoked: held here.
    const internals = j as unknown as {
      o: { maxBytes: number };
      pins: Map<object, unknown>;
      segments: Map<number, { size: number }>;
      readImage: Journal["readImage"];
    };
    const realRead = internals.readImage.bind(j);
    let releaseRead!: () => void;
    const held = new Promise<void>((r) => (releaseRead = r));
    internals.readImage = (i, buf, within) => {
      internals.readImage = realRead;
      return held.then(() => realRead(i, buf, within));
    };
    const inFlight = early.read(Buffer.alloc(BS), 0); // block 0: an image in segment 1
    // The limit: what the late view's segments hold, so that it keeps them.
    let keep = 0;
    for (const [n, seg] of internals.segments) if (n >= pinnedSeg) keep += seg.size;
    internals.o.maxBytes = keep;
    j.enforceRetention();
    assert.match(lines.join(""), /revoking snapshot .* which holds the oldest segment \(1\)/);
    await assert.rejects(early.read(Buffer.alloc(BS), 0), {
      code: "EIO",
      message: /revoked: the journal reached --pit-max-bytes/,
    });
    await assert.rejects(early.extents(0, BS), { code: "EIO" }, "extents of a revoked view");
    assert.equal(segmentFiles(dir)[0], "0000000001.seg", "segment 1 went while a read of it was in flight");
    assert.ok(internals.pins.has(early), "the revoked view unpins only once its read is done");
    releaseRead();
    await assert.rejects(inFlight, { code: "EIO" }, "the read in flight fails too: the view was revoked");
    assert.ok(!internals.pins.has(early));
    j.enforceRetention();
    assert.ok(j.bytes <= keep, `${j.bytes} bytes left, over ${keep}`);
    assert.equal(
      Number(segmentFiles(dir)[0].slice(0, 10)),
      pinnedSeg,
      "dropped down to the late view's segments",
    );
    assert.ok(internals.pins.has(late), "the late view holds no segment retention needs: not revoked");
    const b = Buffer.alloc(BS);
    await late.read(b, 100 * BS); // still reads (block 100 was first overwritten after its point)
    await early.close();
    await late.close();
    await j.close();
  });
});

void describe("Journal: bookmarks", () => {
  void test("names are validated", async () => {
    const W = 50;
    const { j } = await openJournal({ windowMs: W });
    await sleep(2 * W);
    for (const bad of ["", "-x", ".x", "a b", "a/b", "snap@x", "x".repeat(65), "é", "a\n"]) {
      assert.throws(() => j.mark(bad), /must be 1-64 letters/, `"${bad}" accepted`);
    }
    assert.throws(() => j.mark("-x"), /beginning with a letter or digit/);
    assert.throws(
      () => j.mark("y".repeat(5000)),
      (e: Error) => e.message.includes('..." (5000 characters) must be') && e.message.length < 300,
      "a long name is shown cut short",
    );
    for (const good of ["a", "before", "A.b_c:d-9", "9", "x".repeat(64)]) {
      assert.ok(j.mark(good) > 0, `"${good}" refused`);
    }
    assert.equal(j.listBookmarks().size, 5);
    // A name that snap@NAME would read as a time is refused (the export could never be opened).
    for (const timeLike of ["2020-01-01", "2026-11-22T10:00:00Z"]) {
      assert.throws(() => j.mark(timeLike), new RegExp(timeLike), `"${timeLike}" accepted`);
    }
    assert.equal(j.listBookmarks().size, 5);
    await j.close();
  });

  void test("marking records now (or a given time) durably; bookmarks survive a reopen", async () => {
    const W = 50;
    const dir = scratch();
    const { j } = await openJournal({ dir, windowMs: W });
    await sleep(2 * W);
    const t0 = journalNow();
    const t = j.mark("before");
    assert.ok(t >= t0 && t <= journalNow());
    const given = journalNow() - 1;
    assert.equal(j.mark("given", given), given);
    assert.throws(
      () => j.mark("before", t + 1),
      (e: Error & { code?: string }) =>
        e.code === "ERR_USAGE" &&
        e.message.includes(`bookmark "before" exists (at ${new Date(t).toISOString()})`) &&
        e.message.includes("--replace"),
      "marking a name again without replace must be refused",
    );
    assert.equal(j.listBookmarks().get("before"), t, "a refused mark moved the bookmark");
    assert.equal(j.mark("before", t + 1, { replace: true }), t + 1, "replace moves it");
    const file = JSON.parse(readFileSync(join(dir, "bookmarks.json"), "utf8")) as Record<string, number>;
    assert.deepEqual(file, { before: t + 1, given });
    await j.close();
    const { j: j2 } = await openJournal({ dir, windowMs: W });
    assert.deepEqual(
      [...j2.listBookmarks()],
      [
        ["before", t + 1],
        ["given", given],
      ],
    );
    await j2.close();
  });

  void test("a bookmark expires when retention drops the window it needs", async () => {
    const W = 20;
    const dir = scratch();
    const { j, lines } = await openJournal({
      dir,
      windowMs: W,
      segmentBytes: SMALL_SEG,
      maxBytes: 100 * 1024,
    });
    await sleep(W + 5);
    j.mark("old");
    await sleep(W + 2);
    for (let k = 0; k < 6; k++) {
      await commitImages(
        j,
        Array.from({ length: 10 }, (_, i) => k * 10 + i),
      );
      await sleep(W + 2);
    }
    j.mark("new");
    j.enforceRetention();
    assert.deepEqual([...j.listBookmarks().keys()], ["new"]);
    assert.deepEqual(Object.keys(JSON.parse(readFileSync(join(dir, "bookmarks.json"), "utf8")) as object), [
      "new",
    ]);
    assert.ok(
      lines.some((l) => /bookmark "old" expired/.test(l)),
      lines.join(""),
    );
    await j.close();
  });

  void test("marking before the first point exists is refused with the reason", async () => {
    const W = 60_000;
    const { j } = await openJournal({ windowMs: W });
    // The first exact point is the next minute boundary: nothing can be marked before it.
    assert.equal(j.window().earliest, null);
    assert.throws(
      () => j.mark("early"),
      (e: Error) => {
        assert.doesNotMatch(
          e.message,
          /stopped/,
          "the journal is running; the refusal should say that no point exists yet, not that it stopped",
        );
        return true;
      },
    );
    await j.close();
  });
});

void describe("Journal: wall time that passed twice", () => {
  /** What the clock reports to the journal (clock.ts) when the wall clock went back `by` ms at `at`. */
  const stepBack = (j: Journal, at: number, by: number): void =>
    (j as unknown as { clockStepped(s: ClockStep): void }).clockStepped({ at, by: -by, holdUntil: at + by });

  void test("a step back is recorded, refused by time, kept across a reopen, at most 32 kept", async () => {
    const { j, dir, lines } = await openJournal({ windowMs: 50 });
    const now = journalNow();
    assert.deepEqual(j.passedTwice(), []);
    stepBack(j, now, 60_000);
    assert.ok(
      lines.some((l) =>
        /the wall clock went back 60\.0 s .*snap@ a time that passes twice is refused/.test(l),
      ),
    );
    assert.deepEqual(j.passedTwiceAt(now + 30_000), [now, now + 60_000]);
    assert.equal(j.passedTwiceAt(now - 1), null);
    assert.equal(j.passedTwiceAt(now + 60_001), null);
    await j.close();
    const again = await openJournal({ dir, windowMs: 50 });
    assert.deepEqual(again.j.passedTwice(), [[now, now + 60_000]], "kept in the state file");
    for (let i = 1; i <= 40; i++) stepBack(again.j, now + i * 100_000, 1000);
    const kept = again.j.passedTwice();
    assert.equal(kept.length, 32);
    assert.deepEqual(kept[31], [now + 4_000_000, now + 4_001_000], "the newest are kept");
  });

  void test("a step back under a second is recorded too, and a window start in a range that passed twice is refused", async () => {
    // Found by a review: steps under 1 s were not reported (a 100 ms window passes twice in a
    // 600 ms step back), and only t itself was checked, not the window start snap@t shows.
    const { j, lines } = await openJournal({ windowMs: 100 });
    const now = journalNow();
    stepBack(j, now, 600);
    assert.deepEqual(j.passedTwice(), [[now, now + 600]]);
    assert.ok(!lines.some((l) => /warn .*went back/.test(l)), "not worth a warning");
    assert.deepEqual(j.passedTwiceAt(now - 50, now + 1000), [now, now + 600], "a range meeting [point, t]");
    assert.equal(j.passedTwiceAt(now + 601, now + 1000), null);
    await j.close();
  });
});

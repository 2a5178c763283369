// src/pit/snapshot.ts (SnapshotView, the pointer-map view) over src/pit/filter.ts (the journal
// filter) with MemoryVolume and FileVolume primaries, no NBD. A seeded model writes phases of
// aligned and unaligned writes, trims and zero writes (with and without mayTrim) from several
// sessions at once; after each phase it waits past a merge-window boundary and keeps a copy of the
// model as the reference of that point. Every point's view must read exactly its reference, whole
// and at unaligned offsets, also for blocks first overwritten after the view was opened, and its
// extents must agree with what it reads. Views refuse every write-type call with EPERM. The index
// must stay in timestamp order under concurrent writes. And the time to open a view over
// 1,000,000 journal entries is measured (the issue's goal: under 1 s).

import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readlinkSync, readSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { performance } from "node:perf_hooks";
import { Journal, MAX_IN_WINDOW } from "../../src/pit/journal.js";
import { journalNow } from "../../src/pit/clock.js";
import { journalVolume } from "../../src/pit/filter.js";
import { SnapshotView } from "../../src/pit/snapshot.js";
import { parseSnapTime, SnapshotProvider } from "../../src/pit/provider.js";
import { Gate } from "../helpers/gate.js";
import { BlockFile, cacheVisible, isCached } from "../../src/blockio/index.js";
import { BlockMap, DENSE_AT } from "../../src/pit/blockmap.js";
import { MemoryVolume } from "../../src/volume/memory.js";
import { FileVolume } from "../../src/volume/file.js";
import { FilterVolume } from "../../src/volume/filter.js";
import type { PieceLease, Volume, ZeroOptions } from "../../src/volume/volume.js";
import type { OpenExport } from "../../src/nbd/exports.js";
import {
  infoRequestData,
  isOptionError,
  metaContextData,
  startTestServer,
  type RawClient,
} from "../helpers/raw-client.js";
import { NotSupportedError } from "../../src/errors.js";
import { Logger } from "../../src/log.js";

const BS = 4096;
const KiB = 1024;
const MiB = 1024 * KiB;
const log = Logger.create("error", () => {});

const cleanups: (() => Promise<void> | void)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

/** dist/, in the repository: a disk filesystem (page-cache eviction works there, not on tmpfs). */
const REPO_DIR = fileURLToPath(new URL("../..", import.meta.url));

function scratch(base = tmpdir()): string {
  const d = mkdtempSync(join(base, "bf-pit-snap-"));
  cleanups.push(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Sleep until `margin` ms after the next window boundary of the journal clock. */
async function nextWindow(windowMs: number, margin = 3): Promise<void> {
  await sleep(Math.ceil(windowMs - (journalNow() % windowMs)) + margin);
}

/** A seeded PRNG (mulberry32) so that a failure can be replayed. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const sha = (b: Uint8Array): string => createHash("sha256").update(b).digest("hex").slice(0, 16);

interface Rig {
  primary: Volume;
  journal: Journal;
  stack: Volume;
  close(): Promise<void>;
}

async function rig(kind: "memory" | "file", size: number, windowMs: number, base?: string): Promise<Rig> {
  const dir = scratch(base);
  const primary: Volume =
    kind === "memory"
      ? new MemoryVolume(size)
      : FileVolume.open(join(dir, "disk.img"), { create: true, size });
  const journal = await Journal.open({ dir: join(dir, "journal"), volumeSize: size, windowMs, log });
  const stack = journalVolume(primary, journal);
  let closed = false;
  const close = async (): Promise<void> => {
    if (closed) return;
    closed = true;
    await journal.close();
    await primary.close();
  };
  cleanups.push(close);
  return { primary, journal, stack, close };
}

/** A 1 MiB rig (50 ms windows) filled with random data, past the window of that write. */
async function filledRig(kind: "memory" | "file", base?: string): Promise<{ r: Rig; old: Buffer }> {
  const r = await rig(kind, MiB, 50, base);
  const old = randomBytes(MiB);
  await r.stack.write(old, 0, false);
  await nextWindow(50);
  return { r, old };
}

type Op =
  | { kind: "write"; offset: number; data: Buffer }
  | { kind: "trim"; offset: number; length: number }
  | { kind: "zero"; offset: number; length: number; mayTrim: boolean };

/** Random non-overlapping operations (so that running them at once has one outcome). */
function randomOps(rnd: () => number, size: number, n: number): Op[] {
  const taken: [number, number][] = [];
  const ops: Op[] = [];
  for (let tries = 0; ops.length < n && tries < n * 20; tries++) {
    const r = rnd();
    const aligned = rnd() < 0.5;
    let length = aligned ? BS * (1 + Math.floor(rnd() * 24)) : 1 + Math.floor(rnd() * 3 * BS);
    if (rnd() < 0.15) length = 512 * (1 + Math.floor(rnd() * 8));
    let offset = aligned ? BS * Math.floor(rnd() * (size / BS)) : Math.floor(rnd() * size);
    if (rnd() < 0.15) offset = 512 * Math.floor(rnd() * (size / 512));
    length = Math.min(length, size - offset);
    if (length <= 0) continue;
    if (taken.some(([a, b]) => offset < b && a < offset + length)) continue;
    taken.push([offset, offset + length]);
    if (r < 0.6) ops.push({ kind: "write", offset, data: randomBytes(length) });
    else if (r < 0.8) ops.push({ kind: "trim", offset, length });
    else ops.push({ kind: "zero", offset, length, mayTrim: rnd() < 0.5 });
  }
  return ops;
}

function applyToModel(model: Buffer, op: Op): void {
  if (op.kind === "write") op.data.copy(model, op.offset);
  else model.fill(0, op.offset, op.offset + op.length);
}

function applyToVolume(v: Volume, op: Op): Promise<void> {
  if (op.kind === "write") return v.write(op.data, op.offset, false);
  if (op.kind === "trim") return v.trim(op.offset, op.length, false);
  return v.zero(op.offset, op.length, { mayTrim: op.mayTrim });
}

/** Read a whole volume. */
async function readAll(v: Volume): Promise<Buffer> {
  const out = Buffer.alloc(v.size);
  for (let at = 0; at < v.size; at += MiB) await v.read(out.subarray(at, Math.min(at + MiB, v.size)), at);
  return out;
}

/** The bytes a lent read stands for: its copy if the view made one, else its pieces. */
function lentBytes(l: PieceLease): Buffer {
  if (l.data !== null) return l.data;
  const out = Buffer.alloc(l.length);
  let at = 0;
  for (let i = 0; i < l.pieces.length; i += 3) {
    const [fd, off, len] = [l.pieces[i], l.pieces[i + 1], l.pieces[i + 2]];
    if (fd >= 0) readSync(fd, out, at, len, off);
    at += len;
  }
  return out;
}

/** Where two buffers first differ, for failure messages. */
function firstDiff(a: Buffer, b: Buffer): string {
  for (let i = 0; i < a.length; i++) {
    if (a[i] !== b[i]) {
      const blk = Math.floor(i / BS);
      return `first difference at byte ${i} (block ${blk}): ${sha(a.subarray(blk * BS, blk * BS + BS))} vs ${sha(b.subarray(blk * BS, blk * BS + BS))}`;
    }
  }
  return "no difference";
}

interface Point {
  t: number;
  ref: Buffer;
}

/** The extents of a view cover the range, and every run flagged ZERO reads as zeroes. */
const ZEROES = Buffer.alloc(MiB);

/** True when `b` is all zero bytes (a comparison a MiB at a time: `every` is slow over 100s of MiB). */
function allZero(b: Buffer): boolean {
  for (let at = 0; at < b.length; at += MiB) {
    const n = Math.min(MiB, b.length - at);
    if (b.compare(ZEROES, 0, n, at, at + n) !== 0) return false;
  }
  return true;
}

async function checkExtents(
  view: Volume,
  ref: Buffer,
  offset: number,
  length: number,
  what: string,
): Promise<void> {
  let pos = offset;
  while (pos < offset + length) {
    const ext = await view.extents(pos, offset + length - pos);
    assert.ok(ext.length > 0, `${what}: no extents at ${pos}`);
    for (const e of ext) {
      assert.ok(e.length > 0);
      if (e.flags & 2) {
        const zeroes = allZero(ref.subarray(pos, pos + e.length));
        assert.ok(
          zeroes,
          `${what}: extent [${pos}, +${e.length}) flagged ZERO (${e.flags}) but the snapshot has data there`,
        );
      }
      pos += e.length;
    }
  }
  assert.equal(pos, offset + length, `${what}: extents overrun the range`);
}

async function modelRun(kind: "memory" | "file", seed: number): Promise<void> {
  const SIZE = 4 * MiB;
  const W = 100;
  const rnd = prng(seed);
  const r = await rig(kind, SIZE, W);
  const sessions = [r.stack.openSession!("c1"), r.stack.openSession!("c2"), r.stack.openSession!("c3")];
  const model = Buffer.alloc(SIZE);
  const points: Point[] = [];
  // The first exact point: the window after the journal began. The volume is empty then.
  await sleep((r.journal.window().earliest ?? Math.ceil(journalNow() / W) * W) - journalNow() + 3);
  const t0 = journalNow();
  points.push({ t: t0, ref: Buffer.from(model) });

  const phase = async (n: number): Promise<void> => {
    const ops = randomOps(rnd, SIZE, n);
    await Promise.all(ops.map((op, i) => applyToVolume(sessions[i % sessions.length].volume, op)));
    for (const op of ops) applyToModel(model, op);
    await nextWindow(W);
    points.push({ t: journalNow(), ref: Buffer.from(model) });
  };
  for (let p = 0; p < 6; p++) await phase(40);
  assert.deepEqual(await readAll(r.primary), model, "the primary itself does not hold the model");

  const check = async (views: SnapshotView[], when: string): Promise<void> => {
    for (const [k, v] of views.entries()) {
      const { ref } = points[k];
      const got = await readAll(v);
      assert.ok(got.equals(ref), `seed ${seed}, ${kind}, point ${k} (${when}): ${firstDiff(got, ref)}`);
      // Unaligned reads inside and across blocks.
      for (let i = 0; i < 40; i++) {
        const off = Math.floor(rnd() * (SIZE - 3 * BS));
        const len = 1 + Math.floor(rnd() * 3 * BS);
        const b = Buffer.alloc(len, 0xcc);
        await v.read(b, off);
        assert.ok(
          b.equals(ref.subarray(off, off + len)),
          `seed ${seed}, point ${k}: read(${off}, ${len}) ${when}`,
        );
      }
      await checkExtents(v, ref, 0, SIZE, `seed ${seed}, point ${k} ${when}`);
      // Lent reads (zero-copy): what the pieces hold is the point's bytes. A view refuses to lend
      // (null: the caller copies) a piece that is not in the page cache. This host reclaims cold
      // page cache on its own (DAMON pageout), so a page can go missing at any time; the NBD layer
      // then has warmPieces read it back and asks again, and so does this test. Only a page evicted
      // again between the two calls (microseconds), on each try, leaves a refusal.
      let lends = 0;
      for (let i = 0; i < 20; i++) {
        const off = Math.floor(rnd() * (SIZE - 64 * KiB));
        const len = 1 + Math.floor(rnd() * 64 * KiB);
        let lease = v.lendPieces(off, len);
        // Up to three rounds of warm-then-lend: a page evicted again between the two calls is
        // rare, twice in a row under load it happened (18 of 20 lent in a fresh-clone run).
        for (let tries = 0; lease === null && tries < 3; tries++) {
          const warming = v.warmPieces(off, len);
          if (warming === null) break;
          await warming;
          lease = v.lendPieces(off, len);
        }
        if (lease === null) continue;
        lends++;
        const got = lentBytes(lease);
        lease.release();
        assert.ok(
          got.equals(ref.subarray(off, off + len)),
          `seed ${seed}, point ${k}: lent (${off}, ${len}) ${when}`,
        );
      }
      // Most must lend (a broken lend path lends none). Under load from other test files run in
      // parallel, 18 of 20 were lent twice on 24 Nov (after warming each three times); why the
      // last refusals stay is not known yet (docs/BENCHMARKS.md, "This host's memory").
      if (kind === "file") assert.ok(lends >= 16, `a FileVolume view lent ${lends} of 20 reads (${when})`);
    }
  };
  const views = points.map((p, k) => {
    const v = new SnapshotView(r.journal, r.primary, r.journal.pointOf(p.t), `p${k}`);
    v.open();
    return v;
  });
  await check(views, "right after opening");
  // Reads lent now and sent only after the changes below: each must still hold its point's bytes
  // (copied by the view before a block under it changed, or untouched).
  const lent: { k: number; off: number; lease: PieceLease }[] = [];
  for (const [k, v] of views.entries()) {
    for (let i = 0; i < 4; i++) {
      const off = Math.floor(rnd() * (SIZE - 256 * KiB));
      const lease = v.lendPieces(off, 256 * KiB);
      if (lease !== null) lent.push({ k, off, lease });
    }
  }
  // More changes after the views opened: blocks first overwritten now must keep their old contents.
  for (let p = 0; p < 2; p++) {
    const ops = randomOps(rnd, SIZE, 60);
    await Promise.all(ops.map((op, i) => applyToVolume(sessions[i % sessions.length].volume, op)));
    for (const op of ops) applyToModel(model, op);
  }
  if (kind === "file")
    assert.ok(
      lent.some((l) => l.lease.data !== null),
      "no lent read was copied: the test changed nothing under them",
    );
  for (const { k, off, lease } of lent) {
    const got = lentBytes(lease);
    lease.release();
    const want = points[k].ref.subarray(off, off + 256 * KiB);
    assert.ok(
      got.equals(want),
      `seed ${seed}, point ${k}: read lent at ${off} before the changes: ${firstDiff(got, want)}`,
    );
  }
  await check(views, "after more writes");
  for (const v of views) await v.close();
  for (const s of sessions) s.close();
  await r.close();
}

void describe("SnapshotView over the journal filter", () => {
  void test("MemoryVolume primary: every point reads its reference (seeded model)", async () => {
    await modelRun("memory", 1);
  });
  void test("FileVolume primary: every point reads its reference (seeded model)", async () => {
    await modelRun("file", 2);
  });

  void test("a block first overwritten after the view opened still reads its old contents", async () => {
    for (const kind of ["memory", "file"] as const) {
      const { r, old } = await filledRig(kind);
      const view = new SnapshotView(r.journal, r.primary, r.journal.pointOf(journalNow()), "v");
      assert.equal(view.open(), 0, "nothing changed since the point: the map is empty");
      // Block 7 changes now, block 9 partly, byte 100 of block 3, and the last block is trimmed.
      await r.stack.write(randomBytes(BS), 7 * BS, false);
      await r.stack.write(randomBytes(100), 9 * BS + 1000, false);
      await r.stack.write(Buffer.from([old[3 * BS + 100] ^ 0xff]), 3 * BS + 100, false);
      await r.stack.trim(MiB - BS, BS, false);
      assert.equal(view.journalBlocks, 4, `${kind}: the view maps the four changed blocks`);
      const got = await readAll(view);
      assert.ok(got.equals(old), `${kind}: ${firstDiff(got, old)}`);
      const part = Buffer.alloc(BS + 3);
      await view.read(part, 7 * BS - 1);
      assert.deepEqual(part, old.subarray(7 * BS - 1, 8 * BS + 2));
      await view.close();
      await r.close();
    }
  });

  void test("a bookmark shows every change made before it, also earlier in its merge window", async () => {
    // Merge windows of 2 s: the writes before and after the bookmark share one. The bookmark ends
    // the window, so the blocks written before it are imaged again after it.
    const W = 2000;
    const r = await rig("memory", MiB, W);
    const old = randomBytes(MiB);
    await r.stack.write(old, 0, false);
    await nextWindow(W);
    const t0 = journalNow();
    const before = randomBytes(2 * BS);
    await r.stack.write(before, 5 * BS, false); // blocks 5 and 6, imaged in this window already
    await r.primary.flush();
    const t = r.journal.mark("m");
    await r.stack.write(randomBytes(BS), 5 * BS, false); // both change again after the bookmark
    await r.stack.write(randomBytes(100), 6 * BS + 10, false);
    assert.equal(Math.floor(journalNow() / W), Math.floor(t0 / W), "the test ran over two windows");
    const view = new SnapshotView(r.journal, r.primary, t, "m"); // a bookmark's point is its time
    view.open();
    const want = Buffer.from(old);
    before.copy(want, 5 * BS);
    const got = await readAll(view);
    assert.ok(got.equals(want), `snap@m: ${firstDiff(got, want)}`);
    await view.close();
    await r.close();
  });

  void test("journal entry numbers past 2^32 (a long-running process): a view still reads the right images", async () => {
    // Entry numbers are never reused; a view's dense map chunks hold them less the view's base.
    const r = await rig("memory", 16 * MiB, 50);
    const idx = r.journal.index;
    idx.base = idx.first = idx.length = 2 ** 32 + 7; // as if 4 billion images had come and gone
    const old = randomBytes(16 * MiB);
    await r.stack.write(old, 0, false);
    await nextWindow(50);
    const view = new SnapshotView(r.journal, r.primary, r.journal.pointOf(journalNow()), "v");
    view.open();
    await r.stack.write(randomBytes(12 * MiB), 0, false); // 3072 blocks: the map chunk goes dense
    assert.ok(idx.length > 2 ** 32 + 3072);
    const got = await readAll(view);
    assert.ok(got.equals(old), firstDiff(got, old));
    await view.close();
    await r.close();
  });

  void test("a primary that throws instead of rejecting: the read rejects, it does not throw", async () => {
    const { r } = await filledRig("memory");
    class Throws extends FilterVolume {
      override read(): Promise<void> {
        throw new Error("thrown by the primary");
      }
    }
    const view = new SnapshotView(r.journal, new Throws(r.primary), r.journal.pointOf(journalNow()), "v");
    view.open();
    await r.stack.write(randomBytes(BS), 7 * BS, false); // block 7 reads from the journal
    let p: Promise<void> | undefined;
    assert.doesNotThrow(() => {
      p = view.read(Buffer.alloc(3 * BS), 7 * BS); // block 7 from the journal, then the primary
    });
    await assert.rejects(p!, /thrown by the primary/);
    await view.close();
    await r.close();
  });

  void test("a read whose first piece fails rejects only once its other pieces are done with the buffer", async () => {
    // The caller may give the buffer back (to a pool shared by every connection) as soon as the
    // read rejects: a piece still being read into it would write into someone else's memory.
    const { r } = await filledRig("memory");
    let lateDone = false;
    class Racy extends FilterVolume {
      override read(buf: Buffer, offset: number): Promise<void> {
        if (offset === 6 * BS) return sleep(5).then(() => Promise.reject(new Error("EIO, fast")));
        if (offset === 8 * BS)
          return sleep(100).then(() => {
            buf.fill(0xab);
            lateDone = true;
          });
        return this.next.read(buf, offset);
      }
    }
    const view = new SnapshotView(r.journal, new Racy(r.primary), r.journal.pointOf(journalNow()), "v");
    view.open();
    await r.stack.write(randomBytes(BS), 7 * BS, false); // block 7 from the journal, 6 and 8 from the primary
    await assert.rejects(view.read(Buffer.alloc(3 * BS), 6 * BS), /EIO, fast/);
    assert.ok(lateDone, "the read rejected while block 8 was still being read into the buffer");
    await view.close();
    await r.close();
  });

  void test("captures runs with gaps, asynchronous primary reads, and large runs over holes", async () => {
    // A primary whose reads finish on a later turn of the loop (a cache miss), so that capture
    // takes its asynchronous path between runs.
    class LateReads extends FilterVolume {
      override read(buf: Buffer, offset: number): Promise<void> {
        return new Promise<void>((r) => setImmediate(r)).then(() => this.next.read(buf, offset));
      }
    }
    for (const late of [false, true]) {
      const size = 8 * MiB;
      const dir = scratch();
      const mem = new MemoryVolume(size);
      const primary: Volume = late ? new LateReads(mem) : mem;
      const W = 1000;
      const journal = await Journal.open({ dir: join(dir, "journal"), volumeSize: size, windowMs: W, log });
      const stack = journalVolume(primary, journal);
      cleanups.push(() => journal.close());
      // [0, 3 MiB) and [5 MiB, 8 MiB) hold data, [3 MiB, 5 MiB) is a hole.
      const old = Buffer.alloc(size);
      randomBytes(3 * MiB).copy(old, 0);
      randomBytes(3 * MiB).copy(old, 5 * MiB);
      await stack.write(old.subarray(0, 3 * MiB), 0, false);
      await stack.write(old.subarray(5 * MiB), 5 * MiB, false);
      await nextWindow(W);
      const view = new SnapshotView(journal, primary, journal.pointOf(journalNow()), "v");
      view.open();
      const entries0 = journal.index.length;
      // Blocks 2 and 5 are imaged first, so the 8-block write needs runs [0,1], [3,4], [6,7].
      await stack.write(randomBytes(BS), 2 * BS, false);
      await stack.write(randomBytes(BS), 5 * BS, false);
      await stack.write(randomBytes(8 * BS), 0, false);
      // A 4 MiB trim over the hole: a large run (the holes asked first), then one more block. The
      // 512 blocks of the hole stay zeroes: they need no image, and stay unimaged in the window.
      await stack.trim(2 * MiB, 4 * MiB + BS, false);
      // So a write into the hole later in the window images its block (a zero image).
      await stack.write(randomBytes(BS), 4 * MiB, false);
      assert.equal(journal.pointOf(journalNow()), view.point, "the test ran past its merge window");
      const blocks = journal.index.length - entries0;
      assert.equal(
        blocks,
        8 + 513 + 1,
        `late=${late}: one image per changed data block, one for the hole's write`,
      );
      let zero = 0;
      for (let i = entries0; i < journal.index.length; i++) if (journal.index.offAt(i) < 0) zero++;
      assert.equal(zero, 1, `late=${late}: the hole's blocks get no image from the trim, one from the write`);
      const got = await readAll(view);
      assert.ok(got.equals(old), `late=${late}: ${firstDiff(got, old)}`);
      await view.close();
      await journal.close();
    }
  });

  void test("overlapping changes in flight together: each waits for the ones before it", async () => {
    // Reads of the primary finish on a later turn of the loop, so a change's capture is still
    // reading its old blocks when the next changes arrive. A change to a block whose image another
    // change claimed in this window needs no image of its own, but it must not reach the primary
    // before that capture has read the block: the image would then hold its data, not the old.
    class LateReads extends FilterVolume {
      override read(buf: Buffer, offset: number): Promise<void> {
        return new Promise<void>((r) => setImmediate(r)).then(() => this.next.read(buf, offset));
      }
    }
    const size = 1 * MiB;
    const dir = scratch();
    const mem = new MemoryVolume(size);
    const W = 1000;
    const journal = await Journal.open({ dir: join(dir, "journal"), volumeSize: size, windowMs: W, log });
    cleanups.push(() => journal.close());
    const stack = journalVolume(new LateReads(mem), journal);
    const old = randomBytes(size);
    await stack.write(old, 0, false);
    await nextWindow(W);
    const view = new SnapshotView(journal, mem, journal.pointOf(journalNow()), "v");
    view.open();
    // Blocks 0-1, then 1-2, then 1, then a trim of 2-3, then 0-3 again: all in flight at once.
    const changes = [
      stack.write(randomBytes(2 * BS), 0, false),
      stack.write(randomBytes(2 * BS), BS, false),
      stack.write(randomBytes(BS), BS, false),
      stack.trim(2 * BS, 2 * BS, false),
      stack.write(randomBytes(4 * BS), 0, false),
    ];
    await Promise.all(changes);
    assert.equal(journal.pointOf(journalNow()), view.point, "the test ran past its merge window");
    const got = await readAll(view);
    assert.ok(got.equals(old), firstDiff(got, old));
    await view.close();
  });

  void test("a block that gains a journal entry while its primary read is in flight reads its image", async () => {
    const { r, old } = await filledRig("memory");
    // The view reads through a primary whose reads wait for a gate and then read what is there.
    let open!: () => void;
    const gate = new Promise<void>((resolve) => (open = resolve));
    const slow = Object.create(r.primary) as Volume;
    slow.read = async (buf: Buffer, offset: number): Promise<void> => {
      await gate;
      await r.primary.read(buf, offset);
    };
    const view = new SnapshotView(r.journal, slow, r.journal.pointOf(journalNow()), "v");
    view.open();
    const got = Buffer.alloc(64 * KiB);
    const reading = view.read(got, 0); // blocks 0..15, all from the primary
    await r.stack.write(randomBytes(2 * BS), 5 * BS, false); // blocks 5 and 6 change meanwhile
    assert.equal(view.journalBlocks, 2);
    open();
    await reading;
    assert.ok(got.equals(old.subarray(0, 64 * KiB)), firstDiff(got, old.subarray(0, 64 * KiB)));
    await view.close();
    await r.close();
  });

  void test("a journal page evicted from the page cache: the other images of its segment still lend, and warmPieces brings it back", async () => {
    const { r, old } = await filledRig("file", REPO_DIR);
    const view = new SnapshotView(r.journal, r.primary, r.journal.pointOf(journalNow()), "v");
    view.open();
    // Images of block 2, then of blocks 16..31 (64 KiB), then of block 40: far apart in the segment.
    await r.stack.write(randomBytes(BS), 2 * BS, false);
    await r.stack.write(randomBytes(16 * BS), 16 * BS, false);
    await r.stack.write(randomBytes(BS), 40 * BS, false);
    const idx = r.journal.index;
    let e2 = -1;
    for (let i = idx.base; i < idx.length; i++) if (idx.blockAt(i) === 2) e2 = i;
    assert.ok(e2 >= 0, "block 2 has a journal entry");
    const segFd = r.journal.residentFd(e2, Number.NEGATIVE_INFINITY, 0, BS);
    assert.ok(segFd >= 0, `block 2's image is in a segment (${segFd})`);
    // Evict the pages of block 2's image (clean: the journal synced them), as memory pressure or
    // a host's proactive reclaim does. POSIX_FADV_DONTNEED through dd.
    const path = readlinkSync(`/proc/self/fd/${segFd}`);
    const at = idx.offAt(e2);
    const from = Math.floor(at / 4096) * 4096; // dd drops whole pages only
    const to = Math.ceil((at + BS) / 4096) * 4096;
    const dd = ["of=/dev/null", "iflag=nocache,skip_bytes,count_bytes", `skip=${from}`, `count=${to - from}`];
    execFileSync("dd", [`if=${path}`, ...dd, "status=none"]);
    // The rig lives under dist/ in the repository (a disk filesystem): tmpfs pages could not be evicted.
    assert.ok(!isCached(segFd, at, BS), `dd iflag=nocache evicted the pages of ${path}`);
    // Block 2's image is missing: [0, 64 KiB) is not lent. Block 40's image, in the same
    // segment, is cached: [128 KiB, 192 KiB) is lent (the whole segment is not cached any more).
    assert.equal(view.lendPieces(0, 64 * KiB), null, "a read over an evicted image is not lent");
    // This host also evicts pages by itself (DAMON pageout, see docs/BENCHMARKS.md): a read that
    // should lend is asked again after warming its own pieces, up to three times.
    const lendSoon = async (offset: number): Promise<PieceLease | null> => {
      let l = view.lendPieces(offset, 64 * KiB);
      for (let i = 0; l === null && i < 3; i++) {
        const w = view.warmPieces(offset, 64 * KiB);
        if (w !== null) await w;
        l = view.lendPieces(offset, 64 * KiB);
      }
      return l;
    };
    let b = view.lendPieces(128 * KiB, 64 * KiB);
    if (b === null) {
      b = await lendSoon(128 * KiB);
      assert.ok(!isCached(segFd, at, BS), "block 2's image stays evicted (the segment not wholly cached)");
    }
    assert.ok(b !== null, "one evicted page does not stop the other images of its segment from lending");
    const ref = Buffer.from(old);
    assert.ok(lentBytes(b).equals(ref.subarray(128 * KiB, 192 * KiB)));
    b.release();
    assert.equal(view.warmPieces(128 * KiB, 64 * KiB), null, "nothing to bring in for a read that lends");
    const warming = view.warmPieces(0, 64 * KiB);
    assert.ok(warming !== null, "warmPieces reads the missing image");
    await warming;
    assert.ok(isCached(segFd, at, BS), "block 2's image is back in the page cache");
    const a = view.lendPieces(0, 64 * KiB) ?? (await lendSoon(0));
    assert.ok(a !== null, "after warmPieces the read lends");
    assert.ok(
      lentBytes(a).equals(ref.subarray(0, 64 * KiB)),
      firstDiff(lentBytes(a), ref.subarray(0, 64 * KiB)),
    );
    a.release();
    // NBD_CMD_CACHE does the same: evict again, CACHE, and the read lends.
    execFileSync("dd", [`if=${path}`, ...dd, "status=none"]);
    assert.equal(view.lendPieces(0, 64 * KiB), null, "evicted again");
    assert.equal(view.caps().cache, true, "a snapshot advertises CACHE");
    await view.cache(0, 64 * KiB);
    const c = view.lendPieces(0, 64 * KiB) ?? (await lendSoon(0));
    assert.ok(c !== null, "after CACHE the read lends");
    c.release();
    await view.close();
    assert.equal(view.warmPieces(0, 64 * KiB), null, "a closed view brings nothing in");
    await r.close();
  });

  void test("lent pieces (zero-copy) hold the point's bytes; a lease over a block about to change is copied first", async () => {
    const { r, old } = await filledRig("file");
    const view = new SnapshotView(r.journal, r.primary, r.journal.pointOf(journalNow()), "v");
    view.open();
    // Journal images for blocks 2, 3 and 9 (9 a zero image: trimmed), then lend [0, 64 KiB) and
    // [128 KiB, 192 KiB).
    await r.stack.write(randomBytes(2 * BS), 2 * BS, false);
    await r.stack.trim(9 * BS, BS, false);
    const ref = Buffer.from(old);
    const a = view.lendPieces(0, 64 * KiB)!;
    const b = view.lendPieces(128 * KiB, 64 * KiB)!;
    assert.ok(a !== null && b !== null, "a cached FileVolume primary lends its reads");
    const assemble = (l: PieceLease): Buffer => lentBytes({ ...l, data: null });
    assert.ok(
      assemble(a).equals(ref.subarray(0, 64 * KiB)),
      firstDiff(assemble(a), ref.subarray(0, 64 * KiB)),
    );
    assert.ok(
      a.pieces.length / 3 >= 4,
      `primary, journal, primary, zero, primary pieces: ${a.pieces.join(",")}`,
    );
    // Block 5 (in lease a, read from the primary) changes now: a is copied before the write lands.
    await r.stack.write(randomBytes(BS), 5 * BS, false);
    assert.ok(a.data !== null, "the lease over block 5 was copied before the primary changed");
    assert.ok(a.data.equals(ref.subarray(0, 64 * KiB)), firstDiff(a.data, ref.subarray(0, 64 * KiB)));
    assert.equal(b.data, null, "a lease elsewhere is left alone");
    assert.ok(assemble(b).equals(ref.subarray(128 * KiB, 192 * KiB)));
    // Closing the view copies what is still lent (its journal segments may go once unpinned).
    await view.close();
    const copied = (l: PieceLease): Buffer | null => l.data; // read again: close() sets it
    assert.ok(copied(b)?.equals(ref.subarray(128 * KiB, 192 * KiB)));
    b.release();
    a.release();
    assert.equal(view.lendPieces(0, 4096), null, "a closed view lends nothing");
    await r.close();
  });

  void test("a block of a hole (zero image) changed after the point reads as zeroes", async () => {
    const W = 50;
    const r = await rig("memory", MiB, W);
    await nextWindow(W);
    const view = new SnapshotView(r.journal, r.primary, r.journal.pointOf(journalNow()), "v");
    view.open();
    // The first record holds a zero image, then data images (a block written before the point
    // in this window would not do: write two blocks, one on a hole, one on data).
    await r.stack.write(randomBytes(2 * BS), 4 * BS, false);
    const data = randomBytes(BS);
    await r.stack.write(data, 100 * BS, false);
    const got = await readAll(view);
    assert.ok(
      got.equals(Buffer.alloc(MiB)),
      `the view of an empty volume has data: ${firstDiff(got, Buffer.alloc(MiB))}`,
    );
    await view.close();
    await r.close();
  });

  void test("extents: journal blocks are data or zero by their image, the rest the primary's", async () => {
    const W = 50;
    const C = 64 * KiB; // MemoryVolume's allocation unit
    const r = await rig("memory", 16 * C, W);
    const a = randomBytes(C);
    await r.stack.write(a, 0, false); // chunk 0: data before the point
    await nextWindow(W);
    const view = new SnapshotView(r.journal, r.primary, r.journal.pointOf(journalNow()), "v");
    view.open();
    await r.stack.trim(0, BS, false); // a data block changes: a data image
    await r.stack.write(randomBytes(BS), C, false); // a hole changes: a zero image
    const ext = await view.extents(0, 3 * C);
    assert.deepEqual(ext, [
      { length: C, flags: 0 },
      { length: BS, flags: 2 },
      { length: C - BS, flags: 0 },
      { length: C, flags: 3 },
    ]);
    const ref = Buffer.alloc(3 * C);
    a.copy(ref, 0);
    await checkExtents(view, ref, 0, 3 * C, "extents");
    await view.close();
    await r.close();
  });

  void test("a view is read-only: write, trim and zero fail with EPERM (ERR_READ_ONLY)", async () => {
    const r = await rig("memory", MiB, 50);
    const view = new SnapshotView(r.journal, r.primary, r.journal.pointOf(journalNow()), "v");
    view.open();
    assert.equal(view.caps().readOnly, true);
    assert.equal(view.caps().trim, false);
    assert.equal(view.caps().zero, false);
    const v: Volume = view;
    for (const call of [
      () => v.write(Buffer.alloc(BS), 0, false),
      () => v.trim(0, BS, false),
      () => v.zero(0, BS, { mayTrim: true }),
    ]) {
      await assert.rejects(call(), (e: { code?: string; errno?: number }) => {
        assert.equal(e.code, "ERR_READ_ONLY");
        assert.equal(e.errno, 1); // EPERM
        return true;
      });
    }
    assert.deepEqual(await readAll(r.primary), Buffer.alloc(MiB), "a refused write reached the primary");
    await view.close();
    await r.close();
  });

  void test("the index stays in timestamp order under concurrent writes on a FileVolume", async () => {
    const W = 20;
    const r = await rig("file", 16 * MiB, W);
    const sessions = Array.from({ length: 4 }, (_, i) => r.stack.openSession!(`c${i}`));
    const rnd = prng(7);
    // Data first, so that later images need reads (async, on the pool) before they are staged.
    await r.stack.write(randomBytes(16 * MiB), 0, false);
    const deadline = Date.now() + 1500;
    let rounds = 0;
    while (Date.now() < deadline) {
      const ops = randomOps(rnd, 16 * MiB, 64);
      await Promise.all(ops.map((op, i) => applyToVolume(sessions[i % 4].volume, op)));
      rounds++;
    }
    const x = r.journal.index;
    let bad = "";
    for (let i = x.first + 1; i < x.length; i++) {
      if (x.tsAt(i) < x.tsAt(i - 1)) {
        bad = `entry ${i} (block ${x.blockAt(i)}, ts ${x.tsAt(i)}) is older than entry ${i - 1} (ts ${x.tsAt(i - 1)})`;
        break;
      }
    }
    assert.equal(bad, "", `${bad} after ${rounds} rounds; firstAtOrAfter's binary search assumes order`);
    for (const s of sessions) s.close();
    await r.close();
  });
});

void describe("a large change journaled in pieces, with small writes going on", () => {
  // A zero request of 64 MiB is captured and committed 32 MiB at a time; small writes on another
  // session commit in between. Every window boundary that falls inside the large request must
  // still show exactly the small writes completed before it (none begun after it), and the
  // index must stay in timestamp order (firstAtOrAfter is a binary search).
  void test(
    "points inside a long capture stay exact for the other session's writes",
    { timeout: 60_000 },
    async () => {
      const W = 20;
      const SIZE = 96 * MiB;
      const SMALL_AT = 80 * MiB; // the small writes go to [80 MiB, 96 MiB)
      for (let attempt = 0; ; attempt++) {
        const r = await rig("file", SIZE, W);
        const a = r.stack.openSession!("large");
        const b = r.stack.openSession!("small");
        for (let at = 0; at < SIZE; at += 8 * MiB) await r.stack.write(randomBytes(8 * MiB), at, false);
        const before = await readAll(r.primary);
        await nextWindow(W);
        // Small writes: block k of the region gets fresh data, one at a time, with their times.
        const small: { block: number; data: Buffer; start: number; end: number }[] = [];
        let largeDone = false;
        const largeStart = journalNow();
        const large = a.volume.zero(0, 64 * MiB, { mayTrim: true }).then(() => {
          largeDone = true;
        });
        for (let k = 0; !largeDone && k < (SIZE - SMALL_AT) / BS; k++) {
          const data = randomBytes(BS);
          const start = journalNow();
          await b.volume.write(data, SMALL_AT + k * BS, false);
          small.push({ block: SMALL_AT / BS + k, data, start, end: journalNow() });
          await sleep(1);
        }
        await large;
        const largeEnd = journalNow();
        const boundaries: number[] = [];
        for (let p = Math.ceil(largeStart / W) * W; p < largeEnd; p += W) boundaries.push(p);
        const x = r.journal.index;
        const order: string[] = [];
        for (let i = x.first + 1; i < x.length; i++) {
          if (x.tsAt(i) < x.tsAt(i - 1))
            order.push(
              `entry ${i} (block ${x.blockAt(i)}) is older than entry ${i - 1} (block ${x.blockAt(i - 1)})`,
            );
        }
        if (boundaries.length === 0 || small.length < 5) {
          // The machine was too fast for a boundary to fall inside the large request: try again.
          a.close();
          b.close();
          await r.close();
          assert.ok(attempt < 5, "no window boundary fell inside a 64 MiB zero request in 5 attempts");
          continue;
        }
        const wrong: string[] = [];
        for (const p of boundaries) {
          const view = new SnapshotView(r.journal, r.primary, p, `p${p}`);
          view.open();
          for (const w of small) {
            if (w.start < p && w.end > p) continue; // in flight at p: either contents will do
            const want = w.end < p ? w.data : before.subarray(w.block * BS, (w.block + 1) * BS);
            const got = Buffer.alloc(BS);
            await view.read(got, w.block * BS);
            if (!got.equals(want)) {
              wrong.push(
                `point ${p}: block ${w.block} (written ${w.start.toFixed(3)}..${w.end.toFixed(3)}) reads ${w.end < p ? "old" : "new"} contents`,
              );
            }
          }
          await view.close();
        }
        a.close();
        b.close();
        await r.close();
        // Entries may be appended out of timestamp order (a large change commits in rounds); the
        // index handles that (running maximum), so only the reads are asserted.
        assert.deepEqual(
          wrong.slice(0, 10),
          [],
          `${boundaries.length} boundaries inside the large request, ${small.length} small writes; ` +
            `${order.length} entries appended out of order (${order.slice(0, 2).join("; ")}), ${wrong.length} wrong reads`,
        );
        return;
      }
    },
  );
});

void describe("huge changes in one merge window", () => {
  // Found by a review: 19 trims of 4 GiB at once in a 300 s window imaged more blocks than V8's
  // Map holds (2^24): needsImage threw synchronously, the process died, and where it did not,
  // the throw left the blocks locked for good.
  void test(
    "a window that imaged MAX_IN_WINDOW blocks is cut short: the map stays bounded, every change completes",
    { timeout: 120_000 },
    async () => {
      const blocks = MAX_IN_WINDOW + MAX_IN_WINDOW / 4;
      const r = await rig("file", blocks * BS, 600_000);
      const j = r.journal as unknown as { inWindow: Map<number, number>; cuts: number[] };
      let most = 0;
      const zero = r.stack.zero(0, blocks * BS, { mayTrim: false }); // a zero image per block
      const watch = setInterval(() => (most = Math.max(most, j.inWindow.size)), 5);
      await zero;
      clearInterval(watch);
      most = Math.max(most, j.inWindow.size);
      assert.ok(most <= MAX_IN_WINDOW, `the window's map held ${most} blocks`);
      assert.ok(j.cuts.length >= 1, "the window was cut");
      await r.stack.write(randomBytes(BS), 0, false);
      // Every change is counted out under the window it was counted in, cut or not: a count left
      // over would hold every later snapshot's open for good.
      const changes = (r.journal as unknown as { changes: Map<number, unknown> }).changes;
      assert.equal(
        changes.size,
        0,
        `changes still counted in flight: ${JSON.stringify([...changes.keys()])}`,
      );
    },
  );

  void test("a FAST_ZERO the primary is known to refuse is refused before anything is journaled", async () => {
    // Found by a hunt: each refused FAST_ZERO journaled its whole range first (32 MiB for a 32 MiB
    // request), which could even push the journal over --pit-max-bytes and revoke snapshots.
    class NoFastZero extends FilterVolume {
      override zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
        if (opts.fast === true) return Promise.reject(new NotSupportedError("no fast zero here"));
        return this.next.zero(offset, length, opts);
      }
      override cannotZeroFast(): boolean {
        return true;
      }
    }
    const dir = scratch();
    const journal = await Journal.open({ dir, volumeSize: MiB, windowMs: 50, log });
    cleanups.push(() => journal.close());
    const stack = journalVolume(new NoFastZero(new MemoryVolume(MiB)), journal);
    await stack.write(randomBytes(MiB), 0, false);
    await nextWindow(50);
    const entries = journal.index.length;
    await assert.rejects(stack.zero(0, MiB, { mayTrim: false, fast: true }), NotSupportedError);
    assert.equal(journal.index.length, entries, "nothing journaled for a refused FAST_ZERO");
  });

  void test("a change whose imaging throws fails alone, and leaves its blocks unlocked", async () => {
    const r = await rig("memory", MiB, 50);
    const needsImage = r.journal.needsImage.bind(r.journal);
    r.journal.needsImage = () => {
      throw new RangeError("Map maximum size exceeded");
    };
    await assert.rejects(() => r.stack.write(randomBytes(BS), 0, false), RangeError);
    r.journal.needsImage = needsImage;
    const data = randomBytes(BS);
    const done = r.stack.write(data, 0, false);
    const late = setTimeout(() => assert.fail("a write to the block never completed: its lock leaked"), 5000);
    await done;
    clearTimeout(late);
    const b = Buffer.alloc(BS);
    await r.primary.read(b, 0);
    assert.ok(b.equals(data));
  });
});

void describe("a journal restart with an unjournaled change in flight", () => {
  /**
   * A 1 MiB file primary whose writes to offset 0 are held (a gate each) once `hold()` is called,
   * a journal (50 ms windows) stopped as by a full disk, and how to restart it.
   */
  async function stoppedJournal(): Promise<{
    journal: Journal;
    stack: Volume;
    provider: SnapshotProvider;
    gates: Gate[];
    hold(): void;
    restart(): Promise<number>;
  }> {
    const W = 50;
    const dir = scratch();
    const primary = FileVolume.open(join(dir, "disk.img"), { create: true, size: MiB });
    const journal = await Journal.open({ dir: join(dir, "journal"), volumeSize: MiB, windowMs: W, log });
    cleanups.push(async () => {
      await journal.close();
      await primary.close();
    });
    const gates: Gate[] = [];
    let held = false;
    class Slow extends FilterVolume {
      override write(buf: Buffer, offset: number, fua: boolean): Promise<void> {
        if (!held || offset !== 0) return this.next.write(buf, offset, fua);
        const g = new Gate();
        gates.push(g);
        return g.pass().then(() => this.next.write(buf, offset, fua));
      }
    }
    const stack = journalVolume(new Slow(primary), journal);
    const provider = new SnapshotProvider(
      journal,
      primary,
      { minimum: 1, preferred: 4096, maximum: 32 * MiB },
      log,
    );
    await nextWindow(W);
    const internals = journal as unknown as {
      stop(e: Error): void;
      tryRestart(t: NodeJS.Timeout): Promise<void>;
      earliestTs: number;
    };
    internals.stop(Object.assign(new Error("No space left on device"), { code: "ENOSPC" }));
    return {
      journal,
      stack,
      provider,
      gates,
      hold: () => (held = true),
      /** Restart the journal (space came back); wait past its first point, and return it. */
      restart: async () => {
        const timer = setInterval(() => {}, 1e6);
        await internals.tryRestart(timer);
        clearInterval(timer);
        assert.equal(journal.running, true);
        const point = internals.earliestTs;
        while (journalNow() < point + 2) await sleep(5);
        return point;
      },
    };
  }

  // Found by a review: a change made while the journal was stopped (disk full) and still in flight
  // when it restarted took no block lock, so a change journaled after the restart captured the
  // block before it landed, and snap@ the restart's first point lacked a change stamped before it.
  void test("a change journaled after the restart waits for it: snap@ the first point holds it", async () => {
    const j = await stoppedJournal();
    j.hold();
    const u = j.stack.write(Buffer.alloc(512, 0xaa), 0, false); // unjournaled, held on its way
    await until(() => j.gates.length === 1);
    const point = await j.restart();
    const jw = j.stack.write(Buffer.alloc(512, 0xbb), 512, false); // journaled, same block
    await sleep(20);
    j.gates[0].release();
    await Promise.all([u, jw]);
    await nextWindow(50);
    const o = await j.provider.open(`snap@${new Date(point).toISOString()}`);
    assert.ok("volume" in o, `refused: ${(o as { message: string }).message}`);
    const b = Buffer.alloc(1024);
    await o.volume.read(b, 0);
    assert.equal(b[0], 0xaa, "the change stamped before the point is in the snapshot");
    assert.equal(b[512], 0, "the change stamped after the point is not");
    await o.volume.close();
  });

  // Found by a review of that fix: a change that found the journal stopped and then waited for a
  // lock through the restart went in unjournaled after the restart's first point.
  void test("a change that waited for a lock while the journal restarted is journaled: an open view does not change", async () => {
    const j = await stoppedJournal();
    j.hold();
    const u = j.stack.write(Buffer.alloc(512, 0xaa), 0, false); // unjournaled, holds block 0's lock
    await until(() => j.gates.length === 1);
    const v = j.stack.write(Buffer.alloc(512, 0xcc), 0, false); // waits for the lock
    const point = await j.restart();
    j.gates[0].release(); // u lands; v gets the lock after the restart's first point
    await u;
    await until(() => j.gates.length === 2);
    await nextWindow(50);
    const o = await j.provider.open(`snap@${new Date(point).toISOString()}`);
    assert.ok("volume" in o, `refused: ${(o as { message: string }).message}`);
    const b = Buffer.alloc(512);
    await o.volume.read(b, 0);
    assert.equal(b[0], 0xaa);
    j.gates[1].release();
    await v;
    await o.volume.read(b, 0);
    assert.equal(b[0], 0xaa, "the open view changed: v went in unjournaled after the restart");
    await o.volume.close();
  });
});

void describe("SnapshotView: time to open over 1,000,000 journal entries", () => {
  void test("view.open() over 1,000,000 entries takes under 1 s", { timeout: 120_000 }, async (t) => {
    const N = 1_000_000;
    const dir = scratch();
    const size = 8 * 1024 * MiB; // 2M blocks: every entry a distinct block
    const journal = await Journal.open({ dir, volumeSize: size, windowMs: 1000, log });
    cleanups.push(() => journal.close());
    const s = journal.openSession("bulk");
    const built = performance.now();
    const start = journalNow();
    // Zero images (no data): 24 bytes each, 100,000 per commit.
    for (let c = 0; c < 10; c++) {
      for (let i = 0; i < N / 10; i++) journal.stage(s, 2 * (c * (N / 10) + i), journalNow(), null);
      await journal.commit();
    }
    const buildMs = performance.now() - built;
    assert.equal(journal.index.length, N);
    const primary = new MemoryVolume(size);
    const point = journal.pointOf(start);
    const times: number[] = [];
    let mapped = 0;
    for (let k = 0; k < 3; k++) {
      const view = new SnapshotView(journal, primary, point, `big${k}`);
      const t0 = performance.now();
      mapped = view.open();
      times.push(performance.now() - t0);
      await view.close();
    }
    assert.equal(mapped, N, "the view must map every entry (the point is before all of them)");
    const msg =
      `view.open() over ${N} entries: ${times.map((t) => t.toFixed(1)).join(" ms, ")} ms ` +
      `(first, then warm); building the journal took ${buildMs.toFixed(0)} ms`;
    t.diagnostic(msg);
    assert.ok(times[0] < 1000, msg);
    await journal.close();
  });
});

void describe("BlockMap (the pointer map's storage)", () => {
  void test("matches a Map model: sparse and dense chunks, block numbers past 2^32, nextMapped", () => {
    let seed = 12345;
    const rnd = (n: number): number => {
      seed = (seed * 1103515245 + 12345) % 2147483648;
      return seed % n;
    };
    const m = new BlockMap();
    const model = new Map<number, number>();
    // Chunk 0 sparse, chunk 3 crosses to dense, and a chunk far past 2^32 blocks.
    const bases = [0, 3 * 32768, 2 ** 33 + 5 * 32768];
    const counts = [50, DENSE_AT + 500, 700];
    let entry = 0;
    bases.forEach((base, k) => {
      for (let n = 0; n < counts[k] * 2; n++) {
        const b = base + rnd(32768);
        const added = m.add(b, entry);
        assert.equal(added, !model.has(b), `add(${b})`);
        if (added) model.set(b, entry);
        entry++;
      }
    });
    assert.equal(m.size, model.size);
    for (const [b, e] of model) {
      assert.equal(m.get(b), e, `get(${b})`);
      assert.ok(m.has(b));
    }
    for (let n = 0; n < 20000; n++) {
      const b = bases[rnd(3)] + rnd(32768 * 2);
      assert.equal(m.get(b), model.get(b) ?? -1, `get(${b})`);
      assert.equal(m.has(b), model.has(b), `has(${b})`);
    }
    const sorted = [...model.keys()].sort((a, b) => a - b);
    for (let n = 0; n < 2000; n++) {
      const from = Math.max(0, bases[rnd(3)] + rnd(40000) - 100);
      const limit = from + rnd(70000);
      const want = sorted.find((b) => b >= from && b < limit) ?? limit;
      assert.equal(m.nextMapped(from, limit), want, `nextMapped(${from}, ${limit})`);
    }
  });
});

/** A MemoryVolume whose next read or extents call can be made to fail (EIO). */
class FlakyVolume extends MemoryVolume {
  failReads = 0;
  /** Fail the read with this number (1 = the next one), 0: never. */
  failReadAt = 0;
  /** Fail the extents call with this number (1 = the next one), 0: never. */
  failExtentsAt = 0;
  override read(buf: Buffer, offset: number): Promise<void> {
    if (this.failReads > 0 || (this.failReadAt > 0 && --this.failReadAt === 0)) {
      if (this.failReads > 0) this.failReads--;
      return Promise.reject(new Error("EIO: injected read error"));
    }
    return super.read(buf, offset);
  }
  override extents(offset: number, length: number): ReturnType<MemoryVolume["extents"]> {
    if (this.failExtentsAt > 0 && --this.failExtentsAt === 0) {
      return Promise.reject(new Error("EIO: injected extents error"));
    }
    return super.extents(offset, length);
  }
}

void describe("a failed before-image capture", () => {
  /** A journal over a FlakyVolume with one long window (both changes fall in it). */
  async function flakyRig(size: number): Promise<{ primary: FlakyVolume; journal: Journal; stack: Volume }> {
    const dir = scratch();
    const primary = new FlakyVolume(size);
    const journal = await Journal.open({
      dir: join(dir, "journal"),
      volumeSize: size,
      windowMs: 600_000,
      log,
    });
    cleanups.push(() => journal.close());
    return { primary, journal, stack: journalVolume(primary, journal) };
  }

  /** The images the journal holds for block b, as their first byte. */
  async function imagesOf(journal: Journal, b: number): Promise<number[]> {
    const out: number[] = [];
    const idx = journal.index;
    for (let i = idx.first; i < idx.length; i++) {
      if (idx.blockAt(i) !== b) continue;
      const buf = Buffer.alloc(BS);
      await journal.readImage(i, buf);
      out.push(buf[0]);
    }
    return out;
  }

  void test("leaves the block unimaged: the next write in the window journals its before-image", async () => {
    const { primary, journal, stack } = await flakyRig(MiB);
    await primary.write(Buffer.alloc(BS, 0x4f), 0, false); // "O", before the journal saw anything
    primary.failReads = 1;
    await assert.rejects(stack.write(Buffer.alloc(BS, 0x41), 0, false), /injected read error/);
    await stack.write(Buffer.alloc(BS, 0x42), 0, false); // same window
    assert.deepEqual(await imagesOf(journal, 0), [0x4f], "the overwrite of O has O's image, durable");
  });

  void test("a large capture failing part way: blocks of the failed part are imaged again, the rest not", async () => {
    const size = 48 * MiB;
    const { primary, journal, stack } = await flakyRig(size);
    await primary.write(Buffer.alloc(40 * MiB, 0x4f), 0, false);
    // An extents call that fails (asked first) fails the change before anything is imaged.
    primary.failExtentsAt = 1;
    await assert.rejects(stack.trim(0, 40 * MiB, false), /injected extents error/);
    assert.equal(journal.index.length, 0, "nothing imaged");
    // 10240 blocks: captured and committed in rounds of 1024 (a read each); the second read fails.
    primary.failReadAt = 2;
    await assert.rejects(stack.trim(0, 40 * MiB, false), /injected read error/);
    const failed = 1500; // in the second round
    const durable = 100; // in the first, committed round
    await stack.write(Buffer.alloc(BS, 0x42), failed * BS, false);
    await stack.write(Buffer.alloc(BS, 0x42), durable * BS, false);
    assert.deepEqual(await imagesOf(journal, failed), [0x4f], "the block of the failed round is imaged");
    assert.deepEqual(await imagesOf(journal, durable), [0x4f], "a committed image is not taken twice");
  });
});

void describe("a view opened while a change stamped before its point is still in flight", () => {
  /** A MemoryVolume whose writes wait for `gate` while it is set (a slow disk). */
  class SlowVolume extends MemoryVolume {
    gate: Gate | null = null;
    override async write(buf: Buffer, offset: number, fua: boolean): Promise<void> {
      if (this.gate) await this.gate.pass();
      return super.write(buf, offset, fua);
    }
  }

  void test("opens only once the change has reached the primary, and reads the same twice", async () => {
    const W = 200;
    const dir = scratch();
    const primary = new SlowVolume(MiB);
    await primary.write(Buffer.alloc(BS, 0x4f), 0, false); // "O"
    const journal = await Journal.open({ dir: join(dir, "journal"), volumeSize: MiB, windowMs: W, log });
    cleanups.push(() => journal.close());
    const stack = journalVolume(primary, journal);
    const provider = new SnapshotProvider(journal, primary, { minimum: 1, preferred: BS, maximum: 32 * MiB });
    await nextWindow(W, 20);
    await sleep(W * 2); // past the journal's first window, so the next point is available
    const gate = new Gate();
    primary.gate = gate;
    const x = stack.write(Buffer.alloc(BS, 0x58), 0, false); // "X", stamped now
    await until(() => gate.waiting === 1); // imaged and committed; the primary write is held
    primary.gate = null;
    await nextWindow(W); // X was stamped before this window's start P, and has not landed
    const t = journalNow();
    const P = journal.pointOf(t);
    let opened = false;
    const pending = provider.open(`snap@${new Date(t).toISOString()}`).then((r) => {
      opened = true;
      return r;
    });
    await sleep(50);
    const early = opened;
    gate.release();
    await x;
    const r = await pending;
    assert.ok("volume" in r, `refused: ${(r as { message: string }).message}`);
    const view = r.volume as SnapshotView;
    assert.equal(view.point, P);
    assert.equal(early, false, "the view opened while a change stamped before its point was in flight");
    const b1 = Buffer.alloc(BS);
    await view.read(b1, 0);
    await stack.write(Buffer.alloc(BS, 0x59), 0, false); // "Y", after P: its image (X) joins the map
    const b2 = Buffer.alloc(BS);
    await view.read(b2, 0);
    assert.equal(String.fromCharCode(b1[0]), "X", "the view at P holds the change stamped before P");
    assert.equal(String.fromCharCode(b2[0]), "X", "and keeps holding it");
    await view.close();
  });

  void test("a change that never reaches the primary: the open is refused after the timeout, saying why", async () => {
    const W = 200;
    const dir = scratch();
    const primary = new SlowVolume(MiB);
    const journal = await Journal.open({ dir: join(dir, "journal"), volumeSize: MiB, windowMs: W, log });
    cleanups.push(() => journal.close());
    const stack = journalVolume(primary, journal);
    const timeoutMs = 300;
    const provider = new SnapshotProvider(
      journal,
      primary,
      { minimum: 1, preferred: BS, maximum: MiB },
      log,
      timeoutMs,
    );
    await nextWindow(W, 20);
    await sleep(W * 2);
    const gate = new Gate();
    primary.gate = gate;
    const x = stack.write(Buffer.alloc(BS, 0x58), 0, false);
    await until(() => gate.waiting === 1); // the primary write hangs
    primary.gate = null;
    await nextWindow(W);
    const asked = Date.now();
    const r = await provider.open(`snap@${new Date(journalNow()).toISOString()}`);
    const took = Date.now() - asked;
    assert.ok("message" in r, "a view opened while a change before its point still hung");
    assert.match(
      r.message,
      /have not completed after 0\.3 s \(is the primary's storage hanging\?\); try again later/,
    );
    assert.ok(took >= timeoutMs - 20, `refused after ${took} ms, before the ${timeoutMs} ms timeout`);
    gate.release();
    await x;
    // Once it has landed, the same point opens.
    const again = await provider.open(`snap@${new Date(journalNow() - W).toISOString()}`);
    assert.ok("volume" in again, `refused: ${(again as { message: string }).message}`);
    await (again.volume as SnapshotView).close();
  });
});

/** Wait (up to 2 s) until `cond` holds. */
async function until(cond: () => boolean): Promise<void> {
  for (let i = 0; i < 400 && !cond(); i++) await sleep(5);
  assert.ok(cond(), "timed out");
}

void describe("SnapshotView.close", () => {
  void test("a lease that cannot be copied still leaves the view closed, unsubscribed and unpinned", async () => {
    const r = await rig("memory", MiB, 50);
    await nextWindow(50);
    await nextWindow(50);
    const view = new SnapshotView(r.journal, r.primary, r.journal.pointOf(journalNow()), "t");
    view.open();
    const internals = r.journal as unknown as { pins: Map<object, number>; listeners: Set<unknown> };
    assert.equal(internals.pins.size, 1);
    assert.equal(internals.listeners.size, 1);
    // A lent reply whose piece cannot be read (a descriptor that is not open): its copy throws.
    const lease: PieceLease = {
      offset: 0,
      length: BS,
      pieces: Float64Array.from([1_000_000, 0, BS]),
      copyFd: -2,
      data: null,
      release: () => {},
    };
    (view as unknown as { leases: Set<PieceLease> }).leases.add(lease);
    await assert.rejects(view.close());
    assert.equal(internals.pins.size, 0, "the closed view still pins the journal (retention blocked)");
    assert.equal(internals.listeners.size, 0, "the closed view still follows the journal");
    await view.close(); // a second close is a no-op
  });
});

void describe("capture slabs", () => {
  /**
   * A journal over a primary of `blocks` patterned blocks (256 KiB segments, one merge window for
   * the whole test) whose fdatasyncs are all held while `issue` sends its writes through the
   * journal filter, yielding a turn between waves so that each wave starts a round of its own.
   * Holding the syncs stops the first round's append at its first segment roll-over (the full
   * segment is synced first) with most of its images not encoded yet, and the later waves wait
   * staged behind it while still later ones capture. Then the syncs go, and every before-image
   * in the journal must hold its own block's old contents: a capture buffer handed out again
   * while an image in it waits to be encoded is overwritten by a later capture.
   */
  async function heldSyncCaptures(
    blocks: number,
    issue: (stack: Volume, writes: Promise<void>[]) => Promise<void>,
  ): Promise<MemoryVolume> {
    const dir = scratch();
    const primary = new MemoryVolume(blocks * BS);
    const pattern = (b: number): Buffer => Buffer.alloc(BS, `block ${b};`);
    for (let b = 0; b < blocks; b++) await primary.write(pattern(b), b * BS, false);
    const journal = await Journal.open({
      dir: join(dir, "journal"),
      volumeSize: blocks * BS,
      windowMs: 600_000,
      segmentBytes: 256 * 1024,
      log,
    });
    cleanups.push(() => journal.close());
    const stack = journalVolume(primary, journal);
    const held: Gate[] = [];
    // eslint-disable-next-line @typescript-eslint/unbound-method -- called below with .call(this)
    const realSync = BlockFile.prototype.sync;
    BlockFile.prototype.sync = async function (this: BlockFile, full?: boolean): Promise<void> {
      const g = new Gate();
      held.push(g);
      await g.pass();
      await realSync.call(this, full);
    };
    const writes: Promise<void>[] = [];
    try {
      await issue(stack, writes);
      // The first round's append reaches its roll-over sync once its first record is written (a
      // pool write: how many turns that takes depends on the machine), and stays there; every
      // later round waits behind it, its images staged and not yet encoded.
      await until(() => held.length >= 1);
      assert.equal(held.length, 1, "the first round's append waits for its roll-over, the rest behind it");
    } finally {
      BlockFile.prototype.sync = realSync;
      for (const g of held) g.release();
    }
    await Promise.all(writes);
    const idx = journal.index;
    assert.equal(idx.length - idx.first, blocks, "one image per block");
    const buf = Buffer.alloc(BS);
    let wrong = 0;
    for (let i = idx.first; i < idx.length; i++) {
      await journal.readImage(i, buf);
      if (!buf.equals(pattern(idx.blockAt(i)))) wrong++;
    }
    assert.equal(wrong, 0, "every before-image holds its own block's old contents");
    return primary;
  }

  const nextTurn = (): Promise<unknown> => new Promise((r) => setImmediate(r));

  void test("a slab is reused only once every image carved from it has been encoded", async () => {
    // Waves of 300 4K writes: each wave captures 300 blocks (more than a 1 MiB slab), carved
    // from shared slabs.
    const BLOCKS = 3600;
    const WAVE = 300;
    const primary = await heldSyncCaptures(BLOCKS, async (stack, writes) => {
      for (let w = 0; w < BLOCKS / WAVE; w++) {
        for (let b = w * WAVE; b < (w + 1) * WAVE; b++)
          writes.push(stack.write(Buffer.alloc(BS, 0xee), b * BS, false));
        await nextTurn(); // its round starts, if fewer than 4 are in flight
      }
    });
    for (let b = 0; b < BLOCKS; b += 97) {
      const now = Buffer.alloc(BS);
      await primary.read(now, b * BS);
      assert.ok(now.equals(Buffer.alloc(BS, 0xee)), `block ${b} was written`);
    }
  });

  void test("a large run's pooled buffer is reused only once every image in it has been encoded", async () => {
    // Twelve 1 MiB writes: each captures a 256-block run into a pooled buffer of its own (not a
    // slab), handed to the next write's capture if it went back to the pool too early.
    const RUN = 256;
    const WRITES = 12;
    await heldSyncCaptures(RUN * WRITES, async (stack, writes) => {
      for (let w = 0; w < WRITES; w++) {
        writes.push(stack.write(Buffer.alloc(RUN * BS, 0xee), w * RUN * BS, false));
        await nextTurn();
      }
    });
  });
});

void describe("snap@<time>", () => {
  void test("a date-time without a zone is UTC, as a date alone is, whatever the server's zone", () => {
    const saved = process.env.TZ;
    process.env.TZ = "Europe/Berlin";
    try {
      // The guard: in this zone Date.parse reads a zone-less date-time an hour off UTC.
      assert.equal(Date.parse("2026-11-23T17:02:12"), Date.UTC(2026, 10, 23, 16, 2, 12));
      assert.equal(parseSnapTime("2026-11-23T17:02:12"), Date.UTC(2026, 10, 23, 17, 2, 12));
      assert.equal(parseSnapTime("2026-11-23T17:02:12.250"), Date.UTC(2026, 10, 23, 17, 2, 12, 250));
      assert.equal(parseSnapTime("2026-11-23T17:02"), Date.UTC(2026, 10, 23, 17, 2));
      assert.equal(parseSnapTime("2026-11-23"), Date.UTC(2026, 10, 23));
      assert.equal(parseSnapTime("2026-11-23T17:02:12Z"), Date.UTC(2026, 10, 23, 17, 2, 12));
      assert.equal(parseSnapTime("2026-11-23T17:02:12+01:00"), Date.UTC(2026, 10, 23, 16, 2, 12));
      assert.equal(parseSnapTime("before-upgrade"), null, "a bookmark name");
      assert.match(String(parseSnapTime("2026-13-45T99:00:00")), /no month 13/);
    } finally {
      if (saved === undefined) delete process.env.TZ;
      else process.env.TZ = saved;
    }
  });

  void test("strict ISO 8601: near-misses are refused with why, never read in the server's zone or rolled over", () => {
    const saved = process.env.TZ;
    process.env.TZ = "Asia/Kolkata";
    try {
      // Each of these Date.parse reads in local time (5:30 off) or rolls over to another day.
      for (const [text, why] of [
        ["2026-11-23 1:02:12", /not an ISO-8601 time/],
        ["2026-11-23 17:02:12 ", /not an ISO-8601 time/],
        ["2026-11-23 5:02 pm", /not an ISO-8601 time/],
        ["2026-11-23 (x) 17:02", /not an ISO-8601 time/],
        ["2026-11-23,17:02", /not an ISO-8601 time/],
        ["2026-11-23 ", /not an ISO-8601 time/],
        ["2026-02-30T00:00:04Z", /no such day \(February 2026 has 28 days\)/],
        ["2026-04-31", /April 2026 has 30 days/],
        ["2026-11-23T25:00", /time of day is out of range/],
        ["2026-11-23T17:60", /time of day is out of range/],
        ["2026-11-23T24:00:01", /time of day is out of range/],
        ["2026-11-23T17:02+24:00", /zone offset is out of range/],
        ["2026-11-23Z", /not an ISO-8601 time/],
      ] as const) {
        assert.equal(typeof Date.parse(text) === "number", true);
        const r = parseSnapTime(text);
        assert.equal(typeof r, "string", `${JSON.stringify(text)} gave ${String(r)}`);
        assert.match(r as string, why, text);
      }
      const ok: [string, number][] = [
        ["2024-02-29", Date.UTC(2024, 1, 29)],
        ["2000-02-29T12:00Z", Date.UTC(2000, 1, 29, 12)],
        ["2026-11-23T17", Date.UTC(2026, 10, 23, 17)],
        ["2026-11-23t17:02:12z", Date.UTC(2026, 10, 23, 17, 2, 12)],
        ["2026-11-23 17:02:12,5", Date.UTC(2026, 10, 23, 17, 2, 12, 500)],
        ["2026-11-23T17:02:12.123456789Z", Date.UTC(2026, 10, 23, 17, 2, 12, 123)],
        ["2026-11-23T17:02:12+0530", Date.UTC(2026, 10, 23, 11, 32, 12)],
        ["2026-11-23T17:02:12-03", Date.UTC(2026, 10, 23, 20, 2, 12)],
        ["2016-12-31T23:59:60Z", Date.UTC(2017, 0, 1)],
        ["2026-11-23T24:00", Date.UTC(2026, 10, 24)],
        ["0099-01-01", Date.parse("0099-01-01T00:00:00Z")],
      ];
      for (const [text, ms] of ok) assert.equal(parseSnapTime(text), ms, text);
    } finally {
      if (saved === undefined) delete process.env.TZ;
      else process.env.TZ = saved;
    }
  });
});

void describe("SnapshotProvider: one view per point, shared by its connections", () => {
  const BLOCK_SIZES = { minimum: 1, preferred: BS, maximum: 32 * MiB };
  type Internals = { pins: Map<object, { revoke: ((why: string) => void) | null }>; listeners: Set<unknown> };

  /**
   * A filled 1 MiB file rig, a bookmark "m" at a point, then 64 KiB overwritten after it; `pinned`
   * counts Journal.pin calls (one per view built).
   */
  async function marked(): Promise<{
    r: Rig;
    old: Buffer;
    provider: SnapshotProvider;
    T: number;
    j: Internals;
    pinned: () => number;
  }> {
    const { r, old } = await filledRig("file");
    await nextWindow(50);
    const T = r.journal.mark("m");
    await r.stack.write(Buffer.alloc(64 * KiB, 0xee), 0, false);
    const provider = new SnapshotProvider(r.journal, r.primary, BLOCK_SIZES, log);
    let pins = 0;
    const pin = r.journal.pin.bind(r.journal);
    r.journal.pin = (...args: Parameters<Journal["pin"]>) => {
      pins++;
      pin(...args);
    };
    return { r, old, provider, T, j: r.journal as unknown as Internals, pinned: () => pins };
  }

  async function opened(p: SnapshotProvider, name: string): Promise<OpenExport> {
    const o = await p.open(name);
    assert.ok("volume" in o, `${name} refused: ${(o as { message: string }).message}`);
    return o;
  }

  async function assertReads(v: Volume, want: Buffer): Promise<void> {
    const b = Buffer.alloc(256 * KiB);
    await v.read(b, 0);
    assert.equal(sha(b), sha(want.subarray(0, b.length)));
  }

  void test("snap@NAME and snap@<time> of one point share one view (one map, one pin); the last release closes it", async () => {
    const { r, old, provider, T, j, pinned } = await marked();
    // A time just after the bookmark, in the window the bookmark began: the same point.
    const a = await opened(provider, "snap@m");
    const b = await opened(provider, `snap@${new Date(Math.floor(T) + 1).toISOString()}`);
    assert.equal(pinned(), 1, "the second open of the point built (and pinned) another map");
    assert.equal(provider.builds, 1);
    assert.equal(a.volume, b.volume);
    assert.equal(j.pins.size, 1);
    assert.equal(j.listeners.size, 1);
    assert.match(b.description, /^snap@\S+Z: the primary as it was at /, "each name keeps its description");
    assert.deepEqual(
      provider.openViews().map((v) => [v.point, v.connections]),
      [[T, 2]],
    );
    await assertReads(a.volume, old);
    a.release();
    a.release(); // once only
    assert.equal(j.pins.size, 1, "the first release unpinned a view still in use");
    assert.equal(j.listeners.size, 1);
    // Still followed: a block first overwritten now joins the map.
    await r.stack.write(Buffer.alloc(64 * KiB, 0xdd), 128 * KiB, false);
    await assertReads(b.volume, old);
    assert.deepEqual(
      provider.openViews().map((v) => v.connections),
      [1],
    );
    b.release();
    assert.equal(j.pins.size, 0, "the last release left the view pinned");
    assert.equal(j.listeners.size, 0);
    assert.equal((b.volume as SnapshotView).unusable, "closed");
    assert.deepEqual(provider.openViews(), []);
    // A new open after that builds afresh.
    const c = await opened(provider, "snap@m");
    assert.notEqual(c.volume, a.volume);
    assert.equal(provider.builds, 2);
    await assertReads(c.volume, old);
    c.release();
    assert.equal(j.pins.size, 0);
  });

  void test("a lease lent through one connection stays exact when another connection to the view closes", async (t) => {
    const { r, old, provider } = await marked();
    const a = await opened(provider, "snap@m");
    const b = await opened(provider, "snap@m");
    assert.equal(a.volume, b.volume, "two connections, one view");
    const view = a.volume as SnapshotView;
    // Bring block 64 KiB .. 128 KiB (primary, unchanged since the point) into the cache, then lend it.
    await view.read(Buffer.alloc(64 * KiB), 64 * KiB);
    let lease: PieceLease | null = null;
    for (let i = 0; i < 3 && lease === null; i++) {
      const w = view.warmPieces(64 * KiB, 64 * KiB);
      if (w) await w;
      lease = view.lendPieces(64 * KiB, 64 * KiB);
    }
    if (lease === null) {
      // Lending needs cachestat(2) (Linux 6.5+): on an older kernel nothing is ever lent, and there
      // is no lease to keep exact. Where cachestat works, lending nothing is a failure.
      assert.ok(
        !cacheVisible(),
        "the view lent nothing after three warm-and-lend tries, with cachestat working",
      );
      t.skip("cachestat(2) is missing on this kernel (Linux before 6.5): snapshot reads are never lent");
      a.release();
      b.release();
      return;
    }
    b.release(); // the other connection goes: the lease must stay tracked
    assert.equal(lease.data, null, "a release by another connection copied (or dropped) this one's lease");
    await r.stack.write(Buffer.alloc(64 * KiB, 0xcc), 64 * KiB, false); // the lent blocks change now
    assert.notEqual(lease.data, null, "the lease was not copied before its blocks changed");
    assert.equal(sha(lease.data!), sha(old.subarray(64 * KiB, 128 * KiB)));
    lease.release();
    a.release();
  });

  void test("a broken view is not handed to a new connection: the next open builds a fresh one", async () => {
    const { old, provider, j } = await marked();
    const a = await opened(provider, "snap@m");
    // Revoked as over --pit-max-bytes (what Journal.enforceRetention calls).
    j.pins.get(a.volume)!.revoke!("over --pit-max-bytes (test)");
    assert.equal(j.pins.size, 0);
    await assert.rejects(a.volume.read(Buffer.alloc(BS), 0), /over --pit-max-bytes/);
    const b = await opened(provider, "snap@m");
    assert.notEqual(b.volume, a.volume, "the revoked view was handed out again");
    assert.equal(provider.builds, 2);
    await assertReads(b.volume, old);
    assert.equal(provider.openViews().length, 2, "the broken view stays open for its connection");
    a.release(); // the broken one's last release must not close the new one
    assert.equal(j.pins.size, 1);
    await assertReads(b.volume, old);
    const c = await opened(provider, "snap@m");
    assert.equal(c.volume, b.volume, "the fresh view is shared");
    b.release();
    c.release();
    assert.equal(j.pins.size, 0);
    assert.deepEqual(provider.openViews(), []);
  });

  void test("info builds and pins nothing, and refuses exactly as open does", async () => {
    const { r, provider, T, j, pinned } = await marked();
    const info = await provider.info("snap@m");
    assert.ok("caps" in info, `refused: ${(info as { message: string }).message}`);
    assert.equal(info.size, MiB);
    assert.equal(info.caps.readOnly, true);
    assert.equal(info.name, "snap@m");
    assert.equal(
      info.description,
      `snap@m: the primary as it was at ${new Date(T).toISOString()} (read-only)`,
    );
    assert.equal(pinned(), 0, "INFO built (and pinned) a pointer map");
    assert.equal(provider.builds, 0);
    assert.equal(j.pins.size, 0);
    assert.equal(j.listeners.size, 0);
    // The same answer as the view a GO opens.
    const o = await opened(provider, "snap@m");
    assert.equal(o.description, info.description);
    assert.deepEqual(o.volume.caps(), info.caps);
    assert.equal(o.volume.size, info.size);
    o.release();
    const refusals = [
      "snap@2026-02-30",
      "snap@nosuchmark",
      `snap@${new Date(T - 3_600_000).toISOString()}`,
      `snap@${new Date(T + 3_600_000).toISOString()}`,
    ];
    // The window's end is the journal's clock now, which may tick between the two asks.
    const now = (m: string): string => m.replace(/ to \d{4}-\d\d-\d\dT[\d:.]+Z/, " to <now>");
    const ask = async (name: string): Promise<[string, string]> => {
      const i = await provider.info(name);
      const g = await provider.open(name);
      assert.ok("message" in i && "message" in g, `${name} was not refused`);
      return [now(i.message), now(g.message)];
    };
    for (const name of refusals) {
      const [i, g] = await ask(name);
      assert.equal(i, g, name);
      assert.match(i, /available: /);
    }
    // The journal stops (a full disk): both refuse, naming the stop.
    (r.journal as unknown as { stop(e: Error): void }).stop(
      Object.assign(new Error("No space left on device"), { code: "ENOSPC" }),
    );
    const [i, g] = await ask("snap@m");
    assert.equal(i, g);
    assert.match(i, /the journal stopped at/);
    assert.equal(provider.builds, 1);
  });

  void test("over the NBD handshake: INFO and SET_META_CONTEXT build nothing, GOs of one point share a view", async () => {
    const { r, old, provider, j, pinned } = await marked();
    const srv = await startTestServer({ exports: [{ name: "disk", volume: r.stack }] });
    cleanups.push(() => srv.stop());
    srv.registry.addProvider(provider);
    const OPT_INFO = 6,
      OPT_GO = 7,
      OPT_STRUCTURED = 8,
      OPT_SET_META = 10;
    const clients: RawClient[] = [];
    for (let i = 0; i < 3; i++) {
      const c = await srv.connect();
      await c.greeting();
      c.sendClientFlags(3);
      const info = await c.option(OPT_INFO, infoRequestData("snap@m", [2]));
      assert.equal(info[info.length - 1].type, 1, "INFO answered with ACK");
      assert.ok(info.some((x) => x.data.includes(Buffer.from("snap@m: the primary as it was at"))));
      await c.option(OPT_STRUCTURED);
      const meta = await c.option(OPT_SET_META, metaContextData("snap@m", ["base:allocation"]));
      assert.equal(meta[meta.length - 1].type, 1);
      assert.equal(pinned(), i === 0 ? 0 : 1, "INFO or SET_META_CONTEXT built (and pinned) a view");
      const go = await c.option(OPT_GO, infoRequestData("snap@m"));
      assert.equal(go[go.length - 1].type, 1, "GO answered with ACK");
      clients.push(c);
    }
    assert.equal(pinned(), 1, "three connections to one point built more than one view");
    assert.equal(provider.builds, 1);
    assert.equal(j.pins.size, 1);
    const bad = await srv.connect();
    await bad.greeting();
    bad.sendClientFlags(3);
    const refused = await bad.option(OPT_INFO, infoRequestData("snap@nosuchmark"));
    assert.ok(isOptionError(refused[0].type));
    assert.match(refused[0].data.toString(), /no bookmark "nosuchmark".*available: /);
    bad.destroy();
    for (const [i, c] of clients.entries()) {
      c.request({ type: 0, cookie: BigInt(i + 1), offset: i * 64 * KiB, length: 64 * KiB });
      const data = (await c.structuredReply()).filter((x) => x.type === 1); // OFFSET_DATA
      const got = Buffer.concat(data.map((x) => x.payload.subarray(8)));
      assert.equal(sha(got), sha(old.subarray(i * 64 * KiB, (i + 1) * 64 * KiB)));
    }
    for (const c of clients.slice(0, 2)) await c.disconnect();
    await until(() => provider.openViews()[0]?.connections === 1);
    assert.equal(j.pins.size, 1);
    await clients[2].disconnect();
    await until(() => j.pins.size === 0);
    assert.deepEqual(provider.openViews(), []);
  });
});

void describe("large trims and zero writes over holes", () => {
  /** A MemoryVolume rig with one long merge window (points are taken with bookmarks). */
  async function longWindowRig(size: number): Promise<Rig> {
    return rig("memory", size, 600_000);
  }

  /**
   * Sums by turn of the event loop (a setImmediate chain counts the turns): add(n) counts n in the
   * turn running now; perTurn() lists the sums of the turns that had any.
   */
  function perTurnCounter(): { add: (n: number) => void; perTurn: () => number[]; stop: () => void } {
    let turn = 0;
    let spinning = true;
    const spin = (): void => {
      turn++;
      if (spinning) setImmediate(spin);
    };
    spin();
    const sums = new Map<number, number>();
    return {
      add: (n) => sums.set(turn, (sums.get(turn) ?? 0) + n),
      perTurn: () => [...sums.values()],
      stop: () => (spinning = false),
    };
  }

  /** Count the journal's needsImage calls, and the turns of the event loop they were made in. */
  function countMarks(j: Journal): { calls: () => number; perTurn: () => number[]; stop: () => void } {
    const turns = perTurnCounter();
    let calls = 0;
    const real = j.needsImage.bind(j);
    j.needsImage = (b, ts, s, large) => {
      calls++;
      turns.add(1);
      return real(b, ts, s, large);
    };
    return {
      calls: () => calls,
      perTurn: turns.perTurn,
      stop: () => {
        turns.stop();
        j.needsImage = real;
      },
    };
  }

  // Found by a hunt: each trim marked every block of its range in the journal's map (and unmarked
  // it again: a hole stays a hole, and needs no image) before it looked at the primary's extents;
  // 4 GiB of trims over holes stalled every other client of the process for up to 274 ms.
  void test("a trim or zero (may trim) of GiBs of holes looks only at the blocks of the data in it", async () => {
    const GiB = 1024 * MiB;
    const r = await longWindowRig(8 * GiB);
    await r.primary.write(randomBytes(MiB), 3 * GiB, false); // 256 blocks of data
    await r.primary.write(randomBytes(MiB), 5 * GiB + 7 * BS, false); // 256 more, across 2 chunks
    const marks = countMarks(r.journal);
    try {
      await r.stack.trim(0, 4 * GiB, false);
      await r.stack.zero(4 * GiB, 4 * GiB, { mayTrim: true });
    } finally {
      marks.stop();
    }
    // The data's blocks, and those sharing its MemoryVolume chunks (64 KiB): 16 that read as
    // zeroes, so they get no image.
    assert.equal(marks.calls(), 512 + 16, "blocks looked at (needsImage): only those of the data");
    assert.equal(r.journal.index.length, 512, "one data image per block of data");
    assert.deepEqual(await r.primary.extents(0, 8 * GiB), [{ length: 8 * GiB, flags: 3 }], "all holes now");
    await r.close();
  });

  void test("a zero write with NO_HOLE over 256 MiB of holes images its blocks in slices, the loop running between", async () => {
    const r = await longWindowRig(256 * MiB);
    const marks = countMarks(r.journal);
    try {
      await r.stack.zero(0, 256 * MiB, { mayTrim: false });
    } finally {
      marks.stop();
    }
    const per = marks.perTurn();
    assert.equal(marks.calls(), 65536, "every block gets a zero image");
    assert.equal(r.journal.index.length, 65536);
    assert.ok(
      Math.max(...per) <= 8192,
      `at most 8192 blocks marked in one turn of the event loop, not ${Math.max(...per)}`,
    );
    assert.ok(per.length >= 8, `marked in ${per.length} turns of the event loop`);
    await r.close();
  });

  /** Count the bytes read from `v` in each turn of the event loop. */
  function countReads(v: Volume): { perTurn: () => number[]; total: () => number; stop: () => void } {
    const turns = perTurnCounter();
    let total = 0;
    const real = v.read.bind(v);
    v.read = (buf, offset) => {
      total += buf.length;
      turns.add(buf.length);
      return real(buf, offset);
    };
    return {
      perTurn: turns.perTurn,
      total: () => total,
      stop: () => {
        turns.stop();
        v.read = real;
      },
    };
  }

  // Measured: a trim over holes and 64 MiB of data spread out stalled the event loop for 30-90 ms,
  // reading, checking and encoding 32 MiB of images in one turn per slice.
  void test("a trim over 64 MiB of data reads and images at most 4 MiB of it in one turn of the event loop", async () => {
    const r = await longWindowRig(256 * MiB);
    for (let at = 0; at < 256 * MiB; at += 32 * MiB) await r.primary.write(randomBytes(8 * MiB), at, false);
    const reads = countReads(r.primary);
    try {
      await r.stack.trim(0, 256 * MiB, false);
    } finally {
      reads.stop();
    }
    const per = reads.perTurn();
    assert.equal(reads.total(), 64 * MiB, "the data is read, the holes are not");
    assert.equal(r.journal.index.length, 16384, "an image per block of data");
    assert.ok(
      Math.max(...per) <= 4 * MiB,
      `at most 4 MiB read in one turn, not ${Math.max(...per) / MiB} MiB`,
    );
    assert.ok(per.length >= 16, `read in ${per.length} turns of the event loop`);
    await r.close();
  });

  // Measured: 16 GiB of zeroes with NO_HOLE over holes marked 4M blocks in the window's map; the
  // Map's rehashes (20+ ms each from half a million entries) and its set and get were most of the
  // time (2.5-4 s) and of the stalls.
  void test("a large change marks its blocks in pages, not the window's map; merges and unmarking still work", async () => {
    const r = await longWindowRig(256 * MiB);
    await r.stack.zero(0, 128 * MiB, { mayTrim: false });
    assert.deepEqual(
      r.journal.windowMarks(),
      { map: 0, paged: 32768 },
      "32768 blocks marked, none in the map",
    );
    assert.equal(r.journal.index.length, 32768, "a zero image per block");
    // Another session writing a marked block in the same window adds a merge note, not an image.
    const other = r.stack.openSession!("other");
    await other.volume.write(randomBytes(BS), 77 * BS, false);
    assert.equal(r.journal.index.length, 32768, "no second image of a marked block");
    other.close();
    // A trim over 1 MiB of data that reads as zeroes and 1 MiB of data: the zero blocks are marked,
    // then unmarked (left as they are), so a later write in the window images them.
    await r.primary.write(Buffer.alloc(MiB), 200 * MiB, false);
    await r.primary.write(randomBytes(MiB), 201 * MiB, false);
    await r.stack.trim(200 * MiB, 2 * MiB, false);
    assert.deepEqual(r.journal.windowMarks(), { map: 0, paged: 32768 + 256 }, "the zero blocks unmarked");
    assert.equal(r.journal.index.length, 32768 + 256);
    await r.stack.write(randomBytes(BS), 200 * MiB + 5 * BS, false);
    assert.equal(r.journal.index.length, 32768 + 257, "a zero block left by the trim is imaged by a write");
    assert.equal(r.journal.windowMarks().map, 1, "a small change marks in the map");
    await r.close();
  });

  void test("snapshots before and after large trims and zeroes over holes and data read exactly", async () => {
    const SIZE = 192 * MiB;
    const W = 2000; // the changes between two points share a window (unless the machine stalls)
    const r = await rig("memory", SIZE, W);
    const model = Buffer.alloc(SIZE);
    const write = async (at: number, n: number): Promise<void> => {
      const d = randomBytes(n);
      d.copy(model, at);
      await r.stack.write(d, at, false);
    };
    await write(8 * MiB, 3 * MiB);
    await write(70 * MiB, MiB);
    await write(100 * MiB + BS, BS);
    await write(SIZE - 64 * KiB, 64 * KiB);
    await nextWindow(W); // past the journal's first window: points exist from here on
    const points: { name: string; at: number; ref: Buffer; view: SnapshotView }[] = [];
    const point = (name: string): void => {
      const at = r.journal.mark(name);
      const view = new SnapshotView(r.journal, r.primary, at, name); // opened before what follows
      view.open();
      points.push({ name, at, ref: Buffer.from(model), view });
    };
    point("p0");
    // An unaligned trim of 128 MiB (holes and data), then, in the same merge window, writes on a
    // block that was a hole (it must be imaged now, as zeroes) and on one that had data.
    const t0 = 3 * BS + 100;
    await r.stack.trim(t0, 128 * MiB, false);
    model.fill(0, t0, t0 + 128 * MiB);
    await write(50 * MiB, BS);
    await write(8 * MiB + BS, 2 * BS);
    // NO_HOLE over 40 MiB of holes and data (zero images for the holes), then a write in it.
    await r.stack.zero(140 * MiB, 40 * MiB, { mayTrim: false });
    model.fill(0, 140 * MiB, 180 * MiB);
    await write(150 * MiB, BS);
    point("p1");
    await r.stack.zero(0, SIZE, { mayTrim: true });
    model.fill(0);
    point("p2");
    await write(SIZE - BS, BS);
    for (const p of points) {
      const got = await readAll(p.view);
      assert.ok(got.equals(p.ref), `snap@${p.name}: ${firstDiff(got, p.ref)}`);
      await checkExtents(p.view, p.ref, 0, SIZE, `snap@${p.name}`);
      // And a view opened now, after every change.
      const late = new SnapshotView(r.journal, r.primary, p.at, `${p.name}-late`);
      late.open();
      const again = await readAll(late);
      assert.ok(again.equals(p.ref), `snap@${p.name}, opened late: ${firstDiff(again, p.ref)}`);
      await late.close();
      await p.view.close();
    }
    await r.close();
  });
});

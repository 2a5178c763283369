// The journal filter: before a write, trim or zero changes blocks of the primary, their
// before-images go into the PIT journal and are made durable; then the change proceeds.
//
// - Per-block locks serialize "read the old contents, journal them, write the new" for a block,
//   so two overlapping writes cannot journal each other's data as a before-image.
// - Only the first change of a block in each merge window needs an image (Journal.needsImage);
//   a write whose blocks are all imaged already in this window goes straight to the primary (and
//   keeps the inline fast path).
// - A change whose capture fails (a read of the primary fails) fails without touching the primary;
//   its blocks whose images are not durable yet are unmarked (Journal.forgetImages), so the next
//   change of them in the window journals a before-image again (the journal keeps running: the
//   write-ahead rule holds, and a read error is the client's to see, not a reason to stop).
// - Blocks that read as zeroes get zero images: no data (large runs ask the extents first, so holes are not read).
// - Large changes (a trim or zero over 1 MiB, anything over CAPTURE_BLOCKS) ask the extents before
//   any per-block work: a trim skips holes whole (no mark, no image), and the rest is marked,
//   captured and committed CAPTURE_BLOCKS at a time (READ_BLOCKS of them read: a slice is one
//   turn of synchronous work) with a turn of the event loop between slices (lockedLarge), all
//   under the change's block locks and before the primary changes. A trim of
//   GiBs of holes marked (and unmarked) every block at once before: stalls of 100s of ms.
// - Sessions: every client session (NBD connection) gets its own partial journal (openSession).
// - Every change is counted in flight (Journal.beginChange/endChange, by the merge window of its
//   stamp) until it has reached the primary or failed: a snapshot view at P opens only once the
//   changes stamped before P have (Journal.settled), so it never sees one of them land later.
// - With the journal stopped (disk full), changes pass straight through: primary writes never fail
//   because of the journal.

import { NO_FAST_ZERO, NotSupportedError } from "../errors.js";
import { Slab } from "../util/buffer-pool.js";
import { DONE } from "../util/done.js";
import type { Volume, VolumeSession, ZeroOptions } from "../volume/volume.js";
import { FilterVolume } from "../volume/filter.js";
import { journalNow } from "./clock.js";
import type { Journal, JournalSession } from "./journal.js";

/**
 * A large change's slice (lockedLarge): at most this many blocks looked at and imaged (entries:
 * 192 KiB of them for zero images, 32 MiB of blocks at 4 KiB)...
 */
const CAPTURE_BLOCKS = 8192;
/**
 * ...and at most this many of them read from the primary (4 MiB at 4 KiB): a slice's reads, zero
 * checks and record encoding run in one turn of the event loop, and 32 MiB of them stalled it
 * for 30-90 ms.
 */
const READ_BLOCKS = 1024;

/** A locked range of blocks and the promise its unlock resolves. */
interface HeldRange {
  b0: number;
  b1: number;
  done: Promise<void>;
}

/**
 * Block-range locks shared by every session of one journal. The held ranges are a plain list: a
 * lock costs a scan of the changes in progress (a few dozen at most), not a map update per block:
 * a 1 MiB write is 256 blocks, and a 4 GiB trim a million.
 */
class BlockLocks {
  private readonly held: HeldRange[] = [];

  /** Lock blocks [b0, b1]; resolves with the unlock function (synchronously-resolved when free). */
  lock(b0: number, b1: number): Promise<() => void> | (() => void) {
    let waits: Promise<void>[] | null = null;
    for (const h of this.held) if (h.b0 <= b1 && b0 <= h.b1) (waits ??= []).push(h.done);
    if (waits !== null) return Promise.all(waits).then(() => this.lock(b0, b1));
    let release!: () => void;
    const range: HeldRange = { b0, b1, done: new Promise<void>((r) => (release = r)) };
    this.held.push(range);
    return () => {
      const i = this.held.indexOf(range);
      if (i < 0) return; // unlocked already
      const last = this.held.pop()!;
      if (i < this.held.length) this.held[i] = last;
      release();
    };
  }
}

/** Wrap `next` (the primary) so that every change is journaled first. */
export function journalVolume(next: Volume, journal: Journal): Volume {
  const locks = new BlockLocks();
  const shared = new JournalVolume(next, journal, locks, journal.openSession("internal"));
  return shared;
}

class JournalVolume extends FilterVolume {
  private readonly j: number;

  constructor(
    next: Volume,
    private readonly journal: Journal,
    private readonly locks: BlockLocks,
    private readonly session: JournalSession,
  ) {
    super(next);
    this.j = journal.blockSize;
  }

  openSession(label: string): VolumeSession {
    const s = this.journal.openSession(label);
    const inner = this.next.openSession?.(label);
    const volume = new JournalVolume(inner?.volume ?? this.next, this.journal, this.locks, s);
    return {
      volume,
      close: () => {
        this.journal.closeSession(s);
        inner?.close();
      },
    };
  }

  override write(buf: Buffer, offset: number, fua: boolean): Promise<void> {
    return this.change(offset, buf.length, false, () => this.next.write(buf, offset, fua));
  }

  override trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.change(offset, length, true, () => this.next.trim(offset, length, fua));
  }

  override zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    // A FAST_ZERO the primary is known to refuse is refused before anything is journaled.
    if (opts.fast === true && this.next.cannotZeroFast?.(opts.mayTrim === true) === true)
      return Promise.reject(new NotSupportedError(NO_FAST_ZERO));
    return this.change(offset, length, opts.mayTrim === true, () => this.next.zero(offset, length, opts));
  }

  /**
   * `zeroes` (a trim, or a zero write that may punch holes: what the fork turns a trim into):
   * the change leaves a block that reads as zeroes reading as zeroes (a punched hole, or the data
   * left as it is when a trim is ignored) and does not turn a hole into data, so the block is
   * unchanged, also in what BLOCK_STATUS says of it, and needs no image. That spares a trim of a
   * fresh volume (mkfs discards the whole device) an entry per block. A zero write with NO_HOLE
   * is not so spared: it allocates a hole's blocks, and a view without an image of the block
   * would then take its status from the primary and call it data.
   */
  private change(offset: number, length: number, zeroes: boolean, apply: () => Promise<void>): Promise<void> {
    const b0 = Math.floor(offset / this.j);
    const b1 = Math.floor((offset + length - 1) / this.j);
    if (!this.journal.running) {
      const refused = this.journal.unjournaledRefusal();
      if (refused !== null) return Promise.reject(refused);
    }
    const held = this.locks.lock(b0, b1);
    if (typeof held === "function") return this.withLock(b0, b1, zeroes, apply, held);
    return held.then((unlock) => this.withLock(b0, b1, zeroes, apply, unlock));
  }

  /**
   * The blocks' locks held: journaled, or, with the journal stopped, unjournaled but counted all
   * the same (a view at the restart's first point must not open before it has landed) and under
   * the locks (a change journaled after the restart must not capture a block before it lands).
   * Whether the journal runs is decided here, as the change is stamped, not before the lock wait:
   * a change that waited through a restart must be journaled.
   */
  private withLock(
    b0: number,
    b1: number,
    zeroes: boolean,
    apply: () => Promise<void>,
    unlockBlocks: () => void,
  ): Promise<void> {
    if (this.journal.running) return this.locked(b0, b1, zeroes, apply, unlockBlocks);
    const refused = this.journal.unjournaledRefusal();
    if (refused !== null) {
      unlockBlocks();
      return Promise.reject(refused);
    }
    const key = this.journal.beginChange(journalNow());
    return settle(apply, () => {
      unlockBlocks();
      this.journal.endChange(key);
    });
  }

  private locked(
    b0: number,
    b1: number,
    zeroes: boolean,
    apply: () => Promise<void>,
    unlockBlocks: () => void,
  ): Promise<void> {
    const ts = journalNow();
    // In flight from its stamp until it reached the primary or failed (Journal.settled).
    const key = this.journal.beginChange(ts);
    const unlock = (): void => {
      unlockBlocks();
      this.journal.endChange(key);
    };
    if (b1 - b0 >= CAPTURE_BLOCKS || (zeroes && (b1 - b0 + 1) * this.j > EXTENTS_MIN)) {
      return this.lockedLarge(b0, b1, ts, zeroes).then(
        () => settle(apply, unlock),
        (e: unknown) => {
          unlock();
          throw e;
        },
      );
    }
    let need: number[] | null = null;
    try {
      for (let b = b0; b <= b1; b++) if (this.journal.needsImage(b, ts, this.session)) (need ??= []).push(b);
    } catch (e) {
      if (need !== null) this.journal.forgetImages(need, 0, ts);
      unlock();
      return Promise.reject(e);
    }
    if (need === null) return settle(apply, unlock);
    const blocks = need;
    let captured: Promise<void>;
    try {
      captured = this.captureAll(blocks, ts, zeroes);
    } catch (e) {
      captured = Promise.reject(e);
    }
    return captured.then(
      () => settle(apply, unlock),
      (e: unknown) => {
        // The change fails, the primary is unchanged; blocks whose images are not durable must
        // be imaged again by the next change in this window (write-ahead), so unmark them first.
        this.journal.forgetImages(blocks, 0, ts);
        unlock();
        throw e;
      },
    );
  }

  /**
   * Journal the before-images of a large change's blocks [b0, b1] durably (a trim or zero of a
   * whole device, stamped `ts`), with work in proportion to the data it must image, not to its
   * length, and in slices that let the event loop run: the primary's extents are asked first, and
   * for a trim (`zeroes`) its holes are skipped whole (a hole stays a hole: no mark, no image, as
   * for a block that reads as zeroes; see change()); the other blocks are marked (needsImage),
   * captured and committed at most CAPTURE_BLOCKS at a time (of them at most READ_BLOCKS read),
   * a slice after the other, each followed by a turn of the event loop; the marks go into the
   * journal's pages for large changes (needsImage's `large`), not its map. Marking a slice at a
   * time is safe under the block locks (nobody else marks these blocks meanwhile; see
   * Journal.needsImage for a window that moves on).
   * On failure, the blocks marked since the last commit are unmarked (write-ahead: the next change
   * in the window images them again).
   */
  private async lockedLarge(b0: number, b1: number, ts: number, zeroes: boolean): Promise<void> {
    const j = this.j;
    const size = this.size;
    /** Blocks marked since the last commit; of them, those to read and those imaged as holes. */
    let marked: number[] = [];
    let reads: number[] = [];
    let holes: number[] = [];
    /** Blocks looked at (needsImage) in this slice. */
    let checked = 0;
    /** Capture and commit the slice (or, when it marked nothing, just let the loop run). */
    const flush = async (): Promise<void> => {
      checked = 0;
      if (marked.length === 0) return turn();
      for (const b of holes) this.journal.stage(this.session, b, ts, null);
      holes = [];
      if (reads.length > 0) {
        const p = this.capture(reads, ts, zeroes, 0, true);
        reads = [];
        if (p !== DONE) await p;
      }
      await this.journal.commit();
      marked = [];
    };
    /** Blocks [first, first + count), data or wholly in a hole: mark those needing an image. */
    const visit = async (first: number, count: number, hole: boolean): Promise<void> => {
      if (hole && zeroes) return; // a hole stays a hole: no image, no mark (see change())
      for (let b = first; b < first + count;) {
        const stop = Math.min(first + count, b + CAPTURE_BLOCKS - checked);
        checked += stop - b;
        for (; b < stop; b++) {
          if (!this.journal.needsImage(b, ts, this.session, true)) continue;
          marked.push(b);
          if (hole) holes.push(b);
          else if (reads.push(b) >= READ_BLOCKS) {
            b++;
            break;
          }
        }
        checked -= stop - b; // the blocks not looked at when the reads filled the slice
        if (checked >= CAPTURE_BLOCKS || reads.length >= READ_BLOCKS) await flush();
      }
    };
    let next = b0; // the first block not visited yet
    /** The hole [hs, he) (bytes): visit the blocks before it as data, then those wholly in it. */
    const hole = async (hs: number, he: number): Promise<void> => {
      const first = Math.ceil(hs / j);
      const stop = he >= size ? b1 + 1 : Math.min(b1 + 1, Math.floor(he / j));
      if (stop <= first) return;
      if (first > next) await visit(next, first - next, false);
      await visit(first, stop - first, true);
      next = stop;
    };
    try {
      const end = Math.min((b1 + 1) * j, size);
      let pos = b0 * j;
      let holeAt = -1; // where the run of hole extents being gathered began
      walk: while (pos < end) {
        const list = await this.next.extents(pos, end - pos);
        if (list.length === 0) break;
        for (const e of list) {
          if (!(e.length > 0)) break walk; // the rest is taken as data
          const at = pos;
          pos = Math.min(end, pos + e.length);
          if (e.flags & 2) {
            if (holeAt < 0) holeAt = at;
          } else if (holeAt >= 0) {
            await hole(holeAt, at);
            holeAt = -1;
          }
          if (pos >= end) break;
        }
        await turn(); // one extents call at a time: a fragmented file needs many
      }
      if (holeAt >= 0) await hole(holeAt, pos);
      if (next <= b1) await visit(next, b1 + 1 - next, false);
      if (marked.length > 0) await flush();
    } catch (e) {
      // The change fails, the primary is unchanged: blocks whose images are not durable must be
      // imaged again by the next change in this window (write-ahead), so unmark them first.
      this.journal.forgetImages(marked, 0, ts);
      throw e;
    }
  }

  /**
   * Journal the before-images of `blocks` (sorted, at most CAPTURE_BLOCKS: larger changes go
   * through lockedLarge) durably. A small change whose old blocks are all in the page cache is
   * captured without an await (the common case: one promise for the commit, none for the reads).
   */
  private captureAll(blocks: number[], ts: number, zeroes: boolean): Promise<void> {
    const p = this.capture(blocks, ts, zeroes);
    return p === DONE ? this.journal.commit() : p.then(() => this.journal.commit());
  }

  /**
   * Read the current contents of `blocks` (sorted) and stage them as before-images; for a trim,
   * blocks that read as zeroes are left unimaged instead (see change()). `known`: the blocks are
   * data by the primary's extents already (lockedLarge), so they are read without asking again.
   */
  private capture(blocks: number[], ts: number, zeroes: boolean, from = 0, known = false): Promise<void> {
    const j = this.j;
    for (let i = from; i < blocks.length;) {
      let k = i + 1;
      while (k < blocks.length && blocks[k] === blocks[k - 1] + 1) k++;
      const count = k - i;
      // Blocks that read as zeroes need no data. A large run asks the primary's extents first so
      // holes are not read at all; a small one is just read and checked: SEEK_HOLE can cost time
      // in proportion to the rest of the file (tmpfs walks every page to the next hole).
      if (!known && count * j > EXTENTS_MIN) return this.captureLarge(blocks, ts, zeroes, i, k);
      const offset = blocks[i] * j;
      const length = Math.min(count * j, this.size - offset);
      const { data, holder } = imageBuffer(count * j);
      if (length < count * j) data.fill(0, length);
      const p = this.next.read(data.subarray(0, length), offset);
      if (p !== DONE) {
        return p.then(
          () => {
            this.stageRun(blocks[i], count, null, data, ts, zeroes, holder);
            return this.capture(blocks, ts, zeroes, k, known);
          },
          (e: unknown) => {
            holder.release();
            throw e;
          },
        );
      }
      this.stageRun(blocks[i], count, null, data, ts, zeroes, holder);
      i = k;
    }
    return DONE;
  }

  /** Capture the run blocks[i..k) (over EXTENTS_MIN bytes, holes skipped), then the rest. */
  private async captureLarge(
    blocks: number[],
    ts: number,
    zeroes: boolean,
    i: number,
    k: number,
  ): Promise<void> {
    const j = this.j;
    const count = k - i;
    const offset = blocks[i] * j;
    const length = Math.min(count * j, this.size - offset);
    const zero = new Uint8Array(count);
    await this.holes(offset, length, zero);
    const { data, holder } = imageBuffer(count * j);
    try {
      if (length < count * j) data.fill(0, length);
      let r = 0;
      while (r < count) {
        if (zero[r]) {
          r++;
          continue;
        }
        let s = r + 1;
        while (s < count && !zero[s]) s++;
        const from = offset + r * j;
        const to = Math.min(offset + s * j, this.size);
        const p = this.next.read(data.subarray(r * j, r * j + (to - from)), from);
        if (p !== DONE) await p;
        r = s;
      }
    } catch (e) {
      holder.release();
      throw e;
    }
    this.stageRun(blocks[i], count, zero, data, ts, zeroes, holder);
    const rest = this.capture(blocks, ts, zeroes, k);
    if (rest !== DONE) await rest;
  }

  /**
   * Stage the images of `count` blocks from `first` read into `data` (`zero`: known holes). The
   * run's reference to `holder` becomes one per image staged with data. Blocks that read as
   * zeroes get a zero image, or none for a trim (`zeroes`): it leaves them as they are, and they
   * go back to unimaged, so a later change in this window images them.
   */
  private stageRun(
    first: number,
    count: number,
    zero: Uint8Array | null,
    data: Buffer,
    ts: number,
    zeroes: boolean,
    holder: Slab,
  ): void {
    const j = this.j;
    let unchanged: number[] | null = null;
    for (let x = 0; x < count; x++) {
      const z = (zero !== null && zero[x] === 1) || isZero(data, x * j, j);
      if (z && zeroes) (unchanged ??= []).push(first + x);
      else if (z) this.journal.stage(this.session, first + x, ts, null);
      else {
        holder.refs++;
        this.journal.stage(this.session, first + x, ts, data.subarray(x * j, (x + 1) * j), holder);
      }
    }
    if (unchanged !== null) this.journal.forgetImages(unchanged, 0, ts);
    holder.release();
  }

  /** Mark in `zero` the blocks of [offset, offset+length) wholly inside a hole of the primary. */
  private async holes(offset: number, length: number, zero: Uint8Array): Promise<void> {
    const j = this.j;
    const count = zero.length;
    let pos = offset;
    for (const e of await this.next.extents(offset, length)) {
      const end = pos + e.length;
      if (e.flags & 2) {
        for (let x = Math.ceil((pos - offset) / j); x < count; x++) {
          const bs = offset + x * j;
          const be = Math.min(bs + j, this.size);
          if (be > end) break;
          zero[x] = 1;
        }
      }
      pos = end;
      if (pos >= offset + length) break;
    }
  }
}

/** Captures larger than this ask the primary's extents for holes before reading. */
const EXTENTS_MIN = 1024 * 1024;

/**
 * Capture buffers for small runs are carved from shared 1 MiB slabs (a 4 KiB Buffer.allocUnsafe is
 * not pooled by Node: one malloc and one GC-tracked backing store per image), taken from and given
 * back to the buffer pool: a slab counts a reference for each run carving from it until the run is
 * staged, then one for each image staged from it until the journal has encoded it (ImageHolder).
 * Once it is carved out and nothing refers to it, it goes back to the pool (a Slab of
 * util/buffer-pool.ts, like the gateway link's). Without reuse, a slab
 * per 256 captured blocks (and the journal's record buffers) was enough external memory churn to
 * make V8 run a full mark-compact every ~100 ms under journaled 4K writes.
 */
const SLAB = 1024 * 1024;

/** The slab small runs are carved from. A Slab is the ImageHolder of its images. */
let slab: Slab | null = null;

/**
 * A buffer for `n` bytes of images and its holder, holding one reference for the run (release it
 * once the run is staged or has failed). Runs over a quarter slab get a pooled buffer of their own:
 * a fresh one per journaled 1 MiB write was the same external-memory churn as above, at the rate
 * of the writes (hundreds of MiB/s under sequential writes).
 */
function imageBuffer(n: number): { data: Buffer; holder: Slab } {
  if (n > SLAB / 4) {
    const own = new Slab(n);
    own.refs = 1;
    own.retire();
    return { data: own.buf.subarray(0, n), holder: own };
  }
  if (slab === null || slab.used + n > SLAB) {
    slab?.retire();
    slab = new Slab(SLAB);
  }
  slab.refs++;
  const data = slab.buf.subarray(slab.used, slab.used + n);
  slab.used += n;
  return { data, holder: slab };
}
const ZERO_BLOCK = Buffer.alloc(64 * 1024);

/** True when buf[at, at+len) is all zero bytes (memcmp against a zero block). */
function isZero(buf: Buffer, at: number, len: number): boolean {
  for (let p = at; p < at + len; p += ZERO_BLOCK.length) {
    const n = Math.min(ZERO_BLOCK.length, at + len - p);
    if (buf.compare(ZERO_BLOCK, 0, n, p, p + n) !== 0) return false;
  }
  return true;
}

/** A turn of the event loop (I/O callbacks, timers and other requests run in it). */
function turn(): Promise<void> {
  return new Promise<void>((r) => setImmediate(r));
}

/** Run `apply`, unlocking when it settles; DONE stays DONE. */
function settle(apply: () => Promise<void>, unlock: () => void): Promise<void> {
  let p: Promise<void>;
  try {
    p = apply();
  } catch (e) {
    unlock();
    return Promise.reject(e);
  }
  if (p === DONE) {
    unlock();
    return DONE;
  }
  return p.finally(unlock);
}

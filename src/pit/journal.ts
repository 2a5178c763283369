// The point-in-time journal: before-images of the primary's blocks, in append-only segment files
// under <state-dir>/journal, with an in-memory index for building snapshot pointer maps.
//
// Notes on the design (the on-disk format is in docs/pit-journal.md)
// - Write-ahead: a write that changes a block first stages the block's before-image, then waits
//   for a group commit (one record appended, one fdatasync, shared by every write staged in the
//   meantime) and only then writes the primary. So a before-image is durable before the write that
//   replaces it is even issued: after a crash (kill -9 or power loss) every change to the primary
//   has its before-image in the journal, and every advertised point in time stays exact. The cost
//   is one fdatasync of the journal per group, not per write.
// - Commit rounds overlap: writes staged while a round's fdatasync is in flight start the next
//   round at once (up to MAX_ROUNDS), instead of waiting a whole fdatasync to start theirs; on a
//   disk whose cache flush takes most of a millisecond under write-back load, that wait was half of
//   a journaled write's latency. Write phases (record encoding, pwrite, segment roll-over) still
//   run one at a time in round order, and rounds finish in order: listeners hear of a round's
//   entries, and its writers wake, only after every earlier round is durable too.
// - Sources: each client session (an NBD connection) stages into its own partial journal, so
//   sessions do not contend; a commit flushes every partial journal into the primary journal (the
//   segment files), ordering entries by timestamp. Timestamps come from one clock (clock.ts):
//   the wall clock, which snap@T names, to the microsecond, following its steps, never going back.
// - Merging: time is cut into merge windows (1 s by default). Within a window only the first
//   before-image of a block is kept; other sessions writing the block in the same window are
//   recorded as contributing sources (a bitmask of session slots; merge notes for images already
//   committed). Snapshots therefore exist at window boundaries: snap@T shows the volume as it was
//   at the start of T's window.
// - Pointer map for time T (window start Tw): for each block, the first entry with ts >= Tw holds
//   its contents at Tw; blocks without one read from the primary. Entries are appended in
//   timestamp order, so the index is a set of append-only typed arrays and "first entry at or
//   after Tw" is a binary search followed by one forward scan.
// - Zero images: a block that is a hole or reads as zeroes in the primary gets an entry without
//   data (24 bytes, not 4 KiB). A trim leaves such a block as it is, so it gets no entry at all
//   (filter.ts): mkfs discarding a fresh volume adds nothing to the journal, and the filter skips
//   the holes of a large trim without marking them in the window (so it costs no step per block).
// - Retention by age and by size drops the oldest sealed segments (never one an open snapshot
//   still reads: past --pit-max-bytes the snapshots holding the oldest one are revoked first, so
//   that an idle client cannot hold the size limit back); the earliest available point moves to
//   the first window after the newest dropped entry. A full disk (or any journal I/O error) never fails a primary write: the journal stops,
//   logs it loudly, and reports no available point in time (open snapshots fail their reads) until
//   it restarts by itself once space returns; points from the restart on are exact again. The
//   restart records its earliest exact point in the state file (before its first image), so a
//   later process start does not offer the points before or during the gap either. A stop that
//   the state file cannot record (its disk fails) would let a later start offer points that the
//   unjournaled writes changed: until it is recorded (retried at most once a second), changes are
//   refused with EIO, as the tracking log refuses writes when not even its mark can be written.

import { constants } from "node:os";
import { closeSync, mkdirSync, openSync, readdirSync, readSync, rmSync } from "node:fs";
import { existsSync, fdatasyncSync, fstatSync, readFileSync, writeSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { BlockFile, isCached, syncDir } from "../blockio/index.js";
import { errnoName, errnoOf, IoError, UsageError } from "../errors.js";
import { acquire, release } from "../util/buffer-pool.js";
import { allocateInPlace, writeFileAtomicSync, writeInPlace } from "../util/atomic.js";
import { DONE } from "../util/done.js";
import type { Logger } from "../log.js";
import { journalNow, onClockStep, REPORT_MS, seedJournalClock, type ClockStep } from "./clock.js";
import {
  decodeRecord,
  decodeSegmentHeader,
  encodeRecord,
  encodeSegmentHeader,
  ENTRY_ZERO,
  peekRecord,
  REC,
  RECORD_HEADER,
  recordSize,
  SEGMENT_HEADER,
  type EntryToWrite,
} from "./records.js";

/**
 * Segment size for a size limit: at most a sixteenth of it (4 MiB to 64 MiB), so that retention by
 * size drops a small part of the history at a time, and a small --pit-max-bytes holds (with one
 * 64 MiB segment under a 48M limit, the limit was passed until the first roll, and then the whole
 * history went at once).
 */
export function segmentBytesFor(maxBytes: number): number {
  const MiB = 1024 * 1024;
  return Math.min(JOURNAL_DEFAULTS.segmentBytes, Math.max(4 * MiB, Math.floor(maxBytes / 16 / MiB) * MiB));
}

/** How to open a journal. */
export interface JournalOptions {
  dir: string;
  volumeSize: number;
  blockSize?: number;
  windowMs?: number;
  segmentBytes?: number;
  retentionMs?: number;
  maxBytes?: number;
  log: Logger;
}

/** What an offline look at a journal directory shows (no proxy running). */
export interface JournalSummary {
  earliest: number | null;
  latest: number | null;
  windowMs: number;
  stopped: boolean;
  bytes: number;
  segments: number;
  entries: number;
  bookmarks: Map<string, number>;
  /** Wall times that passed twice (see Journal.passedTwice). */
  passedTwice: [number, number][];
}

export const JOURNAL_DEFAULTS = {
  blockSize: 4096,
  windowMs: 1000,
  segmentBytes: 64 * 1024 * 1024,
  retentionMs: 24 * 3600 * 1000,
  maxBytes: 10 * 1024 * 1024 * 1024,
};

const RETENTION_INTERVAL_MS = 2000;
/** An open snapshot's hold on the journal's segments (Journal.pin). */
interface Pin {
  seg: number;
  label: string;
  revoke: ((why: string) => void) | null;
}

/** Entries per chunk of the index (EntryIndex): 2.75 MiB of typed arrays. */
const INDEX_SHIFT = 16;
const INDEX_CHUNK = 1 << INDEX_SHIFT;
const INDEX_MASK = INDEX_CHUNK - 1;

/** Blocks imaged in one merge window after which the window is cut short (see needsImage). */
export const MAX_IN_WINDOW = 1 << 20;
/** Blocks per page of a large change's marks (Journal.bulk): 1 KiB of bitmasks per 1 MiB. */
const MARK_PAGE = 256;
/** The state file: JSON padded with spaces to 4 KiB, overwritten in place (see openStateFile). */
const STATE_SIZE = 4096;
const STATE_PAD = 0x20;
const RESTART_INTERVAL_MS = 5000;
/** Commit rounds in flight at once (each holds a pool thread in fdatasync). */
const MAX_ROUNDS = 4;

interface Segment {
  number: number;
  path: string;
  file: BlockFile;
  /** Next write position (bytes used). */
  size: number;
  /** Index of its first entry. */
  firstEntry: number;
  lastTs: number;
  /** Until when (ms, monotonic) the written bytes are taken to be in the page cache. */
  residentUntil: number;
  /** Until when (ms, monotonic) the segment is taken to be partly evicted: images checked one by one. */
  partialUntil: number;
  /** Commit rounds whose fdatasync of this segment is in flight (retention must not close it). */
  syncing: number;
  /**
   * Created (sparse) by this process: nothing was ever written past `size`. A segment reopened
   * after a crash may hold a torn record there.
   */
  fresh: boolean;
}

/** How long a segment found wholly in the page cache is taken to stay there (ms). */
const RESIDENT_MS = 1000;

/**
 * Append-only entry index in typed arrays (grows by a chunk).
 *
 * Entries are appended in commit order, which is not quite timestamp order: a large change stamps
 * its before-images when it takes its block locks and may commit them in several rounds, after
 * other sessions committed newer entries. For one block the order is exact (its changes are
 * serialized by the block lock). `runMax` (the running maximum of timestamps) is non-decreasing,
 * so "where can the first entry at or after t be" is a binary search on it; callers skip the
 * older entries they meet after that position.
 *
 * Entry numbers are absolute and never reused. The entries are kept in chunks of INDEX_CHUNK
 * (one typed array per field and chunk), from entry `base` on: growing adds a chunk, never copies
 * (doubling flat arrays copied them all at once: 120 ms with the loop stalled at 4M entries, which
 * a 16 GiB zero write makes), and once retention has dropped (moved `first` past) whole chunks,
 * they go and `base` follows, so memory follows the retained journal, not everything the process
 * ever journaled. Read entries through the *At methods.
 */
export class EntryIndex {
  private tsC: Float64Array[] = [];
  private runMaxC: Float64Array[] = [];
  private blockC: Float64Array[] = [];
  private segC: Uint32Array[] = [];
  private offC: Float64Array[] = []; // -1: zero image
  private sourcesC: Uint32Array[] = [];
  /** Entry numbers below this are no longer kept (a multiple of INDEX_CHUNK). */
  base = 0;
  length = 0;
  /** Entries below this were dropped by retention. */
  first = 0;

  /** Entries the chunks kept have room for (memory follows it). */
  get capacity(): number {
    return this.tsC.length * INDEX_CHUNK;
  }

  push(ts: number, block: number, seg: number, off: number, sources: number): number {
    const i = this.length++;
    const p = i - this.base;
    const c = p >>> INDEX_SHIFT;
    const x = p & INDEX_MASK;
    if (c === this.tsC.length) {
      this.tsC.push(new Float64Array(INDEX_CHUNK));
      this.runMaxC.push(new Float64Array(INDEX_CHUNK));
      this.blockC.push(new Float64Array(INDEX_CHUNK));
      this.segC.push(new Uint32Array(INDEX_CHUNK));
      this.offC.push(new Float64Array(INDEX_CHUNK));
      this.sourcesC.push(new Uint32Array(INDEX_CHUNK));
    }
    const before = p > 0 ? this.runMaxAt(i - 1) : ts;
    this.tsC[c][x] = ts;
    this.runMaxC[c][x] = before > ts ? before : ts;
    this.blockC[c][x] = block;
    this.segC[c][x] = seg;
    this.offC[c][x] = off;
    this.sourcesC[c][x] = sources;
    return i;
  }

  tsAt(i: number): number {
    const p = i - this.base;
    return this.tsC[p >>> INDEX_SHIFT][p & INDEX_MASK];
  }
  private runMaxAt(i: number): number {
    const p = i - this.base;
    return this.runMaxC[p >>> INDEX_SHIFT][p & INDEX_MASK];
  }
  blockAt(i: number): number {
    const p = i - this.base;
    return this.blockC[p >>> INDEX_SHIFT][p & INDEX_MASK];
  }
  segAt(i: number): number {
    const p = i - this.base;
    return this.segC[p >>> INDEX_SHIFT][p & INDEX_MASK];
  }
  offAt(i: number): number {
    const p = i - this.base;
    return this.offC[p >>> INDEX_SHIFT][p & INDEX_MASK];
  }
  sourcesAt(i: number): number {
    const p = i - this.base;
    return this.sourcesC[p >>> INDEX_SHIFT][p & INDEX_MASK];
  }
  addSources(i: number, sources: number): void {
    const p = i - this.base;
    this.sourcesC[p >>> INDEX_SHIFT][p & INDEX_MASK] |= sources;
  }

  /** The chunk holding entry `i`: its arrays and i's place in them (for loops over many entries). */
  chunkAt(i: number): { ts: Float64Array; block: Float64Array; off: Float64Array; at: number } {
    const c = (i - this.base) >>> INDEX_SHIFT;
    return { ts: this.tsC[c], block: this.blockC[c], off: this.offC[c], at: (i - this.base) & INDEX_MASK };
  }

  /** Retention dropped the entries below `first`: forget them, a whole chunk at a time. */
  dropBelow(first: number): void {
    this.first = first;
    const dead = Math.floor((first - this.base) / INDEX_CHUNK);
    if (dead <= 0) return;
    for (const a of [this.tsC, this.runMaxC, this.blockC, this.segC, this.offC, this.sourcesC])
      a.splice(0, dead);
    this.base += dead * INDEX_CHUNK;
  }

  /**
   * First index >= first at which an entry with ts >= t can be (length when none): every entry with
   * ts >= t is at or after it; entries after it with ts < t are to be skipped.
   */
  firstAtOrAfter(t: number): number {
    let lo = this.first;
    let hi = this.length;
    while (lo < hi) {
      const mid = Math.floor((lo + hi) / 2); // entry numbers pass 2^32 in a long run
      if (this.runMaxAt(mid) < t) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}

interface Staged {
  block: number;
  ts: number;
  slot: number;
  data: Buffer | null;
  holder: ImageHolder | null;
}

/**
 * What holds a staged image's bytes (the filter's capture slabs): released once for every image
 * staged with it, when the image's record has been encoded (the bytes are not read after that).
 * An image that is never appended (the journal stopped) is never released; its holder is then
 * only garbage collected, never reused.
 */
export interface ImageHolder {
  release(): void;
}

/** A client session's partial journal. */
export class JournalSession {
  staged: Staged[] = [];
  merges: { block: number; ts: number; slot: number }[] = [];
  constructor(
    readonly slot: number,
    readonly label: string,
  ) {}
}

/** Something that wants to hear about new entries (open snapshot views). */
export type AppendListener = (from: number, to: number) => void;

/** Where the available points in time are. */
export interface JournalWindow {
  /** Earliest window start with an exact snapshot, or null when none (journal stopped). */
  earliest: number | null;
  latest: number;
  windowMs: number;
  stopped: { at: string; reason: string } | null;
}

/** The PIT journal of one volume. */
export class Journal {
  readonly blockSize: number;
  /** The merge window; a journal keeps the one it was created with. */
  windowMs: number;
  readonly volumeSize: number;
  readonly blocks: number;
  readonly index = new EntryIndex();
  private readonly o: Required<Omit<JournalOptions, "log" | "dir" | "volumeSize">>;
  private readonly dir: string;
  private readonly log: Logger;
  private readonly segments = new Map<number, Segment>();
  /** The segment residentFd looked up last (its number), null when none or dropped. */
  private lastSeg: Segment | null = null;
  private lastSegNo = -1;
  private order: number[] = [];
  private journalId = "";
  private recordSeq = 0;
  private readonly sessions = new Set<JournalSession>();
  private slots = 0;
  private windowStart = 0;
  /**
   * Blocks imaged in the current window -> bitmask of the session slots that changed them (the
   * first one imaged the block, each other one has a merge note).
   */
  private readonly inWindow = new Map<number, number>();
  /**
   * The marks of large changes (needsImage with `large`) in the current window, the same bitmasks
   * in pages of MARK_PAGE blocks: marking GiBs costs a typed-array store per block, not a Map
   * entry (a Map of half a million blocks rehashes for 20+ ms at once, and set and get were most
   * of a 16 GiB zero write's time). A block is in one of the two, never both; `bulkMarks` counts
   * the blocks marked here.
   */
  private readonly bulk = new Map<number, Uint32Array>();
  private bulkMarks = 0;
  /** The newest stamp of a change (beginChange): a window is cut only at the newest (needsImage). */
  private newestStamp = 0;
  /** Commit rounds: scheduled, in flight, the tail of their write phases and of their completions. */
  private roundScheduled = false;
  private roundsInFlight = 0;
  private writeTail: Promise<void> = Promise.resolve();
  private doneTail: Promise<void> = Promise.resolve();
  private commitWaiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  private readonly listeners = new Set<AppendListener>();
  /** Open snapshots: the first segment each reads from, and how to revoke it (see enforceRetention). */
  private readonly pins = new Map<object, Pin>();
  /** Changes stamped but not yet applied to the primary (or failed), by merge window. */
  private readonly changes = new Map<number, { n: number; drained: (() => void)[] }>();
  private stoppedAt: { ts: number; reason: string } | null = null;
  /** The stop is not in the state file yet: changes are refused until it is (see the notes). */
  private stopUnrecorded = false;
  private stopRetryAt = 0;
  /** Exact points in time exist from this window start on (moved by retention and restarts). */
  private earliestTs: number;
  private bookmarks = new Map<string, number>();
  /** Times of the bookmarks taken by this process, ascending: merge windows end there. */
  private cuts: number[] = [];
  private timers: NodeJS.Timeout[] = [];
  private unhearClock: (() => void) | null = null;
  /** Wall times that passed twice (the clock went back), [from, to], oldest first: snap@ refuses them. */
  private passedTwiceRanges: [number, number][] = [];
  /** Opened with the wall clock behind the newest entry: the times between pass twice. */
  private behindAtStart: [number, number] | null = null;
  private closed = false;
  private droppedBytes = 0;
  /** The newest drop by retention (see JournalState.dropped). */
  private lastDrop: { segment: number; earliest: number } | null = null;

  private constructor(opts: JournalOptions) {
    this.o = {
      blockSize: opts.blockSize ?? JOURNAL_DEFAULTS.blockSize,
      windowMs: opts.windowMs ?? JOURNAL_DEFAULTS.windowMs,
      segmentBytes: opts.segmentBytes ?? segmentBytesFor(opts.maxBytes ?? JOURNAL_DEFAULTS.maxBytes),
      retentionMs: opts.retentionMs ?? JOURNAL_DEFAULTS.retentionMs,
      maxBytes: opts.maxBytes ?? JOURNAL_DEFAULTS.maxBytes,
    };
    this.dir = opts.dir;
    this.log = opts.log;
    this.blockSize = this.o.blockSize;
    this.windowMs = this.o.windowMs;
    this.volumeSize = opts.volumeSize;
    this.blocks = Math.ceil(opts.volumeSize / this.blockSize);
    this.earliestTs = 0;
  }

  /** Open (or create) the journal in `dir`, recovering its index from the segments. */
  /** Read a journal directory without changing it (for `blockfork snapshots` with no proxy). */
  static inspect(opts: JournalOptions): JournalSummary {
    const j = new Journal(opts);
    j.recover(false);
    const statePath = join(j.dir, "state");
    const st = existsSync(statePath) ? parseState(readFileSync(statePath, "utf8"), statePath) : {};
    const stopped = typeof st.stoppedAt === "number";
    if (typeof st.earliest === "number") j.earliestTs = Math.max(j.earliestTs, st.earliest);
    if (Array.isArray(st.passedTwice)) j.passedTwiceRanges = st.passedTwice;
    j.loadBookmarks();
    const last = j.index.length > j.index.first ? j.index.tsAt(j.index.length - 1) : null;
    const summary: JournalSummary = {
      earliest: stopped ? null : j.earliestTs,
      latest: last,
      windowMs: j.windowMs,
      stopped,
      bytes: j.bytes,
      segments: j.order.length,
      entries: j.index.length - j.index.first,
      bookmarks: j.listBookmarks(),
      passedTwice: j.passedTwice(),
    };
    for (const s of j.segments.values()) s.file.close();
    return summary;
  }

  static async open(opts: JournalOptions): Promise<Journal> {
    const j = new Journal(opts);
    mkdirSync(j.dir, { recursive: true });
    j.recover(true);
    j.openStateFile();
    if (j.behindAtStart !== null && !j.recordPassedTwice(j.behindAtStart)) {
      throw new Error(`${join(j.dir, "state")}: cannot record the wall clock's step back`);
    }
    j.loadBookmarks();
    if (j.order.length === 0) {
      // A new journal: exact points from the first window after its first segment was created
      // (recover() could only guess from an earlier clock reading, maybe in the window before).
      const created = journalNow();
      await j.newSegment(created);
      j.earliestTs = Math.max(j.earliestTs, j.windowCeil(created));
    }
    j.timers.push(setInterval(() => j.enforceRetention(), RETENTION_INTERVAL_MS));
    for (const t of j.timers) t.unref();
    j.unhearClock = onClockStep((s) => j.clockStepped(s));
    return j;
  }

  // ---- recovery

  private segmentPath(n: number): string {
    return join(this.dir, `${String(n).padStart(10, "0")}.seg`);
  }

  /** Index the segments; `repair`: remove a newest segment left unborn by a crash (else skip it). */
  private recover(repair: boolean): void {
    const names = readdirSync(this.dir)
      .filter((f) => /^\d{10}\.seg$/.test(f))
      .sort();
    if (names.length > 0 && unbornSegment(join(this.dir, names[names.length - 1]))) {
      // A crash between creating the file and syncing its header (newSegment): it never held a
      // record, so nothing is lost; the segment before it becomes the last (checked in full).
      const path = join(this.dir, names.pop()!);
      if (repair) {
        this.log.warn(`journal: ${path} has no header and no records (a crash as it was created): removed`);
        rmSync(path, { force: true });
        syncDir(this.dir);
      }
    }
    let lastTs = 0;
    let created = 0;
    for (const [k, name] of names.entries()) {
      const path = join(this.dir, name);
      const fd = openSync(path, "r");
      let valid = 0;
      try {
        const head = Buffer.alloc(SEGMENT_HEADER);
        readSync(fd, head, 0, SEGMENT_HEADER, 0);
        const h = decodeSegmentHeader(head);
        if (h === null) {
          throw new Error(
            `${path} has no valid segment header (damaged, or not a segment of this journal): the ` +
              `journal cannot tell which points in time are exact, so it does not start. Restore ` +
              `the file, or move ${this.dir} aside to begin a new journal (its points in time are lost)`,
          );
        }
        if (h.blockSize !== this.blockSize) {
          throw new Error(`${path} uses ${h.blockSize}-byte blocks, this journal ${this.blockSize}`);
        }
        if (created === 0) created = h.created;
        if (h.windowMs !== this.windowMs) {
          if (k === 0) {
            this.log.warn(
              `journal: keeps its merge window of ${h.windowMs} ms, fixed when it was made (a merge ` +
                `window of ${this.windowMs} ms, from --pit-window or its default, applies to new journals; ` +
                `move ${this.dir} aside to begin one, losing its points in time)`,
            );
          }
          this.windowMs = h.windowMs;
        }
        this.journalId = h.journalId;
        const last = k === names.length - 1;
        // Every entry of a sealed segment was stamped before the next segment was created. One
        // that was not (or whose time is no number) is garbage from a record the journal was
        // appending when it stopped (a write or fdatasync failed; the restart began the next
        // segment): that segment's log ends there, whatever its entry table says.
        const before = last ? Infinity : (headerCreated(join(this.dir, names[k + 1])) ?? Infinity);
        const seg = h.segment;
        const firstEntry = this.index.length;
        let pos = SEGMENT_HEADER;
        const hb = Buffer.alloc(RECORD_HEADER);
        // The segment's own size, not this process's: it may have been written with another
        // (segment size follows --pit-max-bytes).
        const fileSize = fstatSync(fd).size;
        for (;;) {
          if (readSync(fd, hb, 0, RECORD_HEADER, pos) < RECORD_HEADER) break;
          const peek = peekRecord(hb, 0);
          if (peek === null || peek.size > fileSize - pos) break;
          // Only the last segment can end in a torn record; older ones were fsynced before the
          // next began. Check every record of the last segment in full.
          const rec = Buffer.alloc(last ? peek.size : RECORD_HEADER + 24 * peek.count);
          const want = rec.length;
          if (readSync(fd, rec, 0, want, pos) < want) break;
          const info = last
            ? decodeRecord(rec, 0, this.blockSize)
            : decodeTable(rec, this.blockSize, peek.size);
          if (info === null) break;
          if (!info.entries.every((e) => e.ts < before)) break;
          this.applyRecord(info.type, info.entries, seg, pos + info.dataStart, info.recordSeq);
          if (info.entries.length) lastTs = Math.max(lastTs, info.entries[info.entries.length - 1].ts);
          pos += peek.size;
          valid = pos;
        }
        if (last && repair) this.clearTornTail(path, pos);
        const file = BlockFile.open(path, { inlineWrites: true });
        this.segments.set(seg, {
          number: seg,
          path,
          file,
          size: Math.max(valid, SEGMENT_HEADER),
          firstEntry,
          lastTs: this.index.length > firstEntry ? this.index.tsAt(this.index.length - 1) : 0,
          residentUntil: 0,
          partialUntil: 0,
          syncing: 0,
          fresh: false,
        });
        this.order.push(seg);
      } finally {
        closeSync(fd);
      }
    }
    seedJournalClock(lastTs);
    const wall = Date.now();
    if (repair && lastTs > wall + REPORT_MS) {
      this.log.warn(
        `journal: its newest entry (${new Date(lastTs).toISOString()}) is later than the wall clock ` +
          `(${new Date(wall).toISOString()}): was the clock set back? Timestamps hold at that entry until ` +
          "the clock reaches it; snap@ a time that passes twice is refused (use a bookmark)",
      );
      this.behindAtStart = [wall, lastTs];
    }
    // Exact points exist from the first window that began after the journal did.
    this.earliestTs = this.windowCeil(created || journalNow());
    if (names.length > 0) {
      this.log.info(
        `journal: ${this.order.length} segments, ${this.index.length} entries, ` +
          `points in time from ${new Date(this.earliestTs).toISOString()}`,
      );
    }
  }

  /**
   * The last segment's log ends at `at`. Bytes there are a record torn by a crash (its entries
   * never committed, so their primary writes were never issued). Clear its header, durably, before
   * anything else happens: the next record would overwrite it, but if the next record does not fit
   * the segment is sealed as it stands, and a sealed segment is indexed from its entry tables alone
   * (no CRC), so a later start would take the torn entries for committed ones.
   */
  private clearTornTail(path: string, at: number): void {
    const fd = openSync(path, "r+");
    try {
      const hb = Buffer.alloc(RECORD_HEADER);
      if (readSync(fd, hb, 0, RECORD_HEADER, at) === 0 || hb.every((b) => b === 0)) return;
      this.log.warn(
        `journal: ${path} ends in a record torn by a crash at offset ${at} (it never committed): cleared`,
      );
      writeSync(fd, Buffer.alloc(RECORD_HEADER), 0, RECORD_HEADER, at);
      fdatasyncSync(fd);
    } finally {
      closeSync(fd);
    }
  }

  private applyRecord(
    type: number,
    entries: { block: number; ts: number; sources: number; flags: number }[],
    seg: number,
    dataAt: number,
    recordSeq: number,
  ): void {
    this.recordSeq = Math.max(this.recordSeq, recordSeq);
    let d = dataAt;
    if (type === REC.IMAGES) {
      for (const e of entries) {
        const zero = (e.flags & ENTRY_ZERO) !== 0;
        this.index.push(e.ts, e.block, seg, zero ? -1 : d, e.sources);
        if (!zero) d += this.blockSize;
      }
    } else if (type === REC.MERGES) {
      for (const e of entries) {
        // Find the image of this block in the merge's window (scanning back is short: same window).
        const w0 = this.windowFloor(e.ts);
        for (let i = this.index.length - 1; i >= this.index.first && this.index.tsAt(i) >= w0; i--) {
          if (this.index.blockAt(i) === e.block) {
            this.index.addSources(i, e.sources);
            break;
          }
        }
      }
    }
  }

  /**
   * The state file records a stop (disk full) so that a restart after a crash knows that the
   * points before it are not exact. It is allocated once (4 KiB) and overwritten in place, so
   * recording a stop needs no free space.
   */
  private openStateFile(): void {
    const path = join(this.dir, "state");
    allocateInPlace(path, STATE_SIZE, STATE_PAD);
    const st = parseState(readFileSync(path, "utf8"), path);
    if (Array.isArray(st.passedTwice)) this.passedTwiceRanges = st.passedTwice;
    // A restart after a stop moved the earliest exact point past the gap: the segments cannot
    // tell (the first one still begins before the gap).
    if (typeof st.earliest === "number") this.earliestTs = Math.max(this.earliestTs, st.earliest);
    const d = st.dropped;
    if (
      d !== undefined &&
      typeof d.segment === "number" &&
      typeof d.earliest === "number" &&
      typeof st.earliest === "number" &&
      typeof st.stoppedAt !== "number" &&
      this.order.length > 0 &&
      this.order[0] === d.segment + 1
    ) {
      // The oldest segment is the one after the last drop recorded: exact points from where that
      // drop left them (and from any later restart's point, which `earliest` holds: the drop wrote
      // the earliest point then, and a later restart writes its own, later one).
      this.earliestTs = Math.max(d.earliest, st.earliest);
      this.lastDrop = d;
    }
    if (typeof st.stoppedAt === "number") {
      // It stopped and the process ended before it restarted: nothing before now is exact.
      this.earliestTs = Math.max(this.earliestTs, this.windowCeil(journalNow()));
      this.log.warn(
        `journal: it was stopped at ${new Date(st.stoppedAt).toISOString()}; points in time from ` +
          `${new Date(this.earliestTs).toISOString()} on`,
      );
      if (!this.writeState({ earliest: this.earliestTs })) {
        throw new Error(`${path}: cannot record the earliest exact point after a stop`);
      }
    }
  }

  private writeState(st: JournalState): boolean {
    if (this.passedTwiceRanges.length > 0) st = { ...st, passedTwice: this.passedTwiceRanges };
    if (this.lastDrop !== null) st = { ...st, dropped: this.lastDrop };
    try {
      writeInPlace(join(this.dir, "state"), JSON.stringify(st), STATE_SIZE, STATE_PAD);
      return true;
    } catch {
      return false;
    }
  }

  /**
   * The start of the merge window holding `ts`: the grid of windowMs, cut at every bookmark taken
   * by this process (a window ends where a bookmark is taken, so that snap@bookmark shows every
   * change made before it).
   */
  private windowFloor(ts: number): number {
    const grid = Math.floor(ts / this.windowMs) * this.windowMs;
    const c = this.cuts;
    if (c.length === 0 || c[c.length - 1] <= grid || c[0] > ts) return grid;
    const n = this.cutsUpTo(ts); // the last cut <= ts is at n - 1
    return n > 0 && c[n - 1] > grid ? c[n - 1] : grid;
  }

  /** How many bookmark cuts are at or before `ts` (binary search: `cuts` is sorted). */
  private cutsUpTo(ts: number): number {
    const c = this.cuts;
    let lo = 0;
    let hi = c.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (c[mid] <= ts) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  /**
   * The end of the merge window holding `ts`: the next grid point, or the first bookmark cut
   * after `ts` when that comes first. The first point in time after it.
   */
  private windowEnd(ts: number): number {
    const grid = Math.floor(ts / this.windowMs) * this.windowMs + this.windowMs;
    const c = this.cuts;
    const n = this.cutsUpTo(ts); // the first cut > ts is at n
    return n < c.length && c[n] < grid ? c[n] : grid;
  }

  private windowCeil(ts: number): number {
    return Math.ceil(ts / this.windowMs) * this.windowMs;
  }

  private async newSegment(created = journalNow()): Promise<Segment> {
    const number = (this.order.length ? this.order[this.order.length - 1] : 0) + 1;
    if (!this.journalId) this.journalId = randomBytes(8).toString("hex");
    const path = this.segmentPath(number);
    const file = BlockFile.open(path, { create: true, size: this.o.segmentBytes, inlineWrites: true });
    try {
      await file.write(
        encodeSegmentHeader({
          segment: number,
          journalId: this.journalId,
          blockSize: this.blockSize,
          windowMs: this.windowMs,
          created,
        }),
        0,
      );
      await file.sync();
    } catch (e) {
      file.close();
      rmSync(path, { force: true });
      throw e;
    }
    const seg: Segment = {
      number,
      path,
      file,
      size: SEGMENT_HEADER,
      firstEntry: this.index.length,
      lastTs: 0,
      residentUntil: 0,
      partialUntil: 0,
      syncing: 0,
      fresh: true,
    };
    this.segments.set(number, seg);
    this.order.push(number);
    return seg;
  }

  // ---- sessions and the write path

  /** A partial journal for one client session (NBD connection). */
  openSession(label: string): JournalSession {
    const s = new JournalSession(this.slots++ % 32, label);
    this.sessions.add(s);
    return s;
  }

  /** The session is gone (what it staged still commits). */
  closeSession(s: JournalSession): void {
    if (s.staged.length === 0 && s.merges.length === 0) this.sessions.delete(s);
    else void this.commit().finally(() => this.sessions.delete(s));
  }

  /** True when the journal is taking images. */
  get running(): boolean {
    return this.stoppedAt === null && !this.closed;
  }

  /**
   * With the journal not running: null when a change may go on unjournaled, else the error to fail
   * it with (a stop the state file could not record yet; retried here at most once a second).
   */
  unjournaledRefusal(): IoError | null {
    if (!this.stopUnrecorded) return null;
    const now = performance.now();
    if (now - this.stopRetryAt >= 1000 && this.stoppedAt !== null) {
      this.stopRetryAt = now;
      if (this.writeState({ stoppedAt: this.stoppedAt.ts })) {
        this.stopUnrecorded = false;
        this.log.warn("journal: the stop is recorded now; primary writes go on, without before-images");
        return null;
      }
    }
    return new IoError(
      constants.errno.EIO,
      "journal",
      "the journal stopped and its state file cannot record it: writes are refused until it can",
    );
  }

  /**
   * Does `block`, changed at `ts`, need a before-image? Not if it already has one in ts's merge
   * window (then `session` is recorded as a contributing source).
   *
   * A large change marks its blocks a slice at a time (filter.ts), under its block locks, so a
   * change stamped later may have moved the window on, or filled it, in the meantime: then its
   * blocks are imaged without a mark (an extra image of a block is harmless: a view takes the
   * block's first entry at or after its point), and the newer window's map is left alone.
   * `large`: the change is such a one; its marks go into pages (see `bulk`), not the map.
   */
  needsImage(block: number, ts: number, session: JournalSession, large = false): boolean {
    let w = this.windowFloor(ts);
    if (w < this.windowStart) return true; // the window ended while the change marked its blocks
    if (
      w === this.windowStart &&
      this.inWindow.size + this.bulkMarks >= MAX_IN_WINDOW &&
      ts > w &&
      ts >= this.newestStamp &&
      (this.cuts.length === 0 || ts > this.cuts[this.cuts.length - 1])
    ) {
      // The window has imaged MAX_IN_WINDOW blocks (a huge trim or write in a long window): end it
      // at `ts`, as a bookmark would (no change is stamped after ts, so every change marking in
      // this window is stamped before it). Its blocks are imaged afresh from here on: more images,
      // never fewer, and the map stays bounded (V8's Map also stops at 2^24 entries).
      this.cuts.push(ts);
      w = ts;
    }
    if (w !== this.windowStart) {
      this.windowStart = w;
      this.inWindow.clear();
      this.bulk.clear();
      this.bulkMarks = 0;
    }
    const bit = 1 << session.slot;
    let have = this.inWindow.get(block);
    if (have === undefined && this.bulkMarks > 0) {
      const page = this.bulk.get(Math.floor(block / MARK_PAGE));
      const x = page === undefined ? 0 : page[block % MARK_PAGE];
      if (x !== 0) {
        // Marked by a large change: a merge note as below, the sources kept in its page.
        if ((x & bit) === 0) {
          page![block % MARK_PAGE] = x | bit;
          session.merges.push({ block, ts, slot: session.slot });
        }
        return false;
      }
    }
    if (have === undefined) {
      // A full window that cannot be cut at ts (a change stamped later marked in it): an image,
      // unmarked, so the map stays bounded.
      if (this.inWindow.size + this.bulkMarks >= MAX_IN_WINDOW) return true;
      if (!large) this.inWindow.set(block, bit);
      else {
        const n = Math.floor(block / MARK_PAGE);
        let page = this.bulk.get(n);
        if (page === undefined) this.bulk.set(n, (page = new Uint32Array(MARK_PAGE)));
        page[block % MARK_PAGE] = bit;
        this.bulkMarks++;
      }
      return true;
    }
    // One merge note per session and block in a window, not one per write.
    if ((have & bit) === 0) {
      this.inWindow.set(block, (have |= bit));
      session.merges.push({ block, ts, slot: session.slot });
    }
    return false;
  }

  /** Blocks marked in the current merge window: in the map (small changes), in pages (large). */
  windowMarks(): { map: number; paged: number } {
    return { map: this.inWindow.size, paged: this.bulkMarks };
  }

  /**
   * `blocks[from..]`, marked as imaged by needsImage for a change stamped `ts`, get no image after
   * all, and must not stay marked, or the next change of the block in this window would skip its
   * before-image: the change failed before their images were committed (a read of the primary
   * failed), or it leaves them as they are (a trim of blocks that read as zeroes). The caller
   * still holds the blocks' locks, so nobody else marked them. Images of them already staged
   * still commit (they hold the unchanged contents: harmless).
   */
  forgetImages(blocks: readonly number[], from: number, ts: number): void {
    if (this.windowFloor(ts) !== this.windowStart) return; // the window ended: already forgotten
    for (let i = from; i < blocks.length; i++) {
      const b = blocks[i];
      if (this.inWindow.delete(b) || this.bulkMarks === 0) continue;
      const page = this.bulk.get(Math.floor(b / MARK_PAGE));
      if (page === undefined || page[b % MARK_PAGE] === 0) continue;
      page[b % MARK_PAGE] = 0;
      this.bulkMarks--;
    }
  }

  /**
   * A change of the primary stamped `ts` has begun (the filter, as it stamps it); endChange when
   * it has reached the primary or failed. One map lookup each: the write path stays cheap.
   */
  beginChange(ts: number): number {
    if (ts > this.newestStamp) this.newestStamp = ts;
    const w = this.windowFloor(ts);
    const c = this.changes.get(w);
    if (c === undefined) this.changes.set(w, { n: 1, drained: [] });
    else c.n++;
    return w;
  }

  /**
   * The change counted under `key` (what beginChange returned: the window may have been cut since,
   * see needsImage, so it is not recomputed from the stamp) has reached the primary or failed.
   */
  endChange(key: number): void {
    const c = this.changes.get(key);
    if (c === undefined || --c.n > 0) return;
    this.changes.delete(key);
    for (const d of c.drained) d();
  }

  /**
   * Null when every change stamped before `point` (a window start) has reached the primary or
   * failed, else a promise of that. A view at `point` is built after it: a change stamped before
   * the point but applied after it would otherwise show in the view after the view first read
   * the block's older contents (its image is older than the point, so it never joins the map).
   */
  settled(point: number): Promise<void> | null {
    const waits: Promise<void>[] = [];
    for (const [w, c] of this.changes) {
      if (w < point) waits.push(new Promise<void>((r) => c.drained.push(r)));
    }
    return waits.length === 0 ? null : Promise.all(waits).then(() => {});
  }

  /** Stage a before-image (null: the block reads as zeroes) in a session's partial journal. */
  stage(
    session: JournalSession,
    block: number,
    ts: number,
    data: Buffer | null,
    holder: ImageHolder | null = null,
  ): void {
    session.staged.push({ block, ts, slot: session.slot, data, holder });
  }

  /** Make everything staged so far durable (group commit). */
  commit(): Promise<void> {
    if (this.stoppedAt !== null) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      this.commitWaiters.push({ resolve, reject });
      this.scheduleRound();
    });
  }

  /** Start a commit round on the next turn of the loop (so the whole tick stages first). */
  private scheduleRound(): void {
    if (this.roundScheduled || this.roundsInFlight >= MAX_ROUNDS) return;
    this.roundScheduled = true;
    setImmediate(() => this.startRound());
  }

  /**
   * One commit round: take everything staged, append it (write phases run one at a time, in
   * round order), fdatasync, then tell the listeners and wake the waiters, in round order.
   * Rounds overlap: the next one appends and syncs while this one's fdatasync is in flight.
   */
  private startRound(): void {
    this.roundScheduled = false;
    if (this.commitWaiters.length === 0) return;
    const waiters = this.commitWaiters;
    this.commitWaiters = [];
    // Plain loops: a 768 MiB trim stages ~200k images, too many for push(...spread).
    const images: Staged[] = [];
    const merges: { block: number; ts: number; slot: number }[] = [];
    for (const s of this.sessions) {
      for (const x of s.staged) images.push(x);
      for (const x of s.merges) merges.push(x);
      s.staged = [];
      s.merges = [];
    }
    this.roundsInFlight++;
    let range: [number, number] | null = null;
    const written = this.writeTail.then(async () => {
      if (this.stoppedAt !== null) return null;
      const from = this.index.length;
      let seg: Segment | null;
      try {
        seg = await this.append(images, merges);
      } finally {
        for (const x of images) x.holder?.release();
      }
      range = [from, this.index.length];
      return seg;
    });
    this.writeTail = written.then(
      () => {},
      () => {},
    );
    const synced = written.then((seg) => {
      if (seg === null) return;
      seg.syncing++;
      return seg.file.sync().finally(() => seg.syncing--);
    });
    const done = Promise.all([this.doneTail, synced.catch((e: unknown) => this.stop(e as Error))]).then(
      () => {
        this.roundsInFlight--;
        try {
          if (range !== null && range[1] > range[0] && this.stoppedAt === null) {
            // A listener that cannot keep its view exact (an open snapshot copying a lease hit a
            // read error): as any journal failure, the journal stops and says so.
            const failed = this.notify(range[0], range[1]);
            if (failed !== null) this.stop(failed);
          }
        } finally {
          // A stopped journal does not fail primary writes: they go on, unjournaled (unless the
          // stop could not be recorded: see unjournaledRefusal).
          const refused = this.stoppedAt !== null ? this.unjournaledRefusal() : null;
          for (const w of waiters) {
            if (refused === null) w.resolve();
            else w.reject(refused);
          }
          if (this.commitWaiters.length > 0) this.scheduleRound();
        }
      },
    );
    // The next round waits for this one; whatever happened here, it must not wait forever.
    this.doneTail = done.catch((e: unknown) =>
      this.log.error(`journal: commit round: ${(e as Error).message}`),
    );
  }

  /**
   * Append images (and merge notes) as records in the active segment(s); returns the segment the
   * caller must fdatasync (a segment filled on the way is synced here), null when nothing was
   * written.
   */
  private async append(
    images: Staged[],
    merges: { block: number; ts: number; slot: number }[],
  ): Promise<Segment | null> {
    if (images.length === 0 && merges.length === 0) return null;
    images.sort((a, b) => a.ts - b.ts);
    merges.sort((a, b) => a.ts - b.ts);
    const toWrite = (xs: Staged[]): EntryToWrite[] =>
      xs.map((x) => ({
        block: x.block,
        ts: x.ts,
        sources: 1 << x.slot,
        flags: x.data === null ? ENTRY_ZERO : 0,
        data: x.data,
      }));
    const mergeEntries: EntryToWrite[] = merges.map((m) => ({
      block: m.block,
      ts: m.ts,
      sources: 1 << m.slot,
      flags: ENTRY_ZERO,
      data: null,
    }));
    // Cut into records that fit a segment.
    const room = this.o.segmentBytes - SEGMENT_HEADER - RECORD_HEADER;
    const chunks: { type: number; entries: EntryToWrite[] }[] = [];
    let cur: EntryToWrite[] = [];
    let curSize = 0;
    for (const e of toWrite(images)) {
      const n = 24 + (e.data ? this.blockSize : 0);
      if (curSize + n > room && cur.length) {
        chunks.push({ type: REC.IMAGES, entries: cur });
        cur = [];
        curSize = 0;
      }
      cur.push(e);
      curSize += n;
    }
    if (cur.length) chunks.push({ type: REC.IMAGES, entries: cur });
    if (mergeEntries.length) chunks.push({ type: REC.MERGES, entries: mergeEntries });

    let seg = this.segments.get(this.order[this.order.length - 1])!;
    for (const chunk of chunks) {
      const size = recordSize(chunk.entries, this.blockSize);
      if (seg.size + size > this.o.segmentBytes) {
        await seg.file.sync();
        seg = await this.newSegment();
      }
      // A pooled buffer, not a fresh one per round: see util/buffer-pool.ts (external memory).
      const pooled = acquire(size);
      const recordSeq = ++this.recordSeq;
      const at = seg.size;
      try {
        const buf = pooled.subarray(0, size);
        encodeRecord(buf, 0, chunk.type, recordSeq, chunk.entries, this.blockSize);
        // A segment created by this process is a hole past what it appended (see holesFrom).
        if (seg.fresh) seg.file.holesFrom = at;
        await seg.file.write(buf, at);
      } finally {
        release(pooled);
      }
      seg.size += size;
      // Index only once the bytes are in the file; listeners hear after the fdatasync below.
      this.applyRecord(
        chunk.type,
        chunk.entries,
        seg.number,
        at + RECORD_HEADER + 24 * chunk.entries.length,
        recordSeq,
      );
      seg.lastTs = Math.max(seg.lastTs, chunk.entries[chunk.entries.length - 1].ts);
    }
    return seg;
  }

  private stop(e: Error): void {
    if (this.stoppedAt !== null) return;
    const code = errnoName(errnoOf(e));
    this.stoppedAt = { ts: journalNow(), reason: `${code}: ${e.message}` };
    this.inWindow.clear();
    this.bulk.clear();
    this.bulkMarks = 0;
    if (!this.writeState({ stoppedAt: this.stoppedAt.ts })) {
      this.stopUnrecorded = true;
      this.stopRetryAt = performance.now();
    }
    const writes = this.stopUnrecorded
      ? "Its state file cannot record the stop either, so primary writes are REFUSED (EIO) until it " +
        "can (a restart would otherwise offer points in time that unjournaled writes changed; check " +
        `the disk of ${this.dir})`
      : "Primary writes continue WITHOUT before-images";
    this.log.error(
      `JOURNAL STOPPED: ${e.message}. ${writes}: no point in time is ` +
        `available until the journal restarts (free space in ${this.dir}, or restart with a lower ` +
        `--pit-max-bytes that this disk can hold; ` +
        `it retries every ${RESTART_INTERVAL_MS / 1000} s)`,
    );
    this.notify(-1, -1);
    const t = setInterval(() => void this.tryRestart(t), RESTART_INTERVAL_MS);
    t.unref();
    this.timers.push(t);
  }

  /** Tell every listener (each one, whatever another throws); the first error, or null. */
  private notify(from: number, to: number): Error | null {
    let failed: Error | null = null;
    for (const l of this.listeners) {
      try {
        l(from, to);
      } catch (e) {
        this.log.error(`journal: a snapshot view failed to follow the journal: ${(e as Error).message}`);
        failed ??= e as Error;
      }
    }
    return failed;
  }

  private async tryRestart(timer: NodeJS.Timeout): Promise<void> {
    if (this.stoppedAt === null || this.closed) return;
    this.enforceRetention();
    let seg: Segment;
    try {
      seg = await this.newSegment();
    } catch {
      return; // still no room
    }
    if (this.stoppedAt === null || this.closed) return;
    const earliest = this.windowCeil(journalNow());
    // Durable before the first image of the restarted journal is taken (stoppedAt is still set,
    // so none is): a later process start must not offer the points before or during the gap.
    if (!this.writeState({ earliest })) {
      this.log.limited("error", "restart state", "journal: cannot record the restart in its state file");
      this.dropNewest(seg);
      return; // try again later
    }
    clearInterval(timer);
    this.earliestTs = Math.max(this.earliestTs, earliest);
    this.stopUnrecorded = false; // the restart's record supersedes the stop's
    this.expireBookmarks("with the stop of the journal");
    this.log.warn(
      `journal restarted; points in time from ${new Date(this.earliestTs).toISOString()} on ` +
        `(the journal was stopped since ${new Date(this.stoppedAt.ts).toISOString()})`,
    );
    this.stoppedAt = null;
  }

  /**
   * Log a step of the wall clock (the journal's timestamps follow it; see clock.ts). A step back
   * makes the wall times from the new time to the old one pass twice: snap@ one of them could mean
   * either passing, so they are recorded (durably, in the state file) and refused.
   */
  private clockStepped(s: ClockStep): void {
    if (this.closed) return;
    const secs = (Math.abs(s.by) / 1000).toFixed(1);
    if (s.by < 0 && !this.recordPassedTwice([s.at, Math.max(s.at - s.by, s.holdUntil ?? 0)])) {
      this.log.error("journal: cannot record the wall clock's step back in its state file");
    }
    if (Math.abs(s.by) < REPORT_MS) {
      // Recorded (a step back shorter than a second still makes windows of a short --pit-window
      // pass twice), but not worth a warning.
      this.log.debug(`journal: the wall clock stepped ${s.by.toFixed(1)} ms`);
      return;
    }
    if (s.holdUntil === null) {
      this.log.warn(
        `journal: the wall clock ${s.by > 0 ? "jumped forward" : "went back"} ${secs} s ` +
          `(set, corrected by NTP, or resumed from a pause); timestamps follow it from ${new Date(s.at).toISOString()}`,
      );
    } else {
      this.log.warn(
        `journal: the wall clock went back ${secs} s (set, or corrected by NTP); timestamps hold at ` +
          `${new Date(s.holdUntil).toISOString()} until the clock reaches it again (changes made meanwhile ` +
          "fall into that merge window); snap@ a time that passes twice is refused (use a bookmark)",
      );
    }
  }

  /** Undo newSegment (a restart that could not record itself). */
  private dropNewest(seg: Segment): void {
    if (this.order[this.order.length - 1] !== seg.number) return;
    this.order.pop();
    this.segments.delete(seg.number);
    if (this.lastSegNo === seg.number) this.lastSeg = null;
    seg.file.close();
    rmSync(seg.path, { force: true });
  }

  // ---- reading

  /**
   * When the first point in time of a running journal will exist, if it does not yet (within the
   * first merge window of a new or restarted journal); null when one exists or the journal stopped.
   */
  firstPointAt(): number | null {
    if (this.stoppedAt !== null) return null;
    return this.earliestTs > journalNow() ? this.earliestTs : null;
  }

  /** The available points in time. */
  window(): JournalWindow {
    const now = journalNow();
    if (this.stoppedAt !== null) {
      return {
        earliest: null,
        latest: now,
        windowMs: this.windowMs,
        stopped: { at: new Date(this.stoppedAt.ts).toISOString(), reason: this.stoppedAt.reason },
      };
    }
    return {
      earliest: this.earliestTs <= now ? this.earliestTs : null,
      latest: now,
      windowMs: this.windowMs,
      stopped: null,
    };
  }

  /** Ranges of wall time [from, to] that passed twice (the clock went back), oldest first. */
  passedTwice(): [number, number][] {
    return this.passedTwiceRanges.map((r) => [r[0], r[1]]);
  }

  /** A range of wall time that passed twice and meets [ts, to], or null. */
  passedTwiceAt(ts: number, to = ts): [number, number] | null {
    for (const r of this.passedTwiceRanges) if (r[0] <= to && r[1] >= ts) return [r[0], r[1]];
    return null;
  }

  /** Add a range of wall time that passed twice and store it in the state file (false: not stored). */
  private recordPassedTwice(range: [number, number]): boolean {
    this.passedTwiceRanges.push(range);
    this.trimPassedTwice();
    return this.writeState(
      this.stoppedAt !== null ? { stoppedAt: this.stoppedAt.ts } : { earliest: this.earliestTs },
    );
  }

  /** Forget ranges before the earliest point in time, and all but the newest MAX_PASSED_TWICE. */
  private trimPassedTwice(): void {
    const r = this.passedTwiceRanges.filter((x) => x[1] >= this.earliestTs);
    this.passedTwiceRanges = r.slice(Math.max(0, r.length - MAX_PASSED_TWICE));
  }

  /** The start of the merge window containing `ts` (what snap@ts shows). */
  pointOf(ts: number): number {
    return this.windowFloor(ts);
  }

  /** Read entry i's before-image (or part of it) into buf (DONE when read inline). */
  readImage(i: number, buf: Buffer, within = 0): Promise<void> {
    const off = this.index.offAt(i);
    if (off < 0) {
      buf.fill(0);
      return DONE;
    }
    const seg = this.segments.get(this.index.segAt(i));
    if (!seg) return Promise.reject(new Error(`journal segment ${this.index.segAt(i)} was dropped`));
    return seg.file.read(buf, off + within);
  }

  /**
   * Where bytes [within, within+length) of entry i's image lie, for a lent read (read when the
   * socket has room): its segment file's descriptor (the image starts at `offAt(i)` there), -1
   * for a zero image, or -2 when its segment is gone, the journal is closed, or those bytes are not
   * all in the page cache (reading them could wait for the disk on the event loop). A segment's
   * written bytes are checked whole (cachestat) and the answer is kept for a second (bytes
   * appended meanwhile were just written, so cached; a page evicted within that second costs one
   * blocking read). When the segment is not wholly cached (a page of it was evicted: memory
   * pressure, or a host that reclaims cold page cache on its own), each image's own bytes are
   * checked instead, so that one evicted page does not make every image of a 64 MiB segment
   * unlendable. `now` is performance.now() (one clock read per caller's batch). Called per
   * journal block of a lent read, so the last segment looked up is remembered.
   */
  residentFd(i: number, now: number, within: number, length: number): number {
    const off = this.index.offAt(i);
    if (off < 0) return -1;
    if (this.closed) return -2;
    const n = this.index.segAt(i);
    let seg = this.lastSeg;
    if (seg === null || this.lastSegNo !== n) {
      seg = this.segments.get(n) ?? null;
      if (seg === null) return -2;
      this.lastSeg = seg;
      this.lastSegNo = n;
    }
    if (now >= seg.residentUntil && now >= seg.partialUntil) {
      if (isCached(seg.file.fd, 0, seg.size)) seg.residentUntil = now + RESIDENT_MS;
      else seg.partialUntil = now + RESIDENT_MS;
    }
    if (now < seg.residentUntil || isCached(seg.file.fd, off + within, length)) return seg.file.fd;
    return -2;
  }

  /** Whether entry i's image can still be read (a zero image, or its segment is kept). */
  hasImage(i: number): boolean {
    return !this.closed && (this.index.offAt(i) < 0 || this.segments.has(this.index.segAt(i)));
  }

  /** Hear about entries appended (from, to); (-1, -1) when the journal stops. */
  subscribe(l: AppendListener): () => void {
    this.listeners.add(l);
    return () => this.listeners.delete(l);
  }

  /**
   * Keep segments holding entries from index `from` on (an open snapshot, named `label` in the
   * log). When the journal is over --pit-max-bytes and this pin holds its oldest segment,
   * `revoke` is called once: the owner must fail its reads from then on and unpin once no read
   * of its is in flight (a segment's descriptor is closed when it is dropped).
   */
  pin(
    owner: object,
    from: number,
    label = "a snapshot",
    revoke: ((why: string) => void) | null = null,
  ): void {
    const seg = from < this.index.length ? this.index.segAt(from) : (this.order[this.order.length - 1] ?? 0);
    this.pins.set(owner, { seg, label, revoke });
  }

  unpin(owner: object): void {
    this.pins.delete(owner);
  }

  // ---- retention and bookmarks

  /** Bytes in segment files. */
  get bytes(): number {
    let n = 0;
    for (const s of this.segments.values()) n += s.size;
    return n;
  }

  get segmentCount(): number {
    return this.order.length;
  }

  /**
   * Drop the oldest sealed segments beyond the age or size limit. An open snapshot holds back the
   * age limit for as long as it is open; not the size limit, which is what keeps the journal's
   * disk from filling (a full disk would stop the journal and lose every point in time): over
   * --pit-max-bytes, the snapshots that hold the oldest segment are revoked, as LVM invalidates
   * a snapshot that overflows, and retention goes on once they have unpinned.
   */
  enforceRetention(): void {
    const now = journalNow();
    const minPinned = (): number => {
      let m = Infinity;
      for (const p of this.pins.values()) m = Math.min(m, p.seg);
      return m;
    };
    while (this.order.length > 1) {
      const oldest = this.segments.get(this.order[0])!;
      // An empty sealed segment (a stop and restart can leave one) holds nothing to keep: without
      // this, age retention stopped at it for good.
      const tooOld = oldest.lastTs === 0 || oldest.lastTs < now - this.o.retentionMs;
      const tooBig = this.bytes > this.o.maxBytes;
      if (!tooOld && !tooBig) break;
      if (oldest.syncing > 0) break; // a commit round is still syncing it: next time
      if (oldest.number >= minPinned()) {
        if (tooBig) this.revokePins(oldest.number);
        if (oldest.number >= minPinned()) {
          this.log.limited(
            "warn",
            "retention pinned",
            tooBig
              ? `journal: over --pit-max-bytes; waiting for revoked snapshots' reads in flight (segment ${oldest.number})`
              : `journal: retention waits for an open snapshot (segment ${oldest.number})`,
          );
          break;
        }
      }
      this.dropOldest();
    }
  }

  /** Revoke the open snapshots that hold segment `seg` (the oldest) while over --pit-max-bytes. */
  private revokePins(seg: number): void {
    for (const p of [...this.pins.values()]) {
      if (p.seg > seg || p.revoke === null) continue;
      const revoke = p.revoke;
      p.revoke = null;
      this.log.warn(
        `journal: ${this.bytes} bytes, over --pit-max-bytes (${this.o.maxBytes}); revoking ${p.label}, ` +
          `which holds the oldest segment (${seg}): its reads fail with EIO from now on`,
      );
      revoke(
        `revoked: the journal reached --pit-max-bytes (${this.o.maxBytes} bytes) while this snapshot ` +
          "held its oldest segment; open a later point in time",
      );
    }
  }

  private dropOldest(): void {
    const n = this.order.shift()!;
    const seg = this.segments.get(n)!;
    this.segments.delete(n);
    if (this.lastSegNo === n) this.lastSeg = null;
    const next = this.order.length ? this.segments.get(this.order[0])!.firstEntry : this.index.length;
    let newest = 0;
    for (let i = this.index.first; i < next; i++) newest = Math.max(newest, this.index.tsAt(i));
    this.index.dropBelow(next);
    // The first point after the window of the newest dropped entry. (Not windowFloor + windowMs:
    // from a bookmark's cut that lands inside a later window, a time no snap@ can open, and it
    // expired bookmarks taken after the dropped window had ended.)
    if (newest > 0) this.earliestTs = Math.max(this.earliestTs, this.windowEnd(newest));
    seg.file.close();
    rmSync(seg.path, { force: true });
    // Durable in order: after a crash, never a newer segment gone and an older one back (a gap
    // that recovery would take for continuous history).
    syncDir(this.dir);
    // So that a restart offers the same earliest point (and the bookmarks from it) as now.
    this.lastDrop = { segment: n, earliest: this.earliestTs };
    if (this.stoppedAt === null) this.writeState({ earliest: this.earliestTs });
    this.droppedBytes += seg.size;
    this.expireBookmarks("with the oldest segment");
    this.trimPassedTwice(); // in memory; the state file is trimmed when next written or reopened
    this.log.info(
      `journal: dropped segment ${n}; points in time from ${new Date(this.earliestTs).toISOString()}`,
    );
  }

  /** Forget bookmarks older than the earliest point (they can no longer be opened). */
  private expireBookmarks(why: string): void {
    let changed = false;
    for (const [name, ts] of this.bookmarks) {
      if (ts < this.earliestTs) {
        this.bookmarks.delete(name);
        changed = true;
        this.log.info(`journal: bookmark "${name}" expired ${why}`);
      }
    }
    if (changed) {
      try {
        this.saveBookmarks();
      } catch (e) {
        this.log.warn(`journal: could not save the bookmarks: ${(e as Error).message}`);
      }
    }
  }

  private bookmarksPath(): string {
    return join(this.dir, "bookmarks.json");
  }

  private loadBookmarks(): void {
    const p = this.bookmarksPath();
    if (!existsSync(p)) return;
    const o = JSON.parse(readFileSync(p, "utf8")) as Record<string, number>;
    for (const [k, v] of Object.entries(o))
      if (typeof v === "number" && v >= this.earliestTs) this.bookmarks.set(k, v);
  }

  private saveBookmarks(): void {
    writeFileAtomicSync(this.bookmarksPath(), JSON.stringify(Object.fromEntries(this.bookmarks), null, 1));
  }

  /**
   * Record a named point in time (now by default); durable when it returns. A name already taken
   * is a usage error unless `replace` is set (moving it loses the earlier point's bookmark).
   */
  mark(name: string, ts = journalNow(), opts: { replace?: boolean } = {}): number {
    if (!/^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$/.test(name)) {
      const shown = name.length > 72 ? `${name.slice(0, 64)}..." (${name.length} characters)` : `${name}"`;
      throw new UsageError(
        `bookmark name "${shown} must be 1-64 letters, digits, '.', '_', ':' or '-', ` +
          "beginning with a letter or digit",
      );
    }
    if (/^\d{4}-\d{2}-\d{2}/.test(name)) {
      throw new UsageError(
        `bookmark name "${name}" reads as a time (snap@${name} would mean that time); choose another`,
      );
    }
    const had = this.bookmarks.get(name);
    if (had !== undefined && !opts.replace) {
      throw new UsageError(
        `bookmark "${name}" exists (at ${new Date(had).toISOString()}); pass --replace to move it ` +
          "to now, or choose another name",
      );
    }
    const w = this.window();
    if (w.stopped)
      throw new Error(`the journal is stopped (${w.stopped.reason}): no point in time can be marked`);
    if (w.earliest === null) {
      throw new Error(
        `no point in time exists yet: the first one is ${new Date(this.earliestTs).toISOString()} ` +
          `(the journal began inside a merge window)`,
      );
    }
    // End the merge window here: changes stamped from now on image their blocks afresh, so the
    // journal holds every block's contents at exactly `ts` (journalNow() is strictly later than
    // every change stamped before this call).
    if (this.cuts.length === 0 || ts > this.cuts[this.cuts.length - 1]) this.cuts.push(ts);
    this.bookmarks.set(name, ts);
    this.saveBookmarks();
    return ts;
  }

  /** Bookmarks: name -> time. */
  listBookmarks(): Map<string, number> {
    return new Map(this.bookmarks);
  }

  /** Flush what is staged and close the segments. */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.commit().catch(() => {});
    await this.doneTail;
    this.closed = true;
    for (const t of this.timers) clearInterval(t);
    this.unhearClock?.();
    for (const s of this.segments.values()) s.file.close();
    this.lastSeg = null;
  }
}

/** Decode only a record's entry table (sealed segments: their records were fsynced whole). */
function decodeTable(
  rec: Buffer,
  blockSize: number,
  size: number,
): {
  type: number;
  entries: { block: number; ts: number; sources: number; flags: number }[];
  dataStart: number;
  recordSeq: number;
} | null {
  const head = peekRecord(rec, 0);
  if (head === null) return null;
  const entries = [];
  let withData = 0;
  for (let i = 0; i < head.count; i++) {
    const e = RECORD_HEADER + 24 * i;
    const flags = rec.readUInt32LE(e + 20);
    entries.push({
      block: rec.readUInt32LE(e) + rec.readUInt32LE(e + 4) * 0x100000000,
      ts: rec.readDoubleLE(e + 8),
      sources: rec.readUInt32LE(e + 16),
      flags,
    });
    if (!(flags & ENTRY_ZERO)) withData++;
  }
  if (size !== RECORD_HEADER + 24 * head.count + withData * blockSize) return null;
  return {
    type: head.type,
    entries,
    dataStart: RECORD_HEADER + 24 * head.count,
    recordSeq: rec.readUInt32LE(32) + rec.readUInt32LE(36) * 0x100000000,
  };
}

/** What the state file holds (docs/pit-journal.md). */
interface JournalState {
  /** The journal is stopped since then (no point in time is exact). */
  stoppedAt?: number;
  /** Exact points in time exist from this window start on (set when a stop ended). */
  earliest?: number;
  /** Wall times that passed twice (the clock went back): [from, to] pairs, oldest first. */
  passedTwice?: [number, number][];
  /**
   * The newest segment retention dropped, and the earliest point that left (the first window
   * after its newest entry): a start whose oldest segment is the next one takes that point, which
   * the segments alone cannot tell (they only know when the oldest was created, later).
   */
  dropped?: { segment: number; earliest: number };
}

/** At most this many ranges of wall time that passed twice are kept (the newest). */
const MAX_PASSED_TWICE = 32;

function parseState(text: string, path: string): JournalState {
  const t = text.trim();
  if (!t) return {};
  try {
    return JSON.parse(t) as JournalState;
  } catch (e) {
    throw new Error(`${path}: the journal's state file is unreadable (${(e as Error).message})`);
  }
}

/** The creation time in a segment file's header, null when it has no valid header. */
function headerCreated(path: string): number | null {
  const fd = openSync(path, "r");
  try {
    const head = Buffer.alloc(SEGMENT_HEADER);
    readSync(fd, head, 0, SEGMENT_HEADER, 0);
    return decodeSegmentHeader(head)?.created ?? null;
  } finally {
    closeSync(fd);
  }
}

/**
 * True when the segment file at `path` was created but never got its header: shorter than a
 * header or a header of zero bytes, and no record where the first one would be.
 */
function unbornSegment(path: string): boolean {
  const fd = openSync(path, "r");
  try {
    const head = Buffer.alloc(SEGMENT_HEADER + RECORD_HEADER);
    const n = readSync(fd, head, 0, head.length, 0);
    const header = head.subarray(0, Math.min(n, SEGMENT_HEADER));
    if (n >= SEGMENT_HEADER && header.some((x) => x !== 0)) return false;
    return peekRecord(head.subarray(0, n), SEGMENT_HEADER) === null;
  } finally {
    closeSync(fd);
  }
}

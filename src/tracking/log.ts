// TrackingLog: the persistent, crash-safe side of a DirtyMap, in LevelDB under the state directory,
// with an activity log in the manner of DRBD's.
//
// Notes on the design (the on-disk format is in docs/tracking-log.md)
// - The rule (DESIGN.md "dirty before sent"): after a crash of the proxy at any moment, every block
//   whose latest update the gateway had not durably acknowledged must be dirty. Persisting a bit
//   for every write would cost an fsync per write. Instead:
// - Activity log (AL): a set of "hot" regions (4 MiB each by default, up to `alExtents` of them).
//   Before a write to a region outside the AL may touch the primary or leave for a gateway, the
//   region is added to the AL and the AL is made durable (one LevelDB batch with sync). Inside
//   active regions, bits change in memory only. After a crash, every region in the stored AL is
//   taken as wholly dirty. So a crash costs a resync of at most the hot regions, and never misses
//   a block (the price DRBD pays too; `alExtents` trades that cost against fsyncs).
// - Leaving the AL: when it is full, the least recently used region is evicted; its chunk of the
//   bitmap is written in the same synced batch as the new AL, so its dirty bits are durable before
//   the AL stops covering them.
// - Everything else is lazy: changed bitmap chunks are written every few seconds (no sync) and at
//   close; losing those writes in a crash only means blocks that were already clean are resynced.
// - A cleared bit outside the AL must also hold after a crash of the *primary's* disk: the gateway
//   made the update durable, but the primary's own write may still sit in its page cache, and a
//   crash there loses it while the secondary keeps it (found by a power-cut simulator). So, as
//   DRBD writes its AL transactions with a pre-flush, a batch that stores cleared bits of regions
//   the AL no longer covers (an eviction of a region with clears since it was stored; a lazy
//   persist after a clear outside the AL; the close) runs after
//   an fdatasync of the primary (`primaryFlush`), in the db's chain. Bits are encoded before that
//   flush starts, so every clear it stores is of a primary write completed before it. A primary
//   whose flush fails cannot say what it lost: the full-resync mark is set (primaryFailed).
// - Concurrent activations share one batch (group commit); a batch in flight makes later ones wait.
// - A clean close writes every chunk and an empty AL, and records cleanShutdown.
// - Writes to the db land in the order their batches were encoded (one chain): LevelDB batches run
//   on the thread pool, and a lazy persist encoded before an eviction's synced batch must not land
//   after it (the chunk would go back to an older copy without bits the eviction stored, for a
//   region the AL no longer covers); likewise a persist still in flight at close.
// - Generations: each open bumps `generation` (the gateway API's X-Blockfork-Generation); sequence
//   numbers restart at 1 in each generation, so nothing about them needs persisting.
// - When the log cannot be written (the state directory's disk full, an I/O error), the proxy must
//   neither lose the rule above nor fail the primary's writes for it (a replication problem is not
//   a reason to stop the volume; the journal behaves the same way). So a small file beside the
//   database, `full-resync`, is written full of zeroes at every open, which allocates its blocks
//   while there is room; a failure overwrites it in place with a mark (no allocation, so it works
//   on a full disk) and syncs it. From then on every block counts as durably dirty: the log stops
//   writing, writes no longer wait for the activity log, the in-memory map goes on serving the
//   link, and the next open that finds the mark takes every block as dirty (a full resync, as
//   DRBD does when it loses its metadata) and clears the mark only once that is durable. Only if
//   the mark itself cannot be written are writes refused, as before: then nothing durable would
//   say what the secondary lacks.

import { randomBytes } from "node:crypto";
import { closeSync, mkdirSync, openSync, readSync } from "node:fs";
import { join } from "node:path";
import { Level } from "level";
import type { Logger } from "../log.js";
import { UsageError } from "../errors.js";
import { DONE } from "../util/done.js";
import { allocateInPlace, writeInPlace } from "../util/atomic.js";
import { DirtyMap, type DirtyGeometry } from "./dirty-map.js";

export const TRACKING_FORMAT = 1;
/** Default bytes per dirty bit. */
export const DEFAULT_GRANULARITY = 64 * 1024;
/** Default activity-log region. */
export const DEFAULT_REGION = 4 * 1024 * 1024;
/** Default number of active regions (4 GiB hot at 4 MiB). */
export const DEFAULT_AL_EXTENTS = 1024;
const PERSIST_INTERVAL_MS = 5000;
/** The full-resync mark's file in the state directory, its size, and how a set mark begins. */
export const FULL_RESYNC_FILE = "full-resync";
const MARK_SIZE = 4096;
const MARK_MAGIC = "blockfork full-resync 1\n";

/** What a set full-resync mark says: when the log failed and why. */
export interface FullResyncMark {
  since: string;
  reason: string;
}

/** Read the full-resync mark in `dir`: null when the file is absent or holds no mark. */
export function readFullResyncMark(dir: string): FullResyncMark | null {
  let fd: number;
  try {
    fd = openSync(join(dir, FULL_RESYNC_FILE), "r");
  } catch (e) {
    if ((e as { code?: string }).code === "ENOENT") return null;
    throw e;
  }
  try {
    const b = Buffer.alloc(MARK_SIZE);
    const n = readSync(fd, b, 0, MARK_SIZE, 0);
    const text = b.subarray(0, n).toString("utf8");
    if (!text.startsWith(MARK_MAGIC)) return null;
    const line = text.slice(MARK_MAGIC.length, text.indexOf("\n", MARK_MAGIC.length));
    try {
      const m = JSON.parse(line) as Partial<FullResyncMark>;
      return { since: String(m.since ?? "?"), reason: String(m.reason ?? "?") };
    } catch {
      return { since: "?", reason: "(unreadable)" };
    }
  } finally {
    closeSync(fd);
  }
}

/** What the log records about itself. */
export interface TrackingMeta {
  format: number;
  volumeSize: number;
  granularity: number;
  regionSize: number;
  /** Identity of this proxy's sequence space (X-Blockfork-Source). */
  source: string;
  generation: number;
  /** The gateway the map is relative to. */
  gateway: string;
  /**
   * The secondary the map is relative to: the id its gateway reports (health `secondaryId`, new
   * for every new secondary). Absent until the gateway was first reached (or in an older log).
   */
  secondary?: string;
  created: string;
  cleanShutdown: boolean;
}

/** How to open a tracking log. */
export interface TrackingOptions {
  dir: string;
  volumeSize: number;
  gateway: string;
  granularity?: number;
  regionSize?: number;
  alExtents?: number;
  /** A new log starts clean instead of all dirty: the secondary is known to equal the primary. */
  assumeClean?: boolean;
  log: Logger;
  /** For inspection: do not bump the generation, do not write anything. */
  readOnly?: boolean;
}

/** Why the log marked blocks dirty when it opened. */
export interface RecoveryReport {
  newLog: boolean;
  crashed: boolean;
  /** Regions marked dirty because they were in the activity log at the crash. */
  alRegions: number;
  gatewayChanged: boolean;
  /**
   * The gateway URL changed, but the log knows the secondary's id: nothing marked; the id the
   * gateway reports decides (the same secondary: only what is dirty; another: everything).
   */
  gatewayMoved: { from: string } | null;
  /** The full-resync mark found (a run before could not write the log): everything is dirty. */
  fullResync: FullResyncMark | null;
}

type Db = Level<string, Buffer>;

function chunkKey(c: number): string {
  return `c:${c.toString(16).padStart(8, "0")}`;
}

/** The persistent dirty map of one volume relative to one gateway. */
export class TrackingLog {
  readonly map: DirtyMap;
  readonly meta: TrackingMeta;
  readonly recovery: RecoveryReport;
  private readonly db: Db;
  private readonly log: Logger;
  private readonly capacity: number;
  /** Active regions -> last use (a counter, for LRU). */
  private readonly active = new Map<number, number>();
  private useClock = 0;
  private waiters: { r0: number; r1: number; resolve: () => void; reject: (e: Error) => void }[] = [];
  private committing: Promise<void> | null = null;
  private timer: NodeJS.Timeout | null = null;
  private closed = false;
  private failure: Error | null = null;
  /**
   * fdatasync of the primary, run before a batch that stores cleared bits outside the activity
   * log (see the notes above); null: no primary to flush (tests, inspection).
   */
  primaryFlush: (() => Promise<void>) | null = null;
  /** A bit of a region outside the activity log was cleared since the last batch that stored it. */
  private coldCleared = false;
  /** Regions with a bit cleared since their chunk was last stored (an eviction flushes only then). */
  private readonly clearedRegions = new Set<number>();
  /** Set when the full-resync mark was written after a failure: writes go on (see the notes). */
  private degradedMark: FullResyncMark | null = null;
  /** The full-resync mark's file is allocated and clear (prepareMark), so fail() can set it. */
  private markReady = false;
  private readonly dir: string;
  /** The last db write issued (see "Writes to the db land in the order..."). */
  private dbTail: Promise<void> = Promise.resolve();
  private readonly readOnly: boolean;

  private constructor(
    db: Db,
    map: DirtyMap,
    meta: TrackingMeta,
    recovery: RecoveryReport,
    opts: TrackingOptions,
  ) {
    this.db = db;
    this.map = map;
    this.meta = meta;
    this.recovery = recovery;
    this.log = opts.log;
    this.capacity = opts.alExtents ?? DEFAULT_AL_EXTENTS;
    this.readOnly = opts.readOnly === true;
    this.dir = opts.dir;
  }

  /** Open (or create) the log; recover after a crash. Throws UsageError on a geometry mismatch. */
  static async open(opts: TrackingOptions): Promise<TrackingLog> {
    mkdirSync(opts.dir, { recursive: true });
    const db: Db = new Level<string, Buffer>(opts.dir, { valueEncoding: "buffer" });
    try {
      await db.open();
    } catch (e) {
      const cause = (e as { cause?: { code?: string } }).cause;
      if ((e as { code?: string }).code === "LEVEL_DATABASE_NOT_OPEN" && cause?.code === "LEVEL_LOCKED") {
        throw new UsageError(
          `the tracking log in ${opts.dir} is in use by another process (a running proxy?)`,
        );
      }
      throw e;
    }
    try {
      return await TrackingLog.load(db, opts);
    } catch (e) {
      await db.close();
      throw e;
    }
  }

  private static async load(db: Db, opts: TrackingOptions): Promise<TrackingLog> {
    const stored = await db.get("meta");
    const now = Date.now();
    let meta: TrackingMeta;
    const recovery: RecoveryReport = {
      newLog: false,
      crashed: false,
      alRegions: 0,
      gatewayChanged: false,
      gatewayMoved: null,
      fullResync: readFullResyncMark(opts.dir),
    };
    if (stored === undefined) {
      meta = {
        format: TRACKING_FORMAT,
        volumeSize: opts.volumeSize,
        granularity: opts.granularity ?? DEFAULT_GRANULARITY,
        regionSize: opts.regionSize ?? DEFAULT_REGION,
        source: randomBytes(8).toString("hex"),
        generation: 0,
        gateway: opts.gateway,
        created: new Date(now).toISOString(),
        cleanShutdown: true,
      };
      recovery.newLog = true;
    } else {
      meta = JSON.parse(stored.toString("utf8")) as TrackingMeta;
      if (meta.format !== TRACKING_FORMAT) {
        throw new UsageError(
          `the tracking log in ${opts.dir} has format ${meta.format}; this blockfork reads ${TRACKING_FORMAT}`,
        );
      }
      if (meta.volumeSize !== opts.volumeSize) {
        throw new UsageError(
          `the tracking log in ${opts.dir} belongs to a volume of ${meta.volumeSize} bytes, not ${opts.volumeSize}; ` +
            `use another --state-dir (or remove this one to start over with a full resync)`,
        );
      }
      if (opts.granularity !== undefined && opts.granularity !== meta.granularity) {
        throw new UsageError(
          `the tracking log in ${opts.dir} uses a granularity of ${meta.granularity} bytes; ` +
            `drop --track-granularity or use another --state-dir`,
        );
      }
    }
    const geometry: DirtyGeometry = {
      volumeSize: meta.volumeSize,
      granularity: meta.granularity,
      regionSize: meta.regionSize,
    };
    const map = new DirtyMap(geometry);
    for await (const [key, value] of db.iterator({ gte: "c:", lt: "c;" })) {
      map.decodeChunk(parseInt(key.slice(2), 16), value);
    }
    const al = await db.get("al");
    if (al !== undefined && al.length >= 4) {
      const n = al.readUInt32BE(0);
      for (let i = 0; i < n; i++) {
        const r = al.readUInt32BE(4 + 12 * i);
        const t = al.readDoubleBE(8 + 12 * i);
        // First dirtied: the time the activity log recorded. Last dirtied: writes after that
        // were not recorded, so now, the only bound known (the crash came before it).
        map.markBlocks(r * map.blocksPerRegion, map.blocksPerRegion, t || now);
        map.markBlocks(r * map.blocksPerRegion, map.blocksPerRegion, now);
      }
      recovery.alRegions = n;
      recovery.crashed = n > 0 || !meta.cleanShutdown;
    } else if (!meta.cleanShutdown) {
      recovery.crashed = true;
    }
    if (recovery.fullResync !== null) {
      // A run before this one could not write the log: nothing it says is complete.
      map.markAll(now);
    } else if (recovery.newLog && opts.assumeClean) {
      opts.log.warn("tracking: new log with --assume-clean: the secondary is taken to equal the primary");
    } else if (recovery.newLog) {
      // A new log knows nothing about the secondary: everything must be copied once.
      map.markAll(now);
    } else if (meta.gateway !== opts.gateway) {
      // Another spelling of the same gateway (localhost for 127.0.0.1, a typo fixed) must not cost a
      // whole resync: where the log knows the secondary's id, the link compares it with the one
      // the gateway reports (as DRBD tells its peer by UUID, not by address).
      if (meta.secondary !== undefined) recovery.gatewayMoved = { from: meta.gateway };
      else {
        map.markAll(now);
        recovery.gatewayChanged = true;
      }
    }
    const t = new TrackingLog(db, map, meta, recovery, opts);
    if (!opts.readOnly) {
      meta.generation += 1;
      meta.gateway = opts.gateway;
      meta.cleanShutdown = false;
      const batch = db.batch();
      batch.put("meta", Buffer.from(JSON.stringify(meta)));
      batch.put("al", encodeAl([]));
      for (const c of map.changed) batch.put(chunkKey(c), map.encodeChunk(c));
      await batch.write({ sync: true });
      map.changed.clear();
      // Only now (every block the mark asked for is durably dirty) may the mark be cleared.
      t.prepareMark();
      t.timer = setInterval(() => void t.persist().catch((e: Error) => t.fail(e)), PERSIST_INTERVAL_MS);
      t.timer.unref();
    }
    return t;
  }

  /**
   * Change the meta (the generation, the secondary's id) and, with `markAll`, mark every block
   * dirty first: all in one synced batch. For when the map stops describing the secondary (another
   * secondary behind the gateway, a generation another process used).
   */
  async updateMeta(patch: { generation?: number; secondary?: string }, markAll: boolean): Promise<void> {
    if (markAll) this.map.markAll();
    Object.assign(this.meta, patch);
    await this.persist(true, true).catch((e: Error) => this.fail(e));
  }

  /** Regions currently in the activity log. */
  get activeRegions(): number {
    return this.active.size;
  }

  /**
   * A failure of the log's storage that writes must fail for: only when the full-resync mark
   * could not be written either (see the notes). null while the log works or runs degraded.
   */
  get error(): Error | null {
    return this.degradedMark === null ? this.failure : null;
  }

  /** Set when the log failed and runs from memory: the next open resyncs everything. */
  get degraded(): FullResyncMark | null {
    return this.degradedMark;
  }

  /**
   * Allocate the mark's file, so that fail() can overwrite it in place on a full disk, and clear
   * it. Run once the log has opened: a mark found at open is cleared only now, once the open has
   * made every block durably dirty.
   */
  private prepareMark(): void {
    const path = join(this.dir, FULL_RESYNC_FILE);
    try {
      allocateInPlace(path, MARK_SIZE, 0);
      writeInPlace(path, "", MARK_SIZE, 0);
      this.markReady = true;
    } catch (e) {
      this.log.warn(
        `tracking: cannot prepare ${path} (${(e as Error).message}): should the tracking log fail, ` +
          "writes will be refused instead of going on with a full resync at the next start",
      );
    }
  }

  /**
   * Make the activity log cover [offset, offset+length) durably. DONE when it already does (the
   * common case: no I/O); otherwise the promise of the next AL transaction.
   */
  activate(offset: number, length: number): Promise<void> {
    if (this.failure) return this.degradedMark !== null ? DONE : Promise.reject(this.failure);
    const rs = this.map.regionSize;
    const r0 = Math.floor(offset / rs);
    const r1 = Math.floor((offset + length - 1) / rs);
    let missing = false;
    const use = ++this.useClock;
    for (let r = r0; r <= r1; r++) {
      if (this.active.has(r)) this.active.set(r, use);
      else missing = true;
    }
    if (!missing) return DONE;
    return new Promise<void>((resolve, reject) => {
      this.waiters.push({ r0, r1, resolve, reject });
      if (this.committing === null) this.committing = this.commitSoon();
    });
  }

  /**
   * Group commit of the activity log. Each round takes the waiting writes, first come first
   * served, while all their regions fit in `alExtents` (a single write spanning more regions than
   * that gets them all: it could never proceed otherwise), adds the regions they miss, and evicts
   * the least recently used of the others. Never a region of a write taken in the round, even one
   * active already: that write would then wait for the next round, which could evict another of
   * its regions, and so on.
   */
  private async commitSoon(): Promise<void> {
    await new Promise<void>((r) => setImmediate(r)); // let every write of this tick join
    while (this.waiters.length > 0) {
      const chosen = new Set<number>();
      const keep = new Set<number>();
      for (const w of this.waiters) {
        let more = 0;
        for (let r = w.r0; r <= w.r1; r++) if (!keep.has(r)) more++;
        if (keep.size > 0 && keep.size + more > this.capacity) break;
        for (let r = w.r0; r <= w.r1; r++) {
          keep.add(r);
          if (!this.active.has(r)) chosen.add(r);
        }
      }
      try {
        if (chosen.size > 0) await this.commit(chosen, keep);
      } catch (e) {
        this.fail(e as Error);
        // Degraded: the mark makes every block durably dirty, so the writes may go on.
        for (const w of this.waiters) {
          if (this.degradedMark !== null) w.resolve();
          else w.reject(this.failure!);
        }
        this.waiters = [];
        break;
      }
      const still: typeof this.waiters = [];
      for (const w of this.waiters) {
        let ok = true;
        for (let r = w.r0; r <= w.r1 && ok; r++) ok = this.active.has(r);
        if (ok) w.resolve();
        else still.push(w);
      }
      this.waiters = still;
    }
    this.committing = null;
  }

  /** Add `adding` to the activity log, evicting least recently used regions not in `keep`. */
  private async commit(adding: Set<number>, keep: Set<number>): Promise<void> {
    const use = ++this.useClock;
    const next = new Map(this.active);
    for (const r of adding) next.set(r, use);
    const evicted: number[] = [];
    if (next.size > this.capacity) {
      const victims = [...next.entries()].filter(([r]) => !keep.has(r)).sort((a, b) => a[1] - b[1]);
      for (const [r] of victims) {
        if (next.size <= this.capacity) break;
        next.delete(r);
        evicted.push(r);
      }
    }
    // Evicted regions stop counting as active now, not when the batch lands: a write into one of
    // them from this moment must wait for a later transaction that brings it back, because the
    // batch below drops the region from the stored AL with a chunk that lacks that write's bit.
    for (const r of evicted) this.active.delete(r);
    const batch = this.db.batch();
    const now = Date.now();
    batch.put("al", encodeAl([...next.keys()].map((r) => [r, this.map.regionTimes(r)[0] || now])));
    const chunks = new Set<number>();
    for (const r of evicted) {
      const b0 = r * this.map.blocksPerRegion;
      const [c0, c1] = [chunkOf(b0), chunkOf(Math.min(b0 + this.map.blocksPerRegion, this.map.blocks) - 1)];
      for (let c = c0; c <= c1; c++) chunks.add(c);
    }
    for (const c of chunks) {
      batch.put(chunkKey(c), this.map.encodeChunk(c));
      this.map.changed.delete(c);
    }
    // The evicted regions' cleared bits become final here: their primary writes must be durable
    // (the chunks written may hold bits cleared outside the AL too). No clear, no flush: an
    // eviction while the link tracks clears nothing.
    let cleared = this.coldCleared;
    for (const r of evicted) if (this.clearedRegions.delete(r)) cleared = true;
    await this.writeInOrder(batch, true, cleared);
    // Add the new regions; the others keep the uses activate() noted during the write.
    for (const r of adding) this.active.set(r, use);
    if (evicted.length > 0) this.log.debug(`activity log: ${adding.size} in, ${evicted.length} out`);
  }

  /**
   * Write the bitmap chunks changed since the last persist (no sync: the AL covers a crash), and
   * with `meta` the meta too, in the same batch.
   */
  async persist(sync = false, meta = false): Promise<void> {
    if (this.readOnly || this.closed || this.failure || (this.map.changed.size === 0 && !meta)) return;
    const batch = this.db.batch();
    if (meta) batch.put("meta", Buffer.from(JSON.stringify(this.meta)));
    const chunks = [...this.map.changed];
    this.map.changed.clear();
    for (const c of chunks) batch.put(chunkKey(c), this.map.encodeChunk(c));
    const cold = this.coldCleared;
    this.coldCleared = false;
    this.clearedRegions.clear(); // every changed chunk is stored: the regions' clears with it
    try {
      await this.writeInOrder(batch, sync, cold);
    } catch (e) {
      for (const c of chunks) this.map.changed.add(c);
      this.coldCleared = true; // the clears it held are not stored: the next batch flushes first
      throw e;
    }
  }

  /**
   * Write `batch` (already encoded) after every batch issued before it; with `flushFirst`, after
   * an fdatasync of the primary (a failure of which sets the full-resync mark and fails the batch).
   */
  private writeInOrder(batch: ReturnType<Db["batch"]>, sync: boolean, flushFirst = false): Promise<void> {
    const flush = flushFirst ? this.primaryFlush : null;
    const p = this.dbTail.then(async () => {
      if (flush !== null) {
        try {
          await flush();
        } catch (e) {
          this.primaryFailed(e as Error);
          throw e;
        }
      }
      await batch.write({ sync });
    });
    this.dbTail = p.catch(() => {});
    return p;
  }

  private fail(e: Error): void {
    if (this.failure) return;
    this.failure = e;
    if (this.markReady) {
      const mark: FullResyncMark = { since: new Date().toISOString(), reason: e.message.slice(0, 1000) };
      try {
        writeInPlace(
          join(this.dir, FULL_RESYNC_FILE),
          MARK_MAGIC + JSON.stringify(mark) + "\n",
          MARK_SIZE,
          0,
        );
        this.degradedMark = mark;
        this.log.error(
          `tracking log failed: ${e.message}. Writes go on and so does replication, from memory; ` +
            `the full-resync mark is set, so the next start resyncs the whole volume. ` +
            `Free space in ${this.dir} (or fix its disk) and restart the proxy to leave this state`,
        );
        return;
      } catch (e2) {
        this.log.error(`tracking: cannot set the full-resync mark either: ${(e2 as Error).message}`);
      }
    }
    this.log.error(
      `tracking log failed: ${e.message}; writes are refused until the proxy restarts (check the state directory's disk)`,
    );
  }

  /**
   * The gateway made block `b`'s newest update durable: clear it (noting a clear outside the
   * activity log: the next batch storing it flushes the primary first).
   */
  clearBlock(b: number): void {
    this.map.clearBlock(b);
    const r = Math.floor(b / this.map.blocksPerRegion);
    if (!this.active.has(r)) this.coldCleared = true;
    else this.clearedRegions.add(r);
  }

  /**
   * The primary's flush failed: writes it had acknowledged may be lost on its disk while the
   * gateway holds them, and nothing says which. Sets the full-resync mark (as any failure of the
   * log: the next start copies the whole primary to the secondary, so the two agree again).
   */
  primaryFailed(e: Error): void {
    if (this.readOnly || this.closed) return;
    this.fail(
      new Error(`the primary's flush failed (${e.message}): the secondary may hold writes the primary lost`),
    );
  }

  /** Persist everything, empty the activity log, mark a clean shutdown, close. */
  async close(): Promise<void> {
    if (this.closed) return;
    if (this.timer) clearInterval(this.timer);
    if (this.committing) await this.committing.catch(() => {});
    if (!this.readOnly && !this.failure) {
      const batch = this.db.batch();
      for (let c = 0; c < this.map.chunks; c++) batch.put(chunkKey(c), this.map.encodeChunk(c));
      batch.put("al", encodeAl([]));
      this.meta.cleanShutdown = true;
      batch.put("meta", Buffer.from(JSON.stringify(this.meta)));
      try {
        // The empty AL stores every cleared bit as final: the primary's writes must be durable.
        await this.writeInOrder(batch, true, true);
      } catch (e) {
        if (!this.failure) throw e;
        // The primary's flush failed (the mark is set, see writeInOrder): nothing more to store.
      }
      this.active.clear();
    }
    await this.dbTail; // a failed lazy persist still in flight must be over before the db closes
    this.closed = true;
    await this.db.close();
  }
}

function chunkOf(block: number): number {
  return Math.floor(block / 32768);
}

function encodeAl(entries: [number, number][]): Buffer {
  const b = Buffer.allocUnsafe(4 + 12 * entries.length);
  b.writeUInt32BE(entries.length, 0);
  entries.forEach(([r, t], i) => {
    b.writeUInt32BE(r, 4 + 12 * i);
    b.writeDoubleBE(t, 8 + 12 * i);
  });
  return b;
}

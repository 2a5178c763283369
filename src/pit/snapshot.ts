// A read-only view of the primary as it was at a point in time: the pointer map over the primary
// and the journal (DESIGN.md "Point-in-time snapshots"). No copy of the volume is made.
//
// - Pointer map: journal block -> index of the first entry at or after the point. Built when the
//   view opens (binary search, then one scan of the entries since the point: about 0.1 s per
//   million entries), and kept current: an entry appended later for a block the map does not have
//   yet is that block's first change since the point, so it joins the map.
// - Reads: runs of blocks not in the map come from the primary, the rest from the journal. A block
//   can gain an entry while its primary read is in flight (a write began meanwhile; the journal
//   commits before-images before the primary changes), so after a primary read the map is checked
//   again and such blocks are re-read from the journal.
// - One view serves every connection to its point (SnapshotProvider counts them and closes the
//   view at the last release): the map, the pin and the subscription are the view's, and so are
//   the leases, whichever connection borrowed them. A connection that goes releases its own unsent
//   leases (the NBD output queue's discard) before it lets go of the view, so the others' stay
//   tracked and are copied when their blocks change, as ever; close, which copies what is left,
//   runs only at the last release. A broken or closed view (unusable) is never shared again.
// - If the journal stops, the point is no longer exact: reads (and block status) fail with EIO
//   from then on. The same when the journal revokes the view: over --pit-max-bytes, a view that
//   holds the oldest segment gives it up (journal.ts enforceRetention), unpinning once its journal
//   reads in flight are done, since a dropped segment's descriptor is closed.
// - Lent reads (lendPieces): a large read is lent to the NBD layer as file pieces (primary runs,
//   journal images) that the addon copies into the socket when it has room, maybe a while later:
//   no reply-sized buffer, no trip through the libuv pool, and one copy per byte (sendmsg from
//   read-only mappings of the files: crates/blockio/src/maps.rs), as for a pread. Journal
//   images never change; the primary does, but a block not in the map changes only after the
//   journal has told us about its before-image (listeners run after the commit, before the
//   primary write is issued). So when a block joins the map, every unsent lease covering it is
//   first copied into memory (synchronously: the primary still holds the old contents), and the
//   NBD layer sends that copy instead. The same happens to every lease when the journal stops or
//   the view closes (segments may be dropped once unpinned).
// - A piece not in the page cache is not lent (copying it into the socket would wait for the disk
//   on the event loop). The NBD layer then asks warmPieces to read just the missing pieces on the
//   I/O pool and lends after that; only if they are still missing is the read copied the ordinary
//   way, piece by piece. Pages go missing at random on hosts that reclaim cold page cache on
//   their own (DAMON pageout: docs/BENCHMARKS.md), and a 1 MiB read holds dozens of journal images.
// - Not sendfile: sendfile(2) hands the kernel references to page-cache pages that it holds until
//   the client has read them, so a primary block overwritten after its piece was "sent" would
//   reach the snapshot's reader with the new contents. Journal pieces could go by reference, but
//   a reply of many small pieces arrives as many small socket buffers, which cost the reader more
//   than the copy saves (measured: copying every piece took less CPU, server and client).

import { constants } from "node:os";
import { cacheVisible, isCached, readPiecesSync } from "../blockio/index.js";
import { IoError, ReadOnlyError } from "../errors.js";
import { allFinished, DONE } from "../util/done.js";
import type { Extent, PieceLease, Volume, VolumeCaps } from "../volume/volume.js";
import { BlockMap } from "./blockmap.js";
import type { Journal } from "./journal.js";

const E = constants.errno;

/** What a snapshot export can do (the same for every view: NBD_OPT_INFO answers it without one). */
export const SNAPSHOT_CAPS: Readonly<VolumeCaps> = Object.freeze({
  readOnly: true,
  flush: true,
  fua: false,
  trim: false,
  zero: false,
  fastZero: false,
  extents: true,
  cache: true,
  multiConn: true,
  rotational: false,
});

/** The NBD description of `label` (an export name) showing the primary at `point`. */
export function snapshotDescription(label: string, point: number): string {
  return `${label}: the primary as it was at ${new Date(point).toISOString()} (read-only)`;
}

/** A snapshot of the primary at `point` (a merge-window start). */
export class SnapshotView implements Volume {
  readonly size: number;
  readonly description: string;
  private readonly map = new BlockMap();
  /** Bumped whenever a block joins the map (reads in flight then re-check their primary runs). */
  private version = 0;
  /** Map entries whose image is a zero image (a trim or zero): none means extents are the primary's. */
  private zeroImages = 0;
  private readonly j: number;
  /** Reads lent as file pieces and not yet sent (see lendPieces). */
  private readonly leases = new Set<PieceLease>();
  private unsubscribe: (() => void) | null = null;
  private broken: string | null = null;
  private closed = false;
  /** Journal reads in flight on the I/O pool: the view unpins only once none is (see releasePin). */
  private journalReads = 0;
  /** Unpin when journalReads drops to 0 (closed or revoked while reads were in flight). */
  private unpinWhenIdle = false;
  private pinned = false;

  constructor(
    private readonly journal: Journal,
    private readonly primary: Volume,
    readonly point: number,
    label: string,
  ) {
    this.size = primary.size;
    this.j = journal.blockSize;
    this.description = snapshotDescription(label, point);
  }

  /**
   * Why the view no longer serves its point (the journal stopped, or it was revoked over
   * --pit-max-bytes; "closed" once closed), or null while it does: a view that is not null here
   * is never handed to another connection.
   */
  get unusable(): string | null {
    return this.closed ? "closed" : this.broken;
  }

  /**
   * The map holds entry numbers less this (the first entry the view can use): journal entry
   * numbers grow for as long as the process runs, past what a map chunk's Uint32Array holds.
   */
  private entryBase = 0;

  /** The journal entry block `b` reads from, -1 when it reads from the primary. */
  private entry(b: number): number {
    const e = this.map.get(b);
    return e < 0 ? -1 : e + this.entryBase;
  }

  /** Build the pointer map; returns the number of blocks it points into the journal. */
  open(): number {
    const idx = this.journal.index;
    const from = idx.firstAtOrAfter(this.point);
    this.entryBase = from;
    this.journal.pin(this, from, `snapshot ${new Date(this.point).toISOString()}`, (why) => this.revoke(why));
    this.pinned = true;
    this.addEntries(from, idx.length);
    this.unsubscribe = this.journal.subscribe((a, b) => {
      if (a < 0) {
        this.broken = "the journal stopped; this point in time is no longer exact";
        this.materializeAll();
      } else this.addEntries(a, b);
    });
    return this.map.size;
  }

  /**
   * The journal is over --pit-max-bytes and this view holds its oldest segment: reads fail from
   * now on, what is lent is copied now (the segments it lies in may go), and the view unpins once
   * its reads in flight are done.
   */
  private revoke(why: string): void {
    if (this.closed) return;
    this.broken = why;
    try {
      this.materializeAll();
    } finally {
      this.unsubscribe?.();
      this.unsubscribe = null;
      this.releasePin();
    }
  }

  /**
   * Unpin now, or once the journal reads in flight are done: a dropped segment's descriptor is
   * closed, and a read still using it could meet another file that reused the number.
   */
  private releasePin(): void {
    if (!this.pinned) return;
    if (this.journalReads > 0) {
      this.unpinWhenIdle = true;
      return;
    }
    this.pinned = false;
    this.journal.unpin(this);
  }

  /** Entry e's image (bytes from `within`) into buf, counted while in flight (releasePin). */
  private image(e: number, buf: Buffer, within: number): Promise<void> {
    const p = this.journal.readImage(e, buf, within);
    if (p === DONE) return DONE;
    this.journalReads++;
    const done = (): void => {
      if (--this.journalReads === 0 && this.unpinWhenIdle) {
        this.unpinWhenIdle = false;
        this.releasePin();
      }
    };
    return p.then(done, (err: unknown) => {
      done();
      throw err;
    });
  }

  private addEntries(from: number, to: number): void {
    const idx = this.journal.index;
    const map = this.map;
    const point = this.point;
    // A chunk of the index at a time (its arrays read directly: a view's open goes over them all).
    for (let i = from; i < to;) {
      const c = idx.chunkAt(i);
      const stop = c.at + Math.min(to - i, c.ts.length - c.at);
      for (let k = c.at; k < stop; k++, i++) {
        if (c.ts[k] < point) continue; // a change from before the point, committed late
        const b = c.block[k];
        if (!map.has(b)) {
          // The primary is about to change this block: reads lent over it are copied now.
          if (this.leases.size > 0) this.materializeOver(b);
          map.add(b, i - this.entryBase);
          this.version++;
          if (c.off[k] < 0) this.zeroImages++;
        }
      }
    }
  }

  /** Blocks that read from the journal. */
  get journalBlocks(): number {
    return this.map.size;
  }

  caps(): VolumeCaps {
    return { ...SNAPSHOT_CAPS };
  }

  /** Read [offset, offset+buf.length): DONE when every piece was read inline (page cache). */
  read(buf: Buffer, offset: number): Promise<void> {
    if (this.broken) return Promise.reject(new IoError(E.EIO, "snapshot read", this.broken));
    const j = this.j;
    const end = offset + buf.length;
    let pos = offset;
    let waits: Promise<void>[] | null = null;
    try {
      while (pos < end) {
        const b = Math.floor(pos / j);
        const e = this.entry(b);
        let p: Promise<void>;
        if (e >= 0) {
          const stop = Math.min((b + 1) * j, end);
          p = this.image(e, buf.subarray(pos - offset, stop - offset), pos - b * j);
          pos = stop;
        } else {
          // A run of blocks that read from the primary.
          const stop = Math.min(this.map.nextMapped(b + 1, Math.ceil(end / j)) * j, end);
          p = this.fromPrimary(buf, offset, pos, stop);
          pos = stop;
        }
        if (p !== DONE) (waits ??= []).push(p);
      }
    } catch (e) {
      // A layer below broke the contract (threw instead of rejecting): reject all the same, once
      // the pieces already in flight are done with the buffer.
      return allFinished(waits ?? []).then(
        () => Promise.reject(e),
        () => Promise.reject(e),
      );
    }
    if (waits === null) return DONE;
    // Not Promise.all: the caller may give the buffer back at the first failure (allFinished).
    return allFinished(waits).then(() => {
      if (this.broken) throw new IoError(E.EIO, "snapshot read", this.broken);
    });
  }

  private fromPrimary(buf: Buffer, base: number, from: number, to: number): Promise<void> {
    const version = this.version;
    const p = this.primary.read(buf.subarray(from - base, to - base), from);
    // Read inline: nothing can have joined the map meanwhile.
    if (p === DONE) return DONE;
    return p.then(() => (this.version === version ? undefined : this.reread(buf, base, from, to)));
  }

  /** Blocks of [from, to) that gained a journal entry while the primary was read: their images. */
  private async reread(buf: Buffer, base: number, from: number, to: number): Promise<void> {
    const j = this.j;
    for (let b = Math.floor(from / j); b * j < to; b++) {
      const e = this.entry(b);
      if (e < 0) continue;
      const s = Math.max(b * j, from);
      const t = Math.min((b + 1) * j, to);
      await this.image(e, buf.subarray(s - base, t - base), s - b * j);
    }
  }

  /**
   * Lend [offset, offset+length) as file pieces, or null (read it instead): when the primary
   * cannot say where its bytes are, or a piece is not in the page cache (sending would
   * then wait for the disk on the event loop).
   */
  lendPieces(offset: number, length: number): PieceLease | null {
    if (this.broken || this.closed) return null;
    const range = this.primary.fileRange?.(offset, length);
    if (!range) return null;
    const j = this.j;
    const end = offset + length;
    const out: number[] = [];
    const now = performance.now();
    let pos = offset;
    while (pos < end) {
      const b = Math.floor(pos / j);
      const e = this.entry(b);
      let stop = Math.min((b + 1) * j, end);
      let fd = range.fd;
      let at = range.offset + (pos - offset);
      if (e < 0) stop = Math.min(this.map.nextMapped(b + 1, Math.ceil(end / j)) * j, end);
      else {
        fd = this.journal.residentFd(e, now, pos - b * j, stop - pos);
        if (fd === -2) return null;
        at = this.journal.index.offAt(e) + (pos - b * j);
      }
      const n = out.length;
      if (n > 0 && out[n - 3] === fd && (fd < 0 || out[n - 2] + out[n - 1] === at)) out[n - 1] += stop - pos;
      else out.push(fd, fd < 0 ? 0 : at, stop - pos);
      pos = stop;
    }
    // The primary's runs must be cached too: all at once, or else run by run (blocks read from
    // the journal may be holes in the primary, which are never "cached").
    if (!isCached(range.fd, range.offset, length)) {
      for (let i = 0; i < out.length; i += 3) {
        if (out[i] === range.fd && !isCached(range.fd, out[i + 1], out[i + 2])) return null;
      }
    }
    const lease: PieceLease = {
      offset,
      length,
      pieces: Float64Array.from(out),
      copyFd: -2, // copy every piece: see "Not sendfile" above
      data: null,
      release: () => this.leases.delete(lease),
    };
    this.leases.add(lease);
    return lease;
  }

  /**
   * Bring into the page cache what lendPieces refused for not being cached (journal images and
   * primary runs), so that the read can be lent after all: resolves once they are read (failures
   * included: the ordinary read then reports them), or null when nothing is missing or the view
   * cannot lend at all. Only the missing pieces are read, on the I/O pool; their bytes are
   * discarded (the lent read copies them from the page cache, once).
   */
  warmPieces(offset: number, length: number): Promise<void> | null {
    return this.warm(offset, length, false);
  }

  /**
   * warmPieces, or for NBD_CMD_CACHE (`advise`) with the primary's runs only advised
   * (posix_fadvise WILLNEED, no buffer: a CACHE may cover 32 MiB) and journal images read.
   */
  private warm(offset: number, length: number, advise: boolean): Promise<void> | null {
    // Without cachestat nothing ever looks cached: reading pieces in would not make them lend.
    if (this.broken || this.closed || !cacheVisible()) return null;
    const range = this.primary.fileRange?.(offset, length);
    if (!range) return null;
    const j = this.j;
    const end = offset + length;
    const now = performance.now();
    const reads: Promise<void>[] = [];
    let pos = offset;
    while (pos < end) {
      const b = Math.floor(pos / j);
      const e = this.entry(b);
      let stop = Math.min((b + 1) * j, end);
      let p: Promise<void> = DONE;
      if (e < 0) {
        stop = Math.min(this.map.nextMapped(b + 1, Math.ceil(end / j)) * j, end);
        if (!isCached(range.fd, range.offset + (pos - offset), stop - pos)) {
          p = advise
            ? this.primary.cache(pos, stop - pos)
            : this.primary.read(Buffer.allocUnsafe(stop - pos), pos);
        }
      } else if (this.journal.residentFd(e, now, pos - b * j, stop - pos) === -2) {
        if (!this.journal.hasImage(e)) return null;
        p = this.image(e, Buffer.allocUnsafe(stop - pos), pos - b * j);
      }
      if (p !== DONE) reads.push(p);
      pos = stop;
    }
    if (reads.length === 0) return null;
    return allFinished(reads).then(
      () => undefined,
      () => undefined,
    );
  }

  /** Copy every unsent lease that covers block b (the primary is about to change it). */
  private materializeOver(b: number): void {
    const from = b * this.j;
    const to = from + this.j;
    for (const l of this.leases) {
      if (l.offset < to && l.offset + l.length > from) this.materialize(l);
    }
  }

  private materializeAll(): void {
    for (const l of this.leases) this.materialize(l);
  }

  /** Read a lease's pieces into memory now (synchronously) and stop tracking it. */
  private materialize(l: PieceLease): void {
    this.leases.delete(l);
    if (l.data !== null) return;
    const data = Buffer.allocUnsafe(l.length);
    readPiecesSync(l.pieces, 0, data);
    l.data = data;
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    // Not exact any more (the journal stopped, or the view was revoked): no answer, as for reads
    // (the NBD layer answers a read over zero extents from them, without reading).
    if (this.broken) throw new IoError(E.EIO, "snapshot extents", this.broken);
    const base = await this.primary.extents(offset, length);
    if (this.broken) throw new IoError(E.EIO, "snapshot extents", this.broken);
    // Blocks from the journal are data (or zero for zero images); lay them over the primary's map.
    // Without zero images that changes nothing where the primary is all data.
    if (this.zeroImages === 0 && base.length === 1 && base[0].flags === 0) return base;
    const j = this.j;
    const out: Extent[] = [];
    const push = (len: number, flags: number): void => {
      if (len <= 0) return;
      const last = out[out.length - 1];
      if (last && last.flags === flags) last.length += len;
      else out.push({ length: len, flags });
    };
    // Only the mapped blocks are visited (nextMapped skips a word of the bitset, or a whole chunk
    // of 32768 blocks, at a time): a status request over a huge sparse range costs what the map
    // holds there, not a step per block, which stalled every client for 30 ms per 4 GiB asked.
    let pos = offset;
    for (const e of base) {
      const stop = pos + e.length;
      while (pos < stop) {
        const b = Math.floor(pos / j);
        const i = this.entry(b);
        if (i < 0) {
          const next = Math.min(this.map.nextMapped(b + 1, Math.ceil(stop / j)) * j, stop);
          push(next - pos, e.flags);
          pos = next;
          continue;
        }
        const bEnd = Math.min((b + 1) * j, stop);
        push(bEnd - pos, this.journal.index.offAt(i) < 0 ? 2 : 0);
        pos = bEnd;
      }
    }
    return out;
  }

  write(): Promise<void> {
    return Promise.reject(new ReadOnlyError("snapshots are read-only"));
  }
  trim(): Promise<void> {
    return Promise.reject(new ReadOnlyError("snapshots are read-only"));
  }
  zero(): Promise<void> {
    return Promise.reject(new ReadOnlyError("snapshots are read-only"));
  }
  flush(): Promise<void> {
    return DONE;
  }
  /** NBD_CMD_CACHE: bring in whatever of the range is not in the page cache (see warm). */
  cache(offset: number, length: number): Promise<void> {
    return this.warm(offset, length, true) ?? DONE;
  }

  /**
   * Copy what is still lent, stop following the journal, unpin. Whatever the copy does (a read
   * error): the view is closed, unsubscribed and unpinned all the same, so retention is never held
   * by a view that is gone; the first copy error is then reported (a rejected promise).
   */
  close(): Promise<void> {
    if (this.closed) return DONE;
    this.closed = true;
    let failed: Error | null = null;
    try {
      for (const l of this.leases) {
        try {
          this.materialize(l);
        } catch (e) {
          failed ??= e as Error;
        }
      }
    } finally {
      this.unsubscribe?.();
      this.unsubscribe = null;
      this.releasePin();
    }
    return failed === null ? DONE : Promise.reject(failed);
  }
}

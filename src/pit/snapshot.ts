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
// - If the journal stops, the point is no longer exact: reads fail with EIO from then on.
// - Zero-copy (lendPieces): a large read is lent to the NBD layer as file pieces (primary runs,
//   journal images) that it sends with sendfile(2) when the socket has room, maybe a while later.
//   Journal images never change; the primary does, but a block not in the map changes only after
//   the journal has told us about its before-image (listeners run after the commit, before the
//   primary write is issued). So when a block joins the map, every unsent lease covering it is
//   first copied into memory (synchronously: the primary still holds the old contents), and the
//   NBD layer sends that copy instead. The same happens to every lease when the journal stops or
//   the view closes (segments may be dropped once unpinned).

import { constants } from "node:os";
import { isCached, readPiecesSync } from "../blockio/index.js";
import { IoError, ReadOnlyError } from "../errors.js";
import { DONE } from "../util/done.js";
import type { Extent, PieceLease, Volume, VolumeCaps } from "../volume/volume.js";
import type { Journal } from "./journal.js";

const E = constants.errno;

/** A snapshot of the primary at `point` (a merge-window start). */
export class SnapshotView implements Volume {
  readonly size: number;
  readonly description: string;
  private readonly map = new Map<number, number>();
  /**
   * The map's keys as a bitset in lazily allocated 4 KiB chunks (32768 blocks each): most blocks
   * of a large read are not in the map, and a bit test is far cheaper than a Map lookup.
   */
  private readonly bits: (Uint32Array | undefined)[] = [];
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

  constructor(
    private readonly journal: Journal,
    private readonly primary: Volume,
    readonly point: number,
    label: string,
  ) {
    this.size = primary.size;
    this.j = journal.blockSize;
    this.description = `${label}: the primary as it was at ${new Date(point).toISOString()} (read-only)`;
  }

  /** Build the pointer map; returns the number of blocks it points into the journal. */
  open(): number {
    const idx = this.journal.index;
    const from = idx.firstAtOrAfter(this.point);
    this.journal.pin(this, from);
    this.addEntries(from, idx.length);
    this.unsubscribe = this.journal.subscribe((a, b) => {
      if (a < 0) {
        this.materializeAll();
        this.broken = "the journal stopped; this point in time is no longer exact";
      } else this.addEntries(a, b);
    });
    return this.map.size;
  }

  private addEntries(from: number, to: number): void {
    const idx = this.journal.index;
    const map = this.map;
    const point = this.point;
    for (let i = from; i < to; i++) {
      if (idx.ts[i] < point) continue; // a change from before the point, committed late
      const b = idx.block[i];
      if (!map.has(b)) {
        // The primary is about to change this block: reads lent over it are copied now.
        if (this.leases.size > 0) this.materializeOver(b);
        map.set(b, i);
        const c = b >>> 15;
        (this.bits[c] ??= new Uint32Array(1024))[(b >>> 5) & 1023] |= 1 << (b & 31);
        this.version++;
        if (idx.off[i] < 0) this.zeroImages++;
      }
    }
  }

  /** The map's entry for block b, or undefined (a bit test first). */
  private entry(b: number): number | undefined {
    const c = this.bits[b >>> 15];
    if (c === undefined || (c[(b >>> 5) & 1023] & (1 << (b & 31))) === 0) return undefined;
    return this.map.get(b);
  }

  /** The first block in [b, limit) that is in the map, or limit (a word of the bitset at a time). */
  private nextMapped(b: number, limit: number): number {
    while (b < limit) {
      const c = this.bits[b >>> 15];
      if (c === undefined) {
        b = ((b >>> 15) + 1) << 15;
        continue;
      }
      const word = c[(b >>> 5) & 1023] >>> (b & 31);
      if (word === 0) {
        b = ((b >>> 5) + 1) << 5;
        continue;
      }
      return Math.min(b + (31 - Math.clz32(word & -word)), limit);
    }
    return limit;
  }

  /** Blocks that read from the journal. */
  get journalBlocks(): number {
    return this.map.size;
  }

  caps(): VolumeCaps {
    return {
      readOnly: true,
      flush: true,
      fua: false,
      trim: false,
      zero: false,
      fastZero: false,
      extents: true,
      cache: false,
      multiConn: true,
      rotational: false,
    };
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    if (this.broken) throw new IoError(E.EIO, "snapshot read", this.broken);
    const j = this.j;
    const end = offset + buf.length;
    let pos = offset;
    const waits: Promise<void>[] = [];
    while (pos < end) {
      const b = Math.floor(pos / j);
      const e = this.entry(b);
      if (e !== undefined) {
        const stop = Math.min((b + 1) * j, end);
        waits.push(this.journal.readImage(e, buf.subarray(pos - offset, stop - offset), pos - b * j));
        pos = stop;
        continue;
      }
      // A run of blocks that read from the primary.
      const stop = Math.min(this.nextMapped(b + 1, Math.ceil(end / j)) * j, end);
      waits.push(this.fromPrimary(buf, offset, pos, stop));
      pos = stop;
    }
    await Promise.all(waits);
    if (this.broken) throw new IoError(E.EIO, "snapshot read", this.broken);
  }

  private async fromPrimary(buf: Buffer, base: number, from: number, to: number): Promise<void> {
    const version = this.version;
    const p = this.primary.read(buf.subarray(from - base, to - base), from);
    if (p !== DONE) await p;
    // A block may have gained a journal entry while we read: its image is the right contents.
    if (this.version === version) return;
    const j = this.j;
    for (let b = Math.floor(from / j); b * j < to; b++) {
      const e = this.entry(b);
      if (e === undefined) continue;
      const s = Math.max(b * j, from);
      const t = Math.min((b + 1) * j, to);
      await this.journal.readImage(e, buf.subarray(s - base, t - base), s - b * j);
    }
  }

  /**
   * Lend [offset, offset+length) as file pieces for sendfile, or null (read it instead): when the
   * primary cannot say where its bytes are, or a piece is not in the page cache (sendfile would
   * then wait for the disk on the event loop).
   */
  lendPieces(offset: number, length: number): PieceLease | null {
    if (this.broken || this.closed) return null;
    const range = this.primary.fileRange?.(offset, length);
    if (!range) return null;
    const j = this.j;
    const end = offset + length;
    const out: number[] = [];
    let pos = offset;
    while (pos < end) {
      const b = Math.floor(pos / j);
      const e = this.entry(b);
      let stop = Math.min((b + 1) * j, end);
      let fd = range.fd;
      let at = range.offset + (pos - offset);
      if (e === undefined) stop = Math.min(this.nextMapped(b + 1, Math.ceil(end / j)) * j, end);
      else {
        const image = this.journal.residentImage(e);
        if (image === null) return null;
        fd = image.fd;
        at = image.offset + (pos - b * j);
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
      data: null,
      release: () => this.leases.delete(lease),
    };
    this.leases.add(lease);
    return lease;
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
    const base = await this.primary.extents(offset, length);
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
    let pos = offset;
    for (const e of base) {
      const stop = pos + e.length;
      while (pos < stop) {
        const b = Math.floor(pos / j);
        const bEnd = Math.min((b + 1) * j, stop);
        const i = this.entry(b);
        if (i === undefined) push(bEnd - pos, e.flags);
        else push(bEnd - pos, this.journal.index.off[i] < 0 ? 2 : 0);
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
  cache(): Promise<void> {
    return DONE;
  }

  close(): Promise<void> {
    if (!this.closed) {
      this.materializeAll();
      this.closed = true;
      this.unsubscribe?.();
      this.journal.unpin(this);
    }
    return DONE;
  }
}

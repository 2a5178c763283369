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

import { constants } from "node:os";
import { IoError, ReadOnlyError } from "../errors.js";
import { DONE } from "../util/done.js";
import type { Extent, Volume, VolumeCaps } from "../volume/volume.js";
import type { Journal } from "./journal.js";

const E = constants.errno;

/** A snapshot of the primary at `point` (a merge-window start). */
export class SnapshotView implements Volume {
  readonly size: number;
  readonly description: string;
  private readonly map = new Map<number, number>();
  /** Bumped whenever a block joins the map (reads in flight then re-check their primary runs). */
  private version = 0;
  /** Map entries whose image is a zero image (a trim or zero): none means extents are the primary's. */
  private zeroImages = 0;
  private readonly j: number;
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
      if (a < 0) this.broken = "the journal stopped; this point in time is no longer exact";
      else this.addEntries(a, b);
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
        map.set(b, i);
        this.version++;
        if (idx.off[i] < 0) this.zeroImages++;
      }
    }
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
      const e = this.map.get(b);
      if (e !== undefined) {
        const stop = Math.min((b + 1) * j, end);
        waits.push(this.journal.readImage(e, buf.subarray(pos - offset, stop - offset), pos - b * j));
        pos = stop;
        continue;
      }
      // A run of blocks that read from the primary.
      let stop = Math.min((b + 1) * j, end);
      while (stop < end && !this.map.has(Math.floor(stop / j))) stop = Math.min(stop + j, end);
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
      const e = this.map.get(b);
      if (e === undefined) continue;
      const s = Math.max(b * j, from);
      const t = Math.min((b + 1) * j, to);
      await this.journal.readImage(e, buf.subarray(s - base, t - base), s - b * j);
    }
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
        const i = this.map.get(b);
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
      this.closed = true;
      this.unsubscribe?.();
      this.journal.unpin(this);
    }
    return DONE;
  }
}

// DirtyMap: which blocks of a volume differ (or may differ) between the primary and a gateway's
// secondary, and when they were dirtied. Pure in-memory state; TrackingLog persists it.
//
// Notes on the design
// - One bit per block of `granularity` bytes (64 KiB by default): a 1 TiB volume is 16 Mi bits,
//   2 MiB of Uint32Array. Timestamps are kept per *region* (an activity-log extent, 4 MiB by
//   default): first and last time any block in it was dirtied, 16 bytes per region, 4 MiB for
//   1 TiB. Plus a dirty-block count per region (4 bytes). So a 1 TiB volume with every block dirty
//   costs about 7 MiB, whatever happens to it.
// - The bitmap is cut into chunks of CHUNK_BLOCKS blocks (the unit TrackingLog stores in LevelDB);
//   `changed` remembers which chunks differ from what was last persisted.
// - Timestamps are milliseconds since the epoch (0 = never). A region's times are reset when its
//   last dirty block is cleared, so "first dirtied" means first dirtied since it was last clean.

/** Blocks per persisted chunk (32768 bits = 4 KiB of bitmap; 2 GiB of volume at 64 KiB). */
export const CHUNK_BLOCKS = 32768;

/** A dirty byte range with the times its regions were dirtied. */
export interface DirtyExtent {
  offset: number;
  length: number;
  firstDirtied: number;
  lastDirtied: number;
}

/** A run of consecutive dirty blocks. */
export interface BlockRun {
  start: number;
  count: number;
}

/** Geometry of a dirty map. */
export interface DirtyGeometry {
  volumeSize: number;
  /** Bytes per bit (power of two, >= 4096). */
  granularity: number;
  /** Bytes per region (timestamps, activity-log extents): a multiple of granularity. */
  regionSize: number;
}

/** The dirty bitmap of one volume for one gateway. */
export class DirtyMap {
  readonly volumeSize: number;
  readonly granularity: number;
  readonly regionSize: number;
  readonly blocks: number;
  readonly regions: number;
  readonly blocksPerRegion: number;
  readonly chunks: number;
  /** Chunks changed since markPersisted(). */
  readonly changed = new Set<number>();
  private readonly bits: Uint32Array;
  private readonly first: Float64Array;
  private readonly last: Float64Array;
  private readonly regionCount: Uint32Array;
  private dirty = 0;
  /** Bumped by every change of bits or times (cheap change detection for the tracking mirror). */
  version = 0;

  constructor(g: DirtyGeometry) {
    const { volumeSize, granularity, regionSize } = g;
    if (!Number.isSafeInteger(volumeSize) || volumeSize <= 0)
      throw new RangeError(`bad volume size ${volumeSize}`);
    if (granularity < 4096 || (granularity & (granularity - 1)) !== 0) {
      throw new RangeError(`granularity ${granularity} must be a power of two >= 4096`);
    }
    if (regionSize < granularity || regionSize % granularity !== 0) {
      throw new RangeError(`region size ${regionSize} must be a multiple of the granularity ${granularity}`);
    }
    this.volumeSize = volumeSize;
    this.granularity = granularity;
    this.regionSize = regionSize;
    this.blocks = Math.ceil(volumeSize / granularity);
    this.blocksPerRegion = regionSize / granularity;
    this.regions = Math.ceil(this.blocks / this.blocksPerRegion);
    this.chunks = Math.ceil(this.blocks / CHUNK_BLOCKS);
    this.bits = new Uint32Array(this.chunks * (CHUNK_BLOCKS / 32));
    this.first = new Float64Array(this.regions);
    this.last = new Float64Array(this.regions);
    this.regionCount = new Uint32Array(this.regions);
  }

  /** Number of dirty blocks. */
  get dirtyBlocks(): number {
    return this.dirty;
  }

  /** Bytes covered by dirty blocks (the last block may be short). */
  get dirtyBytes(): number {
    let bytes = this.dirty * this.granularity;
    if (this.isDirty(this.blocks - 1)) bytes -= this.blocks * this.granularity - this.volumeSize;
    return bytes;
  }

  /** First and last block index covering [offset, offset+length). */
  blockRange(offset: number, length: number): [number, number] {
    return [Math.floor(offset / this.granularity), Math.floor((offset + length - 1) / this.granularity)];
  }

  isDirty(block: number): boolean {
    return (this.bits[block >>> 5] & (1 << (block & 31))) !== 0;
  }

  /** Mark every block touching [offset, offset+length) dirty at time `now`. */
  mark(offset: number, length: number, now = Date.now()): void {
    const [a, b] = this.blockRange(offset, length);
    this.markBlocks(a, b - a + 1, now);
  }

  /** Mark `count` blocks from `start` dirty. */
  markBlocks(start: number, count: number, now = Date.now()): void {
    const end = Math.min(start + count, this.blocks);
    for (let blk = start; blk < end; blk++) {
      const w = blk >>> 5;
      const m = 1 << (blk & 31);
      const r = Math.floor(blk / this.blocksPerRegion);
      if ((this.bits[w] & m) === 0) {
        this.bits[w] = this.bits[w] | m;
        this.dirty++;
        this.regionCount[r]++;
        this.changed.add(Math.floor(blk / CHUNK_BLOCKS));
        if (this.first[r] === 0) this.first[r] = now;
      }
      if (this.last[r] < now) this.last[r] = now;
    }
    this.version++;
  }

  /** Clear one block. */
  clearBlock(block: number): void {
    const w = block >>> 5;
    const m = 1 << (block & 31);
    if ((this.bits[w] & m) === 0) return;
    this.bits[w] = this.bits[w] & ~m;
    this.dirty--;
    this.version++;
    const r = Math.floor(block / this.blocksPerRegion);
    if (--this.regionCount[r] === 0) {
      this.first[r] = 0;
      this.last[r] = 0;
    }
    this.changed.add(Math.floor(block / CHUNK_BLOCKS));
  }

  /** Clear `count` blocks from `start`. */
  clearBlocks(start: number, count: number): void {
    const end = Math.min(start + count, this.blocks);
    for (let b = start; b < end; b++) this.clearBlock(b);
  }

  /** Mark every block dirty (a full resync). */
  markAll(now = Date.now()): void {
    this.markBlocks(0, this.blocks, now);
  }

  /** First dirty block at or after `from`, or -1. */
  nextDirty(from: number): number {
    if (from >= this.blocks) return -1;
    let w = from >>> 5;
    let word = this.bits[w] & (~0 << (from & 31));
    const words = this.bits.length;
    while (word === 0) {
      if (++w >= words) return -1;
      word = this.bits[w]!;
    }
    const blk = (w << 5) + (31 - Math.clz32(word & -word));
    return blk < this.blocks ? blk : -1;
  }

  /** Runs of consecutive dirty blocks from `from`, in order, each at most `maxCount` long. */
  *runs(from = 0, maxCount = Number.MAX_SAFE_INTEGER): Generator<BlockRun> {
    let b = this.nextDirty(from);
    while (b >= 0) {
      let end = b + 1;
      while (end < this.blocks && end - b < maxCount && this.isDirty(end)) end++;
      yield { start: b, count: end - b };
      b = this.nextDirty(end);
    }
  }

  /** Dirty byte ranges, coalesced, with region timestamps; at most `limit` (then truncated). */
  extents(limit = Number.MAX_SAFE_INTEGER): { extents: DirtyExtent[]; truncated: boolean } {
    const out: DirtyExtent[] = [];
    for (const run of this.runs()) {
      if (out.length >= limit) return { extents: out, truncated: true };
      const offset = run.start * this.granularity;
      const end = Math.min((run.start + run.count) * this.granularity, this.volumeSize);
      let firstDirtied = Number.MAX_SAFE_INTEGER;
      let lastDirtied = 0;
      const r0 = Math.floor(run.start / this.blocksPerRegion);
      const r1 = Math.floor((run.start + run.count - 1) / this.blocksPerRegion);
      for (let r = r0; r <= r1; r++) {
        if (this.regionCount[r] === 0) continue;
        firstDirtied = Math.min(firstDirtied, this.first[r]);
        lastDirtied = Math.max(lastDirtied, this.last[r]);
      }
      out.push({ offset, length: end - offset, firstDirtied, lastDirtied });
    }
    return { extents: out, truncated: false };
  }

  /** Dirty blocks in region `r`. */
  regionDirty(r: number): number {
    return this.regionCount[r];
  }

  /** Times of region `r` ([first, last], 0 = clean). */
  regionTimes(r: number): [number, number] {
    return [this.first[r], this.last[r]];
  }

  /** Earliest and latest dirtied time over all regions (0 when clean). */
  timeSpan(): [number, number] {
    let lo = 0;
    let hi = 0;
    for (let r = 0; r < this.regions; r++) {
      if (this.regionCount[r] === 0) continue;
      if (lo === 0 || this.first[r] < lo) lo = this.first[r]!;
      if (this.last[r] > hi) hi = this.last[r]!;
    }
    return [lo, hi];
  }

  // ---- persistence (TrackingLog)

  /** Regions covered by chunk `c`: [first, end). */
  chunkRegions(c: number): [number, number] {
    const b0 = c * CHUNK_BLOCKS;
    const r0 = Math.floor(b0 / this.blocksPerRegion);
    const r1 = Math.min(
      this.regions,
      Math.ceil(Math.min(b0 + CHUNK_BLOCKS, this.blocks) / this.blocksPerRegion),
    );
    return [r0, r1];
  }

  /** Serialize chunk `c`: its bitmap words, then first/last times of its regions (little-endian). */
  encodeChunk(c: number): Buffer {
    const wordsPerChunk = CHUNK_BLOCKS / 32;
    const [r0, r1] = this.chunkRegions(c);
    const out = Buffer.allocUnsafe(wordsPerChunk * 4 + (r1 - r0) * 16);
    const words = this.bits.subarray(c * wordsPerChunk, (c + 1) * wordsPerChunk);
    Buffer.from(words.buffer, words.byteOffset, words.byteLength).copy(out, 0);
    let at = wordsPerChunk * 4;
    for (let r = r0; r < r1; r++) {
      out.writeDoubleLE(this.first[r], at);
      out.writeDoubleLE(this.last[r], at + 8);
      at += 16;
    }
    return out;
  }

  /** Load chunk `c` from encodeChunk() output (counts and totals are recomputed). */
  decodeChunk(c: number, data: Buffer): void {
    const wordsPerChunk = CHUNK_BLOCKS / 32;
    const [r0, r1] = this.chunkRegions(c);
    if (data.length !== wordsPerChunk * 4 + (r1 - r0) * 16) {
      throw new Error(
        `tracking chunk ${c} has ${data.length} bytes, expected ${wordsPerChunk * 4 + (r1 - r0) * 16}`,
      );
    }
    const b0 = c * CHUNK_BLOCKS;
    const b1 = Math.min(b0 + CHUNK_BLOCKS, this.blocks);
    // Drop what the chunk held before, then take the stored bits.
    this.clearBlocks(b0, b1 - b0);
    for (let i = 0; i < wordsPerChunk; i++) {
      const word = data.readUInt32LE(i * 4);
      if (word === 0) continue;
      for (let bit = 0; bit < 32; bit++) {
        if (word & (1 << bit)) {
          const blk = b0 + i * 32 + bit;
          if (blk < b1) this.markBlocks(blk, 1, 1);
        }
      }
    }
    let at = wordsPerChunk * 4;
    for (let r = r0; r < r1; r++) {
      if (this.regionCount[r] > 0) {
        this.first[r] = data.readDoubleLE(at) || this.first[r];
        this.last[r] = data.readDoubleLE(at + 8) || this.last[r];
      }
      at += 16;
    }
  }
}

/** Dirty extents as JSON for the admin API and the tracking mirror (times as ISO-8601). */
export function extentsJson(
  extents: DirtyExtent[],
): { offset: number; length: number; firstDirtied: string; lastDirtied: string }[] {
  return extents.map((x) => ({
    offset: x.offset,
    length: x.length,
    firstDirtied: new Date(x.firstDirtied).toISOString(),
    lastDirtied: new Date(x.lastDirtied).toISOString(),
  }));
}

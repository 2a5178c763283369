// The pointer map of a snapshot view: journal block -> journal entry index (an integer in
// [0, 2^32): four billion entries, 16 TiB of 4 KiB before-images).
//
// Blocks are grouped in chunks of 32768. A chunk is allocated when its first block joins, as a
// membership bitset (4 KiB) plus either a Map (sparse) or, once it holds more than DENSE_AT
// entries, a Uint32Array of all its blocks (128 KiB, about 64 bytes per entry at the switch,
// less than a Map spends per entry). So a snapshot read of a run of blocks costs a bit test per
// block it does not map and one array load per block it does, and a map with a few scattered
// entries over a huge volume stays small. Block numbers may exceed 2^32: only the bit positions
// within a chunk use 32-bit integer arithmetic.

const CHUNK = 32768;
const WORDS = CHUNK >>> 5;
/** Entries after which a chunk switches from a Map to a dense array. */
export const DENSE_AT = 2048;

interface Chunk {
  bits: Uint32Array;
  sparse: Map<number, number> | null;
  dense: Uint32Array | null;
  count: number;
}

export class BlockMap {
  private readonly chunks: (Chunk | undefined)[] = [];
  private n = 0;

  /** Blocks in the map. */
  get size(): number {
    return this.n;
  }

  has(b: number): boolean {
    const c = this.chunks[Math.floor(b / CHUNK)];
    return c !== undefined && (c.bits[(b >>> 5) & (WORDS - 1)] & (1 << (b & 31))) !== 0;
  }

  /** The entry for block b, or -1. */
  get(b: number): number {
    const c = this.chunks[Math.floor(b / CHUNK)];
    if (c === undefined || (c.bits[(b >>> 5) & (WORDS - 1)] & (1 << (b & 31))) === 0) return -1;
    if (c.dense !== null) return c.dense[b & (CHUNK - 1)];
    return c.sparse!.get(b)!;
  }

  /** Add block b with entry i; false (and no change) when b is already in the map. */
  add(b: number, i: number): boolean {
    const k = Math.floor(b / CHUNK);
    let c = this.chunks[k];
    if (c === undefined) {
      c = { bits: new Uint32Array(WORDS), sparse: new Map(), dense: null, count: 0 };
      this.chunks[k] = c;
    }
    const w = (b >>> 5) & (WORDS - 1);
    const bit = 1 << (b & 31);
    if ((c.bits[w] & bit) !== 0) return false;
    c.bits[w] |= bit;
    c.count++;
    this.n++;
    if (c.dense !== null) c.dense[b & (CHUNK - 1)] = i;
    else {
      const sparse = c.sparse!;
      sparse.set(b, i);
      if (c.count > DENSE_AT) {
        const dense = new Uint32Array(CHUNK);
        for (const [blk, e] of sparse) dense[blk & (CHUNK - 1)] = e;
        c.dense = dense;
        c.sparse = null;
      }
    }
    return true;
  }

  /** The first block in [b, limit) that is in the map, or limit (a word of the bitset at a time). */
  nextMapped(b: number, limit: number): number {
    const chunks = this.chunks;
    while (b < limit) {
      const c = chunks[Math.floor(b / CHUNK)];
      if (c === undefined) {
        b = (Math.floor(b / CHUNK) + 1) * CHUNK;
        continue;
      }
      const word = c.bits[(b >>> 5) & (WORDS - 1)] >>> (b & 31);
      if (word === 0) {
        b = (Math.floor(b / 32) + 1) * 32;
        continue;
      }
      return Math.min(b + (31 - Math.clz32(word & -word)), limit);
    }
    return limit;
  }
}

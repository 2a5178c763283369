// SeqTable: per dirty block, the seq of the newest update sent for it, or STALE (only a
// whole-block resync copy may clear it). Seqs live in a Map, held only while updates are in flight
// or not yet durable; STALE is one bit per block. While a fully dirty volume resyncs, every block
// a client writes ahead of the resync cursor becomes STALE: as Map entries that was about 50 bytes
// each (1.5 GiB for a 1 TiB volume at 64 KiB blocks), and V8 refuses a Map of more than 2^24
// entries, so a larger volume would have thrown inside a write. The bits cost 2 MiB per TiB.

/** The value of a block that needs a whole-block copy before it may be cleared. */
export const STALE = Number.MAX_SAFE_INTEGER;

export class SeqTable {
  private readonly seqs = new Map<number, number>();
  private readonly stale: Uint32Array;

  constructor(blocks: number) {
    this.stale = new Uint32Array(Math.ceil(blocks / 32));
  }

  /** The block's newest seq, STALE, or undefined when nothing is recorded. */
  get(b: number): number | undefined {
    if ((this.stale[b >>> 5] & (1 << (b & 31))) !== 0) return STALE;
    return this.seqs.get(b);
  }

  set(b: number, v: number): void {
    const bit = 1 << (b & 31);
    if (v === STALE) {
      this.stale[b >>> 5] |= bit;
      this.seqs.delete(b);
    } else {
      this.stale[b >>> 5] &= ~bit;
      this.seqs.set(b, v);
    }
  }

  delete(b: number): void {
    this.stale[b >>> 5] &= ~(1 << (b & 31));
    this.seqs.delete(b);
  }

  has(b: number): boolean {
    return this.get(b) !== undefined;
  }

  clear(): void {
    this.stale.fill(0);
    this.seqs.clear();
  }

  /** Blocks with a seq (not the STALE ones). */
  seqBlocks(): IterableIterator<number> {
    return this.seqs.keys();
  }

  /** How many blocks have a seq (not counting the STALE ones). */
  get seqCount(): number {
    return this.seqs.size;
  }
}

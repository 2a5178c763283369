// SeqTable: per dirty block, the seq of the newest update sent for it, or STALE (only a
// whole-block resync copy may clear it). Seqs live in a Map, held only while updates are in flight
// or not yet durable; STALE is one bit per block. While a fully dirty volume resyncs, every block
// a client writes ahead of the resync cursor becomes STALE: as Map entries that was about 50 bytes
// each (1.5 GiB for a 1 TiB volume at 64 KiB blocks), and V8 refuses a Map of more than 2^24
// entries, so a larger volume would have thrown inside a write. The bits cost 2 MiB per TiB.

import { BlockBits } from "../util/block-bits.js";

/** The value of a block that needs a whole-block copy before it may be cleared. */
export const STALE = Number.MAX_SAFE_INTEGER;

export class SeqTable {
  private readonly seqs = new Map<number, number>();
  private readonly stale: BlockBits;

  constructor(blocks: number) {
    this.stale = new BlockBits(blocks);
  }

  /** The block's newest seq, STALE, or undefined when nothing is recorded. */
  get(b: number): number | undefined {
    if (this.stale.has(b)) return STALE;
    return this.seqs.get(b);
  }

  set(b: number, v: number): void {
    if (v === STALE) {
      this.stale.add(b);
      this.seqs.delete(b);
    } else {
      this.stale.delete(b);
      this.seqs.set(b, v);
    }
  }

  delete(b: number): void {
    this.stale.delete(b);
    this.seqs.delete(b);
  }

  has(b: number): boolean {
    return this.get(b) !== undefined;
  }

  clear(): void {
    this.stale.clear();
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

// One bit per block of a volume, in a Uint32Array: 2 MiB per TiB at 64 KiB blocks, where a Map
// entry per block costs about 50 bytes and V8 refuses a Map of more than 2^24 entries.

export class BlockBits {
  private readonly words: Uint32Array;

  constructor(readonly blocks: number) {
    this.words = new Uint32Array(Math.ceil(blocks / 32));
  }

  has(b: number): boolean {
    return (this.words[b >>> 5] & (1 << (b & 31))) !== 0;
  }

  add(b: number): void {
    this.words[b >>> 5] |= 1 << (b & 31);
  }

  delete(b: number): void {
    this.words[b >>> 5] &= ~(1 << (b & 31));
  }

  clear(): void {
    this.words.fill(0);
  }

  /** The first block at or after `b` whose bit is set, or -1 (words of zeroes are skipped whole). */
  next(b: number): number {
    while (b < this.blocks) {
      const w = this.words[b >>> 5] >>> (b & 31);
      if (w === 0) b = ((b >>> 5) + 1) << 5;
      else return b + (31 - Math.clz32(w & -w));
    }
    return -1;
  }
}

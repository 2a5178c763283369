// MemoryVolume: a sparse volume in RAM, pure TypeScript. Used by tests (the conformance suite runs
// over it and FileVolume alike) and as a scratch target. Chunks that were never written or were
// trimmed take no memory and read as zeroes; extents() reports them as holes.

import { DONE } from "../util/done.js";
import { EXTENT_HOLE, EXTENT_ZERO, fullCaps, type Extent, type Volume, type VolumeCaps } from "./volume.js";
import type { ZeroOptions } from "./volume.js";

const CHUNK = 64 * 1024;

/** A sparse in-memory volume. */
export class MemoryVolume implements Volume {
  readonly size: number;
  readonly description: string;
  private readonly chunks = new Map<number, Buffer>();
  private readonly capabilities: VolumeCaps;

  constructor(size: number, description = `memory (${size} bytes)`) {
    if (!Number.isSafeInteger(size) || size <= 0) throw new RangeError(`bad MemoryVolume size ${size}`);
    this.size = size;
    this.description = description;
    // No volatile cache: flush is a no-op, and trivially covers every connection.
    this.capabilities = fullCaps();
  }

  caps(): VolumeCaps {
    return this.capabilities;
  }

  /** Bytes of RAM holding data (for tests of sparseness). */
  get allocatedBytes(): number {
    return this.chunks.size * CHUNK;
  }

  read(buf: Buffer, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const index = Math.floor(pos / CHUNK);
      const within = pos - index * CHUNK;
      const n = Math.min(CHUNK - within, buf.length - done);
      const chunk = this.chunks.get(index);
      if (chunk) chunk.copy(buf, done, within, within + n);
      else buf.fill(0, done, done + n);
      done += n;
    }
    return DONE;
  }

  write(buf: Buffer, offset: number, _fua: boolean): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const index = Math.floor(pos / CHUNK);
      const within = pos - index * CHUNK;
      const n = Math.min(CHUNK - within, buf.length - done);
      let chunk = this.chunks.get(index);
      if (!chunk) {
        chunk = Buffer.alloc(Math.min(CHUNK, this.size - index * CHUNK));
        this.chunks.set(index, chunk);
      }
      buf.copy(chunk, within, done, done + n);
      done += n;
    }
    return DONE;
  }

  flush(): Promise<void> {
    return DONE;
  }

  trim(offset: number, length: number, _fua: boolean): Promise<void> {
    this.clear(offset, length, true);
    return DONE;
  }

  zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    this.clear(offset, length, opts.mayTrim === true);
    return DONE;
  }

  /** Zero a range; whole chunks are dropped when `drop` (become holes), else kept as zeroed data. */
  private clear(offset: number, length: number, drop: boolean): void {
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const index = Math.floor(pos / CHUNK);
      const start = index * CHUNK;
      const stop = Math.min(start + CHUNK, end);
      const chunk = this.chunks.get(index);
      const whole = pos === start && stop === Math.min(start + CHUNK, this.size);
      if (whole && drop) this.chunks.delete(index);
      else if (chunk) chunk.fill(0, pos - start, stop - start);
      else if (!drop) this.chunks.set(index, Buffer.alloc(Math.min(CHUNK, this.size - start)));
      pos = stop;
    }
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    const list: Extent[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const index = Math.floor(pos / CHUNK);
      const stop = Math.min((index + 1) * CHUNK, end);
      const flags = this.chunks.has(index) ? 0 : EXTENT_HOLE | EXTENT_ZERO;
      const last = list[list.length - 1];
      if (last && last.flags === flags) last.length += stop - pos;
      else list.push({ length: stop - pos, flags });
      pos = stop;
    }
    return Promise.resolve(list);
  }

  cache(_offset: number, _length: number): Promise<void> {
    return DONE;
  }

  close(): Promise<void> {
    this.chunks.clear();
    return DONE;
  }
}

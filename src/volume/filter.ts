// The base of filters (after nbdkit's server/filters.c): every call passes to `next` unchanged;
// a filter extends this and overrides only what it changes. The zero-copy hint passes through
// too, so a filter that changes what reads return must override fileRange() to return null.

import type { Extent, FileRange, Volume, VolumeCaps, WriteHold, ZeroOptions } from "./volume.js";

/** A filter that changes nothing until a subclass overrides a call. */
export class FilterVolume implements Volume {
  readonly size: number;
  readonly description: string;

  constructor(protected readonly next: Volume) {
    this.size = next.size;
    this.description = next.description;
  }

  caps(): VolumeCaps {
    return this.next.caps();
  }
  read(buf: Buffer, offset: number): Promise<void> {
    return this.next.read(buf, offset);
  }
  write(buf: Buffer, offset: number, fua: boolean, hold?: WriteHold): Promise<void> {
    return this.next.write(buf, offset, fua, hold);
  }
  flush(): Promise<void> {
    return this.next.flush();
  }
  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.next.trim(offset, length, fua);
  }
  zero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    return this.next.zero(offset, length, opts);
  }
  cannotZeroFast(mayTrim: boolean): boolean {
    return this.next.cannotZeroFast?.(mayTrim) ?? false;
  }
  extents(offset: number, length: number): Promise<Extent[]> {
    return this.next.extents(offset, length);
  }
  fileRange(offset: number, length: number): FileRange | null {
    return this.next.fileRange?.(offset, length) ?? null;
  }
  cache(offset: number, length: number): Promise<void> {
    return this.next.cache(offset, length);
  }
  close(): Promise<void> {
    return this.next.close();
  }
}

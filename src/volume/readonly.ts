// The read-only filter: every write-type call fails with ReadOnlyError (EPERM on the wire).
// Used for `serve --read-only` and, later, under every snapshot view.

import { ReadOnlyError } from "../errors.js";
import { DONE } from "../util/done.js";
import type { Extent, Volume, VolumeCaps, ZeroOptions } from "./volume.js";

/** Wrap `next` so that nothing can change it through this handle. */
export function readOnly(next: Volume): Volume {
  const v = guard(next);
  if (next.openSession) {
    v.openSession = (label: string) => {
      const inner = next.openSession!(label);
      return { volume: guard(inner.volume), close: () => inner.close() };
    };
  }
  return v;
}

function guard(next: Volume): Volume {
  const caps: VolumeCaps = {
    ...next.caps(),
    readOnly: true,
    trim: false,
    zero: false,
    fastZero: false,
    fua: false,
  };
  const refuse = (): Promise<void> => Promise.reject(new ReadOnlyError());
  return {
    size: next.size,
    description: `${next.description} (read-only)`,
    caps: () => caps,
    read: (buf: Buffer, offset: number) => next.read(buf, offset),
    write: refuse,
    // Nothing can be written through this handle, so there is nothing to flush.
    flush: () => DONE,
    trim: refuse,
    zero: (_o: number, _l: number, _z: ZeroOptions) => refuse(),
    extents: (offset: number, length: number): Promise<Extent[]> => next.extents(offset, length),
    ...(next.fileRange ? { fileRange: next.fileRange.bind(next) } : {}),
    cache: (offset: number, length: number) => next.cache(offset, length),
    close: () => next.close(),
  };
}

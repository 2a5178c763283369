// Block status descriptors for NBD_CMD_BLOCK_STATUS (base:allocation) from a volume's extents.
//
// proto.md: the server "MUST use descriptor lengths that are an integer multiple of any advertised
// minimum block size". A volume reports extents at its own granularity (a file's SEEK_DATA /
// SEEK_HOLE boundaries are filesystem blocks, 4 KiB here), which can be finer than the export's
// minimum block size (`serve --block-size 65536,...`). A minimum block whose bytes have different
// statuses is reported with the flags they all share (bitwise AND: a hole or zero only when every
// byte is; status 0, "data", is always a correct answer). Requests are already aligned to the
// minimum block size (validate.ts), so every descriptor is a multiple of it.

/** One extent: `length` bytes with NBD block status `flags` (1 hole, 2 zero). */
export interface StatusExtent {
  length: number;
  flags: number;
}

/**
 * Descriptors (length, flags pairs, flat) for [offset, offset+length) from `extents`, which start
 * at `offset` and may cover less or more than the request. Adjacent descriptors with the same
 * flags are merged; with `one` (REQ_ONE) only the first is returned. Never empty.
 */
export function statusDescriptors(
  extents: readonly StatusExtent[],
  offset: number,
  length: number,
  minBlock: number,
  one: boolean,
): number[] {
  const mb = Math.max(1, minBlock);
  const end = offset + length;
  const out: number[] = [];
  const push = (len: number, flags: number): void => {
    const n = out.length;
    if (n > 0 && out[n - 1] === flags) out[n - 2] += len;
    else out.push(len, flags);
  };
  let i = 0;
  let eStart = offset; // start of extents[i]
  let pos = offset;
  while (pos < end && i < extents.length) {
    const e = extents[i];
    const eEnd = eStart + e.length;
    if (eEnd <= pos) {
      eStart = eEnd;
      i++;
      continue;
    }
    const blockEnd = Math.min(end, (Math.floor(pos / mb) + 1) * mb);
    if (eEnd >= blockEnd) {
      // This extent covers the minimum block at pos: report the whole blocks it covers.
      const stop = eEnd >= end ? end : Math.max(blockEnd, Math.floor(eEnd / mb) * mb);
      push(stop - pos, e.flags);
      pos = stop;
      continue;
    }
    // A minimum block with several extents in it: the flags they all have.
    let flags = e.flags;
    let j = i + 1;
    let jStart = eEnd;
    while (jStart < blockEnd && j < extents.length) {
      flags &= extents[j].flags;
      jStart += extents[j].length;
      j++;
    }
    if (jStart < blockEnd) flags = 0; // the extents end inside it: say nothing more than "data"
    push(blockEnd - pos, flags);
    pos = blockEnd;
  }
  if (out.length === 0) out.push(length, 0); // "a server MAY always report status 0"
  return one ? out.slice(0, 2) : out;
}

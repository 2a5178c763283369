// Online verify (after DRBD's `drbdadm verify`): compare the primary and the secondary block by
// block with SHA-256 checksums (the gateway computes its side), report the blocks that differ, and
// with `repair` mark them dirty so the link resyncs them.
//
// Blocks that are dirty (not yet replicated) or being written are expected to differ and are not
// counted as mismatches; a mismatch is a block the proxy believed was identical on both sides.

import { createHash } from "node:crypto";
import type { Volume } from "../volume/volume.js";
import type { TrackingLog } from "../tracking/log.js";
import type { GatewayLink } from "./link.js";

/** Result of a verify run. */
export interface VerifyResult {
  checkedBytes: number;
  blocks: number;
  mismatchedBlocks: number;
  /** Blocks skipped because they are dirty or being written. */
  skippedBlocks: number;
  mismatches: { offset: number; length: number }[];
  repaired: boolean;
  seconds: number;
}

/** Progress callback: bytes checked so far of the total. */
export type VerifyProgress = (done: number, total: number) => void;

const STEP_BLOCKS = 256;

/**
 * Read `view` from the primary at `offset` and ask the gateway for the checksums of the same range,
 * at once; settles when both have (a gateway answer that fails while the read runs is not left
 * without a handler: that took the whole proxy down).
 */
async function both(
  primary: Volume,
  link: GatewayLink,
  view: Buffer,
  offset: number,
  g: number,
  signal: AbortSignal | undefined,
): Promise<string[]> {
  if (signal?.aborted) throw new Error("verify stopped: the proxy is shutting down");
  const [, sums] = await Promise.all([primary.read(view, offset), link.checksums(offset, view.length, g)]);
  return sums;
}

/**
 * Compare primary and secondary; with `repair`, mark differing blocks dirty and resync them.
 * `signal` stops it between steps (the proxy shutting down).
 */
export async function verify(
  primary: Volume,
  tracking: TrackingLog,
  link: GatewayLink,
  repair: boolean,
  progress?: VerifyProgress,
  signal?: AbortSignal,
): Promise<VerifyResult> {
  const map = tracking.map;
  const g = map.granularity;
  const started = performance.now();
  const result: VerifyResult = {
    checkedBytes: 0,
    blocks: 0,
    mismatchedBlocks: 0,
    skippedBlocks: 0,
    mismatches: [],
    repaired: false,
    seconds: 0,
  };
  const buf = Buffer.allocUnsafe(STEP_BLOCKS * g);
  const bad: number[] = [];
  for (let b0 = 0; b0 < map.blocks; b0 += STEP_BLOCKS) {
    const offset = b0 * g;
    const length = Math.min(STEP_BLOCKS * g, map.volumeSize - offset);
    const sums = await both(primary, link, buf.subarray(0, length), offset, g, signal);
    const view = buf.subarray(0, length);
    for (let i = 0; i * g < length; i++) {
      const b = b0 + i;
      result.blocks++;
      const local = createHash("sha256")
        .update(view.subarray(i * g, Math.min((i + 1) * g, length)))
        .digest("hex");
      if (local === sums[i]) continue;
      if (map.isDirty(b)) {
        result.skippedBlocks++;
        continue;
      }
      bad.push(b);
    }
    result.checkedBytes += length;
    progress?.(result.checkedBytes, map.volumeSize);
  }
  // A block written, replicated and cleared between the two checksums above differs without being
  // out of sync: compare every candidate once more, and count it only if it still differs and is
  // still clean (and was not written meanwhile: its dirty bit would be set until replicated).
  const confirmed: number[] = [];
  for (const b of bad) {
    const offset = b * g;
    const length = Math.min(g, map.volumeSize - offset);
    const view = buf.subarray(0, length);
    const [sum] = await both(primary, link, view, offset, g, signal);
    const local = createHash("sha256").update(view).digest("hex");
    if (local !== sum && !map.isDirty(b)) confirmed.push(b);
    else if (local !== sum) result.skippedBlocks++;
  }
  bad.length = 0;
  bad.push(...confirmed);
  result.mismatchedBlocks = bad.length;
  // Coalesce the bad blocks into extents for the report.
  for (let i = 0; i < bad.length;) {
    let j = i + 1;
    while (j < bad.length && bad[j] === bad[j - 1] + 1) j++;
    const offset = bad[i] * g;
    result.mismatches.push({ offset, length: Math.min(bad[j - 1] * g + g, map.volumeSize) - offset });
    i = j;
  }
  if (repair && bad.length > 0) {
    for (const m of result.mismatches) {
      map.mark(m.offset, m.length);
      link.markStale(m.offset, m.length); // an update in flight for them must not clear them
      await tracking.activate(m.offset, m.length);
    }
    link.requestResync();
    result.repaired = true;
  }
  result.seconds = (performance.now() - started) / 1000;
  return result;
}

// The volume stack of the primary export, written once, here, where a reader sees the order
// (nbdkit's filter chain). Bottom to top:
//
//   FileVolume (src/volume/file.ts)        the primary file or block device
//   read-only guard (src/volume/readonly)  with --read-only
//
// Later layers slot in between: the PIT journal filter (before-images first), then the write fork
// to the gateways (dirty marks before sending), then the guard.

import { readOnly } from "./volume/readonly.js";
import type { Volume } from "./volume/volume.js";

/** Options that shape the primary stack. */
export interface PrimaryStackOptions {
  readOnly: boolean;
}

/** Build the primary export's stack over its base volume. */
export function buildPrimaryStack(base: Volume, opts: PrimaryStackOptions): Volume {
  let v = base;
  if (opts.readOnly) v = readOnly(v);
  return v;
}

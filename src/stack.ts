// The volume stack of the primary export, written once, here, where a reader sees the order
// (nbdkit's filter chain). Bottom to top:
//
//   FileVolume (src/volume/file.ts)        the primary file or block device
//   journal (src/pit/filter.ts)            with --pit: before-images durable before the change
//   fork (src/forks/fork.ts)               with --gateway: dirty marks (activity log) first, then
//                                          the primary write and the update to the gateway
//   read-only guard (src/volume/readonly)  with --read-only

import { forkVolume } from "./forks/fork.js";
import { journalVolume } from "./pit/filter.js";
import type { Journal } from "./pit/journal.js";
import type { GatewayLink } from "./forks/link.js";
import type { TrackingLog } from "./tracking/log.js";
import { readOnly } from "./volume/readonly.js";
import type { Volume } from "./volume/volume.js";

/** Options that shape the primary stack. */
export interface PrimaryStackOptions {
  readOnly: boolean;
  fork?: { tracking: TrackingLog; link: GatewayLink; mode: "async" | "sync" };
  journal?: Journal;
}

/** Build the primary export's stack over its base volume. */
export function buildPrimaryStack(base: Volume, opts: PrimaryStackOptions): Volume {
  let v = base;
  if (opts.journal) v = journalVolume(v, opts.journal);
  if (opts.fork) v = forkVolume(v, opts.fork.tracking, opts.fork.link, opts.fork.mode);
  if (opts.readOnly) v = readOnly(v);
  return v;
}

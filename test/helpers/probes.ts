// Watching BlockFile's page-cache probes: the one-byte RWF_NOWAIT reads an inline write makes
// before it modifies part of a page (src/blockio/index.ts, holesFrom). Tests of appends count
// them; a page probed twice in a row was probed as one write's tail and then as the next one's
// head.

import { binding } from "../../src/blockio/native.js";

export interface Probe {
  fd: number;
  at: number;
}

/** Record every probe (of `fd`, or of any file) until stop() puts the addon function back. */
export function watchProbes(fd?: number): { probes: Probe[]; stop: () => void } {
  const probes: Probe[] = [];
  // eslint-disable-next-line @typescript-eslint/unbound-method -- put back by stop(); addon functions ignore `this`
  const readNowait = binding.readNowait;
  binding.readNowait = (f, buf, offset) => {
    if (buf.length === 1 && (fd === undefined || f === fd)) probes.push({ fd: f, at: offset });
    return readNowait(f, buf, offset);
  };
  return { probes, stop: () => void (binding.readNowait = readNowait) };
}

/** The probes of the same page of the same file as the probe just before them. */
export function probedTwice(probes: Probe[]): Probe[] {
  return probes.filter((p, k) => k > 0 && p.fd === probes[k - 1].fd && p.at === probes[k - 1].at);
}

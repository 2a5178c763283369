// Sizes on the command line: bytes, or a number with a binary suffix (K, M, G, T, P; optional
// "iB"/"B"), as qemu-img and nbdkit read them. "1G" is 1073741824.

import { UsageError } from "../errors.js";

const UNITS: Record<string, number> = { "": 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 };

/** Parse "1G", "512M", "4096", "1.5GiB" into bytes; throws UsageError naming `what`. */
export function parseSize(text: string, what = "size"): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpP]?)(?:i?[bB])?\s*$/.exec(text);
  if (!m) throw new UsageError(`${what} "${text}" is not a size (examples: 1G, 512M, 4096)`);
  const bytes = Number(m[1]) * UNITS[m[2].toUpperCase()];
  if (!Number.isSafeInteger(bytes) || bytes <= 0) {
    throw new UsageError(`${what} "${text}" must be a whole, positive number of bytes below 2^53`);
  }
  return bytes;
}

/** 1073741824 -> "1 GiB", for messages. */
export function formatSize(bytes: number): string {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1 && v % 1024 === 0) {
    v /= 1024;
    i++;
  }
  if (i === 0 && v >= 1024) {
    while (v >= 1024 && i < units.length - 1) {
      v /= 1024;
      i++;
    }
    return `${v.toFixed(1)} ${units[i]}`;
  }
  return `${v} ${units[i]}`;
}

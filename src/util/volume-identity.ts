// Which volume a state directory belongs to: STATE-DIR/volume.json, written at the first start and
// checked at every later one, before the tracking log and the journal are opened. Both describe
// one volume's blocks: a journal of another volume would serve snapshots of data that volume never
// held, and a tracking log of another one would call blocks clean that differ on the secondary.
// The tracking log also records the size; the journal records nothing about its volume.
//
// A volume is the same when the size matches and either the path or the file's identity (device
// and inode: the file was moved or is reached by another path) does. A moved volume updates the
// record. Nothing here can tell a file whose contents were replaced in place (same inode).
//
// volume.json: {"version": 1, "path": "/abs/path", "size": N, "dev": D, "ino": I, "blockDevice": B}

import { existsSync, fstatSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { UsageError } from "../errors.js";
import { writeFileAtomicSync } from "./atomic.js";

export const VOLUME_FILE = "volume.json";

/** The identity of a volume as stat(2) sees it. */
export interface VolumeIdentity {
  path: string;
  size: number;
  /** st_dev and st_ino of a regular file; st_rdev (and 0) of a block device. */
  dev: number;
  ino: number;
  blockDevice: boolean;
  /**
   * The file's birth time in ns (statx), when recorded: a file deleted and made anew often gets
   * the same inode number back, never the same birth time.
   */
  birth?: string;
}

function parse(text: string): VolumeIdentity | null {
  try {
    const j = JSON.parse(text) as Partial<VolumeIdentity> & { version?: number };
    if (
      j.version === 1 &&
      typeof j.path === "string" &&
      Number.isSafeInteger(j.size) &&
      Number.isSafeInteger(j.dev) &&
      Number.isSafeInteger(j.ino) &&
      typeof j.blockDevice === "boolean" &&
      (j.birth === undefined || typeof j.birth === "string")
    )
      return {
        path: j.path,
        size: j.size!,
        dev: j.dev!,
        ino: j.ino!,
        blockDevice: j.blockDevice,
        ...(j.birth !== undefined ? { birth: j.birth } : {}),
      };
  } catch {
    // not ours: below
  }
  return null;
}

/** The identity of the open volume `fd` at `path` (its size as the volume sees it). */
export function identityOf(path: string, fd: number, blockDevice: boolean, size: number): VolumeIdentity {
  const st = fstatSync(fd, { bigint: true });
  return {
    path,
    size,
    dev: Number(blockDevice ? st.rdev : st.dev),
    ino: blockDevice ? 0 : Number(st.ino),
    blockDevice,
    ...(blockDevice ? {} : { birth: st.birthtimeNs.toString() }),
  };
}

/** What the state directory held, and what to tell someone who gave the wrong one. */
export interface ClaimTexts {
  /** "its tracking log and journal describe that volume's blocks" */
  holds: string;
  /** What a new state directory means, e.g. "(a new tracking log resyncs the whole volume)". */
  fresh: string;
}

const PROXY_TEXTS: ClaimTexts = {
  holds: "its tracking log and journal describe that volume's blocks",
  fresh: "(a new tracking log resyncs the whole volume; a new journal starts empty)",
};

/**
 * Check that `dir` belongs to `vol` (recording it at the first use); throws UsageError with what to
 * do when it belongs to another volume. Returns "new" at the first use, "same" for the same file
 * (maybe moved), "replaced" for another file at the recorded path (same size, another inode).
 */
export function claimStateDir(
  dir: string,
  vol: VolumeIdentity,
  texts: ClaimTexts = PROXY_TEXTS,
): "new" | "same" | "replaced" {
  const file = join(dir, VOLUME_FILE);
  const write = (): void => writeFileAtomicSync(file, JSON.stringify({ version: 1, ...vol }, null, 2) + "\n");
  if (!existsSync(file)) {
    write();
    return "new";
  }
  const had = parse(readFileSync(file, "utf8"));
  if (had === null) {
    throw new UsageError(
      `${file} is not a blockfork volume record; give --state-dir a directory of blockfork's own`,
    );
  }
  // A regular file is the same when its inode (and birth time, when both are recorded) is: a
  // new device number alone (a file system mounted again) does not make another file. A block
  // device is known by its device number only.
  const sameBirth = had.birth === undefined || vol.birth === undefined || had.birth === vol.birth;
  const sameFile =
    had.blockDevice === vol.blockDevice &&
    (vol.blockDevice ? had.dev === vol.dev : had.ino === vol.ino && sameBirth);
  if (had.size === vol.size && (had.path === vol.path || sameFile)) {
    if (had.path !== vol.path || had.dev !== vol.dev || !sameFile || had.birth !== vol.birth) write(); // keep it current
    return sameFile || vol.blockDevice ? "same" : "replaced";
  }
  const what =
    had.size !== vol.size
      ? `belongs to a volume of ${had.size} bytes, not ${vol.size} (${had.path})`
      : `belongs to the volume ${had.path}, not ${vol.path}`;
  throw new UsageError(
    `the state directory ${dir} ${what}: ${texts.holds}. Give the state directory of ` +
      `${vol.path}, or a new one ${texts.fresh}`,
  );
}

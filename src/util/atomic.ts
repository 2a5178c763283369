// Small files written durably and synchronously: replaced atomically (start-up records), or
// overwritten in place (records that must be writable on a full disk).

import {
  closeSync,
  constants as fsc,
  fdatasyncSync,
  fsyncSync,
  openSync,
  renameSync,
  unlinkSync,
  writeSync,
} from "node:fs";
import { dirname } from "node:path";
import { syncDir } from "../blockio/index.js";

/** Write `data` to a temporary file, fsync it, rename it over `path`, fsync the directory. */
export function writeFileAtomicSync(path: string, data: string): void {
  const tmp = `${path}.tmp-${process.pid}`;
  const fd = openSync(tmp, "w", 0o644);
  try {
    writeSync(fd, data);
    fsyncSync(fd);
  } catch (e) {
    closeSync(fd);
    unlinkSync(tmp);
    throw e;
  }
  closeSync(fd);
  renameSync(tmp, path);
  syncDir(dirname(path));
}

/**
 * A small record that must stay writable on a full disk (a journal's stop, the tracking log's
 * full-resync mark): a file of `size` bytes, allocated while there is room, then only ever
 * overwritten in place, which needs no free space. Creates `path` filled with `pad` bytes (synced,
 * with its directory) unless it exists.
 */
export function allocateInPlace(path: string, size: number, pad: number): void {
  let fd: number;
  try {
    fd = openSync(path, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL, 0o644);
  } catch (e) {
    if ((e as { code?: string }).code === "EEXIST") return;
    throw e;
  }
  try {
    if (writeSync(fd, Buffer.alloc(size, pad), 0, size, 0) !== size) throw new Error(`${path}: short write`);
    fsyncSync(fd);
  } catch (e) {
    closeSync(fd);
    unlinkSync(path);
    throw e;
  }
  closeSync(fd);
  syncDir(dirname(path));
}

/** Overwrite a file made by allocateInPlace with `text` padded to `size` with `pad`; durable on return. */
export function writeInPlace(path: string, text: string, size: number, pad: number): void {
  const b = Buffer.alloc(size, pad);
  if (b.write(text, "utf8") < Buffer.byteLength(text))
    throw new Error(`${path}: the record exceeds ${size} bytes`);
  const fd = openSync(path, "r+");
  try {
    if (writeSync(fd, b, 0, size, 0) !== size) throw new Error(`${path}: short write`);
    fdatasyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

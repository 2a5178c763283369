// The Volume interface: the one callback table every layer of the stack implements (after
// nbdkit's `struct backend`, server/internal.h). Plugins (FileVolume, MemoryVolume) do the I/O;
// filters (`(next: Volume, opts) => Volume`) override what they change and pass the rest on.
//
// Contract
// - Inputs are trusted: the NBD layer (src/nbd/validate.ts) checks ranges, alignment and flags
//   once, at the top. A volume may assume 0 <= offset, offset + length <= size, length > 0.
// - Every data call returns a promise; one that finished synchronously returns DONE
//   (src/util/done.ts) so hot paths can complete inline. Errors reject with a BlockforkError or
//   IoError whose `errno` says what went wrong (mapped to NBD errors in src/nbd/errors.ts).
// - No ordering between calls still in flight: a caller that needs "A before B" awaits A.
// - Buffers belong to the caller: write(buf) may use buf only until its promise settles, and
//   read(buf) fills buf before it settles. A layer that needs the data later (a queue to a
//   gateway, a journal) copies it, unless the caller passed a WriteHold that lets it keep the
//   buffer (the NBD layer does for payloads in buffers of their own). The NBD layer recycles
//   payload buffers as soon as a call settles and every hold on them is released.
// - flush(): every write that completed (settled) before flush() was called is durable when the
//   flush settles. `fua` on a call: that call's effect is durable when it settles.

import type { Extent } from "../blockio/index.js";

export type { Extent };

/** NBD base:allocation flags. */
export const EXTENT_HOLE = 1;
export const EXTENT_ZERO = 2;

/** What a volume can do; the NBD layer turns this into transmission flags. */
export interface VolumeCaps {
  readOnly: boolean;
  /** flush() is meaningful (the volume has a volatile write cache). */
  flush: boolean;
  /** Per-call FUA is supported (natively or by flushing). */
  fua: boolean;
  trim: boolean;
  zero: boolean;
  /** zero() with `fast` either is fast or fails at once with NotSupportedError. */
  fastZero: boolean;
  /** extents() reports real allocation (holes); otherwise all data. */
  extents: boolean;
  cache: boolean;
  /** A flush through any handle covers writes completed through every handle (NBD CAN_MULTI_CONN). */
  multiConn: boolean;
  rotational: boolean;
}

/** Options of Volume.zero (NBD_CMD_WRITE_ZEROES flags). */
export interface ZeroOptions {
  fua?: boolean;
  /** The range may become a hole (NBD: NO_HOLE not set). */
  mayTrim?: boolean;
  /** Fail with NotSupportedError rather than be slower than writing zeroes (NBD FAST_ZERO). */
  fast?: boolean;
}

/** A range of a volume that is plain bytes of a file descriptor (the zero-copy hint). */
export interface FileRange {
  fd: number;
  offset: number;
}

/**
 * A read of [offset, offset+length) lent as file pieces: `pieces` holds (fd, offset, length)
 * triples in order (fd -1: that many zero bytes), all in the page cache when lent. Until
 * release(), the lender keeps them valid: if a piece's file is about to stop holding the read's
 * contents (the primary is about to be overwritten), the lender first copies every piece into
 * `data`, and the borrower sends `data` instead. The borrower calls release() once it has sent
 * the pieces or `data` (or dropped the read).
 *
 * Pieces of `copyFd` (a file that may change once the lease is released) must be copied when
 * sent: sendfile(2) leaves the kernel holding references to the file's page-cache pages until
 * the client has read them, and an overwrite in between would reach the client. Pieces of other
 * files (journal segments, never rewritten) may go by reference.
 */
export interface PieceLease {
  readonly offset: number;
  readonly length: number;
  readonly pieces: Float64Array;
  /** The file whose pieces must be copied when sent; -2: every piece; -1: none. */
  readonly copyFd: number;
  data: Buffer | null;
  release(): void;
}

/**
 * Offered with a write by a caller that can leave its buffer alone for longer: retain() returns
 * true when the callee may keep `buf` past the call (unchanged, not reused) until it calls
 * release() once; false means it must copy what it needs, as without a hold.
 */
export interface WriteHold {
  retain(): boolean;
  release(): void;
}

/** A volume handle for one client session (see Volume.openSession). */
export interface VolumeSession {
  volume: Volume;
  close(): void;
}

/** A block volume: the unit every layer of the stack implements. */
export interface Volume {
  /** Size in bytes (fixed for the life of the volume). */
  readonly size: number;
  /** Short description for logs and NBD_INFO_DESCRIPTION. */
  readonly description: string;
  caps(): VolumeCaps;
  read(buf: Buffer, offset: number): Promise<void>;
  /** `hold`, when given, may let a layer keep `buf` past the call instead of copying it. */
  write(buf: Buffer, offset: number, fua: boolean, hold?: WriteHold): Promise<void>;
  flush(): Promise<void>;
  trim(offset: number, length: number, fua: boolean): Promise<void>;
  zero(offset: number, length: number, opts: ZeroOptions): Promise<void>;
  /**
   * Optional: true when a `fast` zero (with this `mayTrim`) is known to fail with
   * NotSupportedError (an earlier attempt found out, or the storage cannot do it at all). Filters
   * that would do work before the zero (journal a before-image, send it to a gateway) ask first:
   * a refused FAST_ZERO must cost nothing (proto.md).
   */
  cannotZeroFast?(mayTrim: boolean): boolean;
  /** Runs covering a prefix of [offset, offset+length), at least one, summing to <= length. */
  extents(offset: number, length: number): Promise<Extent[]>;
  /**
   * Optional zero-copy hint: when [offset, offset+length) reads as exactly these bytes of a file
   * descriptor, say where, so the NBD layer may sendfile() them. A layer that changes what reads
   * return must not pass this through; leaving it undefined is always correct.
   */
  fileRange?(offset: number, length: number): FileRange | null;
  /**
   * Optional hint for a read made of pieces of several files (a snapshot: runs of the primary and
   * journal images): lend them to be read and sent when the socket has room (no reply-sized
   * buffer, no trip through the I/O pool), or null to be read the ordinary way.
   * See PieceLease for what the lender promises.
   */
  lendPieces?(offset: number, length: number): PieceLease | null;
  /**
   * Optional, with lendPieces: bring into the page cache what lendPieces refused for not being
   * cached, so that asking again may lend; null when there is nothing to bring in.
   */
  warmPieces?(offset: number, length: number): Promise<void> | null;
  /**
   * Optional: a handle for one client session (an NBD connection). Filters with per-session state
   * (the PIT journal's partial journals) implement it; pass-through filters forward it. Leaving it
   * undefined means every session shares this handle.
   */
  openSession?(label: string): VolumeSession;
  /** Hint: bring a range into cache (NBD_CMD_CACHE). */
  cache(offset: number, length: number): Promise<void>;
  close(): Promise<void>;
}

/** Capabilities of a plain read-write volume with everything supported. */
export function fullCaps(overrides: Partial<VolumeCaps> = {}): VolumeCaps {
  return {
    readOnly: false,
    flush: true,
    fua: true,
    trim: true,
    zero: true,
    fastZero: true,
    extents: true,
    cache: true,
    multiConn: true,
    rotational: false,
    ...overrides,
  };
}

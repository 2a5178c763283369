// Errors with stable codes (after undici lib/core/errors.js and abstract-level lib/errors.js).
// Every failure that can reach a client carries `errno`: the system errno that says what kind of
// failure it is. src/nbd/errors.ts maps it to the NBD error on the wire, once, in one place.
// Tests assert on `code`, never on message text. Messages say what went wrong and what to do.

import { constants } from "node:os";

const E = constants.errno;
/** Linux ESHUTDOWN (not in Node's os.constants.errno). */
export const ESHUTDOWN = 108;

/** Base class of every error blockfork raises on purpose. */
export class BlockforkError extends Error {
  readonly code: string;
  readonly errno: number;
  constructor(code: string, errno: number, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
    this.errno = errno;
  }
}

const errnoNames = new Map<number, string>();
for (const [name, value] of Object.entries(E)) if (!errnoNames.has(value)) errnoNames.set(value, name);

/** Name of a system errno ("EIO"), or "E<n>" when unknown. */
export function errnoName(errno: number): string {
  return errnoNames.get(errno) ?? `E${errno}`;
}

/** A system call failed; `code` is the errno name (EIO, ENOSPC, ...). */
export class IoError extends BlockforkError {
  readonly syscall: string;
  constructor(errno: number, syscall: string, detail?: string) {
    super(
      errnoName(errno),
      errno,
      `${syscall} failed: ${errnoName(errno)}${detail === undefined ? "" : ` (${detail})`}`,
    );
    this.syscall = syscall;
  }
}

/** A write-type operation on a read-only volume or export. */
export class ReadOnlyError extends BlockforkError {
  constructor(message = "the export is read-only") {
    super("ERR_READ_ONLY", E.EPERM, message);
  }
}

/** A request outside the volume, or misaligned, or too large. */
export class OutOfRangeError extends BlockforkError {
  constructor(message: string, errno: number = E.EINVAL) {
    super("ERR_OUT_OF_RANGE", errno, message);
  }
}

/** An operation the volume cannot do (or cannot do fast, for FAST_ZERO). */
export class NotSupportedError extends BlockforkError {
  constructor(message: string) {
    super("ERR_NOT_SUPPORTED", E.EOPNOTSUPP, message);
  }
}

/** Why a FAST_ZERO is refused: the storage would have to write the zeroes. */
export const NO_FAST_ZERO = "this storage cannot write zeroes faster than a write";

/** The server is shutting down and takes no new work. */
export class ShutdownError extends BlockforkError {
  constructor(message = "the server is shutting down") {
    super("ERR_SHUTDOWN", ESHUTDOWN, message);
  }
}

/** Bad command line or configuration; the message says what to change. */
export class UsageError extends BlockforkError {
  constructor(message: string) {
    super("ERR_USAGE", E.EINVAL, message);
  }
}

/** The errno carried by any error: BlockforkError.errno, a Node system error, else EIO. */
export function errnoOf(err: unknown): number {
  if (err instanceof BlockforkError) return err.errno;
  if (typeof err === "object" && err !== null) {
    const n = (err as { errno?: unknown }).errno;
    // Node system errors carry negative errno (libuv convention).
    if (typeof n === "number" && n !== 0) return Math.abs(n);
  }
  return E.EIO;
}

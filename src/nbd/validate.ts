// Request validation: one pure function, run once per request before anything touches a volume
// (nbdkit server/protocol.c validate_request). It returns the NBD error to answer with, or null.
// Volumes trust their inputs because of this check.

import { COMMANDS } from "./commands.js";
import { CMD, CMD_FLAG, NBD_ERR, TF, type Request } from "./wire.js";

/** What a connection negotiated, as far as validation needs it. */
export interface ValidationContext {
  size: number;
  /** Transmission flags sent to the client. */
  flags: number;
  /** A metadata context was selected (BLOCK_STATUS allowed). */
  blockStatus: boolean;
  minBlock: number;
  maxBlock: number;
}

/** A rejected request: the NBD error and a message for the log and the structured error chunk. */
export interface Rejection {
  error: number;
  message: string;
}

function reject(error: number, message: string): Rejection {
  return { error, message };
}

/** Check a request; null means valid. DISC is always valid (it is handled before this). */
export function validateRequest(req: Request, ctx: ValidationContext): Rejection | null {
  const info = COMMANDS[req.type];
  if (info === undefined) return reject(NBD_ERR.EINVAL, `unknown command ${req.type}`);
  // proto.md: a write-type command on a read-only export SHOULD fail with EPERM, whatever its
  // flags (FUA and FAST_ZERO are not advertised there); nbdkit checks this first too.
  if (info.writes && ctx.flags & TF.READ_ONLY) return reject(NBD_ERR.EPERM, "the export is read-only");

  let allowed = info.flags;
  if (ctx.flags & TF.SEND_FUA) allowed |= CMD_FLAG.FUA;
  if (!(ctx.flags & TF.SEND_DF)) allowed &= ~CMD_FLAG.DF;
  if (!(ctx.flags & TF.SEND_FAST_ZERO)) allowed &= ~CMD_FLAG.FAST_ZERO;
  if (req.flags & ~allowed) {
    return reject(NBD_ERR.EINVAL, `flags 0x${req.flags.toString(16)} not valid for ${info.name}`);
  }
  if (info.advertisedBy !== 0 && !(ctx.flags & info.advertisedBy)) {
    return reject(NBD_ERR.EINVAL, `${info.name} was not advertised for this export`);
  }
  if (req.type === CMD.BLOCK_STATUS && !ctx.blockStatus) {
    return reject(NBD_ERR.EINVAL, "BLOCK_STATUS without a metadata context (negotiate base:allocation)");
  }
  if (req.type === CMD.FLUSH) {
    if (req.offset !== 0 || req.length !== 0)
      return reject(NBD_ERR.EINVAL, "FLUSH with nonzero offset or length");
    return null;
  }
  if (!info.ranged) return null;

  if (req.length === 0) return reject(NBD_ERR.EINVAL, `${info.name} of length 0`);
  const end = req.offset + req.length;
  if (!Number.isSafeInteger(end) || end > ctx.size) {
    // proto.md: ENOSPC for a write (WRITE, WRITE_ZEROES) past the end, EINVAL for a read or trim.
    const error = info.writes && req.type !== CMD.TRIM ? NBD_ERR.ENOSPC : NBD_ERR.EINVAL;
    return reject(
      error,
      // Offsets from 2^53 up are not exact as numbers: say so rather than print a rounded one.
      `${info.name} [${Number.isSafeInteger(req.offset) ? req.offset : "2^53 or more"}, +${req.length}) ` +
        `is past the end of the export (${ctx.size})`,
    );
  }
  if (ctx.minBlock > 1 && (req.offset % ctx.minBlock !== 0 || req.length % ctx.minBlock !== 0)) {
    return reject(NBD_ERR.EINVAL, `${info.name} not aligned to the minimum block size ${ctx.minBlock}`);
  }
  if (
    (req.type === CMD.READ || req.type === CMD.WRITE || req.type === CMD.CACHE) &&
    req.length > ctx.maxBlock
  ) {
    return reject(
      NBD_ERR.EINVAL,
      `${info.name} of ${req.length} bytes exceeds the maximum block size ${ctx.maxBlock}`,
    );
  }
  return null;
}

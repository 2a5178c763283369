// The one mapping from a failure (its system errno) to the error value NBD puts on the wire.

import { constants } from "node:os";
import { errnoOf, ESHUTDOWN } from "../errors.js";
import { NBD_ERR } from "./wire.js";

const E = constants.errno;

/** NBD error value for a system errno (proto.md "Error values"; EDQUOT/EFBIG are ENOSPC). */
export function nbdErrorForErrno(errno: number): number {
  switch (errno) {
    case E.EPERM:
    case E.EROFS:
    case E.EACCES:
      return NBD_ERR.EPERM;
    case E.EIO:
      return NBD_ERR.EIO;
    case E.ENOMEM:
      return NBD_ERR.ENOMEM;
    case E.EINVAL:
      return NBD_ERR.EINVAL;
    case E.ENOSPC:
    case E.EDQUOT:
    case E.EFBIG:
      return NBD_ERR.ENOSPC;
    case E.EOVERFLOW:
      return NBD_ERR.EOVERFLOW;
    case E.EOPNOTSUPP:
    case E.ENOSYS:
      return NBD_ERR.ENOTSUP;
    case ESHUTDOWN:
      return NBD_ERR.ESHUTDOWN;
    default:
      return NBD_ERR.EIO;
  }
}

/** NBD error value for any thrown error. */
export function nbdErrorOf(err: unknown): number {
  return nbdErrorForErrno(errnoOf(err));
}

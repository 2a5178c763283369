// One table of NBD commands: the name, which flags each accepts, whether a payload follows, whether
// it changes the export, and which transmission flag advertises it. It drives validation
// (validate.ts) and log names, so adding a command is one row here.

import { CMD, CMD_FLAG, TF } from "./wire.js";

/** One row of the command table. */
export interface CommandInfo {
  name: string;
  code: number;
  /** Command flags valid for this command (FUA is added when SEND_FUA was advertised). */
  flags: number;
  /** A WRITE payload of `length` bytes follows the header. */
  payload: boolean;
  /** Changes the export: refused with EPERM on read-only exports. */
  writes: boolean;
  /** Transmission flag that must have been advertised for the client to use it (0 = always). */
  advertisedBy: number;
  /** Offset/length name a range of the export that must lie inside it. */
  ranged: boolean;
}

const rows: CommandInfo[] = [
  {
    name: "READ",
    code: CMD.READ,
    flags: CMD_FLAG.DF,
    payload: false,
    writes: false,
    advertisedBy: 0,
    ranged: true,
  },
  { name: "WRITE", code: CMD.WRITE, flags: 0, payload: true, writes: true, advertisedBy: 0, ranged: true },
  { name: "DISC", code: CMD.DISC, flags: 0, payload: false, writes: false, advertisedBy: 0, ranged: false },
  {
    name: "FLUSH",
    code: CMD.FLUSH,
    flags: 0,
    payload: false,
    writes: false,
    advertisedBy: TF.SEND_FLUSH,
    ranged: false,
  },
  {
    name: "TRIM",
    code: CMD.TRIM,
    flags: 0,
    payload: false,
    writes: true,
    advertisedBy: TF.SEND_TRIM,
    ranged: true,
  },
  {
    name: "CACHE",
    code: CMD.CACHE,
    flags: 0,
    payload: false,
    writes: false,
    advertisedBy: TF.SEND_CACHE,
    ranged: true,
  },
  {
    name: "WRITE_ZEROES",
    code: CMD.WRITE_ZEROES,
    flags: CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO,
    payload: false,
    writes: true,
    advertisedBy: TF.SEND_WRITE_ZEROES,
    ranged: true,
  },
  {
    name: "BLOCK_STATUS",
    code: CMD.BLOCK_STATUS,
    flags: CMD_FLAG.REQ_ONE,
    payload: false,
    writes: false,
    advertisedBy: 0,
    ranged: true,
  },
];

/** Command table indexed by command code; undefined for unknown commands. */
export const COMMANDS: readonly (CommandInfo | undefined)[] = (() => {
  const t: (CommandInfo | undefined)[] = [];
  for (const r of rows) t[r.code] = r;
  return t;
})();

/** Name of a command code for logs. */
export function commandName(code: number): string {
  return COMMANDS[code]?.name ?? `UNKNOWN(${code})`;
}

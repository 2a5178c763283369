// Unix socket paths for listeners: a stale socket file left by a killed process is removed; a live
// one (something accepts on it) or a non-socket file is a usage error.

import { existsSync, statSync, unlinkSync } from "node:fs";
import { connect } from "node:net";
import { UsageError } from "../errors.js";

/** Make `path` free for listen(): remove a stale socket; refuse a live one or another kind of file. */
export async function clearStaleSocket(path: string): Promise<void> {
  if (!existsSync(path)) return;
  if (!statSync(path).isSocket())
    throw new UsageError(`${path} exists and is not a socket; choose another path`);
  const alive = await new Promise<boolean>((resolve) => {
    const c = connect(path);
    c.once("connect", () => {
      c.destroy();
      resolve(true);
    });
    c.once("error", () => resolve(false));
  });
  if (alive) throw new UsageError(`another server is listening on ${path}; stop it or choose another path`);
  unlinkSync(path);
}

// What to tell an operator whose --state-dir cannot be created or written. mkdir -p on a read-only
// file system reports ENOENT for the first missing level (Node's recursive mkdir), so the nearest
// existing directory is asked (access W_OK), which reports EROFS or EACCES as they are.

import { accessSync, constants, existsSync } from "node:fs";
import { dirname, resolve } from "node:path";

/** The advice for a state directory `dir` that failed with `e`. */
export function stateDirAdvice(dir: string, e: unknown): string {
  let code = (e as NodeJS.ErrnoException).code;
  if (code === "ENOENT") {
    let at = resolve(dir);
    while (!existsSync(at) && dirname(at) !== at) at = dirname(at);
    try {
      accessSync(at, constants.W_OK);
    } catch (w) {
      code = (w as NodeJS.ErrnoException).code ?? code;
    }
  }
  if (code === "EROFS") return "it is on a read-only file system: give --state-dir a writable directory";
  if (code === "EACCES" || code === "EPERM")
    return "permission denied: give --state-dir a directory this user can write";
  if (code === "ENOTDIR" || code === "EEXIST") return "a file is in the way: give --state-dir a directory";
  return "give --state-dir a writable directory";
}

// Talking to a running proxy's admin socket (see server.ts), for the status/tracking/verify/resync
// commands.

import { request } from "node:http";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { UsageError } from "../errors.js";

/** Nothing answers on the admin socket (a runtime failure, exit status 1, not a usage error). */
export class NoProxyError extends Error {
  readonly code = "ERR_NO_PROXY";
}

/** Path of the admin socket in a state directory. */
export function adminSocket(stateDir: string): string {
  return join(stateDir, "admin.sock");
}

/** True when a proxy is listening on the state directory's admin socket. */
export function proxyRunning(stateDir: string): boolean {
  return existsSync(adminSocket(stateDir));
}

/**
 * Call the admin endpoint; `onLine` receives each NDJSON line of a streamed answer. Resolves with
 * the parsed body (or the last line). Throws NoProxyError when no proxy answers.
 */
export function adminCall(
  stateDir: string,
  method: "GET" | "POST",
  path: string,
  onLine?: (value: unknown) => void,
): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: adminSocket(stateDir), method, path }, (res) => {
      let buf = "";
      let last: unknown = undefined;
      res.setEncoding("utf8");
      res.on("data", (d: string) => {
        buf += d;
        if (!onLine) return;
        let nl: number;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (line.trim()) {
            last = JSON.parse(line) as unknown;
            onLine(last);
          }
        }
      });
      let ended = false;
      res.on("end", () => {
        ended = true;
        try {
          const body = buf.trim() ? (JSON.parse(buf) as unknown) : last;
          // A streamed answer that failed midway ends with an error line (its status was 200).
          const error = (body as { error?: { code?: string; message?: string } } | undefined)?.error;
          if ((res.statusCode ?? 500) >= 400 || error !== undefined) {
            const msg = error?.message ?? `status ${res.statusCode}`;
            reject(error?.code === "ERR_USAGE" ? new UsageError(msg) : new Error(msg));
          } else resolve(body);
        } catch (e) {
          reject(e);
        }
      });
      // Cut off before the end (the proxy stopped or was killed): neither 'end' nor an error of
      // the request says so, and the caller would wait for nothing.
      res.on("close", () => {
        if (!ended) reject(new Error("the proxy closed the connection before it answered (did it stop?)"));
      });
    });
    req.on("error", (e: NodeJS.ErrnoException) => {
      if (e.code === "ENOENT" || e.code === "ECONNREFUSED") {
        reject(
          new NoProxyError(
            `no proxy is running with --state-dir ${stateDir} (nothing answers on ${adminSocket(stateDir)}); ` +
              "a serve started without --gateway, --pit or --state-dir has no state directory and no admin " +
              "socket at all",
          ),
        );
      } else if (e.code === "ENOTDIR") {
        reject(
          new UsageError(
            `--state-dir ${stateDir} is not a directory: give the proxy's state directory (by default ` +
              "the volume's path with .blockfork added), not the volume",
          ),
        );
      } else reject(e);
    });
    req.end();
  });
}

// Running real client tools from tests: a promise over child_process with a timeout, and the
// environment quirks of this machine (nbdsh needs Debian's python3, which has the nbd module).

import { spawn, type SpawnOptions } from "node:child_process";
import { existsSync } from "node:fs";

/** What a finished command printed and how it ended. */
export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Options for run(). */
export interface RunOptions {
  input?: string | Buffer;
  timeoutMs?: number;
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Resolve even when the exit status is not 0 (default: reject). */
  allowFailure?: boolean;
}

/** PATH with /usr/bin and /usr/sbin first, so nbdsh finds the python3 that has the nbd module. */
export const SYSTEM_PATH = `/usr/sbin:/usr/bin:/sbin:/bin:${process.env.PATH ?? ""}`;

/** Run a command to completion. Rejects on a non-zero status unless allowFailure. */
export function run(cmd: string, args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const so: SpawnOptions = {
      env: { ...process.env, PATH: SYSTEM_PATH, ...opts.env },
      stdio: ["pipe", "pipe", "pipe"],
      ...(opts.cwd ? { cwd: opts.cwd } : {}),
    };
    const child = spawn(cmd, args, so);
    let stdout = "";
    let stderr = "";
    child.stdout!.setEncoding("utf8").on("data", (d: string) => (stdout += d));
    child.stderr!.setEncoding("utf8").on("data", (d: string) => (stderr += d));
    const timer = setTimeout(() => {
      child.kill("SIGKILL");
      reject(
        new Error(`${cmd} ${args.join(" ")}: timed out after ${opts.timeoutMs ?? 120_000} ms\n${stderr}`),
      );
    }, opts.timeoutMs ?? 120_000);
    child.on("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      const r = { code, signal, stdout, stderr };
      if (code !== 0 && !opts.allowFailure) {
        reject(
          new Error(
            `${cmd} ${args.join(" ")} exited with ${code ?? signal}\nstdout: ${stdout}\nstderr: ${stderr}`,
          ),
        );
      } else resolve(r);
    });
    child.stdin!.on("error", () => {});
    if (opts.input !== undefined) child.stdin!.end(opts.input);
    else child.stdin!.end();
  });
}

/** Run a Python snippet under nbdsh (libnbd's shell) with `URI` in the environment. */
export function nbdsh(uri: string, code: string, opts: RunOptions = {}): Promise<RunResult> {
  return run("nbdsh", ["-n", "-c", code], { ...opts, env: { ...opts.env, URI: uri } });
}

/** Fail loudly (not skip) when a tool the tests need is missing: scripts/ensure-test-deps.sh installs them. */
export function requireTool(path: string): void {
  if (!existsSync(path)) {
    throw new Error(`${path} is missing: run "bash scripts/ensure-test-deps.sh" as root (npm test does)`);
  }
}

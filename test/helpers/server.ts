// Start `blockfork serve` on a private unix socket for a black-box test, and stop it again.
// Every server a test starts is stopped by the test (or by the after() hook this registers).

import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { isAbsolute, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

/** The project root (two levels above dist/test/helpers or test/helpers). */
export const ROOT = resolve(fileURLToPath(import.meta.url), "../../../..");
export const BIN = join(ROOT, "bin", "blockfork.js");
/**
 * The workplace's shared tools: BLOCKFORK_SHARED, else ../shared beside the repository, else (a
 * clone in a scratch directory) ../shared beside the local repository it was cloned from.
 */
export const SHARED = process.env.BLOCKFORK_SHARED ?? findShared();

function findShared(): string {
  const beside = resolve(ROOT, "..", "shared");
  if (existsSync(beside)) return beside;
  try {
    const origin = execFileSync("git", ["-C", ROOT, "remote", "get-url", "origin"], { encoding: "utf8" })
      .trim()
      .replace(/^file:\/\//, "");
    const there = resolve(origin, "..", "shared");
    if (isAbsolute(origin) && existsSync(there)) return there;
  } catch {
    // not a git clone, or no origin: the VM tests say which script is missing
  }
  return beside;
}
/** The VM whose kernel nbd-client attaches a server (test/vm). */
export const VM_SCRIPT = join(SHARED, "vm", "vm-nbd-client.sh");

/** A running server. */
export interface ServerHandle {
  proc: ChildProcess;
  dir: string;
  sock: string;
  volume: string;
  /** nbd+unix URI of the default export. */
  uri: string;
  /** URI of a named export on the same socket. */
  uriFor(name: string): string;
  /** Everything the server printed on stderr so far. */
  log(): string;
  stdout(): string;
  /** Send a signal (default SIGTERM) and wait for exit. */
  stop(signal?: NodeJS.Signals): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Options of startServer(). */
export interface StartOptions {
  /** Extra `serve` arguments. */
  args?: string[];
  /** Volume path (default: DIR/disk.img created with `size`). */
  volume?: string;
  /** --size for a new volume (default 64M); null to pass no --size. */
  size?: string | null;
  /** Scratch directory (default: a new one, removed at stop unless keepDir). */
  dir?: string;
  keepDir?: boolean;
  env?: NodeJS.ProcessEnv;
}

/** Make a scratch directory under the system tmpdir. */
/**
 * Mount a tmpfs of `size` ("8m") at `path` (created if needed), for tests that fill a disk; root
 * only (npm test runs as root). Returns the unmount, which the test must call.
 */
export function mountTmpfs(path: string, size: string): () => void {
  if (process.getuid?.() !== 0)
    throw new Error(`mounting a tmpfs at ${path} needs root (npm test runs as root)`);
  mkdirSync(path, { recursive: true });
  execFileSync("mount", ["-t", "tmpfs", "-o", `size=${size}`, "tmpfs", path]);
  return () => execFileSync("umount", [path]);
}

export function scratchDir(prefix = "blockfork-test-"): string {
  return mkdtempSync(join(tmpdir(), prefix));
}

/** Resolve when a unix socket accepts connections (or reject after timeoutMs). */
export async function waitForSocket(path: string, timeoutMs = 15_000, proc?: ChildProcess): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((res) => {
      const c = connect(path);
      c.once("connect", () => {
        c.destroy();
        res(true);
      });
      c.once("error", () => res(false));
    });
    if (ok) return;
    if (proc && proc.exitCode !== null)
      throw new Error(`server exited with ${proc.exitCode} before listening`);
    if (Date.now() > deadline) throw new Error(`nothing listening on ${path} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Start a server and wait until it listens. */
export async function startServer(opts: StartOptions = {}): Promise<ServerHandle> {
  const dir = opts.dir ?? scratchDir();
  const sock = join(dir, "nbd.sock");
  const volume = opts.volume ?? join(dir, "disk.img");
  const args = [BIN, "serve", "--volume", volume, "--socket", sock, "--listen", "none"];
  const size = opts.size === undefined ? "64M" : opts.size;
  if (size !== null) args.push("--size", size);
  args.push(...(opts.args ?? []));
  const proc = spawn(process.execPath, args, {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, ...opts.env },
  });
  let err = "";
  let out = "";
  proc.stderr.setEncoding("utf8").on("data", (d: string) => (err += d));
  proc.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) =>
    proc.once("exit", (code, signal) => res({ code, signal })),
  );
  try {
    await waitForSocket(sock, 15_000, proc);
    // The banner is printed once every listener is up, just after the socket starts accepting.
    for (let i = 0; i < 200 && !out.includes("blockfork: serving"); i++)
      await new Promise((r) => setTimeout(r, 25));
  } catch (e) {
    proc.kill("SIGKILL");
    throw new Error(`${(e as Error).message}\nserver stderr:\n${err}`);
  }
  let stopped = false;
  return {
    proc,
    dir,
    sock,
    volume,
    uri: `nbd+unix:///?socket=${sock}`,
    uriFor: (name: string) => `nbd+unix:///${encodeURIComponent(name)}?socket=${sock}`,
    log: () => err,
    stdout: () => out,
    async stop(signal: NodeJS.Signals = "SIGTERM") {
      if (!stopped) {
        stopped = true;
        if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
        const timer = setTimeout(() => proc.kill("SIGKILL"), 40_000);
        const r = await exited;
        clearTimeout(timer);
        if (!opts.keepDir && opts.dir === undefined) rmSync(dir, { recursive: true, force: true });
        return r;
      }
      return exited;
    },
  };
}

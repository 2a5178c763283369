// nbdfuse exposing an export as a file, a loop device over it, and optionally an ext4 mount: the
// stack the filesystem tests build on blockfork, torn down in reverse by detach().

import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, rmSync, statSync } from "node:fs";
import { join } from "node:path";
import { run, SYSTEM_PATH } from "./run.js";

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** nbdfuse exposing an export as a file, a loop device over it, and optionally a mount. */
export class FuseLoop {
  fuseProc: ChildProcess | null = null;
  fuseErr = "";
  fuseMounted = false;
  loop = "";
  mounted = false;

  constructor(
    readonly fuseDir: string,
    readonly mnt: string,
    readonly readOnly = false,
  ) {}

  get file(): string {
    return join(this.fuseDir, "nbd");
  }

  /** Start nbdfuse on `uri` and put a loop device over its file. */
  async attach(uri: string, size: number): Promise<void> {
    mkdirSync(this.fuseDir, { recursive: true });
    const pidfile = `${this.fuseDir}.pid`;
    rmSync(pidfile, { force: true });
    const p = spawn("nbdfuse", [...(this.readOnly ? ["-r"] : []), "-P", pidfile, this.fuseDir, uri], {
      stdio: ["ignore", "ignore", "pipe"],
      env: { ...process.env, PATH: SYSTEM_PATH },
    });
    this.fuseProc = p;
    this.fuseErr = "";
    p.stderr.setEncoding("utf8").on("data", (d: string) => (this.fuseErr += d));
    const deadline = Date.now() + 20_000;
    while (!existsSync(pidfile)) {
      if (p.exitCode !== null) throw new Error(`nbdfuse exited with ${p.exitCode}: ${this.fuseErr}`);
      if (Date.now() > deadline) throw new Error(`nbdfuse not ready after 20 s: ${this.fuseErr}`);
      await sleep(50);
    }
    this.fuseMounted = true;
    const got = statSync(this.file).size;
    if (got !== size) throw new Error(`nbdfuse's file has ${got} bytes, the export ${size}`);
    this.loop = (
      await run("losetup", ["--find", "--show", ...(this.readOnly ? ["-r"] : []), this.file])
    ).stdout.trim();
    if (!/^\/dev\/loop\d+$/.test(this.loop)) throw new Error(`losetup printed "${this.loop}"`);
  }

  async mount(options?: string): Promise<void> {
    mkdirSync(this.mnt, { recursive: true });
    await run("mount", ["-t", "ext4", ...(options ? ["-o", options] : []), this.loop, this.mnt]);
    this.mounted = true;
  }

  async umount(): Promise<void> {
    if (!this.mounted) return;
    await run("umount", [this.mnt]);
    this.mounted = false;
  }

  /** Undo everything still set up; tries every step even if one fails. */
  async detach(): Promise<void> {
    const errors: string[] = [];
    if (this.mounted) {
      const r = await run("umount", [this.mnt], { allowFailure: true });
      if (r.code !== 0) {
        errors.push(`umount: ${r.stderr}`);
        await run("umount", ["-l", this.mnt], { allowFailure: true });
      }
      this.mounted = false;
    }
    if (this.loop) {
      const r = await run("losetup", ["-d", this.loop], { allowFailure: true });
      if (r.code !== 0) errors.push(`losetup -d ${this.loop}: ${r.stderr}`);
      this.loop = "";
    }
    if (this.fuseMounted) {
      const r = await run("fusermount3", ["-u", this.fuseDir], { allowFailure: true });
      if (r.code !== 0) {
        errors.push(`fusermount3 -u: ${r.stderr}`);
        await run("fusermount3", ["-u", "-z", this.fuseDir], { allowFailure: true });
      }
      this.fuseMounted = false;
    }
    const p = this.fuseProc;
    if (p && p.exitCode === null && p.signalCode === null) {
      const exited = new Promise<void>((r) => p.once("exit", () => r()));
      const t = setTimeout(() => p.kill("SIGKILL"), 10_000);
      await exited;
      clearTimeout(t);
    }
    this.fuseProc = null;
    if (errors.length > 0) throw new Error(`teardown: ${errors.join("; ")}`);
  }
}

// A real filesystem on blockfork: nbdfuse exposes the export as a file, a loop device turns that
// file into a block device, and ext4 lives on it. Thousands of small files and a few large ones
// are written, the whole stack is torn down and rebuilt (so every read goes through NBD again),
// every checksum is verified, e2fsck finds nothing, and after a server restart on the same volume
// file the filesystem and its data are still there.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { run, SYSTEM_PATH } from "../helpers/run.js";

const MiB = 1024 * 1024;
const SIZE = 256 * MiB;
const SMALL_FILES = 2000;
const BIG_FILES = 3;

function sha256(b: Uint8Array): string {
  return createHash("sha256").update(b).digest("hex");
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** nbdfuse -> loop device -> (optionally) a mount; torn down in reverse by detach(). */
class Stack {
  fuseProc: ChildProcess | null = null;
  fuseErr = "";
  fuseMounted = false;
  loop = "";
  mounted = false;

  constructor(
    readonly fuseDir: string,
    readonly mnt: string,
  ) {}

  get nbdFile(): string {
    return join(this.fuseDir, "nbd");
  }

  /** Start nbdfuse on `uri` and put a loop device over its file. */
  async attach(uri: string): Promise<void> {
    mkdirSync(this.fuseDir, { recursive: true });
    const pidfile = `${this.fuseDir}.pid`;
    rmSync(pidfile, { force: true });
    const p = spawn("nbdfuse", ["-P", pidfile, this.fuseDir, uri], {
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
    assert.equal(statSync(this.nbdFile).size, SIZE, "nbdfuse's file does not have the export's size");
    this.loop = (await run("losetup", ["--find", "--show", this.nbdFile])).stdout.trim();
    assert.match(this.loop, /^\/dev\/loop\d+$/);
  }

  async mount(readOnly = false): Promise<void> {
    mkdirSync(this.mnt, { recursive: true });
    await run("mount", ["-t", "ext4", ...(readOnly ? ["-o", "ro"] : []), this.loop, this.mnt]);
    this.mounted = true;
  }

  async umount(): Promise<void> {
    if (!this.mounted) return;
    await run("umount", [this.mnt]);
    this.mounted = false;
  }

  /** Undo everything that is still set up; tries every step even if one fails. */
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

/** Files written and their checksums, relative to the filesystem root. */
type Manifest = Map<string, string>;

function writeFiles(root: string): Manifest {
  const m: Manifest = new Map();
  for (let i = 0; i < SMALL_FILES; i++) {
    const dir = join(root, `d${String(i % 40).padStart(2, "0")}`);
    if (i < 40) mkdirSync(dir);
    const data = randomBytes(1 + ((i * 7919) % 12288));
    const rel = join(`d${String(i % 40).padStart(2, "0")}`, `f${i}.bin`);
    writeFileSync(join(root, rel), data);
    m.set(rel, sha256(data));
  }
  for (let i = 0; i < BIG_FILES; i++) {
    const data = randomBytes(10 * MiB);
    const rel = `big${i}.bin`;
    writeFileSync(join(root, rel), data);
    m.set(rel, sha256(data));
  }
  return m;
}

function verifyFiles(root: string, m: Manifest): void {
  let checked = 0;
  for (const [rel, sum] of m) {
    assert.equal(sha256(readFileSync(join(root, rel))), sum, `${rel} differs`);
    checked++;
  }
  assert.equal(checked, SMALL_FILES + BIG_FILES);
}

async function fsck(target: string): Promise<void> {
  const r = await run("e2fsck", ["-fn", target], { allowFailure: true, timeoutMs: 120_000 });
  assert.equal(r.code, 0, `e2fsck -fn ${target} exited ${r.code}\n${r.stdout}\n${r.stderr}`);
}

const dir = scratchDir("blockfork-fs-");
const stack = new Stack(join(dir, "fuse"), join(dir, "mnt"));
let srv: ServerHandle | null = null;

after(async () => {
  try {
    await stack.detach();
  } finally {
    try {
      if (srv) await srv.stop();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }
});

void test(
  "ext4 on nbdfuse + loop: files survive remounts, a clean fsck and a server restart",
  { timeout: 600_000 },
  async () => {
    const volume = join(dir, "disk.img");
    srv = await startServer({ dir, volume, size: "256M" });

    // Make the filesystem and fill it.
    await stack.attach(srv.uri);
    await run("mkfs.ext4", ["-q", "-F", "-L", "blockfork", stack.loop], { timeoutMs: 120_000 });
    await stack.mount();
    const manifest = writeFiles(stack.mnt);
    await run("sync", ["-f", stack.mnt]);
    await stack.umount();

    // Mount again on a fresh nbdfuse and loop device: every read now comes through NBD.
    await stack.detach();
    await stack.attach(srv.uri);
    await stack.mount();
    verifyFiles(stack.mnt, manifest);
    await stack.umount();
    await fsck(stack.loop);
    await stack.detach();

    // Stop the server: clean exit, the volume file itself is a clean ext4 image.
    const stopped = await srv.stop();
    srv = null;
    assert.equal(stopped.code, 0, "the server did not exit cleanly");
    await fsck(volume);

    // Restart on the same volume file (no --size: it exists) and check everything again.
    srv = await startServer({ dir, volume, size: null });
    await stack.attach(srv.uri);
    await fsck(stack.loop);
    await stack.mount(true);
    verifyFiles(stack.mnt, manifest);
    const label = await run("e2label", [stack.loop]);
    assert.equal(label.stdout.trim(), "blockfork");
    await stack.umount();
    await stack.detach();
    const last = await srv.stop();
    srv = null;
    assert.equal(last.code, 0);
    assert.doesNotMatch(stack.fuseErr, /error/i, `nbdfuse reported errors: ${stack.fuseErr}`);
  },
);

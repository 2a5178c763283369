// A real filesystem on blockfork: nbdfuse exposes the export as a file, a loop device turns that
// file into a block device, and ext4 lives on it. Thousands of small files and a few large ones
// are written, the whole stack is torn down and rebuilt (so every read goes through NBD again),
// every checksum is verified, e2fsck finds nothing, and after a server restart on the same volume
// file the filesystem and its data are still there.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { run } from "../helpers/run.js";
import { FuseLoop } from "../helpers/fuse.js";

const MiB = 1024 * 1024;
const SIZE = 256 * MiB;
const SMALL_FILES = 2000;
const BIG_FILES = 3;

function sha256(b: Uint8Array): string {
  return createHash("sha256").update(b).digest("hex");
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
const stack = new FuseLoop(join(dir, "fuse"), join(dir, "mnt"));
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
    await stack.attach(srv.uri, SIZE);
    await run("mkfs.ext4", ["-q", "-F", "-L", "blockfork", stack.loop], { timeoutMs: 120_000 });
    await stack.mount();
    const manifest = writeFiles(stack.mnt);
    await run("sync", ["-f", stack.mnt]);
    await stack.umount();

    // Mount again on a fresh nbdfuse and loop device: every read now comes through NBD.
    await stack.detach();
    await stack.attach(srv.uri, SIZE);
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
    await stack.attach(srv.uri, SIZE);
    await fsck(stack.loop);
    await stack.mount("ro");
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

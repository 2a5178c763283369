// A filesystem and its snapshot: ext4 on the primary through nbdfuse + a loop device; files written
// (their sha256s recorded), synced and unmounted so that ext4 is consistent; past a window boundary
// `blockfork mark before`; then files changed, appended to, deleted and created. snap@before,
// exposed read-only through a second nbdfuse + loop device and mounted `-o ro,noload`, must hold
// the old files intact (checksums), the deleted ones present and none of the new ones, and
// `e2fsck -fn` on the snapshot's loop device must be clean, and its sha256 must be the volume's at the
// mark. The primary, mounted again, holds the
// new state (so the snapshot's answer is not the primary's).

import { after, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import {
  appendFileSync,
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { run } from "../helpers/run.js";
import { exportSha, FuseLoop, mark, MiB, pastBoundary, snapshots, snapUri } from "../helpers/pit.js";

const SIZE = 128 * MiB;

const sha256 = (b: Uint8Array): string => createHash("sha256").update(b).digest("hex");

type Manifest = Map<string, string>;

function readManifest(root: string, names: Iterable<string>): Manifest {
  const m: Manifest = new Map();
  for (const n of names) m.set(n, sha256(readFileSync(join(root, n))));
  return m;
}

async function fsck(dev: string): Promise<void> {
  const r = await run("e2fsck", ["-fn", dev], { allowFailure: true, timeoutMs: 120_000 });
  assert.equal(r.code, 0, `e2fsck -fn ${dev} exited ${r.code}\n${r.stdout}\n${r.stderr}`);
}

const cleanups: (() => Promise<void>)[] = [];
after(async () => {
  const errors: string[] = [];
  for (const c of cleanups.reverse()) {
    try {
      await c();
    } catch (e) {
      errors.push((e as Error).message);
    }
  }
  assert.deepEqual(errors, [], "cleanup failed");
});

void test(
  "ext4 on the primary; snap@before mounted read-only has the old files; e2fsck clean",
  { timeout: 180_000 },
  async () => {
    const dir = scratchDir("blockfork-pit-fs-");
    cleanups.push(() => Promise.resolve(rmSync(dir, { recursive: true, force: true })));
    const stateDir = join(dir, "state");
    const srv: ServerHandle = await startServer({
      dir,
      size: "128M",
      args: ["--pit", "--state-dir", stateDir],
    });
    cleanups.push(async () => {
      const r = await srv.stop();
      assert.deepEqual(r, { code: 0, signal: null }, `server exit:\n${srv.log()}`);
    });
    await pastBoundary(1000);

    const rw = new FuseLoop(join(dir, "fuse-rw"), join(dir, "mnt-rw"));
    cleanups.push(() => rw.detach());
    await rw.attach(srv.uri, SIZE);
    await run("mkfs.ext4", ["-q", "-F", "-b", "4096", rw.loop], { timeoutMs: 60_000 });
    await rw.mount();

    // Files before the mark: small ones in directories, a few large ones.
    const before: string[] = [];
    for (let i = 0; i < 300; i++) {
      const d = `d${i % 10}`;
      if (i < 10) mkdirSync(join(rw.mnt, d));
      const n = `${d}/f${i}.bin`;
      writeFileSync(join(rw.mnt, n), randomBytes(1 + ((i * 7919) % 20000)));
      before.push(n);
    }
    for (let i = 0; i < 3; i++) {
      writeFileSync(join(rw.mnt, `big${i}.bin`), randomBytes(8 * MiB));
      before.push(`big${i}.bin`);
    }
    const old = readManifest(rw.mnt, before);
    await run("sync", []);
    await rw.umount();

    await pastBoundary(1000);
    // The reference image of the whole volume at the mark.
    const refSha = await exportSha(srv.uri);
    const marked = await mark(stateDir, "before");
    const markIso = /at (\S+Z):/.exec(marked)![1];
    assert.deepEqual(
      (await snapshots(stateDir)).bookmarks.map((b) => b.name),
      ["before"],
    );

    // Change the filesystem: overwrite, append, delete, create.
    await rw.mount();
    const deleted = before.filter((_, i) => i % 5 === 0);
    const overwritten = before.filter((_, i) => i % 5 === 1);
    const appended = before.filter((_, i) => i % 5 === 2);
    for (const n of deleted) rmSync(join(rw.mnt, n));
    for (const n of overwritten) writeFileSync(join(rw.mnt, n), randomBytes(5000));
    for (const n of appended) appendFileSync(join(rw.mnt, n), randomBytes(3000));
    const created: string[] = [];
    for (let i = 0; i < 50; i++) {
      writeFileSync(join(rw.mnt, `new${i}.bin`), randomBytes(10000 + i));
      created.push(`new${i}.bin`);
    }
    rmSync(join(rw.mnt, "d9"), { recursive: true });
    const now = readManifest(
      rw.mnt,
      before.filter((n) => existsSync(join(rw.mnt, n))),
    );
    await run("sync", []);
    await rw.umount();
    await rw.detach();

    // The snapshot, read-only all the way: nbdfuse -r, losetup -r, mount -o ro,noload.
    const ro = new FuseLoop(join(dir, "fuse-ro"), join(dir, "mnt-ro"), true);
    cleanups.push(() => ro.detach());
    await ro.attach(snapUri(srv, "before"), SIZE);
    await ro.mount("ro,noload");
    const got = readManifest(ro.mnt, before);
    const differing = [...old].filter(([n, s]) => got.get(n) !== s).map(([n]) => n);
    assert.deepEqual(differing, [], "files of the snapshot differ from what was written before the mark");
    for (const n of created) assert.ok(!existsSync(join(ro.mnt, n)), `${n} was created after the mark`);
    assert.equal(readdirSync(join(ro.mnt, "d9")).length, 30, "d9 and its files must be in the snapshot");
    await ro.umount();
    await fsck(ro.loop);
    await ro.detach();

    // Byte for byte, the snapshot is the volume as it was at the mark, by name and by time.
    assert.equal(
      await exportSha(snapUri(srv, "before")),
      refSha,
      "snap@before differs from the volume at the mark",
    );
    assert.equal(
      await exportSha(snapUri(srv, markIso)),
      refSha,
      `snap@${markIso} differs from the volume at the mark`,
    );

    // The primary has the new state (so the snapshot did not just read the primary).
    const again = new FuseLoop(join(dir, "fuse-rw2"), join(dir, "mnt-rw2"));
    cleanups.push(() => again.detach());
    await again.attach(srv.uri, SIZE);
    await fsck(again.loop);
    await again.mount("ro");
    for (const n of deleted) assert.ok(!existsSync(join(again.mnt, n)), `${n} still on the primary`);
    for (const n of created) assert.ok(existsSync(join(again.mnt, n)), `${n} missing on the primary`);
    const primaryNow = readManifest(again.mnt, now.keys());
    assert.deepEqual(primaryNow, now);
    assert.ok(overwritten.some((n) => now.get(n) !== old.get(n)));
    await again.detach();
  },
);

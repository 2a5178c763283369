// Black-box: with a gateway, NBD TRIM leaves the primary and the secondary equal (src/forks/fork.ts).
// - A primary that can punch holes (the scratch directory's filesystem): the trimmed range reads
//   as zeroes in both files, and `verify` finds nothing.
// - A primary on ramfs, which can neither punch holes nor zero ranges (fallocate(2) fails with
//   EOPNOTSUPP): the primary keeps its data; the TRIM that already left for the gateway is undone by
//   a resync of those blocks; later trims change neither volume and mark nothing dirty. The files
//   are equal throughout, `verify` finds nothing, and the proxy's log says trims are ignored.
// Mounting ramfs needs root (mount(2)): run as another user, that case fails saying so (npm test
// runs as root), as gateway-nospace does; it is never skipped.

import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { closeSync, mkdtempSync, openSync, readSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { nbdsh, run } from "../helpers/run.js";
import { cli, sha256File, startPair, writeThroughNbd, type Pair } from "../helpers/replication.js";

const KiB = 1024;
const MiB = 1024 * KiB;

/** Bytes of a file at [offset, offset+length). */
function fileBytes(path: string, offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  const fd = openSync(path, "r");
  try {
    readSync(fd, b, 0, length, offset);
  } finally {
    closeSync(fd);
  }
  return b;
}

async function trimThroughNbd(pair: Pair, offset: number, length: number): Promise<void> {
  await nbdsh(
    pair.proxy!.uri,
    [
      "import nbd, os",
      "h = nbd.NBD()",
      'h.connect_uri(os.environ["URI"])',
      "assert h.can_trim()",
      `h.trim(${length}, ${offset})`,
      "h.flush()",
      "h.shutdown()",
    ].join("\n"),
  );
}

async function assertEqualFiles(pair: Pair, what: string): Promise<void> {
  const [a, b] = await Promise.all([sha256File(pair.primary), sha256File(pair.secondary)]);
  assert.equal(b, a, `${what}: the secondary file differs from the primary`);
}

async function verifyClean(pair: Pair, what: string): Promise<void> {
  const r = await cli(["verify", "--state-dir", pair.stateDir, "--json"]);
  assert.equal(r.code, 0, `${what}: verify exited ${r.code}: ${r.stdout}${r.stderr}`);
  assert.equal((JSON.parse(r.stdout) as { mismatchedBlocks: number }).mismatchedBlocks, 0, what);
}

void describe("replication: TRIM with a gateway", () => {
  const cleanups: (() => Promise<void>)[] = [];
  after(async () => {
    for (const c of cleanups.reverse()) await c();
  });

  /** A pair with 4 MiB of data at 4 MiB, then [5 MiB, 7 MiB) trimmed, synced after each. */
  async function trimmedPair(primaryDir?: string): Promise<{ pair: Pair; data: Buffer }> {
    const pair = await startPair({ size: "32M", ...(primaryDir ? { primaryDir } : {}) });
    cleanups.push(() => pair.stop());
    const data = randomBytes(4 * MiB);
    await writeThroughNbd(pair, 4 * MiB, data);
    await pair.waitSynced();
    await trimThroughNbd(pair, 5 * MiB, 2 * MiB);
    await pair.waitSynced();
    return { pair, data };
  }

  void test("a primary that punches holes: the range reads as zeroes in both files", async () => {
    const { pair, data } = await trimmedPair();
    assert.ok(fileBytes(pair.primary, 5 * MiB, 2 * MiB).equals(Buffer.alloc(2 * MiB)), "primary trimmed");
    assert.ok(fileBytes(pair.primary, 4 * MiB, MiB).equals(data.subarray(0, MiB)), "primary kept the rest");
    await assertEqualFiles(pair, "after a trim");
    await verifyClean(pair, "after a trim");
  });

  void test("a primary on ramfs (no hole punching, no zero range): trims change neither volume", async () => {
    if (process.getuid?.() !== 0) throw new Error("this test mounts a ramfs: run it as root (npm test does)");
    const mnt = mkdtempSync(join(tmpdir(), "blockfork-ramfs-"));
    await run("mount", ["-t", "ramfs", "ramfs", mnt]);
    cleanups.push(async () => {
      await run("umount", [mnt], { allowFailure: true });
      rmSync(mnt, { recursive: true, force: true });
    });
    // The first trim: the gateway got a TRIM, the primary could not do it; a resync put the
    // primary's data back on the secondary.
    const { pair, data } = await trimmedPair(mnt);
    assert.ok(fileBytes(pair.primary, 4 * MiB, 4 * MiB).equals(data), "the primary kept its data");
    await assertEqualFiles(pair, "after the first trim");
    assert.match(pair.proxyLog(), /trims are ignored from now on, on the primary and the secondary alike/);

    // Later trims: nothing is sent, nothing becomes dirty, both files keep the data.
    const seq = (await pair.status()).link!.seq;
    await trimThroughNbd(pair, 4 * MiB, 4 * MiB);
    const st = await pair.status();
    assert.equal(st.tracking!.dirtyBytes, 0, "an ignored trim marks nothing dirty");
    assert.equal(st.link!.seq, seq, "an ignored trim sends no update");
    assert.ok(fileBytes(pair.secondary, 4 * MiB, 4 * MiB).equals(data), "the secondary kept the data");
    await assertEqualFiles(pair, "after an ignored trim");
    await verifyClean(pair, "after trims on ramfs");
  });
});

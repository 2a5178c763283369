// Black-box tests of `blockfork serve` with nbdcopy: a random 128 MiB image copied in over four
// connections and back out to a pipe, a copy between two blockfork servers, and a sparse source
// whose holes must be holes on a destination that was full of data before.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { closeSync, ftruncateSync, openSync, readFileSync, rmSync, writeSync } from "node:fs";
import { join } from "node:path";
import { scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { run } from "../helpers/run.js";

const MiB = 1024 * 1024;

/** Stop a server and fail unless it exited cleanly (status 0): a crash during the tests shows up here. */
async function stopClean(srv: ServerHandle): Promise<void> {
  const r = await srv.stop();
  assert.deepEqual(r, { code: 0, signal: null }, `the server did not exit cleanly; its log:\n${srv.log()}`);
}
const SIZE = 128 * MiB;

function sha256(b: Buffer): string {
  return createHash("sha256").update(b).digest("hex");
}

/** sha256 of everything `nbdcopy --connections=4 URI -` writes to its stdout (a pipe). */
async function shaThroughPipe(uri: string): Promise<string> {
  const r = await run("bash", ["-c", 'set -o pipefail; nbdcopy --connections=4 "$SRC" - | sha256sum'], {
    env: { SRC: uri },
    timeoutMs: 60_000,
  });
  const m = /^([0-9a-f]{64})\s/.exec(r.stdout);
  assert.ok(m, `sha256sum printed ${r.stdout}`);
  return m[1];
}

/** `nbdinfo --map` as [offset, length, flags] triples. */
async function map(uri: string): Promise<[number, number, number][]> {
  const r = await run("nbdinfo", ["--map", uri], { timeoutMs: 30_000 });
  return r.stdout
    .trim()
    .split("\n")
    .map((line) => {
      const m = /^\s*(\d+)\s+(\d+)\s+(\d+)\s/.exec(line);
      assert.ok(m, `unexpected nbdinfo --map line: ${line}`);
      return [Number(m[1]), Number(m[2]), Number(m[3])] as [number, number, number];
    });
}

void describe("nbdcopy against blockfork", () => {
  let dir: string;
  let image: string;
  let imageSha: string;
  const servers: ServerHandle[] = [];

  before(() => {
    dir = scratchDir();
    image = join(dir, "random.img");
    const fd = openSync(image, "w");
    for (let off = 0; off < SIZE; off += 16 * MiB) writeSync(fd, randomBytes(16 * MiB), 0, 16 * MiB, off);
    closeSync(fd);
    imageSha = sha256(readFileSync(image));
  });
  after(async () => {
    const stopped = await Promise.allSettled(servers.map(stopClean));
    rmSync(dir, { recursive: true, force: true });
    for (const r of stopped) if (r.status === "rejected") throw r.reason;
  });

  let a: ServerHandle;

  void test("a random 128 MiB file copied in over 4 connections reads back identical", async () => {
    a = await startServer({ size: "128M" });
    servers.push(a);
    await run("nbdcopy", ["--connections=4", image, a.uri], { timeoutMs: 60_000 });
    assert.equal(sha256(readFileSync(a.volume)), imageSha, "the volume file differs from the source");
    assert.equal(await shaThroughPipe(a.uri), imageSha, "what nbdcopy read back differs from the source");
  });

  void test("a copy from one blockfork server to another is identical", async () => {
    const b = await startServer({ size: "128M" });
    servers.push(b);
    await run("nbdcopy", ["--connections=4", a.uri, b.uri], { timeoutMs: 60_000 });
    assert.equal(sha256(readFileSync(b.volume)), imageSha, "the second volume file differs");
    assert.equal(await shaThroughPipe(b.uri), imageSha);
  });

  void test("a sparse source keeps its holes on a destination that was full of data", async () => {
    const sparse = join(dir, "sparse.img");
    const extents: [number, number][] = [
      [0, MiB],
      [10 * MiB + 64 * 1024, 75 * 4096],
      [100 * MiB, MiB],
      [SIZE - 4096, 4096],
    ];
    let fd = openSync(sparse, "w");
    ftruncateSync(fd, SIZE);
    for (const [off, len] of extents) writeSync(fd, randomBytes(len), 0, len, off);
    closeSync(fd);
    const sparseSha = sha256(readFileSync(sparse));

    // The destination starts as 128 MiB of random data, fully allocated.
    const ddir = scratchDir();
    const dest = join(ddir, "full.img");
    fd = openSync(dest, "w");
    for (let off = 0; off < SIZE; off += 16 * MiB) writeSync(fd, randomBytes(16 * MiB), 0, 16 * MiB, off);
    closeSync(fd);
    const c = await startServer({ dir: ddir, volume: dest, size: null });
    servers.push(c);
    try {
      assert.deepEqual(await map(c.uri), [[0, SIZE, 0]]);
      await run("nbdcopy", ["--connections=4", sparse, c.uri], { timeoutMs: 60_000 });
      assert.equal(sha256(readFileSync(dest)), sparseSha, "the destination differs from the sparse source");
      assert.equal(await shaThroughPipe(c.uri), sparseSha);
      const want: [number, number, number][] = [];
      let pos = 0;
      for (const [off, len] of extents) {
        if (off > pos) want.push([pos, off - pos, 3]);
        want.push([off, len, 0]);
        pos = off + len;
      }
      if (pos < SIZE) want.push([pos, SIZE - pos, 3]);
      assert.deepEqual(await map(c.uri), want);
    } finally {
      try {
        await stopClean(c);
      } finally {
        rmSync(ddir, { recursive: true, force: true });
      }
    }
  });
});

// A block device as the secondary: a loop device over a 32 MiB file (root needed). The size comes
// from the device (no --size), the state directory must be given (none is made in /dev), batches
// and zeroes land on the device and in its backing file after a flush, and checksums match.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { closeSync, openSync, readSync, rmSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { KIND } from "../../src/gateway/records.js";
import { startGateway, type GatewayHandle, unboot } from "../helpers/gateway.js";
import { run } from "../helpers/run.js";
import { BIN, scratchDir } from "../helpers/server.js";

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;

function readRegion(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, "r");
  try {
    const b = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = readSync(fd, b, done, length - done, offset + done);
      assert.ok(n > 0, `short read of ${path}`);
      done += n;
    }
    return b;
  } finally {
    closeSync(fd);
  }
}

void describe("gateway on a loop device", () => {
  let dir: string;
  let backing: string;
  let dev = "";
  let gw: GatewayHandle | undefined;

  before(async () => {
    dir = scratchDir("blockfork-gw-blockdev-");
    backing = join(dir, "backing.img");
    writeFileSync(backing, "");
    truncateSync(backing, SIZE);
    dev = (await run("losetup", ["--find", "--show", backing])).stdout.trim();
    assert.match(dev, /^\/dev\/loop\d+$/);
  });

  after(async () => {
    await gw?.stop("SIGKILL");
    if (dev) await run("losetup", ["-d", dev], { allowFailure: true });
    rmSync(dir, { recursive: true, force: true });
  });

  void test("without --state-dir: exit 2 saying to give one", async () => {
    const r = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
      const p = spawn(process.execPath, [BIN, "gateway", "--volume", dev, "--listen", "127.0.0.1:0"], {
        stdio: ["ignore", "ignore", "pipe"],
      });
      let stderr = "";
      p.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
      p.on("close", (code) => resolve({ code, stderr }));
    });
    assert.equal(r.code, 2, r.stderr);
    assert.match(r.stderr, /block device: give --state-dir/);
  });

  void test("updates land on the device and its backing file; checksums match", async () => {
    gw = await startGateway({ dir, volume: dev, size: null, stateDir: join(dir, "state") });
    const c = gw.client;
    const health = await c.request("GET", "/health");
    const hj = health.json<{ secondaryId: string }>();
    assert.match(hj.secondaryId, /^[0-9a-f]{16}$/);
    assert.deepEqual(unboot(hj), {
      ok: true,
      volume: dev.slice(5),
      size: SIZE,
      features: ["consistency"],
      secondary: "unknown",
      secondaryId: hj.secondaryId,
      owner: null,
    });
    const name = dev.slice("/dev/".length);
    const id = { source: "b10c", generation: 1, size: SIZE };
    const a = randomBytes(MiB);
    const r = await c.updates(name, id, [
      { kind: KIND.WRITE, seq: 1, period: 0, offset: 4 * MiB, length: MiB, data: a },
      { kind: KIND.WRITE, seq: 2, period: 0, offset: 8 * MiB, length: MiB, data: a },
      { kind: KIND.ZERO, seq: 3, period: 0, offset: 8 * MiB + 4096, length: 8192, data: null },
      { kind: KIND.TRIM, seq: 4, period: 0, offset: 8 * MiB + 65536 + 100, length: 1000, data: null },
    ]);
    assert.equal(r.status, 200, r.body.toString());
    assert.deepEqual(unboot((await c.flush(name, id)).json()), { durableThrough: 4, secondary: "unknown" });
    const want = Buffer.from(a);
    want.fill(0, 4096, 4096 + 8192);
    want.fill(0, 65536 + 100, 65536 + 1100);
    assert.deepEqual(readRegion(dev, 4 * MiB, MiB), a);
    assert.deepEqual(readRegion(dev, 8 * MiB, MiB), want);
    assert.deepEqual(readRegion(backing, 8 * MiB, MiB), want, "after the flush the backing file has it");
    const sums = await c.checksums(name, 8 * MiB, MiB, 65536);
    const expect: string[] = [];
    for (let at = 0; at < MiB; at += 65536) {
      expect.push(
        createHash("sha256")
          .update(want.subarray(at, at + 65536))
          .digest("hex"),
      );
    }
    assert.deepEqual(sums.json<{ sums: string[] }>().sums, expect);
    assert.deepEqual(await gw.stop(), { code: 0, signal: null });
  });
});

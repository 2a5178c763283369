// A block device as the volume: a loop device over a 128 MiB file. The size comes from
// BLKGETSIZE64 (no --size), data written with nbdcopy is on the device, trim and zero make zeroes
// (aligned and not), BLOCK_STATUS reports everything as data (no SEEK_HOLE on block devices),
// and --size that disagrees with the device is a configuration error.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { closeSync, openSync, readSync, rmSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { BIN, scratchDir, startServer, type ServerHandle } from "../helpers/server.js";
import { nbdsh, run } from "../helpers/run.js";

const MiB = 1024 * 1024;
const SIZE = 128 * MiB;

function sha256(b: Uint8Array): string {
  return createHash("sha256").update(b).digest("hex");
}

/** Read [offset, offset+length) of a file or device directly. */
function readRegion(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, "r");
  try {
    const b = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = readSync(fd, b, done, length - done, offset + done);
      assert.ok(n > 0, `short read of ${path} at ${offset + done}`);
      done += n;
    }
    return b;
  } finally {
    closeSync(fd);
  }
}

function isZero(b: Buffer): boolean {
  return b.every((x) => x === 0);
}

void describe("a loop device as the volume", () => {
  let dir: string;
  let backing: string;
  let dev = "";
  let srv: ServerHandle | null = null;
  const data = randomBytes(SIZE);

  before(async () => {
    dir = scratchDir("blockfork-blockdev-");
    backing = join(dir, "backing.img");
    writeFileSync(backing, "");
    truncateSync(backing, SIZE);
    dev = (await run("losetup", ["--find", "--show", backing])).stdout.trim();
    assert.match(dev, /^\/dev\/loop\d+$/);
    assert.ok(statSync(dev).isBlockDevice());
    srv = await startServer({ volume: dev, size: null });
  });

  after(async () => {
    try {
      if (srv) await srv.stop();
    } finally {
      try {
        if (dev) await run("losetup", ["-d", dev]);
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }
  });

  void test("the size comes from the device and the banner says block device", async () => {
    const r = await run("nbdinfo", ["--json", srv!.uri]);
    const info = JSON.parse(r.stdout) as {
      exports: { "export-size": number; description: string; is_read_only: boolean; can_trim: boolean }[];
    };
    assert.equal(info.exports[0]["export-size"], SIZE);
    assert.equal(info.exports[0].description, `block device ${dev}`);
    assert.equal(info.exports[0].is_read_only, false);
    assert.equal(info.exports[0].can_trim, true);
    assert.match(srv!.stdout(), new RegExp(`serving block device ${dev} \\(128 MiB\\)`));
  });

  void test("nbdcopy writes random data that is on the device and reads back the same", async () => {
    const src = join(dir, "random.bin");
    writeFileSync(src, data);
    await run("nbdcopy", [src, srv!.uri], { timeoutMs: 120_000 });
    rmSync(src);
    const out = join(dir, "out.bin");
    await run("nbdcopy", [srv!.uri, out], { timeoutMs: 120_000 });
    assert.equal(sha256(readRegion(out, 0, SIZE)), sha256(data), "read back through NBD differs");
    rmSync(out);
    assert.equal(sha256(readRegion(dev, 0, SIZE)), sha256(data), "the loop device does not hold the data");
    // NBD FLUSH is fdatasync on the device: it writes the device's page cache back through the
    // loop driver into the backing file.
    await nbdsh(srv!.uri, 'import nbd, os\nh = nbd.NBD()\nh.connect_uri(os.environ["URI"])\nh.flush()\n');
    assert.equal(
      sha256(readRegion(backing, 0, SIZE)),
      sha256(data),
      "the backing file does not hold the data",
    );
  });

  void test("trim and write-zeroes read back as zeroes, aligned or not, neighbours intact", async () => {
    const code = `
import nbd, os
h = nbd.NBD()
h.connect_uri(os.environ["URI"])
M = 1024 * 1024
h.trim(4 * M, 8 * M)
assert h.pread(4 * M, 8 * M) == bytes(4 * M), "trimmed range does not read as zeroes"
h.zero(4 * M, 16 * M)
assert h.pread(4 * M, 16 * M) == bytes(4 * M), "zeroed range does not read as zeroes"
h.zero(3000, 24 * M + 1000)
assert h.pread(3000, 24 * M + 1000) == bytes(3000), "unaligned zero range does not read as zeroes"
h.zero(M, 32 * M, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(M, 32 * M) == bytes(M), "NO_HOLE zero range does not read as zeroes"
h.trim(M, 40 * M, nbd.CMD_FLAG_FUA)
h.flush()
print("ok")
`;
    const r = await nbdsh(srv!.uri, code, { timeoutMs: 60_000 });
    assert.equal(r.stdout.trim(), "ok");
    const zeroed: [number, number][] = [
      [8 * MiB, 4 * MiB],
      [16 * MiB, 4 * MiB],
      [24 * MiB + 1000, 3000],
      [32 * MiB, MiB],
      [40 * MiB, MiB],
    ];
    const onDev = readRegion(dev, 0, 48 * MiB);
    let at = 0;
    for (const [off, len] of zeroed) {
      assert.equal(isZero(onDev.subarray(off, off + len)), true, `device range ${off}+${len} is not zero`);
      assert.deepEqual(
        onDev.subarray(at, off),
        data.subarray(at, off),
        `device bytes ${at}..${off} were disturbed`,
      );
      at = off + len;
    }
    assert.deepEqual(
      onDev.subarray(at),
      data.subarray(at, 48 * MiB),
      `device bytes after ${at} were disturbed`,
    );
  });

  void test("BLOCK_STATUS reports the whole device as data", async () => {
    const code = `
import nbd, os, json
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(os.environ["URI"])
assert h.can_meta_context("base:allocation")
size = h.get_size()
flags = set()
covered = 0
def cb(ctx, offset, entries, err):
    global covered
    assert ctx == "base:allocation", ctx
    for i in range(0, len(entries), 2):
        covered += entries[i]
        flags.add(entries[i + 1])
    return 0
while covered < size:
    h.block_status(min(size - covered, 64 * 1024 * 1024), covered, cb)
print(json.dumps({"size": size, "covered": covered, "flags": sorted(flags)}))
`;
    const r = await nbdsh(srv!.uri, code, { timeoutMs: 60_000 });
    const out = JSON.parse(r.stdout) as { size: number; covered: number; flags: number[] };
    assert.equal(out.size, SIZE);
    assert.equal(out.covered, SIZE);
    assert.deepEqual(out.flags, [0], "a block device has no holes or known zeroes to report");
    const map = await run("nbdinfo", ["--map", srv!.uri]);
    const lines = map.stdout.trim().split("\n");
    assert.equal(lines.length, 1, `nbdinfo --map: ${map.stdout}`);
    assert.match(lines[0], new RegExp(`^\\s*0\\s+${SIZE}\\s+0\\s+data$`));
  });

  /** Run `serve` on the device with extra arguments; it must exit by itself. */
  function serveOnce(args: string[]): Promise<{ code: number | null; stderr: string; stdout: string }> {
    return new Promise((resolve, reject) => {
      const sock = join(dir, "other.sock");
      const p = spawn(
        process.execPath,
        [BIN, "serve", "--volume", dev, "--listen", "none", "--socket", sock, ...args],
        {
          stdio: ["ignore", "pipe", "pipe"],
        },
      );
      let stderr = "";
      let stdout = "";
      p.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
      p.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
      const t = setTimeout(() => {
        p.kill("SIGKILL");
        reject(new Error(`serve ${args.join(" ")} on ${dev} did not exit\n${stdout}\n${stderr}`));
      }, 15_000);
      p.on("close", (code) => {
        clearTimeout(t);
        resolve({ code, stderr, stdout });
      });
    });
  }

  void test("--size that disagrees with the device exits 2 and leaves the device alone", async () => {
    const before = sha256(readRegion(dev, 0, SIZE));
    for (const size of ["64M", "256M", String(SIZE + 512)]) {
      const r = await serveOnce(["--size", size]);
      assert.equal(r.code, 2, `--size ${size}: exit ${r.code}\n${r.stderr}`);
      assert.match(r.stderr, new RegExp(`${dev} is ${SIZE} bytes but --size asks for`));
    }
    assert.equal(sha256(readRegion(dev, 0, SIZE)), before);
  });

  void test("a read-only device (blockdev --setro) exits 2 naming --read-only, instead of serving writes that fail EPERM", async () => {
    await run("blockdev", ["--setro", dev]);
    try {
      const r = await serveOnce([]);
      assert.equal(r.code, 2, `exit ${r.code}\n${r.stderr}`);
      assert.match(r.stderr, new RegExp(`${dev} is a read-only block device: serve it with --read-only`));
    } finally {
      await run("blockdev", ["--setrw", dev]);
    }
  });
});

// The Volume implementations: the conformance suite over MemoryVolume and FileVolume (sparse temp
// files on the test machine's file system, with and without inline writes, and on tmpfs where
// fallocate ZERO_RANGE is missing), the read-only filter, and FileVolume/BlockFile specifics.

import { after, describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { constants, tmpdir } from "node:os";
import { join } from "node:path";
import { MemoryVolume } from "../../src/volume/memory.js";
import { FileVolume } from "../../src/volume/file.js";
import { readOnly } from "../../src/volume/readonly.js";
import { BlockFile } from "../../src/blockio/index.js";
import { binding } from "../../src/blockio/native.js";
import { DONE } from "../../src/util/done.js";
import type { Volume } from "../../src/volume/volume.js";
import { volumeSuite } from "./volume-suite.js";
import { probedTwice, watchProbes } from "../helpers/probes.js";

const MiB = 1024 * 1024;
const dirs: string[] = [];
function scratch(base = tmpdir()): string {
  const d = mkdtempSync(join(base, "bf-volume-"));
  dirs.push(d);
  return d;
}
after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

let fileCount = 0;
function fileFactory(dir: () => string, inlineWrites: boolean): (size: number) => Volume {
  let d: string | null = null;
  return (size) => {
    d ??= dir();
    return FileVolume.open(join(d, `v${fileCount++}.img`), { create: true, size, inlineWrites });
  };
}

function errorCode(e: unknown): unknown {
  return (e as { code?: unknown }).code;
}

volumeSuite("MemoryVolume", (size) => new MemoryVolume(size));
volumeSuite("FileVolume (inline writes)", fileFactory(scratch, true));
volumeSuite("FileVolume (no inline writes)", fileFactory(scratch, false));
if (existsSync("/dev/shm")) {
  volumeSuite(
    "FileVolume on tmpfs",
    fileFactory(() => scratch("/dev/shm"), true),
  );
}

void describe("MemoryVolume", () => {
  void test("refuses bad sizes", () => {
    for (const s of [0, -1, 1.5, 2 ** 53]) assert.throws(() => new MemoryVolume(s), RangeError, `${s}`);
  });

  void test("holes take no memory; trim gives it back", async () => {
    const v = new MemoryVolume(16 * MiB);
    assert.equal(v.allocatedBytes, 0);
    await v.write(Buffer.alloc(100, 1), 70000, false);
    assert.equal(v.allocatedBytes, 64 * 1024);
    await v.trim(65536, 65536, false);
    assert.equal(v.allocatedBytes, 0);
  });
});

void describe("readOnly filter", () => {
  const EPERM = constants.errno.EPERM;

  async function setup(): Promise<{ inner: MemoryVolume; ro: Volume }> {
    const inner = new MemoryVolume(MiB);
    await inner.write(Buffer.alloc(4096, 0x42), 8192, false);
    return { inner, ro: readOnly(inner) };
  }

  void test("reads, extents, cache and flush pass through", async () => {
    const { ro } = await setup();
    const b = Buffer.alloc(4096);
    await ro.read(b, 8192);
    assert.deepEqual(b, Buffer.alloc(4096, 0x42));
    const ext = await ro.extents(0, MiB);
    assert.equal(
      ext.reduce((s, e) => s + e.length, 0),
      MiB,
    );
    assert.equal(ext[0].flags, 0, "the written chunk is data");
    await ro.cache(0, MiB);
    await ro.flush();
    assert.equal(ro.size, MiB);
  });

  void test("write, trim and zero reject with ERR_READ_ONLY / EPERM and change nothing", async () => {
    const { inner, ro } = await setup();
    const attempts: [string, () => Promise<void>][] = [
      ["write", () => ro.write(Buffer.alloc(4096, 9), 8192, false)],
      ["write fua", () => ro.write(Buffer.alloc(1), 0, true)],
      ["trim", () => ro.trim(8192, 4096, false)],
      ["zero", () => ro.zero(8192, 4096, { mayTrim: true })],
      ["zero fast", () => ro.zero(8192, 4096, { fast: true })],
    ];
    for (const [what, fn] of attempts) {
      await assert.rejects(fn(), (e: unknown) => {
        assert.equal(errorCode(e), "ERR_READ_ONLY", what);
        assert.equal((e as { errno?: unknown }).errno, EPERM, what);
        return true;
      });
    }
    const b = Buffer.alloc(4096);
    await inner.read(b, 8192);
    assert.deepEqual(b, Buffer.alloc(4096, 0x42));
  });

  void test("capabilities say read-only and drop write-type features", async () => {
    const { inner, ro } = await setup();
    const c = ro.caps();
    assert.equal(c.readOnly, true);
    assert.equal(c.trim, false);
    assert.equal(c.zero, false);
    assert.equal(c.fastZero, false);
    assert.equal(c.fua, false);
    assert.equal(c.extents, inner.caps().extents);
    assert.equal(inner.caps().readOnly, false, "the wrapped volume is not changed");
  });
});

void describe("FileVolume and BlockFile", () => {
  void test("the addon refuses offsets, lengths and descriptors that are not whole numbers in range", async () => {
    // An \`as i64\` made NaN offset 0, and -1 is "the file position" to preadv2/pwritev2: a FUA
    // write at -1 landed at the start of the file instead of failing.
    const p = join(scratch(), "args.img");
    writeFileSync(p, Buffer.alloc(64 * 1024, 0x11));
    const f = BlockFile.open(p);
    try {
      const buf = Buffer.alloc(4096, 0x5a);
      for (const bad of [-1, Number.NaN, 0.5, Infinity, 2 ** 60]) {
        assert.throws(() => binding.readNowait(f.fd, buf, bad), /bad arguments/, `readNowait at ${bad}`);
        assert.throws(() => binding.writeInline(f.fd, buf, bad), /bad arguments/, `writeInline at ${bad}`);
        await assert.rejects(
          f.write(buf, bad, true),
          { errno: constants.errno.EINVAL },
          `FUA write at ${bad}`,
        );
        await assert.rejects(f.read(Buffer.alloc(8192 * 1024), bad), { errno: constants.errno.EINVAL });
      }
      assert.throws(() => binding.readNowait(-3, buf, 0), /bad arguments/);
      assert.throws(() => binding.cachedBytes(f.fd, -1, 4096), /bad arguments/);
      assert.ok(
        readFileSync(p).every((x) => x === 0x11),
        "nothing was written anywhere",
      );
    } finally {
      f.close();
    }
  });

  void test("appends past holesFrom are written inline without probing the hole", async () => {
    // The journal's segments: sparse, written only up to where they were appended. A probe of
    // each append's partial last page (a one-byte RWF_NOWAIT read) made the kernel bring that
    // hole into the page cache by zero-filling it (7% of the proxy's CPU under journaled writes),
    // only for the next append to overwrite it.
    const p = join(scratch(), "seg.img");
    const f = BlockFile.open(p, { create: true, size: 64 * MiB, inlineWrites: true });
    const { probes, stop } = watchProbes(f.fd);
    try {
      let end = 0;
      for (let i = 0; i < 40; i++) {
        f.holesFrom = end;
        const n = 65_536 + 400 + i;
        assert.equal(f.write(Buffer.alloc(n, i + 1), end), DONE, `append ${i} written inline`);
        end += n;
      }
      // Only head pages are probed, each holding the end of the append before it (cached). A
      // tail probe would show as the same page probed twice in a row (tail, then next head).
      assert.ok(probes.length > 0 && probes.length < 40, `${probes.length} probes`);
      assert.deepEqual(probedTwice(probes), [], "no page probed as a tail");
      const back = Buffer.alloc(end);
      await f.read(back, 0);
      let at = 0;
      for (let i = 0; i < 40; i++) {
        const n = 65_536 + 400 + i;
        assert.ok(
          back.subarray(at, at + n).every((b) => b === i + 1),
          `append ${i} reads back`,
        );
        at += n;
      }
    } finally {
      stop();
      f.close();
    }
  });

  void test("create makes a sparse file of the given size", async () => {
    const p = join(scratch(), "new.img");
    const v = FileVolume.open(p, { create: true, size: 256 * MiB });
    try {
      const st = statSync(p);
      assert.equal(st.size, 256 * MiB);
      assert.ok(st.blocks * 512 < MiB, `allocated ${st.blocks * 512} bytes`);
      assert.equal(v.size, 256 * MiB);
      assert.equal(v.caps().readOnly, false);
      const ext = await v.extents(0, v.size);
      assert.deepEqual(ext, [{ length: 256 * MiB, flags: 3 }]);
    } finally {
      await v.close();
    }
  });

  void test("an existing file opens at its own size, with or without a matching size", async () => {
    const p = join(scratch(), "old.img");
    writeFileSync(p, Buffer.alloc(3 * 4096, 7));
    for (const opts of [{}, { size: 3 * 4096 }, { create: true, size: 3 * 4096 }]) {
      const v = FileVolume.open(p, opts);
      assert.equal(v.size, 3 * 4096);
      const b = Buffer.alloc(4096);
      await v.read(b, 4096);
      assert.deepEqual(b, Buffer.alloc(4096, 7));
      await v.close();
    }
  });

  void test("a size mismatch with an existing file is ERR_USAGE and leaves the file untouched", () => {
    const p = join(scratch(), "mismatch.img");
    const content = Buffer.alloc(8192, 0x31);
    writeFileSync(p, content);
    const before = statSync(p);
    for (const size of [4096, 16384, 8193]) {
      assert.throws(
        () => FileVolume.open(p, { create: true, size }),
        (e: unknown) => errorCode(e) === "ERR_USAGE" && (e as Error).message.includes("8192"),
      );
    }
    const st = statSync(p);
    assert.equal(st.size, before.size);
    assert.equal(st.mtimeMs, before.mtimeMs);
    assert.deepEqual(readFileSync(p), content);
  });

  void test("a missing file without a size is ERR_USAGE and is not created", () => {
    const d = scratch();
    for (const opts of [{}, { create: true }, { size: 4096 }, { create: true, size: 4096, readOnly: true }]) {
      const p = join(d, `missing-${JSON.stringify(opts).replace(/\W/g, "")}.img`);
      assert.throws(
        () => FileVolume.open(p, opts),
        (e: unknown) => errorCode(e) === "ERR_USAGE",
        JSON.stringify(opts),
      );
      assert.equal(existsSync(p), false, JSON.stringify(opts));
    }
  });

  void test("an empty file and a non-positive size are ERR_USAGE", () => {
    const d = scratch();
    const empty = join(d, "empty.img");
    writeFileSync(empty, "");
    assert.throws(
      () => FileVolume.open(empty),
      (e: unknown) => errorCode(e) === "ERR_USAGE",
    );
    for (const size of [0, -4096, 1.5]) {
      const p = join(d, `bad${String(size).replace(/\W/g, "_")}.img`);
      assert.throws(
        () => FileVolume.open(p, { create: true, size }),
        (e: unknown) => errorCode(e) === "ERR_USAGE",
      );
      assert.equal(existsSync(p), false);
    }
  });

  void test("read-only open refuses writes at the OS level and advertises read-only", async () => {
    const p = join(scratch(), "ro.img");
    writeFileSync(p, Buffer.alloc(8192, 3));
    const v = FileVolume.open(p, { readOnly: true });
    try {
      const c = v.caps();
      assert.equal(c.readOnly, true);
      assert.equal(c.trim, false);
      assert.equal(c.zero, false);
      await assert.rejects(v.write(Buffer.alloc(512), 0, true), (e: unknown) => errorCode(e) === "EBADF");
      assert.deepEqual(readFileSync(p), Buffer.alloc(8192, 3));
    } finally {
      await v.close();
    }
  });

  void test("group commit: concurrent flushes all resolve and share fdatasyncs", async () => {
    const v = FileVolume.open(join(scratch(), "flush.img"), { create: true, size: 16 * MiB });
    try {
      const events: string[] = [];
      const orig = v.file.sync.bind(v.file);
      let n = 0;
      v.file.sync = (full?: boolean): Promise<void> => {
        const id = ++n;
        events.push(`start ${id}`);
        return orig(full).then(() => {
          events.push(`end ${id}`);
        });
      };
      await v.write(Buffer.alloc(4096, 1), 0, false);
      const first = v.flush();
      // Written after the first fdatasync started: only a later one covers it.
      await v.write(Buffer.alloc(4096, 2), 4096, false);
      const rest = Array.from({ length: 200 }, () => v.flush());
      const second = rest[0].then(() => events.push("second resolved"));
      await Promise.all([first, ...rest, second]);
      assert.equal(n, 2, "201 flushes took 2 fdatasyncs");
      assert.deepEqual(events, ["start 1", "end 1", "start 2", "end 2", "second resolved"]);
      await v.flush();
      assert.equal(n, 3, "a flush after the others settled starts a new fdatasync");
    } finally {
      await v.close();
    }
  });

  void test("trim and zero with mayTrim punch holes in the file", async () => {
    const p = join(scratch(), "punch.img");
    const v = FileVolume.open(p, { create: true, size: 8 * MiB });
    try {
      await v.write(Buffer.alloc(4 * MiB, 0x77), 0, false);
      await v.flush();
      const full = statSync(p).blocks;
      await v.trim(0, MiB, false);
      await v.zero(2 * MiB, MiB, { mayTrim: true });
      await v.flush();
      const after = statSync(p).blocks;
      assert.ok(full - after >= ((2 * MiB) / 512) * 0.9, `blocks ${full} -> ${after}`);
      const ext = await v.extents(0, 4 * MiB);
      let pos = 0;
      for (const e of ext) {
        const holeExpected = pos < MiB || (pos >= 2 * MiB && pos < 3 * MiB);
        assert.equal(e.flags === 3, holeExpected, `extent at ${pos}: flags ${e.flags}`);
        pos += e.length;
      }
      const b = Buffer.alloc(4 * MiB);
      await v.read(b, 0);
      const expected = Buffer.alloc(4 * MiB, 0x77);
      expected.fill(0, 0, MiB);
      expected.fill(0, 2 * MiB, 3 * MiB);
      assert.ok(b.equals(expected));
    } finally {
      await v.close();
    }
  });

  void test("fast zero on a file system with ZERO_RANGE: succeeds, reads zeroes", async () => {
    const v = FileVolume.open(join(scratch(), "fast.img"), { create: true, size: 4 * MiB });
    try {
      assert.equal(v.caps().fastZero, true);
      await v.write(Buffer.alloc(MiB, 0x11), 0, false);
      await v.zero(4096, 65536, { fast: true, mayTrim: false });
      await v.zero(200000, 1000, { fast: true, mayTrim: true });
      const b = Buffer.alloc(MiB);
      await v.read(b, 0);
      const expected = Buffer.alloc(MiB, 0x11);
      expected.fill(0, 4096, 4096 + 65536);
      expected.fill(0, 200000, 201000);
      assert.ok(b.equals(expected));
    } finally {
      await v.close();
    }
  });

  void test("fast zero where only hole punching exists (tmpfs): NO_HOLE fails fast, the slow way works", async (t) => {
    if (!existsSync("/dev/shm")) {
      t.diagnostic("no /dev/shm on this machine");
      return;
    }
    const v = FileVolume.open(join(scratch("/dev/shm"), "fast.img"), { create: true, size: 4 * MiB });
    try {
      await v.write(Buffer.alloc(MiB, 0x22), 0, false);
      await assert.rejects(
        v.zero(0, 65536, { fast: true, mayTrim: false }),
        (e: unknown) => errorCode(e) === "ERR_NOT_SUPPORTED",
      );
      const b = Buffer.alloc(65536);
      await v.read(b, 0);
      assert.deepEqual(b, Buffer.alloc(65536, 0x22), "a refused fast zero changes nothing");
      // Allowed to punch: fast.
      await v.zero(0, 65536, { fast: true, mayTrim: true });
      await v.read(b, 0);
      assert.ok(b.equals(Buffer.alloc(65536)));
      // Not fast, no hole: written zeroes.
      await v.zero(65536, 65536, { fast: false, mayTrim: false, fua: true });
      await v.read(b, 65536);
      assert.ok(b.equals(Buffer.alloc(65536)));
    } finally {
      await v.close();
    }
  });

  void test("a fully allocated file answers extents without seeking; holes punched later are reported", async () => {
    for (const dir of [scratch(), scratch("/dev/shm")]) {
      const p = join(dir, "dense.img");
      writeFileSync(p, Buffer.alloc(4 * MiB, 7)); // every block allocated: no holes
      const f = BlockFile.open(p, { lock: true });
      try {
        assert.deepEqual(f.extents(0, 4 * MiB), [{ length: 4 * MiB, flags: 0 }]);
        await f.fallocate(3 /* PUNCH_HOLE | KEEP_SIZE */, MiB, MiB);
        const e = f.extents(0, 4 * MiB);
        assert.deepEqual(e, [
          { length: MiB, flags: 0 },
          { length: MiB, flags: 3 },
          { length: 2 * MiB, flags: 0 },
        ]);
      } finally {
        f.close();
      }
    }
  });

  void test("BlockFile reports the path, size and kind", () => {
    const p = join(scratch(), "bf.img");
    const f = BlockFile.open(p, { create: true, size: MiB });
    try {
      assert.equal(f.path, p);
      assert.equal(f.size, MiB);
      assert.equal(f.isBlockDevice, false);
      assert.equal(f.readOnly, false);
    } finally {
      f.close();
      f.close(); // idempotent
    }
  });
});

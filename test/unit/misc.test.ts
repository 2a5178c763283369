// Small pieces: sizes, --listen parsing, block size rules, the export registry, the errno -> NBD
// error mapping, error classes, the buffer pool, the reply OutputQueue, the addon's sends of lent
// reads (mapped or read) and its thread sleep counter.

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { Duplex } from "node:stream";
import { constants, tmpdir } from "node:os";
import {
  closeSync,
  ftruncateSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  rmSync,
  readFileSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { TrackingMirror } from "../../src/gateway/mirror.js";
import { createServer as createHttpServer } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import { request as undiciRequest } from "undici";
import { transportHint } from "../../src/forks/link.js";
import { makeTestCerts } from "../helpers/certs.js";
import { HttpError } from "../../src/gateway/http.js";
import { MIRROR_DIR } from "../../src/gateway/state.js";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { connect, createServer, type Socket } from "node:net";
import { BlockFile, sendPieces, setSendBuffer } from "../../src/blockio/index.js";
import { plainSocketFd } from "../../src/util/onread.js";
import { formatSize, parseSize } from "../../src/util/size.js";
import { parseListen } from "../../src/nbd/server.js";
import {
  checkBlockSizes,
  DEFAULT_BLOCK_SIZES,
  ExportRegistry,
  isInfo,
  isOpen,
  type ExportProvider,
  type OpenExport,
} from "../../src/nbd/exports.js";
import { nbdErrorForErrno, nbdErrorOf } from "../../src/nbd/errors.js";
import {
  BlockforkError,
  errnoName,
  errnoOf,
  IoError,
  NotSupportedError,
  OutOfRangeError,
  ReadOnlyError,
  ShutdownError,
  UsageError,
} from "../../src/errors.js";
import { acquire, release } from "../../src/util/buffer-pool.js";
import { OutputQueue } from "../../src/nbd/output.js";
import { MemoryVolume } from "../../src/volume/memory.js";
import type { Volume } from "../../src/volume/volume.js";
import type { PieceLease } from "../../src/volume/volume.js";
import { binding } from "../../src/blockio/native.js";
import { BlockBits } from "../../src/util/block-bits.js";

const E = constants.errno;
const KiB = 1024;
const MiB = 1024 * 1024;

function code(e: unknown): unknown {
  return (e as { code?: unknown }).code;
}

void describe("parseSize / formatSize", () => {
  void test("plain bytes and binary suffixes", () => {
    const cases: [string, number][] = [
      ["4096", 4096],
      ["1", 1],
      ["1K", 1024],
      ["1k", 1024],
      ["2KB", 2048],
      ["2KiB", 2048],
      ["512M", 512 * MiB],
      ["1G", 2 ** 30],
      ["1.5GiB", 1.5 * 2 ** 30],
      ["1.5K", 1536],
      ["3T", 3 * 2 ** 40],
      ["1P", 2 ** 50],
      [" 8 M ", 8 * MiB],
      ["64m", 64 * MiB],
    ];
    for (const [text, bytes] of cases) assert.equal(parseSize(text), bytes, text);
  });

  void test("bad sizes are ERR_USAGE", () => {
    for (const text of [
      "",
      "abc",
      "0",
      "0K",
      "-1",
      "1.5",
      "1.0001K",
      "1e3",
      "1X",
      "8192P",
      "K",
      "1 G B",
      "0x10",
    ]) {
      assert.throws(
        () => parseSize(text, "--size"),
        (e: unknown) => e instanceof UsageError && code(e) === "ERR_USAGE",
        text,
      );
    }
  });

  void test("formatSize uses the largest exact binary unit", () => {
    const cases: [number, string][] = [
      [0, "0 bytes"],
      [512, "512 bytes"],
      [1024, "1 KiB"],
      [1536, "1.5 KiB"],
      [64 * MiB, "64 MiB"],
      [2 ** 30, "1 GiB"],
      [3 * 2 ** 40, "3 TiB"],
      [2 ** 50, "1 PiB"],
      [2 ** 60, "1024 PiB"],
    ];
    for (const [n, text] of cases) assert.equal(formatSize(n), text, `${n}`);
  });

  void test("formatSize and parseSize round trip for exact units", () => {
    for (const n of [1, 4096, 64 * MiB, 2 ** 30, 5 * 2 ** 40]) {
      const text = formatSize(n).replace(" bytes", "").replace(" ", "");
      assert.equal(parseSize(text), n, text);
    }
  });
});

void describe("parseListen", () => {
  void test("HOST:PORT forms", () => {
    assert.deepEqual(parseListen("127.0.0.1:10809"), { host: "127.0.0.1", port: 10809 });
    assert.deepEqual(parseListen("0.0.0.0:0"), { host: "0.0.0.0", port: 0 });
    assert.deepEqual(parseListen("localhost:65535"), { host: "localhost", port: 65535 });
    assert.deepEqual(parseListen("[::1]:10809"), { host: "::1", port: 10809 });
    assert.deepEqual(parseListen("[fe80::1%eth0]:1"), { host: "fe80::1%eth0", port: 1 });
    assert.deepEqual(parseListen(":10809"), { host: "127.0.0.1", port: 10809 });
  });

  void test("anything else is ERR_USAGE", () => {
    for (const t of [
      "10809",
      "host",
      "host:",
      "host:65536",
      "host:-1",
      "::1:10809",
      "[::1]",
      "host:12ab",
      "a:b:1",
      "",
    ]) {
      assert.throws(
        () => parseListen(t),
        (e: unknown) => code(e) === "ERR_USAGE",
        t,
      );
    }
  });
});

void describe("checkBlockSizes", () => {
  const ok = (min: number, pref: number, max: number, size = 64 * MiB): void =>
    checkBlockSizes({ minimum: min, preferred: pref, maximum: max }, size);
  const bad = (min: number, pref: number, max: number, size = 64 * MiB): void => {
    assert.throws(
      () => ok(min, pref, max, size),
      (e: unknown) => code(e) === "ERR_USAGE",
      `${min},${pref},${max} size ${size}`,
    );
  };

  void test("valid combinations", () => {
    checkBlockSizes(DEFAULT_BLOCK_SIZES, 64 * MiB);
    ok(512, 4096, MiB);
    ok(1, 512, 512);
    ok(65536, 65536, 65536);
    ok(4096, 4096, 32 * MiB);
    // A tiny export: the maximum need only reach the export size.
    ok(1, 4096, 1024, 1024);
    ok(1, 4096, 64 * MiB);
  });

  void test("the maximum is at most 64 MiB (a request's data is held in memory; 4 GiB - 8 is not even describable)", () => {
    bad(1, 4096, 64 * MiB + 1);
    bad(1, 4096, 0xffffffff);
  });

  void test("minimum must be a power of two up to 64 KiB", () => {
    bad(0, 4096, MiB);
    bad(3, 4096, MiB);
    bad(1.5, 4096, MiB);
    bad(131072, 131072, MiB);
  });

  void test("preferred must be a power of two, at least max(minimum, 512)", () => {
    bad(1, 256, MiB);
    bad(1, 3000, MiB);
    bad(8192, 4096, MiB);
    bad(1, 0, MiB);
  });

  void test("maximum: a multiple of the minimum, at least min(preferred, size), 32 bits", () => {
    bad(512, 4096, 1000);
    bad(512, 4096, 2048);
    bad(1, 4096, 2 ** 32);
    bad(1, 4096, 4096.5);
  });

  void test("the export size must be a multiple of the minimum", () => {
    bad(512, 4096, MiB, 64 * MiB + 100);
    ok(512, 4096, MiB, 64 * MiB + 512);
  });
});

void describe("ExportRegistry", () => {
  const vol = (n: number): MemoryVolume => new MemoryVolume(n * 4096);
  const bs = DEFAULT_BLOCK_SIZES;

  void test('the first static export is the default export ""', async () => {
    const r = new ExportRegistry();
    const a = vol(1);
    r.addStatic({ name: "a", description: "first", volume: a, blockSizes: bs });
    r.addStatic({ name: "b", description: "second", volume: vol(2), blockSizes: bs });
    const d = await r.open("");
    assert.ok(isOpen(d));
    assert.equal(d.name, "a", "canonical name, not the empty alias");
    assert.equal(d.volume, a);
    assert.equal(d.description, "first");
    d.release();
    const b = await r.open("b");
    assert.ok(isOpen(b));
    assert.equal(b.volume.size, 2 * 4096);
    assert.deepEqual(r.list(), [
      { name: "a", description: "first" },
      { name: "b", description: "second" },
    ]);
  });

  void test("isDefault picks another default", async () => {
    const r = new ExportRegistry();
    r.addStatic({ name: "a", description: "", volume: vol(1), blockSizes: bs });
    r.addStatic({ name: "b", description: "", volume: vol(2), blockSizes: bs }, true);
    const d = await r.open("");
    assert.ok(isOpen(d));
    assert.equal(d.name, "b");
  });

  void test("an unknown name is refused with a message naming it and the exports there are", async () => {
    const r = new ExportRegistry();
    r.addStatic({ name: "disk", description: "", volume: vol(1), blockSizes: bs });
    const x = await r.open("nope");
    assert.ok(!isOpen(x));
    assert.ok(x.message.includes('"nope"'));
    assert.ok(x.message.includes('"disk"'));
    const empty = await new ExportRegistry().open("");
    assert.ok(!isOpen(empty));
    assert.ok(empty.message.length > 0);
  });

  void test("names are exact: case and whitespace matter", async () => {
    const r = new ExportRegistry();
    r.addStatic({ name: "disk", description: "", volume: vol(1), blockSizes: bs });
    for (const n of ["Disk", "disk ", " disk", "disk\0"])
      assert.ok(!isOpen(await r.open(n)), JSON.stringify(n));
  });

  void test("duplicate names and names over 4096 bytes are ERR_USAGE", () => {
    const r = new ExportRegistry();
    r.addStatic({ name: "a", description: "", volume: vol(1), blockSizes: bs });
    assert.throws(
      () => r.addStatic({ name: "a", description: "", volume: vol(1), blockSizes: bs }),
      (e: unknown) => code(e) === "ERR_USAGE",
    );
    assert.throws(
      () => r.addStatic({ name: "é".repeat(2049), description: "", volume: vol(1), blockSizes: bs }),
      (e: unknown) => code(e) === "ERR_USAGE",
    );
    r.addStatic({ name: "x".repeat(4096), description: "", volume: vol(1), blockSizes: bs });
  });

  void test("providers answer for the names they own, and list after the statics", async () => {
    const r = new ExportRegistry();
    r.addStatic({ name: "disk", description: "primary", volume: vol(1), blockSizes: bs });
    const opened: string[] = [];
    const released: string[] = [];
    const provider: ExportProvider = {
      owns: (n) => n.startsWith("snap@"),
      open(n): Promise<OpenExport | { message: string }> {
        if (n === "snap@bad") return Promise.resolve({ message: "no such snapshot" });
        opened.push(n);
        return Promise.resolve({
          name: n,
          description: "snapshot",
          volume: vol(3),
          blockSizes: bs,
          release: () => released.push(n),
        });
      },
      list: () => [{ name: "snap@1", description: "snapshot" }],
    };
    r.addProvider(provider);
    assert.deepEqual(
      r.list().map((e) => e.name),
      ["disk", "snap@1"],
    );
    const s = await r.open("snap@2024-01-01T00:00:00Z");
    assert.ok(isOpen(s));
    assert.equal(s.volume.size, 3 * 4096);
    s.release();
    assert.deepEqual(released, ["snap@2024-01-01T00:00:00Z"]);
    const bad = await r.open("snap@bad");
    assert.ok(!isOpen(bad));
    assert.equal(bad.message, "no such snapshot");
    // Names no provider owns fall through to the usual refusal; the default is still the static.
    assert.ok(!isOpen(await r.open("other")));
    const d = await r.open("");
    assert.ok(isOpen(d));
    assert.equal(d.name, "disk");
    assert.deepEqual(opened, ["snap@2024-01-01T00:00:00Z"]);
  });

  void test("info: a static export without opening a session; a provider's info when it has one, else open and release", async () => {
    const r = new ExportRegistry();
    const disk: MemoryVolume & Pick<Volume, "openSession"> = vol(1);
    let sessions = 0;
    disk.openSession = () => {
      sessions++;
      return { volume: disk, close: () => {} };
    };
    r.addStatic({ name: "disk", description: "primary", volume: disk, blockSizes: bs });
    const d = await r.info("");
    assert.ok(isInfo(d));
    assert.deepEqual(
      { name: d.name, description: d.description, size: d.size, caps: d.caps },
      { name: "disk", description: "primary", size: 4096, caps: disk.caps() },
    );
    assert.equal(sessions, 0, "INFO opened a session of the primary");
    const calls: string[] = [];
    const plain: ExportProvider = {
      owns: (n) => n.startsWith("plain@"),
      open: (n) => {
        calls.push(`open ${n}`);
        return Promise.resolve({
          name: n,
          description: "plain",
          volume: vol(2),
          blockSizes: bs,
          release: () => calls.push(`release ${n}`),
        });
      },
      list: () => [],
    };
    const cheap: ExportProvider = {
      owns: (n) => n.startsWith("cheap@"),
      open: (n) => {
        calls.push(`open ${n}`);
        return Promise.resolve({ message: "never" });
      },
      info: (n) => {
        calls.push(`info ${n}`);
        return Promise.resolve(n === "cheap@bad" ? { message: "no such point" } : { ...d, name: n });
      },
      list: () => [],
    };
    r.addProvider(plain);
    r.addProvider(cheap);
    const p = await r.info("plain@1");
    assert.ok(isInfo(p));
    assert.equal(p.size, 2 * 4096);
    const c = await r.info("cheap@1");
    assert.ok(isInfo(c));
    assert.equal(c.name, "cheap@1");
    const bad = await r.info("cheap@bad");
    assert.ok(!isInfo(bad));
    assert.equal(bad.message, "no such point");
    assert.deepEqual(calls, ["open plain@1", "release plain@1", "info cheap@1", "info cheap@bad"]);
    const none = await r.info("other");
    assert.ok(!isInfo(none));
    assert.equal(none.message, ((await r.open("other")) as { message: string }).message);
  });
});

void describe("errno -> NBD error mapping", () => {
  void test("system errnos", () => {
    const cases: [number, number][] = [
      [E.EPERM, 1],
      [E.EACCES, 1],
      [E.EROFS, 1],
      [E.EIO, 5],
      [E.ENOMEM, 12],
      [E.EINVAL, 22],
      [E.ENOSPC, 28],
      [E.EDQUOT, 28],
      [E.EFBIG, 28],
      [E.EOVERFLOW, 75],
      [E.EOPNOTSUPP, 95],
      [E.ENOSYS, 95],
      [108, 108], // ESHUTDOWN
      [E.EBADF, 5],
      [E.ENOENT, 5],
      [E.EAGAIN, 5],
      [0, 5],
      [99999, 5],
    ];
    for (const [errno, nbd] of cases) assert.equal(nbdErrorForErrno(errno), nbd, errnoName(errno));
  });

  void test("thrown errors of every kind", () => {
    assert.equal(nbdErrorOf(new IoError(E.ENOSPC, "pwrite")), 28);
    assert.equal(nbdErrorOf(new IoError(E.EDQUOT, "pwrite")), 28);
    assert.equal(nbdErrorOf(new ReadOnlyError()), 1);
    assert.equal(nbdErrorOf(new NotSupportedError("x")), 95);
    assert.equal(nbdErrorOf(new ShutdownError()), 108);
    assert.equal(nbdErrorOf(new UsageError("x")), 22);
    assert.equal(nbdErrorOf(new OutOfRangeError("x")), 22);
    assert.equal(nbdErrorOf(new OutOfRangeError("x", E.ENOSPC)), 28);
    // Node system errors carry a negative errno (libuv).
    assert.equal(nbdErrorOf(Object.assign(new Error("x"), { errno: -E.EROFS, code: "EROFS" })), 1);
    assert.equal(nbdErrorOf(Object.assign(new Error("x"), { errno: E.EFBIG })), 28);
    assert.equal(nbdErrorOf(new Error("plain")), 5);
    assert.equal(nbdErrorOf("a string"), 5);
    assert.equal(nbdErrorOf(null), 5);
    assert.equal(nbdErrorOf(undefined), 5);
    assert.equal(nbdErrorOf({ errno: "EIO" }), 5);
  });
});

void describe("error classes", () => {
  void test("stable codes, errno, name and cause", () => {
    const cause = new Error("inner");
    const e = new BlockforkError("ERR_X", E.EIO, "outer", { cause });
    assert.equal(e.code, "ERR_X");
    assert.equal(e.errno, E.EIO);
    assert.equal(e.name, "BlockforkError");
    assert.equal(e.cause, cause);
    const io = new IoError(E.ENOSPC, "pwrite", "offset 0");
    assert.equal(io.code, "ENOSPC");
    assert.equal(io.syscall, "pwrite");
    assert.equal(io.name, "IoError");
    assert.ok(io instanceof BlockforkError);
    assert.equal(new ReadOnlyError().code, "ERR_READ_ONLY");
    assert.equal(new ReadOnlyError().errno, E.EPERM);
    assert.equal(new ShutdownError().code, "ERR_SHUTDOWN");
    assert.equal(new NotSupportedError("x").code, "ERR_NOT_SUPPORTED");
    assert.equal(new OutOfRangeError("x").code, "ERR_OUT_OF_RANGE");
    assert.equal(new UsageError("x").code, "ERR_USAGE");
  });

  void test("errnoName and errnoOf", () => {
    assert.equal(errnoName(E.EIO), "EIO");
    assert.equal(errnoName(E.ENOSPC), "ENOSPC");
    assert.equal(errnoName(99999), "E99999");
    assert.equal(errnoOf(new ReadOnlyError()), E.EPERM);
    assert.equal(errnoOf({ errno: -E.EINVAL }), E.EINVAL);
    assert.equal(errnoOf({ errno: 0 }), E.EIO);
    assert.equal(errnoOf(42), E.EIO);
  });
});

void describe("buffer pool", () => {
  void test("small sizes are plain buffers of the exact size", () => {
    for (const n of [1, 4096, 8 * KiB - 1]) assert.equal(acquire(n).length, n);
  });

  void test("sizes from 8 KiB up are pooled: a 33 KiB batch body comes back as the same 64 KiB buffer", () => {
    const a = acquire(8 * KiB);
    assert.equal(a.length, 8 * KiB);
    const b = acquire(33 * KiB);
    assert.equal(b.length, 64 * KiB);
    release(b);
    const c = acquire(64 * KiB);
    assert.equal(c, b, "the released buffer of the same class comes back");
    assert.notEqual(acquire(40 * KiB), c, "a buffer is handed out once");
    release(a);
    assert.equal(acquire(8 * KiB), a, "and so does an 8 KiB one");
  });

  void test("large sizes round up to a power of two and are recycled", () => {
    const a = acquire(128 * KiB);
    assert.equal(a.length, 128 * KiB);
    const b = acquire(128 * KiB + 1);
    assert.equal(b.length, 256 * KiB);
    const c = acquire(3 * MiB);
    assert.equal(c.length, 4 * MiB);
    release(b);
    const d = acquire(200 * KiB);
    assert.equal(d, b, "the released buffer of the same class comes back");
    const e = acquire(200 * KiB);
    assert.notEqual(e, b, "a buffer is handed out once");
    release(a);
    release(c);
    release(d);
    release(e);
    // Drain what this test pooled so later tests start from an empty pool.
    const back = [acquire(128 * KiB), acquire(4 * MiB), acquire(256 * KiB), acquire(256 * KiB)];
    assert.ok(back.includes(a) && back.includes(c) && back.includes(d) && back.includes(e));
  });

  void test("buffers outside the classes are not pooled", () => {
    const odd = Buffer.allocUnsafe(300 * KiB);
    release(odd);
    const small = Buffer.allocUnsafe(4096);
    release(small);
    assert.notEqual(acquire(300 * KiB), odd);
    const huge = acquire(65 * MiB);
    assert.equal(huge.length, 65 * MiB);
    release(huge);
    assert.notEqual(acquire(65 * MiB), huge);
  });

  void test("at most 128 MiB is kept idle", () => {
    const bufs = [acquire(64 * MiB), acquire(64 * MiB), acquire(64 * MiB)];
    for (const b of bufs) release(b);
    const again = [acquire(64 * MiB), acquire(64 * MiB), acquire(64 * MiB)];
    const reused = again.filter((b) => bufs.includes(b)).length;
    assert.equal(reused, 2);
  });
});

/** A Duplex that records writes and can hold their completion. */
class FakeStream extends Duplex {
  readonly chunks: Buffer[] = [];
  hold = false;
  private readonly held: (() => void)[] = [];
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: (e?: Error | null) => void): void {
    this.chunks.push(Buffer.from(chunk));
    if (this.hold) this.held.push(() => cb());
    else cb();
  }
  override _read(): void {}
  /** Complete every held write. */
  releaseAll(): void {
    this.hold = false;
    for (const cb of this.held.splice(0)) cb();
  }
  get output(): Buffer {
    return Buffer.concat(this.chunks);
  }
}

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

// The default geometry of OutputQueue (constructed with the stream only, as transmission does).
const SLAB = 256 * KiB;
const MAX_SLABS = 16;

void describe("OutputQueue", () => {
  void test("adjacent committed regions go out as one write", async () => {
    const s = new FakeStream();
    const q = new OutputQueue(s);
    const a = q.reserve(3);
    const slab = q.cur;
    slab.buf.write("abc", a, "latin1");
    const b = q.reserve(2);
    assert.equal(q.cur, slab);
    slab.buf.write("de", b, "latin1");
    q.commit(slab, a, a + 3);
    q.commit(slab, b, b + 2);
    q.flush();
    assert.equal(s.chunks.length, 1);
    assert.equal(s.output.toString("latin1"), "abcde");
    await tick();
    assert.ok(q.idle);
  });

  void test("regions committed out of order go out in commit order", async () => {
    const s = new FakeStream();
    const q = new OutputQueue(s);
    const a = q.reserve(2);
    const b = q.reserve(2);
    const slab = q.cur;
    slab.buf.write("AA", a, "latin1");
    slab.buf.write("BB", b, "latin1");
    q.commit(slab, b, b + 2);
    q.commit(slab, a, a + 2);
    q.pushExternal(Buffer.from("CC"));
    assert.equal(q.unflushed, 2);
    q.flush();
    assert.equal(q.unflushed, 0);
    assert.equal(s.output.toString("latin1"), "BBAACC");
    await tick();
    assert.ok(q.idle);
    assert.equal(q.pendingWrites, 0);
  });

  void test("a slab is reused from the top once everything in it was written", async () => {
    const s = new FakeStream();
    const q = new OutputQueue(s);
    const a = q.reserve(100);
    q.commit(q.cur, a, a + 100);
    q.flush();
    await tick();
    assert.equal(q.reserve(10), 0);
  });

  void test("when every slab is busy reserve fails until writes complete, then onSpace fires", async () => {
    const s = new FakeStream();
    s.hold = true;
    const q = new OutputQueue(s);
    let space = 0;
    q.onSpace = () => space++;
    const big = SLAB - 1000;
    const slabs = new Set<unknown>();
    for (let i = 0; i < MAX_SLABS; i++) {
      assert.ok(q.canReserve(big), `slab ${i}`);
      const at = q.reserve(big);
      assert.ok(at >= 0);
      slabs.add(q.cur);
      q.cur.buf.fill(i, at, at + big);
      q.commit(q.cur, at, at + big);
      q.flush();
    }
    assert.equal(slabs.size, MAX_SLABS, "one slab per large region");
    assert.equal(q.canReserve(big), false);
    assert.equal(q.reserve(big), -1);
    // A small reply still gets out, in its own buffer when no slab has room.
    q.pushSmall(Buffer.alloc(2000, 0xab));
    q.flush();
    assert.equal(space, 0);
    s.releaseAll();
    await tick();
    assert.ok(space >= 1);
    assert.ok(q.idle);
    assert.ok(q.canReserve(big));
    assert.ok(q.reserve(big) >= 0);
    const expected = [];
    for (let i = 0; i < MAX_SLABS; i++) expected.push(Buffer.alloc(big, i));
    expected.push(Buffer.alloc(2000, 0xab));
    assert.ok(s.output.equals(Buffer.concat(expected)));
  });

  void test("cancel gives a reserved region back", async () => {
    const s = new FakeStream();
    const q = new OutputQueue(s);
    const slab = q.cur;
    assert.equal(q.reserve(1000), 0);
    q.cancel(slab);
    // Nothing in the slab is pending any more: reserve starts at its top again.
    assert.equal(q.reserve(1000), 0);
    assert.equal(q.cur, slab);
    q.cancel(slab);
    q.flush();
    await tick();
    assert.equal(s.chunks.length, 0);
  });

  void test("a pooled external buffer goes back to the pool once written", async () => {
    const s = new FakeStream();
    const q = new OutputQueue(s);
    const pooled = acquire(200 * KiB);
    pooled.fill(7);
    q.pushExternal(pooled.subarray(0, 10), pooled);
    q.flush();
    await tick();
    assert.deepEqual(s.output, Buffer.alloc(10, 7));
    assert.equal(acquire(200 * KiB), pooled);
  });
});

void describe("threadSleeps (inline-write throttling probe)", () => {
  void test("counts the JS thread's voluntary sleeps, which a blocking wait raises", () => {
    const before = binding.threadSleeps();
    assert.ok(Number.isInteger(before) && before >= 0, `threadSleeps() = ${before}`);
    // A futex wait on the JS thread: the kernel puts it to sleep (a voluntary context switch).
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 20);
    assert.ok(binding.threadSleeps() > before, "a 20 ms futex wait must count as a voluntary sleep");
  });
});

void describe("sendPieces (lent reads) and setSendBuffer", () => {
  /** A connected unix-socket pair: the server side's descriptor and the client socket. */
  async function socketPair(
    dir: string,
  ): Promise<{ fd: number; server: Socket; client: Socket; close(): void }> {
    const path = join(dir, "s.sock");
    const srv = createServer();
    await new Promise<void>((r) => srv.listen(path, r));
    const accepted = new Promise<Socket>((r) => srv.once("connection", r));
    const client = connect(path);
    const server = await accepted;
    server.pause();
    return {
      fd: plainSocketFd(server),
      server,
      client,
      close: () => {
        client.destroy();
        server.destroy();
        srv.close();
      },
    };
  }

  void test("an empty piece list sends the header alone", async () => {
    // It was slice::from_raw_parts(NULL, 0) (Node's pointer for an empty typed array): undefined
    // behaviour, an abort in a debug build of the addon.
    const dir = mkdtempSync(join(tmpdir(), "blockfork-send-"));
    const p = await socketPair(dir);
    try {
      assert.equal(binding.sendPieces(p.fd, Buffer.from("hi"), new Float64Array(0), 0, -1), 2);
      const got = await new Promise<Buffer>((r) => p.client.once("data", r));
      assert.equal(got.toString(), "hi");
    } finally {
      p.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  void test("every copy mode sends header, pieces and zeroes in order; a full socket stops it", async () => {
    const dir = mkdtempSync(join(tmpdir(), "blockfork-send-"));
    try {
      const a = randomBytes(300 * KiB);
      const b = randomBytes(100 * KiB);
      writeFileSync(join(dir, "a"), a);
      writeFileSync(join(dir, "b"), b);
      const fa = openSync(join(dir, "a"), "r");
      const fb = openSync(join(dir, "b"), "r");
      const header = Buffer.from("HEADER-16-BYTES!");
      // a[1000, +200 KiB), 5000 zeroes, b[7, +4096), a[250 KiB, +50 KiB)
      const pieces = Float64Array.from([
        fa,
        1000,
        200 * KiB,
        -1,
        0,
        5000,
        fb,
        7,
        4096,
        fa,
        250 * KiB,
        50 * KiB,
      ]);
      const want = Buffer.concat([
        header,
        a.subarray(1000, 1000 + 200 * KiB),
        Buffer.alloc(5000),
        b.subarray(7, 7 + 4096),
        a.subarray(250 * KiB, 300 * KiB),
      ]);
      for (const copyFd of [-1, -2, fa, fb]) {
        const p = await socketPair(dir);
        try {
          assert.ok(setSendBuffer(p.fd, 4 * MiB) > 0, "setSendBuffer");
          const got: Buffer[] = [];
          p.client.on("data", (c: Buffer) => got.push(c));
          assert.equal(sendPieces(p.fd, header, pieces, 0, copyFd), want.length, `copyFd ${copyFd}`);
          while (Buffer.concat(got).length < want.length) await new Promise((r) => setTimeout(r, 5));
          assert.ok(Buffer.concat(got).equals(want), `copyFd ${copyFd}: bytes differ`);
        } finally {
          p.close();
        }
        // A small send buffer and a reader that has not read: the call stops early and says how
        // far it got; resuming from there (header done, `skip` into the pieces) completes it.
        const q = await socketPair(dir);
        try {
          setSendBuffer(q.fd, 16 * KiB);
          q.client.pause();
          const first = sendPieces(q.fd, header, pieces, 0, copyFd);
          assert.ok(first > 0 && first < want.length, `copyFd ${copyFd}: first call sent ${first}`);
          const got: Buffer[] = [];
          q.client.on("data", (c: Buffer) => got.push(c));
          q.client.resume();
          let sent = first;
          while (sent < want.length) {
            await new Promise((r) => setTimeout(r, 5));
            const h = sent < header.length ? header.subarray(sent) : Buffer.alloc(0);
            const r = sendPieces(q.fd, h, pieces, Math.max(0, sent - header.length), copyFd);
            assert.ok(r >= 0, `copyFd ${copyFd}: ${r}`);
            sent += r;
          }
          while (Buffer.concat(got).length < want.length) await new Promise((r) => setTimeout(r, 5));
          assert.ok(Buffer.concat(got).equals(want), `copyFd ${copyFd}: resumed bytes differ`);
        } finally {
          q.close();
        }
      }
      closeSync(fa);
      closeSync(fb);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  void test("a reply whose rest cannot be read ends that connection, without throwing", async () => {
    // A zero-copy reply the socket takes only in part: the rest is read from the file, which
    // fails here (a closed descriptor stands in for a disk error after the pages were dropped).
    const dir = mkdtempSync(join(tmpdir(), "blockfork-send-"));
    const p = await socketPair(dir);
    try {
      writeFileSync(join(dir, "f"), randomBytes(256 * KiB));
      const fd = openSync(join(dir, "f"), "r");
      closeSync(fd);
      setSendBuffer(p.fd, 16 * KiB);
      p.client.pause();
      const q = new OutputQueue(p.server, p.fd);
      const errors: Error[] = [];
      p.server.on("error", (e) => errors.push(e));
      q.pushFile(Buffer.from("HEADER-16-BYTES!"), fd, 0, 256 * KiB);
      q.pushSmall(Buffer.from("next reply"));
      assert.doesNotThrow(() => q.flush());
      assert.ok(p.server.destroyed, "the connection is destroyed");
      assert.ok(q.handedOver, "nothing is left queued");
      await new Promise((r) => setImmediate(r));
      assert.equal(errors.length, 1, "the stream reports the read error");
    } finally {
      p.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  /**
   * A structured reply whose data fails to read while it is sent: the client gets the chunk
   * completed with zeroes, then an ERROR chunk with DONE, and the connection goes on (proto.md:
   * the data chunk was not final). `push` queues the reply, whose data is `length` bytes.
   */
  async function failedStructuredRead(
    push: (q: OutputQueue, dir: string) => void,
    length: number,
  ): Promise<{ data: Buffer; error: Buffer; next: Buffer }> {
    const dir = mkdtempSync(join(tmpdir(), "blockfork-send-"));
    const p = await socketPair(dir);
    try {
      setSendBuffer(p.fd, 16 * KiB);
      p.client.pause();
      const q = new OutputQueue(p.server, p.fd);
      const seen: unknown[] = [];
      q.onReadError = (e) => seen.push(e); // the connection logs and counts it
      push(q, dir);
      q.pushSmall(Buffer.from("next reply"));
      assert.doesNotThrow(() => q.flush());
      assert.ok(!p.server.destroyed, "the connection goes on");
      const hdr = 16;
      const errLen = 20 + 6 + 40; // at least: header, error, message length, a message
      p.client.resume();
      const got = await receive(p, hdr + length + errLen);
      const all = Buffer.concat([got, await receive(p, 0)]);
      const errAt = hdr + length;
      const msgLen = all.readUInt16BE(errAt + 24);
      const next = errAt + 26 + msgLen;
      const rest =
        all.length >= next + 10 ? all : Buffer.concat([all, await receive(p, next + 10 - all.length)]);
      assert.equal(seen.length, 1, "the read error is reported to the connection once");
      return {
        data: rest.subarray(hdr, errAt),
        error: rest.subarray(errAt, next),
        next: rest.subarray(next, next + 10),
      };
    } finally {
      p.close();
      rmSync(dir, { recursive: true, force: true });
    }
  }

  function assertErrorChunk(error: Buffer, cookie: number): void {
    assert.equal(error.readUInt32BE(0), 0x668e33ef, "a structured reply chunk");
    assert.equal(error.readUInt16BE(4), 1, "DONE");
    assert.equal(error.readUInt16BE(6), 0x8001, "NBD_REPLY_TYPE_ERROR");
    assert.equal(error.readUInt32BE(12), cookie);
    assert.equal(error.readUInt32BE(20), 5, "EIO");
    assert.match(error.subarray(26).toString(), /read failed while it was sent/);
  }

  void test("structured: a file reply whose rest cannot be read is completed with zeroes and failed with an ERROR chunk", async () => {
    const file = randomBytes(256 * KiB);
    const { data, error, next } = await failedStructuredRead((q, dir) => {
      writeFileSync(join(dir, "f"), file);
      const fd = openSync(join(dir, "f"), "r");
      closeSync(fd); // sendfile fails at once: the header goes, then the rest cannot be read
      q.pushFile(Buffer.from("HEADER-16-BYTES!"), fd, 0, 256 * KiB, { cookieHi: 0, cookieLo: 77 });
    }, 256 * KiB);
    assert.ok(data.equals(Buffer.alloc(256 * KiB)), "the chunk is completed with zeroes");
    assertErrorChunk(error, 77);
    assert.equal(next.toString(), "next reply");
  });

  void test("structured: a lent reply whose pieces cannot be read is completed with zeroes and failed with an ERROR chunk", async () => {
    let released = 0;
    const { data, error, next } = await failedStructuredRead((q) => {
      const lease: PieceLease = {
        offset: 0,
        length: 100 * KiB,
        pieces: Float64Array.from([1_000_000, 0, 100 * KiB]), // not an open descriptor
        copyFd: -2,
        data: null,
        release: () => void released++,
      };
      q.pushLease(Buffer.from("HEADER-16-BYTES!"), lease, { cookieHi: 0, cookieLo: 78 });
    }, 100 * KiB);
    assert.ok(data.equals(Buffer.alloc(100 * KiB)), "the chunk is completed with zeroes");
    assertErrorChunk(error, 78);
    assert.equal(next.toString(), "next reply");
    assert.equal(released, 1, "the lease was released once");
  });

  /** Read `n` bytes from the client side of `p`, then stop listening. */
  async function receive(p: { client: Socket }, n: number): Promise<Buffer> {
    const got: Buffer[] = [];
    let have = 0;
    const on = (c: Buffer): void => {
      got.push(c);
      have += c.length;
    };
    p.client.on("data", on);
    while (have < n) await new Promise((r) => setTimeout(r, 5));
    p.client.off("data", on);
    return Buffer.concat(got);
  }

  /**
   * Run `body` with a scratch directory and a connected socket pair whose sender has a 4 MiB
   * send buffer (room for every reply below); `opened` files are closed, then all is removed.
   */
  async function withSendRig(
    body: (dir: string, p: Awaited<ReturnType<typeof socketPair>>, opened: BlockFile[]) => Promise<void>,
  ): Promise<void> {
    const dir = mkdtempSync(join(tmpdir(), "blockfork-send-"));
    const p = await socketPair(dir);
    const opened: BlockFile[] = [];
    try {
      assert.ok(setSendBuffer(p.fd, 4 * MiB) > 0);
      await body(dir, p, opened);
    } finally {
      for (const f of opened) f.close();
      p.close();
      rmSync(dir, { recursive: true, force: true });
    }
  }

  /** Write `data` to dir/f and open it as a BlockFile (registered for mapped sends). */
  function mappedFile(dir: string, data: Buffer, opened: BlockFile[]): BlockFile {
    writeFileSync(join(dir, "f"), data);
    const file = BlockFile.open(join(dir, "f"));
    opened.push(file);
    return file;
  }

  void test("a BlockFile's pieces go from its mapping, copied at the call: a later overwrite is not sent", async () => {
    await withSendRig(async (dir, p, opened) => {
      const data = randomBytes(1 * MiB);
      const file = mappedFile(dir, data, opened);
      const before = binding.mappedWindows();
      const header = Buffer.from("HDR!");
      // Scattered pieces and zeroes, as a snapshot lends them; the reader has not read yet.
      const pieces = Float64Array.from([
        file.fd,
        4096,
        8192,
        -1,
        0,
        5000,
        file.fd,
        512 * KiB,
        300 * KiB,
        file.fd,
        0,
        4096,
      ]);
      const want = Buffer.concat([
        header,
        data.subarray(4096, 4096 + 8192),
        Buffer.alloc(5000),
        data.subarray(512 * KiB, 812 * KiB),
        data.subarray(0, 4096),
      ]);
      p.client.pause();
      assert.equal(sendPieces(p.fd, header, pieces, 0, -2), want.length);
      assert.ok(binding.mappedWindows() > before, "the file was mapped");
      // The pages change before the reader reads: what was sent is what the file held at the call
      // (a copy, not page references as sendfile would leave).
      const w = openSync(join(dir, "f"), "r+");
      writeSync(w, Buffer.alloc(1 * MiB, 0xee), 0, 1 * MiB, 0);
      closeSync(w);
      p.client.resume();
      assert.ok((await receive(p, want.length)).equals(want), "the bytes as they were at the call");
    });
  });

  void test("more pieces than one sendmsg takes (1024 iovecs), read or mapped, arrive in order", async () => {
    await withSendRig(async (dir, p, opened) => {
      const data = randomBytes(1 * MiB);
      const file = mappedFile(dir, data, opened);
      const raw = openSync(join(dir, "f"), "r");
      try {
        // 2500 pieces of 100 bytes from scattered offsets, a zero piece every 7th.
        const triples: number[] = [];
        const parts: Buffer[] = [];
        for (let i = 0; i < 2500; i++) {
          const at = (i * 7919 * 100) % (1 * MiB - 100);
          if (i % 7 === 0) {
            triples.push(-1, 0, 100);
            parts.push(Buffer.alloc(100));
          } else {
            triples.push(-3, at, 100);
            parts.push(data.subarray(at, at + 100));
          }
        }
        const want = Buffer.concat(parts);
        for (const fd of [raw, file.fd]) {
          const pieces = Float64Array.from(triples.map((v) => (v === -3 ? fd : v)));
          assert.equal(sendPieces(p.fd, Buffer.alloc(0), pieces, 0, -2), want.length);
          const what = fd === raw ? "read" : "mapped";
          assert.ok((await receive(p, want.length)).equals(want), `${what}: bytes differ`);
        }
      } finally {
        closeSync(raw);
      }
    });
  });

  void test("a send maps at most two new windows; pieces beyond them are read, the bytes are the same", async () => {
    await withSendRig(async (dir, p, opened) => {
      // Five 64 MiB windows of one sparse file, a marked 4 KiB at the start of each.
      const W = 64 * MiB;
      const marks = [0, 1, 2, 3, 4].map(() => randomBytes(4096));
      const w = openSync(join(dir, "f"), "w");
      ftruncateSync(w, 5 * W);
      marks.forEach((m, i) => writeSync(w, m, 0, m.length, i * W));
      closeSync(w);
      const file = BlockFile.open(join(dir, "f"), { readOnly: true });
      opened.push(file);
      const pieces = Float64Array.from(marks.flatMap((_, i) => [file.fd, i * W, 4096]));
      const want = Buffer.concat(marks);
      const base = binding.mappedWindows();
      for (const mapped of [2, 4, 5]) {
        assert.equal(sendPieces(p.fd, Buffer.alloc(0), pieces, 0, -2), want.length);
        assert.ok((await receive(p, want.length)).equals(want), `${mapped}: bytes differ`);
        assert.equal(binding.mappedWindows() - base, mapped, "two new windows per send at most");
      }
    });
  });

  void test("closing a BlockFile unmaps it: a descriptor number reused by another file sends that file", async () => {
    await withSendRig(async (dir, p) => {
      const a = randomBytes(256 * KiB);
      const b = randomBytes(256 * KiB);
      writeFileSync(join(dir, "a"), a);
      writeFileSync(join(dir, "b"), b);
      const fa = BlockFile.open(join(dir, "a"));
      const piece = (fd: number): Float64Array => Float64Array.from([fd, 0, 256 * KiB]);
      assert.equal(sendPieces(p.fd, Buffer.alloc(0), piece(fa.fd), 0, -2), 256 * KiB);
      assert.ok((await receive(p, 256 * KiB)).equals(a));
      const reused = fa.fd;
      fa.close();
      // A plain descriptor (never registered) now gets the same number.
      const fb = openSync(join(dir, "b"), "r");
      try {
        assert.equal(fb, reused, "precondition: the number is reused");
        assert.equal(sendPieces(p.fd, Buffer.alloc(0), piece(fb), 0, -2), 256 * KiB);
        assert.ok((await receive(p, 256 * KiB)).equals(b), "the new file's bytes, not the old mapping's");
      } finally {
        closeSync(fb);
      }
    });
  });

  void test("a mapped file cut short under a send: what exists is sent, the rest is left to the caller, no signal", async () => {
    await withSendRig(async (dir, p, opened) => {
      const data = randomBytes(512 * KiB);
      const file = mappedFile(dir, data, opened);
      const pieces = Float64Array.from([file.fd, 0, 512 * KiB]);
      assert.equal(sendPieces(p.fd, Buffer.alloc(0), pieces, 0, -2), 512 * KiB); // maps the window
      assert.ok((await receive(p, 512 * KiB)).equals(data));
      // Cut to 100 KiB: the mapping's pages past it can no longer be read (SIGBUS in user space;
      // EFAULT for the kernel's copy), so the send falls back to pread, which stops at the end.
      const w = openSync(join(dir, "f"), "r+");
      ftruncateSync(w, 100 * KiB);
      closeSync(w);
      const header = Buffer.from("HDR!");
      const r = sendPieces(p.fd, header, pieces, 0, -2);
      assert.equal(r, header.length + 100 * KiB, "header and the bytes that still exist");
      assert.ok((await receive(p, r)).equals(Buffer.concat([header, data.subarray(0, 100 * KiB)])));
    });
  });
});

void describe("the gateway's tracking mirror", () => {
  void test("keeps documents for a bounded number of volumes: a new one past the limit is 507, known ones still update, across a restart", async () => {
    const dir = mkdtempSync(join(tmpdir(), "bf-mirror-"));
    try {
      mkdirSync(join(dir, MIRROR_DIR));
      const doc = (id: string, n: number): Record<string, unknown> => ({
        volumeId: id,
        extents: [],
        dirtyBytes: n,
      });
      let m = new TrackingMirror(dir, 3);
      for (const id of ["a", "b", "c"]) await m.put(id, doc(id, 1));
      await assert.rejects(m.put("d", doc("d", 1)), (e: unknown) => {
        assert.ok(e instanceof HttpError);
        assert.equal(e.status, 507);
        assert.match(e.message, /keeps the tracking of 3 volumes .*remove the documents/);
        return true;
      });
      await m.put("b", doc("b", 2)); // a known volume still updates
      assert.equal((JSON.parse((await m.get("b"))!) as { dirtyBytes: number }).dirtyBytes, 2);
      assert.equal(await m.get("d"), null);
      m = new TrackingMirror(dir, 3); // a restarted gateway counts the files it finds
      await assert.rejects(m.put("e", doc("e", 1)), { status: 507 });
      rmSync(join(dir, MIRROR_DIR, "a.json"));
      m = new TrackingMirror(dir, 3);
      await m.put("e", doc("e", 1));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

void describe("the gateway link's TLS hints", () => {
  void test("https:// to plain HTTP, http:// to TLS, an untrusted certificate: each says what to change", async () => {
    const dir = mkdtempSync(join(tmpdir(), "bf-tlshint-"));
    const plain = createHttpServer((_q, r) => r.end("ok"));
    let tlsSrv: ReturnType<typeof createHttpsServer> | null = null;
    try {
      const certs = await makeTestCerts(join(dir, "certs"));
      tlsSrv = createHttpsServer(
        { cert: readFileSync(certs.serverCert), key: readFileSync(certs.serverKey) },
        (_q, r) => r.end("ok"),
      );
      const listen = (s: {
        listen: (p: number, h: string, cb: () => void) => void;
        address: () => unknown;
      }) =>
        new Promise<number>((res) =>
          s.listen(0, "127.0.0.1", () => res((s.address() as { port: number }).port)),
        );
      const p1 = await listen(plain);
      const p2 = await listen(tlsSrv);
      const hint = async (url: string): Promise<string> => {
        try {
          await (await undiciRequest(url)).body.text();
        } catch (e) {
          return transportHint(e, url);
        }
        throw new Error(`${url} answered`);
      };
      assert.match(await hint(`https://127.0.0.1:${p1}/`), /plain HTTP: use http:\/\/ instead of https:\/\//);
      assert.match(await hint(`http://127.0.0.1:${p2}/`), /use https:\/\/ in --gateway/);
      assert.match(await hint(`https://127.0.0.1:${p2}/`), /certificate is not trusted .*--gateway-ca/);
    } finally {
      plain.close();
      tlsSrv?.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

void describe("BlockBits", () => {
  void test("has, add, delete, clear, and next across words, at bit 31 and at the end", () => {
    const bits = new BlockBits(100);
    assert.equal(bits.next(0), -1);
    for (const b of [0, 31, 32, 63, 64, 99]) bits.add(b);
    assert.ok(bits.has(31) && bits.has(99) && !bits.has(30));
    const found: number[] = [];
    for (let b = bits.next(0); b >= 0; b = bits.next(b + 1)) found.push(b);
    assert.deepEqual(found, [0, 31, 32, 63, 64, 99]);
    assert.equal(bits.next(33), 63);
    bits.delete(63);
    assert.equal(bits.next(33), 64);
    bits.clear();
    assert.equal(bits.next(0), -1);
  });
});

// The transmission phase against an in-process NbdServer, driven by the raw client after GO:
// replies byte for byte, pipelining, split and rejected writes, protocol violations, DISC,
// structured errors and sparse reads, volume failures, backpressure, and shutdown.

import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir, constants } from "node:os";
import { join } from "node:path";
import { MemoryVolume } from "../../src/volume/memory.js";
import { FileVolume } from "../../src/volume/file.js";
import { readOnly } from "../../src/volume/readonly.js";
import { IoError } from "../../src/errors.js";
import type { Volume, ZeroOptions } from "../../src/volume/volume.js";
import {
  requestBytes,
  startTestServer,
  type Chunk,
  type RawClient,
  type RawRequest,
  type TestServer,
} from "../helpers/raw-client.js";

const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, CACHE: 5, WRITE_ZEROES: 6, BLOCK_STATUS: 7 };
const F = { FUA: 1, NO_HOLE: 2, DF: 4, REQ_ONE: 8, FAST_ZERO: 16 };
const ERR = { EPERM: 1, EIO: 5, EINVAL: 22, ENOSPC: 28, ESHUTDOWN: 108 };
const T = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, ERROR: 0x8001, ERROR_OFFSET: 0x8002 };
const KiB = 1024;
const MiB = 1024 * 1024;
const MEM_SIZE = 8 * MiB;

function hex(s: string): Buffer {
  return Buffer.from(s.replace(/\s+/g, ""), "hex");
}

function u64(v: number | bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b[i] = (x & 0xff) | 1;
  }
  return b;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Poll `cond` every 10 ms; fails after `timeoutMs`. */
async function waitUntil(cond: () => boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) assert.fail(`condition not met in ${timeoutMs} ms`);
    await sleep(10);
  }
}

/** A filter that completes every call after a delay chosen per call (replies out of order). */
function delayed(next: Volume, delayOf: (offset: number) => number): Volume {
  const later = <T>(offset: number, f: () => Promise<T>): Promise<T> =>
    new Promise<void>((r) => setTimeout(r, delayOf(offset))).then(f);
  return {
    size: next.size,
    description: "delayed",
    caps: () => next.caps(),
    read: (b, o) => later(o, () => next.read(b, o)),
    write: (b, o, fua) => later(o, () => next.write(b, o, fua)),
    flush: () => later(0, () => next.flush()),
    trim: (o, l, fua) => later(o, () => next.trim(o, l, fua)),
    zero: (o, l, z: ZeroOptions) => later(o, () => next.zero(o, l, z)),
    extents: (o, l) => later(o, () => next.extents(o, l)),
    cache: (o, l) => later(o, () => next.cache(o, l)),
    close: () => next.close(),
  };
}

/** Reads at or past FAULT_AT fail with EIO, writes there with ENOSPC (EDQUOT for FUA). */
const FAULT_AT = 512 * KiB;
function faulty(next: Volume): Volume {
  const E = constants.errno;
  return {
    size: next.size,
    description: "faulty",
    caps: () => next.caps(),
    read: (b, o) => (o + b.length > FAULT_AT ? Promise.reject(new IoError(E.EIO, "pread")) : next.read(b, o)),
    write: (b, o, fua) =>
      o + b.length > FAULT_AT
        ? Promise.reject(new IoError(fua ? E.EDQUOT : E.ENOSPC, "pwrite"))
        : next.write(b, o, fua),
    flush: () => next.flush(),
    trim: (o, l, fua) => next.trim(o, l, fua),
    zero: (o, l, z) => next.zero(o, l, z),
    extents: (o, l) => (o + l > FAULT_AT ? Promise.reject(new IoError(E.EIO, "lseek")) : next.extents(o, l)),
    cache: (o, l) => next.cache(o, l),
    close: () => next.close(),
  };
}

/** Writes wait until `open()` is called (then pass straight through until `close()`). */
class Gate {
  private waiting: (() => void)[] = [];
  private isOpen = false;
  held = 0;
  wrap(next: Volume): Volume {
    return {
      ...next,
      description: "gated",
      caps: () => next.caps(),
      read: (b, o) => next.read(b, o),
      flush: () => next.flush(),
      trim: (o, l, fua) => next.trim(o, l, fua),
      zero: (o, l, z) => next.zero(o, l, z),
      extents: (o, l) => next.extents(o, l),
      cache: (o, l) => next.cache(o, l),
      close: () => next.close(),
      write: (b, o, fua) => {
        if (this.isOpen) return next.write(b, o, fua);
        this.held++;
        return new Promise<void>((r) => this.waiting.push(r)).then(() => next.write(b, o, fua));
      },
    };
  }
  open(): void {
    this.isOpen = true;
    for (const w of this.waiting.splice(0)) w();
  }
  close(): void {
    this.isOpen = false;
    this.held = 0;
  }
}
const gate = new Gate();

/**
 * A sparse region (data, hole, data) whose first piece fails at once and whose last piece is
 * still being read 100 ms later: `lateDone` says whether that read had finished.
 */
const racy = { lateDone: false };
function racyVolume(): Volume {
  const mem = new MemoryVolume(MiB);
  return {
    size: mem.size,
    description: "racy",
    caps: () => mem.caps(),
    read: (b, o) => {
      if (o === 0) return sleep(5).then(() => Promise.reject(new IoError(constants.errno.EIO, "pread")));
      if (o === 72 * KiB) {
        return sleep(100).then(() => {
          b.fill(0xab);
          racy.lateDone = true;
        });
      }
      return mem.read(b, o);
    },
    write: (b, o, fua) => mem.write(b, o, fua),
    flush: () => mem.flush(),
    trim: (o, l, fua) => mem.trim(o, l, fua),
    zero: (o, l, z) => mem.zero(o, l, z),
    extents: (_offset, l) =>
      Promise.resolve([
        { length: 8 * KiB, flags: 0 },
        { length: 64 * KiB, flags: 3 },
        { length: l - 72 * KiB, flags: 0 },
      ]),
    cache: (o, l) => mem.cache(o, l),
    close: () => mem.close(),
  };
}

let srv: TestServer;
let fileDir: string;
let fileVol: FileVolume;

before(async () => {
  fileDir = mkdtempSync(join(tmpdir(), "bf-tx-"));
  fileVol = FileVolume.open(join(fileDir, "disk.img"), { create: true, size: 8 * MiB });
  srv = await startTestServer({
    exports: [
      { name: "mem", volume: new MemoryVolume(MEM_SIZE) },
      { name: "ro", volume: readOnly(new MemoryVolume(MiB)) },
      {
        name: "small",
        volume: new MemoryVolume(MiB),
        blockSizes: { minimum: 512, preferred: 4096, maximum: 64 * KiB },
      },
      // Later offsets complete sooner: replies come back in reverse order.
      {
        name: "slow",
        volume: delayed(new MemoryVolume(MiB), (o) => 5 + Math.max(0, 60 - Math.floor(o / 4096))),
      },
      { name: "faulty", volume: faulty(new MemoryVolume(MiB)) },
      { name: "racy", volume: racyVolume() },
      { name: "gated", volume: gate.wrap(new MemoryVolume(MEM_SIZE)) },
      { name: "file", volume: fileVol },
    ],
  });
});
after(async () => {
  await srv.stop();
  await fileVol.close();
  rmSync(fileDir, { recursive: true, force: true });
});

interface Opts {
  structured?: boolean;
  meta?: boolean;
}

/** A client in transmission on export `name`. */
async function session(name: string, o: Opts = {}): Promise<RawClient> {
  const c = await srv.connect();
  await c.handshake({
    name,
    structured: o.structured === true,
    ...(o.meta === true ? { meta: ["base:allocation"] } : {}),
  });
  return c;
}

/** What came back for one request. */
interface Answer {
  error: number;
  /** READ data (simple) or the chunks of a structured reply. */
  data?: Buffer;
  chunks?: Chunk[];
  /** Position in the order replies completed. */
  order: number;
}

/** Read replies until every request in `sent` is answered; fails on unknown or repeated cookies. */
async function collect(
  c: RawClient,
  sent: Map<bigint, RawRequest>,
  structured: boolean,
): Promise<Map<bigint, Answer>> {
  const answers = new Map<bigint, Answer>();
  const partial = new Map<bigint, Chunk[]>();
  let order = 0;
  while (answers.size < sent.size) {
    const magic = await c.nextMagic();
    if (magic === 0x67446698) {
      const r = await c.simpleReply();
      const req = sent.get(r.cookie);
      assert.ok(req, `simple reply for unknown cookie ${r.cookie}`);
      assert.ok(!answers.has(r.cookie), `second reply for cookie ${r.cookie}`);
      assert.ok(!(structured && req.type === CMD.READ), "READ must get a structured reply");
      const a: Answer = { error: r.error, order: order++ };
      if (req.type === CMD.READ && r.error === 0) a.data = await c.read(req.length ?? 0);
      answers.set(r.cookie, a);
    } else {
      assert.ok(structured, `magic 0x${magic.toString(16)} in simple mode`);
      const ch = await c.chunk();
      const req = sent.get(ch.cookie);
      assert.ok(req, `chunk for unknown cookie ${ch.cookie}`);
      assert.ok(!answers.has(ch.cookie), `chunk after DONE for cookie ${ch.cookie}`);
      const list = partial.get(ch.cookie) ?? [];
      list.push(ch);
      partial.set(ch.cookie, list);
      if (ch.flags & 1) {
        const err = list.find((x) => x.type & 0x8000);
        answers.set(ch.cookie, {
          error: err ? err.payload.readUInt32BE(0) : 0,
          chunks: list,
          order: order++,
        });
        partial.delete(ch.cookie);
      }
    }
  }
  return answers;
}

/** Rebuild READ data from structured chunks, checking that they tile [offset, offset+length). */
function assemble(chunks: Chunk[], offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  const covered = new Uint8Array(length);
  for (const ch of chunks) {
    if (ch.type === T.OFFSET_DATA) {
      const at = Number(ch.payload.readBigUInt64BE(0)) - offset;
      const data = ch.payload.subarray(8);
      assert.ok(data.length > 0 && at >= 0 && at + data.length <= length, "OFFSET_DATA inside the request");
      data.copy(out, at);
      for (let i = at; i < at + data.length; i++) covered[i] += 1;
    } else if (ch.type === T.OFFSET_HOLE) {
      assert.equal(ch.payload.length, 12);
      const at = Number(ch.payload.readBigUInt64BE(0)) - offset;
      const n = ch.payload.readUInt32BE(8);
      assert.ok(n > 0 && at >= 0 && at + n <= length, "OFFSET_HOLE inside the request");
      for (let i = at; i < at + n; i++) covered[i] += 1;
    } else if (ch.type === T.NONE) {
      // Ends a reply whose data chunk could not be final (proto.md: NONE only with DONE, no payload).
      assert.equal(ch.flags & 1, 1, "a NONE chunk carries DONE");
      assert.equal(ch.payload.length, 0);
      assert.equal(ch, chunks[chunks.length - 1], "the NONE chunk is the last");
    } else {
      assert.fail(`unexpected chunk type ${ch.type} in a successful read`);
    }
  }
  for (let i = 0; i < length; i++) if (covered[i] !== 1) assert.fail(`byte ${i} covered ${covered[i]} times`);
  return out;
}

void describe("simple replies, byte for byte", () => {
  const cookie = 0x0102030405060708n;
  const ok = hex("67446698 00000000 0102030405060708");

  void test("WRITE then READ", async () => {
    const c = await session("mem");
    const data = pattern(4096, 1);
    c.request({ type: CMD.WRITE, cookie, offset: 12288, length: 4096 }, data);
    assert.deepEqual(await c.read(16), ok);
    c.request({ type: CMD.READ, cookie, offset: 12288, length: 4096 });
    assert.deepEqual(await c.read(16 + 4096), Buffer.concat([ok, data]));
    assert.equal(c.available, 0);
    await c.disconnect();
  });

  void test("FLUSH, TRIM, WRITE_ZEROES (with and without NO_HOLE) and CACHE", async () => {
    const c = await session("mem");
    c.request({ type: CMD.WRITE, cookie, offset: 0, length: 3 * 65536 }, pattern(3 * 65536, 2));
    assert.deepEqual(await c.read(16), ok);
    const cases: RawRequest[] = [
      { type: CMD.FLUSH, cookie },
      { type: CMD.TRIM, cookie, offset: 0, length: 65536 },
      { type: CMD.WRITE_ZEROES, cookie, offset: 65536, length: 1000 },
      { type: CMD.WRITE_ZEROES, cookie, flags: F.NO_HOLE | F.FUA, offset: 131072, length: 65536 },
      { type: CMD.CACHE, cookie, offset: 0, length: MEM_SIZE },
      { type: CMD.TRIM, cookie, flags: F.FUA, offset: 70000, length: 10 },
      { type: CMD.WRITE, cookie, flags: F.FUA, offset: 200000, length: 1 },
    ];
    for (const r of cases) {
      c.request(r, r.type === CMD.WRITE ? Buffer.from([0x99]) : undefined);
      assert.deepEqual(await c.read(16), ok, `command ${r.type}`);
    }
    const back = await c.readAt(0, 3 * 65536, 9n);
    const expected = pattern(3 * 65536, 2);
    expected.fill(0, 0, 65536);
    expected.fill(0, 65536, 66536);
    expected.fill(0, 131072, 196608);
    expected.fill(0, 70000, 70010);
    assert.ok(back.equals(expected));
    await c.disconnect();
  });

  void test("the cookie is echoed verbatim, all 64 bits", async () => {
    const c = await session("mem");
    for (const k of [0n, 1n, 0xffffffffffffffffn, 0x8000000000000000n, 0x00000001ffffffffn]) {
      c.request({ type: CMD.FLUSH, cookie: k });
      const r = await c.read(16);
      assert.equal(r.readBigUInt64BE(8), k);
      assert.equal(r.readUInt32BE(4), 0);
    }
    await c.disconnect();
  });

  void test("errors are simple replies with the NBD error number", async () => {
    const c = await session("mem");
    const cases: [RawRequest, number][] = [
      [{ type: CMD.READ, cookie, offset: MEM_SIZE, length: 1 }, ERR.EINVAL],
      [{ type: CMD.READ, cookie, offset: 0, length: 0 }, ERR.EINVAL],
      [{ type: CMD.READ, cookie, offset: 0, length: 512, flags: F.DF }, ERR.EINVAL],
      [{ type: CMD.TRIM, cookie, offset: MEM_SIZE - 1, length: 2 }, ERR.EINVAL],
      [{ type: CMD.BLOCK_STATUS, cookie, offset: 0, length: 512 }, ERR.EINVAL],
      [{ type: CMD.FLUSH, cookie, offset: 1 }, ERR.EINVAL],
      [{ type: 9, cookie, offset: 0, length: 512 }, ERR.EINVAL],
      [{ type: CMD.READ, cookie, offset: 2n ** 64n - 1n, length: 1 }, ERR.EINVAL],
    ];
    for (const [r, e] of cases) {
      c.request(r);
      const reply = await c.read(16);
      assert.deepEqual(
        reply,
        Buffer.concat([hex("67446698"), hex(e.toString(16).padStart(8, "0")), u64(cookie)]),
        `${r.type}`,
      );
    }
    await c.disconnect();
  });

  void test("a large READ (1 MiB, beyond one reply slab)", async () => {
    const c = await session("mem");
    const data = pattern(MiB, 3);
    assert.equal(await c.writeAt(3 * MiB + 5, data), 0);
    c.request({ type: CMD.READ, cookie, offset: 3 * MiB + 5, length: MiB });
    const r = await c.read(16 + MiB);
    assert.deepEqual(r.subarray(0, 16), ok);
    assert.ok(r.subarray(16).equals(data));
    await c.disconnect();
  });
});

void describe("structured replies, byte for byte", () => {
  const cookie = 0xa1a2a3a4b1b2b3b4n;

  void test("READ: one OFFSET_DATA chunk with DONE", async () => {
    const c = await session("mem", { structured: true });
    const data = pattern(4096, 4);
    assert.equal(await c.writeAt(40960, data, 1n), 0);
    c.request({ type: CMD.READ, cookie, offset: 40960, length: 4096 });
    const r = await c.read(20 + 8 + 4096);
    assert.deepEqual(
      r,
      Buffer.concat([hex("668e33ef 0001 0001"), u64(cookie), hex("00001008"), u64(40960), data]),
    );
    // With DF: the same.
    c.request({ type: CMD.READ, cookie, flags: F.DF, offset: 40960, length: 4096 });
    assert.deepEqual(await c.read(20 + 8 + 4096), r);
    await c.disconnect();
  });

  void test("WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE: a simple reply or a NONE chunk", async () => {
    const c = await session("mem", { structured: true });
    const cases: RawRequest[] = [
      { type: CMD.WRITE, cookie, offset: 0, length: 10 },
      { type: CMD.FLUSH, cookie },
      { type: CMD.TRIM, cookie, offset: 0, length: 10 },
      { type: CMD.WRITE_ZEROES, cookie, offset: 0, length: 10, flags: F.FAST_ZERO },
      { type: CMD.CACHE, cookie, offset: 0, length: 10 },
    ];
    for (const r of cases) {
      c.request(r, r.type === CMD.WRITE ? Buffer.alloc(10, 1) : undefined);
      if ((await c.nextMagic()) === 0x67446698) {
        assert.deepEqual(await c.read(16), Buffer.concat([hex("67446698 00000000"), u64(cookie)]));
      } else {
        assert.deepEqual(
          await c.read(20),
          Buffer.concat([hex("668e33ef 0001 0000"), u64(cookie), hex("00000000")]),
        );
      }
    }
    await c.disconnect();
  });

  void test("BLOCK_STATUS: holes have flags 3, data 0; REQ_ONE gives one descriptor", async () => {
    const c = await session("mem", { structured: true, meta: true });
    assert.equal(await c.writeAt(MiB, pattern(65536, 5), 1n), 0);
    c.request({ type: CMD.BLOCK_STATUS, cookie, offset: MiB - 65536, length: 4 * 65536 });
    const r = await c.read(20 + 4 + 3 * 8);
    const id = r.readUInt32BE(20);
    assert.ok(id !== 0, "the context id from SET_META_CONTEXT");
    assert.deepEqual(
      r,
      Buffer.concat([
        hex("668e33ef 0001 0005"),
        u64(cookie),
        hex("0000001c"),
        r.subarray(20, 24),
        hex("00010000 00000003  00010000 00000000  00020000 00000003"),
      ]),
    );
    c.request({ type: CMD.BLOCK_STATUS, cookie, flags: F.REQ_ONE, offset: MiB - 65536, length: 4 * 65536 });
    assert.deepEqual(
      await c.read(20 + 4 + 8),
      Buffer.concat([
        hex("668e33ef 0001 0005"),
        u64(cookie),
        hex("0000000c"),
        r.subarray(20, 24),
        hex("00010000 00000003"),
      ]),
    );
    // Lengths never exceed the request, even mid-extent.
    c.request({ type: CMD.BLOCK_STATUS, cookie, offset: MiB + 100, length: 1000 });
    const small = await c.structuredReply();
    assert.equal(small.length, 1);
    const p = small[0].payload;
    let sum = 0;
    for (let i = 4; i < p.length; i += 8) sum += p.readUInt32BE(i);
    assert.ok(sum > 0 && sum <= 1000);
    assert.equal(p.readUInt32BE(8), 0, "inside written data");
    await c.disconnect();
  });

  void test("errors are NBD_REPLY_TYPE_ERROR chunks with the error number and a message", async () => {
    const c = await session("mem", { structured: true, meta: true });
    const cases: [RawRequest, number][] = [
      [{ type: CMD.READ, cookie, offset: MEM_SIZE - 1, length: 2 }, ERR.EINVAL],
      [{ type: CMD.READ, cookie, offset: 0, length: 33 * MiB }, ERR.EINVAL],
      [{ type: CMD.BLOCK_STATUS, cookie, offset: MEM_SIZE, length: 1 }, ERR.EINVAL],
      [{ type: CMD.BLOCK_STATUS, cookie, offset: 0, length: 512, flags: F.DF }, ERR.EINVAL],
      [{ type: CMD.WRITE_ZEROES, cookie, offset: MEM_SIZE, length: 1 }, ERR.ENOSPC],
      [{ type: 200, cookie }, ERR.EINVAL],
    ];
    for (const [r, e] of cases) {
      c.request(r);
      const chunks = await c.structuredReply();
      assert.equal(chunks.length, 1, `${r.type}`);
      const ch = chunks[0];
      assert.equal(ch.cookie, cookie);
      assert.equal(ch.flags, 1);
      assert.equal(ch.type, T.ERROR);
      assert.equal(ch.payload.readUInt32BE(0), e, `${r.type}`);
      const len = ch.payload.readUInt16BE(4);
      assert.equal(ch.payload.length, 6 + len);
      assert.ok(len > 0, "a message");
      new TextDecoder("utf-8", { fatal: true }).decode(ch.payload.subarray(6));
    }
    await c.disconnect();
  });

  void test("a large READ over a sparse region: OFFSET_HOLE chunks without DF", async () => {
    const c = await session("mem", { structured: true });
    const base = 2 * MiB;
    const data = pattern(4096, 6);
    assert.equal(await c.writeAt(base, data, 1n), 0);
    const off = base - 65536;
    const len = 256 * KiB;
    c.request({ type: CMD.READ, cookie, offset: off, length: len });
    const chunks = await c.structuredReply();
    for (const [i, ch] of chunks.entries()) {
      assert.equal(ch.cookie, cookie);
      assert.equal(ch.flags & 1, i === chunks.length - 1 ? 1 : 0, "DONE only on the last chunk");
    }
    assert.ok(
      chunks.some((ch) => ch.type === T.OFFSET_HOLE),
      "at least one hole chunk",
    );
    const expected = Buffer.alloc(len);
    data.copy(expected, 65536);
    assert.ok(assemble(chunks, off, len).equals(expected));
    await c.disconnect();
  });

  void test("a sparse READ whose first piece fails answers only after its other pieces are done with the buffer", async () => {
    // The reply buffer goes back to a pool shared by every connection: a piece still being read
    // into it would write into memory handed to someone else (another reply, a WRITE payload).
    const c = await session("racy", { structured: true });
    racy.lateDone = false;
    c.request({ type: CMD.READ, cookie, offset: 0, length: 80 * KiB });
    const chunks = await c.structuredReply();
    assert.ok(
      chunks.some((ch) => ch.type & 0x8000),
      "the READ fails",
    );
    assert.ok(
      racy.lateDone,
      "the error was answered while a piece was still being read into the reply buffer",
    );
    await c.disconnect();
  });

  void test("the same READ with DF: a single OFFSET_DATA chunk", async () => {
    const c = await session("mem", { structured: true });
    const base = 2 * MiB + 512 * KiB;
    const data = pattern(4096, 7);
    assert.equal(await c.writeAt(base, data, 1n), 0);
    const off = base - 65536;
    const len = 256 * KiB;
    c.request({ type: CMD.READ, cookie, flags: F.DF, offset: off, length: len });
    const chunks = await c.structuredReply();
    assert.equal(chunks.length, 1);
    assert.equal(chunks[0].type, T.OFFSET_DATA);
    assert.equal(chunks[0].flags, 1);
    assert.equal(Number(chunks[0].payload.readBigUInt64BE(0)), off);
    const expected = Buffer.alloc(len);
    data.copy(expected, 65536);
    assert.ok(chunks[0].payload.subarray(8).equals(expected));
    await c.disconnect();
  });

  void test("a READ below 64 KiB over a hole: one OFFSET_DATA chunk of zeroes", async () => {
    const c = await session("mem", { structured: true });
    c.request({ type: CMD.READ, cookie, offset: 6 * MiB, length: 65535 });
    const chunks = await c.structuredReply();
    assert.equal(chunks.length, 1);
    assert.equal(chunks[0].type, T.OFFSET_DATA);
    assert.ok(chunks[0].payload.subarray(8).equals(Buffer.alloc(65535)));
    await c.disconnect();
  });
});

void describe("pipelining and framing", () => {
  void test("hundreds of requests in one write: every cookie answered once, data right", async () => {
    for (const structured of [false, true]) {
      const c = await session("mem", { structured });
      const slot = 8192;
      const first = 4 * MiB;
      // Batch 1: writes; batch 2: reads of them, mixed with more writes, flushes and trims.
      const sent = new Map<bigint, RawRequest>();
      const bytes: Buffer[] = [];
      let cookie = 1000n;
      for (let i = 0; i < 150; i++) {
        const r = { type: CMD.WRITE, cookie: cookie++, offset: first + i * slot, length: 4096 + i };
        sent.set(r.cookie, r);
        bytes.push(requestBytes(r), pattern(r.length, i + 1));
      }
      c.write(Buffer.concat(bytes));
      const w = await collect(c, sent, structured);
      for (const a of w.values()) assert.equal(a.error, 0);
      sent.clear();
      bytes.length = 0;
      const reads = new Map<bigint, number>();
      for (let i = 0; i < 150; i++) {
        const r = { type: CMD.READ, cookie: cookie++, offset: first + i * slot, length: 4096 + i };
        sent.set(r.cookie, r);
        reads.set(r.cookie, i);
        bytes.push(requestBytes(r));
        if (i % 10 === 0) {
          const f = { type: CMD.FLUSH, cookie: cookie++ };
          sent.set(f.cookie, f);
          bytes.push(requestBytes(f));
        }
        if (i % 7 === 0) {
          const t = { type: CMD.TRIM, cookie: cookie++, offset: first + i * slot + 4096 + i, length: 100 };
          sent.set(t.cookie, t);
          bytes.push(requestBytes(t));
        }
      }
      c.write(Buffer.concat(bytes));
      const answers = await collect(c, sent, structured);
      assert.equal(answers.size, sent.size);
      for (const [k, i] of reads) {
        const a = answers.get(k)!;
        assert.equal(a.error, 0);
        const req = sent.get(k)!;
        const got = structured ? assemble(a.chunks!, Number(req.offset), req.length!) : a.data!;
        assert.ok(got.equals(pattern(4096 + i, i + 1)), `read ${i}`);
      }
      for (const a of answers.values()) assert.equal(a.error, 0);
      await c.disconnect();
    }
  });

  void test("replies come back out of order, matched by cookie", async () => {
    const c = await session("slow");
    const sent = new Map<bigint, RawRequest>();
    const bytes: Buffer[] = [];
    for (let i = 0; i < 40; i++) {
      const r = { type: CMD.READ, cookie: BigInt(500 + i), offset: i * 4096, length: 512 };
      sent.set(r.cookie, r);
      bytes.push(requestBytes(r));
    }
    c.write(Buffer.concat(bytes));
    const answers = await collect(c, sent, false);
    const orders = [...sent.keys()].map((k) => answers.get(k)!.order);
    assert.ok(
      orders.some((o, i) => i > 0 && o < orders[i - 1]),
      "the slow volume completes later requests first",
    );
    for (const a of answers.values()) assert.equal(a.error, 0);
    await c.disconnect();
  });

  void test("a WRITE arriving one byte at a time", async () => {
    const c = await session("mem");
    const data = pattern(300, 8);
    await c.sendSlowly(
      Buffer.concat([requestBytes({ type: CMD.WRITE, cookie: 77n, offset: 5 * MiB + 3, length: 300 }), data]),
    );
    assert.deepEqual(await c.simpleReply(), { error: 0, cookie: 77n });
    await c.sendSlowly(requestBytes({ type: CMD.READ, cookie: 78n, offset: 5 * MiB + 3, length: 300 }));
    assert.deepEqual(await c.simpleReply(), { error: 0, cookie: 78n });
    assert.deepEqual(await c.read(300), data);
    await c.disconnect();
  });

  void test("requests cut at arbitrary places across writes", async () => {
    const c = await session("mem");
    const sent = new Map<bigint, RawRequest>();
    const parts: Buffer[] = [];
    for (let i = 0; i < 60; i++) {
      const w = { type: CMD.WRITE, cookie: BigInt(2 * i + 1), offset: 6 * MiB + i * 1000, length: 1000 };
      const r = { type: CMD.READ, cookie: BigInt(2 * i + 2), offset: 6 * MiB + i * 1000, length: 1000 };
      sent.set(w.cookie, w);
      sent.set(r.cookie, r);
      parts.push(requestBytes(w), pattern(1000, 100 + i), requestBytes(r));
    }
    const all = Buffer.concat(parts);
    const done = collect(c, sent, false);
    let pos = 0;
    let step = 1;
    while (pos < all.length) {
      const n = Math.min(all.length - pos, (step * 7919) % 61 || 1);
      await c.send(all.subarray(pos, pos + n));
      if (step % 5 === 0) await new Promise((r) => setImmediate(r));
      pos += n;
      step++;
    }
    const answers = await done;
    for (let i = 0; i < 60; i++) {
      assert.equal(answers.get(BigInt(2 * i + 1))!.error, 0);
      assert.ok(answers.get(BigInt(2 * i + 2))!.data!.equals(pattern(1000, 100 + i)), `read ${i}`);
    }
    await c.disconnect();
  });

  void test("a client that reads its replies late still gets all of them (backpressure)", async () => {
    const c = await session("mem");
    const sent = new Map<bigint, RawRequest>();
    const bytes: Buffer[] = [];
    for (let i = 0; i < 400; i++) {
      const r = { type: CMD.READ, cookie: BigInt(i + 1), offset: (i % 100) * 65536, length: 65536 };
      sent.set(r.cookie, r);
      bytes.push(requestBytes(r));
    }
    await c.send(Buffer.concat(bytes));
    await sleep(300);
    const answers = await collect(c, sent, false);
    assert.equal(answers.size, 400);
    for (const a of answers.values()) {
      assert.equal(a.error, 0);
      assert.equal(a.data!.length, 65536);
    }
    await c.disconnect();
  });
});

void describe("receive buffers held by slow writes", () => {
  void test("writes that hold every receive buffer pause the connection; when they finish, it goes on", async () => {
    // Each WRITE payload is handed to the volume as a view into a 256 KiB receive buffer, so slow
    // writes keep buffers busy. Writes that arrive one per read each keep a buffer of their own;
    // past 32 busy buffers the connection stops reading. When the writes finish, their buffers are
    // free again and reading must resume (twice: the second round reuses the spares).
    const c = await session("gated");
    let cookie = 1n;
    const n = 48;
    for (let round = 0; round < 2; round++) {
      gate.close();
      const sent = new Map<bigint, RawRequest>();
      for (let i = 0; i < n; i++) {
        const r = { type: CMD.WRITE, cookie: cookie++, offset: i * 4096, length: 4096 };
        sent.set(r.cookie, r);
        c.write(Buffer.concat([requestBytes(r), pattern(4096, round * n + i + 1)]));
        await sleep(3); // one read per request on the server
      }
      await sleep(100);
      assert.ok(gate.held < n, `all ${n} writes were taken in while the volume held them: no backpressure`);
      gate.open();
      const answers = await Promise.race([
        collect(c, sent, false),
        sleep(10_000).then(() =>
          assert.fail(`round ${round}: the connection never resumed after the writes finished`),
        ),
      ]);
      assert.equal(answers.size, n);
      for (const a of answers.values()) assert.equal(a.error, 0);
    }
    const r = { type: CMD.READ, cookie: cookie++, offset: (n - 1) * 4096, length: 4096 };
    c.write(requestBytes(r));
    const got = await collect(c, new Map([[r.cookie, r]]), false);
    assert.ok(got.get(r.cookie)!.data!.equals(pattern(4096, 2 * n)), "the data of the last round");
    await c.disconnect();
  });
});

void describe("WRITE payloads held by a slow volume", () => {
  void test("the connection stops reading once 64 MiB of WRITE payloads wait on the volume", async () => {
    // 1 MiB writes to a volume that holds them all: without a bound on their bytes, the 512
    // requests allowed in flight could hold 16 GiB of 32 MiB payloads.
    const c = await session("gated");
    gate.close();
    const n = 96;
    const sent = new Map<bigint, RawRequest>();
    for (let i = 0; i < n; i++) {
      const r = { type: CMD.WRITE, cookie: BigInt(1000 + i), offset: (i % 8) * MiB, length: MiB };
      sent.set(r.cookie, r);
      c.write(Buffer.concat([requestBytes(r), pattern(MiB, i + 1)]));
    }
    await waitUntil(() => gate.held >= 64, 10_000);
    await sleep(300);
    assert.ok(gate.held <= 66, `${gate.held} MiB of writes taken in while the volume held them`);
    gate.open();
    const answers = await collect(c, sent, false);
    assert.equal(answers.size, n);
    for (const a of answers.values()) assert.equal(a.error, 0);
    await c.disconnect();
  });
});

void describe("rejected WRITEs are drained", () => {
  /** A payload made of DISC requests: if the server parsed it as requests, it would disconnect. */
  function trap(length: number): Buffer {
    const disc = requestBytes({ type: CMD.DISC, cookie: 0xbadn });
    const b = Buffer.alloc(length);
    for (let i = 0; i + 28 <= length; i += 28) disc.copy(b, i);
    return b;
  }

  async function rejectsThenWorks(
    name: string,
    req: RawRequest,
    error: number,
    piece?: number,
  ): Promise<void> {
    const c = await session(name);
    const payload = trap(req.length!);
    const bytes = Buffer.concat([requestBytes(req), payload]);
    if (piece === undefined) c.write(bytes);
    else for (let i = 0; i < bytes.length; i += piece) await c.send(bytes.subarray(i, i + piece));
    assert.deepEqual(await c.simpleReply(), { error, cookie: req.cookie });
    const data = pattern(512, 9);
    assert.equal(await c.writeAt(0, data, 2n), name === "ro" ? ERR.EPERM : 0);
    const back = await c.readAt(0, 512, 3n);
    if (name !== "ro") assert.deepEqual(back, data);
    assert.equal(await c.closesWithin(50), false);
    await c.disconnect();
  }

  void test("past the end: ENOSPC", async () => {
    await rejectsThenWorks(
      "mem",
      { type: CMD.WRITE, cookie: 1n, offset: MEM_SIZE - 100, length: 4096 },
      ERR.ENOSPC,
    );
  });

  void test("over the maximum block size: EINVAL", async () => {
    await rejectsThenWorks(
      "small",
      { type: CMD.WRITE, cookie: 1n, offset: 0, length: 128 * KiB },
      ERR.EINVAL,
    );
  });

  void test("misaligned: EINVAL", async () => {
    await rejectsThenWorks("small", { type: CMD.WRITE, cookie: 1n, offset: 512, length: 1000 }, ERR.EINVAL);
  });

  void test("with bad flags: EINVAL", async () => {
    await rejectsThenWorks(
      "mem",
      { type: CMD.WRITE, cookie: 1n, flags: F.DF, offset: 0, length: 600 },
      ERR.EINVAL,
    );
  });

  void test("read-only export: EPERM", async () => {
    await rejectsThenWorks("ro", { type: CMD.WRITE, cookie: 1n, offset: 0, length: 5000 }, ERR.EPERM);
  });

  void test("a rejected payload arriving in small pieces", async () => {
    await rejectsThenWorks(
      "small",
      { type: CMD.WRITE, cookie: 1n, offset: 0, length: 100 * KiB },
      ERR.EINVAL,
      777,
    );
  });

  void test("read-only export: TRIM and WRITE_ZEROES are EPERM, READ works", async () => {
    const c = await session("ro");
    for (const t of [CMD.TRIM, CMD.WRITE_ZEROES]) {
      c.request({ type: t, cookie: 5n, offset: 0, length: 4096 });
      assert.deepEqual(await c.simpleReply(), { error: ERR.EPERM, cookie: 5n });
    }
    assert.deepEqual(await c.readAt(0, 4096), Buffer.alloc(4096));
    await c.disconnect();
  });
});

void describe("protocol violations and disconnects", () => {
  void test("bad request magic: earlier requests are answered, then the connection closes", async () => {
    const c = await session("mem");
    const data = pattern(1000, 10);
    c.write(
      Buffer.concat([
        requestBytes({ type: CMD.WRITE, cookie: 1n, offset: 0, length: 1000 }),
        data,
        requestBytes({ type: CMD.READ, cookie: 2n, offset: 0, length: 1000 }),
        requestBytes({ type: CMD.READ, cookie: 3n, offset: 0, length: 1000, magic: 0x25609514 }),
        requestBytes({ type: CMD.READ, cookie: 4n, offset: 0, length: 1000 }),
      ]),
    );
    const rest = await c.readToEnd();
    assert.deepEqual(
      rest,
      Buffer.concat([hex("67446698 00000000"), u64(1), hex("67446698 00000000"), u64(2), data]),
    );
  });

  void test("bad request magic after large READs: their replies arrive whole before the close", async () => {
    const c = await session("mem");
    const data = pattern(MiB, 12);
    assert.equal(await c.writeAt(0, data, 1n), 0);
    c.write(
      Buffer.concat([
        requestBytes({ type: CMD.READ, cookie: 2n, offset: 0, length: MiB }),
        requestBytes({ type: CMD.READ, cookie: 3n, offset: 0, length: 64 * KiB }),
        requestBytes({ type: CMD.READ, cookie: 4n, offset: 0, length: 1000, magic: 0 }),
      ]),
    );
    const rest = await c.readToEnd(5000);
    assert.equal(rest.length, 16 + MiB + 16 + 64 * KiB, "every byte of both replies");
    assert.ok(
      rest.equals(
        Buffer.concat([
          hex("67446698 00000000"),
          u64(2),
          data,
          hex("67446698 00000000"),
          u64(3),
          data.subarray(0, 64 * KiB),
        ]),
      ),
    );
  });

  void test("bad request magic while a request is in flight: its reply still comes first", async () => {
    const c = await session("slow");
    c.write(
      Buffer.concat([
        requestBytes({ type: CMD.READ, cookie: 1n, offset: 0, length: 100 }),
        Buffer.from("garbage that is not a request header"),
      ]),
    );
    const rest = await c.readToEnd(3000);
    assert.deepEqual(rest, Buffer.concat([hex("67446698 00000000"), u64(1), Buffer.alloc(100)]));
  });

  void test("DISC: in-flight requests are answered, later ones ignored, then the server closes", async () => {
    const c = await session("slow");
    c.write(
      Buffer.concat([
        requestBytes({ type: CMD.READ, cookie: 1n, offset: 0, length: 10 }),
        requestBytes({ type: CMD.WRITE, cookie: 2n, offset: 4096, length: 3 }),
        Buffer.from([7, 8, 9]),
        requestBytes({ type: CMD.DISC, cookie: 3n }),
        requestBytes({ type: CMD.READ, cookie: 4n, offset: 0, length: 10 }),
      ]),
    );
    const rest = await c.readToEnd(3000);
    const r1 = Buffer.concat([hex("67446698 00000000"), u64(1), Buffer.alloc(10)]);
    const r2 = Buffer.concat([hex("67446698 00000000"), u64(2)]);
    assert.ok(
      rest.equals(Buffer.concat([r1, r2])) || rest.equals(Buffer.concat([r2, r1])),
      `replies ${rest.toString("hex")}`,
    );
  });

  void test("DISC with nothing in flight closes at once", async () => {
    const c = await session("mem");
    c.request({ type: CMD.DISC, cookie: 1n });
    assert.equal((await c.readToEnd(2000)).length, 0);
  });

  void test("after DISC and the client's close, the server lets go of the connection at once", async () => {
    const own = await startTestServer({
      exports: [{ name: "d", volume: new MemoryVolume(MiB) }],
      logLevel: "info",
    });
    try {
      const c = await own.connect();
      await c.handshake();
      assert.equal(own.server.connectionCount, 1);
      await c.disconnect();
      c.destroy();
      const t0 = Date.now();
      while (own.server.connectionCount > 0 && Date.now() - t0 < 3000) await sleep(20);
      assert.equal(own.server.connectionCount, 0, `still held ${Date.now() - t0} ms after the client closed`);
      assert.ok(
        own.log.some((l) => l.includes("closed:")),
        "the close is logged",
      );
    } finally {
      await own.stop();
    }
  });

  void test("a client that half-closes after a request still gets the reply", async () => {
    const c = await session("slow");
    c.request({ type: CMD.READ, cookie: 1n, offset: 0, length: 10 });
    c.end();
    const rest = await c.readToEnd(3000);
    assert.deepEqual(rest, Buffer.concat([hex("67446698 00000000"), u64(1), Buffer.alloc(10)]));
  });

  void test("DISC followed by a half-close: in-flight requests are still answered", async () => {
    const c = await session("slow");
    c.request({ type: CMD.READ, cookie: 1n, offset: 0, length: 10 });
    c.request({ type: CMD.DISC, cookie: 2n });
    c.end();
    const rest = await c.readToEnd(3000);
    assert.deepEqual(rest, Buffer.concat([hex("67446698 00000000"), u64(1), Buffer.alloc(10)]));
  });

  void test("a truncated request followed by close: the server lets go of the connection", async () => {
    const own = await startTestServer({ exports: [{ name: "d", volume: new MemoryVolume(MiB) }] });
    try {
      for (const cut of [1, 20, 27]) {
        const c = await own.connect();
        await c.handshake();
        assert.equal(own.server.connectionCount, 1);
        c.write(requestBytes({ type: CMD.WRITE, cookie: 1n, offset: 0, length: 4096 }).subarray(0, cut));
        c.end();
        await c.expectClosed(3000);
        c.destroy();
        for (let i = 0; i < 50 && own.server.connectionCount > 0; i++) await sleep(20);
        assert.equal(own.server.connectionCount, 0, `cut at ${cut}`);
      }
      // And with a truncated WRITE payload.
      const c = await own.connect();
      await c.handshake();
      c.write(
        Buffer.concat([
          requestBytes({ type: CMD.WRITE, cookie: 1n, offset: 0, length: 4096 }),
          Buffer.alloc(100),
        ]),
      );
      c.end();
      await c.expectClosed(3000);
      c.destroy();
      for (let i = 0; i < 50 && own.server.connectionCount > 0; i++) await sleep(20);
      assert.equal(own.server.connectionCount, 0, "truncated payload");
    } finally {
      await own.stop();
    }
  });
});

void describe("volume failures", () => {
  void test("simple replies carry the mapped errno", async () => {
    const c = await session("faulty");
    c.request({ type: CMD.READ, cookie: 1n, offset: FAULT_AT - 10, length: 20 });
    assert.deepEqual(await c.simpleReply(), { error: ERR.EIO, cookie: 1n });
    c.request({ type: CMD.WRITE, cookie: 2n, offset: FAULT_AT, length: 4 }, Buffer.alloc(4));
    assert.deepEqual(await c.simpleReply(), { error: ERR.ENOSPC, cookie: 2n });
    c.request({ type: CMD.WRITE, cookie: 3n, flags: F.FUA, offset: FAULT_AT, length: 4 }, Buffer.alloc(4));
    assert.deepEqual(
      await c.simpleReply(),
      { error: ERR.ENOSPC, cookie: 3n },
      "EDQUOT is ENOSPC on the wire",
    );
    assert.deepEqual(await c.readAt(0, 100, 4n), Buffer.alloc(100));
    await c.disconnect();
  });

  void test("structured: an error chunk with the errno and a message, for small and large reads", async () => {
    const c = await session("faulty", { structured: true });
    for (const [cookie, offset, length] of [
      [1n, FAULT_AT - 10, 20],
      [2n, FAULT_AT - 65536, 128 * KiB],
    ] as [bigint, number, number][]) {
      c.request({ type: CMD.READ, cookie, offset, length });
      const chunks = await c.structuredReply();
      const last = chunks[chunks.length - 1];
      assert.equal(last.flags & 1, 1);
      const err = chunks.find((ch) => ch.type & 0x8000);
      assert.ok(err, "an error chunk");
      assert.ok(err.type === T.ERROR || err.type === T.ERROR_OFFSET);
      assert.equal(err.payload.readUInt32BE(0), ERR.EIO);
      assert.ok(err.payload.readUInt16BE(4) > 0, "with a message");
    }
    c.request({ type: CMD.READ, cookie: 3n, offset: 0, length: 100 });
    const ok = await c.structuredReply();
    assert.equal(ok[0].type, T.OFFSET_DATA);
    await c.disconnect();
  });
});

void describe("FileVolume export (large reads, page cache and sendfile paths)", () => {
  void test("large and small reads interleaved with writes come back whole and in frame", async () => {
    for (const structured of [false, true]) {
      const c = await session("file", { structured });
      const data = pattern(4 * MiB, 11);
      for (let off = 0; off < data.length; off += MiB) {
        assert.equal(await c.writeAt(off, data.subarray(off, off + MiB), 1n), 0);
      }
      c.request({ type: CMD.FLUSH, cookie: 2n });
      assert.deepEqual(await c.simpleReply(), { error: 0, cookie: 2n });
      // Warm the page cache, then mix large reads (beyond one slab) with small ones and writes.
      const sent = new Map<bigint, RawRequest>();
      const bytes: Buffer[] = [];
      let cookie = 10n;
      const expect = new Map<bigint, Buffer>();
      for (let i = 0; i < 24; i++) {
        const big = i % 3 === 0;
        const offset = (i * 163840 + (big ? 0 : 777)) % (4 * MiB - 600 * KiB);
        const length = big ? 512 * KiB + i : 3000 + i;
        const r = {
          type: CMD.READ,
          cookie: cookie++,
          offset,
          length,
          ...(structured ? { flags: F.DF } : {}),
        };
        sent.set(r.cookie, r);
        expect.set(r.cookie, data.subarray(offset, offset + length));
        bytes.push(requestBytes(r));
        if (i % 4 === 1) {
          const w = { type: CMD.WRITE, cookie: cookie++, offset: 6 * MiB + i * 4096, length: 4096 };
          sent.set(w.cookie, w);
          bytes.push(requestBytes(w), pattern(4096, i));
        }
      }
      c.write(Buffer.concat(bytes));
      const answers = await collect(c, sent, structured);
      for (const [k, want] of expect) {
        const a = answers.get(k)!;
        assert.equal(a.error, 0);
        const req = sent.get(k)!;
        const got = structured ? assemble(a.chunks!, Number(req.offset), req.length!) : a.data!;
        assert.ok(got.equals(want), `read ${k}`);
      }
      await c.disconnect();
    }
  });
});

void describe("shutdown", () => {
  void test("after quiesce new requests get ESHUTDOWN; closeAll then closes the connection", async () => {
    const own = await startTestServer({ exports: [{ name: "d", volume: new MemoryVolume(MiB) }] });
    try {
      const c = await own.connect();
      await c.handshake();
      assert.equal(await own.server.quiesce(1000), true);
      c.request({ type: CMD.READ, cookie: 1n, offset: 0, length: 512 });
      assert.deepEqual(await c.simpleReply(), { error: ERR.ESHUTDOWN, cookie: 1n });
      c.request({ type: CMD.WRITE, cookie: 2n, offset: 0, length: 512 }, Buffer.alloc(512));
      assert.deepEqual(await c.simpleReply(), { error: ERR.ESHUTDOWN, cookie: 2n });
      const closing = own.server.closeAll(3000);
      await c.expectClosed(3000);
      c.end();
      await closing;
      // A client in the handshake is dropped, and new connections are not accepted.
      await assert.rejects(own.connect());
    } finally {
      await own.stop();
    }
  });

  void test("a WRITE whose payload is still arriving when the shutdown begins is waited for", async () => {
    // Accepted before the shutdown, it would otherwise reach the volume after the final flush.
    const vol = new MemoryVolume(MiB);
    const own = await startTestServer({ exports: [{ name: "d", volume: vol }] });
    try {
      const c = await own.connect();
      await c.handshake();
      const data = pattern(256 * KiB, 5);
      c.write(requestBytes({ type: CMD.WRITE, cookie: 1n, offset: 0, length: data.length }));
      c.write(data.subarray(0, 100 * KiB));
      await sleep(100);
      let quiet = false;
      const q = own.server.quiesce(5000).then((ok) => (quiet = ok));
      await sleep(200);
      assert.equal(quiet, false, "the shutdown went on while a WRITE's payload was still arriving");
      c.write(data.subarray(100 * KiB));
      assert.deepEqual(await c.simpleReply(), { error: 0, cookie: 1n });
      await q;
      assert.equal(quiet, true);
      const got = Buffer.alloc(data.length);
      await vol.read(got, 0);
      assert.ok(got.equals(data), "the write reached the volume");
      const closing = own.server.closeAll(3000);
      await c.expectClosed(3000);
      c.end();
      await closing;
    } finally {
      await own.stop();
    }
  });
});

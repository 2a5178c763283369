// A conformance suite for the Volume interface (after abstract-level's test/index.js): the same
// tests run over every implementation and filter stack, so a layer that breaks read-after-write,
// zero, trim, extents, flush or concurrency semantics is caught wherever it sits.
//
//   volumeSuite("MemoryVolume", (size) => new MemoryVolume(size));
//
// Each test makes a fresh volume with the factory and closes it at the end. Ranges follow the
// Volume contract (src/volume/volume.ts): inputs are valid, the NBD layer checked them.

import { describe, test } from "node:test";
import assert from "node:assert/strict";
import type { Extent, Volume } from "../../src/volume/volume.js";

/** Makes a fresh, zero-filled volume of `size` bytes. */
export type VolumeFactory = (size: number) => Volume | Promise<Volume>;

/** What the implementation promises beyond the bare contract. */
export interface SuiteOptions {
  /** trim() makes the range read as zeroes (true for MemoryVolume and for files on ext4). */
  trimReadsZero?: boolean;
}

const CHUNK = 64 * 1024;
const KiB = 1024;
const MiB = 1024 * 1024;

async function withVolume(
  factory: VolumeFactory,
  size: number,
  fn: (v: Volume) => Promise<void>,
): Promise<void> {
  const v = await factory(size);
  try {
    await fn(v);
  } finally {
    await v.close();
  }
}

async function readAll(v: Volume, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length, 0xee);
  await v.read(b, offset);
  return b;
}

/** Deterministic non-zero pattern, different for every (seed, position). */
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

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

/** Check the extents() contract; returns the list. */
async function checkedExtents(v: Volume, offset: number, length: number): Promise<Extent[]> {
  const list = await v.extents(offset, length);
  assert.ok(list.length >= 1, "at least one extent");
  let sum = 0;
  for (const e of list) {
    assert.ok(Number.isInteger(e.length) && e.length > 0, `extent length ${e.length}`);
    assert.ok([0, 1, 2, 3].includes(e.flags), `extent flags ${e.flags}`);
    sum += e.length;
  }
  assert.ok(sum <= length, `extents sum ${sum} <= ${length}`);
  return list;
}

/** Flags of the extent covering `pos` (relative to the start of the list), or undefined past its end. */
function flagsAt(list: Extent[], start: number, pos: number): number | undefined {
  let at = start;
  for (const e of list) {
    if (pos >= at && pos < at + e.length) return e.flags;
    at += e.length;
  }
  return undefined;
}

/** Register the conformance tests for one implementation. */
export function volumeSuite(name: string, factory: VolumeFactory, opts: SuiteOptions = {}): void {
  const trimReadsZero = opts.trimReadsZero ?? true;

  void describe(`Volume conformance: ${name}`, () => {
    void test("size is honoured; a fresh volume reads as zeroes", async () => {
      for (const size of [4 * KiB, CHUNK + 512, 3 * MiB]) {
        await withVolume(factory, size, async (v) => {
          assert.equal(v.size, size);
          assert.ok(isZero(await readAll(v, 0, size)));
          assert.equal(typeof v.description, "string");
        });
      }
    });

    void test("read-after-write at aligned and unaligned offsets", async () => {
      await withVolume(factory, 2 * MiB, async (v) => {
        const cases: [number, number][] = [
          [0, 4096],
          [4096, 8192],
          [1, 1],
          [7, 13],
          [4095, 2],
          [12345, 54321],
          [MiB + 3, 4093],
        ];
        const shadow = Buffer.alloc(v.size);
        for (const [i, [off, len]] of cases.entries()) {
          const data = pattern(len, i + 1);
          await v.write(data, off, false);
          data.copy(shadow, off);
          assert.deepEqual(await readAll(v, off, len), data, `[${off}, +${len})`);
        }
        // Later writes replaced exactly their bytes: the whole volume matches the shadow copy.
        assert.deepEqual(await readAll(v, 0, v.size), shadow);
      });
    });

    void test("writes and reads across 64 KiB chunk boundaries", async () => {
      await withVolume(factory, 1 * MiB, async (v) => {
        const a = pattern(100, 11);
        await v.write(a, CHUNK - 50, false);
        assert.deepEqual(await readAll(v, CHUNK - 50, 100), a);
        // Spanning three chunks, read back in pieces that cut the boundaries elsewhere.
        const b = pattern(3 * CHUNK - 1000, 12);
        const off = 2 * CHUNK + 500;
        await v.write(b, off, false);
        assert.deepEqual(await readAll(v, off, b.length), b);
        assert.deepEqual(await readAll(v, off + 1000, 2 * CHUNK), b.subarray(1000, 1000 + 2 * CHUNK));
        assert.ok(isZero(await readAll(v, off - 500, 500)));
        assert.ok(isZero(await readAll(v, off + b.length, 500)));
      });
    });

    void test("writes ending exactly at the end, on sizes that are not chunk multiples", async () => {
      for (const size of [CHUNK + 1000, 3 * CHUNK + 7, 5000]) {
        await withVolume(factory, size, async (v) => {
          const tail = pattern(Math.min(size, 3000), size);
          await v.write(tail, size - tail.length, false);
          assert.deepEqual(await readAll(v, size - tail.length, tail.length), tail);
          await v.write(Buffer.from([0x5a]), size - 1, false);
          assert.deepEqual(await readAll(v, size - 2, 2), Buffer.from([tail[tail.length - 2], 0x5a]));
          const whole = pattern(size, 77);
          await v.write(whole, 0, false);
          assert.deepEqual(await readAll(v, 0, size), whole);
        });
      }
    });

    void test("overwrites replace old data", async () => {
      await withVolume(factory, 256 * KiB, async (v) => {
        await v.write(pattern(CHUNK, 1), 0, false);
        const b = pattern(1000, 2);
        await v.write(b, 30000, false);
        const expected = pattern(CHUNK, 1);
        b.copy(expected, 30000);
        assert.deepEqual(await readAll(v, 0, CHUNK), expected);
      });
    });

    void test("zero with and without mayTrim reads back zeroes and leaves neighbours alone", async () => {
      await withVolume(factory, 1 * MiB, async (v) => {
        const data = pattern(512 * KiB, 3);
        for (const mayTrim of [true, false]) {
          await v.write(data, 0, false);
          // Unaligned, and a whole aligned chunk.
          await v.zero(1000, 3000, { mayTrim });
          await v.zero(2 * CHUNK, CHUNK, { mayTrim });
          const got = await readAll(v, 0, data.length);
          const expected = Buffer.from(data);
          expected.fill(0, 1000, 4000);
          expected.fill(0, 2 * CHUNK, 3 * CHUNK);
          assert.deepEqual(got, expected, `mayTrim ${mayTrim}`);
        }
      });
    });

    void test("zero with FUA, and zero up to the end", async () => {
      await withVolume(factory, CHUNK + 4096, async (v) => {
        await v.write(pattern(v.size, 4), 0, false);
        await v.zero(CHUNK - 100, 4196, { fua: true, mayTrim: true });
        const got = await readAll(v, 0, v.size);
        assert.ok(isZero(got.subarray(CHUNK - 100)));
        assert.deepEqual(got.subarray(0, CHUNK - 100), pattern(v.size, 4).subarray(0, CHUNK - 100));
      });
    });

    void test("fast zero either zeroes or fails at once with ERR_NOT_SUPPORTED", async () => {
      await withVolume(factory, 256 * KiB, async (v) => {
        const data = pattern(v.size, 5);
        await v.write(data, 0, false);
        for (const mayTrim of [true, false]) {
          try {
            await v.zero(CHUNK, CHUNK, { fast: true, mayTrim });
            assert.ok(isZero(await readAll(v, CHUNK, CHUNK)));
          } catch (e) {
            assert.equal((e as { code?: string }).code, "ERR_NOT_SUPPORTED");
            assert.ok(v.caps().fastZero, "fast zero refused only where fastZero is advertised");
          }
          await v.write(data.subarray(CHUNK, 2 * CHUNK), CHUNK, false);
        }
      });
    });

    void test("trim then read", async () => {
      await withVolume(factory, 1 * MiB, async (v) => {
        const data = pattern(v.size, 6);
        await v.write(data, 0, false);
        await v.trim(CHUNK, 2 * CHUNK, false);
        await v.trim(5 * CHUNK + 10, 100, true);
        const got = await readAll(v, 0, v.size);
        // Outside the trimmed ranges nothing changed.
        assert.deepEqual(got.subarray(0, CHUNK), data.subarray(0, CHUNK));
        assert.deepEqual(got.subarray(3 * CHUNK, 5 * CHUNK), data.subarray(3 * CHUNK, 5 * CHUNK));
        assert.deepEqual(got.subarray(5 * CHUNK + 110), data.subarray(5 * CHUNK + 110));
        if (trimReadsZero) {
          assert.ok(isZero(got.subarray(CHUNK, 3 * CHUNK)), "trimmed chunk-aligned range reads as zeroes");
          assert.ok(
            isZero(got.subarray(5 * CHUNK + 10, 5 * CHUNK + 110)),
            "trimmed small range reads as zeroes",
          );
        }
      });
    });

    void test("extents: a fresh volume is one hole, written data shows up, trimmed data goes away", async () => {
      await withVolume(factory, 2 * MiB, async (v) => {
        const holes = v.caps().extents;
        let list = await checkedExtents(v, 0, v.size);
        if (holes) {
          for (const e of list) assert.equal(e.flags, 3, "unwritten volume is all hole");
        }
        await v.write(pattern(CHUNK, 7), 4 * CHUNK, false);
        list = await checkedExtents(v, 0, v.size);
        if (holes) {
          assert.equal(flagsAt(list, 0, 4 * CHUNK), 0, "written range is data");
          assert.equal(flagsAt(list, 0, 5 * CHUNK - 1), 0, "written range is data");
          assert.equal(flagsAt(list, 0, 0), 3, "range before is a hole");
          const at = flagsAt(list, 0, v.size - 1);
          assert.ok(at === undefined || at === 3, "range after is a hole (or not reported)");
        } else {
          for (const e of list) assert.equal(e.flags & 1, 0, "no holes without caps().extents");
        }
        await v.trim(4 * CHUNK, CHUNK, false);
        list = await checkedExtents(v, 4 * CHUNK, CHUNK);
        if (holes && trimReadsZero) assert.equal(list[0].flags & 2, 2, "trimmed range reads as zero");
      });
    });

    void test("extents at unaligned offsets cover a prefix of the request", async () => {
      await withVolume(factory, 1 * MiB, async (v) => {
        await v.write(pattern(5000, 8), 70000, false);
        for (const [off, len] of [
          [1, 1],
          [100, 1000],
          [69999, 5002],
          [CHUNK - 1, 2],
          [v.size - 1, 1],
          [0, v.size],
        ] as [number, number][]) {
          const list = await checkedExtents(v, off, len);
          if (v.caps().extents) {
            const f = flagsAt(list, off, 70000);
            if (off <= 70000 && off + len > 70000 && f !== undefined)
              assert.equal(f & 1, 0, "data is not a hole");
          }
        }
      });
    });

    void test("flush and cache resolve; FUA writes read back", async () => {
      await withVolume(factory, 512 * KiB, async (v) => {
        const d = pattern(8192, 9);
        await v.write(d, 4096, true);
        await v.flush();
        await v.cache(0, v.size);
        await v.cache(100, 1);
        assert.deepEqual(await readAll(v, 4096, 8192), d);
        await Promise.all([v.flush(), v.flush(), v.flush()]);
      });
    });

    void test("hundreds of concurrent operations give the same result as sequential ones", async () => {
      const size = 4 * MiB;
      // Non-overlapping operations: the contract gives no order to calls in flight.
      type Op = {
        kind: "write" | "zero" | "trim";
        offset: number;
        length: number;
        seed: number;
        fua: boolean;
      };
      const ops: Op[] = [];
      const slot = 8 * KiB;
      for (let i = 0; i < size / slot; i++) {
        const kind = i % 7 === 3 ? "zero" : i % 11 === 5 ? "trim" : "write";
        const shift = (i * 37) % 1000;
        // [i*slot, i*slot+shift) stays untouched; the op ends before the next slot starts.
        const length = slot - 1000 - ((i * 13) % 900);
        ops.push({ kind, offset: i * slot + shift, length, seed: i + 100, fua: i % 5 === 0 });
      }
      const apply = (v: Volume, op: Op): Promise<void> => {
        if (op.kind === "write") return v.write(pattern(op.length, op.seed), op.offset, op.fua);
        if (op.kind === "zero")
          return v.zero(op.offset, op.length, { mayTrim: op.seed % 2 === 0, fua: op.fua });
        return v.trim(op.offset, op.length, op.fua);
      };
      const seq = await factory(size);
      const par = await factory(size);
      try {
        const base = pattern(size, 1);
        await seq.write(base, 0, false);
        await par.write(base, 0, false);
        for (const op of ops) await apply(seq, op);
        // All in flight at once, with reads of untouched data interleaved.
        const inflight: Promise<unknown>[] = [];
        for (const [i, op] of ops.entries()) {
          inflight.push(apply(par, op));
          if (i % 4 === 0) {
            const gapStart = op.offset - ((i * 37) % 1000);
            const gapLen = (i * 37) % 1000;
            if (gapLen > 0) {
              inflight.push(
                readAll(par, gapStart, gapLen).then((b) =>
                  assert.deepEqual(b, base.subarray(gapStart, gapStart + gapLen)),
                ),
              );
            }
          }
        }
        assert.ok(inflight.length >= 500);
        await Promise.all(inflight);
        await Promise.all([seq.flush(), par.flush()]);
        const a = await readAll(seq, 0, size);
        const b = await readAll(par, 0, size);
        const writes = ops.filter((o) => o.kind === "write");
        for (const op of writes.slice(0, 20)) {
          assert.deepEqual(b.subarray(op.offset, op.offset + op.length), pattern(op.length, op.seed));
        }
        if (trimReadsZero) {
          assert.ok(a.equals(b), "concurrent result equals sequential result");
        } else {
          // Trimmed ranges are unspecified: compare everything else.
          const mask = Buffer.alloc(size, 1);
          for (const op of ops) if (op.kind === "trim") mask.fill(0, op.offset, op.offset + op.length);
          for (let i = 0; i < size; i++) if (mask[i] && a[i] !== b[i]) assert.fail(`byte ${i} differs`);
        }
        // Many concurrent reads of the same data agree.
        const reads = await Promise.all(
          Array.from({ length: 200 }, (_, i) => readAll(par, (i * 20011) % (size - 4096), 4096)),
        );
        for (const [i, r] of reads.entries()) {
          const off = (i * 20011) % (size - 4096);
          assert.deepEqual(r, b.subarray(off, off + 4096));
        }
      } finally {
        await seq.close();
        await par.close();
      }
    });
  });
}
